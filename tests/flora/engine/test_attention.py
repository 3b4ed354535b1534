"""Paged attention against its spec (`paged_attention_reference`, a float64 loop over queries):
random block tables, single-query sequences beside prefill chunks with and without cached keys,
grouped-query and multi-query heads; the PyTorch backend and the Triton kernel (on a CPU, in
Triton's interpreter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flora.engine.attention import (
    AttentionLayout, TorchPagedAttention, TritonPagedAttention, paged_attention_reference,
)
from flora.engine.kv_cache import KVPool
from flora.kernels import HAS_TRITON


def random_step(seed: int, heads: int, kv_heads: int, dim: int, bs: int, dtype=torch.float32):
    """A step of 4 single-query sequences and 3 chunks (one fresh, two after cached keys)."""
    rng = np.random.default_rng(seed)
    lens = [1, 5, 17, 40]  # single-query sequences: keys after the step
    chunks = [(0, 7), (9, 3), (30, 20)]  # (keys cached before, queries)
    seqs = [(n - 1, 1) for n in lens] + chunks
    num_blocks = 1 + sum(-(-(c + n) // bs) for c, n in seqs) + 3
    order = rng.permutation(np.arange(1, num_blocks))
    tables, used = [], 0
    for c, n in seqs:
        b = -(-(c + n) // bs)
        tables.append(order[used:used + b])
        used += b
    width = max(len(t) for t in tables)
    block_tables = np.zeros((len(seqs), width), dtype=np.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = t
    counts = np.array([n for _, n in seqs])
    query_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    seq_lens = np.array([c + n for c, n in seqs], dtype=np.int32)
    pos = np.concatenate([np.arange(c, c + n) for c, n in seqs])
    seq_of = np.repeat(np.arange(len(seqs)), counts)
    layout = AttentionLayout(
        query_start=query_start, seq_lens=seq_lens, block_tables=block_tables,
        write_block=block_tables[seq_of, pos // bs].astype(np.int64), write_offset=pos % bs,
        num_single=len(lens), max_query_len=int(counts.max()),
    )
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool.allocate(1, num_blocks, bs, kv_heads, dim, dtype, torch.device("cpu"))
    pool.keys[0].copy_(torch.randn(pool.keys[0].shape, generator=gen))  # cached keys (and junk elsewhere)
    pool.values[0].copy_(torch.randn(pool.values[0].shape, generator=gen))
    t = int(counts.sum())
    q, k, v = (torch.randn(t, h, dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
    return layout, pool, q, k, v


BACKENDS = [TorchPagedAttention()]
if HAS_TRITON:
    BACKENDS.append(TritonPagedAttention())


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("heads, kv_heads, dim, bs", [(4, 2, 16, 16), (6, 1, 24, 16), (2, 2, 32, 32)])
def test_paged_attention_equals_the_spec(backend, heads, kv_heads, dim, bs):
    layout, pool, q, k, v = random_step(0, heads, kv_heads, dim, bs)
    scale = dim ** -0.5
    step = backend.prepare(layout, pool, torch.device("cpu"))
    got = step.attend(0, q, k, v, scale)
    # the step wrote its keys and values where the layout says
    torch.testing.assert_close(pool.keys[0][torch.as_tensor(layout.write_block), :, torch.as_tensor(layout.write_offset)], k)
    expected = paged_attention_reference(q, pool.keys[0], pool.values[0], layout, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_in_half_precision(dtype):
    layout, pool, q, k, v = random_step(1, 4, 2, 16, 16, dtype)
    got = TritonPagedAttention().prepare(layout, pool, torch.device("cpu")).attend(0, q, k, v, 0.25)
    expected = paged_attention_reference(q, pool.keys[0], pool.values[0], layout, 0.25)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
