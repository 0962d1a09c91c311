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


def _pins(requirements: str) -> set[str]:
    """Normalised 'name==version; marker' requirements, comments and blank lines dropped."""
    from packaging.requirements import Requirement

    lines = (line.strip() for line in requirements.splitlines())
    return {str(Requirement(line)) for line in lines if line and not line.startswith("#")}


def test_bento_installs_the_locked_serving_set_only(bento):
    bento_pins = _pins((bento / "env" / "python" / "requirements.txt").read_text())
    assert bento_pins == _pins((ROOT / "requirements" / "serve.txt").read_text())
    pins = {line.split("==")[0] for line in bento_pins}
    assert {"bentoml", "onnxruntime", "numpy", "pydantic", "saq", "redis", "orjson"} <= pins
    assert not pins & {"scikit-learn", "xgboost", "xgboost-cpu", "lightgbm", "pandas", "joblib", "onnx"}, pins


def test_bento_sets_thread_envs_and_one_worker(bento):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "OMP_NUM_THREADS" in dockerfile
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["services"][0]["config"]["workers"] == 1


@pytest.mark.parametrize(("name", "extra"), [("serve.txt", []), ("full.txt", ["--extra", "sklearn"])])
def test_exported_requirements_match_the_lock(name, extra):
    """requirements/*.txt are exported from uv.lock (`make lock`); a stale export fails here."""
    uv = Path(sys.executable).parent / "uv"
    proc = subprocess.run(
        [str(uv), "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "--no-header", *extra],
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
    pins = _pins((full_bento / "env" / "python" / "requirements.txt").read_text())
    assert pins == _pins((ROOT / "requirements" / "full.txt").read_text())
    names = {p.split("==")[0] for p in pins if "linux" in p or ";" not in p}
    assert {"scikit-learn", "xgboost-cpu", "lightgbm", "pandas", "joblib"} <= names
    assert not {n for n in names if n.startswith("nvidia-nccl")} and "xgboost" not in names
    dockerfile = (full_bento / "env" / "docker" / "Dockerfile").read_text()
    assert "libgomp1" in dockerfile and "build-essential" not in dockerfile
