"""Batched adapter ops: every token carries a slot index into stacked adapter banks.

Each op is a pure function with a reference implementation (`*_reference`: a plain loop over
tokens with that token's merged weight; the spec) and a fast batched one tested against it.

Shape glossary
    B  batch rows            L  sequence length        T  tokens (B·L, or packed)
    S  slots in a bank       R  rank (bank maximum)    Din / Dout  layer input / output width

Layouts (scales already folded in; see `bank.py`):
    w0:      [Dout, Din]   frozen base weight, as in `nn.Linear`
    bias:    [Dout] or None
    b:       [S, R, Din]   multiplicative input factors  (FLoRA `B` transposed; IA3 input `l`)
    a:       [S, R, Dout]  multiplicative output factors (FLoRA `A`·scale; IA3 output `l`)
    gain:    [S, Dout] or None  per-slot bias multiplier (PEFT's IA3 scales the bias too)
    lora_a:  [S, R, Din]   LoRA down projection `A`
    lora_b:  [S, R, Dout]  LoRA up projection `B` transposed, times `alpha/r`

Slots are given per row or per token: for `x: [B, L, Din]`, `slots: [B]` or `[B, L]`; for
packed `x: [T, Din]`, `slots: [T]`. The base model is an ordinary slot (all-ones `a`/`b`,
zero LoRA). Unused rank components of a slot are zero, so slots of different ranks share a bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "expand_slots",
    "flora_linear",
    "flora_linear_reference",
    "lora_delta_bmm",
    "lora_delta_grouped",
    "lora_delta_reference",
    "ia3_bank_rows",
]


def expand_slots(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Shape `slots` so that indexing a bank with it broadcasts against `x`'s token dims.

    x: [B, L, Din] with slots [B] -> [B, 1];  slots [B, L] or packed [B·L] -> [B, L]
    x: [T, Din] with slots [T] -> [T]
    """
    lead = x.shape[:-1]
    if slots.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slots must be an integer tensor, got {slots.dtype}")
    if x.dim() == 3:
        b, l = lead
        if slots.shape == (b,):
            return slots.view(b, 1)
        if slots.numel() == b * l:
            return slots.reshape(b, l)
    elif x.dim() == 2 and slots.shape == lead:
        return slots
    raise ValueError(
        f"slots of shape {tuple(slots.shape)} do not match activations of shape {tuple(x.shape)}: "
        "give one slot per row ([B]) or one per token ([B, L] or packed [T])"
    )


# --------------------------------------------------------------------------- multiplicative


def flora_linear(
    x: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    rank: int | None = None,
    gain: torch.Tensor | None = None,
    linear=F.linear,
) -> torch.Tensor:
    """Batched multiplicative adapters (FLoRA; IA3 and the base model as special cases).

    Semantics:
        for each token t with s = slots[t]:
            y[t] = Σ_{r < rank} a[s, r] ∘ (w0 @ (b[s, r] ∘ x[t])) + gain[s] ∘ bias
        i.e. y[t] = W_s x[t] + gain[s] ∘ bias with W_s = w0 ∘ (a[s, :rank]ᵀ b[s, :rank]).
    Shapes: x [B, L, Din] or [T, Din]; w0 [Dout, Din]; bias [Dout] | None; a [S, R, Dout];
        b [S, R, Din]; slots [B] | [B, L] | [T]; gain [S, Dout] | None (None: all ones).
        `rank` (default R) limits the components computed; pass the largest rank among the
        slots present to skip all-zero components. Returns [..., Dout] like `x`.
        `linear(x2d, w0)`: the base matmul (`F.linear`; an engine may pass a faster kernel).
    Cost: `rank` base matmuls sharing one read of w0, plus element-wise products.
    """
    s = expand_slots(x, slots)
    rank = a.shape[1] if rank is None else rank
    if rank == 1:
        return _flora_linear_rank1(x, w0, bias, a[:, 0], b[:, 0], s, gain, linear)
    b_rows = _bank_rows(b[:, :rank], s)  # [*s.shape, rank, Din]
    xb = x.unsqueeze(-2) * b_rows  # [.., rank, Din]
    h = _linear_2d(xb, w0, linear)  # [.., rank, Dout]: one matmul for all components
    # Gathered after the matmul, which streams w0 through the caches, so that they are still hot.
    a_rows = _bank_rows(a[:, :rank], s)  # [*s.shape, rank, Dout]
    # y = Σ_r a_r ∘ h_r + gain ∘ bias, one fused multiply-add pass per component. An einsum over
    # r is many times slower on CPU (it becomes a batched matmul with a length-`rank` inner
    # dimension).
    h0, a0 = h.select(-2, 0), a_rows.select(-2, 0)  # [.., Dout]
    y = h0 * a0 if bias is None else torch.addcmul(_gained_bias(bias, gain, s), h0, a0)
    for r in range(1, rank):
        # In place is fine for autograd: addcmul's backward needs its factors, never y itself.
        y.addcmul_(h.select(-2, r), a_rows.select(-2, r))
    return y


def _flora_linear_rank1(x, w0, bias, a0, b0, s, gain, linear=F.linear):
    """`flora_linear` at rank 1 (the common serving case, and IA3): a0 [S, Dout], b0 [S, Din].

    Without a rank axis, and in place wherever autograd records nothing: at rank 1 these
    element-wise passes and the two gathers are all that FLoRA costs over the base layer, and
    at decode shapes a few microseconds of Python per call show in the total.
    """
    b_rows = _bank_rows(b0, s)  # [*s.shape, Din]
    if b_rows.shape == x.shape and not (x.requires_grad or b_rows.requires_grad):
        xb = b_rows.mul_(x)  # a fresh row per token (decode, token slots): scale it in place
    else:
        xb = x * b_rows  # [.., Din]
    h = _linear_2d(xb, w0, linear)  # [.., Dout]
    a_rows = _bank_rows(a0, s)  # [*s.shape, Dout], gathered after the matmul (see above)
    gained_bias = None if bias is None else _gained_bias(bias, gain, s)
    if not any(t is not None and t.requires_grad for t in (h, a_rows, gained_bias)):
        # Nothing records a factor for a backward: scale and add the bias in h's memory.
        return h.mul_(a_rows) if gained_bias is None else torch.addcmul(gained_bias, h, a_rows, out=h)
    return h * a_rows if gained_bias is None else torch.addcmul(gained_bias, h, a_rows)


def _linear_2d(x: torch.Tensor, w0: torch.Tensor, linear=F.linear) -> torch.Tensor:
    """`linear(x, w0)` on a 2-D view of `x` ([.., Din] -> [.., Dout]).

    On CPU, torch.matmul of an N-D input whose size-1 dims carry odd strides (as a broadcast
    product can have) takes a path several times slower than the same matmul in 2-D.
    """
    if x.dim() == 2:  # packed tokens (the engine): no views to make, each one a dispatch
        return linear(x, w0)
    return linear(x.reshape(-1, x.shape[-1]), w0).view(*x.shape[:-1], w0.shape[0])


def _bank_rows(bank: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`bank[s]` for a slot tensor `s` from `expand_slots`: [S, ...] -> [*s.shape, ...].

    `index_select` rather than `bank[s]`: advanced indexing costs several times more per call on
    CPU, which shows at decode shapes. Per-row slots ([B, 1]) gather one row per sequence, not
    one per token.
    """
    if s.dim() == 1:  # packed tokens: the gather is the result
        return bank.index_select(0, s)
    return bank.index_select(0, s.reshape(-1)).view(*s.shape, *bank.shape[1:])


def _gained_bias(bias: torch.Tensor, gain: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    return bias if gain is None else _bank_rows(gain, s) * bias


def flora_linear_reference(x, w0, bias, a, b, slots, rank=None, gain=None):
    """The spec of `flora_linear`: a loop over tokens, each with its merged weight."""
    s = expand_slots(x, slots).expand(x.shape[:-1]).reshape(-1)
    rank = a.shape[1] if rank is None else rank
    xs = x.reshape(-1, x.shape[-1])
    out = []
    for t in range(xs.shape[0]):
        slot = int(s[t])
        delta = a[slot, :rank].T @ b[slot, :rank]  # [Dout, Din] = Σ_r a_r b_rᵀ
        y = (w0 * delta) @ xs[t]
        if bias is not None:
            y = y + (bias if gain is None else gain[slot] * bias)
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], w0.shape[0])


def ia3_bank_rows(l: torch.Tensor, feedforward: bool, rank: int, dout: int, din: int):
    """Bank rows (a [rank, Dout], b [rank, Din]) that make `flora_linear` compute IA3.

    IA3 is FLoRA of rank 1 with one side all ones: output scaling `l ∘ (W0 x + c)` (PEFT scales
    the bias with the output: pass `gain = a[:, 0]` for such slots), or input scaling
    `W0 (l ∘ x) + c` for feed-forward layers.
    """
    a = torch.zeros(rank, dout, dtype=l.dtype, device=l.device)
    b = torch.zeros(rank, din, dtype=l.dtype, device=l.device)
    if feedforward:
        a[0], b[0] = 1.0, l
    else:
        a[0], b[0] = l, 1.0
    return a, b


# --------------------------------------------------------------------------- additive (LoRA)


def lora_delta_bmm(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor):
    """LoRA term for per-example adapters with two `torch.bmm`, the paper's baseline (App. B.1).

    Semantics: delta[t] = lora_b[s]ᵀ (lora_a[s] x[t]) for s = slots[t]  (added to the base output)
    Shapes: x [B, L, Din] | [T, Din]; lora_a [S, R, Din]; lora_b [S, R, Dout]; slots as above.
    Gathers each row's adapter (`adapter_b` [N, Din, R], `adapter_a` [N, R, Dout]) and runs
    `bmm(bmm(x, adapter_b), adapter_a)` with N = B for row slots, N = T for token slots.
    """
    s = expand_slots(x, slots)
    if s.dim() == 2 and s.shape[1] == 1:  # one adapter per row: bmm over rows
        rows = s[:, 0]
        xr = x  # [B, L, Din]
    else:  # one adapter per token: bmm over tokens, each a sequence of length 1
        rows = s.reshape(-1)
        xr = x.reshape(-1, 1, x.shape[-1])  # [T, 1, Din]
    # index_select: cheaper per call than advanced indexing on CPU (see `_bank_rows`)
    adapter_b = lora_a.index_select(0, rows).transpose(1, 2)  # [N, Din, R]
    adapter_a = lora_b.index_select(0, rows)  # [N, R, Dout]
    hidden = torch.bmm(xr, adapter_b)  # [N, L', R]
    out = torch.bmm(hidden, adapter_a)  # [N, L', Dout]
    return out.reshape(*x.shape[:-1], lora_b.shape[-1])


def lora_delta_grouped(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    groups: list[tuple[int, torch.Tensor]] | None = None,
):
    """LoRA term with tokens grouped by adapter: one matmul pair per distinct slot (Punica/vLLM).

    Semantics: same as `lora_delta_bmm`.
    Shapes: as `lora_delta_bmm`; `groups` is `[(slot, index [n])]` into `slots.reshape(-1)`
        (rows for per-row slots, tokens otherwise), e.g. from `group_tokens(slots)`, computed
        once per batch and shared by all layers. Slots left out of `groups` get a zero delta.
    """
    s = expand_slots(x, slots)
    if groups is None:
        groups = group_tokens(slots)
    if x.dim() == 3 and s.shape[1] == 1:
        xs = x  # per-row slots: gather whole rows [n, L, Din]
    else:
        xs = x.reshape(-1, x.shape[-1])  # per-token slots: gather tokens [n, Din]
    if len(groups) == 1 and groups[0][1].numel() == xs.shape[0]:
        # One adapter for the whole batch: plain matmuls, no gather, zero fill or scatter.
        slot = groups[0][0]
        return (x @ lora_a[slot].T) @ lora_b[slot]
    out = xs.new_zeros(*xs.shape[:-1], lora_b.shape[-1])
    for slot, idx in groups:
        xg = xs.index_select(0, idx)
        out.index_add_(0, idx, (xg @ lora_a[slot].T) @ lora_b[slot])
    return out.reshape(*x.shape[:-1], lora_b.shape[-1])


def group_tokens(slots: torch.Tensor, only: set[int] | None = None) -> list[tuple[int, torch.Tensor]]:
    """`[(slot, indices)]` of the flattened `slots`, for the slots in `only` (default: all)."""
    flat = slots.reshape(-1)
    groups = []
    for slot in sorted(torch.unique(flat).tolist()):
        if only is None or slot in only:
            groups.append((slot, torch.nonzero(flat == slot, as_tuple=True)[0]))
    return groups


def lora_delta_reference(x, lora_a, lora_b, slots):
    """The spec of the LoRA ops: per token, the merged weight's change `B A` applied to x."""
    s = expand_slots(x, slots).expand(x.shape[:-1]).reshape(-1)
    xs = x.reshape(-1, x.shape[-1])
    out = [(lora_b[int(s[t])].T @ lora_a[int(s[t])]) @ xs[t] for t in range(xs.shape[0])]
    return torch.stack(out).reshape(*x.shape[:-1], lora_b.shape[-1])
