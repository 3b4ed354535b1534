"""MLflow: one run per job, metrics over time, adapters as artifacts and registered model versions.

Registered models are named `<prefix>-<language>`; each fine-tuning run adds one version per
language, tagged with base model, kind and rank. People pick the version to serve in the MLflow
UI by setting an alias (e.g. `champion`); serving resolves `models:/<name>@<alias>`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flora_platform.config import ConfigError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "flora.run_name"


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def start_or_resume_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> str:
    """The MLflow run of this job: an unfinished run of the same name is continued (a restarted
    job), provided it was started with the same params; otherwise a new run starts."""
    client = client_for(tracking_uri)
    experiment_id = experiment_id_for(tracking_uri, experiment)
    unfinished = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and attributes.status != 'FINISHED'",
        max_results=1,
    )
    if unfinished:
        run_id = unfinished[0].info.run_id
        logged = unfinished[0].data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != param_value(v))
        if changed:
            raise ConfigError(
                "run.name", f"{run_name!r} names an unfinished MLflow run ({run_id}) started with other settings "
                f"({', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''}): submit it with the same settings to "
                "resume it, or give this job another run.name",
            )
        client.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s", run_id)
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client, run_id: str, params: dict) -> None:
    """All `params` in batches (one request each, not one per parameter), values cut to MLflow's limit."""
    from mlflow.entities import Param

    items = [Param(key, param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def param_value(value) -> str:
    """A param as MLflow keeps it: a string of at most 6000 characters."""
    return str(value)[:6000]


def experiment_id_for(tracking_uri: str, experiment: str) -> str:
    """The experiment's id, creating it with its artifacts beside a local sqlite store.

    MLflow's default artifact root is ./mlruns relative to the process, which under
    `ray job submit --working-dir .` is Ray's temporary copy of the repo: registered versions
    would point into a directory Ray deletes.
    """
    client = client_for(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def log_step_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    client_for(tracking_uri).log_batch(run_id, metrics=batch)


def finish_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    client_for(tracking_uri).set_terminated(run_id, status=status)


def log_adapters(
    tracking_uri: str,
    run_id: str,
    adapter_dirs: dict[str, Path],
    *,
    register: bool,
    prefix: str,
    tags: dict[str, str],
) -> dict[str, str]:
    """Log each adapter directory as `adapters/<name>`; register a version per adapter.

    Returns `{adapter name: "models:/<registered name>/<version>"}` (or the runs:/ URI when not
    registering).
    """
    client = client_for(tracking_uri)
    uris = {}
    for name, directory in adapter_dirs.items():
        client.log_artifacts(run_id, str(directory), artifact_path=f"adapters/{name}")
        if register:
            uris[name] = register_adapter(tracking_uri, run_id, name, prefix=prefix, tags=tags)
        else:
            uris[name] = f"runs:/{run_id}/adapters/{name}"
    return uris


def register_adapter(tracking_uri: str, run_id: str, name: str, *, prefix: str, tags: dict[str, str]) -> str:
    """Register the run's logged `adapters/<name>` as a new version of `<prefix>-<name>`; its models:/ URI."""
    client = client_for(tracking_uri)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    model_name = registered_name(prefix, name)
    try:
        client.create_registered_model(model_name, description=f"flora adapters for {name}")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    # MLflow 3 registers a plain artifact directory through create_model_version(source=...).
    version = client.create_model_version(
        model_name, source=f"{artifact_uri}/adapters/{name}", run_id=run_id, tags={**tags, "adapter": name}
    )
    log.info("registered %s version %s", model_name, version.version)
    return f"models:/{model_name}/{version.version}"


def registered_name(prefix: str, adapter: str) -> str:
    return f"{prefix}-{adapter}"


def log_summary(tracking_uri: str, run_id: str, rows: list[dict], markdown: str) -> None:
    client = client_for(tracking_uri)
    client.log_text(run_id, markdown, "summary.md")
    client.log_text(run_id, json.dumps(rows, indent=2), "summary.json")


def resolve_model_version(tracking_uri: str, model_uri: str):
    """The registered `ModelVersion` of `models:/<name>@<alias>`, `models:/<name>/<version>` or `<name>@<alias>`."""
    ref = model_uri.removeprefix("models:/")
    client = client_for(tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, sep, version = ref.rpartition("/")
    if not sep or not version.isdigit():
        raise ValueError(f"{model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, version)


def download_model(tracking_uri: str, model_uri: str, dst: str | Path) -> Path:
    """Download a registered adapter version (see `resolve_model_version`) into `dst`."""
    import mlflow.artifacts

    # Resolved here rather than by MLflow's models:/ repository, which reads the process-global
    # registry URI instead of the one this call is given.
    version = resolve_model_version(tracking_uri, model_uri)
    path = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst), tracking_uri=tracking_uri)
    return Path(path)
