"""Which slot each row or token uses for one forward pass, set in one place by `route`."""

from __future__ import annotations

import torch

from flora import ops


class Route:
    """The slots of one forward pass plus what every layer derives from them, computed once.

    slots: [B] (per row), [B, L] (per token) or packed [T], on the model's device.
    """

    def __init__(self, slots: torch.Tensor):
        self.slots = slots
        # One device read per forward, shared by every layer: which slots are present.
        self.active_slots: list[int] = sorted(torch.unique(slots).tolist())
        self._groups: dict[frozenset[int], list[tuple[int, torch.Tensor]]] = {}

    def groups(self, only: set[int]) -> list[tuple[int, torch.Tensor]]:
        """`[(slot, indices into slots.reshape(-1))]` for the slots in `only`, cached per set."""
        key = frozenset(only)
        if key not in self._groups:
            self._groups[key] = ops.group_tokens(self.slots, only)
        return self._groups[key]


class RouteState:
    """Holds the current `Route`; every adapted layer of one model shares one instance."""

    def __init__(self):
        self._route: Route | None = None

    def current(self) -> Route:
        if self._route is None:
            raise RuntimeError(
                "an adapted model ran without a route: wrap the forward (and backward, if "
                "training) in `with flora.route(model, slots): ...`"
            )
        return self._route

    def set(self, route: Route | None) -> Route | None:
        previous, self._route = self._route, route
        return previous
