"""MLflow for evaluations: a parent run per evaluation, a child run per evaluated model, metrics
written onto the registered versions, and an alias moved to the best version of the run when it
beats both the version holding the alias and the base model (`promote_alias`).

Metric names: MLflow allows no "@" in a name, so pass@k is logged as `pass_at_<k>/<language>`;
perplexity as `perplexity/<language>` (and `loss/<language>`, its log). A child run carries the
tags `flora.registered_model`, `flora.model_version` and `flora.training_run_id`; the registered
version gets the same metrics as tags plus `flora.eval_run_id`, and the training run a tag
`flora.eval_run_id` pointing back, so each is one click from the others in the MLflow UI.
"""

from __future__ import annotations

import logging
import math
import re
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


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote_alias` did with one registered model's alias, and why (`reason`, one line)."""

    registered_name: str
    alias: str
    metric: str  # "pass@1", "perplexity", ...
    language: str
    moved: bool
    reason: str
    candidate: str = ""  # the best version evaluated in this run ("" when none has the metric)
    holder: str = ""  # the version holding the alias before ("" when none did)
    candidate_value: float | None = None
    holder_value: float | None = None  # None: no holder, or none recorded for this metric
    base_value: float | None = None  # None: the base model has no value for this metric here

    @property
    def version(self) -> str:
        """The version the alias points at now ("" when it points nowhere)."""
        return self.candidate if self.moved else self.holder


def promote_alias(
    tracking_uri: str, models: list[EvaluatedModel], alias: str, metric: str, *, run_id: str = "",
) -> dict[str, PromotionDecision]:
    """For every registered model evaluated here, move `alias` to its best version of this run
    when that version beats both the version holding the alias now and the base model, by
    `metric` on the version's own language. Returns {registered name: decision}.

    Rules (pass@k: higher is better; perplexity and loss: lower is better):
      - best of this run: by the metric, ties to the lower perplexity, then the newer version;
      - the holder's value: from this run if the holder was evaluated here, else its version tag
        `metric_key(metric, language)` (what `log_evaluation` writes);
      - move only if the best is strictly better than the base model's value in this run and
        than the holder's value (no holder: than the base alone);
      - keep the alias where it is when a value it must beat is missing or not finite (a holder
        never evaluated on this metric, the base model not evaluated): an unknown value cannot
        be beaten; evaluate the holder and the base in the same run to decide;
      - never remove an alias.
    Each decision is logged and written as a tag: `flora.promotion.<name>` on the evaluation run
    `run_id` (if given), `flora.promotion.<alias>` on the registered model and on the candidate
    version, so the MLflow UI shows why the alias is where it is.
    """
    _higher_is_better(metric)  # an unknown metric fails before anything moves
    client = tracking.client_for(tracking_uri)
    base = next((m for m in models if m.kind == "base"), None)
    by_name: dict[str, list[EvaluatedModel]] = {}
    for m in models:
        if m.registered_name and m.language:
            by_name.setdefault(m.registered_name, []).append(m)
    decisions = {}
    for name, candidates in sorted(by_name.items()):
        best = _best(candidates, metric)
        language = (best or candidates[0]).language
        key = metric_key(metric, language)
        holder = _alias_holder(client, name, alias)
        in_run = {m.version: m for m in candidates}
        holder_value = in_run[holder].metrics.get(key) if holder in in_run else _version_tag_value(client, name, holder, key)
        base_value = base.metrics.get(key) if base else None
        d = _decide(name, alias, metric, language, best, holder, holder_value, base_value, holder_in_run=holder in in_run)
        if d.moved:
            client.set_registered_model_alias(name, alias, d.candidate)
        _record(client, d, run_id)
        decisions[name] = d
    return decisions


def _best(candidates: list[EvaluatedModel], metric: str) -> EvaluatedModel | None:
    """The best by `metric` on each one's own language; ties to the lower perplexity, then the newer version."""
    ranked = [(r, m) for m in candidates if (r := _rank(m, metric)) is not None]
    return max(ranked, key=lambda rm: rm[0])[1] if ranked else None


def _decide(name: str, alias: str, metric: str, language: str, best: EvaluatedModel | None, holder: str,
            holder_value: float | None, base_value: float | None, *, holder_in_run: bool) -> PromotionDecision:
    where, on = f"{name}@{alias}", f"{metric} on {language}"
    kept = f"kept {where} on version {holder}" if holder else f"left {where} unset"
    holder_value, base_value = _finite(holder_value), _finite(base_value)
    decision = dict(registered_name=name, alias=alias, metric=metric, language=language, holder=holder,
                    holder_value=holder_value, base_value=base_value)
    if best is None:
        return PromotionDecision(**decision, moved=False, reason=f"{kept}: no version evaluated here has {on}")
    value = best.metrics[metric_key(metric, language)]
    decision.update(candidate=best.version, candidate_value=value)
    if holder == best.version:
        return PromotionDecision(**decision, moved=False, reason=f"{kept}: it is the best version evaluated here ({on} {_fmt(value)})")

    higher_is_better = _higher_is_better(metric)

    def beats(other: float) -> bool:
        return value > other if higher_is_better else value < other

    worse = "<=" if higher_is_better else ">="
    shortfalls, unknowns = [], []  # "<= base 0.2"; "the base model has no ..."
    if base_value is None:
        unknowns.append(f"the base model has no {on} in this run (evaluate with include_base=true)")
    elif not beats(base_value):
        shortfalls.append(f"{worse} base {_fmt(base_value)}")
    if holder and holder_value is None:
        unknowns.append(f"holder version {holder} has no finite {on} in this run" if holder_in_run else
                        f"holder version {holder} has no recorded {on} (evaluate it in the same run: models:/{where})")
    elif holder and not beats(holder_value):
        shortfalls.append(f"{worse} holder {_fmt(holder_value)}")
    if shortfalls or unknowns:
        reason = f"{kept}: candidate version {best.version} {on} {_fmt(value)}"
        reason += (" " + " and ".join(shortfalls) if shortfalls else "") + "".join(f"; {u}" for u in unknowns)
        return PromotionDecision(**decision, moved=False, reason=reason)
    better = ">" if higher_is_better else "<"
    against = f"holder {_fmt(holder_value)} and base {_fmt(base_value)}" if holder else f"base {_fmt(base_value)} (no version held it)"
    reason = f"moved {where} {holder or '(unset)'} -> {best.version}: {on} {_fmt(value)} {better} {against}"
    return PromotionDecision(**decision, moved=True, reason=reason)


def _record(client, d: PromotionDecision, run_id: str) -> None:
    """Log the decision and tag the evaluation run, the registered model and the candidate version."""
    log.info("%s", d.reason)
    if run_id:
        client.set_tag(run_id, f"flora.promotion.{_tag_safe(d.registered_name)}", d.reason)
    client.set_registered_model_tag(d.registered_name, f"flora.promotion.{d.alias}", d.reason)
    if d.candidate:
        client.set_model_version_tag(d.registered_name, d.candidate, f"flora.promotion.{d.alias}", d.reason)


def _alias_holder(client, name: str, alias: str) -> str:
    """The version `name@alias` points at, or "" when the alias is not set."""
    return str(client.get_registered_model(name).aliases.get(alias, ""))


def _version_tag_value(client, name: str, version: str, key: str) -> float | None:
    """A version's recorded metric (a tag written by `log_evaluation`), or None."""
    if not version:
        return None
    text = client.get_model_version(name, version).tags.get(key)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _higher_is_better(metric: str) -> bool:
    if metric.startswith("pass@"):
        return True
    if metric in ("perplexity", "loss"):
        return False
    raise ValueError(f"promotion metric {metric!r}: use pass@<k> (higher is better), perplexity or loss (lower is better)")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _tag_safe(text: str) -> str:
    """MLflow tag keys allow letters, digits, _ - . / : and spaces."""
    return re.sub(r"[^\w\-./: ]", "_", text)


def _rank(m: EvaluatedModel, metric: str):
    """A sort key where larger is better, or None if the metric is missing."""
    value = m.metrics.get(metric_key(metric, m.language))
    if value is None or not math.isfinite(value):
        return None
    perplexity = m.metrics.get(metric_key("perplexity", m.language), math.inf)
    tie_break = -perplexity if math.isfinite(perplexity) else -math.inf
    primary = value if _higher_is_better(metric) else -value
    return (primary, tie_break, int(m.version))


def _fmt(value: float) -> str:
    return f"{value:.6g}"
