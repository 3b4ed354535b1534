"""Choosing the next token of every row from its logits: pure functions, one row's own
sampling parameters and random stream each.

Shapes: N rows, V vocabulary. Filtering follows Hugging Face's warpers in their order
(temperature, top-k, top-p), so they are the independent reference in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.engine.request import SamplingParams


def warp_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The sampling distribution's logits: filtered-out tokens are -inf.

    Semantics, per row n:
        z = logits[n] / temperature[n]
        if top_k[n] > 0: z[v] = -inf where z[v] < (the top_k[n]-th largest z)     (ties kept)
        if top_p[n] < 1: sort z ascending, p = softmax; drop the tokens whose cumulative
            probability is <= 1 - top_p[n], always keeping the most probable one
    Shapes: logits [N, V]; temperature [N] (> 0); top_k [N] long (0 = off); top_p [N] (1 = off).
    Returns float32 [N, V].
    """
    z = logits.float() / temperature.float()[:, None]  # [N, V]
    k = top_k.clamp(min=0, max=z.shape[-1])
    if bool((k > 0).any()):
        sorted_desc = z.sort(dim=-1, descending=True).values  # [N, V]
        kth = sorted_desc.gather(1, (k - 1).clamp(min=0)[:, None])  # [N, 1]
        z = torch.where((k[:, None] > 0) & (z < kth), float("-inf"), z)
    if bool((top_p < 1).any()):
        sorted_z, order = z.sort(dim=-1)  # ascending, [N, V]
        cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        remove = cum <= (1 - top_p.float())[:, None]
        remove[:, -1] = False  # keep the most probable token
        z = z.scatter(1, order, sorted_z.masked_fill(remove, float("-inf")))
    return z


def sample_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The next token of each row: argmax for greedy rows, else one draw from its own generator.

    logits [N, V]; params and generators one per row (a generator is needed for non-greedy rows).
    Each non-greedy row consumes exactly one draw of its generator per call, so a seeded request
    gets the same tokens whatever the other rows are.
    """
    tokens = logits.argmax(dim=-1).tolist()  # [N]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    ps = [params[i] for i in sampled]
    warped = warp_logits(
        logits.index_select(0, rows),
        torch.tensor([p.temperature for p in ps], device=logits.device),
        torch.tensor([p.top_k for p in ps], device=logits.device),
        torch.tensor([p.top_p for p in ps], device=logits.device),
    )
    probs = warped.softmax(dim=-1)  # [n, V]
    for j, i in enumerate(sampled):
        generator = generators[i]
        if generator is None:
            raise ValueError(f"row {i} samples (temperature {params[i].temperature}) but has no generator")
        tokens[i] = int(torch.multinomial(probs[j], 1, generator=generator))
    return tokens


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int | None]
) -> list[tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Per row: the chosen token's log-probability under the raw logits and the `top[n]` best
    alternatives as (token id, log-prob), or None where `top[n]` is None. logits [N, V]."""
    wanted = [i for i, k in enumerate(top) if k is not None]
    out: list = [None] * len(tokens)
    if not wanted:
        return out
    rows = torch.tensor(wanted, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)  # [n, V]
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None])[:, 0].tolist()
    kmax = max(top[i] for i in wanted)
    best_p, best_i = logp.topk(kmax, dim=-1) if kmax > 0 else (logp[:, :0], logp[:, :0].long())
    best_p, best_i = best_p.tolist(), best_i.tolist()
    for j, i in enumerate(wanted):
        k = top[i]
        out[i] = (chosen[j], tuple(zip(best_i[j][:k], best_p[j][:k])))
    return out


def new_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
