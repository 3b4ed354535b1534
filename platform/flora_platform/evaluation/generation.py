"""Completions for MultiPL-E problems from the flora engine, every adapter in shared batches.

    completions = generate_completions(model, tokenizer, jobs, n_samples=20, temperature=0.1, ...)

`jobs` pairs an adapter label (or None for the base model) with a problem; every adapter named
must be loaded in the model's banks already. Requests are queued
problem by problem, sample by sample, adapter by adapter, so each engine step decodes rows of
many adapters at once. Each sample has its own seed (from the evaluation seed, adapter, problem
and sample index): a rerun gives the same completions whatever else is in the batch. A
completion is the decoded output cut before the first of the problem's stop tokens.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from flora.engine import Engine, EngineConfig, Request, SamplingParams
from flora_platform.evaluation.problems import Problem, truncate_at_stop

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class Completion:
    label: str  # adapter label, or "base"
    problem: str
    language: str
    sample: int
    text: str  # cut at the first stop token
    finish_reason: str  # the engine's: stop | length | error | skipped (prompt too long)
    new_tokens: int
    error: str = ""


def sample_seed(seed: int, label: str, problem: Problem, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}|{label}|{problem.language}|{problem.name}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # 62 bits, as the engine's own seeds


def generate_completions(
    model,
    tokenizer,
    jobs: Sequence[tuple[str | None, Problem]],
    *,
    n_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    engine_config: EngineConfig,
    base_label: str = "base",
) -> list[Completion]:
    """`n_samples` completions per job, from one engine over `model`. Problems whose prompt
    leaves no room in the model's context are skipped (finish_reason "skipped")."""
    engine = Engine(
        model, config=engine_config,
        detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
    )
    prompts = {}
    for _, p in jobs:
        if (p.language, p.name) not in prompts:
            ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
            prompts[(p.language, p.name)] = ids
    skipped, requests, keys = [], [], []
    for sample in range(n_samples):
        for label, p in jobs:
            name = label or base_label
            prompt = prompts[(p.language, p.name)]
            if len(prompt) >= engine.context_len:
                skipped.append(Completion(name, p.name, p.language, sample, "", "skipped", 0, f"prompt of {len(prompt)} tokens fills the context of {engine.context_len}"))
                continue
            sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=sample_seed(seed, name, p, sample)) if temperature > 0 else SamplingParams()
            requests.append(Request(prompt, adapter=label, max_new_tokens=max_new_tokens, sampling=sampling, stop_strings=p.stop_tokens))
            keys.append((name, p, sample))
    if skipped:
        log.warning("%d requests skipped: their prompts do not fit the model's context", len(skipped))
    outputs = _run(engine, requests)
    completions = list(skipped)
    for (name, p, sample), out in zip(keys, outputs):
        ids = [t for t in out.output_ids if t not in engine.eos_token_ids]
        text = truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), p.stop_tokens)
        completions.append(Completion(name, p.name, p.language, sample, text, out.finish_reason, len(out.output_ids), out.error or ""))
    return completions


def _run(engine: Engine, requests: list[Request]):
    """Like `engine.generate`, with the engine on its own thread and progress logged meanwhile."""
    started = time.monotonic()
    engine.start()
    try:
        handles = [engine.add_request(r) for r in requests]
        for handle in handles:
            while True:
                try:
                    handle.result(timeout_s=PROGRESS_EVERY_S)
                    break
                except TimeoutError:
                    rate = engine.metrics.snapshot()["tokens_per_s"]
                    done = sum(h.done for h in handles)
                    log.info("generation: %d/%d completions after %.0f s, %.0f tokens/s", done, len(handles), time.monotonic() - started, rate)
        outputs = [h.result() for h in handles]
    finally:
        engine.close()
    tokens = sum(len(o.output_ids) for o in outputs)
    log.info("generation: %d completions, %d tokens in %.1f s", len(outputs), tokens, time.monotonic() - started)
    return outputs
