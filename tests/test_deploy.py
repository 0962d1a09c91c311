"""Offline checks of the Kubernetes manifests in deploy/ (kustomize base + gke/eks overlays).

Each target is rendered with `kubectl kustomize`, every object is validated against the
Kubernetes JSON schemas of K8S_VERSION (kubernetes-validate ships them, no network), the
serving invariants are asserted on the rendered objects, and checkov scans the rendered
manifests (it must report zero failed checks; skips need a reason in the manifests).

    .venv/bin/pytest -q tests/test_deploy.py

Needs kubectl (built-in kustomize; override with $KUBECTL) and checkov in its own venv at
.venv-checkov/bin/checkov (override with $CHECKOV), created by:

    python3 -m venv .venv-checkov && .venv-checkov/bin/pip install uv && \
    .venv-checkov/bin/uv pip install --python .venv-checkov/bin/python checkov==3.3.30
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TARGETS = {
    "base": DEPLOY / "base",
    "gke": DEPLOY / "overlays" / "gke",
    "eks": DEPLOY / "overlays" / "eks",
}
OVERLAYS = ("gke", "eks")
# Optional components, rendered on top of the GKE overlay (tests only; users add them to
# their overlay's `components:`).
COMPONENTS = {
    "keda": DEPLOY / "components" / "keda",
    "external-redis": DEPLOY / "components" / "external-redis",
}

# Oldest minor that GKE and EKS both still support in standard support when written;
# kubernetes-validate 1.37.0 ships schemas for 1.25 .. 1.37.
K8S_VERSION = "1.33"

APP = "bank-churn"
JOBS = "bank-churn-jobs"
REDIS = "bank-churn-redis"
MONITORING = "bank-churn-monitoring"
PARTS = (APP, JOBS, REDIS, MONITORING)  # app.kubernetes.io/name of the API, the job workers, Redis, the drift job
NAMESPACE = "bank-churn"
REDIS_PORT = 6379
SERVICE_NAME = "BankChurn"  # the BentoML service class: key of its config section
CONTAINER_PORT = 3000  # BentoML's port in the image
GRPC_PORT = 3001  # the service's gRPC port (BANKCHURN_GRPC_PORT)
BENTO_UID = 1034  # the `bentoml` user of images built by `bentoml containerize`
CPU_LIMIT_MILLI = 1000
HPA_CPU_TARGET = 50
HPA_SCALE_UP_WINDOW_S = 30
STARTUP_BUDGET_S = 120  # model load + warm-up may take up to ~2 min

BASE_OBJECTS = Counter(
    {
        ("Namespace", APP): 1,
        ("ServiceAccount", APP): 1,
        ("ServiceAccount", REDIS): 1,
        ("ConfigMap", "bank-churn-settings"): 1,
        ("Deployment", APP): 1,
        ("Deployment", JOBS): 1,
        ("StatefulSet", REDIS): 1,
        ("Service", APP): 1,
        ("Service", REDIS): 1,
        ("HorizontalPodAutoscaler", APP): 1,
        ("HorizontalPodAutoscaler", JOBS): 1,
        ("PodDisruptionBudget", APP): 1,
        ("PodDisruptionBudget", JOBS): 1,
        ("NetworkPolicy", APP): 1,
        ("NetworkPolicy", JOBS): 1,
        ("NetworkPolicy", REDIS): 1,
        ("ServiceAccount", MONITORING): 1,
        ("CronJob", "bank-churn-drift"): 1,
        ("PersistentVolumeClaim", "bank-churn-monitoring-reports"): 1,
        ("NetworkPolicy", MONITORING): 1,
    }
)
EXPECTED_OBJECTS = {
    "base": BASE_OBJECTS,
    "gke": BASE_OBJECTS
    + Counter(
        {
            ("Ingress", APP): 1,
            ("ManagedCertificate", APP): 1,
            ("FrontendConfig", APP): 1,
            ("BackendConfig", APP): 1,
            ("PodMonitoring", APP): 1,
            ("PodMonitoring", JOBS): 1,
            ("Service", f"{APP}-grpc"): 1,
        }
    ),
    "eks": BASE_OBJECTS,
}
# Custom resources have no schema in kubernetes-validate; their fields are pinned in
# OVERLAY_FACTS instead. Any other object without a schema is an error.
CUSTOM_RESOURCES = {
    ("cloud.google.com/v1", "BackendConfig"),
    ("monitoring.googleapis.com/v1", "PodMonitoring"),
    ("networking.gke.io/v1", "ManagedCertificate"),
    ("networking.gke.io/v1beta1", "FrontendConfig"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
CLUSTER_SCOPED_KINDS = {"Namespace"}

# Markers of one cloud that must not leak into the base or the other overlay.
CLOUD_MARKERS = {
    "gke": ("cloud.google.com", "googleapis.com", "docker.pkg.dev", "gke.io"),
    "eks": ("amazonaws.com", "aws-load-balancer", "elbv2.k8s.aws"),
}

# (probe, path): BentoML's real health endpoints.
PROBES = [
    ("startupProbe", "/readyz"),
    ("readinessProbe", "/readyz"),
    ("livenessProbe", "/livez"),
]

# (env var, value) set directly on the container.
CONTAINER_ENV = [
    # One worker: `bentoml serve` reads BENTOML_API_WORKERS for legacy services; for
    # BentoML >= 1.2 services only the config override below takes effect.
    ("BENTOML_API_WORKERS", "1"),
    ("BENTOML_CONFIG_OPTIONS", f"services.{SERVICE_NAME}.workers=1"),
    ("TMPDIR", "/tmp"),
    ("BENTOML_HOME", "/tmp/bentoml"),  # must be writable: the root filesystem is not
]

# (setting, value) in the settings ConfigMap.
SETTINGS = [
    ("BANKCHURN_INFERENCE_THREADS", "1"),
    ("BANKCHURN_MAX_BATCH_ROWS", "10000"),
    ("BANKCHURN_MAX_QUEUE", "256"),
    ("BANKCHURN_REQUEST_TIMEOUT_S", "10"),
    ("BANKCHURN_OTEL_EXPORTER", "none"),
    ("OMP_NUM_THREADS", "1"),
]

PINNED = r"(:[\w][\w.-]{0,127})?@sha256:[0-9a-f]{64}$"  # a digest (after the tag, which is informational)
IMAGE_PATTERNS = {
    "base": r"^bank-churn" + PINNED,
    "gke": r"^[A-Za-z0-9-]+-docker\.pkg\.dev/[^/]+/[^/]+/bank-churn" + PINNED,
    "eks": r"^[A-Za-z0-9]+\.dkr\.ecr\.[A-Za-z0-9-]+\.amazonaws\.com/bank-churn" + PINNED,
}

# (target, kind, path, expected): what each overlay carries for its cloud.
NLB = "service.beta.kubernetes.io/aws-load-balancer-"
OVERLAY_FACTS = [
    ("gke", "Service", ("metadata", "annotations", "cloud.google.com/neg"), '{"ingress": true}'),
    ("gke", "Service", ("metadata", "annotations", "cloud.google.com/backend-config"), '{"default": "bank-churn"}'),
    ("gke", "Service", ("spec", "type"), "ClusterIP"),
    ("gke", "Ingress", ("metadata", "annotations", "kubernetes.io/ingress.class"), "gce"),
    ("gke", "Ingress", ("metadata", "annotations", "networking.gke.io/managed-certificates"), APP),
    ("gke", "Ingress", ("metadata", "annotations", "networking.gke.io/v1beta1.FrontendConfig"), APP),
    ("gke", "Ingress", ("metadata", "annotations", "kubernetes.io/ingress.global-static-ip-name"), "bank-churn-ip"),
    ("gke", "FrontendConfig", ("spec", "redirectToHttps", "enabled"), True),
    ("gke", "FrontendConfig", ("spec", "redirectToHttps", "responseCodeName"), "MOVED_PERMANENTLY_DEFAULT"),
    ("gke", "Ingress", ("spec", "defaultBackend", "service", "name"), APP),
    ("gke", "BackendConfig", ("spec", "healthCheck", "type"), "HTTP"),
    ("gke", "BackendConfig", ("spec", "securityPolicy", "name"), "bank-churn-edge"),
    ("gke", "BackendConfig", ("spec", "healthCheck", "requestPath"), "/readyz"),
    ("gke", "BackendConfig", ("spec", "healthCheck", "port"), CONTAINER_PORT),
    ("gke", "PodMonitoring", ("spec", "selector", "matchLabels", "app.kubernetes.io/name"), APP),
    ("gke", "PodMonitoring", ("spec", "endpoints", 0, "path"), "/metrics"),
    ("gke", "Deployment", ("spec", "template", "spec", "nodeSelector", "cloud.google.com/gke-nodepool"), APP),
    ("eks", "Service", ("spec", "type"), "LoadBalancer"),
    ("eks", "Service", ("spec", "allocateLoadBalancerNodePorts"), False),
    ("eks", "Service", ("metadata", "annotations", NLB + "type"), "external"),
    ("eks", "Service", ("metadata", "annotations", NLB + "nlb-target-type"), "ip"),
    ("eks", "Service", ("metadata", "annotations", NLB + "healthcheck-path"), "/readyz"),
    ("eks", "Service", ("metadata", "annotations", NLB + "ssl-ports"), "443,3001"),
    ("eks", "Service", ("metadata", "annotations", NLB + "alpn-policy"), "HTTP2Optional"),
    (
        "eks",
        "Service",
        ("metadata", "annotations", NLB + "ssl-negotiation-policy"),
        "ELBSecurityPolicy-TLS13-1-2-2021-06",
    ),
    ("eks", "Namespace", ("metadata", "labels", "elbv2.k8s.aws/pod-readiness-gate-inject"), "enabled"),
    ("eks", "Deployment", ("spec", "template", "spec", "nodeSelector", "eks.amazonaws.com/nodegroup"), APP),
]

SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d+$")
SKIP_VALUE = re.compile(r"^(CKV2?_K8S_\d+)=(.+)$", re.S)


# ---------------------------------------------------------------- rendering helpers


def _tool(env_var: str, default: str | None, what: str, hint: str = "") -> str:
    path = os.environ.get(env_var) or default
    if not path or not (Path(path).is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{what} not found at {path!r} (set ${env_var} to override). {hint}", pytrace=False)
    return str(path)


def _kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = _tool("KUBECTL", shutil.which("kubectl"), "kubectl", "It ships kustomize; apt-get install kubectl.")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every target rendered once with `kubectl kustomize`, as a list of objects."""
    return {target: _kustomize(path) for target, path in TARGETS.items()}


@pytest.fixture(scope="module")
def rendered_components(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """Each optional component on top of the GKE overlay, as a user's overlay would add it."""
    out = {}
    for name, path in COMPONENTS.items():
        root = tmp_path_factory.mktemp(f"with-{name}")
        (root / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(TARGETS["gke"], root)],
                    "components": [os.path.relpath(path, root)],
                }
            )
        )
        out[name] = _kustomize(root)
    return out


@pytest.fixture(scope="module")
def scanned(rendered, rendered_components) -> dict[str, list[dict[str, Any]]]:
    """What checkov scans: every target, and the GKE overlay with each component."""
    return {**rendered, **{f"gke-with-{name}": docs for name, docs in rendered_components.items()}}


@pytest.fixture(scope="module")
def checkov_report(scanned, tmp_path_factory) -> dict[str, Any]:
    """One checkov run over all rendered targets (files <target>.yaml), parsed from JSON."""
    checkov = _tool(
        "CHECKOV",
        str(REPO / ".venv-checkov" / "bin" / "checkov"),
        "checkov",
        "Install it in its own venv (it conflicts with bentoml's pins): python3 -m venv .venv-checkov && "
        ".venv-checkov/bin/pip install uv && "
        ".venv-checkov/bin/uv pip install --python .venv-checkov/bin/python checkov==3.3.30",
    )
    scan_dir = tmp_path_factory.mktemp("checkov")
    for target, docs in scanned.items():
        (scan_dir / f"{target}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}  # offline: no PyPI lookup
    proc = subprocess.run(
        [checkov, "-d", ".", "--framework", "kubernetes", "--quiet", "--compact", "-o", "json", "--skip-download"],
        cwd=scan_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    (report,) = [r for r in reports if r.get("check_type") == "kubernetes"]
    return report


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _one(docs: list[dict], kind: str, name: str = APP) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]


def _container(docs: list[dict]) -> dict:
    containers = _pod_spec(docs)["containers"]
    assert len(containers) == 1, "one container per pod (one server process)"
    return containers[0]


def _pod_labels(docs: list[dict]) -> dict:
    return _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def _selects_pods(match_labels: dict, docs: list[dict]) -> bool:
    labels = _pod_labels(docs)
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def _container_port(container: dict, port: int | str) -> int:
    """A probe/Service port (number or name) resolved to the container's port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"named port {port!r} is not declared on the container"
    return numbers[0]


def _millicores(quantity: str | int | float) -> int:
    text = str(quantity)
    return int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)


def _settings(docs: list[dict]) -> dict[str, str]:
    """The data of the ConfigMap the container loads with envFrom (name has a hash)."""
    refs = [e["configMapRef"]["name"] for e in _container(docs).get("envFrom", []) if "configMapRef" in e]
    assert len(refs) == 1, "the container loads one settings ConfigMap with envFrom"
    return _one(docs, "ConfigMap", refs[0])["data"]


def _prestop_sleep_s(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert Path(command[0]).name == "sleep" and len(command) == 2, f"preStop must exec `sleep N`, got {command}"
    return int(command[1])


# ---------------------------------------------------------------- build and schema


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders_expected_objects(rendered, target):
    def name(doc: dict) -> str:  # generated ConfigMaps end in a content hash
        return (
            re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"])
            if doc["kind"] == "ConfigMap"
            else doc["metadata"]["name"]
        )

    objects = Counter((d["kind"], name(d)) for d in rendered[target])
    assert objects == EXPECTED_OBJECTS[target]


def test_schema_version_is_shipped():
    shipped = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert kubernetes_validate.utils.major_minor(K8S_VERSION) in shipped


@pytest.mark.parametrize("target", [*TARGETS, *(f"gke-with-{c}" for c in COMPONENTS)])
def test_objects_validate_against_kubernetes_schema(scanned, target):
    """Strict: unknown fields (typos) fail too."""
    for doc in scanned[target]:
        kind = (doc["apiVersion"], doc["kind"])
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert kind in CUSTOM_RESOURCES, f"no Kubernetes {K8S_VERSION} schema for {kind}"
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} is invalid for {K8S_VERSION}: {exc}")


@pytest.mark.parametrize("target", TARGETS)
def test_objects_live_in_the_namespace_with_common_labels(rendered, target):
    for doc in rendered[target]:
        meta = doc["metadata"]
        where = f"{doc['kind']}/{meta['name']}"
        if doc["kind"] not in CLUSTER_SCOPED_KINDS:
            assert meta.get("namespace") == NAMESPACE, f"{where} is not in namespace {NAMESPACE}"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == APP, f"{where} lacks the common labels"
        assert labels.get("app.kubernetes.io/name") in PARTS, f"{where} does not say which part it is"


@pytest.mark.parametrize("target", TARGETS)
def test_cloud_specific_settings_stay_in_their_overlay(rendered, target):
    text = yaml.safe_dump_all(rendered[target])
    for cloud, markers in CLOUD_MARKERS.items():
        if cloud != target:
            leaked = [m for m in markers if m in text]
            assert not leaked, f"{target} contains {cloud}-specific settings: {leaked}"


# ---------------------------------------------------------------- serving invariants


@pytest.mark.parametrize("target", TARGETS)
def test_hpa_scales_the_deployment_on_cpu(rendered, target):
    docs = rendered[target]
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP}
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": HPA_CPU_TARGET}},
        }
    ]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == HPA_SCALE_UP_WINDOW_S
    assert behavior["scaleUp"]["policies"], "scale-up needs explicit policies"
    assert behavior["scaleDown"]["policies"], "scale-down needs explicit policies"
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= HPA_SCALE_UP_WINDOW_S
    # The HPA owns the replica count; a fixed one would be re-applied on every apply.
    assert "replicas" not in _one(docs, "Deployment")["spec"]


@pytest.mark.parametrize("probe, path", PROBES)
@pytest.mark.parametrize("target", TARGETS)
def test_probes_hit_bentoml_health_endpoints_on_3000(rendered, target, probe, path):
    container = _container(rendered[target])
    http_get = container[probe]["httpGet"]
    assert http_get["path"] == path
    assert _container_port(container, http_get["port"]) == CONTAINER_PORT


@pytest.mark.parametrize("target", TARGETS)
def test_startup_probe_allows_model_load(rendered, target):
    startup = _container(rendered[target])["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S


@pytest.mark.parametrize("name, value", CONTAINER_ENV)
@pytest.mark.parametrize("target", TARGETS)
def test_container_env(rendered, target, name, value):
    env = {e["name"]: e.get("value") for e in _container(rendered[target]).get("env", [])}
    assert env.get(name) == value


@pytest.mark.parametrize("target", TARGETS)
def test_image_entrypoint_is_not_overridden(rendered, target):
    container = _container(rendered[target])
    assert "command" not in container and "args" not in container, "the image's entrypoint runs bentoml serve"


@pytest.mark.parametrize("name, value", SETTINGS)
@pytest.mark.parametrize("target", TARGETS)
def test_service_settings_in_configmap(rendered, target, name, value):
    assert _settings(rendered[target]).get(name) == value


@pytest.mark.parametrize("target", TARGETS)
def test_model_tag_is_not_pinned_by_default(rendered, target):
    assert "BANKCHURN_MODEL_TAG" not in _settings(rendered[target]), "default: serve the model packed in the image"


@pytest.mark.parametrize("target", TARGETS)
def test_resources_with_one_cpu_limit(rendered, target):
    resources = _container(rendered[target])["resources"]
    assert _millicores(resources["limits"]["cpu"]) == CPU_LIMIT_MILLI
    assert 0 < _millicores(resources["requests"]["cpu"]) <= CPU_LIMIT_MILLI
    assert resources["requests"]["memory"] and resources["limits"]["memory"]


@pytest.mark.parametrize("target", TARGETS)
def test_pod_runs_non_root_read_only_without_privileges(rendered, target):
    pod = _pod_spec(rendered[target])
    container = _container(rendered[target])
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == BENTO_UID
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc.get("seccompProfile", pod_sc.get("seccompProfile")) == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == APP
    assert _one(rendered[target], "ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("target", TARGETS)
def test_tmp_is_a_writable_emptydir(rendered, target):
    pod = _pod_spec(rendered[target])
    mounts = {m["mountPath"]: m for m in _container(rendered[target])["volumeMounts"]}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly", False)
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"]["name"])
    assert "emptyDir" in volume


@pytest.mark.parametrize("target", TARGETS)
def test_grace_period_outlasts_prestop_and_a_request(rendered, target):
    docs = rendered[target]
    timeout_s = int(_settings(docs)["BANKCHURN_REQUEST_TIMEOUT_S"])
    sleep_s = _prestop_sleep_s(_container(docs))
    assert sleep_s > 0
    assert _pod_spec(docs)["terminationGracePeriodSeconds"] > timeout_s + sleep_s


@pytest.mark.parametrize("target", TARGETS)
def test_service_targets_the_pods_on_3000(rendered, target):
    docs = rendered[target]
    service = _one(docs, "Service")
    assert _selects_pods(service["spec"]["selector"], docs)
    ports = {port["name"]: _container_port(_container(docs), port["targetPort"]) for port in service["spec"]["ports"]}
    web = "https" if target == "eks" else "http"  # the EKS NLB's listener is TLS
    assert ports == {web: CONTAINER_PORT, "grpc": GRPC_PORT}


@pytest.mark.parametrize("target", TARGETS)
def test_grpc_is_served_reachable_and_balanced_at_layer_4(rendered, target):
    docs = rendered[target]
    container = _container(docs)
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert _container_port(container, "grpc") == GRPC_PORT and env["BANKCHURN_GRPC_PORT"] == str(GRPC_PORT)
    jobs_env = {
        e["name"]: e.get("value")
        for e in _one(docs, "Deployment", JOBS)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert jobs_env["BANKCHURN_GRPC_PORT"] == "0"  # job workers take no online calls
    allowed = {p["port"] for rule in _one(docs, "NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert GRPC_PORT in allowed
    grpc_ports = [p for p in _one(docs, "Service")["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_ports[0]["appProtocol"] == "kubernetes.io/h2c"
    if target == "gke":  # the Ingress cannot carry clear-text HTTP/2: a layer-4 internal LB beside it
        service = _one(docs, "Service", f"{APP}-grpc")
        assert service["spec"]["type"] == "LoadBalancer" and _selects_pods(service["spec"]["selector"], docs)
        assert service["metadata"]["annotations"]["networking.gke.io/load-balancer-type"] == "Internal"
        assert [_container_port(container, p["targetPort"]) for p in service["spec"]["ports"]] == [GRPC_PORT]
    if target == "eks":  # the NLB passes 3001 through; its HTTP health check stays on /readyz at 3000
        annotations = _one(docs, "Service")["metadata"]["annotations"]
        assert annotations["service.beta.kubernetes.io/aws-load-balancer-healthcheck-port"] == str(CONTAINER_PORT)


@pytest.mark.parametrize("target", TARGETS)
def test_pdb_selects_the_pods_and_leaves_one_running(rendered, target):
    docs = rendered[target]
    pdb = _one(docs, "PodDisruptionBudget")
    assert _selects_pods(pdb["spec"]["selector"]["matchLabels"], docs)
    min_replicas = _one(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] < min_replicas
    else:
        assert 0 < pdb["spec"]["minAvailable"] < min_replicas


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_allows_http_and_grpc_in_and_dns_out_only(rendered, target):
    docs = rendered[target]
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert _selects_pods(policy["podSelector"]["matchLabels"], docs)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress_ports == {CONTAINER_PORT, GRPC_PORT}
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", REDIS_PORT)}
    (to_redis,) = [rule for rule in policy["egress"] if rule["ports"] == [{"protocol": "TCP", "port": REDIS_PORT}]]
    assert to_redis["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": REDIS}}}]


@pytest.mark.parametrize("target", TARGETS)
def test_pods_spread_and_are_scraped(rendered, target):
    docs = rendered[target]
    pod = _pod_spec(docs)
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    if target in OVERLAYS:
        assert "topology.kubernetes.io/zone" in keys, "overlays spread over zones"
    for constraint in pod["topologySpreadConstraints"]:
        assert _selects_pods(constraint["labelSelector"]["matchLabels"], docs)
    annotations = _one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == CONTAINER_PORT
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("target", TARGETS)
def test_image_points_at_the_target_registry(rendered, target):
    image = _container(rendered[target])["image"]
    assert re.match(IMAGE_PATTERNS[target], image), image
    assert not image.endswith(":latest")


@pytest.mark.parametrize(
    "target, kind, path, expected", OVERLAY_FACTS, ids=[f"{t}-{k}-{p[-1]}" for t, k, p, _ in OVERLAY_FACTS]
)
def test_overlay_carries_its_cloud_settings(rendered, target, kind, path, expected):
    assert _get(_one(rendered[target], kind), path) == expected


def test_gke_ingress_backend_is_a_service_port(rendered):
    docs = rendered["gke"]
    backend = _one(docs, "Ingress")["spec"]["defaultBackend"]["service"]
    service = _one(docs, "Service", backend["name"])
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert backend["port"]["name"] in ports


# ---------------------------------------------------------------- scoring jobs: workers and Redis


def _pod_spec_of(docs: list[dict], kind: str, name: str) -> dict:
    return _one(docs, kind, name)["spec"]["template"]["spec"]


def _env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_job_workers_run_the_api_image_with_workers_on_and_the_api_runs_none(rendered, target):
    docs = rendered[target]
    (api,) = _pod_spec_of(docs, "Deployment", APP)["containers"]
    (jobs,) = _pod_spec_of(docs, "Deployment", JOBS)["containers"]
    assert jobs["image"] == api["image"], "one image, two roles"
    assert _env_of(api)["BANKCHURN_JOB_WORKERS"] == "0"
    assert _env_of(jobs)["BANKCHURN_JOB_WORKERS"] == "1"
    assert jobs["envFrom"] == api["envFrom"], "the same settings (Redis URL, limits, model) for both roles"
    for name, value in CONTAINER_ENV:
        assert _env_of(jobs).get(name) == value
    for probe, path in PROBES[:2]:
        assert jobs[probe]["httpGet"]["path"] == path
    assert jobs["securityContext"]["readOnlyRootFilesystem"] is True
    assert _millicores(jobs["resources"]["limits"]["cpu"]) == CPU_LIMIT_MILLI
    hpa = _one(docs, "HorizontalPodAutoscaler", JOBS)["spec"]
    assert hpa["scaleTargetRef"]["name"] == JOBS and hpa["minReplicas"] >= 1


def _redis_secret(*args: str) -> dict[str, str]:
    """What deploy/redis-secret.sh makes, decoded (kubectl renders it offline)."""
    out = subprocess.run(
        [str(DEPLOY / "redis-secret.sh"), *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    secret = yaml.safe_load(out)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == REDIS
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_the_redis_secret_holds_new_passwords_only_their_hashes_reach_redis():
    first, second = _redis_secret(), _redis_secret("--namespace", "other")
    url = urlsplit(first["BANKCHURN_REDIS_URL"])
    assert (url.scheme, url.username, url.hostname, url.port, url.path) == (
        "redis",
        "bank-churn",
        REDIS,
        REDIS_PORT,
        "/0",
    )
    assert len(url.password) == 64 and url.password != urlsplit(second["BANKCHURN_REDIS_URL"]).password
    users = {line.split()[1]: line for line in first["users.acl"].splitlines()}
    assert set(users) == {"default", "probe", "bank-churn", "keda"}
    for user, password in (("bank-churn", url.password), ("keda", first["keda-password"])):
        assert f" #{hashlib.sha256(password.encode()).hexdigest()} " in users[user], user
        assert password not in first["users.acl"], "the ACL file holds hashes, never a password"
    assert first["keda-username"] == "keda"
    assert users["default"].split()[2] == "off", "nobody is let in without a password"
    assert "~*" not in users["bank-churn"] and "+@all" not in users["bank-churn"], "the service gets its keys only"
    assert users["keda"].endswith("+llen") and "~saq:bank_churn:queued ~saq:bank_churn:active" in users["keda"]


def _projected(pod: dict, mount_path: str) -> tuple[dict, list[dict]]:
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume["projected"]["sources"]


@pytest.mark.parametrize("target", TARGETS)
def test_api_keys_and_the_redis_url_are_required_files_from_secrets(rendered, target):
    from serving.settings import SECRETS_DIR

    docs = rendered[target]
    assert _settings(docs)["BANKCHURN_API_KEYS_FILE"] == f"{SECRETS_DIR}/api-keys"
    assert "BANKCHURN_REDIS_URL" not in _settings(docs), "a URL with a password is no setting: it is a Secret"
    for name in (APP, JOBS):
        pod = _pod_spec_of(docs, "Deployment", name)
        mount, sources = _projected(pod, str(SECRETS_DIR))
        assert mount["readOnly"] is True
        files = {(s["secret"]["name"], i["key"], i["path"]) for s in sources for i in s["secret"]["items"]}
        assert files == {
            ("bank-churn-api-keys", "api-keys", "api-keys"),
            (REDIS, "BANKCHURN_REDIS_URL", "BANKCHURN_REDIS_URL"),
        }
        assert not [s for s in sources if s["secret"].get("optional")], "the pod must not start without them"
        env = {e["name"] for e in pod["containers"][0].get("env", [])}
        assert not env & {"BANKCHURN_REDIS_URL", "BANKCHURN_API_KEYS", "REDIS_PASSWORD"}
    redis = _one(docs, "StatefulSet", REDIS)["spec"]["template"]["spec"]
    (server,) = redis["containers"]
    acl_file = server["args"][server["args"].index("--aclfile") + 1]
    (mount,) = [m for m in server["volumeMounts"] if acl_file.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in redis["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == REDIS and not volume["secret"].get("optional")
    assert volume["secret"]["items"] == [{"key": "users.acl", "path": acl_file.rsplit("/", 1)[1]}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert (
            "--user probe" in " ".join(server[probe]["exec"]["command"])
            and "= PONG" in server[probe]["exec"]["command"][-1]
        )


@pytest.mark.parametrize("target", TARGETS)
def test_the_redis_service_is_what_the_secret_names(rendered, target):
    docs = rendered[target]
    service = _one(docs, "Service", REDIS)
    assert service["spec"]["ports"][0]["port"] == REDIS_PORT
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": REDIS}
    assert _one(docs, "StatefulSet", REDIS)["spec"]["serviceName"] == REDIS


# Redis releases with the fixes for CVE-2025-49844, CVE-2025-46817, CVE-2025-46818 and
# CVE-2025-46819, per release line: (major, minor) -> first fixed patch.
REDIS_FIXED = {(7, 2): 11, (7, 4): 6, (8, 0): 4, (8, 2): 2}


@pytest.mark.parametrize("target", [*TARGETS, *(f"gke-with-{c}" for c in COMPONENTS)])
def test_every_image_runs_by_digest_and_redis_has_the_2025_cve_fixes(scanned, target):
    for doc in scanned[target]:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            image = container["image"]
            assert re.search(r"@sha256:[0-9a-f]{64}$", image), (
                f"{doc['kind']}/{doc['metadata']['name']}: {image} by tag"
            )
            if image.startswith("redis:"):
                version = re.match(r"redis:(\d+)\.(\d+)\.(\d+)", image)
                assert version, image
                major, minor, patch = map(int, version.groups())
                assert (major, minor) >= (8, 4) or patch >= REDIS_FIXED[(major, minor)], image


@pytest.mark.parametrize("target", TARGETS)
def test_no_selector_of_one_part_matches_the_pods_of_another(rendered, target):
    docs = rendered[target]
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    for d in docs:  # a CronJob's pods, by the part they belong to
        if d["kind"] == "CronJob":
            labels = d["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
            pods[labels["app.kubernetes.io/name"]] = labels
    selectors = [(d["kind"], d["metadata"]["name"], d["spec"]["selector"]) for d in docs if d["kind"] == "Service"]
    selectors += [
        (d["kind"], d["metadata"]["name"], d["spec"]["selector"]["matchLabels"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget")
    ]
    selectors += [
        (d["kind"], d["metadata"]["name"], d["spec"]["podSelector"]["matchLabels"])
        for d in docs
        if d["kind"] == "NetworkPolicy"
    ]
    for kind, name, selector in selectors:
        matched = [pod for pod, labels in pods.items() if all(labels.get(k) == v for k, v in selector.items())]
        part = {f"{APP}-grpc": APP}.get(name, name)  # GKE's gRPC Service is the API's
        assert matched == [part], f"{kind}/{name} selects the pods of {matched}"


@pytest.mark.parametrize("target", TARGETS)
def test_redis_is_persistent_non_root_and_reachable_only_by_our_pods(rendered, target):
    docs = rendered[target]
    statefulset = _one(docs, "StatefulSet", REDIS)["spec"]
    pod = statefulset["template"]["spec"]
    (redis,) = pod["containers"]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes", "jobs must survive a Redis restart"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", "Redis must never drop a job's keys"
    (data,) = [m for m in redis["volumeMounts"] if m["mountPath"] == args[args.index("--dir") + 1]]
    (claim,) = statefulset["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == data["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    policy = _one(docs, "NetworkPolicy", REDIS)["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"] and policy["egress"] == []
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": REDIS_PORT}]
    assert sorted(peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]) == [
        APP,
        JOBS,
        MONITORING,
    ]
    jobs_policy = _one(docs, "NetworkPolicy", JOBS)["spec"]
    assert {(p["protocol"], p["port"]) for r in jobs_policy["egress"] for p in r["ports"]} == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", REDIS_PORT),
    }


def test_keda_component_scales_the_workers_on_the_saq_queue_logged_in_as_keda(rendered_components):
    import redis.asyncio
    from saq.queue.redis import RedisQueue

    from serving.settings import Settings

    docs = rendered_components["keda"]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == JOBS]
    assert _one(docs, "HorizontalPodAutoscaler", APP)  # the API keeps its CPU HPA
    scaled = _one(docs, "ScaledObject", JOBS)["spec"]
    assert scaled["scaleTargetRef"]["name"] == JOBS and scaled["minReplicaCount"] >= 1
    queue = RedisQueue(redis.asyncio.Redis(), name=Settings().job_queue)  # the lists saq really uses
    triggers = scaled["triggers"]
    assert {t["metadata"]["listName"] for t in triggers} == {queue.namespace("queued"), queue.namespace("active")}
    service = f"{REDIS}.{NAMESPACE}.svc.cluster.local:{REDIS_PORT}"
    assert all(t["type"] == "redis" and t["metadata"]["address"] == service for t in triggers)
    auth = _one(docs, "TriggerAuthentication", REDIS)["spec"]["secretTargetRef"]
    assert {t["authenticationRef"]["name"] for t in triggers} == {REDIS}
    secret_keys = set(_redis_secret())
    assert {(a["parameter"], a["name"]) for a in auth} == {("username", REDIS), ("password", REDIS)}
    assert {a["key"] for a in auth} <= secret_keys, "the keys deploy/redis-secret.sh makes"
    # KEDA's operator (namespace keda) gets through Redis' NetworkPolicy, on 6379 only
    (rule,) = _one(docs, "NetworkPolicy", REDIS)["spec"]["ingress"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
    } in rule["from"]
    assert rule["ports"] == [{"protocol": "TCP", "port": REDIS_PORT}]


def test_external_redis_component_swaps_the_in_cluster_redis_for_a_narrow_egress(rendered_components):
    from serving.settings import SECRETS_DIR

    docs = rendered_components["external-redis"]
    assert not [d for d in docs if d["metadata"]["name"] == REDIS], "the in-cluster Redis must be gone"
    assert "BANKCHURN_REDIS_URL" not in _settings(docs), "an environment variable would win over the secret file"
    for name in (APP, JOBS):
        pod = _pod_spec_of(docs, "Deployment", name)
        _, sources = _projected(pod, str(SECRETS_DIR))
        by_name = {s["secret"]["name"]: s["secret"] for s in sources}
        assert by_name[REDIS]["items"] == [{"key": "BANKCHURN_REDIS_URL", "path": "BANKCHURN_REDIS_URL"}]
        assert by_name["bank-churn-redis-ca"]["optional"] is True  # Memorystore's CA; ElastiCache needs none
        egress = _one(docs, "NetworkPolicy", name)["spec"]["egress"]
        (managed,) = [r for r in egress if any("ipBlock" in peer for peer in r.get("to", []))]
        assert managed["to"] == [{"ipBlock": {"cidr": "192.0.2.0/29"}}], "a documented placeholder, never a /8"
        assert {p["port"] for p in managed["ports"]} == {6378, REDIS_PORT}


def test_gke_serves_https_only_with_a_managed_certificate(rendered):
    docs = rendered["gke"]
    ingress = _one(docs, "Ingress")
    certificate = _one(
        docs, "ManagedCertificate", ingress["metadata"]["annotations"]["networking.gke.io/managed-certificates"]
    )
    assert certificate["spec"]["domains"], "a domain to certify"
    frontend = _one(
        docs, "FrontendConfig", ingress["metadata"]["annotations"]["networking.gke.io/v1beta1.FrontendConfig"]
    )
    assert frontend["spec"]["redirectToHttps"]["enabled"] is True and frontend["spec"]["sslPolicy"]
    assert ingress["metadata"]["annotations"].get("kubernetes.io/ingress.allow-http") != "true"


def test_eks_nlb_listens_with_tls_only_for_http_and_grpc(rendered):
    service = _one(rendered["eks"], "Service")
    annotations = service["metadata"]["annotations"]
    assert annotations[NLB + "ssl-cert"].startswith("arn:aws:acm:")
    listeners = sorted(p["port"] for p in service["spec"]["ports"])
    assert listeners == [443, GRPC_PORT] == sorted(int(p) for p in annotations[NLB + "ssl-ports"].split(","))
    assert 80 not in listeners, "nothing in the clear"


# ---------------------------------------------------------------- static security scan


@pytest.mark.parametrize("target", TARGETS)
def test_checkov_reports_no_failed_checks(checkov_report, target):
    failed = [c for c in checkov_report["results"]["failed_checks"] if Path(c["file_path"]).stem == target]
    assert not failed, "checkov failed checks:\n" + "\n".join(
        f"  {c['check_id']} {c['resource']}: {c['check_name']}" for c in failed
    )


def test_checkov_scanned_everything_and_every_skip_is_annotated(checkov_report, scanned):
    summary = checkov_report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["failed"] == 0, [
        f"{c['check_id']} {c['resource']} ({Path(c['file_path']).stem})"
        for c in checkov_report["results"]["failed_checks"]
    ]
    assert summary["resource_count"] >= sum(len(docs) for docs in scanned.values())
    # A skip that no longer matches a finding is stale: the counts must agree.
    annotated = sum(
        1
        for docs in scanned.values()
        for doc in docs
        for key in doc["metadata"].get("annotations", {})
        if SKIP_ANNOTATION.match(key)
    )
    assert summary["skipped"] == annotated, (
        f"checkov skipped {summary['skipped']} results but the manifests carry {annotated} skip annotations: "
        "remove skips that no longer match a finding"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_checkov_skips_carry_a_reason(rendered, target):
    for doc in rendered[target]:
        for key, value in doc["metadata"].get("annotations", {}).items():
            if SKIP_ANNOTATION.match(key):
                match = SKIP_VALUE.match(value)
                assert match, f"{key}: {value!r} is not CKV_K8S_nn=reason"
                assert len(match.group(2).split()) >= 5, f"{key}: give a real reason for skipping {match.group(1)}"
