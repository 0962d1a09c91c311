"""`bentoml build` from this repo: the Bento packs the model and only the serving code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def bento(trained):
    env = {**os.environ, "BANKCHURN_MODEL_TAG": str(trained.model.tag), "BENTOML_DO_NOT_TRACK": "true"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # bentoml build calls uv
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
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


def test_bento_packs_the_trained_model(bento, trained):
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["name"] == "bank_churn"
    assert [m["tag"] for m in info["services"][0]["models"]] == [str(trained.model.tag)]
    assert info["service"] == "service:BankChurn"
    assert info["labels"]["project"] == "bank-churn"


def test_bento_holds_only_serving_code(bento):
    files = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    assert {"service.py", "models/schema.py", "models/predictor.py", "models/compiled.py"} <= files
    forbidden = ("data/", "tests/", "reports/", "training/", "deploy/", ".venv", "__pycache__", "benchmarks/")
    assert not [f for f in files if f.startswith(forbidden) or "__pycache__" in f], files


def test_bento_pins_packages_and_thread_envs(bento):
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    for pin in ("bentoml==1.4.39", "scikit-learn==1.9.1", "xgboost==3.2.0", "lightgbm==4.7.0", "onnxruntime==1.32.0"):
        assert pin in requirements
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "OMP_NUM_THREADS" in dockerfile
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["services"][0]["config"]["workers"] == 1
