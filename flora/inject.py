"""Put adapted layers into a Hugging Face model, and route slots for one forward pass.

    banks = inject(model, "gpt_bigcode", max_slots=8, max_rank=4)
    banks.load("julia", load_adapter("adapters/julia"))
    with route(model, ["julia", None, "lua"]):      # one adapter name (or None) per row
        logits = model(input_ids).logits

A target is a regex matched against the full module path (`re.fullmatch`) or a module name
matched against the path's tail (`c_attn` matches `transformer.h.0.attn.c_attn`), optionally
followed by `:q,k` to adapt only those named output columns of a fused projection.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from flora.bank import AdapterBanks
from flora.layers import AdaptedLinear
from flora.routing import Route, RouteState

# The paper adapts the query and key projections of code models (StarCoder: the q and k
# columns of the fused c_attn) and every linear layer of Whisper.
PRESETS: dict[str, list[str]] = {
    "gpt_bigcode": [r"transformer\.h\.\d+\.attn\.c_attn:q,k"],
    "gpt_bigcode-c_attn": [r"transformer\.h\.\d+\.attn\.c_attn"],
    "llama": [r"model\.layers\.\d+\.self_attn\.(q|k)_proj"],
    "whisper": [
        r"model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.(q|k|v|out)_proj",
        r"model\.(encoder|decoder)\.layers\.\d+\.fc(1|2)",
    ],
}
# PEFT's default IA3 targets, whose feed-forward modules are scaled on the input.
IA3_PRESETS: dict[str, tuple[list[str], list[str]]] = {
    "gpt_bigcode": ([r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_proj)"], [r"transformer\.h\.\d+\.mlp\.c_proj"]),
    "llama": ([r"model\.layers\.\d+\.(self_attn\.(k|v)_proj|mlp\.down_proj)"], [r"model\.layers\.\d+\.mlp\.down_proj"]),
    "whisper": (PRESETS["whisper"], [r"model\.(encoder|decoder)\.layers\.\d+\.fc2"]),
}

_BANKS_ATTR = "flora_banks"


def inject(
    model: nn.Module,
    targets: str | list[str] = "auto",
    *,
    max_slots: int = 8,
    max_rank: int = 8,
    max_lora_rank: int | None = None,
    lora_impl: str = "auto",
    kernels: str = "auto",
) -> AdapterBanks:
    """Replace the target `nn.Linear` layers of `model` with `AdaptedLinear`; freeze the model.

    targets: "auto" (the preset of `model.config.model_type`), a preset name from `PRESETS`,
        or a list of target patterns (see the module docstring).
    max_slots: slots per bank, the base model's included. max_rank: largest FLoRA rank;
        max_lora_rank: largest LoRA rank (default max_rank; 0 allocates no LoRA bank).
    lora_impl, kernels: how the adapted layers compute (see `AdaptedLinear`).
    """
    if hasattr(model, _BANKS_ATTR):
        raise ValueError("this model already has adapted layers; inject() once per model")
    if max_slots < 2:
        raise ValueError(f"max_slots={max_slots}: need at least 2 (slot 0 is the base model)")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank}: must be >= 1")
    patterns = resolve_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    routing = RouteState()
    layers: dict[str, AdaptedLinear] = {}
    unmatched = set(patterns)
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        for pattern in patterns:
            regex, columns = _split_columns(pattern)
            if target_matches(regex, path):
                unmatched.discard(pattern)
                col_range = _column_range(model, path, module, columns) if columns else None
                layers[path] = AdaptedLinear(
                    module, routing, max_slots, max_rank,
                    max_rank if max_lora_rank is None else max_lora_rank, col_range, lora_impl, kernels,
                )
                break
    if unmatched:
        linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"targets {sorted(unmatched)} match no nn.Linear of this {type(model).__name__}; "
            f"linear layers are named like {linears[:4]}"
        )
    for path, layer in layers.items():
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    banks = AdapterBanks(layers, routing, base_model=name)
    setattr(model, _BANKS_ATTR, banks)
    return banks


def banks_of(model: nn.Module) -> AdapterBanks:
    banks = getattr(model, _BANKS_ATTR, None)
    if banks is None:
        raise ValueError("this model has no adapted layers: call flora.inject(model, ...) first")
    return banks


@contextmanager
def route(model: nn.Module | AdapterBanks, slots):
    """Within this block every adapted layer uses `slots` (see `flora.ops` for the shapes).

    slots: a tensor of slot indices ([B], [B, L] or packed [T]), or one adapter name per row
    (None or "base" for the base model). Yields the `Route`.
    """
    banks = model if isinstance(model, AdapterBanks) else banks_of(model)
    tensor = banks.slots_tensor(slots)
    active = torch.unique(tensor).tolist()  # one device read per forward, shared by every layer
    banks.check_slots(active)
    current = Route(tensor, banks.plan(active))
    previous = banks.routing.set(current)
    try:
        yield current
    finally:
        banks.routing.set(previous)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    if isinstance(targets, str):
        name = targets
        if name == "auto":
            name = getattr(getattr(model, "config", None), "model_type", None)
        if name not in PRESETS:
            raise ValueError(
                f"no target preset {name!r}: choose one of {sorted(PRESETS)} or pass a list of module patterns"
            )
        return list(PRESETS[name])
    if not targets:
        raise ValueError("targets is empty: name at least one module pattern")
    return list(targets)


def _split_columns(pattern: str) -> tuple[str, tuple[str, ...]]:
    regex, _, cols = pattern.partition(":")
    return regex, tuple(c.strip() for c in cols.split(",") if c.strip())


def target_matches(regex: str, path: str) -> bool:
    """Whether a target pattern (without `:columns`) names the module at `path`."""
    return path == regex or path.endswith("." + regex) or re.fullmatch(regex, path) is not None


def _column_range(model: nn.Module, path: str, layer: nn.Linear, columns: tuple[str, ...]) -> tuple[int, int]:
    """Output columns `lo:hi` of the named parts (q, k, v) of a fused projection."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt_bigcode" or not path.endswith("c_attn"):
        raise ValueError(f"{path}: named columns {columns} are known only for gpt_bigcode's attn.c_attn")
    if not config.multi_query:
        # Without multi-query attention c_attn interleaves q, k and v per head: no contiguous range.
        raise ValueError(f"{path}: named columns need multi_query=True; target the whole c_attn instead")
    d = config.hidden_size
    kv = d // config.num_attention_heads
    parts = {"q": (0, d), "k": (d, d + kv), "v": (d + kv, d + 2 * kv)}
    unknown = [c for c in columns if c not in parts]
    if unknown:
        raise ValueError(f"{path}: unknown columns {unknown}; choose from {sorted(parts)}")
    ranges = sorted(parts[c] for c in columns)
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        if hi != lo:
            raise ValueError(f"{path}: columns {columns} are not contiguous; adapt q,k or k,v or all of c_attn")
    lo, hi = ranges[0][0], ranges[-1][1]
    assert hi <= layer.out_features, (hi, layer.out_features)
    return lo, hi
