"""Judge completions by running them: programs fan out over Ray tasks, each runs its share in the
sandbox (`execution.Sandbox`), and verdicts come back per completion.

    report = probe_languages(["python", "ruby"], limits)          # where the programs will run
    results = judge_programs([("python", source), ...], limits)   # ExecutionResult per program
    verdicts = judge_completions(problems, completions, limits)   # a verdict row per completion

Identical programs (common at temperature 0.1: many samples agree) run once and share the
verdict. A language whose interpreter is missing is reported by `probe_languages` and its
programs are not run; `judge_programs` gives them status "error" should any arrive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import ray

from flora_platform.evaluation.execution import ExecutionLimits, ExecutionResult, Sandbox, SandboxUnavailable
from flora_platform.evaluation.problems import Problem

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 15.0
SANDBOX_UNAVAILABLE_EXIT = 3  # what the evaluation jobs exit with when programs cannot be isolated
STDERR_KEPT = 2000  # characters of each program's stderr kept in its verdict


def _probe(languages: list[str], limits: ExecutionLimits, isolation: str) -> dict:
    sandbox = Sandbox(limits, isolation)
    return {
        "isolation": sandbox.isolation.describe(),
        "sandboxed": sandbox.isolation.sandboxed,
        "unavailable": {lang: reason for lang in languages if (reason := sandbox.unavailable(lang)) is not None},
    }


def _run_chunk(programs: list[tuple[str, str]], limits: ExecutionLimits, isolation: str) -> list[dict]:
    sandbox = Sandbox(limits, isolation)
    return [sandbox.run(language, source).to_dict() for language, source in programs]


def probe_languages(languages: Sequence[str], limits: ExecutionLimits, isolation: str = "sandbox") -> dict:
    """{"isolation": description, "sandboxed": bool, "unavailable": {language: reason}}, found by a
    Ray task (so on a worker, where programs will run). `execution.SandboxUnavailable` when that
    worker cannot isolate programs and `isolation` is not "none"."""
    task = ray.remote(num_cpus=1)(_probe)
    try:
        return ray.get(task.remote(sorted(set(languages)), limits, isolation))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, SandboxUnavailable):  # the reason alone, not the worker's traceback
            raise SandboxUnavailable(str(err.cause)) from None
        raise


def judge_programs(
    programs: Sequence[tuple[str, str]],
    limits: ExecutionLimits,
    isolation: str = "sandbox",
    *,
    programs_per_task: int = 16,
    max_concurrent_tasks: int = 0,
) -> list[ExecutionResult]:
    """Run every (language, source) in the sandbox on Ray tasks of one CPU; results in order.

    max_concurrent_tasks: tasks in flight at once (0 = the cluster's CPUs), which bounds the
    programs running at once and so their memory."""
    unique: dict[tuple[str, str], int] = {}
    for program in programs:
        unique.setdefault(program, len(unique))
    distinct = list(unique)
    log.info("executing %d programs (%d distinct) in the sandbox", len(programs), len(distinct))
    chunks = [distinct[i : i + programs_per_task] for i in range(0, len(distinct), programs_per_task)]
    limit = max_concurrent_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1)(_run_chunk)
    results: list[list[dict] | None] = [None] * len(chunks)
    pending: dict = {}
    next_chunk, done_programs = 0, 0
    started = last_log = time.monotonic()
    while next_chunk < len(chunks) or pending:
        while next_chunk < len(chunks) and len(pending) < limit:
            pending[task.remote(chunks[next_chunk], limits, isolation)] = next_chunk
            next_chunk += 1
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY_S)
        for ref in ready:
            index = pending.pop(ref)
            results[index] = ray.get(ref)
            done_programs += len(chunks[index])
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
            log.info("execution: %d/%d distinct programs after %.0f s", done_programs, len(distinct), time.monotonic() - started)
            last_log = time.monotonic()
    flat = [ExecutionResult(**r) for chunk in results for r in chunk]
    log.info("execution: %d distinct programs in %.1f s", len(flat), time.monotonic() - started)
    return [flat[unique[program]] for program in programs]


def judge_completions(problems: Sequence[Problem], completions: list[dict], limits: ExecutionLimits, isolation: str = "sandbox", **fanout) -> list[dict]:
    """A verdict row per completion (`generation.Completion` as a dict): its program, built with
    the problem's tests, run in the sandbox. Completions the engine skipped (prompt too long) or
    failed get status "skipped" / "error" without running. fanout: `judge_programs` options."""
    by_key = {(p.language, p.name): p for p in problems}
    runnable = [c for c in completions if c["finish_reason"] not in ("skipped", "error")]
    programs = [(c["language"], by_key[(c["language"], c["problem"])].program(c["text"])) for c in runnable]
    results = iter(judge_programs(programs, limits, isolation, **fanout))
    verdicts = []
    for c in completions:
        row = {k: c[k] for k in ("label", "language", "problem", "sample", "finish_reason")}
        if c["finish_reason"] == "skipped":
            row.update(status="skipped", detail=c["error"])
        elif c["finish_reason"] == "error":
            row.update(status="error", detail=f"generation failed: {c['error']}")
        else:
            r = next(results)
            row.update(status=r.status, detail=r.detail, exit_code=r.exit_code, duration_s=r.duration_s, stderr=r.stderr[-STDERR_KEPT:])
        row["completion"] = c["text"]
        verdicts.append(row)
    return verdicts
