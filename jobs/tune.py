"""Search learning rate and rank for the fine-tuning job on Ray Tune, every trial tracked in MLflow.

    ray job submit --working-dir . -- python jobs/tune.py [--config jobs/configs/tune.yaml] [key=value ...]

Recipe: config → corpus, base model and every searched option checked (before any trial starts)
→ MLflow parent run → Tune: each trial fits the fine-tuning job's TorchTrainer with its sampled
learning rate and rank, ASHA stops the trials that trail on held-out loss, each trial is a child
run → the best finished trial per language registered → summary table and plot on the parent.
Resubmitting an interrupted search (same run.name) resumes it: finished trials stay finished,
unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import logging
import sys

import ray

from flora_platform import tracking
from flora_platform import tune as search
from flora_platform.config import to_dict
from flora_platform.job_cli import job_main, mlflow_ui_hint
from flora_platform.prepare import prepare_for_task
from flora_platform.search_config import SearchJobConfig
from flora_platform.search_results import (
    SearchFailed,
    SearchInterrupted,
    best_table,
    best_trials,
    collect_outcomes,
    failure_message,
    interrupted,
    log_search_summary,
    register_best,
    settle_interrupted,
    summary_rows,
    summary_table,
)
from flora_platform.train import adapter_names

log = logging.getLogger("tune")


def run(cfg: SearchJobConfig) -> dict:
    """Run (or resume) the search; returns outcomes, the best trial and URI per adapter, run ids."""
    job = prepare_for_task(cfg)
    search.check_search(cfg, job)
    names = adapter_names(cfg, job.languages)
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    search.check_cluster_fits(cfg, ray.cluster_resources().get("CPU", 0.0))
    resuming = search.can_resume(cfg)
    parent_id = search.open_search_run(cfg, resuming=resuming)
    log.info("MLflow parent run %s at %s", parent_id, cfg.tracking_uri)
    trial_job = {
        "config": to_dict(cfg),
        "base_path": job.base_path,
        "data": job.worker_data(),
        "parent_run_id": parent_id,
    }
    tracker = search.TrialTracker(to_dict(cfg), parent_id)
    try:
        results = search.build_tuner(cfg, trial_job, tracker, restore=resuming).fit()
        outcomes = collect_outcomes(cfg, results, parent_id)
        rows = summary_rows(outcomes, job.languages)
        table = summary_table(rows, job.languages)
        if interrupted(outcomes):
            settle_interrupted(cfg, outcomes, parent_id)
            raise SearchInterrupted(
                f"search {cfg.run.name!r} interrupted; submit the same command again to resume it\n{table}"
            )
        best = best_trials(cfg, outcomes, names)
        uris = register_best(cfg, best)
        log_search_summary(cfg, parent_id, rows, table, best, job.languages)
        if not best:
            raise SearchFailed(failure_message(outcomes))
    except SearchInterrupted:
        raise
    except BaseException:
        tracking.finish_run(cfg.tracking_uri, parent_id, ok=False)
        raise
    tracking.finish_run(cfg.tracking_uri, parent_id, ok=True)
    return {"outcomes": outcomes, "best": best, "adapter_uris": uris, "run_id": parent_id, "table": table,
            "best_table": best_table(best, uris, cfg.adapter.per_language, cfg.search.metric)}


def main(argv=None) -> int:
    return job_main(argv, __doc__, SearchJobConfig, run, report, example="search.ranks=[1,4]",
                    exit_codes={SearchFailed: (1, "search failed: "), SearchInterrupted: (130, "")})


def report(cfg: SearchJobConfig, out: dict, seconds: float) -> None:
    counts = {s: sum(o.status == s for o in out["outcomes"]) for s in ("finished", "stopped_early", "failed")}
    print(f"\nSearch {cfg.run.name}: {len(out['outcomes'])} trials, " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    print(out["table"])
    print("\nBest configuration per language (finished trials, lowest held-out loss), and where to serve it:")
    print(out["best_table"])
    for name, uri in out["adapter_uris"].items():
        print(f"  {name}: {uri}")
    print(f"\nMLflow parent run {out['run_id']} in {cfg.tracking_uri}")
    print(mlflow_ui_hint(cfg.tracking_uri))


if __name__ == "__main__":
    sys.exit(main())
