"""Shared fixtures: a temporary model store, one real trained model, a real `bentoml serve`.

BENTOML_HOME must point at the temporary store before bentoml is imported anywhere, so the
tests never read or write a user's model store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="bankchurn-test-home-"))
os.environ["BENTOML_HOME"] = str(_HOME)
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_HOME / "prometheus"))
(_HOME / "prometheus").mkdir(exist_ok=True)
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# Servers and in-process services log predictions under the temporary home, not the checkout.
os.environ.setdefault("BANKCHURN_PREDICTION_LOG_DIR", str(_HOME / "prediction_log"))
# Services made in this process serve no gRPC (its default port is fixed); every `bentoml serve`
# a test starts gets a free one (harness.servers.ServeProcess).
os.environ.setdefault("BANKCHURN_GRPC_PORT", "0")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from harness.servers import serving  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


# Fixtures that start something outside the test process (a `bentoml serve`, a redis-server, a
# Bento build, the manifest scanner): a test using one is in the `integration` tier, whatever
# its module. `make test-fast` runs the rest.
INTEGRATION_FIXTURES = frozenset({"server", "redis_server", "bento", "full_bento", "checkov_report", "pinned_server"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def dataset() -> pd.DataFrame:
    from training.data import load_data

    return load_data()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small real model (fast learners, all 10,000 rows), trained through the real CLI
    code path, compiled, parity-checked and saved to the temporary model store."""
    from training.pipeline import TrainConfig, train

    lines: list[str] = []
    cfg = TrainConfig(fast=True, report_dir=tmp_path_factory.mktemp("report"))
    result = train(cfg, log=lines.append)
    result.log = lines
    return result


@pytest.fixture(scope="session")
def server(trained):
    """`bentoml serve service:BankChurn` in a subprocess, ready, on a free port."""
    with serving(env={"BANKCHURN_MODEL_TAG": str(trained.model.tag)}) as proc:
        yield proc


@pytest.fixture(scope="session")
def sample_rows(dataset) -> list[dict]:
    from models.schema import FEATURE_NAMES

    return dataset[list(FEATURE_NAMES)].sample(200, random_state=7).to_dict(orient="records")
