"""The adapted linear layer: a frozen `nn.Linear` plus its rows of the adapter banks."""

from __future__ import annotations

import torch
import torch.nn as nn

from flora import ops
from flora.routing import RouteState

LORA_IMPLS = ("grouped", "bmm")


class AdaptedLinear(nn.Module):
    """Wraps a frozen `nn.Linear`; computes every row/token with the adapter of its slot.

    Bank tensors (see `flora.ops` for their layouts) are parameters of this module, frozen
    until a trainer asks for them, so `model.to(...)` moves them with the model. Slot 0 is the
    base model. `columns = (lo, hi)` restricts adaptation to output columns `lo:hi` (e.g. the
    query and key part of StarCoder's fused `c_attn`); the other columns stay the base layer's.

    How many rank components a forward computes comes from its `Route` (the largest rank among
    the slots present, worked out once per forward for every layer). Per slot the layer keeps,
    in plain Python, the ranks this layer holds (`mul_rank[s]`, 0 = identity; `lora_rank[s]`,
    0 = none), which training reads to unfreeze only the rows in use.
    """

    def __init__(
        self,
        base: nn.Linear,
        routing: RouteState,
        max_slots: int,
        max_rank: int,
        max_lora_rank: int,
        columns: tuple[int, int] | None = None,
        lora_impl: str = "grouped",
    ):
        super().__init__()
        if lora_impl not in LORA_IMPLS:
            raise ValueError(f"lora_impl={lora_impl!r}: choose one of {LORA_IMPLS}")
        self.base = base
        self.routing = routing
        self.columns = columns
        self.lora_impl = lora_impl
        lo, hi = columns if columns is not None else (0, base.out_features)
        dout, din = hi - lo, base.in_features
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.b = frozen(torch.zeros(max_slots, max_rank, din, **kw))  # [S, R, Din]
        self.a = frozen(torch.zeros(max_slots, max_rank, dout, **kw))  # [S, R, Dout]
        # IA3 output scaling multiplies the bias as well (as PEFT does): for those slots the bias
        # gain is the adapter's own output factor a[s, 0], so it stays right while training.
        self.register_buffer("scales_bias", torch.zeros(max_slots, dtype=torch.bool, device=kw["device"]))
        self.lora_a = frozen(torch.zeros(max_slots, max_lora_rank, din, **kw))  # [S, Rl, Din]
        self.lora_b = frozen(torch.zeros(max_slots, max_lora_rank, dout, **kw))  # [S, Rl, Dout]
        self.mul_rank = [0] * max_slots
        self.lora_rank = [0] * max_slots
        for slot in range(max_slots):
            self.clear_slot(slot)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def adapted_features(self) -> int:
        return self.a.shape[-1]

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Make `slot` the identity (base model) in this layer."""
        self.b[slot].zero_()
        self.a[slot].zero_()
        self.b[slot, 0] = 1.0
        self.a[slot, 0] = 1.0
        self.scales_bias[slot] = False
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.mul_rank[slot] = self.lora_rank[slot] = 0

    @torch.no_grad()
    def set_multiplicative(self, slot: int, a: torch.Tensor, b: torch.Tensor, scales_bias: bool = False):
        """Copy multiplicative rows into `slot`: a [r, Dout], b [r, Din] (scale folded).

        scales_bias: the bias is multiplied by a[slot, 0] too (IA3 output scaling).
        """
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.b[slot, :r].copy_(b)
        self.a[slot, r:].zero_()
        self.b[slot, r:].zero_()
        self.scales_bias[slot] = scales_bias
        self.mul_rank[slot] = r

    @torch.no_grad()
    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor):
        """Copy LoRA rows into `slot`: lora_a [r, Din], lora_b [r, Dout] (scale folded)."""
        r = lora_a.shape[0]
        self.lora_a[slot, :r].copy_(lora_a)
        self.lora_b[slot, :r].copy_(lora_b)
        self.lora_a[slot, r:].zero_()
        self.lora_b[slot, r:].zero_()
        self.lora_rank[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.routing.current()
        w0, bias = self.base.weight, self.base.bias
        if self.columns is None:
            return self._adapted(x, w0, bias, route)
        lo, hi = self.columns
        linear = route.linear
        parts = [
            linear(x, w0[:lo], None if bias is None else bias[:lo]),
            self._adapted(x, w0[lo:hi], None if bias is None else bias[lo:hi], route),
            linear(x, w0[hi:], None if bias is None else bias[hi:]),
        ]
        return torch.cat(parts, dim=-1)

    def _adapted(self, x, w0, bias, route) -> torch.Tensor:
        plan = route.plan
        if plan.mul_rank == 0:  # only base/LoRA rows: the plain base layer
            y = route.linear(x, w0, bias)
        else:
            gain = None
            if bias is not None and plan.scales_bias:
                gain = torch.where(self.scales_bias[:, None], self.a[:, 0], 1.0)  # [S, Dout]
            y = ops.flora_linear(x, w0, bias, self.a, self.b, route.slots, rank=plan.mul_rank, gain=gain, linear=route.linear)
        if plan.lora_rank:
            lora_a, lora_b = self.lora_a[:, : plan.lora_rank], self.lora_b[:, : plan.lora_rank]
            if self.lora_impl == "bmm":
                delta = ops.lora_delta_bmm(x, lora_a, lora_b, route.slots)
            else:
                delta = ops.lora_delta_grouped(x, lora_a, lora_b, route.slots, route.lora_groups())
            y = y + delta
        return y

    def extra_repr(self) -> str:
        s, r, _ = self.b.shape
        return f"slots={s}, max_rank={r}, max_lora_rank={self.lora_a.shape[1]}, columns={self.columns}"
