"""The Triton adapter kernels against the ops' reference loops (the spec): FLoRA/IA3/base in one
matmul and LoRA over grouped tokens, for ranks 1-16, the five slot-popularity patterns of Punica's
tests, packed tokens, column ranges of a fused projection, float32/16 and bfloat16, odd sizes.
On a CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flora import ops
from flora.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

S = 9  # slots, 0 = the base model
K, N = 72, 90  # odd sizes: neither is a multiple of the kernels' blocks


def popularity(pattern: str, t: int, gen: torch.Generator) -> torch.Tensor:
    """Punica's adapter popularity patterns over S-1 adapters, plus base-model rows."""
    if pattern == "identical":
        s = torch.full((t,), 3)
    elif pattern == "distinct":
        s = torch.arange(t) % (S - 1) + 1
    elif pattern == "uniform":
        s = torch.randint(0, S, (t,), generator=gen)
    elif pattern == "zipf":
        p = 1.0 / torch.arange(1, S + 1).double()
        s = torch.multinomial(p / p.sum(), t, replacement=True, generator=gen)
    else:  # skewed: one adapter takes most tokens
        s = torch.where(torch.rand(t, generator=gen) < 0.8, torch.tensor(5), torch.randint(0, S, (t,), generator=gen))
    return s.long()


def bank(rank: int, dout: int, gen: torch.Generator, dtype: torch.dtype):
    """FLoRA factors with the base model (slot 0) as the identity and zero rank padding."""
    a = torch.randn(S, rank, dout, generator=gen) * 0.5 + 1
    b = torch.randn(S, rank, K, generator=gen) * 0.5 + 1
    a[0], b[0] = 0, 0
    a[0, 0], b[0, 0] = 1, 1
    if rank > 1:  # slot 2 is a rank-1 adapter in a bank of higher rank
        a[2, 1:], b[2, 1:] = 0, 0
    return a.to(dtype), b.to(dtype)


def reference_flora(x, w0, bias, a, b, slots, rank, columns, scales_bias=None):
    lo, hi = columns
    x64, w64 = x.double(), w0.double()
    b64 = None if bias is None else bias.double()
    y = F.linear(x64, w64, b64)
    gain = None
    if scales_bias is not None and bias is not None:
        gain = torch.where(scales_bias[:, None], a[:, 0].double(), 1.0)
    y[:, lo:hi] = ops.flora_linear_reference(x64, w64[lo:hi], None if b64 is None else b64[lo:hi], a.double(),
                                             b.double(), slots, rank=rank, gain=gain)
    return y


TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("rank", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("pattern", ["identical", "distinct", "uniform", "zipf", "skewed"])
def test_flora_kernel_equals_the_reference(rank, pattern):
    from flora.kernels.flora_linear import flora_linear_fused

    gen = torch.Generator().manual_seed(rank * 10 + len(pattern))
    t = 37
    x = torch.randn(t, K, generator=gen)
    w0 = torch.randn(N, K, generator=gen) / K ** 0.5
    bias = torch.randn(N, generator=gen)
    columns = (10, 70)  # a range inside a fused projection
    a, b = bank(rank, columns[1] - columns[0], gen, torch.float32)
    slots = popularity(pattern, t, gen)
    got = flora_linear_fused(x, w0, bias, a, b, slots, rank, columns)
    expected = reference_flora(x, w0, bias, a, b, slots, rank, columns)
    torch.testing.assert_close(got.double(), expected, atol=TOL[torch.float32] * 10, rtol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 5, 40])
def test_flora_kernel_half_precision_and_token_counts(dtype, t):
    from flora.kernels.flora_linear import flora_linear_fused

    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, K, generator=gen).to(dtype)
    w0 = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    a, b = bank(4, N, gen, dtype)
    slots = popularity("uniform", t, gen)
    got = flora_linear_fused(x, w0, None, a, b, slots, 4)  # a whole layer, no bias
    expected = reference_flora(x, w0, None, a, b, slots, 4, (0, N))
    scale = expected.abs().max()
    assert (got.double() - expected).abs().max() / scale < TOL[dtype]


def test_ia3_bias_gain_and_an_empty_range_edge():
    """IA3 output scaling multiplies the bias too (slots flagged in scales_bias); a range that starts
    at column 0 and one that ends at the last column."""
    from flora.kernels.flora_linear import flora_linear_fused

    gen = torch.Generator().manual_seed(7)
    t = 23
    x = torch.randn(t, K, generator=gen)
    w0 = torch.randn(N, K, generator=gen) / K ** 0.5
    bias = torch.randn(N, generator=gen)
    scales_bias = torch.zeros(S, dtype=torch.bool)
    scales_bias[[4, 6]] = True
    slots = popularity("uniform", t, gen)
    for columns in ((0, 64), (26, N)):
        a, b = bank(1, columns[1] - columns[0], gen, torch.float32)
        got = flora_linear_fused(x, w0, bias, a, b, slots, 1, columns, scales_bias=scales_bias)
        expected = reference_flora(x, w0, bias, a, b, slots, 1, columns, scales_bias=scales_bias)
        torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=2e-5)


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("pattern", ["identical", "distinct", "zipf", "skewed"])
def test_lora_kernel_equals_the_reference(rank, pattern):
    from flora.kernels.lora import LoraTiles, lora_add_fused

    gen = torch.Generator().manual_seed(100 + rank)
    t = 41
    x = torch.randn(t, K, generator=gen)
    lora_a = torch.randn(S, rank, K, generator=gen) / K ** 0.5
    lora_b = torch.randn(S, rank, N - 20, generator=gen)
    lora_a[0], lora_b[0] = 0, 0
    slots = popularity(pattern, t, gen)
    lora_slots = [s for s in range(1, S) if s != 7]  # slot 7 rows: an adapter without a LoRA term
    y = torch.randn(t, N, generator=gen)
    expected = y.double().clone()
    has_lora = torch.tensor([int(s) in lora_slots for s in slots])
    delta = ops.lora_delta_reference(x.double(), lora_a.double(), lora_b.double(), slots)
    expected[:, 12:12 + N - 20] += delta * has_lora[:, None]
    tiles = LoraTiles.build(slots.numpy(), lora_slots, x.device)
    got = lora_add_fused(y, x, lora_a, lora_b, rank, tiles, col_offset=12)
    assert got is y
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


def test_lora_tiles_group_tokens_by_slot():
    from flora.kernels.lora import BLOCK_M, LoraTiles

    slots = np.array([3, 1, 3, 0, 3] + [5] * (BLOCK_M + 3) + [1])
    tiles = LoraTiles.build(slots, [1, 3, 5], torch.device("cpu"))
    order, slot, start, end = (v.numpy() for v in (tiles.order, tiles.slot, tiles.start, tiles.end))
    assert slot.tolist() == [1, 3, 5, 5]  # slot 5 needs two tiles; slot 0 (no LoRA) none
    for s, lo, hi in zip(slot, start, end):
        assert 0 < hi - lo <= BLOCK_M and (slots[order[lo:hi]] == s).all()
    assert sorted(order.tolist()) == [i for i, s in enumerate(slots) if s != 0]
