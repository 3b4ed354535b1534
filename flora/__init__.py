"""flora: batched FLoRA, LoRA and IA3 adapters for Hugging Face models.

Torch, transformers and safetensors only: nothing here imports Ray, DeepSpeed or MLflow.
"""

from flora.adapter import Adapter, AdapterConfig, AdapterLoadError, init_adapter, load_adapter
from flora.bank import BASE_NAME, BASE_SLOT, AdapterBanks
from flora.inject import IA3_PRESETS, PRESETS, banks_of, inject, route, target_matches
from flora.layers import AdaptedLinear

__all__ = [
    "Adapter",
    "AdapterBanks",
    "AdapterConfig",
    "AdapterLoadError",
    "AdaptedLinear",
    "BASE_NAME",
    "BASE_SLOT",
    "IA3_PRESETS",
    "PRESETS",
    "banks_of",
    "init_adapter",
    "inject",
    "load_adapter",
    "route",
    "target_matches",
]
