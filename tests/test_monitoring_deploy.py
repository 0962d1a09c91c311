"""deploy/monitoring/: the PrometheusRule's alerts (checked and unit-tested with Debian's
promtool) and the Grafana dashboard (checked against the dashboard model's structure here,
every query parsed by promtool), both reading only metrics the service or the monitoring jobs
really export.

No Grafana server can be installed here (Debian main and PyPI have none), so the dashboard is
validated offline: the fields Grafana needs to import it, a grid without overlaps, a
datasource variable every panel uses, and PromQL that parses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY

from monitoring import push
from serving import telemetry

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "alerts_test.yaml"
DASHBOARD = MONITORING / "bank-churn-dashboard.json"

# What the issue asks the alerts and the dashboard to cover: (topic, alert, dashboard title words)
TOPICS = [
    ("error rate", "BankChurnHighErrorRate", "Errors"),
    ("p99 latency", "BankChurnHighLatencyP99", "Latency percentiles"),
    ("overload 503s", "BankChurnOverloaded", "Overload"),
    ("job failures", "BankChurnJobFailures", "Jobs by event"),
    ("drift", "BankChurnFeatureDrift", "Drift score per feature"),
    ("performance below estimate", "BankChurnPerformanceBelowEstimate", "Realized performance"),
]
DASHBOARD_TOPICS = ["Request rate", "Latency", "Errors", "Queue depth", "Batch sizes", "Jobs", "Drift"]
# BentoML's own request metrics (its APIs: /predict_batch, /explain, /model_card); checked
# against a live server in test_bentoml_metric_names_are_what_a_server_exports.
BENTOML_SAMPLES = {
    "bentoml_service_request_total",
    "bentoml_service_request_duration_seconds_bucket",
    "bentoml_service_request_duration_seconds_sum",
    "bentoml_service_request_duration_seconds_count",
}
# Grafana's interval variables, as promtool cannot parse them
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "gauge", "table", "text"}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: apt-get install prometheus (make system-packages)", pytrace=False)
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def rule_groups() -> list[dict]:
    rule = yaml.safe_load(RULES.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    return rule["spec"]["groups"]


def alerts() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


# ---------------------------------------------------------------- alerts


def test_rules_pass_promtool_check(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in proc.stdout


def test_alert_unit_tests_pass_promtool(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yaml")
    proc = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("alert", [a["alert"] for a in alerts()])
def test_each_alert_is_tested_firing_and_quiet_and_says_what_to_do(alert):
    rule = next(a for a in alerts() if a["alert"] == alert)
    assert rule["labels"]["severity"] in ("page", "warning")
    assert rule["annotations"]["summary"] and len(rule["annotations"]["description"].split()) >= 10
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    mine = [c for c in cases if c["alertname"] == alert]
    assert any(c.get("exp_alerts") for c in mine), f"no test where {alert} fires"
    assert any(not c.get("exp_alerts") for c in mine), f"no test where {alert} stays quiet"


@pytest.mark.parametrize(("topic", "alert", "panel"), TOPICS, ids=[t[0] for t in TOPICS])
def test_the_issue_topics_have_an_alert_and_a_panel(topic, alert, panel):
    assert alert in {a["alert"] for a in alerts()}
    assert any(p["title"].startswith(panel) for p in dashboard()["panels"]), panel


# ---------------------------------------------------------------- the dashboard


def test_dashboard_has_what_grafana_needs_to_import_it():
    d = dashboard()
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list), ("templating", dict)):
        assert isinstance(d.get(key), kind), key
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"])
    assert d["schemaVersion"] >= 36, "the datasource-variable panel references need schema 36+"
    assert set(d["time"]) == {"from", "to"}
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_dashboard_panels_are_well_formed_on_a_grid_without_overlaps():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["type"]
        assert p["title"]
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y"))
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        assert all(t["datasource"] == p["datasource"] and t["expr"].strip() for t in p["targets"])


@pytest.mark.parametrize("topic", DASHBOARD_TOPICS)
def test_dashboard_covers(topic):
    assert any(topic.lower() in p["title"].lower() for p in dashboard()["panels"] if p["type"] != "row")


def test_every_dashboard_query_parses(tmp_path):
    rules = []
    for i, (_, expr) in enumerate(queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", "queries.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- metric names


def exported_samples() -> set[str]:
    """Every sample name the service and the monitoring jobs can export."""
    names = set(BENTOML_SAMPLES)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in REGISTRY.collect():
        if family.name.startswith(telemetry.PREFIX):
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}

    class Pool:
        name, threads, busy, queued = "inference", 1, 0, 0

    class Batcher:
        pending = 0

    class Log:
        enabled, queued_rows, sink_up = True, 0, 1

    telemetry.watch(Batcher(), Pool(), log=Log())
    telemetry.set_model_info("bank_churn:x", "onnxruntime")
    text = telemetry.live_metrics() + telemetry.job_metrics("redis", 0, 0, 0)
    names |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    feature = {"type": "numerical", "method": "m", "score": 0.0, "threshold": 0.1, "drifted": False}
    drift = {
        "model_version": "v",
        "features": {"Age": feature},
        "prediction": feature,
        "prediction_drift": False,
        "share_drifted": 0.0,
        "drift": False,
        "rows_current": 1,
        "rows_reference": 1,
    }
    metric = {"realized": 0.8, "estimate": {"mean": 0.8, "std": 0.01}, "below_estimate": False}
    performance = {"model_version": "v", "metrics": {"roc_auc": metric}, "rows_matched": 1}
    for registry in (push.drift_registry(drift, True), push.performance_registry(performance, True)):
        names |= {s.name for family in registry.collect() for s in family.samples}
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:bank_churn|bentoml)_[a-z_]+)\b", expr))


@pytest.mark.parametrize(
    ("where", "expr"),
    [(f"alert {a['alert']}", a["expr"]) for a in alerts()] + [(f"panel {t}", e) for t, e in queries()],
)
def test_queries_read_only_metrics_that_exist(where, expr):
    missing = referenced(expr) - exported_samples()
    assert not missing, f"{where} reads {sorted(missing)}, which nothing exports"


@pytest.mark.integration
def test_bentoml_metric_names_are_what_a_server_exports(server):
    httpx.post(f"{server.url}/model_card", json={}, timeout=30)  # one BentoML API call
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert samples >= BENTOML_SAMPLES
    ours = {s for s in samples if s.startswith(telemetry.PREFIX)}
    assert ours <= exported_samples(), ours - exported_samples()


# ---------------------------------------------------------------- the kustomization


def test_the_kustomization_ships_the_rule_and_the_dashboard():
    proc = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}
    assert set(docs) == {"PrometheusRule", "ConfigMap"}
    assert docs["PrometheusRule"]["spec"]["groups"] == rule_groups()
    config_map = docs["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"][DASHBOARD.name]) == dashboard()
    assert all(d["metadata"]["namespace"] == "bank-churn" for d in docs.values())


# ---------------------------------------------------------------- the drift CronJob and its image


def render(path: Path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


TARGETS = {"base": REPO / "deploy" / "base", "gke": REPO / "deploy/overlays/gke", "eks": REPO / "deploy/overlays/eks"}


@pytest.mark.parametrize("target", TARGETS)
def test_the_drift_cronjob_runs_the_monitoring_image_on_the_services_own_settings(target):
    docs = render(TARGETS[target])
    cron = one(docs, "CronJob", "bank-churn-drift")["spec"]
    job = cron["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    (api,) = one(docs, "Deployment", "bank-churn")["spec"]["template"]["spec"]["containers"]
    (repo, version), (api_repo, api_version) = _repo_and_tag(container["image"]), _repo_and_tag(api["image"])
    assert repo == api_repo + "-monitoring"
    assert version == api_version, "the API's version"
    assert container["command"] == ["python", "-m", "monitoring.drift"]
    args = container["args"]
    assert args[args.index("--since") + 1] == "24h" and args[args.index("--out") + 1].startswith("/reports/")
    assert container["workingDir"] == "/home/bentoml/bento/src", "the Bento's source directory in its image"
    assert container["envFrom"] == api["envFrom"], "the sink settings the API writes with"
    settings = one(docs, "ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    assert settings["BANKCHURN_PREDICTION_LOG_SINK"] == "redis", "every replica's rows in one place"
    assert cron["concurrencyPolicy"] == "Forbid" and pod["restartPolicy"] == "Never"
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule == {"action": "FailJob", "onExitCodes": {"containerName": "drift", "operator": "In", "values": [1]}}
    assert job["backoffLimit"] >= 1, "other failures are retried"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    claim = volumes[mounts["/reports"]]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim", claim)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    # the Redis URL (a password) as the API reads it: a file of the same Secret, same path
    api_pod = one(docs, "Deployment", "bank-churn")["spec"]["template"]["spec"]
    api_secrets = {v["name"]: v for v in api_pod["volumes"]}[
        {m["mountPath"]: m["name"] for m in api["volumeMounts"]}["/run/secrets/bank-churn"]
    ]
    redis_url = [s for s in api_secrets["projected"]["sources"] if s["secret"]["name"] == "bank-churn-redis"]
    sources = volumes[mounts["/run/secrets/bank-churn"]]["projected"]["sources"]
    assert redis_url and all(s in sources for s in redis_url)


def _repo_and_tag(image: str) -> tuple[str, str]:
    """'registry/name:tag@sha256:...' -> ('registry/name', 'tag')."""
    repo, tag = image.split("@", 1)[0].rsplit(":", 1)
    return repo, tag


def test_the_drift_job_reaches_redis_dns_and_the_pushgateway_only():
    docs = render(TARGETS["base"])
    policy = one(docs, "NetworkPolicy", "bank-churn-monitoring")["spec"]
    assert policy["ingress"] == [] and sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {("TCP", 6379), ("TCP", 9091), ("UDP", 53), ("TCP", 53)}
    redis_in = one(docs, "NetworkPolicy", "bank-churn-redis")["spec"]["ingress"][0]["from"]
    assert {"app.kubernetes.io/name": "bank-churn-monitoring"} in [
        peer["podSelector"]["matchLabels"] for peer in redis_in
    ]


def test_with_a_managed_redis_the_drift_job_gets_its_url_secret_and_ca(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(TARGETS["gke"], tmp_path)],
                "components": [os.path.relpath(REPO / "deploy/components/external-redis", tmp_path)],
            }
        )
    )
    docs = render(tmp_path)
    pod = one(docs, "CronJob", "bank-churn-drift")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/run/secrets/bank-churn"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secrets = {s["secret"]["name"]: s["secret"] for s in volume["projected"]["sources"]}
    assert secrets["bank-churn-redis"]["items"] == [{"key": "BANKCHURN_REDIS_URL", "path": "BANKCHURN_REDIS_URL"}]
    assert secrets["bank-churn-redis-ca"]["optional"] is True, "Memorystore's CA, as the API pods get it"
    egress = one(docs, "NetworkPolicy", "bank-churn-monitoring")["spec"]["egress"]
    assert any("ipBlock" in peer for rule in egress for peer in rule.get("to", []))


@pytest.fixture(scope="module")
def monitoring_bento(trained):
    from tests.test_build import _build

    return _build(trained, "-f", "bentofile.monitoring.yaml")


@pytest.mark.integration
def test_the_monitoring_bento_carries_the_jobs_evidently_and_the_model(monitoring_bento, trained):
    from tests.test_build import _pins

    info = yaml.safe_load((monitoring_bento / "bento.yaml").read_text())
    assert info["name"] == "bank_churn_monitoring"
    assert [m["tag"] for m in info["services"][0]["models"]] == [str(trained.model.tag)], "the reference's model"
    files = {p.relative_to(monitoring_bento / "src").as_posix() for p in (monitoring_bento / "src").rglob("*.py")}
    assert {"monitoring/drift.py", "monitoring/performance.py", "serving/predictionlog/sinks.py"} <= files
    assert not [f for f in files if f.startswith(("tests/", "training/", "benchmarks/", "harness/"))]
    pins = _pins((monitoring_bento / "env" / "python" / "requirements.txt").read_text())
    assert pins == _pins((REPO / "requirements" / "monitoring.txt").read_text())
    serve = _pins((REPO / "requirements" / "serve.txt").read_text())
    names = {p.split("==")[0] for p in pins}
    assert "evidently" in names and not {p.split("==")[0] for p in serve} & {"evidently", "pyarrow", "plotly"}


@pytest.mark.integration
def test_the_cronjob_command_runs_from_the_bentos_source_with_its_packed_models(monitoring_bento, trained, tmp_path):
    """As the CronJob runs it: from the Bento's src directory, BENTO_PATH set, the model found
    among the models packed with the Bento (an exported Bento holds them as an image does; the
    BentoML home beside it is empty)."""
    import tarfile

    archive = tmp_path / "monitoring.bento"
    tag = yaml.safe_load((monitoring_bento / "bento.yaml").read_text())
    subprocess.run(
        [sys.executable, "-m", "bentoml", "export", f"{tag['name']}:{tag['version']}", str(archive)],
        check=True,
        capture_output=True,
    )
    unpacked = tmp_path / "bento"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "models").is_dir()
    env = {
        **os.environ,
        "BENTO_PATH": str(unpacked),
        "BENTOML_HOME": str(tmp_path / "empty-home"),
        "BANKCHURN_PREDICTION_LOG_DIR": str(tmp_path / "log"),
    }
    code = (
        "from monitoring.reference import model_entry, reference_frame; "
        f"print(len(reference_frame(model_entry('{trained.model.tag}'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=unpacked / "src", env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) == len(trained.splits.train)
    help_ = subprocess.run(
        [sys.executable, "-m", "monitoring.drift", "--help"], cwd=unpacked / "src", env=env, capture_output=True, text=True
    )  # fmt: skip
    assert help_.returncode == 0 and "--since" in help_.stdout
