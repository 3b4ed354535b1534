"""The adapted linear layer: a frozen `nn.Linear` plus its rows of the adapter banks."""

from __future__ import annotations

import torch
import torch.nn as nn

from flora import ops
from flora.routing import RouteState

LORA_IMPLS = ("auto", "grouped", "bmm", "fused")
KERNELS = ("auto", "torch", "triton")


class AdaptedLinear(nn.Module):
    """Wraps a frozen `nn.Linear`; computes every row/token with the adapter of its slot.

    Bank tensors (see `flora.ops` for their layouts) are parameters of this module, frozen
    until a trainer asks for them, so `model.to(...)` moves them with the model. Slot 0 is the
    base model. `kernels`: "auto" computes with the Triton kernels (`flora.kernels`) on a GPU
    when no gradient is needed, the PyTorch ops otherwise; "triton" / "torch" force one.
    `lora_impl`: "auto" (the fused kernel with the kernels, else grouped), "grouped" (a matmul
    pair per adapter), "bmm" (the paper's baseline) or "fused". `columns = (lo, hi)` restricts adaptation to output columns `lo:hi` (e.g. the
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
        lora_impl: str = "auto",
        kernels: str = "auto",
    ):
        super().__init__()
        if lora_impl not in LORA_IMPLS:
            raise ValueError(f"lora_impl={lora_impl!r}: choose one of {LORA_IMPLS}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels={kernels!r}: choose one of {KERNELS}")
        self.base = base
        self.routing = routing
        self.columns = columns
        self.lora_impl = lora_impl
        self.kernels = kernels
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
        plan = route.plan
        w0, bias = self.base.weight, self.base.bias
        fused = self._fused(x)
        if plan.mul_rank == 0:  # only base/LoRA rows: the plain base layer
            y = route.linear(x, w0, bias)
        elif fused:
            from flora.kernels.flora_linear import flora_linear_fused  # Triton is optional: imported when used

            scales = self.scales_bias if plan.scales_bias else None
            y = flora_linear_fused(x, w0, bias, self.a, self.b, route.token_slots(x), plan.mul_rank, self.columns,
                                   scales_bias=scales)
        elif self.columns is None:
            y = self._multiplicative(x, w0, bias, route)
        else:
            lo, hi = self.columns
            y = torch.cat([
                route.linear(x, w0[:lo], None if bias is None else bias[:lo]),
                self._multiplicative(x, w0[lo:hi], None if bias is None else bias[lo:hi], route),
                route.linear(x, w0[hi:], None if bias is None else bias[hi:]),
            ], dim=-1)
        if plan.lora_rank:
            y = self._add_lora(y, x, route, fused)
        return y

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the Triton kernels compute this forward: asked for, or on a GPU when nothing
        needs a gradient (training keeps the PyTorch ops, whose backward autograd provides)."""
        if self.kernels == "torch" or not (x.is_cuda or self.kernels == "triton"):
            return False
        if self.kernels == "triton":
            return True
        from flora.kernels import HAS_TRITON

        return HAS_TRITON and not torch.is_grad_enabled()

    def _multiplicative(self, x, w0, bias, route) -> torch.Tensor:
        plan = route.plan
        gain = None
        if bias is not None and plan.scales_bias:
            gain = torch.where(self.scales_bias[:, None], self.a[:, 0], 1.0)  # [S, Dout]
        return ops.flora_linear(x, w0, bias, self.a, self.b, route.slots, rank=plan.mul_rank, gain=gain, linear=route.linear)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, route, fused: bool) -> torch.Tensor:
        r = route.plan.lora_rank
        lo = 0 if self.columns is None else self.columns[0]
        impl = self.lora_impl if self.lora_impl != "auto" else ("fused" if fused else "grouped")
        if impl == "fused":
            from flora.kernels.lora import lora_add_fused

            if y.requires_grad:
                raise RuntimeError("the fused LoRA kernel has no backward: train with lora_impl='grouped' or 'bmm'")
            return lora_add_fused(y, x, self.lora_a, self.lora_b, r, route.lora_tiles(x), col_offset=lo)
        lora_a, lora_b = self.lora_a[:, :r], self.lora_b[:, :r]
        if impl == "bmm":
            delta = ops.lora_delta_bmm(x, lora_a, lora_b, route.slots)
        else:
            delta = ops.lora_delta_grouped(x, lora_a, lora_b, route.slots, route.lora_groups())
        if self.columns is None:
            return y + delta
        y[..., lo : self.columns[1]] += delta  # autograd: the matmul that made y needs x and W0, not y
        return y

    def extra_repr(self) -> str:
        s, r, _ = self.b.shape
        return f"slots={s}, max_rank={r}, max_lora_rank={self.lora_a.shape[1]}, columns={self.columns}"
