"""Offline checks of where the Spark job runs (deploy/spark/): the SparkApplication for the Spark
Operator, its RBAC, the image recipe, the Dataproc Serverless and EMR Serverless commands of
deploy/spark/README.md, and the pinned packages they all install (requirements/spark.txt).

The SparkApplication is a custom resource that kubernetes-validate has no schema for: it is
checked against SPARK_APPLICATION below, a JSON Schema written from the operator's documented
API (sparkoperator.k8s.io/v1beta2: SparkApplicationSpec, DriverSpec, ExecutorSpec, Dependencies,
RestartPolicy) for the fields this project uses, unknown fields refused; its Kubernetes-typed
fields (security contexts, volumes, mounts) against kubernetes-validate's own definitions.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from batch.bundle import CODE_ZIP, MAIN_FILE, PACKAGES
from batch.shipping import archive_name
from batch.spark import parser

REPO = Path(__file__).resolve().parents[1]
SPARK = REPO / "deploy" / "spark"
K8S_VERSION = "1.33"  # as tests/test_deploy.py
IMAGE_HOME = "/opt/bank-churn"
VENV_PYTHON = f"{IMAGE_HOME}/venv/bin/python"
SPARK_UID = 185  # the user of Apache Spark's images

_STRINGS = {"type": "array", "items": {"type": "string"}}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|[kKMGT]i?|[kmgt])?$"}
_K8S = {"type": "object"}  # a Kubernetes type: checked against kubernetes-validate's definitions
_POD = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "cores": {"type": "integer", "minimum": 1},
        "coreLimit": _QUANTITY,
        "coreRequest": _QUANTITY,
        "memory": _QUANTITY,
        "memoryLimit": _QUANTITY,
        "memoryOverhead": _QUANTITY,
        "image": {"type": "string"},
        "serviceAccount": {"type": "string"},
        "labels": _MAP,
        "annotations": _MAP,
        "env": {"type": "array", "items": _K8S},
        "volumeMounts": {"type": "array", "items": _K8S},
        "podSecurityContext": _K8S,
        "securityContext": _K8S,
        "nodeSelector": _MAP,
        "template": {"type": "object"},  # a PodTemplateSpec, schemaless in the CRD too
        "instances": {"type": "integer", "minimum": 1},
        "javaOptions": {"type": "string"},
        "terminationGracePeriodSeconds": {"type": "integer"},
        "priorityClassName": {"type": "string"},
    },
}
SPARK_APPLICATION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "sparkoperator.k8s.io/v1beta2"},
        "kind": {"const": "SparkApplication"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["type", "sparkVersion", "mainApplicationFile", "driver", "executor"],
            "properties": {
                "type": {"enum": ["Java", "Python", "Scala", "R"]},
                "sparkVersion": {"type": "string"},
                "mode": {"enum": ["cluster", "client"]},
                "pythonVersion": {"enum": ["2", "3"]},
                "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                "imagePullSecrets": _STRINGS,
                "mainApplicationFile": {"type": "string"},
                "arguments": _STRINGS,
                "sparkConf": _MAP,
                "hadoopConf": _MAP,
                "deps": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        k: _STRINGS
                        for k in ("jars", "files", "pyFiles", "packages", "excludePackages", "repositories", "archives")
                    },
                },
                "restartPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type"],
                    "properties": {
                        "type": {"enum": ["Never", "Always", "OnFailure"]},
                        "onSubmissionFailureRetries": {"type": "integer", "minimum": 0},
                        "onFailureRetries": {"type": "integer", "minimum": 0},
                        "onSubmissionFailureRetryInterval": {"type": "integer", "minimum": 1},
                        "onFailureRetryInterval": {"type": "integer", "minimum": 1},
                    },
                },
                "timeToLiveSeconds": {"type": "integer"},
                "volumes": {"type": "array", "items": _K8S},
                "driver": _POD,
                "executor": _POD,
                "nodeSelector": _MAP,
            },
        },
    },
}
# (path in the SparkApplication, Kubernetes definition): the pod fields the operator copies as they are.
K8S_FIELDS = [
    (("spec", "volumes", "*"), "io.k8s.api.core.v1.Volume"),
    *[
        (("spec", part, *path), definition)
        for part in ("driver", "executor")
        for path, definition in [
            (("podSecurityContext",), "io.k8s.api.core.v1.PodSecurityContext"),
            (("securityContext",), "io.k8s.api.core.v1.SecurityContext"),
            (("volumeMounts", "*"), "io.k8s.api.core.v1.VolumeMount"),
            (("env", "*"), "io.k8s.api.core.v1.EnvVar"),
        ]
    ],
]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed (it ships kustomize): apt-get install kubectl"
    proc = subprocess.run([kubectl, "kustomize", str(SPARK)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def app(rendered) -> dict[str, Any]:
    return _one(rendered, "SparkApplication")


def _at(obj: Any, path: tuple) -> list[Any]:
    if not path:
        return [obj]
    head, *rest = path
    if head == "*":
        return [found for item in obj for found in _at(item, tuple(rest))]
    return _at(obj[head], tuple(rest)) if isinstance(obj, dict) and head in obj else []


def _definition_validator(definition: str) -> jsonschema.Validator:
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    schema = json.loads((folder / "_definitions.json").read_text())
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{definition}"})


def test_the_kustomization_renders_the_job_its_identity_and_its_role(rendered):
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == [
        ("Role", "bank-churn-spark-driver"),
        ("RoleBinding", "bank-churn-spark-driver"),
        ("ServiceAccount", "bank-churn-spark"),
        ("SparkApplication", "bank-churn-scoring"),
    ]
    for doc in rendered:
        assert doc["metadata"]["namespace"] == "bank-churn"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "bank-churn"


def test_kubernetes_objects_validate_strictly(rendered):
    for doc in rendered:
        if doc["kind"] != "SparkApplication":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_spark_application_matches_the_operator_api(app):
    jsonschema.Draft7Validator(SPARK_APPLICATION).validate(app)
    for path, definition in K8S_FIELDS:
        for value in _at(app, path):
            _definition_validator(definition).validate(value)
    # A pod template is merged into the pods Spark builds (it need not name containers): its
    # fields must be PodSpec fields.
    pod_spec = _definition_validator("io.k8s.api.core.v1.PodSpec").schema["$defs"]["io.k8s.api.core.v1.PodSpec"]
    for part in ("driver", "executor"):
        assert set(app["spec"][part]["template"]["spec"]) <= set(pod_spec["properties"])


@pytest.mark.parametrize(
    "mutation",
    [
        lambda a: a["spec"].update(mainAplicationFile="x"),  # a typo
        lambda a: a["spec"].update(mode="local"),
        lambda a: a["spec"]["driver"].update(cores="1"),
        lambda a: a["spec"]["deps"].update(pyfiles=["x"]),
        lambda a: a["spec"]["restartPolicy"].update(type="Sometimes"),
    ],
    ids=["typo", "mode", "cores-as-text", "deps-typo", "restart-policy"],
)
def test_the_schema_refuses_what_the_operator_would(app, mutation):
    broken = json.loads(json.dumps(app))
    mutation(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SPARK_APPLICATION).validate(broken)


def test_the_job_runs_the_bundle_baked_into_the_image(app):
    spec = app["spec"]
    assert spec["type"] == "Python" and spec["mode"] == "cluster"
    assert re.fullmatch(r"bank-churn-spark:[A-Za-z0-9_.-]+", spec["image"]) and not spec["image"].endswith(":latest")
    assert spec["mainApplicationFile"] == f"local://{IMAGE_HOME}/{MAIN_FILE}"
    assert spec["deps"]["pyFiles"] == [f"local://{IMAGE_HOME}/{CODE_ZIP}"]
    args = parser().parse_args(spec["arguments"])
    assert args.model_archive == f"file://{IMAGE_HOME}/model/{archive_name(args.model)}"
    assert spec["sparkConf"]["spark.pyspark.python"] == spec["sparkConf"]["spark.pyspark.driver.python"] == VENV_PYTHON
    assert spec["sparkConf"]["spark.executorEnv.OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("part", ["driver", "executor"])
def test_driver_and_executors_run_non_root_read_only_with_scratch_volumes(app, part):
    pod = app["spec"][part]
    assert pod["podSecurityContext"]["runAsNonRoot"] is True and pod["podSecurityContext"]["runAsUser"] == SPARK_UID
    assert pod["podSecurityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged")
    volumes = {v["name"]: v for v in app["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["volumeMounts"]}
    assert {"/tmp", "/opt/spark/work-dir"} <= set(mounts)
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    assert any(name.startswith("spark-local-dir-") for name in mounts.values())  # Spark's scratch
    assert pod["serviceAccount"] == "bank-churn-spark"
    assert pod["cores"] >= 1 and pod["memory"] and pod["coreLimit"]
    # Only the driver talks to the Kubernetes API (it starts its executors).
    assert pod["template"]["spec"]["automountServiceAccountToken"] is (part == "driver")


def test_the_driver_role_is_namespaced_and_covers_its_executors(rendered):
    role = _one(rendered, "Role")
    binding = _one(rendered, "RoleBinding")
    (rule,) = role["rules"]
    assert set(rule["resources"]) == {"pods", "services", "configmaps", "persistentvolumeclaims"}
    assert "*" not in rule["verbs"] and {"create", "delete", "watch"} <= set(rule["verbs"])
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bank-churn-spark", "namespace": "bank-churn"}]
    assert _one(rendered, "ServiceAccount")["automountServiceAccountToken"] is False


# ---------------------------------------------------------------- the image and the pinned packages


def _dockerfile() -> str:
    return (SPARK / "Dockerfile").read_text()


def test_the_image_installs_the_pinned_set_and_the_bundle_where_the_job_looks():
    text = _dockerfile()
    assert (
        "COPY requirements/spark.txt " in text and "--no-deps" in text and "-r /opt/bank-churn/requirements.txt" in text
    )
    assert "--python 3.11" in text
    assert f"dist/spark/{MAIN_FILE} dist/spark/{CODE_ZIP} {IMAGE_HOME}/" in text
    assert f"dist/spark/bank_churn-${{MODEL_VERSION}}.tar.gz {IMAGE_HOME}/model/" in text
    assert f"PYSPARK_PYTHON={VENV_PYTHON}" in text and "OMP_NUM_THREADS=1" in text
    assert "USER ${SPARK_UID}" in text.splitlines()[-1:] or text.rstrip().endswith("USER ${SPARK_UID}")
    assert f"ARG SPARK_UID={SPARK_UID}" in text


def _lock_versions() -> dict[str, str]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"] if "version" in p}


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_the_spark_requirements_are_the_locks_versions():
    pins, lock = _pins(REPO / "requirements" / "spark.txt"), _lock_versions()
    roots = [line.strip() for line in (REPO / "requirements" / "spark.in").read_text().splitlines()]
    roots = [r for r in roots if r and not r.startswith("#")]
    assert set(roots) <= set(pins)
    assert {name: version for name, version in pins.items() if lock.get(name) != version} == {}
    assert "pyspark" not in pins and "bentoml" not in pins and "scikit-learn" not in pins


def test_the_bundle_holds_only_what_the_job_imports():
    assert PACKAGES == ("batch", "models")  # never serving/ or training/ (import contracts keep it so)
    assert (REPO / "batch" / "submit.py").read_text().count("from batch.spark import main") == 1


# ---------------------------------------------------------------- the documented cloud commands


def _commands(prefix: str) -> list[list[str]]:
    """The shell commands of deploy/spark/README.md starting with `prefix`, as argv lists."""
    text = (SPARK / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for command in re.split(r"\n(?=\S)", block.replace("\\\n", " ")):
            if command.startswith(prefix):
                commands.append(shlex.split(command))
    assert commands, f"no `{prefix}` command in deploy/spark/README.md"
    return commands


def _option(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def test_the_dataproc_command_runs_the_bundle_with_arguments_the_job_accepts():
    (argv,) = _commands("gcloud dataproc batches submit pyspark")
    assert argv[5].endswith(f"/{MAIN_FILE}")
    assert _option(argv, "--py-files").endswith(f"/{CODE_ZIP}")
    assert re.fullmatch(r"[\w.-]+/[\w-]+/[\w-]+/bank-churn-spark:TAG", _option(argv, "--container-image"))
    args = parser().parse_args(argv[argv.index("--") + 1 :])
    assert args.model_archive.endswith("/" + archive_name(args.model))
    (build,) = [
        c for c in _commands("docker build") if "--container-image" not in c and "SPARK_IMAGE=debian:12-slim" in c
    ]
    assert _option(build, "-f") == "deploy/spark/Dockerfile"
    assert _option(build, "-t") == _option(argv, "--container-image")


def test_the_emr_command_runs_the_bundle_with_arguments_the_job_accepts():
    (argv,) = _commands("aws emr-serverless start-job-run")
    driver = json.loads(_option(argv, "--job-driver"))["sparkSubmit"]
    assert driver["entryPoint"].endswith(f"/{MAIN_FILE}")
    args = parser().parse_args(driver["entryPointArguments"])
    assert args.model_archive.endswith("/" + archive_name(args.model))
    submit = shlex.split(driver["sparkSubmitParameters"])
    assert _option(submit, "--py-files").endswith(f"/{CODE_ZIP}")
    confs = dict(c.split("=", 1) for c in (submit[i + 1] for i, a in enumerate(submit) if a == "--conf"))
    assert confs["spark.pyspark.python"] == confs["spark.pyspark.driver.python"] == VENV_PYTHON
    (create,) = _commands("aws emr-serverless create-application")
    image = json.loads(_option(create, "--image-configuration"))["imageUri"]
    (build,) = [c for c in _commands("docker build") if "emr-serverless" in " ".join(c)]
    assert _option(build, "-f") == "deploy/spark/Dockerfile" and _option(build, "-t") == image


def test_every_platform_builds_the_same_recipe_for_one_model_version():
    builds = _commands("docker build")
    assert len(builds) == 3
    for build in builds:
        assert _option(build, "-f") == "deploy/spark/Dockerfile"
        assert _option(build, "--build-arg") and "MODEL_VERSION=TAG" in build
        assert build[-1] == "."  # the repository root: requirements/ and dist/spark/


@pytest.mark.integration
def test_checkov_finds_nothing_in_the_rendered_manifests(rendered, tmp_path):
    checkov = REPO / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "make install creates .venv-checkov"
    (tmp_path / "spark.yaml").write_text(yaml.safe_dump_all(rendered, sort_keys=False))
    proc = subprocess.run(
        [str(checkov), "-d", ".", "--framework", "kubernetes", "--quiet", "--compact", "-o", "json", "--skip-download"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    report = json.loads(proc.stdout)
    report = report if isinstance(report, dict) else next(r for r in report if r.get("check_type") == "kubernetes")
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["resource_count"] >= len(rendered)
