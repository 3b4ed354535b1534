"""Decoders the engine runs over packed tokens and the paged KV pool.

A decoder takes one step's packed tokens and returns their final hidden states:

    hidden = decoder.forward(input_ids, positions, attention)   # [T] ids/positions -> [T, D]
    logits = decoder.logits(hidden[rows_that_sample])            # -> [N, V]

`attention` is the step's `StepAttention` (see `flora.engine.attention`). Decoders call the Hugging
Face model's own modules (embeddings, norms, projections, MLPs), so adapted layers put there by
`flora.inject` work unchanged and the weights are the ones `from_pretrained` loaded.

    native   our forward per architecture, written against Hugging Face's module layout:
             `llama` (and `mistral`, `qwen2`, which share it) and `gpt_bigcode`
    hf       any other decoder-only model: Hugging Face's own forward with our paged attention
             registered as its attention function (`flora.engine.models.hf`)
"""

from __future__ import annotations

import torch

from flora.engine.models.gpt_bigcode import GPTBigCodeDecoder
from flora.engine.models.hf import HFDecoder
from flora.engine.models.linear import Linears
from flora.engine.models.llama import LLAMA_FAMILY, LlamaDecoder

IMPLS = ("auto", "native", "hf")
NATIVE = {**{t: LlamaDecoder for t in LLAMA_FAMILY}, "gpt_bigcode": GPTBigCodeDecoder}


def build_decoder(model: torch.nn.Module, linears: Linears, impl: str = "auto", max_positions: int | None = None):
    """The decoder for `model`: native when its architecture has one (or `impl="native"` asks for
    it), else Hugging Face's forward with our attention (its linear layers are its own)."""
    if impl not in IMPLS:
        raise ValueError(f"model_impl={impl!r}: choose one of {IMPLS}")
    model_type = model.config.model_type
    if impl == "native" and model_type not in NATIVE:
        raise ValueError(f"no native decoder for {model_type!r} (native: {sorted(NATIVE)}); use model_impl='hf'")
    if impl != "hf" and model_type in NATIVE:
        return NATIVE[model_type](model, linears, max_positions=max_positions)
    return HFDecoder(model)


__all__ = ["IMPLS", "NATIVE", "build_decoder", "GPTBigCodeDecoder", "HFDecoder", "Linears", "LlamaDecoder"]
