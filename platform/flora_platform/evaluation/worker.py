"""What the evaluation does with the model, in one Ray task: load the base model, put the
adapters into banks (one group of shared batches per compatible set, see `adapters.bank_groups`),
measure held-out perplexity, and generate every completion with the engine.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch

import flora
from flora.engine import EngineConfig
from flora_platform.base_model import load_base
from flora_platform.evaluation.adapters import bank_groups
from flora_platform.evaluation.config import GenerationConfig, PerplexityConfig, SamplingConfig
from flora_platform.evaluation.generation import generate_completions
from flora_platform.evaluation.perplexity import heldout_perplexity
from flora_platform.evaluation.problems import Problem

log = logging.getLogger(__name__)


def score_models(
    base_path: str,
    adapters: dict[str, flora.Adapter],
    jobs: list[tuple[str | None, Problem]],
    heldout_blocks: dict[str, torch.Tensor],
    perplexity_pairs: list[tuple[str | None, str]],
    sampling: SamplingConfig,
    generation: GenerationConfig,
    perplexity: PerplexityConfig,
) -> dict:
    """{"completions": [Completion as dict], "perplexity": [{"label", "language", "loss", ...}]}.

    jobs / perplexity_pairs name adapters by label (None = the base model)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(generation.num_cpus)
    model, tokenizer = load_base(base_path, dtype=getattr(torch, generation.dtype) if generation.dtype else None)
    model.to("cuda" if generation.use_gpu else "cpu").eval()
    completions, scores = [], []
    for i, (group_model, labels) in enumerate(bank_groups(model, adapters)):
        for label in labels:
            flora.banks_of(group_model).load(label, adapters[label])
        members = set(labels) | ({None} if i == 0 else set())  # the base model runs with the first group
        pairs = [p for p in perplexity_pairs if p[0] in members]
        if pairs and perplexity.enabled:
            for (label, lang), s in heldout_perplexity(group_model, heldout_blocks, pairs, perplexity.batch_size).items():
                scores.append({"label": label or "base", "language": lang, **s})
        group_jobs = [j for j in jobs if j[0] in members]
        if group_jobs:
            completions += generate_completions(
                group_model, tokenizer, group_jobs, n_samples=sampling.n_samples, temperature=sampling.temperature,
                top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, seed=sampling.seed,
                engine_config=EngineConfig(max_batch_rows=generation.max_batch_rows, max_batch_tokens=generation.max_batch_tokens),
            )
    return {"completions": [asdict(c) for c in completions], "perplexity": scores}
