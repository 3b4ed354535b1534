"""Compare FLoRA, IA3 and LoRA as the paper's Tables 1 and 2 do: fine-tune each on the same data and budget, then evaluate.

    ray job submit --working-dir . -- python jobs/compare_methods.py --config jobs/configs/compare_methods.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/compare_methods.py --config jobs/configs/compare_speech.yaml

Speech (task=speech, Table 2): each method's fine-tuning run scores held-out WER of the base
Whisper and of its adapters; the table (WER per language, unnormalised as the paper, and
normalised) goes to a comparison run in MLflow beside the training runs.

Recipe: config → one fine-tuning run per method (jobs/finetune.py: one adapter per language,
registered as versions of `<prefix>-<language>`) → one evaluation of the base model and every
adapter (jobs/evaluate.py: MultiPL-E pass@k by execution, held-out perplexity, all adapters
in shared batches) → Table 1 layout for pass@1 and for perplexity (each method with its
relative change over the base model), logged to the evaluation's MLflow run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import time
from pathlib import Path

from flora_platform import tracking
from flora_platform.config import AdapterSpec, ConfigError, FinetuneConfig, RunConfig, TrackingConfig
from flora_platform.evaluation.config import CompareConfig, EvalRunConfig, EvalTrackingConfig, EvaluateConfig, PerplexityConfig
from flora_platform.evaluation.execution import SandboxUnavailable
from flora_platform.evaluation.harness import SANDBOX_UNAVAILABLE_EXIT
from flora_platform.evaluation.registry import metric_key
from flora_platform.evaluation.report import method_table
from flora_platform.job_cli import job_main, mlflow_ui_hint

log = logging.getLogger("compare_methods")


def load_sibling_job(name: str):
    """Import jobs/<name>.py: jobs are scripts, not a package, so they are loaded by path."""
    spec = importlib.util.spec_from_file_location(f"flora_job_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def whole_module_targets(model_name: str, task: str = "text") -> tuple[str, ...]:
    """The architecture's FLoRA preset over whole modules (gpt_bigcode: all of c_attn rather than
    its q,k columns), so that FLoRA and LoRA share adapter banks with PEFT's IA3 preset."""
    import flora

    if model_name == "embedded":
        model_type = "whisper" if task == "speech" else "gpt_bigcode"
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model_name).model_type
        except (OSError, ValueError) as err:
            raise ConfigError("model.name", f"cannot read a model config from {model_name!r}: {err}") from err
    if model_type not in flora.PRESETS:
        raise ConfigError("adapter.targets", f"no preset for {model_type!r}; name FLoRA's and LoRA's target modules")
    return tuple(dict.fromkeys(p.partition(":")[0] for p in flora.PRESETS[model_type]))


def finetune_config(cfg: CompareConfig, method: str, run_name: str) -> FinetuneConfig:
    """The fine-tuning job of one method: everything but the adapter kind is shared."""
    targets = () if method == "ia3" else (cfg.adapter.targets or whole_module_targets(cfg.model.name, cfg.task))
    return FinetuneConfig(
        task=cfg.task, model=cfg.model, data=cfg.data, speech=cfg.speech,
        adapter=AdapterSpec(kind=method, rank=cfg.adapter.rank, targets=targets, per_language=True),
        train=cfg.train, scaling=cfg.scaling,
        tracking=TrackingConfig(
            tracking_uri=cfg.tracking_uri, experiment=cfg.tracking.experiment, register=True,
            registered_model_prefix=cfg.tracking.registered_model_prefix,
        ),
        run=RunConfig(name=run_name, storage_path=cfg.storage_path),
    )


def evaluate_config(cfg: CompareConfig, adapter_specs: list[str], run_name: str) -> EvaluateConfig:
    return EvaluateConfig(
        adapters=tuple(adapter_specs), include_base=True, model=cfg.model, data=cfg.data,
        problems=cfg.problems, sampling=cfg.sampling, generation=cfg.generation, execution=cfg.execution,
        perplexity=PerplexityConfig(seq_len=cfg.train.seq_len, eval_blocks=cfg.train.eval_blocks), promote=cfg.promote,
        tracking=EvalTrackingConfig(tracking_uri=cfg.tracking_uri, experiment=cfg.tracking.experiment),
        run=EvalRunConfig(name=run_name, storage_path=cfg.storage_path),
    )


def comparison_tables(cfg: CompareConfig, rows: list[dict], labels: dict[str, tuple[str, str]]) -> tuple[dict, str]:
    """Table 1 layout for pass@1 and perplexity. labels: evaluation label -> (method, language)."""
    pass1, ppl = {}, {}
    for r in rows:
        method, lang = ("base", r["language"]) if r["label"] == "base" else labels.get(r["label"], (None, None))
        if method is None or lang != r["language"]:
            continue
        if "pass@1" in r and not math.isnan(r["pass@1"]):
            pass1[(method, lang)] = r["pass@1"]
        if "perplexity" in r:
            ppl[(method, lang)] = r["perplexity"]
    methods = list(cfg.methods)
    pass_langs = sorted({lang for _, lang in pass1})
    ppl_langs = sorted({lang for m, lang in ppl if m != "base"})
    table = "\n\n".join([
        method_table(pass1, methods, pass_langs, percent=True, title="pass@1 (relative improvement)"),
        method_table(ppl, methods, ppl_langs, percent=False, title="held-out perplexity (relative change; lower is better)"),
    ])
    return {"pass@1": pass1, "perplexity": ppl}, table


def wer_tables(cfg: CompareConfig, finals: dict[str, dict], languages: list[str]) -> tuple[dict, str]:
    """Table 2 layout from each method's final training metrics: WER in percent per language,
    unnormalised (the paper's) and normalised. The base model's WER is the same in every run
    (same base, same held-out clips); it is taken from the first."""
    values, tables = {}, []
    for kind, title in (("wer", "WER % (unnormalised, as the paper; relative change vs base)"),
                        ("normalised_wer", "WER % (normalised: lower case, no punctuation)")):
        by_key = {}
        first = finals[cfg.methods[0]]
        for lang in languages:
            by_key[("base", lang)] = 100.0 * first[f"base_eval_{kind}/{lang}"]
            for method in cfg.methods:
                by_key[(method, lang)] = 100.0 * finals[method][f"eval_{kind}/{lang}"]
        values[kind] = by_key
        tables.append(method_table(by_key, list(cfg.methods), languages, percent=False, title=title))
    return values, "\n\n".join(tables)


def run_speech(cfg: CompareConfig, finetune, stamp: str) -> dict:
    """Table 2: fine-tune every method on the speech data; their runs hold the WER figures."""
    finals, training, languages = {}, {}, []
    for method in cfg.methods:
        run_name = f"{cfg.run.name}-{stamp}-{method}"
        log.info("fine-tuning %s (%d/%d): run %s", method, len(training) + 1, len(cfg.methods), run_name)
        out = finetune.run(finetune_config(cfg, method, run_name))
        finals[method], training[method] = out["metrics"], out["run_id"]
        languages = [row["language"] for row in out["rows"]]
    values, table = wer_tables(cfg, finals, languages)
    client = tracking.client_for(cfg.tracking_uri)
    experiment = tracking.experiment_id_for(cfg.tracking_uri, cfg.tracking.experiment)
    run_id = client.create_run(experiment, run_name=f"{cfg.run.name}-{stamp}", tags={"task": "speech"}).info.run_id
    client.log_text(run_id, table + "\n", "comparison.md")
    for kind, by_key in values.items():
        for (method, lang), value in by_key.items():
            client.log_metric(run_id, f"{kind}/{lang}/{method}", value)
    for method, training_id in training.items():
        client.set_tag(run_id, f"flora.training_run_id.{method}", training_id)
    client.set_terminated(run_id)
    return {"table": table, "values": values, "evaluation": None, "run_id": run_id, "training_runs": training}


def run(cfg: CompareConfig) -> dict:
    """Fine-tune every method, evaluate them together, return the tables and where they went."""
    finetune, evaluate = load_sibling_job("finetune"), load_sibling_job("evaluate")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if cfg.task == "speech":
        return run_speech(cfg, finetune, stamp)
    specs, labels_of_source, training = [], {}, {}
    for method in cfg.methods:
        run_name = f"{cfg.run.name}-{stamp}-{method}"
        log.info("fine-tuning %s (%d/%d): run %s", method, len(training) + 1, len(cfg.methods), run_name)
        out = finetune.run(finetune_config(cfg, method, run_name))
        training[method] = out["run_id"]
        for lang, uri in out["adapter_uris"].items():
            specs.append(f"{lang}={uri}")
            labels_of_source[uri] = (method, lang)

    log.info("evaluating the base model and %d adapters", len(specs))
    ev = evaluate.run(evaluate_config(cfg, specs, f"{cfg.run.name}-{stamp}"))
    labels = {label: labels_of_source[source] for source, label in ev["adapters"].items()}
    values, table = comparison_tables(cfg, ev["rows"], labels)

    client = tracking.client_for(cfg.tracking_uri)
    client.log_text(ev["run_id"], table + "\n", "comparison.md")
    for metric, by_key in values.items():
        for (method, lang), value in by_key.items():
            client.log_metric(ev["run_id"], f"{metric_key(metric, lang)}/{method}", value)
    for method, run_id in training.items():
        client.set_tag(ev["run_id"], f"flora.training_run_id.{method}", run_id)
    return {"table": table, "values": values, "evaluation": ev, "training_runs": training}


def main(argv=None) -> int:
    return job_main(argv, __doc__, CompareConfig, run, report, example="train.steps=400",
                    exit_codes={SandboxUnavailable: (SANDBOX_UNAVAILABLE_EXIT, "sandbox unavailable: ")})


def report(cfg: CompareConfig, out: dict, seconds: float) -> None:
    ev = out["evaluation"]
    if ev is None:  # speech: the training runs scored WER
        print(f"\nFLoRA vs IA3 vs LoRA on speech ({seconds:.0f} s): held-out word error rate per language\n")
        print(out["table"])
        print(f"\nMLflow: comparison run {out['run_id']}, training runs {out['training_runs']} in {cfg.tracking_uri}")
        print(mlflow_ui_hint(cfg.tracking_uri))
        return
    print(f"\nFLoRA vs IA3 vs LoRA ({seconds:.0f} s; base model {ev['base_path']}):\n")
    print(out["table"])
    for lang, reason in ev["unavailable"].items():
        print(f"  not evaluated: {lang}: {reason}")
    print(f"\nSandbox: {ev['isolation']}")
    for decision in ev["promotion"].values():
        print(f"  {decision.reason}")
    print(f"MLflow: evaluation run {ev['run_id']}, training runs {out['training_runs']} in {cfg.tracking_uri}")
    print(mlflow_ui_hint(cfg.tracking_uri))


if __name__ == "__main__":
    sys.exit(main())
