"""Which slot each row or token uses for one forward pass, set in one place by `route`.

A `Route` carries the slot tensor and everything the adapted layers derive from it, computed
once per forward on the host: which slots are present, the largest multiplicative and LoRA
rank among them, whether any scales the bias (IA3), and, for LoRA, the tokens of each slot.
Every layer reads these values; none scans the slots or reads the device again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutePlan:
    """What a forward's active slots need, from the banks' per-slot ranks (see `AdapterBanks.plan`).

    mul_rank: rank components of the multiplicative path to compute (0: the plain base layer).
    lora_rank: LoRA components to compute (0: no LoRA term); lora_slots: the active slots with
    one. scales_bias: some slot's IA3 output scaling multiplies the bias too.
    """

    active_slots: tuple[int, ...]
    mul_rank: int
    lora_rank: int
    lora_slots: tuple[int, ...]
    scales_bias: bool

    @property
    def adapters(self) -> int:
        """Active slots other than the base model (slot 0)."""
        return sum(1 for s in self.active_slots if s != 0)


class Route:
    """The slots of one forward pass plus the plan every layer follows.

    slots: [B] (per row), [B, L] (per token) or packed [T], on the model's device.
    lora_groups: `[(slot, indices into slots.reshape(-1))]` of the LoRA slots, when the caller
        already knows them (the engine builds them on the host); otherwise computed on first use.
    linear: `linear(x, weight, bias=None)` for the layers' base matmuls: `F.linear`, or a faster
        kernel an engine chooses for inference (no autograd needed).
    host_slots: the same slots as a numpy array, when the caller has them on the host (the
        engine): token groupings for the LoRA kernel are then built without a device read.
    """

    def __init__(self, slots: torch.Tensor, plan: RoutePlan, lora_groups: list[tuple[int, torch.Tensor]] | None = None,
                 linear=F.linear, host_slots: np.ndarray | None = None):
        self.slots = slots
        self.plan = plan
        self.linear = linear
        self._lora_groups = lora_groups
        self._host_slots = host_slots
        self._token_slots: dict[int, torch.Tensor] = {}  # by token count (an encoder and a decoder differ)
        self._lora_tiles: dict[int, object] = {}

    @property
    def active_slots(self) -> tuple[int, ...]:
        return self.plan.active_slots

    def lora_groups(self) -> list[tuple[int, torch.Tensor]]:
        """`[(slot, indices into slots.reshape(-1))]` for the plan's LoRA slots, computed once."""
        if self._lora_groups is None:
            flat = self.slots.reshape(-1)
            self._lora_groups = [(s, torch.nonzero(flat == s, as_tuple=True)[0]) for s in self.plan.lora_slots]
        return self._lora_groups

    def token_slots(self, x: torch.Tensor) -> torch.Tensor:
        """One slot per token of `x` ([B, L, D] or [T, D]), flattened: what the kernels take."""
        tokens = x[..., 0].numel()
        if tokens not in self._token_slots:
            from flora.ops import expand_slots

            self._token_slots[tokens] = expand_slots(x, self.slots).expand(x.shape[:-1]).reshape(-1).contiguous()
        return self._token_slots[tokens]

    def lora_tiles(self, x: torch.Tensor):
        """The LoRA kernel's token tiles (`flora.kernels.lora.LoraTiles`), built once per forward
        (and token count)."""
        tokens = x[..., 0].numel()
        if tokens not in self._lora_tiles:
            from flora.kernels.lora import LoraTiles

            host = self._host_slots
            if host is None or host.size != tokens:
                host = self.token_slots(x).cpu().numpy()  # one device read per forward, not per layer
            self._lora_tiles[tokens] = LoraTiles.build(host.reshape(-1), self.plan.lora_slots, x.device)
        return self._lora_tiles[tokens]


class RouteState:
    """Holds the current `Route`; every adapted layer of one model shares one instance.

    Observers (`observe`) are called with each route as it is set: e.g. a replica counting how
    many adapters its forward passes mix.
    """

    def __init__(self):
        self._route: Route | None = None
        self._observers: list[Callable[[Route], None]] = []

    def current(self) -> Route:
        if self._route is None:
            raise RuntimeError(
                "an adapted model ran without a route: wrap the forward (and backward, if "
                "training) in `with flora.route(model, slots): ...`"
            )
        return self._route

    def set(self, route: Route | None) -> Route | None:
        previous, self._route = self._route, route
        if route is not None:
            for observer in self._observers:
                observer(route)
        return previous

    def observe(self, observer: Callable[[Route], None]) -> None:
        self._observers.append(observer)
