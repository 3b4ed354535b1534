"""Choosing the next token of every row at once, on the device: pure functions over the batch.

Shapes: N rows, V vocabulary. Filtering follows Hugging Face's warpers in their order
(temperature, top-k, top-p), so they are the independent reference in the tests.

Randomness without per-row generators: a row's draw is a counter-based hash of its request's
seed and the index of the token being drawn (`uniform`), turned into a token by inverting the
row's cumulative distribution. A seeded request therefore gets the same tokens whatever else is
in the batch, and whichever step or batch position its tokens come in; there is no generator
state to keep, and no Python per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """The sampling parameters of the rows that draw a token this step (host arrays, one per row).

    greedy [N] bool; logprobs [N]: -1 = none, else the number of alternatives wanted. Unless
    every row is greedy: temperature [N] (ignored where greedy); top_k [N] (0 = off); top_p [N]
    (1 = off); seed [N] (0 <= seed < 2**63); draw [N]: index of the token being drawn in its
    request's output.
    """

    greedy: np.ndarray
    logprobs: np.ndarray
    temperature: np.ndarray | None = None
    top_k: np.ndarray | None = None
    top_p: np.ndarray | None = None
    seed: np.ndarray | None = None
    draw: np.ndarray | None = None

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())

    @property
    def max_logprobs(self) -> int:
        """-1 when no row wants log-probabilities."""
        return int(self.logprobs.max(initial=-1))


@dataclass
class Sampled:
    """One step's picks, read back in one device-to-host copy. logprob [N] and top_ids / top_logprobs
    [N, k] exist when some row asked for log-probabilities (`k` = the most asked for)."""

    tokens: np.ndarray
    logprob: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def sample(logits: torch.Tensor, batch: SamplingBatch) -> Sampled:
    """Tokens for every row of `logits` [N, V] (and log-probabilities where asked), on the host."""
    device = logits.device
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [N]
    if not batch.all_greedy:
        def dev(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        greedy = dev(batch.greedy, torch.bool)
        temperature = torch.where(greedy, 1.0, dev(batch.temperature, torch.float32))
        drawn = draw_tokens(
            logits, temperature, dev(batch.top_k, torch.long), dev(batch.top_p, torch.float32),
            dev(batch.seed, torch.long), dev(batch.draw, torch.long),
            use_top_k=bool((batch.top_k > 0).any()), use_top_p=bool((batch.top_p < 1).any()),
        )
        tokens = torch.where(greedy, tokens, drawn)
    k = batch.max_logprobs
    if k < 0:
        return Sampled(tokens.cpu().numpy())
    logp = torch.log_softmax(logits, dim=-1)  # [N, V], of the raw logits
    chosen = logp.gather(1, tokens[:, None])  # [N, 1]
    best_p, best_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0])
    packed = torch.cat([tokens[:, None].double(), chosen.double(), best_i.double(), best_p.double()], dim=1).cpu().numpy()
    return Sampled(
        tokens=packed[:, 0].astype(np.int64), logprob=packed[:, 1],
        top_ids=packed[:, 2:2 + k].astype(np.int64), top_logprobs=packed[:, 2 + k:],
    )


def draw_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seed: torch.Tensor, draw: torch.Tensor, *, use_top_k: bool = True, use_top_p: bool = True,
) -> torch.Tensor:
    """One draw per row from softmax(warp_logits(...)), by inverting its cumulative distribution at
    `uniform(seed, draw)`. Tokens the filters removed (probability 0) are never drawn."""
    warped = warp_logits(logits, temperature, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
    cdf = warped.softmax(dim=-1).double().cumsum_(dim=-1)  # [N, V]
    u = uniform(seed, draw) * cdf[:, -1]  # [N]
    picked = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    return picked.clamp_(max=logits.shape[-1] - 1)


def warp_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    *, use_top_k: bool = True, use_top_p: bool = True,
) -> torch.Tensor:
    """The sampling distribution's logits: filtered-out tokens are -inf.

    Semantics, per row n:
        z = logits[n] / temperature[n]
        if top_k[n] > 0: z[v] = -inf where z[v] < (the top_k[n]-th largest z)     (ties kept)
        if top_p[n] < 1: sort z ascending, p = softmax; drop the tokens whose cumulative
            probability is <= 1 - top_p[n], always keeping the most probable one
    Shapes: logits [N, V]; temperature [N] (> 0); top_k [N] long (0 = off); top_p [N] (1 = off).
    use_top_k / use_top_p: whether any row filters so (known on the host: no device read here).
    Returns float32 [N, V].
    """
    z = logits.float() / temperature.float()[:, None]  # [N, V]
    if use_top_k:
        k = top_k.clamp(min=0, max=z.shape[-1])
        sorted_desc = z.sort(dim=-1, descending=True).values  # [N, V]
        kth = sorted_desc.gather(1, (k - 1).clamp(min=0)[:, None])  # [N, 1]
        z = torch.where((k[:, None] > 0) & (z < kth), float("-inf"), z)
    if use_top_p:
        sorted_z, order = z.sort(dim=-1)  # ascending, [N, V]
        cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        remove = cum <= (1 - top_p.float())[:, None]
        remove[:, -1] = False  # keep the most probable token
        z = z.scatter(1, order, sorted_z.masked_fill(remove, float("-inf")))
    return z


def uniform(seed: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """A uniform float64 in [0, 1) per row, a fixed function of (seed, draw): 53 random bits.

    Integer hashing on 32-bit lanes held in int64 tensors, written so that no intermediate
    exceeds 2**49 (no signed overflow on any device).
    """
    h = _mix32((draw & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (seed & _M32))
    h = _mix32(h ^ ((seed >> 32) & _M32))
    hi = _mix32(h ^ 0x68E31DA4) >> 5  # 27 bits
    lo = _mix32(h ^ 0xB5297A4D) >> 6  # 26 bits
    return (hi * (1 << 26) + lo).double() / float(1 << 53)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply), x in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2**32 for x < 2**32, in two 16-bit halves of c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32
