"""Field names of KubeRay's v1 API (ray.io/v1, operator v1.7), written down from its CRDs, and a
checker for manifests against them; pod templates are checked against Kubernetes' own models
(the `kubernetes` client's OpenAPI types), which is what the CRDs embed there.

The CRDs themselves are not installed here (no cluster), and kubectl would only prune an
unknown field silently: a misspelled `workerGroupSpec` would leave a cluster without workers.
"""

from __future__ import annotations

import re

import kubernetes.client

# field -> expected Python type, or a nested spec (dict) / [spec] for a list of them.
# "pod_template" marks a core/v1 PodTemplateSpec; "required" lists what the CRD requires.
AUTOSCALER_OPTIONS = {
    "fields": {
        "args": list, "command": list, "env": list, "envFrom": list, "idleTimeoutSeconds": int, "image": str,
        "imagePullPolicy": str, "resources": dict, "securityContext": dict, "upscalingMode": str, "version": str,
        "volumeMounts": list,
    },
    "enums": {"upscalingMode": ("Default", "Aggressive", "Conservative"), "version": ("v1", "v2")},
}
RAY_START_PARAMS = "string map"  # rayStartParams: every value a string ("0", not 0)
HEAD_GROUP = {
    "fields": {
        "enableIngress": bool, "headService": dict, "ingressOptions": dict, "labels": dict,
        "rayStartParams": RAY_START_PARAMS, "resources": dict, "serviceType": str, "template": "pod_template",
    },
    "required": ("template",),
}
WORKER_GROUP = {
    "fields": {
        "groupName": str, "idleTimeoutSeconds": int, "labels": dict, "maxReplicas": int, "minReplicas": int,
        "numOfHosts": int, "priority": int, "rayStartParams": RAY_START_PARAMS, "replicas": int, "resources": dict,
        "scaleStrategy": dict, "suspend": bool, "template": "pod_template",
    },
    "required": ("groupName", "maxReplicas", "minReplicas", "template"),
}
RAY_CLUSTER_SPEC = {
    "fields": {
        "authOptions": dict, "autoscalerOptions": AUTOSCALER_OPTIONS, "enableInTreeAutoscaling": bool,
        "gcsFaultToleranceOptions": dict, "headGroupSpec": HEAD_GROUP, "headServiceAnnotations": dict,
        "historyServerOptions": dict, "managedBy": str, "networkPolicy": dict, "rayVersion": str, "suspend": bool,
        "tlsOptions": dict, "upgradeStrategy": dict, "workerGroupSpecs": [WORKER_GROUP],
    },
    "required": ("headGroupSpec",),
}
RAY_JOB_SPEC = {
    "fields": {
        "activeDeadlineSeconds": int, "backoffLimit": int, "clusterSelector": dict, "deletionStrategy": dict,
        "entrypoint": str, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
        "entrypointResources": str, "jobId": str, "managedBy": str, "metadata": dict,
        "preRunningDeadlineSeconds": int, "rayClusterSpec": RAY_CLUSTER_SPEC, "runtimeEnvYAML": str,
        "shutdownAfterJobFinishes": bool, "submissionMode": str, "submitterConfig": dict,
        "submitterPodTemplate": "pod_template", "suspend": bool, "ttlSecondsAfterFinished": int,
    },
    "enums": {"submissionMode": ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")},
}
RAY_SERVICE_UPGRADE = {
    "fields": {"type": str, "clusterUpgradeOptions": dict},
    "enums": {"type": ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")},
}
RAY_SERVICE_SPEC = {
    "fields": {
        "deploymentUnhealthySecondThreshold": int, "excludeHeadPodFromServeSvc": bool, "managedBy": str,
        "rayClusterConfig": RAY_CLUSTER_SPEC, "rayClusterDeletionDelaySeconds": int, "serveConfigV2": str,
        "serveService": dict, "serviceUnhealthySecondThreshold": int, "suspend": bool,
        "upgradeStrategy": RAY_SERVICE_UPGRADE,
    },
    "required": ("rayClusterConfig",),
}
SPECS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayService": RAY_SERVICE_SPEC}


def check_kuberay(manifest: dict) -> list[str]:
    """Problems with a ray.io/v1 manifest (RayCluster, RayJob or RayService); [] when none."""
    errors: list[str] = []
    if manifest.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {manifest.get('apiVersion')!r}, expected 'ray.io/v1'")
    kind = manifest.get("kind")
    if kind not in SPECS:
        return errors + [f"kind: {kind!r} is not one of {sorted(SPECS)}"]
    unknown = set(manifest) - {"apiVersion", "kind", "metadata", "spec"}
    errors += [f"{key}: unknown top-level field" for key in sorted(unknown)]
    if not manifest.get("metadata", {}).get("name"):
        errors.append("metadata.name: missing")
    _check(manifest.get("spec"), SPECS[kind], "spec", errors)
    return errors


def _check(value, spec, path: str, errors: list[str]) -> None:
    if spec == "pod_template":
        errors += check_k8s(value, "V1PodTemplateSpec", path)
        return
    if spec == RAY_START_PARAMS:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        errors += [f"{path}.{k}: {v!r} must be a string" for k, v in value.items() if not isinstance(v, str)]
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{path}[{i}]", errors)
        return
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        fields = spec["fields"]
        for key in sorted(set(value) - set(fields)):
            errors.append(f"{path}.{key}: unknown field; known: {sorted(fields)}")
        for key in spec.get("required", ()):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, allowed in spec.get("enums", {}).items():
            if key in value and value[key] not in allowed:
                errors.append(f"{path}.{key}: {value[key]!r} is not one of {allowed}")
        for key, item in value.items():
            if key in fields:
                _check(item, fields[key], f"{path}.{key}", errors)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    # YAML reads `true` as bool, which is also an int: keep them apart.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        errors.append(f"{path}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")


# --------------------------------------------------------------------------- core Kubernetes types

_PRIMITIVES = {"str": (str, int, float), "int": (int,), "float": (int, float), "bool": (bool,), "object": (object,),
               "datetime": (str,), "date": (str,)}


def check_k8s(value, type_name: str, path: str) -> list[str]:
    """Problems with `value` as the Kubernetes type `type_name` (e.g. "V1Deployment"), by the
    official client's models: unknown field names, missing required fields, wrong shapes."""
    errors: list[str] = []
    _check_k8s(value, type_name, path, errors)
    return errors


def _check_k8s(value, type_name: str, path: str, errors: list[str]) -> None:
    if (m := re.fullmatch(r"list\[(.+)\]", type_name)):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check_k8s(item, m.group(1), f"{path}[{i}]", errors)
        return
    if (m := re.fullmatch(r"dict\(str, (.+)\)", type_name)):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        for key, item in value.items():
            _check_k8s(item, m.group(1), f"{path}.{key}", errors)
        return
    if type_name in _PRIMITIVES:
        # Quantities ("8", 8, "32Gi") and int-or-string ports are typed `str` or `object`.
        if not isinstance(value, _PRIMITIVES[type_name]):
            errors.append(f"{path}: expected {type_name}, got {value!r}")
        return
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {type_name} mapping")
        return
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key in sorted(set(value) - set(by_json)):
        errors.append(f"{path}.{key}: unknown field of {type_name}")
    present = {by_json[k]: v for k, v in value.items() if k in by_json}
    try:
        # The model's own setters reject a missing required field and values outside its enums.
        model(**present)
    except ValueError as err:
        errors.append(f"{path}: {err}")
    for key, item in value.items():
        if key in by_json:
            _check_k8s(item, model.openapi_types[by_json[key]], f"{path}.{key}", errors)
