"""LoRA for a batch of mixed adapters in one launch: shrink and expand over tokens grouped by slot.

Semantics (the spec is `flora.ops.lora_delta_reference`): for token t with slot s,
    y[t, col_offset + n] += Σ_r lora_b[s, r, n] · Σ_k lora_a[s, r, k] · x[t, k]
added onto `y` (the base layer's output) in place.
Shapes: x [T, K]; lora_a [S, R, K]; lora_b [S, R, N]; y [T, >= col_offset + N].

The tokens come grouped by adapter (`LoraTiles`, built once per forward on the host and shared by
every layer): `order` lists token indices slot by slot, and each tile is up to BLOCK_M of them
with one slot. One program per tile computes its tokens' rank-R projection (the shrink, a dot
over K) and, with it still in registers, the expansion over every output block, adding into y.
Like vLLM's `lora_shrink`/`lora_expand` and SGLang's chunked SGMV, but both halves in one kernel:
no per-adapter Python loop, no intermediate buffer, no device read. Tokens of slots without a
LoRA term are in no tile and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from flora.kernels.paged_attention import INTERPRETED

BLOCK_M = 16


@dataclass
class LoraTiles:
    """Tokens grouped by LoRA slot, in tiles of at most BLOCK_M tokens of one slot (device tensors)."""

    order: torch.Tensor  # [T'] token indices, slot by slot
    slot: torch.Tensor  # [tiles]
    start: torch.Tensor  # [tiles] first position in `order`
    end: torch.Tensor  # [tiles] one past the last
    tokens: int  # T: the tokens these tiles index into

    @classmethod
    def build(cls, host_slots: np.ndarray, lora_slots, device: torch.device) -> LoraTiles:
        """From the tokens' slots on the host ([T]) and the slots that have a LoRA term."""
        lora_slots = np.asarray(list(lora_slots), dtype=np.int64)
        keep = np.flatnonzero(np.isin(host_slots, lora_slots))
        order = keep[np.argsort(host_slots[keep], kind="stable")]
        ordered = host_slots[order]
        seg_lo = np.searchsorted(ordered, lora_slots, side="left")
        seg_hi = np.searchsorted(ordered, lora_slots, side="right")
        per_seg = -(-(seg_hi - seg_lo) // BLOCK_M)  # tiles per slot
        tile_seg = np.repeat(np.arange(len(lora_slots)), per_seg)
        first = np.repeat(np.cumsum(per_seg) - per_seg, per_seg)
        start = seg_lo[tile_seg] + (np.arange(len(tile_seg)) - first) * BLOCK_M
        end = np.minimum(start + BLOCK_M, seg_hi[tile_seg])

        def dev(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)

        return cls(dev(order), dev(lora_slots[tile_seg]), dev(start), dev(end), len(host_slots))


@triton.jit
def _lora_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
    K, N, R, col_offset,
    stride_xt, stride_as, stride_ar, stride_bs, stride_br, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tile_slot_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    token = tl.load(order_ptr + rows, mask=row_ok, other=0)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R

    # shrink: h = x A^T over K, [BLOCK_M, BLOCK_R]
    h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token[:, None] * stride_xt + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        a = tl.load(a_ptr + slot * stride_as + r[None, :] * stride_ar + k[:, None],
                    mask=r_ok[None, :] & (k[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_R]
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        if IEEE:
            h += tl.dot(x, a, input_precision="ieee")
        else:
            h += tl.dot(x, a)
    # expand: y[:, col_offset + n] += h B, block by block over N
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        b = tl.load(b_ptr + slot * stride_bs + r[:, None] * stride_br + n[None, :],
                    mask=r_ok[:, None] & (n[None, :] < N), other=0.0)  # [BLOCK_R, BLOCK_N]
        if UPCAST:
            b = b.to(tl.float32)
        if IEEE:
            d = tl.dot(h.to(b.dtype), b, input_precision="ieee")
        else:
            d = tl.dot(h.to(b.dtype), b)
        y_at = y_ptr + token[:, None] * stride_yt + col_offset + n[None, :]
        ok = row_ok[:, None] & (n[None, :] < N)
        y = tl.load(y_at, mask=ok, other=0.0)
        tl.store(y_at, (y.to(tl.float32) + d).to(y_ptr.dtype.element_ty), mask=ok)


def lora_add_fused(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, tiles: LoraTiles,
    col_offset: int = 0,
) -> torch.Tensor:
    """Add the LoRA term of every token in `tiles` to `y` in place (see the module docstring);
    x [..., K] and y [..., >= col_offset + N] flattened to tokens alike. Returns y."""
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if lora_a.stride(-1) != 1 or lora_b.stride(-1) != 1:
        raise ValueError("lora_a and lora_b need a contiguous last dimension")
    if tiles.tokens != x2.shape[0] or y2.shape[0] != x2.shape[0]:
        raise ValueError(f"tiles over {tiles.tokens} tokens for x of {x2.shape[0]} and y of {y2.shape[0]}")
    tiles_n = tiles.slot.shape[0]
    if tiles_n == 0:
        return y
    k, n = x2.shape[1], lora_b.shape[-1]
    block_r = max(16, triton.next_power_of_2(rank))
    _lora_kernel[(tiles_n,)](
        x2, lora_a, lora_b, y2, tiles.order, tiles.slot, tiles.start, tiles.end,
        k, n, rank, col_offset,
        x2.stride(0), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1), y2.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=64 if x.dtype != torch.float32 else 32, BLOCK_N=64,
        IEEE=x.dtype == torch.float32 or (INTERPRETED and x.dtype == torch.bfloat16),
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
    )
    return y
