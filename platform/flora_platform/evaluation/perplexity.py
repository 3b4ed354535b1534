"""Held-out perplexity per (adapter, language), every adapter's rows in shared batches.

    scores = heldout_perplexity(model, blocks, [("flora-perl/3", "perl"), (None, "perl")], batch_size=8)
    scores[("flora-perl/3", "perl")]  # {"loss": 1.93, "perplexity": 6.9, "tokens": 4064}

Semantics: for a pair (adapter a, language g) with held-out blocks X_g [N, L],
    loss = mean over every block n and position t < L-1 of  -log p_a(X[n, t+1] | X[n, :t+1])
    perplexity = exp(loss)
the model routed through adapter a (None = the base model). Rows of all pairs are packed into
batches of `batch_size` in order, each routed through its own adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import flora
from flora_platform.data import pack_blocks
from flora_platform.prepare import spread
from flora_platform.train import per_row_token_losses


def heldout_blocks(heldout_docs: dict[str, list[str]], tokenizer, seq_len: int, n_blocks: int) -> dict[str, torch.Tensor]:
    """language -> [n_blocks, seq_len]: the held-out documents packed and `n_blocks` picked as
    the fine-tuning job picks them (`prepare.spread`), so that its held-out numbers and these
    agree for the same data settings, seq_len and number of blocks."""
    return {lang: spread(b, n_blocks) for lang, b in pack_blocks(heldout_docs, tokenizer, seq_len).items()}


@torch.no_grad()
def heldout_perplexity(
    model, blocks: dict[str, torch.Tensor], pairs: Sequence[tuple[str | None, str]], batch_size: int
) -> dict[tuple[str | None, str], dict[str, float]]:
    """blocks: language -> LongTensor [N, L] (`flora_platform.data.pack_blocks`). The model
    needs adapter banks (`flora.inject`) with every named adapter loaded when any pair names one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    missing = sorted({lang for _, lang in pairs} - set(blocks))
    if missing:
        raise ValueError(f"no held-out blocks for {missing}; languages with blocks: {sorted(blocks)}")
    rows = [(i, block) for i, (_, lang) in enumerate(pairs) for block in blocks[lang]]  # (pair, [L])
    sums = torch.zeros(len(pairs), 2, dtype=torch.float64)  # (summed token loss, tokens)
    device = model.get_input_embeddings().weight.device
    routed = any(label is not None for label, _ in pairs)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = torch.stack([block for _, block in chunk]).to(device)  # [B, L]
        if routed:
            with flora.route(model, [pairs[i][0] for i, _ in chunk]):
                losses = per_row_token_losses(model(input_ids=ids).logits, ids)  # [B]
        else:
            losses = per_row_token_losses(model(input_ids=ids).logits, ids)
        for (i, _), loss in zip(chunk, losses.double().cpu()):
            sums[i, 0] += loss
            sums[i, 1] += ids.shape[1] - 1
    out = {}
    for i, pair in enumerate(pairs):
        loss = (sums[i, 0] / sums[i, 1]).item()
        out[pair] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(sums[i, 1].item())}
    return out
