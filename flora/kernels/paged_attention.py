"""Paged attention in Triton: every query token of a packed step against its sequence's keys
in the block pool, decode tokens and prefill chunks in one launch.

Semantics (the spec is `flora.engine.attention.paged_attention_reference`):
    for each sequence s with queries q[query_start[s] : query_start[s+1]] (n of them) and
    seq_lens[s] keys in the pool (the last n of which are the queries' own), query i sits at
    position p = seq_lens[s] - n + i and attends to key positions 0..p:
        out[t, h] = softmax_k(scale · q[t, h] · K[k, h // G]) @ V[·, h // G]
    where key position k of sequence s is k_cache[block_tables[s, k // BS], :, k % BS].
Shapes: q, out [T, H, D]; k_cache, v_cache [num_blocks, Hkv, BS, D]; block_tables
    [S, max_blocks] int32; seq_lens [S] int32; query_start [S + 1] int32; G = H // Hkv.

One program computes a tile of up to BLOCK_Q consecutive queries of one sequence for all G
query heads that share one key/value head (BLOCK_M = BLOCK_Q·G rows, padded to at least 16 for
`tl.dot`), streaming the sequence's blocks once with an online softmax. Programs past a
sequence's last query return at once, so a step of decode rows (one query each) and a few long
prefill chunks is one launch over (sequences, query tiles, kv heads).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's interpreter multiplies bfloat16 operands of `tl.dot` wrongly (3.9); there the dots
# run on float32 copies. On a GPU the kernel keeps the model's dtype.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_bt,
    G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_D: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_begin = tl.load(query_start_ptr + seq)
    n_q = tl.load(query_start_ptr + seq + 1) - q_begin
    if tile * BLOCK_Q >= n_q:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - n_q  # keys cached before this step's first query

    rows = tl.arange(0, BLOCK_M)
    qi = tile * BLOCK_Q + rows // G  # query index within the sequence
    head = kv_head * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (qi < n_q)
    d = tl.arange(0, HEAD_D)
    d_ok = d < D
    token = q_begin + qi
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = context + qi
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    keys_needed = tl.minimum(context + (tile + 1) * BLOCK_Q, seq_len)
    slot = tl.arange(0, BS)
    for b in range(0, tl.cdiv(keys_needed, BS)):
        block = tl.load(block_tables_ptr + seq * stride_bt + b).to(tl.int64)
        k = tl.load(k_ptr + block * stride_kb + kv_head * stride_kh + slot[:, None] * stride_ks + d[None, :],
                    mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + block * stride_vb + kv_head * stride_vh + slot[:, None] * stride_vs + d[None, :],
                    mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        k_pos = b * BS + slot
        allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        s = tl.where(allowed, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet (padding rows)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """See the module docstring. `max_query_len`: the most queries of any one sequence (a host
    int: it sizes the launch grid, so a CUDA graph of decode steps captures it as 1)."""
    t, h, dim = q.shape
    _, kv_heads, bs, _ = k_cache.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads do not share {kv_heads} key/value heads evenly")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block size {bs}: the Triton kernel needs a power of two >= 16")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    g = h // kv_heads
    out = torch.empty_like(q) if out is None else out
    # Decode: one query per program. Prefill: enough queries per tile to fill a 64-row dot.
    block_q = 1 if max_query_len == 1 else max(1, min(16, 64 // g))
    block_m = max(16, triton.next_power_of_2(block_q * g))
    grid = (seq_lens.shape[0], triton.cdiv(max(max_query_len, 1), block_q), kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        G=g, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_D=triton.next_power_of_2(dim), D=dim, BS=bs,
        IEEE=q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16),
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
    )
    return out
