"""The versioned files that link the slow commands to `python -m training`.

`python -m training.tune` writes the chosen hyperparameters (training/params.json) and
`python -m training.cv` the cross-validated estimate (training/cross_validation.json). Both
are committed, so the default training run stays fast and deterministic: it reads the
parameters, and folds the estimate into the model's metadata only when the estimate was
measured for exactly the parameters, data and split it is training with.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PARAMS_FILE = HERE / "params.json"
CV_FILE = HERE / "cross_validation.json"
FORMAT_VERSION = 1


def params_sha256(resolved: dict[str, dict[str, Any]]) -> str:
    """Fingerprint of fully resolved hyperparameters (models.ensemble.resolve_params)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()


def pipeline_sha256(estimator: Any) -> str:
    """Fingerprint of an unfitted estimator: its class and every parameter, nested estimators
    included (so a change of meta-learner, fold count or any hyperparameter changes it)."""
    return hashlib.sha256(json.dumps(_describe(estimator), sort_keys=True).encode()).hexdigest()


def _describe(value: Any) -> Any:
    if hasattr(value, "get_params") and not isinstance(value, type):
        params = value.get_params(deep=False)
        return {
            "class": f"{type(value).__module__}.{type(value).__qualname__}",
            **{k: _describe(v) for k, v in params.items()},
        }
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)  # e.g. StratifiedKFold(n_splits=5, random_state=42, shuffle=True)


def provenance(command: str) -> dict[str, str]:
    """Where a figure comes from: the command, the commit, the machine and the date."""
    try:
        git = ["git", "-C", str(HERE)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        # Code changes only (not tests): the files these commands write are not what produced them.
        code = ["--", ":(top)*.py", ":(top)pyproject.toml", ":(top)uv.lock", ":(top,exclude)tests"]
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", *code], capture_output=True, text=True, check=True
        )
        revision = commit.stdout.strip() + ("+uncommitted code changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    return {
        "command": command,
        "commit": revision,
        "machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def command_line(module: str, argv: list[str] | None) -> str:
    """The command as typed, for provenance records."""
    return " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def write_json(path: Path, record: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **record}, indent=2, sort_keys=False) + "\n")
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """The record, or None if the file is absent (a file of another format version is an error)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {record.get('format_version')} != {FORMAT_VERSION}")
    return record


def load_params(path: Path = PARAMS_FILE) -> dict[str, dict[str, Any]]:
    """The tuned hyperparameters per learner ({} when no tuning has been committed)."""
    record = read_json(path)
    return {} if record is None else record["params"]
