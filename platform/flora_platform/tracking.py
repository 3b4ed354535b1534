"""MLflow: one run per job, metrics over time, adapters as artifacts and registered model versions.

Registered models are named `<prefix>-<language>`; each fine-tuning run adds one version per
language, tagged with base model, kind and rank. People pick the version to serve in the MLflow
UI by setting an alias (e.g. `champion`); serving resolves `models:/<name>@<alias>`.

What an MLflow outage does:
- during training (rank 0's metrics over time, `MetricWriter`): best-effort. Each call is tried
  a few times within seconds; while the server stays down the points wait in a bounded buffer
  and go in, in order, once it answers again; what cannot be sent is dropped and counted. No
  MLflow error reaches the training loop, so an outage never spends the run's max_failures.
- before and after training (`start_or_resume_run`, `log_adapters`, `log_summary`,
  `finish_run(ok=True)`): required, they raise. MLflow's own HTTP retries apply first
  (MLFLOW_HTTP_REQUEST_MAX_RETRIES, by default 7 with backoff, about 4 minutes); the last three
  then raise `TrackingError`, which names what was not recorded.
- `finish_run(ok=False)`, called while a job is already failing: best-effort, a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, RunStatus, RunTag
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


class TrackingError(RuntimeError):
    """A required MLflow call (see the module docstring) failed after MLflow's own retries."""


@contextmanager
def required(what: str, tracking_uri: str):
    """Turn an MLflow failure inside into a `TrackingError` that says what was not recorded."""
    try:
        yield
    except MlflowException as err:
        raise TrackingError(f"{what}: MLflow at {tracking_uri} failed after retrying: {err.message}") from err


def finish_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    """Mark the run FINISHED (required) or FAILED (best-effort: the job is failing already, and
    an MLflow error here would hide why; the run then stays RUNNING and a resubmitted job continues it)."""
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    if ok:
        with required(f"marking run {run_id} finished", tracking_uri):
            client_for(tracking_uri).set_terminated(run_id, status=status)
        return
    try:
        client_for(tracking_uri).set_terminated(run_id, status=status)
    except MlflowException as err:
        log.warning("could not mark MLflow run %s failed at %s: %s", run_id, tracking_uri, err.message)


# --------------------------------------------------------------------------- metrics during training

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
COUNT_TAGS = {  # run tags with the writer's counts, summed over the run's worker restarts
    "retried_points": "flora.tracking.retried_points",
    "buffered_points": "flora.tracking.buffered_points",
    "dropped_points": "flora.tracking.dropped_points",
}


class MetricWriter:
    """Rank 0's metrics over time into one MLflow run, written so that MLflow cannot stop training.

    Semantics:
        log(metrics, step): the points, stamped now, join the buffer behind older unsent ones;
            then at most `calls_per_log` log_batch calls send the oldest (≤1000 points each). A
            call is tried `tries` times, waiting backoff_s, 2·backoff_s, ... between tries; each
            try is one HTTP request of at most `timeout_s` (MLflow's own retries are off here).
            A call that still fails leaves its points buffered: MLflow is down. While down, a
            log only buffers, except once every `pause_s`, when it tries one call, once.
        close(): send what is buffered, retrying for up to `close_wait_s`; then drop the rest.
        Bounds: after each log at most `max_points` wait; beyond, the oldest are dropped. The
            points of a call MLflow refuses (4xx other than 429: a bad key or value, a deleted
            run) are dropped, not retried. A server that hangs holds a step for at most about
            tries · timeout_s + (2^(tries-1) - 1) · backoff_s (16.5 s by default; a refused
            connection fails at once), then at most one timeout_s per pause_s while it is down.
        Never raises on an MLflow error: each is a warning (once per outage) and a count.

    Counts (attributes, and run tags `flora.tracking.*` once MLflow answers): `retried_points`
    (points sent again after a failed try), `buffered_points` (points that could not be sent by
    the log that made them), `dropped_points` (points never sent). Resending is safe: a point keeps
    its timestamp, and MLflow's SQL store keeps one row per (key, value, timestamp, step).
    Points still buffered when the worker dies are lost uncounted; the restarted worker redoes the
    steps after its checkpoint exactly and logs the points the run does not hold yet (those are
    the lost ones; `train.logged_points`), into the same run.
    """

    def __init__(
        self, client, run_id: str, *, tries: int = 3, backoff_s: float = 0.5, timeout_s: int = 5,
        pause_s: float = 30.0, max_points: int = 100_000, calls_per_log: int = 5, close_wait_s: float = 60.0,
    ):
        self.client, self.run_id = client, run_id
        self.tries, self.backoff_s, self.timeout_s, self.pause_s = tries, backoff_s, timeout_s, pause_s
        self.max_points, self.calls_per_log, self.close_wait_s = max_points, calls_per_log, close_wait_s
        self.retried_points = self.buffered_points = self.dropped_points = 0
        self._pending: deque[Metric] = deque()  # oldest first
        self._down = False
        self._overflowing = False  # warned about dropping the oldest points in this outage
        self._next_try_s = 0.0  # time.monotonic() before which a down server is not tried
        self._counts_before: dict[str, int] | None = None  # the run's count tags from earlier workers
        self._counts_written: dict[str, int] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now_ms, step) for key, value in metrics.items())
        tried = time.monotonic() >= self._next_try_s
        error = self._send(tries=1 if self._down else self.tries, calls=self.calls_per_log) if tried else None
        self.buffered_points += min(len(metrics), len(self._pending))  # the newest are the last to go
        self._drop_oldest_beyond_bound()
        if tried:
            self._note(error)

    def close(self) -> None:
        """Send what is buffered (retrying up to `close_wait_s`), drop the rest, record the counts."""
        deadline, wait = time.monotonic() + self.close_wait_s, self.backoff_s
        while self._pending:
            error = self._send(tries=1, calls=math.ceil(len(self._pending) / MAX_METRICS_PER_CALL))
            if error is None or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
            wait = min(2 * wait, 10.0)
        if self._pending:
            log.warning("MLflow run %s: dropping %d metric points MLflow did not take before the end of "
                        "training", self.run_id, len(self._pending))
            self.dropped_points += len(self._pending)
            self._pending.clear()
        self._write_counts()
        if any(self.counts().values()):
            log.warning("MLflow run %s, metrics during training: %s", self.run_id, self.counts())

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNT_TAGS}

    def _drop_oldest_beyond_bound(self) -> None:
        overflow = len(self._pending) - self.max_points
        if overflow <= 0:
            return
        if not self._overflowing:
            log.warning("MLflow run %s: more than %d metric points wait for MLflow; dropping the oldest",
                        self.run_id, self.max_points)
        self._overflowing = True
        for _ in range(overflow):
            self._pending.popleft()
        self.dropped_points += overflow

    def _send(self, tries: int, calls: int) -> Exception | None:
        """Send up to `calls` batches of the oldest points; the error if MLflow did not answer."""
        for _ in range(calls):
            if not self._pending:
                break
            batch = [self._pending[i] for i in range(min(len(self._pending), MAX_METRICS_PER_CALL))]
            error = self._try(lambda: self.client.log_batch(self.run_id, metrics=batch), tries, len(batch))
            if error is not None and not refused(error):
                return error
            for _ in batch:
                self._pending.popleft()
            if error is not None:
                log.warning("MLflow run %s refused %d metric points, dropped: %s", self.run_id, len(batch), error)
                self.dropped_points += len(batch)
        return None

    def _try(self, call, tries: int, points: int) -> Exception | None:
        """`call()` up to `tries` times with exponential backoff; None, or the last error."""
        error = None
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                self.retried_points += points
            try:
                with mlflow_http(max_retries=0, timeout_s=self.timeout_s):
                    call()
                return None
            except Exception as err:  # noqa: BLE001 - whatever the store raises, training goes on
                error = err
                if refused(err):
                    break
        return error

    def _note(self, error: Exception | None) -> None:
        """Track whether MLflow is down; warn when that changes."""
        if error is None:
            if self._down:
                log.warning("MLflow run %s: MLflow answers again; %d metric points still to send, counts so far %s",
                            self.run_id, len(self._pending), self.counts())
            self._down = self._overflowing = False
            self._write_counts()
            return
        if not self._down:
            log.warning("MLflow run %s: MLflow did not take metrics (%s); keeping them (%d waiting, at most %d) "
                        "and trying again every %.0f s", self.run_id, error, len(self._pending), self.max_points,
                        self.pause_s)
        self._down = True
        self._next_try_s = time.monotonic() + self.pause_s

    def _write_counts(self) -> None:
        """The counts as run tags, added to those earlier workers of this run left; best-effort."""
        counts = self.counts()
        if counts == self._counts_written or not any(counts.values()):
            return
        try:
            with mlflow_http(max_retries=0, timeout_s=self.timeout_s):
                if self._counts_before is None:
                    tags = self.client.get_run(self.run_id).data.tags
                    self._counts_before = {name: int(tags.get(tag, 0)) for name, tag in COUNT_TAGS.items()}
                total = [RunTag(tag, str(self._counts_before[name] + counts[name])) for name, tag in COUNT_TAGS.items()]
                self.client.log_batch(self.run_id, tags=total)
            self._counts_written = counts
        except Exception as err:  # noqa: BLE001 - written at the next chance
            log.info("MLflow run %s: counts not written yet: %s", self.run_id, err)


def refused(error: Exception) -> bool:
    """MLflow answered and said no (4xx other than 429): sending the same again cannot help."""
    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status != 429


@contextmanager
def mlflow_http(max_retries: int, timeout_s: int):
    """MLflow's HTTP retries and timeout for the calls inside.

    MLflow reads them from the environment at each request and takes no per-client setting; they
    are restored on the way out (the training worker makes no other MLflow calls meanwhile).
    """
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        with required(f"logging adapter {name!r} of run {run_id} (it stays in the job's last checkpoint)", tracking_uri):
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
    with required(f"logging the summary of run {run_id}", tracking_uri):
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
