"""What every task's driver-side preparation shares (`prepare` for code, `speech.prepare` for
Whisper): resolving the base model's name, the modules adapters target, the target check on a
weightless copy of the model, and spreading a held-out sample. The workers inject adapters at
the same `adapter_targets`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import flora
from flora_platform.config import ConfigError, FinetuneConfig
from flora_platform.data import looks_like_path


def resolve_model_name(name: str) -> str:
    """A model directory made absolute (checked to hold a model), or a hub id as given."""
    if looks_like_path(name) or Path(name).exists():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError("model.name", f"{name}: no model directory (config.json) there")
        return str(path.resolve())
    return name  # a hub id: from_pretrained fetches it (needs network or a warm HF cache)


def adapter_targets(model, spec) -> tuple[list[str], list[str]]:
    """(target patterns, IA3 feed-forward patterns) for the adapter kind and architecture."""
    model_type = model.config.model_type
    if spec.targets:
        return list(spec.targets), []
    if spec.kind == "ia3":
        if model_type not in flora.IA3_PRESETS:
            raise ValueError(f"adapter.targets: no IA3 preset for {model_type!r}; name the target modules")
        targets, feedforward = flora.IA3_PRESETS[model_type]
        return list(targets), list(feedforward)
    if model_type not in flora.PRESETS:
        raise ValueError(f"adapter.targets: no preset for {model_type!r}; name the target modules")
    return list(flora.PRESETS[model_type]), []


def check_targets(cfg: FinetuneConfig, base_path: str) -> None:
    """Inject into a weightless (meta-device) copy of the model to check targets and ranks."""
    from transformers import AutoConfig, AutoModelForCausalLM, WhisperForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError) as err:
        raise ConfigError("model.name", f"cannot load a model config from {base_path!r}: {err}") from err
    speech = config.model_type == "whisper"
    if speech != (cfg.task == "speech"):
        raise ConfigError(
            "task", f"{cfg.model.name!r} is a {config.model_type!r} model: task=speech takes Whisper models, "
            "task=text causal language models"
        )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config) if speech else AutoModelForCausalLM.from_config(config)
    try:
        targets, _ = adapter_targets(model, cfg.adapter)
        flora.inject(model, targets, max_slots=2, max_rank=cfg.adapter.rank)
    except ValueError as err:
        raise ConfigError("adapter.targets", str(err)) from err


def check_base_loading(cfg: FinetuneConfig) -> None:
    """model.quantization=8bit, checked in the driver's environment (the workers run the same
    image): it needs a CUDA GPU and bitsandbytes, and then flora's adapted layers would still have
    to read int8 weights, which they cannot yet."""
    if cfg.model.quantization == "none":
        return
    field = "model.quantization"
    if cfg.task != "text":
        raise ConfigError(field, f"{cfg.model.quantization} loads causal code models (task=text) only")
    if not cfg.scaling.use_gpu:
        raise ConfigError(field, f"{cfg.model.quantization} needs a CUDA GPU (bitsandbytes' int8 matmuls run on CUDA): "
                                 "set scaling.use_gpu=true, or model.quantization=none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(field, f"{cfg.model.quantization} needs bitsandbytes, which is not installed: "
                                 "pip install bitsandbytes into the job's environment, or model.quantization=none")
    # flora.layers.AdaptedLinear multiplies by `base.weight` as a dense matrix and makes its
    # adapter banks in that weight's dtype: int8 banks cannot be trained, int8 weights not used
    # as they are. Refused here rather than in a worker on a GPU node.
    raise ConfigError(field, f"{cfg.model.quantization}: flora's adapted layers read base.weight as a dense "
                             "float matrix and cannot use bitsandbytes' int8 weights yet; use model.quantization=none "
                             "(with model.dtype=auto and train.precision=bf16 the base takes 2 bytes per parameter)")


def spread(rows, n: int):
    """`n` rows (blocks of a tensor, or items of a list) evenly spaced over all of them, so that a
    held-out sample covers every held-out document or speaker, not just the first ones."""
    if len(rows) <= n:
        return rows
    picked = torch.linspace(0, len(rows) - 1, n).round().long()
    return rows[picked] if isinstance(rows, torch.Tensor) else [rows[i] for i in picked.tolist()]
