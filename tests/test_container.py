"""The real container image, built and started without Docker (deploy/image/build.sh).

Opt-in (minutes, needs root, buildah, debootstrap, Debian mirror + PyPI access):

    .venv/bin/pytest -m container tests/test_container.py

Hermetic: a small model is trained into the tests' temporary BENTOML_HOME (conftest.py),
a Bento is built from this checkout into that same store, and build.sh containerizes it
(debootstrap base image -> `bentoml containerize --backend buildah`), runs the image's
own entrypoint as uid 1034 and smoke-tests /readyz and POST /predict. A second run repeats
the smoke test the way the Kubernetes manifests start the pod: read-only root filesystem,
a writable /tmp only, BENTOML_HOME=/tmp/bentoml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "deploy" / "image" / "build.sh"
TEST_IMAGE = "localhost/bank-churn-test"  # not the user's localhost/bank_churn tags; removed afterwards
BUILD_TIMEOUT_S = 3600  # cold: debootstrap base (~2-3 min) + PyPI install of the pins


def _require_opt_in(config: pytest.Config) -> None:
    expr = config.getoption("markexpr") or ""
    selected = "container" in expr and "not container" not in expr
    if not selected and os.environ.get("BANK_CHURN_CONTAINER_TESTS") != "1":
        pytest.skip("opt-in: run with `pytest -m container` (or BANK_CHURN_CONTAINER_TESTS=1)")


@pytest.fixture(autouse=True)
def _opt_in(request):
    _require_opt_in(request.config)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(home)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # uv for `bentoml build`
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed with {proc.returncode}:\n{out[-6000:]}"
    return proc


def _field(output: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}:\s*(.+)$", output, re.MULTILINE)
    assert m, f"build.sh printed no '{name}:' line:\n{output[-4000:]}"
    return m.group(1).strip()


def _check_smoke(output: str) -> None:
    assert re.search(r"^RESULT: OK$", output, re.MULTILINE), output[-4000:]
    ready = _field(output, "start-to-ready")
    m = re.match(r"([0-9.]+)s", ready)
    assert m and float(m.group(1)) > 0, ready
    assert _field(output, "predict").startswith("HTTP 200 "), output[-4000:]
    p = float(_field(output, "churn_probability"))
    assert 0.0 <= p <= 1.0
    assert "uid 1034" in _field(output, "start command")
    assert _field(output, "stop").startswith("SIGTERM -> server exited with status 0")


@pytest.fixture(scope="module")
def bento_tag(request, bentoml_home: Path) -> str:
    """A Bento of this checkout, packing the freshly trained model, in the temporary store."""
    _require_opt_in(request.config)  # before the (slow) session fixtures below
    request.getfixturevalue("trained")
    env = _env(bentoml_home)
    _run([str(ROOT / ".venv" / "bin" / "bentoml"), "build", "."], env, timeout=600)
    proc = _run([str(ROOT / ".venv" / "bin" / "bentoml"), "get", "bank_churn:latest", "-o", "json"], env, 60)
    info = json.loads(proc.stdout)
    return f"{info['name']}:{info['version']}"


@pytest.fixture(scope="module")
def built(bento_tag: str, bentoml_home: Path):
    """build.sh end to end: base image, Bento image, smoke test. Yields its stdout.

    The base image stays cached in buildah's storage; the test's Bento image is removed."""
    try:
        proc = _run(
            [str(BUILD_SH), "--bento", bento_tag, "--image", TEST_IMAGE, "--port", str(free_port())],
            _env(bentoml_home),
            timeout=BUILD_TIMEOUT_S,
        )
        yield proc.stdout
    finally:
        buildah = ["buildah", "--storage-driver", "vfs"]
        inspect = [*buildah, "inspect", "--type", "image", "--format", "{{.FromImageID}}", f"{TEST_IMAGE}:latest"]
        image_id = subprocess.run(inspect, capture_output=True, text=True, check=False).stdout.strip()
        if image_id:  # by id: removes the :<version> and :latest tags together
            subprocess.run([*buildah, "rmi", "--force", image_id], capture_output=True, check=False)


def test_image_builds_starts_and_predicts(built: str, bento_tag: str):
    _check_smoke(built)
    assert _field(built, "bento") == bento_tag
    assert _field(built, "image size")
    assert _field(built, "build time")


def test_image_runs_with_read_only_root_and_tmp_only(built: str, bento_tag: str, bentoml_home: Path):
    """The Deployment's setup: readOnlyRootFilesystem, emptyDir /tmp, BENTOML_HOME=/tmp/bentoml."""
    proc = _run(
        [
            str(BUILD_SH),
            "--bento",
            bento_tag,
            "--image",
            TEST_IMAGE,
            "--port",
            str(free_port()),
            "--skip-build",
            "--read-only",
            "--env",
            "BENTOML_HOME=/tmp/bentoml",
            "--env",
            "ORT_DISABLE_TELEMETRY=1",
        ],
        _env(bentoml_home),
        timeout=600,
    )
    _check_smoke(proc.stdout)
    assert _field(proc.stdout, "writes outside /tmp") == "none"
