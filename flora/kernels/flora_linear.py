"""FLoRA, IA3 and the base model in one matmul: the adapter factors applied as the tiles pass.

Semantics (the spec is `flora.ops.flora_linear_reference`, over the adapted columns):
    for token t with slot s = slots[t], output column n of W0 [N, K]:
        lo <= n < hi:  y[t, n] = Σ_{r < rank} a[s, r, n-lo] · Σ_k W0[n, k] · b[s, r, k] · x[t, k]
                                 + gain[s, n-lo] · bias[n]
        otherwise:     y[t, n] = Σ_k W0[n, k] · x[t, k] + bias[n]
    where gain[s] = a[s, 0] for slots whose IA3 output scaling scales the bias too
    (`scales_bias[s]`), else 1. Columns lo:hi are the adapted range (all of W0 for a plain
    layer; the q and k columns of StarCoder's fused c_attn).
Shapes: x [T, K]; w0 [N, K]; bias [N] | None; a [S, R, hi-lo]; b [S, R, K]; slots [T];
    scales_bias [S] | None. Returns y [T, N] in x's dtype.

One program computes a BLOCK_T x BLOCK_N tile of y. Its K loop loads each tile of W0 once and
uses it for every rank: the `rank` copies of a token's row, each scaled by its own b row as the
x tile is loaded, are rows of one dot (BLOCK_T·R rows; at decode a matmul of T·r rows), and the
epilogue multiplies each copy by its a row and sums the copies. Tiles outside the adapted range
run the plain dot; a tile across a range boundary runs both. Rows of the base model (slot 0)
skip their b and a loads. The cost over the base matmul is the rank's extra rows and the
element-wise products, inside the same kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flora.kernels.paged_attention import INTERPRETED


@triton.jit
def _flora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, slots_ptr, scales_bias_ptr, y_ptr,
    T, N, K, lo, hi, T_BUCKET,
    stride_xt, stride_wn, stride_yt, stride_as, stride_ar, stride_bs, stride_br,
    RANK: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAIN: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Rows of the scaled dot: token-major, rank-minor (BLOCK_T·R_PAD of them).
    m = tl.arange(0, BLOCK_T * R_PAD)
    t_m = pid_t * BLOCK_T + m // R_PAD
    r_m = m % R_PAD
    slot_m = tl.load(slots_ptr + t_m, mask=t_m < T, other=0)
    scaled_m = (t_m < T) & (r_m < RANK) & (slot_m != 0)  # base rows keep x and W0 as they are
    base_m = (slot_m == 0) & (r_m == 0)
    # Rows of the plain dot and of the output: one per token.
    t_o = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = pid_n * BLOCK_N
    inside = (col0 < hi) & (col0 + BLOCK_N > lo)
    outside = (col0 < lo) | (col0 + BLOCK_N > hi)

    acc_in = tl.zeros([BLOCK_T * R_PAD, BLOCK_N], dtype=tl.float32)
    acc_out = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None], mask=(k[:, None] < K) & (n[None, :] < N), other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        if inside:
            x = tl.load(x_ptr + t_m[:, None] * stride_xt + k[None, :], mask=(t_m[:, None] < T) & (k[None, :] < K), other=0.0)
            b = tl.load(b_ptr + slot_m[:, None] * stride_bs + r_m[:, None] * stride_br + k[None, :],
                        mask=scaled_m[:, None] & (k[None, :] < K), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                b = b.to(tl.float32)
            xb = tl.where(base_m[:, None], x, x * b)  # base rows: x itself in their first copy, 0 in the rest
            if IEEE:
                acc_in += tl.dot(xb.to(w.dtype), w, input_precision="ieee")
            else:
                acc_in += tl.dot(xb.to(w.dtype), w)
        if outside:
            x1 = tl.load(x_ptr + t_o[:, None] * stride_xt + k[None, :], mask=(t_o[:, None] < T) & (k[None, :] < K), other=0.0)
            if UPCAST:
                x1 = x1.to(tl.float32)
            if IEEE:
                acc_out += tl.dot(x1.to(w.dtype), w, input_precision="ieee")
            else:
                acc_out += tl.dot(x1.to(w.dtype), w)

    in_range = (n >= lo) & (n < hi)
    col = n - lo
    a = tl.load(a_ptr + slot_m[:, None] * stride_as + r_m[:, None] * stride_ar + col[None, :],
                mask=scaled_m[:, None] & in_range[None, :], other=0.0).to(tl.float32)
    a = tl.where(base_m[:, None], 1.0, a)
    y_in = tl.sum(tl.reshape(acc_in * a, (BLOCK_T, R_PAD, BLOCK_N)), axis=1)  # [BLOCK_T, BLOCK_N]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        acc_out += bias[None, :]
        if HAS_GAIN:
            slot_o = tl.load(slots_ptr + t_o, mask=t_o < T, other=0)
            scales = tl.load(scales_bias_ptr + slot_o, mask=t_o < T, other=0) != 0
            a0 = tl.load(a_ptr + slot_o[:, None] * stride_as + col[None, :],
                         mask=scales[:, None] & in_range[None, :], other=1.0).to(tl.float32)
            y_in += a0 * bias[None, :]
        else:
            y_in += bias[None, :]
    y = tl.where(in_range[None, :], y_in, acc_out)
    tl.store(y_ptr + t_o[:, None] * stride_yt + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(t_o[:, None] < T) & (n[None, :] < N))


# On a GPU the tile shape is tuned per problem (autotuning caches one choice per key: the token
# count's power-of-two bucket, the layer's shape and the rank). Decode steps have few tokens, so
# narrow column tiles give the GPU enough programs to stream W0 at full bandwidth.
_TUNED = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        for bn, bk, w, st in ((32, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3))
    ],
    key=["T_BUCKET", "N", "K", "RANK"],
)(_flora_linear_kernel)


def flora_linear_fused(
    x: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    rank: int,
    columns: tuple[int, int] | None = None,
    scales_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """See the module docstring. x [..., K] (flattened to tokens), slots one per token."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t, k = x2.shape
    n = w0.shape[0]
    lo, hi = columns if columns is not None else (0, n)
    if slots.numel() != t:
        raise ValueError(f"{slots.numel()} slots for {t} tokens: the fused kernel takes one slot per token")
    if a.stride(-1) != 1 or b.stride(-1) != 1 or w0.stride(-1) != 1:
        raise ValueError("w0, a and b need a contiguous last dimension")
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    r_pad = triton.next_power_of_2(max(rank, 1))
    block_t = max(1, min(64 // r_pad, triton.next_power_of_2(max(t, 1))))
    block_t = max(block_t, 16 // r_pad if r_pad < 16 else 1)  # a dot needs at least 16 rows
    has_gain = bias is not None and scales_bias is not None
    args = (
        x2, w0, bias if bias is not None else w0, a, b, slots.reshape(-1), scales_bias if has_gain else slots, y,
        t, n, k, lo, hi, triton.next_power_of_2(max(t, 1)),
        x2.stride(0), w0.stride(0), y.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
    )
    flags = dict(
        RANK=rank, R_PAD=r_pad, BLOCK_T=block_t, HAS_BIAS=bias is not None, HAS_GAIN=has_gain,
        IEEE=x.dtype == torch.float32 or (INTERPRETED and x.dtype == torch.bfloat16),
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
    )
    if INTERPRETED:  # one tile shape: the interpreter checks results, it does not time them
        block_n = 64
        _flora_linear_kernel[(triton.cdiv(t, block_t), triton.cdiv(n, block_n))](*args, BLOCK_N=block_n, BLOCK_K=32, **flags)
    else:
        _TUNED[lambda meta: (triton.cdiv(t, block_t), triton.cdiv(n, meta["BLOCK_N"]))](*args, **flags)
    return y.view(*lead, n)
