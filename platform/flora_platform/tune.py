"""Hyper-parameter search on Ray Tune over learning rate and rank (optionally adapter kind and targets).

Each trial is one run of the fine-tuning job: a trial function builds the job's `TorchTrainer`
with the sampled values and fits it; the trainer's `TuneReportCallback` hands every held-out
evaluation to Tune, where ASHA stops trials whose held-out loss trails the others.

MLflow, in tracking.experiment:
    parent run   the search: its config, then a summary table, a plot, best losses per language
    child runs   one per trial (tag `mlflow.parentRunId`): the trial's config as params, metrics
                 over time (logged by the trainer's rank 0), final status, adapters if finished

Trial outcomes and their MLflow status (tag `flora.trial_status` says which):
    finished       reached train.steps          FINISHED, adapters logged under adapters/<name>
    stopped_early  stopped by ASHA              KILLED, tag `flora.last_reported_step`: where ASHA judged it
    failed         raised                       FAILED, tag `flora.error`
    interrupted    the search was stopped       KILLED; resubmitting the search resumes it

Trial outcomes are decided on the driver (a Tune callback), never inside the trial: Tune ends a
stopped trial's actor without letting the trial function finish. The same callback frees the
ended trial's worker placement group, which would otherwise hold its CPUs/GPUs until the search
ends. The config lives in `search_config`, the outcomes, best trials and summary in `search_results`.
"""

from __future__ import annotations

import logging
import math
import re
import time

import ray.tune

from flora_platform import tracking
from flora_platform.config import ConfigError, flat_params, from_dict, to_dict
from flora_platform.search_config import SearchJobConfig, optuna_installed, trial_config

log = logging.getLogger(__name__)

STATUS_TAG = "flora.trial_status"
TRIAL_TAG = "flora.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows children under the parent
PLACEMENT_GROUP_KEY = "placement_group_id"
# Seconds between a trial's end and releasing its placement group: by then Tune has ended the
# trial's actor, so no controller is left to start workers in a new one.
RELEASE_DELAY_S = 10.0
MLFLOW_STATUS = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}


# --------------------------------------------------------------------------- checks, space, algorithm, scheduler


def check_search(cfg: SearchJobConfig, job) -> None:
    """Before any trial: the metric names a language, and every kind × targets option injects
    into the model at the largest rank. `job` is the prepared fine-tuning job."""
    from flora_platform.prepare import check_targets

    if cfg.search.metric != "mean" and cfg.search.metric not in job.languages:
        raise ConfigError("search.metric", f"{cfg.search.metric!r}: use 'mean' or one of {job.languages}")
    for kind in cfg.kinds:
        for option in cfg.search.targets or (None,):
            params = {"kind": kind, "rank": max(cfg.search.ranks), "lr_factor": 1.0}
            if option is not None:
                params["targets"] = option
            try:
                check_targets(trial_config(cfg, params, "check"), job.base_path)
            except ConfigError as err:
                field = "search.targets" if option is not None else "search.kinds"
                raise ConfigError(field, f"kind {kind}, targets {option or 'preset'}: {err}") from err


def param_space(cfg: SearchJobConfig) -> dict:
    """Tune's search space: `lr_factor` (× the centre lr), `rank`, and `kind`/`targets` when searched."""
    s = cfg.search
    grid = s.algorithm == "grid"
    pick = ray.tune.grid_search if grid else ray.tune.choice
    space = {
        "lr_factor": ray.tune.grid_search(list(s.lr_grid)) if grid else ray.tune.loguniform(1 / s.lr_span, s.lr_span),
        "rank": pick(list(s.ranks)),
    }
    if len(cfg.kinds) > 1:
        space["kind"] = pick(list(cfg.kinds))
    if s.targets:
        space["targets"] = pick(list(s.targets))
    return space


def search_algorithm(cfg: SearchJobConfig):
    """Optuna (when chosen, or installed and `auto`), else random/grid; both run at most
    `max_concurrent_trials` at once (Tune ignores that setting for a variant generator passed in)."""
    s = cfg.search
    if s.algorithm == "optuna" or (s.algorithm == "auto" and optuna_installed()):
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=cfg.metric, mode="min", seed=s.seed), s.max_concurrent_trials)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=s.max_concurrent_trials, random_state=s.seed)


def scheduler(cfg: SearchJobConfig):
    if cfg.search.scheduler == "none":
        return None
    # Time is the training step the trainer reports with every evaluation, not Tune's report count.
    return ray.tune.schedulers.ASHAScheduler(
        time_attr="step", max_t=cfg.train.steps, grace_period=cfg.grace_period_steps,
        reduction_factor=cfg.search.reduction_factor,
    )


# --------------------------------------------------------------------------- the trial and the tuner


def run_trial(params: dict, job: dict) -> None:
    """Tune trial function: one fine-tuning run (a `TorchTrainer`) with the sampled values.

    `job` holds the search config dict, the base model path, the task's data (object refs) and
    the parent MLflow run. The Train run is named after the trial, so a resumed search's trial
    continues from its last checkpoint.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from flora_platform.train import build_trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: SearchJobConfig = from_dict(SearchJobConfig, job["config"])
    trial_id = ray.tune.get_context().get_trial_id()
    trial_cfg = trial_config(cfg, params, child_run_name(cfg, trial_id))
    run_id = open_trial_run(cfg, job["parent_run_id"], trial_id, params)
    loop_config = {
        "config": to_dict(trial_cfg),
        "base_path": job["base_path"],
        **job["data"],
        "tracking_uri": cfg.tracking_uri,
        "mlflow_run_id": run_id,
        "report_extras": worker_placement_group,
    }
    build_trainer(
        trial_cfg, loop_config, name=trial_id, storage_path=cfg.trials_storage_path, callbacks=[TuneReportCallback()]
    ).fit()


def build_tuner(cfg: SearchJobConfig, job: dict, tracker: TrialTracker, *, restore: bool) -> ray.tune.Tuner:
    """A new Tuner, or the interrupted search at storage_path/run.name restored (`Tuner.restore`)."""
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, job=job), {"CPU": cfg.search.trial_cpus}
    )
    path = experiment_path(cfg)
    if restore:
        log.info("resuming the search at %s: finished trials stay, unfinished ones continue", path)
        # The search space, algorithm and callbacks come back from the saved search.
        return ray.tune.Tuner.restore(path, trainable=trainable)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=ray.tune.TuneConfig(
            metric=cfg.metric, mode="min", search_alg=search_algorithm(cfg), scheduler=scheduler(cfg),
            num_samples=cfg.search.num_samples,
        ),
        run_config=ray.tune.RunConfig(
            name=cfg.run.name, storage_path=cfg.storage_path, callbacks=[tracker],
            # A trial's own failures are retried by Ray Train (run.max_failures) from its checkpoint.
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )


def check_cluster_fits(cfg: SearchJobConfig, cluster_cpus: float) -> None:
    """Warn when the concurrent trials cannot all get their CPUs now: they would wait for each other."""
    per_trial = cfg.search.trial_cpus + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    wanted = cfg.search.max_concurrent_trials * per_trial
    if wanted > cluster_cpus + 1e-9:
        log.warning(
            "%d concurrent trials need %.2f CPUs (search.trial_cpus + scaling.num_workers × scaling.cpus_per_worker "
            "= %.2f each) and the cluster has %.2f now: trials will wait for each other unless it scales up; "
            "lower search.max_concurrent_trials or scaling.cpus_per_worker",
            cfg.search.max_concurrent_trials, wanted, per_trial, cluster_cpus,
        )


def experiment_path(cfg: SearchJobConfig) -> str:
    return f"{cfg.storage_path}/{cfg.run.name}"


def can_resume(cfg: SearchJobConfig) -> bool:
    return ray.tune.Tuner.can_restore(experiment_path(cfg))


# --------------------------------------------------------------------------- placement groups of ended trials


def worker_placement_group() -> dict:
    """Reported with every evaluation: the placement group the trial's Ray Train workers run in."""
    from ray.util.placement_group import get_current_placement_group

    group = get_current_placement_group()
    return {PLACEMENT_GROUP_KEY: group.id.hex()} if group else {}


def job_placement_groups() -> list[str]:
    """Placement groups created by this driver's job (its trials' actors and their Ray Train
    workers) that are not removed yet. A placement group id ends with its job's id."""
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()  # hex
    return [
        group_hex for group_hex, info in placement_group_table().items()
        if group_hex.endswith(job) and info.get("state") != "REMOVED"
    ]


def release_placement_group(group_hex: str) -> None:
    """Remove a trial's worker placement group if it is still held.

    Tune ends a stopped trial's actor, which takes the trial's Ray Train controller and workers
    with it, but the workers' placement group belongs to the search's driver and would hold its
    CPUs/GPUs until the search ends. Ray's own cleaner frees it only where the state API (the
    dashboard) runs; this works everywhere.
    """
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_hex)))
    try:
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            log.info("released placement group %s of an ended trial", group_hex)
    except Exception as err:  # best effort: Ray's cleaner may have removed it meanwhile
        log.debug("placement group %s: %s", group_hex, err)


# --------------------------------------------------------------------------- MLflow runs


def child_run_name(cfg: SearchJobConfig, trial_id: str) -> str:
    return f"{cfg.run.name}/{trial_id}"


def open_search_run(cfg: SearchJobConfig, *, resuming: bool) -> str:
    """The parent run; an interrupted search continues its own, a finished one is never reopened."""
    client = tracking.client_for(cfg.tracking_uri)
    found = client.get_experiment_by_name(cfg.tracking.experiment)
    if resuming and found:
        runs = client.search_runs(
            [found.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{cfg.run.name}'"
        )
        if runs and all(r.info.status == "FINISHED" for r in runs):
            raise ConfigError(
                "run.name", f"the search {cfg.run.name!r} already finished (MLflow run {runs[0].info.run_id}); "
                "name the new search differently"
            )
    # The base config's values of what is searched would only mislead next to the search space.
    searched = {"adapter.rank", "train.lr"} | ({"adapter.kind"} if cfg.search.kinds else set()) | (
        {"adapter.targets"} if cfg.search.targets else set())
    params = {k: v for k, v in flat_params(cfg).items() if k not in searched}
    return tracking.start_or_resume_run(
        cfg.tracking_uri, cfg.tracking.experiment, cfg.run.name, params,
        tags={"flora.search": "true", "adapter_kind": ",".join(cfg.kinds), "metric": cfg.metric},
    )


def open_trial_run(cfg: SearchJobConfig, parent_run_id: str, trial_id: str, params: dict) -> str:
    """The trial's child run: found by trial id under the parent, or created with the trial's params."""
    client = tracking.client_for(cfg.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    trial_cfg = trial_config(cfg, params, child_run_name(cfg, trial_id))
    run = client.create_run(
        experiment_id, run_name=child_run_name(cfg, trial_id),
        tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "adapter_kind": trial_cfg.adapter.kind,
              "rank": str(trial_cfg.adapter.rank), tracking.RUN_NAME_TAG: child_run_name(cfg, trial_id)},
    )
    flat = {**flat_params(trial_cfg), **{f"search.{k}": str(v) for k, v in params.items()}}
    tracking.log_params(client, run.info.run_id, flat)
    return run.info.run_id


def close_trial_run(tracking_uri: str, run_id: str, status: str, error: str = "") -> None:
    client = tracking.client_for(tracking_uri)
    client.set_tag(run_id, STATUS_TAG, status)
    if error:
        client.set_tag(run_id, "flora.error", error[:5000])
    client.set_terminated(run_id, status=MLFLOW_STATUS[status])


class TrialTracker(ray.tune.Callback):
    """Driver-side: settles each trial's child run when Tune completes, stops or fails the trial.

    Picklable (Tune saves it with the search), so it holds only the config dict and run ids.
    """

    def __init__(self, config: dict, parent_run_id: str):
        self.config, self.parent_run_id = config, parent_run_id
        self._releases: list[tuple[float, str]] = []  # (when, placement group) of ended trials
        # Every worker placement group any trial reported: a trial whose Ray Train run restarted
        # reports a new one, and the earlier one must go too when the search ends.
        self._groups: set[str] = set()

    def __setstate__(self, state):
        # A search saved before `_groups` existed resumes too.
        self.__dict__.update(state)
        self.__dict__.setdefault("_groups", set())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(PLACEMENT_GROUP_KEY):
            self._groups.add(result[PLACEMENT_GROUP_KEY])

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        for when, group in [r for r in self._releases if r[0] <= now]:
            release_placement_group(group)
            self._releases.remove((when, group))

    def on_experiment_end(self, trials, **info):
        # Every trial has been stopped now, interrupted ones included. Groups no report named (a
        # trial stopped before its report reached the driver) would stay held until the driver
        # exits, which in a long-lived driver (a notebook, a test) is never: the search's job
        # created them, so every group of the job still held goes. (jobs/tune.py, the driver,
        # holds no placement group of its own.)
        groups = set(self._groups) | set(job_placement_groups())
        for trial in trials:
            if (trial.last_result or {}).get(PLACEMENT_GROUP_KEY):
                groups.add(trial.last_result[PLACEMENT_GROUP_KEY])
        for group in sorted(groups):
            release_placement_group(group)
        self._releases.clear()
        self._groups.clear()

    def _release_later(self, trial) -> None:
        group = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if group:
            self._releases.append((time.monotonic() + RELEASE_DELAY_S, group))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release_later(trial)
        cfg = from_dict(SearchJobConfig, self.config)
        result = trial.last_result or {}
        finished = result.get("step", 0) >= cfg.train.steps
        run_id = open_trial_run(cfg, self.parent_run_id, trial.trial_id, trial.config)
        if finished and result.get("checkpoint_path"):
            log_trial_adapters(cfg, run_id, result["checkpoint_path"])
        status = "finished" if finished else "stopped_early"
        log.info("trial %s %s at step %s: %s %.4f", trial.trial_id, status, result.get("step"),
                 cfg.metric, result.get(cfg.metric, math.nan))
        # A stopped trial's workers may log a few more steps while Tune shuts them down: the tag
        # keeps the step at which it was judged.
        tracking.client_for(cfg.tracking_uri).set_tag(run_id, "flora.last_reported_step", str(result.get("step", 0)))
        close_trial_run(cfg.tracking_uri, run_id, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release_later(trial)
        cfg = from_dict(SearchJobConfig, self.config)
        error = error_summary(trial_error_text(trial))
        log.warning("trial %s failed: %s", trial.trial_id, error)
        run_id = open_trial_run(cfg, self.parent_run_id, trial.trial_id, trial.config)
        close_trial_run(cfg.tracking_uri, run_id, "failed", error)


def log_trial_adapters(cfg: SearchJobConfig, run_id: str, checkpoint_path: str) -> None:
    """Log the finished trial's adapters (its last Ray Train checkpoint) as `adapters/<name>`."""
    import ray.train

    from flora_platform import checkpoint as ckpt

    filesystem = None
    if "://" in cfg.storage_path:
        import pyarrow.fs

        filesystem, _ = pyarrow.fs.FileSystem.from_uri(cfg.storage_path)
    client = tracking.client_for(cfg.tracking_uri)
    with ray.train.Checkpoint(checkpoint_path, filesystem=filesystem).as_directory() as directory:
        for name in ckpt.read_state(directory)["adapters"]:
            client.log_artifacts(run_id, str(ckpt.adapter_dir(directory, name)), artifact_path=f"adapters/{name}")


def trial_error_text(trial) -> str | None:
    """The trial's error trace: Tune writes it next to the driver first and syncs it to storage later."""
    if trial.error_file:
        try:
            with open(trial.error_file) as f:
                return f.read()
        except OSError:
            pass
    return trial.get_error()


# `module.SomeError: message` or `RayTaskError(WorkerGroupError): message` at the start of a line.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)(?:\(\w+\))?: .*$", re.M)


def error_summary(error) -> str:
    """The root cause of a trial error, e.g. `SafetensorError: Error while deserializing header ...`.

    Tune wraps the trainer's error, which wraps the worker's traceback: the last `SomeError:
    message` line is the worker's own.
    """
    if error is None:
        return "unknown error (see the trial's error.txt in the search's directory)"
    text = str(error).strip()
    lines = _ERROR_LINE.findall(text)
    return lines[-1].strip() if lines else (text.splitlines() or ["unknown error"])[0]

