"""How the engine's decoders run their linear layers.

    linears = Linears.build(model, "onednn")           # or "torch"
    q, k, v = linears.group(attn.q_proj, attn.k_proj, attn.v_proj)(x)
    logits = linears.group(model.lm_head)(hidden)[0]

`torch`: each layer is called as a module (`F.linear`; adapted layers through their route).

`onednn` (CPU): PyTorch's CPU matmuls go through MKL, which on some CPUs (AMD's among them) is
2-4x slower at decode batch sizes than oneDNN, the library vLLM's CPU backend uses (measured in
`jobs/bench_engine.py`'s notes: a 4x512 by 512x1376 matmul, 150 us in MKL, 40 us in oneDNN with a
prepacked weight). Here plain `nn.Linear` layers run through oneDNN on weights prepacked once
(a second, reordered copy of those weights); plain layers reading the same input share one
packed weight and one matmul (q|k|v, gate|up); adapted layers get the same kernel for their base
matmuls through the route (`Route.linear`), for their weights and column ranges. The original
weights stay as they are: the model still trains and runs outside the engine.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from flora.layers import AdaptedLinear

log = logging.getLogger(__name__)

MODES = ("torch", "onednn")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


class Linears:
    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"linear mode {mode!r}: choose one of {MODES}")
        self.mode = mode
        self._packed: dict[tuple, torch.Tensor] = {}  # weight identity -> packed copy

    @classmethod
    def build(cls, model: nn.Module, mode: str) -> Linears:
        """`mode`: "torch", or "onednn" (CPU float32/bfloat16 weights only; else falls back to torch)."""
        weight = model.get_input_embeddings().weight
        if mode == "onednn" and (weight.device.type != "cpu" or not onednn_available()
                                 or weight.dtype not in (torch.float32, torch.bfloat16)):
            log.info("oneDNN matmuls need CPU float32/bfloat16 weights and PyTorch's mkldnn ops; using torch's")
            mode = "torch"
        linears = cls(mode)
        if mode == "onednn":
            # The base weights of adapted layers (and of their column ranges), for `Route.linear`.
            for layer in (m for m in model.modules() if isinstance(m, AdaptedLinear)):
                w = layer.base.weight
                if layer.columns is None:
                    linears._pack(w, remember=True)
                else:
                    lo, hi = layer.columns
                    for part in (w[:lo], w[lo:hi], w[hi:]):
                        if part.shape[0]:
                            linears._pack(part, remember=True)
        return linears

    def group(self, *modules: nn.Module):
        """A function of `x` returning each module's output on `x`, in order."""
        if self.mode == "torch":
            return lambda x: tuple(m(x) for m in modules)
        plain = [i for i, m in enumerate(modules) if type(m) is nn.Linear]
        if not plain:
            return lambda x: tuple(m(x) for m in modules)
        weights = [modules[i].weight for i in plain]
        biases = [modules[i].bias for i in plain]
        fused = self._pack(torch.cat(weights)) if len(weights) > 1 else self._pack(weights[0], remember=True)
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        sizes = [w.shape[0] for w in weights]

        def run(x):
            out = list(modules[i](x) if i not in plain else None for i in range(len(modules)))
            y = _onednn(x, fused, bias)
            for i, part in zip(plain, y.split(sizes, dim=-1) if len(sizes) > 1 else (y,)):
                out[i] = part
            return tuple(out)

        return run

    def route_linear(self):
        """`linear(x, weight, bias)` for `Route.linear`: oneDNN on the packed copy when there is one."""
        if self.mode == "torch":
            return F.linear
        packed = self._packed

        def linear(x, weight, bias=None):
            return _onednn(x, packed.get(_identity(weight), weight), bias)

        return linear

    def _pack(self, weight: torch.Tensor, remember: bool = False) -> torch.Tensor:
        """oneDNN's layout of `weight` (for any batch size; 64 is only a hint). `remember`: look it
        up by the weight's identity later (a model's own parameter, not a temporary)."""
        key = _identity(weight)
        if key in self._packed:
            return self._packed[key]
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)
        if remember:
            self._packed[key] = packed
        return packed


def _identity(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), tuple(weight.shape), weight.dtype


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 2 and x.is_contiguous():  # packed tokens: no views to make, each one a dispatch
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])
