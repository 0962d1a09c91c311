"""`bentoml build` from this repo: the Bento packs the model and only the serving code."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from harness.servers import ROOT


def _build(trained, *args: str) -> Path:
    env = {**os.environ, "BANKCHURN_MODEL_TAG": str(trained.model.tag), "BENTOML_DO_NOT_TRACK": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # bentoml build calls uv
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", *args, "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tag = proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    path = subprocess.run(
        [sys.executable, "-m", "bentoml", "get", tag, "-o", "path"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(path)


@pytest.fixture(scope="module")
def bento(trained):
    return _build(trained)


@pytest.fixture(scope="module")
def full_bento(trained):
    return _build(trained, "-f", "bentofile.full.yaml")


def test_bento_packs_the_trained_model(bento, trained):
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["name"] == "bank_churn"
    assert [m["tag"] for m in info["services"][0]["models"]] == [str(trained.model.tag)]
    assert info["service"] == "service:BankChurn"
    assert info["labels"]["project"] == "bank-churn"


def test_bento_holds_only_serving_code(bento):
    files = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    # every module the service can import, sub-packages included (an include pattern is easily too narrow)
    serving_code = {"service.py"} | {
        p.relative_to(ROOT).as_posix() for d in ("models", "serving") for p in (ROOT / d).rglob("*.py")
    }
    assert serving_code <= files, sorted(serving_code - files)
    forbidden = (
        "data/",
        "tests/",
        "reports/",
        "training/",
        "deploy/",
        ".venv",
        "__pycache__",
        "benchmarks/",
        "harness/",
    )
    assert not [f for f in files if f.startswith(forbidden) or "__pycache__" in f], files


def _requirements(text: str) -> dict[str, set[str]]:
    """{normalised 'name==version; marker': its --hash values} of a requirements file
    (continuation lines joined, comments and blank lines dropped)."""
    from packaging.requirements import Requirement

    joined = text.replace("\\\n", " ")
    out: dict[str, set[str]] = {}
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split(" --hash=")
        out.setdefault(str(Requirement(spec.strip())), set()).update(o.strip() for o in options)
    return out


def _pins(requirements: str) -> set[str]:
    """Normalised 'name==version; marker' requirements, comments and blank lines dropped."""
    return set(_requirements(requirements))


def test_bento_installs_the_locked_serving_set_only(bento):
    bento_requirements = _requirements((bento / "env" / "python" / "requirements.txt").read_text())
    bento_pins = set(bento_requirements)
    assert bento_pins == _pins((ROOT / "requirements" / "serve.txt").read_text())
    # the hashes travel into the Bento: its image installs only the locked files (uv checks them)
    assert bento_requirements == _requirements((ROOT / "requirements" / "serve.txt").read_text())
    pins = {line.split("==")[0] for line in bento_pins}
    assert {"bentoml", "onnxruntime", "numpy", "pydantic", "saq", "redis", "orjson"} <= pins
    assert not pins & {"scikit-learn", "xgboost", "xgboost-cpu", "lightgbm", "pandas", "joblib", "onnx"}, pins


def test_bento_sets_thread_envs_and_one_worker(bento):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "OMP_NUM_THREADS" in dockerfile
    assert "BANKCHURN_PREDICTION_LOG_DIR=/tmp/" in dockerfile.replace('"', ""), "the file sink on the writable path"
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["services"][0]["config"]["workers"] == 1


@pytest.mark.parametrize(
    ("name", "extra"),
    [("serve.txt", []), ("full.txt", ["--extra", "sklearn"]), ("monitoring.txt", ["--extra", "monitoring"])],
)
def test_exported_requirements_match_the_lock_and_carry_hashes(name, extra):
    """requirements/*.txt are exported from uv.lock (`make lock`); a stale export fails here.
    Every requirement carries the SHA-256 of its files, so an image installs only those."""
    uv = Path(sys.executable).parent / "uv"
    text = (ROOT / "requirements" / name).read_text()
    unhashed = [spec for spec, hashes in _requirements(text).items() if not hashes]
    assert not unhashed, f"requirements/{name} without hashes: {unhashed}"
    assert all(h.startswith("sha256:") and len(h) == 71 for hashes in _requirements(text).values() for h in hashes)
    proc = subprocess.run(
        [str(uv), "export", "--frozen", "--no-dev", "--no-emit-project", "--no-header", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == (ROOT / "requirements" / name).read_text(), f"requirements/{name} is stale: run `make lock`"


def test_dockerfile_installs_no_compiler_and_a_pinned_uv(bento):
    """deploy/image/Dockerfile.template drops BentoML's `apt-get install build-essential git`
    and pins uv to the version the dev venv uses (uv.lock), instead of the newest."""
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "build-essential" not in dockerfile and "apt-get" not in dockerfile
    assert f"uv=={version('uv')}" in dockerfile
    assert "compileall" in (bento / "env" / "docker" / "setup_script").read_text()


def test_full_bento_adds_the_sklearn_stack_without_nccl(full_bento, bento):
    info = yaml.safe_load((full_bento / "bento.yaml").read_text())
    assert info["name"] == "bank_churn_full" and info["service"] == "service:BankChurn"
    requirements = _requirements((full_bento / "env" / "python" / "requirements.txt").read_text())
    assert requirements == _requirements((ROOT / "requirements" / "full.txt").read_text())
    pins = set(requirements)
    names = {p.split("==")[0] for p in pins if "linux" in p or ";" not in p}
    assert {"scikit-learn", "xgboost-cpu", "lightgbm", "pandas", "joblib"} <= names
    assert not {n for n in names if n.startswith("nvidia-nccl")} and "xgboost" not in names
    dockerfile = (full_bento / "env" / "docker" / "Dockerfile").read_text()
    assert "libgomp1" in dockerfile and "build-essential" not in dockerfile
