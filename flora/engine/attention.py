"""Attention over the paged KV pool for one packed step: decode tokens and prefill chunks together.

    layout = AttentionLayout(...)                    # host arrays, built once per step
    step = backend.prepare(layout, pool, device)     # device metadata, shared by every layer
    out = step.attend(layer, q, k, v, scale)         # writes k, v into the pool, then attends

Semantics (`paged_attention_reference` is the spec): the step's tokens are grouped by sequence,
`query_start[s] : query_start[s+1]` being sequence s's queries (n of them). After this step the
sequence has `seq_lens[s]` keys, the last n of which are the queries' own (written into the
pool first, at `write_block[t]`, offset `write_offset[t]`). Query i of the sequence sits at
position p = seq_lens[s] - n + i and attends causally to positions 0..p, read through the
sequence's block table. Sequences with a single query (decode rows, and the last token of a
prompt) come first: `num_single` of them.

Backends:
    TorchPagedAttention  any device, exact: single-query sequences in one segmented softmax
        over just their blocks (Σ len of work, no padding to the longest), prefill chunks one
        `scaled_dot_product_attention` each (causal over the chunk, or over the gathered
        prefix and chunk when keys were cached before). The CPU default.
    TritonPagedAttention one Triton launch for the whole step (`flora.kernels.paged_attention`);
        the CUDA default, and testable on a CPU under TRITON_INTERPRET=1.
Shapes: q [T, H, D]; k, v [T, Hkv, D]; pool layers [num_blocks, Hkv, block_size, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flora.engine.kv_cache import KVPool

BACKENDS = ("auto", "torch", "triton")


@dataclass
class AttentionLayout:
    """Where one packed step's queries sit and which keys they see (host arrays, int32/int64)."""

    query_start: np.ndarray  # [S + 1]
    seq_lens: np.ndarray  # [S]
    block_tables: np.ndarray  # [S, max blocks of any sequence in the step]
    write_block: np.ndarray  # [T]
    write_offset: np.ndarray  # [T]
    num_single: int  # sequences 0..num_single-1 have one query each
    max_query_len: int


class StepAttention:
    """A backend's device metadata for one step, bound to the pool; `attend` is called per layer."""

    def __init__(self, pool: KVPool, write_block: torch.Tensor, write_offset: torch.Tensor):
        self.pool = pool
        self.write_block = write_block
        self.write_offset = write_offset

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.pool.keys[layer], self.pool.values[layer]
        k_cache[self.write_block, :, self.write_offset] = k  # [T, Hkv, D] into their slots
        v_cache[self.write_block, :, self.write_offset] = v
        return self.compute(q, k, v, k_cache, v_cache, scale)

    def compute(self, q, k, v, k_cache, v_cache, scale) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- PyTorch ops


class TorchPagedAttention:
    name = "torch"

    def __init__(self):
        self._workspace: dict[str, torch.Tensor] = {}  # gathered blocks, reused by every step and layer

    def prepare(self, layout: AttentionLayout, pool: KVPool, device: torch.device) -> StepAttention:
        return _TorchStep(layout, pool, device, self._buffer)

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A `shape` view of a buffer that only grows (what one step gathers, the next reuses)."""
        need = 1
        for n in shape:
            need *= n
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            buf = self._workspace[name] = torch.empty(max(need, 1), dtype=dtype, device=device)
        return buf[:need].view(shape)


class _TorchStep(StepAttention):
    def __init__(self, layout: AttentionLayout, pool: KVPool, device: torch.device, buffer):
        def dev(a, dtype=torch.long):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        super().__init__(pool, dev(layout.write_block), dev(layout.write_offset))
        bs = pool.keys[0].shape[2] if pool.keys else 1
        d = layout.num_single
        self.num_single = d
        if d:
            # One (sequence, block) pair per block a single-query sequence reads, with a 0/-inf
            # bias over the block's slots that hold none of its keys (the tail of the last one).
            lens = layout.seq_lens[:d]
            blocks = -(-lens // bs)  # [D]
            used = np.arange(int(blocks.max()))[None, :] < blocks[:, None]  # [D, width]
            pair_row, index = np.nonzero(used)  # [P]: the sequence, and the block's index in its table
            valid = np.minimum(bs, lens[pair_row] - index * bs)  # keys in the block
            bias = np.where(np.arange(bs)[None, :] < valid[:, None], np.float32(0), np.float32(-np.inf))
            self.pair_row = dev(pair_row)
            self.pair_block = dev(layout.block_tables[:d, : used.shape[1]][used])
            self.pair_bias = torch.from_numpy(bias).to(device)[:, None, None, :]  # [P, 1, 1, bs]
            shape = (len(pair_row), *pool.keys[0].shape[1:])
            self.gathered = [buffer(name, shape, pool.keys[0].dtype, device) for name in ("keys", "values")]
        # Prefill chunks: (first token, queries, keys cached before them, their blocks).
        self.chunks = []
        for s in range(d, len(layout.seq_lens)):
            lo, hi = int(layout.query_start[s]), int(layout.query_start[s + 1])
            keys = int(layout.seq_lens[s])
            context = keys - (hi - lo)
            blocks = dev(layout.block_tables[s, : -(-keys // bs)]) if context else None
            self.chunks.append((lo, hi, context, blocks))

    def compute(self, q, k, v, k_cache, v_cache, scale):
        out = torch.empty_like(q)
        d = self.num_single
        if d:
            out[:d] = self._single(q[:d], k_cache, v_cache, scale)
        for lo, hi, context, blocks in self.chunks:
            out[lo:hi] = self._chunk(q[lo:hi], k[lo:hi], v[lo:hi], context, blocks, k_cache, v_cache, scale)
        return out

    def _single(self, q, k_cache, v_cache, scale):
        """One query per sequence: a softmax over the blocks of each, segmented by sequence."""
        d, h, dim = q.shape
        kv_heads = k_cache.shape[1]
        g = h // kv_heads
        row = self.pair_row
        kb = torch.index_select(k_cache, 0, self.pair_block, out=self.gathered[0])  # [P, Hkv, bs, D]
        vb = torch.index_select(v_cache, 0, self.pair_block, out=self.gathered[1])
        qp = q.view(d, kv_heads, g, dim).index_select(0, row)  # [P, Hkv, G, D]
        s = torch.matmul(qp, kb.transpose(-1, -2)).float()  # [P, Hkv, G, bs]
        s.mul_(scale).add_(self.pair_bias)
        block_max = s.amax(-1)  # [P, Hkv, G]
        row_max = torch.full((d, kv_heads, g), float("-inf"), device=q.device).scatter_reduce_(
            0, row[:, None, None].expand_as(block_max), block_max, "amax"
        )  # [D, Hkv, G]
        p = s.sub_(row_max.index_select(0, row).unsqueeze(-1)).exp_()  # [P, Hkv, G, bs]
        denom = torch.zeros(d, kv_heads, g, device=q.device).index_add_(0, row, p.sum(-1))
        o = torch.matmul(p.to(vb.dtype), vb)  # [P, Hkv, G, D]
        acc = torch.zeros(d, kv_heads, g, dim, device=q.device, dtype=torch.float32).index_add_(0, row, o.float())
        return acc.div_(denom.unsqueeze(-1)).to(q.dtype).view(d, h, dim)

    def _chunk(self, q, k, v, context, blocks, k_cache, v_cache, scale):
        """A prefill chunk: causal over its own keys, after the `context` keys cached before it."""
        n = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if not context:
            kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:
            keys = context + n
            kv_heads, dim = k_cache.shape[1], k_cache.shape[3]
            kh = k_cache.index_select(0, blocks).transpose(0, 1).reshape(kv_heads, -1, dim)[None, :, :keys]
            vh = v_cache.index_select(0, blocks).transpose(0, 1).reshape(kv_heads, -1, dim)[None, :, :keys]
            pos = torch.arange(keys, device=q.device)
            mask = pos[None, :] <= (context + torch.arange(n, device=q.device))[:, None]  # [n, keys]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)  # [n, H, D]


# --------------------------------------------------------------------------- Triton


class TritonPagedAttention:
    name = "triton"

    def prepare(self, layout: AttentionLayout, pool: KVPool, device: torch.device) -> StepAttention:
        return _TritonStep(layout, pool, device)


class _TritonStep(StepAttention):
    def __init__(self, layout: AttentionLayout, pool: KVPool, device: torch.device, buffers: dict | None = None):
        def dev(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        super().__init__(pool, dev(layout.write_block, torch.long), dev(layout.write_offset, torch.long))
        self.query_start = dev(layout.query_start, torch.int32)
        self.seq_lens = dev(layout.seq_lens, torch.int32)
        self.block_tables = dev(layout.block_tables, torch.int32)
        self.max_query_len = layout.max_query_len

    def compute(self, q, k, v, k_cache, v_cache, scale):
        from flora.kernels.paged_attention import paged_attention

        return paged_attention(q.contiguous(), k_cache, v_cache, self.block_tables, self.seq_lens,
                               self.query_start, scale, self.max_query_len)


def select_backend(name: str, device: torch.device):
    """`auto`: Triton on CUDA when it is installed, else the PyTorch ops."""
    if name not in BACKENDS:
        raise ValueError(f"attention={name!r}: choose one of {BACKENDS}")
    if name == "auto":
        from flora.kernels import HAS_TRITON

        name = "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if name == "triton":
        from flora.kernels import HAS_TRITON

        if not HAS_TRITON:
            raise ValueError("attention='triton' needs Triton: pip install triton (or attention='torch')")
        return TritonPagedAttention()
    return TorchPagedAttention()


# --------------------------------------------------------------------------- the spec


def paged_attention_reference(q, k_cache, v_cache, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """The semantics above as a loop over sequences and queries, in float64 (keys already written)."""
    out = torch.empty_like(q)
    h, kv_heads, bs = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    g = h // kv_heads
    for s in range(len(layout.seq_lens)):
        lo, hi, keys = int(layout.query_start[s]), int(layout.query_start[s + 1]), int(layout.seq_lens[s])
        pos = np.arange(keys)
        blocks = torch.as_tensor(layout.block_tables[s][pos // bs], dtype=torch.long)
        offsets = torch.as_tensor(pos % bs)
        kk = k_cache[blocks, :, offsets].double()  # [keys, Hkv, D]
        vv = v_cache[blocks, :, offsets].double()
        for i, t in enumerate(range(lo, hi)):
            p = keys - (hi - lo) + i
            for head in range(h):
                w = torch.softmax(kk[: p + 1, head // g] @ q[t, head].double() * scale, 0)
                out[t, head] = (w @ vv[: p + 1, head // g]).to(q.dtype)
    return out
