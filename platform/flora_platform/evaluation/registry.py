"""MLflow for evaluations: a parent run per evaluation, a child run per evaluated model, metrics
written onto the registered versions, and an alias moved to the best version.

Metric names: MLflow allows no "@" in a name, so pass@k is logged as `pass_at_<k>/<language>`;
perplexity as `perplexity/<language>` (and `loss/<language>`, its log). A child run carries the
tags `flora.registered_model`, `flora.model_version` and `flora.training_run_id`; the registered
version gets the same metrics as tags plus `flora.eval_run_id`, and the training run a tag
`flora.eval_run_id` pointing back, so each is one click from the others in the MLflow UI.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

from mlflow.entities import Metric, RunStatus

from flora_platform import tracking

log = logging.getLogger(__name__)

EVALUATED_TAG = "flora.evaluated"


def metric_key(metric: str, language: str) -> str:
    """"pass@1", "perl" -> "pass_at_1/perl"; "perplexity", "perl" -> "perplexity/perl"."""
    return f"{metric.replace('@', '_at_')}/{language}"


@dataclass
class EvaluatedModel:
    label: str
    kind: str  # base | flora | ia3 | lora
    language: str | None  # the adapter's own language (None: base, or an all-language adapter)
    metrics: dict[str, float]  # metric_key(...) -> value
    registered_name: str = ""
    version: str = ""
    training_run_id: str = ""
    run_id: str = field(default="", init=False)  # its evaluation run, once logged


def evaluated_models(rows: list[dict], adapters: list, ks: tuple[int, ...], base_label: str | None = "base") -> list[EvaluatedModel]:
    """The base model (unless `base_label` is None) and each `adapters.EvalAdapter`, with the
    metrics of its rows (`report.score_rows`): pass@k, perplexity and loss per language."""
    info = {a.label: a for a in adapters}
    models = []
    for label in ([base_label] if base_label else []) + [a.label for a in adapters]:
        metrics = {}
        for r in (r for r in rows if r["label"] == label):
            for k in ks:
                if f"pass@{k}" in r:
                    metrics[metric_key(f"pass@{k}", r["language"])] = r[f"pass@{k}"]
            for name in ("perplexity", "loss"):
                if name in r:
                    metrics[metric_key(name, r["language"])] = r[name]
        a = info.get(label)
        if a is None:
            models.append(EvaluatedModel(label, "base", None, metrics))
        else:
            models.append(EvaluatedModel(label, a.kind, a.language, metrics, registered_name=a.registered_name,
                                         version=a.version, training_run_id=a.run_id))
    return models


def log_evaluation(
    tracking_uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str],
    models: list[EvaluatedModel], texts: dict[str, str], *, tag_versions: bool = True,
) -> str:
    """Log the evaluation run (params, `texts` as artifacts) with one child run per model; returns
    the parent run id and sets each model's `run_id`."""
    client = tracking.client_for(tracking_uri)
    experiment_id = tracking.experiment_id_for(tracking_uri, experiment)
    parent = client.create_run(experiment_id, run_name=run_name, tags={tracking.RUN_NAME_TAG: run_name, **tags}).info.run_id
    try:
        for key, value in params.items():
            client.log_param(parent, key, str(value)[:6000])
        for name, text in texts.items():
            client.log_text(parent, text, name)
        for m in models:
            m.run_id = _log_model_run(client, experiment_id, parent, run_name, m)
            if tag_versions and m.registered_name:
                for key, value in m.metrics.items():
                    client.set_model_version_tag(m.registered_name, m.version, key, _fmt(value))
                client.set_model_version_tag(m.registered_name, m.version, "flora.eval_run_id", m.run_id)
            if m.training_run_id:
                client.set_tag(m.training_run_id, "flora.eval_run_id", m.run_id)
    except BaseException:
        client.set_terminated(parent, status=RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(parent, status=RunStatus.to_string(RunStatus.FINISHED))
    return parent


def _log_model_run(client, experiment_id: str, parent: str, run_name: str, m: EvaluatedModel) -> str:
    tags = {
        "mlflow.parentRunId": parent, EVALUATED_TAG: m.label, "flora.adapter_kind": m.kind,
        "flora.language": m.language or "all",
    }
    if m.registered_name:
        tags.update({"flora.registered_model": m.registered_name, "flora.model_version": m.version})
    if m.training_run_id:
        tags["flora.training_run_id"] = m.training_run_id
    run_id = client.create_run(experiment_id, run_name=f"{run_name}/{m.label}", tags=tags).info.run_id
    now = int(time.time() * 1000)
    finite = {k: v for k, v in m.metrics.items() if math.isfinite(v)}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in finite.items()])
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def promote_alias(tracking_uri: str, models: list[EvaluatedModel], alias: str, metric: str) -> dict[str, str]:
    """For every registered model evaluated here, point `alias` at its best evaluated version by
    `metric` ("pass@1": highest; "perplexity": lowest) on the version's own language; ties go to
    the lower perplexity, then the newer version. Returns {registered name: version}."""
    client = tracking.client_for(tracking_uri)
    by_name: dict[str, list[EvaluatedModel]] = {}
    for m in models:
        if m.registered_name and m.language:
            by_name.setdefault(m.registered_name, []).append(m)
    chosen = {}
    for name, candidates in sorted(by_name.items()):
        scored = [(m, _rank(m, metric)) for m in candidates]
        scored = [(m, r) for m, r in scored if r is not None]
        if not scored:
            log.warning("%s: no evaluated version has %s; alias %r not moved", name, metric, alias)
            continue
        best = max(scored, key=lambda mr: mr[1])[0]
        client.set_registered_model_alias(name, alias, best.version)
        chosen[name] = best.version
        log.info("%s@%s -> version %s (%s)", name, alias, best.version, json.dumps({k: round(v, 4) for k, v in best.metrics.items() if k.endswith("/" + best.language)}))
    return chosen


def _rank(m: EvaluatedModel, metric: str):
    """A sort key where larger is better, or None if the metric is missing."""
    value = m.metrics.get(metric_key(metric, m.language))
    if value is None or not math.isfinite(value):
        return None
    perplexity = m.metrics.get(metric_key("perplexity", m.language), math.inf)
    tie_break = -perplexity if math.isfinite(perplexity) else -math.inf
    primary = value if metric.startswith("pass@") else -value
    return (primary, tie_break, int(m.version))


def _fmt(value: float) -> str:
    return f"{value:.6g}"
