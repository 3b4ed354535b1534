"""Fine-tune one FLoRA adapter per language on Ray Train + DeepSpeed, tracked and registered in MLflow.

    ray job submit --working-dir . -- python jobs/finetune.py [--config jobs/configs/default.yaml] [key=value ...]

Recipe: config → corpus, base model and target check (all before any worker starts) → MLflow
run → TorchTrainer (every batch mixes languages, each example through its own adapter) →
adapters logged and registered → per-language table of held-out perplexity, base vs adapted.
"""

from __future__ import annotations

import logging
import sys

import ray

from flora_platform import checkpoint as ckpt
from flora_platform import tracking
from flora_platform.config import FinetuneConfig, flat_params, to_dict
from flora_platform.job_cli import job_main, mlflow_ui_hint
from flora_platform.prepare import prepare_for_task
from flora_platform.train import adapter_names, build_trainer

log = logging.getLogger("finetune")


def perplexity_table(metrics: dict, languages: list[str]) -> tuple[list[dict], str]:
    rows = []
    for lang in languages:
        base, adapted = metrics[f"base_eval_perplexity/{lang}"], metrics[f"eval_perplexity/{lang}"]
        rows.append({"language": lang, "base_perplexity": base, "adapted_perplexity": adapted,
                     "change_pct": 100.0 * (adapted - base) / base})
    lines = ["| language | base ppl | adapted ppl | change |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['language']} | {r['base_perplexity']:.2f} | {r['adapted_perplexity']:.2f} | {r['change_pct']:+.1f}% |" for r in rows]
    return rows, "\n".join(lines)


def wer_table(metrics: dict, languages: list[str]) -> tuple[list[dict], str]:
    """Held-out WER in percent per language, base vs adapted, unnormalised (as the paper) and normalised."""
    rows = []
    for lang in languages:
        row = {"language": lang}
        for kind in ("wer", "normalised_wer"):
            row[f"base_{kind}"] = 100.0 * metrics[f"base_eval_{kind}/{lang}"]
            row[f"adapted_{kind}"] = 100.0 * metrics[f"eval_{kind}/{lang}"]
        rows.append(row)
    lines = ["| language | base WER | adapted WER | base WER (normalised) | adapted WER (normalised) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['language']} | {r['base_wer']:.2f} | {r['adapted_wer']:.2f} | {r['base_normalised_wer']:.2f} "
              f"| {r['adapted_normalised_wer']:.2f} |" for r in rows]
    return rows, "\n".join(lines)


def run(cfg: FinetuneConfig) -> dict:
    """Run the job end to end; returns the final metrics, adapter URIs and the MLflow run id."""
    job = prepare_for_task(cfg)
    names = adapter_names(cfg, job.languages)
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    run_id = tracking.start_or_resume_run(
        cfg.tracking_uri, cfg.tracking.experiment, cfg.run.name, flat_params(cfg),
        tags={"base_model": job.base_path if cfg.model.name == "embedded" else cfg.model.name,
              "adapter_kind": cfg.adapter.kind, "rank": str(cfg.adapter.rank), "task": cfg.task,
              **(job.tags if cfg.task == "speech" else {})},  # the espeak-ng that spoke the embedded corpus
    )
    log.info("MLflow run %s at %s", run_id, cfg.tracking_uri)
    loop_config = {
        "config": to_dict(cfg),
        "base_path": job.base_path,
        **job.worker_data(),
        "tracking_uri": cfg.tracking_uri,
        "mlflow_run_id": run_id,
    }
    try:
        result = build_trainer(cfg, loop_config, name=train_run_name(cfg, run_id)).fit()
        metrics = dict(result.metrics)
        with result.checkpoint.as_directory() as directory:
            uris = tracking.log_adapters(
                cfg.tracking_uri, run_id, {n: ckpt.adapter_dir(directory, n) for n in names},
                register=cfg.tracking.register, prefix=cfg.tracking.registered_model_prefix,
                tags={"base_model": cfg.model.name, "kind": cfg.adapter.kind, "rank": str(cfg.adapter.rank),
                      "run_name": cfg.run.name, "task": cfg.task},
            )
        rows, table = (wer_table if cfg.task == "speech" else perplexity_table)(metrics, job.languages)
        tracking.log_summary(cfg.tracking_uri, run_id, rows, table + "\n")
    except BaseException:
        tracking.finish_run(cfg.tracking_uri, run_id, ok=False)
        raise
    tracking.finish_run(cfg.tracking_uri, run_id, ok=True)
    return {"metrics": metrics, "adapter_uris": uris, "run_id": run_id, "table": table, "rows": rows}


def train_run_name(cfg: FinetuneConfig, run_id: str) -> str:
    """Ray Train's directory for this MLflow run under run.storage_path. A job restarted before
    its run finished continues the same MLflow run and so resumes from the same checkpoints; a
    job submitted again after a finished one starts a new run and trains anew, instead of
    reporting (and registering again) the finished run's adapters."""
    return f"{cfg.run.name}-{run_id[:8]}"


def main(argv=None) -> int:
    return job_main(argv, __doc__, FinetuneConfig, run, report, example="adapter.rank=2")


def report(cfg: FinetuneConfig, out: dict, seconds: float) -> None:
    measure = "word error rate (%)" if cfg.task == "speech" else "perplexity"
    print(f"\nHeld-out {measure} per language (base model vs its adapter):")
    print(out["table"])
    print("\nAdapters:")
    for name, uri in out["adapter_uris"].items():
        print(f"  {name}: {uri}")
    print(f"\nMLflow run {out['run_id']} in {cfg.tracking_uri}")
    print(mlflow_ui_hint(cfg.tracking_uri))


if __name__ == "__main__":
    sys.exit(main())
