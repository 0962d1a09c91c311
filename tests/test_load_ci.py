"""The short Locust profile against a real server, as part of the suite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.servers import ROOT

pytestmark = pytest.mark.integration  # real `bentoml serve` processes


def test_ci_load_profile_has_no_failures(server, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.load.run",
            "ci",
            "--host",
            server.url,
            "--out",
            str(tmp_path),
            "--p95-ms",
            "3000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    summary = json.loads((tmp_path / "ci" / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["failures"] == 0 and summary["requests"] > 100
    assert (tmp_path / "ci" / "report.html").stat().st_size > 0
