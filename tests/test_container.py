"""The real container image, built here and run the way the Deployment runs it.

Part of `make test` (marker `container`: `pytest -m container` runs only these, `-m "not
container"` leaves them out). Needs root, buildah, debootstrap and curl (`make test` installs
them) and the Debian mirror + PyPI.

A small model is trained into the tests' temporary BENTOML_HOME (conftest.py), a Bento is
built from this checkout (bentofile.yaml: the lean, compiled-model-only Bento) into that same
store, and deploy/image/build.sh containerizes it (debootstrap base image, cached by its
recipe -> `bentoml containerize --backend buildah`). The image then runs with its own
entrypoint as its user (uid 1034), on a read-only root filesystem with a writable /tmp only
and BENTOML_HOME=/tmp/bentoml (readOnlyRootFilesystem + an emptyDir, as in deploy/base), and
every API is called once from the table below. Then it is stopped with SIGTERM, which must
exit 0 with nothing written outside /tmp, and its installed packages are compared with the
lock's serving set.

To cover a new API, add a row to FLOWS: a name and the requests it takes, each with the
status it must answer and, optionally, a check of the response.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement

from harness.servers import free_port
from models.schema import EXAMPLE_CUSTOMER, FEATURE_NAMES
from serving.v2.codec import columnar_request

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "deploy" / "image" / "build.sh"
# Not the user's localhost/bank_churn tags, and one per test run; removed afterwards.
TEST_IMAGE = f"localhost/bank-churn-test-{os.getpid()}"
BUILD_TIMEOUT_S = 3600  # cold: debootstrap base (~2-4 min) + the PyPI install of the pins
READY_TIMEOUT_S = 300
POD_ENV = ("BENTOML_HOME=/tmp/bentoml",)  # deploy/base/deployment.yaml sets the same
TRAINING_STACK = {"scikit-learn", "xgboost", "xgboost-cpu", "lightgbm", "pandas", "scipy", "joblib"}

SECOND = {**EXAMPLE_CUSTOMER, "Geography": "Germany", "Age": 58, "NumOfProducts": 3, "IsActiveMember": 0}


# ------------------------------------------------------------------ the API table


@dataclass
class Step:
    """One request. `{name}` in path and params is filled from values earlier steps saved;
    `until` polls (every 0.2 s, up to 60 s) until it holds; `check` must return True."""

    method: str
    path: str
    status: int
    json: Any = None
    files: dict | None = None
    params: dict[str, str] = field(default_factory=dict)
    until: Callable[[httpx.Response], bool] | None = None
    check: Callable[[httpx.Response], bool] | None = None
    save: dict[str, Callable[[httpx.Response], Any]] = field(default_factory=dict)


def _probability(r: httpx.Response) -> bool:
    p = r.json()["churn_probability"]
    return isinstance(p, float) and 0.0 <= p <= 1.0 and r.json()["model_version"].startswith("bank_churn:")


def _additive(r: httpx.Response) -> bool:
    e = r.json()
    return len(e["contributions"]) == len(FEATURE_NAMES) and math.isclose(
        e["base_value"] + sum(c["contribution"] for c in e["contributions"]), e["log_odds"], abs_tol=1e-9
    )


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["CustomerId", *FEATURE_NAMES])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


CSV_FILE = {
    "file": ("customers.csv", _csv([{"CustomerId": 1, **EXAMPLE_CUSTOMER}, {"CustomerId": 2, **SECOND}]), "text/csv")
}

FLOWS: dict[str, list[Step]] = {
    "livez": [Step("GET", "/livez", 200)],
    "readyz": [Step("GET", "/readyz", 200)],
    "metrics": [Step("GET", "/metrics", 200, check=lambda r: "bank_churn_predictions_total" in r.text)],
    "predict": [Step("POST", "/predict", 200, json={"customer": EXAMPLE_CUSTOMER}, check=_probability)],
    "predict explain": [
        Step(
            "POST",
            "/predict",
            200,
            json={"customer": EXAMPLE_CUSTOMER, "explain": True},
            check=lambda r: _probability(r) and len(r.json()["explanation"]["contributions"]) == len(FEATURE_NAMES),
        )
    ],
    "predict bad input": [
        Step(
            "POST",
            "/predict",
            400,
            json={"customer": {**EXAMPLE_CUSTOMER, "Geography": "Italy"}},
            check=lambda r: r.json()["error"].startswith("customer.Geography:"),
        )
    ],
    "predict_batch": [
        Step(
            "POST",
            "/predict_batch",
            200,
            json={"customers": [EXAMPLE_CUSTOMER, SECOND]},
            check=lambda r: len(r.json()["predictions"]) == 2,
        )
    ],
    "explain": [Step("POST", "/explain", 200, json={"customer": EXAMPLE_CUSTOMER}, check=_additive)],
    "model_card": [
        Step(
            "POST",
            "/model_card",
            200,
            json={},
            check=lambda r: r.json()["serving_backend"] == "onnxruntime" and r.json()["tag"].startswith("bank_churn:"),
        )
    ],
    "scoring job": [
        Step("POST", "/jobs", 202, files=CSV_FILE, save={"job_id": lambda r: r.json()["job_id"]}),
        Step(
            "GET",
            "/jobs/{job_id}",
            200,
            until=lambda r: r.json()["status"] not in ("queued", "running"),
            check=lambda r: r.json()["status"] == "completed" and r.json()["rows_done"] == 2,
        ),
        Step(
            "GET",
            "/jobs/{job_id}/result",
            200,
            check=lambda r: [p["CustomerId"] for p in r.json()["predictions"]] == ["1", "2"] and not r.json()["errors"],
        ),
        Step("GET", "/jobs/{job_id}/result", 200, params={"format": "csv"}, check=lambda r: r.text.count("\n") == 3),
    ],
    "v2 metadata and health": [
        Step("GET", "/v2", 200, check=lambda r: r.json()["name"]),
        Step("GET", "/v2/health/ready", 200),
        Step("GET", "/v2/models/bank_churn", 200, check=lambda r: len(r.json()["inputs"]) == len(FEATURE_NAMES)),
    ],
    "v2 infer": [
        Step(
            "POST",
            "/v2/models/bank_churn/infer",
            200,
            json=columnar_request([EXAMPLE_CUSTOMER, SECOND]),
            check=lambda r: len(next(o for o in r.json()["outputs"] if o["name"] == "churn_probability")["data"]) == 2,
        )
    ],
    "docs.json": [
        Step(
            "GET",
            "/docs.json",
            200,
            check=lambda r: (
                {"/predict", "/predict_batch", "/explain", "/model_card", "/jobs", "/v2"} <= set(r.json()["paths"])
            ),
        )
    ],
}


def run_flow(url: str, steps: list[Step]) -> None:
    saved: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for step in steps:
            params = {k: v.format(**saved) for k, v in step.params.items()}
            what = f"{step.method} {step.path.format(**saved)}"
            deadline = time.monotonic() + 60
            while True:
                r = client.request(
                    step.method, step.path.format(**saved), json=step.json, files=step.files, params=params
                )
                if step.until is None or r.status_code != 200 or step.until(r) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert r.status_code == step.status, f"{what}: HTTP {r.status_code}, expected {step.status}: {r.text[:500]}"
            assert step.check is None or step.check(r), f"{what}: unexpected response {r.text[:1000]}"
            saved.update({name: get(r) for name, get in step.save.items()})


# ------------------------------------------------------------------ build and run


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(home)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # uv for `bentoml build`
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed with {proc.returncode}:\n{out[-6000:]}"
    return proc.stdout


def _field(output: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}:\s*(.+)$", output, re.MULTILINE)
    assert m, f"build.sh printed no '{name}:' line:\n{output[-4000:]}"
    return m.group(1).strip()


@pytest.fixture(scope="module")
def bento_tag(trained, bentoml_home: Path) -> str:
    """A Bento of this checkout (bentofile.yaml), packing the freshly trained model."""
    missing = [tool for tool in ("buildah", "debootstrap", "curl") if shutil.which(tool) is None]
    assert not missing and os.geteuid() == 0, (
        f"the container test needs root and buildah, debootstrap, curl (missing: {missing or 'none'}; "
        f"uid {os.geteuid()}): run it through `make test`, which installs them, or deselect it with -m 'not container'"
    )
    env = {**_env(bentoml_home), "BANKCHURN_MODEL_TAG": str(trained.model.tag)}
    _run([str(ROOT / ".venv" / "bin" / "bentoml"), "build", "."], env, timeout=600)
    info = json.loads(
        _run([str(ROOT / ".venv" / "bin" / "bentoml"), "get", "bank_churn:latest", "-o", "json"], env, 60)
    )
    return f"{info['name']}:{info['version']}"


@pytest.fixture(scope="module")
def image(bento_tag: str, bentoml_home: Path):
    """build.sh's build step: base image (built or from its cache), then the Bento image."""
    try:
        yield _run(
            [str(BUILD_SH), "--bento", bento_tag, "--image", TEST_IMAGE, "--skip-smoke"],
            _env(bentoml_home),
            timeout=BUILD_TIMEOUT_S,
        )
    finally:
        buildah = ["buildah", "--storage-driver", "vfs"]
        inspect = [*buildah, "inspect", "--type", "image", "--format", "{{.FromImageID}}", f"{TEST_IMAGE}:latest"]
        image_id = subprocess.run(inspect, capture_output=True, text=True, check=False).stdout.strip()
        if image_id:  # by id: removes the :<version> and :latest tags together
            subprocess.run([*buildah, "rmi", "--force", image_id], capture_output=True, check=False)


class Container:
    """build.sh --skip-build --read-only --hold: the image serving until stop() is called."""

    def __init__(self, bento_tag: str, home: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [str(BUILD_SH), "--bento", bento_tag, "--image", TEST_IMAGE, "--port", str(self.port)]
        args += ["--skip-build", "--read-only", "--hold", "--ready-timeout", str(READY_TIMEOUT_S)]
        for kv in POD_ENV:
            args += ["--env", kv]
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=_env(home), stdin=subprocess.PIPE, stdout=self._out, stderr=subprocess.STDOUT, text=True
        )
        self.output = ""

    def wait_serving(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S + 120
        while "SERVING " not in self.log.read_text():
            assert self.proc.poll() is None, (
                f"build.sh exited with {self.proc.returncode}:\n{self.log.read_text()[-6000:]}"
            )
            assert time.monotonic() < deadline, f"the container did not serve in time:\n{self.log.read_text()[-6000:]}"
            time.sleep(0.2)

    def stop(self) -> tuple[int, str]:
        """Close build.sh's stdin: it stops the server (SIGTERM) and prints its report."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # build.sh's own trap stops the container it started
            self.proc.wait(60)
        self._out.close()
        self.output = self.log.read_text()
        return self.proc.returncode, self.output


@pytest.fixture(scope="module")
def container(image: str, bento_tag: str, bentoml_home: Path, tmp_path_factory):
    served = Container(bento_tag, bentoml_home, tmp_path_factory.mktemp("container") / "build.log")
    try:
        served.wait_serving()
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def stopped(container: Container) -> str:
    """The container stopped after the API tests (they come first in this file): build.sh's report."""
    rc, output = container.stop()
    assert rc == 0, output[-6000:]
    return output


# ------------------------------------------------------------------ tests


def test_image_build_reports_size_and_layers(image: str, bento_tag: str):
    assert _field(image, "bento") == bento_tag
    assert re.match(r"[0-9.]+ [kMG]B", _field(image, "image size")), _field(image, "image size")
    total = re.search(r"^\s*layers total: ([0-9.]+) MB uncompressed \((\d+) layers\)$", image, re.MULTILINE)
    assert total and float(total.group(1)) > 0 and int(total.group(2)) >= 2, image[-3000:]
    assert _field(image, "build time").endswith("excluding base image)")


@pytest.mark.parametrize("name", list(FLOWS))
def test_api_in_the_running_image(container: Container, name: str):
    run_flow(container.url, FLOWS[name])


def test_stops_cleanly_as_uid_1034_writing_only_tmp(stopped: str):
    assert re.search(r"^RESULT: OK$", stopped, re.MULTILINE), stopped[-4000:]
    assert "uid 1034" in _field(stopped, "start command")
    assert _field(stopped, "root filesystem").startswith("read-only")
    assert _field(stopped, "stop").startswith("SIGTERM -> server exited with status 0"), stopped[-4000:]
    assert _field(stopped, "writes outside /tmp") == "none", stopped[-4000:]


def test_image_installs_exactly_the_locked_serving_set(stopped: str):
    """The image's venv = requirements/serve.txt (exported from uv.lock) under the image's
    Python: nothing from the training stack, nothing unpinned."""
    installed = set(_field(stopped, "python packages").split())
    python = _field(stopped, "image python")
    env = {"python_full_version": python, "python_version": ".".join(python.split(".")[:2])}
    env |= {"implementation_name": "cpython", "sys_platform": "linux", "platform_system": "Linux"}
    from tests.test_build import _pins  # the exported lock's lines, hashes and continuations read

    locked = set()
    for spec in _pins((ROOT / "requirements" / "serve.txt").read_text()):
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate(env):
            locked.add(f"{req.name.lower().replace('_', '-').replace('.', '-')}=={next(iter(req.specifier)).version}")
    assert installed == locked, f"not in the lock: {sorted(installed - locked)}; missing: {sorted(locked - installed)}"
    assert not {p.split("==")[0] for p in installed} & TRAINING_STACK
