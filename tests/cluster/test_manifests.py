"""Every cluster definition checked against the schema of the tool that reads it, and against
each other: the launcher YAML through Ray's own cluster-config validation, the KubeRay manifests
against KubeRay's v1 fields and Kubernetes' own models, every Serve config through Serve's
schema and the app's own argument parser, and the job's command line through the job's config
loader. Each checker is also shown to reject a broken copy."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from flora_platform.config import FinetuneConfig, load_config
from flora_platform.serving.config import parse_args

from .conftest import REPO
from .kuberay_api import check_k8s, check_kuberay

LAUNCHER = REPO / "cluster/launcher/flora-h100.yaml"
KUBERAY = REPO / "cluster/kuberay"
RAY_MANIFESTS = ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml")
CORE_MODELS = {"PersistentVolumeClaim": "V1PersistentVolumeClaim", "Deployment": "V1Deployment", "Service": "V1Service"}
SERVE_CONFIGS = sorted((REPO / "serve_apps").glob("*.yaml"))


def load(path):
    return yaml.safe_load(path.read_text())


def dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", (REPO / "cluster/Dockerfile").read_text(), re.M)
    return workdir


def ray_pod_specs(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def container_env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --------------------------------------------------------------------------- cluster launcher


def test_launcher_config_passes_rays_own_validation():
    config = load(LAUNCHER)
    validate_config(prepare_config(config))  # what `ray up` runs before it talks to the cloud
    nodes = config["available_node_types"]
    head, workers = nodes[config["head_node_type"]], [n for k, n in nodes.items() if k != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "nothing but zero-CPU actors should land on the head"
    assert [w["node_config"]["InstanceType"] for w in workers] == ["p5.48xlarge"]
    assert workers[0]["min_workers"] < workers[0]["max_workers"] <= config["max_workers"], "autoscaling range"
    # The synced checkout lands where the image installed the project, and is installed there.
    (target,) = config["file_mounts"]
    assert target == dockerfile_workdir()
    assert any(f"-e {target}" in c for c in config["setup_commands"])
    assert any("platform/mlflow/server.sh start" in c for c in config["head_setup_commands"])


def test_launcher_validation_rejects_a_misspelled_field():
    config = load(LAUNCHER)
    config["docker"]["pull_befor_run"] = True
    with pytest.raises(Exception, match="pull_befor_run"):
        validate_config(prepare_config(config))


# --------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_kuberay_manifest_fields(name):
    (manifest,) = yaml.safe_load_all((KUBERAY / name).read_text())
    assert check_kuberay(manifest) == []
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    assert cluster["rayVersion"] == ray.__version__, "the image's Ray must be the Ray the manifests name"
    (gpu_group,) = cluster["workerGroupSpecs"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_checker_rejects_misspellings_and_non_string_start_params():
    manifest = load(KUBERAY / "raycluster.yaml")
    broken = copy.deepcopy(manifest)
    broken["spec"]["workerGroupSpec"] = broken["spec"].pop("workerGroupSpecs")
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    del broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    errors = "\n".join(check_kuberay(broken))
    assert "spec.workerGroupSpec: unknown field" in errors
    assert "rayStartParams.num-cpus: 0 must be a string" in errors
    assert "imagePullPolcy: unknown field of V1Container" in errors
    assert "`name`, must not be `None`" in errors


def test_services_manifest_against_kubernetes_models():
    docs = list(yaml.safe_load_all((KUBERAY / "services.yaml").read_text()))
    for doc in docs:
        assert check_k8s(doc, CORE_MODELS[doc["kind"]], doc["kind"]) == []
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (service,) = by_kind["Service"]
    (deployment,) = by_kind["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][0].startswith(dockerfile_workdir() + "/")
    assert (REPO / container["command"][0].removeprefix(dockerfile_workdir() + "/")).is_file()
    env = container_env(container)
    # MLflow refuses Host headers it does not know: the service's own name must be allowed.
    assert service["metadata"]["name"] in env["FLORA_MLFLOW_ALLOWED_HOSTS"].split(",")
    assert env["FLORA_MLFLOW_HOST"] == "0.0.0.0"


def test_ray_pods_share_image_storage_and_mlflow_service():
    services = list(yaml.safe_load_all((KUBERAY / "services.yaml").read_text()))
    claims = {d["metadata"]["name"] for d in services if d["kind"] == "PersistentVolumeClaim"}
    (service,) = [d for d in services if d["kind"] == "Service"]
    (mlflow,) = [d for d in services if d["kind"] == "Deployment"]
    mlflow_uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    images = {mlflow["spec"]["template"]["spec"]["containers"][0]["image"], load(LAUNCHER)["docker"]["image"]}
    for name in RAY_MANIFESTS:
        for pod in ray_pod_specs(load(KUBERAY / name)):
            for volume in pod["volumes"]:
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, name
            for container in pod["containers"]:
                images.add(container["image"])
                assert container_env(container)["MLFLOW_TRACKING_URI"] == mlflow_uri, name
    assert len(images) == 1, f"every node must run the one project image, found {images}"


def test_rayjob_entrypoint_runs_the_finetune_job_with_a_valid_config():
    manifest = load(KUBERAY / "rayjob.yaml")
    python, script, *args = shlex.split(manifest["spec"]["entrypoint"])
    assert python == "python"
    root = dockerfile_workdir() + "/"
    assert script == root + "jobs/finetune.py"
    assert args[0] == "--config"
    config_path, overrides = args[1], args[2:]
    cfg = load_config(FinetuneConfig, str(REPO / config_path.removeprefix(root)), overrides)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8  # one H100 node's GPUs
    (group,) = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.scaling.num_workers <= gpus * group["maxReplicas"], "the job asks for more GPUs than the cluster has"


# --------------------------------------------------------------------------- Serve configs


def unknown_serve_keys(config: dict) -> list[str]:
    """Keys Serve's schema does not define: Serve drops them silently, so a typo would pass."""
    def unknown(mapping: dict, schema, where: str) -> list[str]:
        return [f"{where}{key}" for key in mapping if key not in schema.model_fields]

    found = unknown(config, ServeDeploySchema, "")
    found += unknown(config.get("http_options", {}), HTTPOptionsSchema, "http_options.")
    for i, app in enumerate(config.get("applications", [])):
        found += unknown(app, ServeApplicationSchema, f"applications[{i}].")
        for j, deployment in enumerate(app.get("deployments", [])):
            found += unknown(deployment, DeploymentSchema, f"applications[{i}].deployments[{j}].")
    return found


def app_args_check(config: dict) -> None:
    """Through Serve's own schema (and no key it would drop), then every application's args
    through the app's own parser."""
    assert unknown_serve_keys(config) == []
    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        assert app.import_path == "serve_apps.flora_server:build_app"
        parse_args(app.args)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_app_configs_parse(path):
    app_args_check(load(path))


def test_rayservice_serves_the_h100_app_config():
    manifest = load(KUBERAY / "rayservice.yaml")
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app_args_check(served)
    reference = load(REPO / "serve_apps/flora-h100.yaml")
    # The image holds the code: the RayService needs no runtime_env; all else is the same app.
    for app in reference["applications"]:
        app.pop("runtime_env", None)
    assert served["applications"] == reference["applications"]
    assert served["http_options"]["host"] == "0.0.0.0" and served["http_options"]["port"] == 8000
    key_env = served["applications"][0]["args"]["security"]["api_key_env"]
    for pod in ray_pod_specs(manifest):
        assert key_env in container_env(pod["containers"][0]), "replicas need the API key the config names"


def test_serve_config_checks_reject_bad_configs():
    config = load(REPO / "serve_apps/flora.yaml")
    typo = copy.deepcopy(config)
    typo["applications"][0]["num_replica"] = 2
    assert unknown_serve_keys(typo) == ["applications[0].num_replica"]
    bad_value = copy.deepcopy(config)
    bad_value["applications"][0]["deployments"] = [{"name": "flora", "num_replicas": "many"}]
    with pytest.raises(Exception, match="num_replicas"):
        ServeDeploySchema.model_validate(bad_value)
    bad_arg = copy.deepcopy(config)
    bad_arg["applications"][0]["args"]["model"]["max_slot"] = 4
    with pytest.raises(Exception, match="max_slot"):
        app_args_check(bad_arg)
