"""From verdicts to numbers and tables: pass@k and status counts per (model, language), the
per-model table, and the paper's Table 1 layout (base, FLoRA, IA3, LoRA with the relative
improvement over the base model).

A verdict row is one completion's outcome: {"label", "language", "problem", "sample", "status", ...}.
Problems skipped for every sample (a prompt longer than the context) count for no model.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from flora_platform.evaluation.execution import STATUSES
from flora_platform.evaluation.passk import mean_pass_at_k

METHOD_TITLES = {"base": "Base model", "flora": "FLoRA", "ia3": "IA3", "lora": "LoRA"}


def pass_at_k_scores(verdicts: list[dict], ks: tuple[int, ...]) -> dict[tuple[str, str], dict]:
    """(label, language) -> {"pass@k": ..., "problems": P, "samples": S, <status>: count}."""
    per_problem: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    statuses: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for v in verdicts:
        if v["status"] == "skipped":
            continue
        key = (v["label"], v["language"])
        counts = per_problem[key][v["problem"]]
        counts[0] += 1
        counts[1] += v["status"] == "passed"
        statuses[key][v["status"]] += 1
    scores = {}
    for key, problems in per_problem.items():
        pairs = [tuple(nc) for nc in problems.values()]
        row = {"problems": len(pairs), "samples": sum(n for n, _ in pairs)}
        for k in ks:
            usable = [(n, c) for n, c in pairs if n >= k]
            row[f"pass@{k}"] = mean_pass_at_k(usable, k)
        row.update({s: statuses[key][s] for s in STATUSES})
        scores[key] = row
    return scores


def score_rows(verdicts: list[dict], perplexities: list[dict], ks: tuple[int, ...], base_label: str = "base") -> list[dict]:
    """A row per (model, language), base model first: pass@k and statuses from the verdicts,
    perplexity and loss from `perplexities` ([{"label", "language", "perplexity", "loss"}])."""
    scores = pass_at_k_scores(verdicts, ks)
    ppl = {(s["label"], s["language"]): s for s in perplexities}
    rows = []
    for label, lang in sorted(set(scores) | set(ppl), key=lambda k: (k[0] != base_label, k)):
        row = {"label": label, "language": lang, **scores.get((label, lang), {})}
        if (label, lang) in ppl:
            row.update(perplexity=ppl[(label, lang)]["perplexity"], loss=ppl[(label, lang)]["loss"])
        rows.append(row)
    return rows


def model_table(rows: list[dict], ks: tuple[int, ...]) -> str:
    """Markdown: one line per (model, language) with pass@k in percent, perplexity, statuses."""
    head = ["model", "language", *[f"pass@{k}" for k in ks], "perplexity", "problems", *STATUSES]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|"]
    for r in rows:
        cells = [r["label"], r["language"], *[_pct(r.get(f"pass@{k}")) for k in ks], _num(r.get("perplexity")),
                 str(r.get("problems", "")), *[str(r.get(s, "")) for s in STATUSES]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_table(values: dict[tuple[str, str], float], methods: list[str], languages: list[str], *, percent: bool, title: str) -> str:
    """The paper's Table 1 layout: a row per language, columns base + methods, each method cell
    "value (relative change vs base)". values: (method or "base", language) -> value."""
    head = ["Language", METHOD_TITLES["base"], *[METHOD_TITLES.get(m, m) for m in methods]]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for lang in languages:
        base = values.get(("base", lang))
        cells = [lang, _pct(base) if percent else _num(base)]
        for m in methods:
            v = values.get((m, lang))
            shown = _pct(v) if percent else _num(v)
            cells.append(f"{shown} ({relative_change(v, base)})" if v is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relative_change(value: float | None, base: float | None) -> str:
    """"+22.14%" as the paper prints relative improvement; "n/a" when the base is 0 or missing."""
    if value is None or base is None or not math.isfinite(value) or not math.isfinite(base):
        return "n/a"
    if base == 0:
        return "±0.00%" if value == 0 else "n/a"
    return f"{100.0 * (value - base) / abs(base):+.2f}%"


def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100.0 * value:.2f}"


def _num(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
