"""The results of a search: one outcome per trial, the best trial per adapter, a summary and a plot.

`collect_outcomes` reads Tune's results and the statuses `tune.TrialTracker` recorded in MLflow;
`best_trials` picks, per language, the finished trial with the lowest held-out loss;
`register_best` registers those adapters; `log_search_summary` writes the parent run's table
(trial, status, kind, rank, lr, held-out loss per language) and its loss-vs-rank/lr plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flora_platform import tracking
from flora_platform.search_config import SearchJobConfig, trial_config
from flora_platform.tune import PARENT_TAG, STATUS_TAG, TRIAL_TAG, child_run_name, close_trial_run, error_summary


@dataclass
class TrialOutcome:
    trial_id: str
    status: str  # finished | stopped_early | failed | interrupted
    kind: str
    rank: int
    lr: float
    targets: str  # the option searched over, "" when targets were not searched
    step: int  # last evaluated step
    losses: dict[str, float]  # language (and "mean") -> last held-out loss
    run_id: str | None  # the child run (None when the trial never started)
    error: str = ""


def collect_outcomes(cfg: SearchJobConfig, results, parent_run_id: str) -> list[TrialOutcome]:
    """One outcome per trial, in trial order; the statuses are the ones `TrialTracker` recorded."""
    client = tracking.client_for(cfg.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = {
        r.data.tags.get(TRIAL_TAG): r
        for r in client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    }
    outcomes = []
    for result in results:
        metrics, params = result.metrics or {}, result.config or {}
        trial_id = metrics["trial_id"]
        child = children.get(trial_id)
        if result.error is not None:
            status = "failed"
        elif child is not None and child.data.tags.get(STATUS_TAG) in ("finished", "stopped_early"):
            status = child.data.tags[STATUS_TAG]
        else:
            status = "interrupted"
        trial_cfg = trial_config(cfg, params, child_run_name(cfg, trial_id)) if params else None
        losses = {k.removeprefix("eval_loss/"): v for k, v in metrics.items() if k.startswith("eval_loss/")}
        outcomes.append(TrialOutcome(
            trial_id=trial_id, status=status,
            kind=trial_cfg.adapter.kind if trial_cfg else "", rank=trial_cfg.adapter.rank if trial_cfg else 0,
            lr=trial_cfg.lr if trial_cfg else math.nan, targets=params.get("targets", ""),
            step=int(metrics.get("step", 0)), losses=losses, run_id=child.info.run_id if child else None,
            error=error_summary(result.error) if result.error is not None else "",
        ))
    return sorted(outcomes, key=lambda o: o.trial_id)


def interrupted(outcomes: list[TrialOutcome]) -> bool:
    """Whether the search stopped before every trial ended (no trial at all: stopped at once)."""
    return not outcomes or any(o.status == "interrupted" for o in outcomes)


def settle_interrupted(cfg: SearchJobConfig, outcomes: list[TrialOutcome], parent_run_id: str) -> None:
    """Leave no run RUNNING after an interrupted search; resubmitting it reopens them."""
    for o in outcomes:
        if o.status == "interrupted" and o.run_id:
            close_trial_run(cfg.tracking_uri, o.run_id, "interrupted")
    tracking.client_for(cfg.tracking_uri).set_terminated(parent_run_id, status="KILLED")


def best_trials(cfg: SearchJobConfig, outcomes: list[TrialOutcome], names: list[str]) -> dict[str, TrialOutcome]:
    """Adapter name -> the finished trial with the lowest held-out loss for it (per language, or
    the search metric for a single shared adapter). Only finished trials have logged adapters."""
    finished = [o for o in outcomes if o.status == "finished"]
    best = {}
    for name in names:
        key = name if cfg.adapter.per_language else cfg.search.metric
        scored = [o for o in finished if math.isfinite(o.losses.get(key, math.nan))]
        if scored:
            best[name] = min(scored, key=lambda o: o.losses[key])
    return best


def register_best(cfg: SearchJobConfig, best: dict[str, TrialOutcome]) -> dict[str, str]:
    """Adapter name -> models:/ URI of a new registered version (runs:/ when tracking.register is off)."""
    uris = {}
    for name, o in best.items():
        if not cfg.tracking.register:
            uris[name] = f"runs:/{o.run_id}/adapters/{name}"
            continue
        uris[name] = tracking.register_adapter(
            cfg.tracking_uri, o.run_id, name, prefix=cfg.tracking.registered_model_prefix,
            tags={"base_model": cfg.model.name, "kind": o.kind, "rank": str(o.rank), "lr": f"{o.lr:.3g}",
                  "search": cfg.run.name, "trial": o.trial_id},
        )
    return uris


def summary_rows(outcomes: list[TrialOutcome], languages: list[str]) -> list[dict]:
    return [
        {"trial": o.trial_id, "status": o.status, "kind": o.kind, "rank": o.rank, "lr": o.lr, "targets": o.targets,
         "step": o.step, **{f"eval_loss/{k}": o.losses.get(k) for k in [*languages, "mean"]},
         "run_id": o.run_id, "error": o.error}
        for o in outcomes
    ]


def summary_table(rows: list[dict], languages: list[str]) -> str:
    """Markdown: one line per trial with its learning rate, rank and held-out loss per language."""
    show_targets = any(r["targets"] for r in rows)
    head = ["trial", "status", "kind", "rank", "lr", *(["targets"] if show_targets else []), "step", *languages, "mean"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" if h in ("trial", "status", "kind", "targets") else "---:" for h in head) + " |"]
    for r in rows:
        losses = [_fmt(r[f"eval_loss/{k}"]) for k in [*languages, "mean"]]
        cells = [r["trial"], r["status"], r["kind"], str(r["rank"]), f"{r['lr']:.3g}",
                 *([r["targets"]] if show_targets else []), str(r["step"]), *losses]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_table(best: dict[str, TrialOutcome], uris: dict[str, str], per_language: bool, metric: str) -> str:
    lines = ["| adapter | trial | kind | rank | lr | held-out loss | serve |", "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for name, o in best.items():
        loss = o.losses[name if per_language else metric]
        lines.append(f"| {name} | {o.trial_id} | {o.kind} | {o.rank} | {o.lr:.3g} | {loss:.4f} | {uris[name]} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}"


def loss_plot(rows: list[dict], languages: list[str]):
    """Held-out loss vs rank and vs learning rate: filled = finished, hollow = stopped early."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_rank, by_lr = fig.subplots(1, 2)
    colours = {k: f"C{i}" for i, k in enumerate([*languages, "mean"])}
    for key, colour in colours.items():
        for status, face in (("finished", colour), ("stopped_early", "none")):
            pts = [(r["rank"], r["lr"], r[f"eval_loss/{key}"]) for r in rows
                   if r["status"] == status and r[f"eval_loss/{key}"] is not None]
            if not pts:
                continue
            label = key if status == "finished" else None
            ranks, lrs, losses = zip(*pts)
            by_rank.scatter(ranks, losses, facecolors=face, edgecolors=colour, label=label)
            by_lr.scatter(lrs, losses, facecolors=face, edgecolors=colour, label=label)
    by_rank.set_xscale("log", base=2)
    ranks = sorted({r["rank"] for r in rows if r["rank"]})
    by_rank.set_xticks(ranks, labels=[str(r) for r in ranks])
    by_rank.set(xlabel="rank", ylabel="held-out loss", title="loss vs rank")
    by_lr.set_xscale("log")
    by_lr.set(xlabel="learning rate", ylabel="held-out loss", title="loss vs learning rate")
    if by_lr.get_legend_handles_labels()[0]:  # nothing to plot when no trial was evaluated
        by_lr.legend(title="language (hollow: stopped early)", fontsize="small")
    return fig


def log_search_summary(cfg: SearchJobConfig, parent_run_id: str, rows: list[dict], table: str,
                       best: dict[str, TrialOutcome], languages: list[str]) -> None:
    """summary.md/summary.json, loss_vs_rank_lr.png and the best loss per adapter on the parent run."""
    client = tracking.client_for(cfg.tracking_uri)
    tracking.log_summary(cfg.tracking_uri, parent_run_id, rows, table + "\n")
    client.log_figure(parent_run_id, loss_plot(rows, languages), "loss_vs_rank_lr.png")
    for name, o in best.items():
        key = name if cfg.adapter.per_language else cfg.search.metric
        client.log_metric(parent_run_id, f"best_eval_loss/{name}", o.losses[key])
        client.set_tag(parent_run_id, f"best_trial/{name}", o.trial_id)


class SearchFailed(RuntimeError):
    """No trial finished: every trial failed, or none ran to train.steps."""


class SearchInterrupted(RuntimeError):
    """The search was stopped before all trials ended; resubmitting it resumes it."""


def failure_message(outcomes: list[TrialOutcome]) -> str:
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("stopped_early", "failed", "interrupted")}
    head = (f"all {len(outcomes)} trials failed" if len(failed) == len(outcomes)
            else f"no trial finished ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})")
    if not failed:
        return head
    first = failed[0]
    return (f"{head}; the first, {first.trial_id} (kind {first.kind}, rank {first.rank}, lr {first.lr:.3g}), "
            f"failed with:\n{first.error}")
