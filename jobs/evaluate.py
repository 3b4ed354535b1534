"""Evaluate the base model and adapters: MultiPL-E pass@k by execution and held-out perplexity per language.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate.yaml \
        'adapters=[models:/flora-perl@champion, models:/flora-shell/2]' [key=value ...]

Recipe: config → problems → adapters (local directories or registered versions) and their base
model → held-out blocks → which languages run in this cluster's sandbox → one Ray task: the
engine generates every completion (all adapters in shared batches) and measures perplexity →
Ray tasks run every completion with its tests in the sandbox → pass@k per model and language →
MLflow: an evaluation run, a child run per model, metrics as tags on the registered versions,
optionally an alias moved to the best version when it beats the alias's holder and the base model.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import ray
from transformers import AutoTokenizer

from flora_platform.config import ConfigError, flat_params
from flora_platform.data import load_documents, split_documents
from flora_platform.evaluation import registry
from flora_platform.evaluation.adapters import BASE_LABEL, resolve_adapters, resolve_base, warn_on_data_mismatch
from flora_platform.evaluation.config import EvaluateConfig
from flora_platform.evaluation.execution import SandboxUnavailable
from flora_platform.evaluation.harness import SANDBOX_UNAVAILABLE_EXIT, judge_completions, probe_languages
from flora_platform.evaluation.perplexity import heldout_blocks
from flora_platform.evaluation.problems import load_problems
from flora_platform.evaluation.report import model_table, score_rows
from flora_platform.evaluation.worker import score_models
from flora_platform.job_cli import job_main, mlflow_ui_hint

log = logging.getLogger("evaluate")


def run(cfg: EvaluateConfig) -> dict:
    """Run the evaluation end to end; returns scores, the table, MLflow run ids and what was skipped."""
    # Problems, data, adapters and the base model they belong to: every check before Ray starts.
    try:
        problems = load_problems(cfg.problems.source, cfg.problems.languages, cfg.problems.max_per_language)
    except ValueError as err:
        raise ConfigError("problems.source", str(err)) from err
    try:
        docs = load_documents(cfg.data) if cfg.perplexity.enabled or _needs_embedded(cfg) else {}
        train_docs, heldout_docs = split_documents(docs, cfg.data.eval_fraction, cfg.data.seed) if docs else ({}, {})
    except ValueError as err:
        raise ConfigError("data", str(err)) from err
    known = {p.language for p in problems} | set(docs)
    with tempfile.TemporaryDirectory(prefix="flora-eval-adapters-") as download_dir:
        adapters = resolve_adapters(cfg.adapters, cfg.tracking_uri, Path(download_dir), known)
    base_path = resolve_base(cfg.model, cfg.data, adapters, train_docs)
    heldout = {}
    if cfg.perplexity.enabled and heldout_docs:
        warn_on_data_mismatch(adapters, cfg.data, cfg.tracking_uri)
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        heldout = heldout_blocks(heldout_docs, tokenizer, cfg.perplexity.seq_len, cfg.perplexity.eval_blocks)

    # The languages whose programs can run in this cluster's sandbox.
    ray.init(ignore_reinit_error=True, log_to_driver=True)
    limits = cfg.execution.limits()
    sandbox = probe_languages({p.language for p in problems}, limits, cfg.execution.isolation)
    log.info("sandbox isolation: %s", sandbox["isolation"])
    for lang, reason in sandbox["unavailable"].items():
        log.warning("%s problems are not evaluated: %s", lang, reason)
    problems = [p for p in problems if p.language not in sandbox["unavailable"]]

    # Who is scored on what: the base model on everything, an adapter on its own language.
    models = ([(None, None)] if cfg.include_base else []) + [(a.label, a.language) for a in adapters]
    jobs = [(label, p) for label, lang in models for p in problems if lang in (None, p.language)]
    pairs = [(label, g) for label, lang in models for g in sorted(heldout) if lang in (None, g)]
    log.info("scoring %d models: %d problem jobs x %d samples, %d perplexity pairs", len(models), len(jobs), cfg.sampling.n_samples, len(pairs))

    task = ray.remote(num_cpus=cfg.generation.num_cpus, num_gpus=1 if cfg.generation.use_gpu else 0)(score_models)
    scored = ray.get(task.remote(
        base_path, {a.label: a.adapter for a in adapters}, jobs, heldout, pairs,
        cfg.sampling, cfg.generation, cfg.perplexity,
    ))

    verdicts = judge_completions(
        problems, scored["completions"], limits, cfg.execution.isolation,
        programs_per_task=cfg.execution.programs_per_task, max_concurrent_tasks=cfg.execution.max_concurrent_tasks,
    )
    rows = score_rows(verdicts, scored["perplexity"], cfg.sampling.ks)
    table = model_table(rows, cfg.sampling.ks)
    models_logged = registry.evaluated_models(rows, adapters, cfg.sampling.ks, BASE_LABEL if cfg.include_base else None)

    texts = {
        "evaluation.md": table + "\n",
        "scores.json": json.dumps(rows, indent=2),
        "results.jsonl": "".join(json.dumps(v) + "\n" for v in verdicts),
        "sandbox.json": json.dumps(sandbox, indent=2),
    }
    # A run whose programs ran unisolated says so where runs are compared.
    tags = {"flora.sandbox": "sandbox" if sandbox["sandboxed"] else "none", "flora.sandbox_isolation": sandbox["isolation"], "base_model": base_path}
    run_id = registry.log_evaluation(
        cfg.tracking_uri, cfg.tracking.experiment, cfg.run.name, flat_params(cfg), tags, models_logged, texts,
        tag_versions=cfg.tracking.tag_versions,
    )
    promotion = {}  # registered name -> registry.PromotionDecision (moved or not, and why)
    if cfg.promote.alias:
        promotion = registry.promote_alias(cfg.tracking_uri, models_logged, cfg.promote.alias, cfg.promote.metric, run_id=run_id)
    return {
        "run_id": run_id, "rows": rows, "table": table, "models": models_logged, "promotion": promotion,
        "promoted": {name: d.candidate for name, d in promotion.items() if d.moved},
        "unavailable": sandbox["unavailable"], "isolation": sandbox["isolation"], "base_path": base_path,
        "adapters": {a.source: a.label for a in adapters},
    }


def _needs_embedded(cfg: EvaluateConfig) -> bool:
    return cfg.model.name in ("embedded", "auto")


def main(argv=None) -> int:
    return job_main(argv, __doc__, EvaluateConfig, run, report, example="sampling.n_samples=100",
                    exit_codes={SandboxUnavailable: (SANDBOX_UNAVAILABLE_EXIT, "sandbox unavailable: ")})


def report(cfg: EvaluateConfig, out: dict, seconds: float) -> None:
    print(f"\npass@k (percent) and held-out perplexity per model and language ({seconds:.0f} s):")
    print(out["table"])
    for lang, reason in out["unavailable"].items():
        print(f"  not evaluated: {lang}: {reason}")
    print(f"\nSandbox: {out['isolation']}")
    for decision in out["promotion"].values():
        print(f"  {decision.reason}")
    print(f"MLflow evaluation run {out['run_id']} in {cfg.tracking_uri}")
    print(mlflow_ui_hint(cfg.tracking_uri))


if __name__ == "__main__":
    sys.exit(main())
