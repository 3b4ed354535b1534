"""One adapter on disk: a JSON config plus a safetensors file. Nothing is ever unpickled.

Our format (a directory):
    flora_config.json      AdapterConfig as JSON
    adapter.safetensors    per target module `m` (full module path), in the paper's / PEFT's
                           orientation, unscaled:
                             flora: m.flora_A [R, Dout], m.flora_B [Din, R]
                             lora:  m.lora_A  [R, Din],  m.lora_B  [Dout, R]
                             ia3:   m.ia3_l   [Dout] (output scaling) or [Din] (feed-forward)
PEFT LoRA and IA3 directories (`adapter_config.json` + `adapter_model.safetensors`, as written
by PEFT's `save_pretrained`) load as they are, converted to the same in-memory `Adapter`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "flora_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
KINDS = ("flora", "lora", "ia3")
FORMAT_VERSION = 1


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter is, independent of its tensors.

    kind: "flora" | "lora" | "ia3".  rank: components (1 for IA3).
    scale: multiplies the low-rank product when the adapter is applied: FLoRA
        `W = W0 ∘ (scale · B A)` with the paper's mean over components, scale = 1/rank;
        LoRA `W = W0 + scale · B A` with scale = alpha/rank (PEFT's `scaling`); IA3 1.0.
    module_shapes: full module path -> [adapted output width, input width] of each target.
    feedforward_modules: IA3 targets scaled on the input rather than the output.
    base_model: the base model's name or path, for people; `fingerprint` is what is checked.
    """

    kind: str
    rank: int
    scale: float
    module_shapes: dict[str, list[int]]
    feedforward_modules: tuple[str, ...] = ()
    base_model: str = ""
    fingerprint: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not one of {KINDS}")
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if not self.module_shapes:
            raise ValueError("an adapter needs at least one target module")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", shape_fingerprint(self.module_shapes))

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.module_shapes)


def shape_fingerprint(module_shapes: dict[str, list[int]]) -> str:
    """A short hash of target paths and shapes: equal iff the adapter fits the same layers."""
    text = ";".join(f"{path}={'x'.join(map(str, shape))}" for path, shape in sorted(module_shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Adapter:
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]

    def module_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """This module's tensors keyed by their short name (`flora_A`, `lora_B`, `ia3_l`, ...)."""
        prefix = path + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "kind": self.config.kind})
        config = asdict(self.config)
        config["feedforward_modules"] = list(self.config.feedforward_modules)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory


def load_adapter(directory: str | Path) -> Adapter:
    """Load our adapter directory or a PEFT LoRA/IA3 one; raise `AdapterLoadError` otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"{directory}: no such adapter directory")
    if (directory / CONFIG_NAME).exists():
        return _load_flora_dir(directory)
    if (directory / PEFT_CONFIG_NAME).exists():
        return _load_peft_dir(directory)
    raise AdapterLoadError(
        f"{directory}: neither {CONFIG_NAME} (flora) nor {PEFT_CONFIG_NAME} (PEFT) is there"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterLoadError(f"{path}: unreadable JSON config ({err})") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        pickled = [p.name for p in path.parent.glob("*.bin")] + [p.name for p in path.parent.glob("*.pt")]
        hint = (
            f"; found {pickled}: pickled weights are never loaded, re-save them as safetensors"
            if pickled
            else ""
        )
        raise AdapterLoadError(f"{path}: missing{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"{path}: corrupted or truncated safetensors file ({err})") from err


def _load_flora_dir(directory: Path) -> Adapter:
    raw = _read_json(directory / CONFIG_NAME)
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: expected a JSON object, got {type(raw).__name__}")
    try:
        version = raw.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise AdapterLoadError(f"{directory}: format_version {version} is newer than this flora")
        raw["feedforward_modules"] = tuple(raw.get("feedforward_modules", ()))
        config = AdapterConfig(**raw)
    except (TypeError, ValueError) as err:
        if isinstance(err, AdapterLoadError):
            raise
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: invalid adapter config ({err})") from err
    adapter = Adapter(config, _read_safetensors(directory / WEIGHTS_NAME))
    check_tensors(adapter, where=str(directory))
    return adapter


def expected_shapes(config: AdapterConfig, path: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes an adapter of this config must hold for module `path`."""
    dout, din = config.module_shapes[path]
    r = config.rank
    if config.kind == "flora":
        return {"flora_A": (r, dout), "flora_B": (din, r)}
    if config.kind == "lora":
        return {"lora_A": (r, din), "lora_B": (dout, r)}
    return {"ia3_l": (din,) if path in config.feedforward_modules else (dout,)}


def check_tensors(adapter: Adapter, where: str) -> None:
    """Every target module has exactly the tensors its config implies, with the right shapes."""
    config = adapter.config
    known = set()
    for path in config.target_modules:
        want = expected_shapes(config, path)
        got = adapter.module_tensors(path)
        for name, shape in want.items():
            key = f"{path}.{name}"
            known.add(key)
            if name not in got:
                raise AdapterLoadError(f"{where}: tensor {key} is missing")
            if tuple(got[name].shape) != shape:
                raise AdapterLoadError(
                    f"{where}: tensor {key} has shape {tuple(got[name].shape)}, expected {shape} "
                    f"for a {config.kind} adapter of rank {config.rank}"
                )
    extra = sorted(set(adapter.tensors) - known)
    if extra:
        raise AdapterLoadError(f"{where}: tensors for no target module in the config: {extra[:5]}")


# --------------------------------------------------------------------------- PEFT directories

_PEFT_PREFIX = "base_model.model."


def _load_peft_dir(directory: Path) -> Adapter:
    raw = _read_json(directory / PEFT_CONFIG_NAME)
    peft_type = raw.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise AdapterLoadError(f"{directory}: PEFT type {peft_type!r} is not supported (LORA and IA3 are)")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out") if raw.get(k)]
    if unsupported:
        raise AdapterLoadError(f"{directory}: PEFT options {unsupported} are not supported")
    weights = _read_safetensors(directory / PEFT_WEIGHTS_NAME)
    if not weights:
        raise AdapterLoadError(f"{directory / PEFT_WEIGHTS_NAME}: holds no tensors")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    feedforward = []
    if peft_type == "LORA":
        rank = int(raw["r"])
        alpha = float(raw.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank
        for key, value in weights.items():
            path, name = _split_peft_key(key, directory, (".lora_A.weight", ".lora_B.weight"))
            tensors[f"{path}.{name}"] = value
            shapes[path] = []
        for path in shapes:
            # A module with only one of its two factors would otherwise fail with a bare KeyError.
            for name in ("lora_A", "lora_B"):
                if f"{path}.{name}" not in tensors:
                    raise AdapterLoadError(
                        f"{directory / PEFT_WEIGHTS_NAME}: tensor {_PEFT_PREFIX}{path}.{name}.weight is missing"
                    )
            shapes[path] = [tensors[f"{path}.lora_B"].shape[0], tensors[f"{path}.lora_A"].shape[1]]
        config = AdapterConfig("lora", rank, scale, shapes, base_model=raw.get("base_model_name_or_path") or "")
    else:
        rank, scale = 1, 1.0
        for key, value in weights.items():
            path, name = _split_peft_key(key, directory, (".ia3_l",))
            # PEFT stores feed-forward (input) scalings as [1, Din], output ones as [Dout, 1].
            is_ff = value.dim() == 2 and value.shape[0] == 1 and value.shape[1] > 1
            tensors[f"{path}.ia3_l"] = value.flatten()
            # Only one side of an IA3 layer is stored; the other is checked against the model.
            shapes[path] = [-1, value.numel()] if is_ff else [value.numel(), -1]
            if is_ff:
                feedforward.append(path)
        config = AdapterConfig(
            "ia3", rank, scale, shapes, tuple(sorted(feedforward)), base_model=raw.get("base_model_name_or_path") or ""
        )
    adapter = Adapter(config, tensors)
    check_tensors(adapter, where=str(directory))
    return adapter


def _split_peft_key(key: str, directory: Path, suffixes: tuple[str, ...]) -> tuple[str, str]:
    for suffix in suffixes:
        if key.startswith(_PEFT_PREFIX) and key.endswith(suffix):
            path = key[len(_PEFT_PREFIX) : -len(suffix)]
            return path, suffix.strip(".").removesuffix(".weight")
    raise AdapterLoadError(f"{directory}: unexpected PEFT tensor {key!r} (only Linear LoRA/IA3 layers are supported)")


# --------------------------------------------------------------------------- new adapters


def init_adapter(
    kind: str,
    rank: int,
    module_shapes: dict[str, list[int]],
    *,
    feedforward_modules: tuple[str, ...] = (),
    scale: float | None = None,
    base_model: str = "",
    seed: int = 0,
    perturbation: float = 0.25,
) -> Adapter:
    """A fresh adapter that leaves the base model unchanged.

    FLoRA: A = 1, and B's columns 1 ± `perturbation` with random signs in ± pairs, so that
    the components differ (identical components get identical gradients and stay rank one)
    while `scale · B A` with scale = 1/rank is exactly all ones (the ± pairs cancel exactly for
    a power-of-two perturbation). LoRA: A ~ Kaiming-uniform, B = 0 (as PEFT). IA3: l = 1.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, (dout, din) in sorted(module_shapes.items()):
        if kind == "flora":
            b = torch.ones(din, rank)
            for r in range(0, rank - 1, 2):
                sign = torch.randint(0, 2, (din,), generator=gen).float() * 2 - 1
                b[:, r] += perturbation * sign
                b[:, r + 1] -= perturbation * sign
            tensors[f"{path}.flora_A"] = torch.ones(rank, dout)
            tensors[f"{path}.flora_B"] = b
        elif kind == "lora":
            bound = 1 / math.sqrt(din)
            tensors[f"{path}.lora_A"] = (torch.rand(rank, din, generator=gen) * 2 - 1) * bound
            tensors[f"{path}.lora_B"] = torch.zeros(dout, rank)
        elif kind == "ia3":
            tensors[f"{path}.ia3_l"] = torch.ones(din if path in feedforward_modules else dout)
        else:
            raise ValueError(f"adapter kind {kind!r} is not one of {KINDS}")
    if scale is None:
        scale = {"flora": 1.0 / rank, "lora": 1.0, "ia3": 1.0}[kind]
    rank = 1 if kind == "ia3" else rank
    config = AdapterConfig(kind, rank, scale, {k: list(v) for k, v in module_shapes.items()},
                           tuple(sorted(feedforward_modules)), base_model)
    return Adapter(config, tensors)
