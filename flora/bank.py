"""Adapter banks of one model: a name → slot table over every adapted layer's stacked tensors.

Loading an adapter is a copy of its (scaled) tensors into one slot of each adapted layer;
layers the adapter does not target get the identity in that slot. Slot 0 is the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flora import ops
from flora.adapter import Adapter, AdapterConfig, shape_fingerprint
from flora.layers import AdaptedLinear
from flora.routing import RoutePlan, RouteState

BASE_SLOT = 0
BASE_NAME = "base"


@dataclass(frozen=True)
class SlotInfo:
    """load_id: unique per load into the banks (0 for the base model), so that anything computed
    under an adapter (cached keys and values) is never taken for another load into the same slot."""

    name: str
    kind: str
    rank: int
    adapter_config: AdapterConfig | None
    load_id: int = 0


class AdapterBanks:
    """All adapted layers of one model (path → `AdaptedLinear`) and which adapter is in which slot."""

    def __init__(self, layers: dict[str, AdaptedLinear], routing: RouteState, base_model: str = ""):
        first = next(iter(layers.values()))
        self.layers = layers
        self.routing = routing
        self.base_model = base_model
        self.max_slots, self.max_rank, _ = first.b.shape
        self.max_lora_rank = first.lora_a.shape[1]
        self._slots: list[SlotInfo | None] = [None] * self.max_slots
        self._slots[BASE_SLOT] = SlotInfo(BASE_NAME, "base", 0, None)
        self._slot_by_name: dict[str, int] = {}
        self._loads = 0
        self._plans: dict[tuple[int, ...], RoutePlan] = {}  # by active slots, until a slot changes
        # Per slot, what a forward needs for it in any layer (see `plan`): host arrays, so that a
        # forward's plan is a few vectorised reads whatever the number of slots present.
        self.slot_mul_rank = np.zeros(self.max_slots, dtype=np.int64)
        self.slot_lora_rank = np.zeros(self.max_slots, dtype=np.int64)
        self.slot_scales_bias = np.zeros(self.max_slots, dtype=bool)

    # ------------------------------------------------------------------ the table

    @property
    def module_shapes(self) -> dict[str, list[int]]:
        return {p: [layer.adapted_features, layer.in_features] for p, layer in self.layers.items()}

    @property
    def fingerprint(self) -> str:
        return shape_fingerprint(self.module_shapes)

    @property
    def names(self) -> list[str]:
        """Loaded adapter names (the base model excluded)."""
        return list(self._slot_by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._slot_by_name

    def slot_of(self, name: str | None) -> int:
        if name is None or name == BASE_NAME:
            return BASE_SLOT
        try:
            return self._slot_by_name[name]
        except KeyError:
            loaded = self.names
            raise KeyError(f"no adapter named {name!r} is loaded; loaded: {loaded[:8]}{'...' if len(loaded) > 8 else ''}") from None

    def load_id(self, slot: int) -> int:
        """The load now in `slot` (see `SlotInfo.load_id`)."""
        info = self._slots[slot]
        if info is None:
            raise ValueError(f"slot {slot} holds no adapter")
        return info.load_id

    def plan(self, active_slots) -> RoutePlan:
        """What a forward over `active_slots` (ints, each loaded) needs from every adapted layer."""
        active = np.unique(np.asarray(active_slots, dtype=np.int64))
        key = tuple(active.tolist())
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        if len(self._plans) > 256:
            self._plans.clear()
        lora = self.slot_lora_rank[active]
        plan = self._plans[key] = RoutePlan(
            active_slots=key,
            mul_rank=int(self.slot_mul_rank[active].max(initial=0)),
            lora_rank=int(lora.max(initial=0)),
            lora_slots=tuple(active[lora > 0].tolist()),
            scales_bias=bool(self.slot_scales_bias[active].any()),
        )
        return plan

    def free_slots(self) -> list[int]:
        return [s for s, info in enumerate(self._slots) if info is None]

    def slots_tensor(self, slots) -> torch.Tensor:
        """Slots as a long tensor on the model's device, from a tensor, ints, or adapter names."""
        if isinstance(slots, torch.Tensor):
            t = slots.long()
        else:
            t = torch.tensor([s if isinstance(s, int) else self.slot_of(s) for s in slots], dtype=torch.long)
        return t.to(next(iter(self.layers.values())).b.device)

    def check_slots(self, active: list[int]) -> None:
        for slot in active:
            if not 0 <= slot < self.max_slots:
                raise ValueError(
                    f"slot {slot} is out of range: the banks have {self.max_slots} slots (0 is the base model)"
                )
            if self._slots[slot] is None:
                raise ValueError(f"slot {slot} holds no adapter; loaded: {self.names}")

    # ------------------------------------------------------------------ loading

    def load(self, name: str, adapter: Adapter, slot: int | None = None) -> int:
        """Copy `adapter` into a slot (its current one if `name` is loaded, else a free one)."""
        if name == BASE_NAME:
            raise ValueError(f"{BASE_NAME!r} names the base model; choose another adapter name")
        self.check_fits(name, adapter.config)
        if slot is None:
            slot = self._slot_for(name)
        elif not 0 < slot < self.max_slots:
            raise ValueError(f"slot {slot} is out of range 1..{self.max_slots - 1} (0 is the base model)")
        elif self._slot_by_name.get(name, slot) != slot:
            self.unload(name)  # moving to another slot: one name, one slot
        self._vacate(slot)
        for path, layer in self.layers.items():
            if path in adapter.config.module_shapes:
                _copy_into(layer, slot, adapter, path)
            else:
                layer.clear_slot(slot)
        config = adapter.config
        self._loads += 1
        self._plans.clear()
        self._slots[slot] = SlotInfo(name, config.kind, config.rank, config, load_id=self._loads)
        self._slot_by_name[name] = slot
        self.slot_mul_rank[slot] = {"flora": config.rank, "ia3": 1}.get(config.kind, 0)
        self.slot_lora_rank[slot] = config.rank if config.kind == "lora" else 0
        # IA3 scales the bias wherever it scales the output (PEFT's way), i.e. off the feed-forward modules.
        self.slot_scales_bias[slot] = config.kind == "ia3" and bool(set(config.module_shapes) - set(config.feedforward_modules))
        return slot

    def unload(self, name: str) -> int:
        slot = self.slot_of(name)
        if slot == BASE_SLOT:
            raise ValueError("the base model cannot be unloaded")
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self._vacate(slot)
        return slot

    def _vacate(self, slot: int) -> None:
        self._plans.clear()
        info = self._slots[slot]
        if info is not None and self._slot_by_name.get(info.name) == slot:
            del self._slot_by_name[info.name]
        self._slots[slot] = None
        self.slot_mul_rank[slot] = self.slot_lora_rank[slot] = 0
        self.slot_scales_bias[slot] = False

    def _slot_for(self, name: str) -> int:
        try:
            return self.slot_of(name)
        except KeyError:
            free = self.free_slots()
            if not free:
                raise RuntimeError(
                    f"all {self.max_slots - 1} adapter slots are in use ({self.names}): unload one, "
                    "or inject with a larger max_slots"
                ) from None
            return free[0]

    def check_fits(self, name: str, config: AdapterConfig) -> None:
        """Raise ValueError (naming the fix) unless an adapter of `config` fits these banks.

        Reads only the layers' shapes, never the slots, so a loader thread may call it while
        another thread runs the model.
        """
        limit, what = (self.max_lora_rank, "max_lora_rank") if config.kind == "lora" else (self.max_rank, "max_rank")
        if config.rank > limit:
            raise ValueError(f"adapter {name!r} has rank {config.rank} > bank {what} {limit}; inject with {what}>={config.rank}")
        missing = sorted(set(config.module_shapes) - set(self.layers))
        if missing:
            raise ValueError(
                f"adapter {name!r} targets {missing[:3]}{'...' if len(missing) > 3 else ''}, which the model "
                f"has no adapted layer for: inject() those modules (adapted: {sorted(self.layers)[:3]}...)"
            )
        for path, (dout, din) in config.module_shapes.items():
            layer = self.layers[path]
            have = [layer.adapted_features, layer.in_features]
            if (dout != -1 and dout != have[0]) or (din != -1 and din != have[1]):
                raise ValueError(
                    f"adapter {name!r} was made for another base model (or other target columns): "
                    f"{path} is {[dout, din]} in the adapter, {have} here "
                    f"(adapter base_model={config.base_model!r}, fingerprint {config.fingerprint})"
                )

    # ------------------------------------------------------------------ reading back, training

    def export(self, name: str) -> Adapter:
        """The adapter in `name`'s slot as an `Adapter` (unscaled, paper orientation), e.g. after training."""
        slot = self.slot_of(name)
        info = self._slots[slot]
        if info is None or info.adapter_config is None:
            raise ValueError(f"{name!r} is the base model, not an adapter")
        config = info.adapter_config
        tensors = {}
        with torch.no_grad():
            for path in config.module_shapes:
                layer, r = self.layers[path], config.rank
                if config.kind == "flora":
                    tensors[f"{path}.flora_A"] = (layer.a[slot, :r].float() / config.scale).cpu()
                    tensors[f"{path}.flora_B"] = layer.b[slot, :r].T.float().cpu()
                elif config.kind == "lora":
                    tensors[f"{path}.lora_A"] = layer.lora_a[slot, :r].float().cpu()
                    tensors[f"{path}.lora_B"] = (layer.lora_b[slot, :r].T.float() / config.scale).cpu()
                else:
                    ff = path in config.feedforward_modules
                    tensors[f"{path}.ia3_l"] = (layer.b[slot, 0] if ff else layer.a[slot, 0]).float().cpu()
        return Adapter(config, {k: v.contiguous() for k, v in tensors.items()})

    def trainable_parameters(self, names: list[str]) -> list[torch.nn.Parameter]:
        """Unfreeze the bank rows of `names` for training; every other slot's rows get zero gradient.

        Returns the parameters to give the optimizer. The base model stays frozen.
        """
        slots = [self.slot_of(n) for n in names]
        params = []
        for path, layer in self.layers.items():
            for attr, ranks in (("a", layer.mul_rank), ("b", layer.mul_rank), ("lora_a", layer.lora_rank), ("lora_b", layer.lora_rank)):
                if not any(ranks[s] for s in slots):
                    continue  # no trained slot has rows here
                p = getattr(layer, attr)
                mask = torch.zeros(p.shape[0], p.shape[1], 1, dtype=p.dtype, device=p.device)
                for s in slots:
                    # IA3's fixed side is masked like any untrained row, not detached.
                    if _trains(self._slots[s], path, attr):
                        mask[s, : ranks[s]] = 1.0
                p.requires_grad_(True)
                p.register_hook(lambda grad, mask=mask: grad * mask)
                params.append(p)
        return params


def _trains(info: SlotInfo | None, path: str, attr: str) -> bool:
    """Whether a slot's `attr` rows of the layer at `path` are trained. IA3 keeps one side all
    ones (its vector `l` is `a` for output scaling, `b` for feed-forward input scaling): training
    the other side too would make it a rank-1 FLoRA that `export` cannot write as IA3."""
    if info is None or info.kind != "ia3" or attr not in ("a", "b"):
        return True
    feedforward = info.adapter_config is not None and path in info.adapter_config.feedforward_modules
    return attr == ("b" if feedforward else "a")


def _copy_into(layer: AdaptedLinear, slot: int, adapter: Adapter, path: str) -> None:
    """Fold the adapter's scale in and copy its rows for this layer into `slot`."""
    config = adapter.config
    t = {k: v.to(device=layer.b.device, dtype=torch.float32) for k, v in adapter.module_tensors(path).items()}
    cast = lambda x: x.to(layer.b.dtype)  # noqa: E731
    if config.kind == "flora":
        layer.set_multiplicative(slot, cast(t["flora_A"] * config.scale), cast(t["flora_B"].T))
        layer.set_lora(slot, layer.lora_a.new_zeros(0, layer.in_features), layer.lora_b.new_zeros(0, layer.adapted_features))
    elif config.kind == "ia3":
        ff = path in config.feedforward_modules
        a, b = ops.ia3_bank_rows(t["ia3_l"], ff, 1, layer.adapted_features, layer.in_features)
        layer.set_multiplicative(slot, cast(a), cast(b), scales_bias=not ff)
        layer.set_lora(slot, layer.lora_a.new_zeros(0, layer.in_features), layer.lora_b.new_zeros(0, layer.adapted_features))
    else:
        layer.clear_slot(slot)
        layer.set_lora(slot, cast(t["lora_A"]), cast((t["lora_B"] * config.scale).T))
