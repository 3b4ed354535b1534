"""Helpers for the engine tests: tiny decoders, a zoo of adapters, and the independent reference.

The reference for a request is Hugging Face `generate`, run alone (no padding, no batching) on a
copy of the base model with the request's adapter merged into the weights (`merge_into`), which
shares no code with the engine, its cache, the adapter banks or the adapted layers.
"""

from __future__ import annotations

import copy

import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, LlamaConfig, LlamaForCausalLM

import flora
from tests.flora.test_models import merge_into, randomised

VOCAB = 128
EOS = 1
ARCHS = ("gpt_bigcode", "llama")
# Targets per architecture: gpt_bigcode adapts the q,k columns of the fused c_attn (the paper's
# choice, a column range); llama adapts q, v and the MLP's down projection (IA3 scales its input).
TARGETS = {
    "gpt_bigcode": "gpt_bigcode",
    "llama": [r"model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)"],
}
FEEDFORWARD = {"gpt_bigcode": (), "llama": ("down_proj",)}


def tiny_decoder(arch: str, seed: int = 0, context: int = 96) -> torch.nn.Module:
    """A 2-layer decoder with random weights. initializer_range=0.2 (not the default 0.02) so
    that greedy outputs vary from token to token and depend on positions: with the default,
    such a model repeats one token forever and most bugs would go unseen."""
    torch.manual_seed(seed)
    if arch == "gpt_bigcode":
        config = GPTBigCodeConfig(
            vocab_size=VOCAB, n_positions=context, n_embd=64, n_layer=2, n_head=4, multi_query=True,
            initializer_range=0.2, bos_token_id=0, eos_token_id=EOS,
        )
        return GPTBigCodeForCausalLM(config).eval()
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, initializer_range=0.2,
        bos_token_id=0, eos_token_id=EOS, pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def injected(base: torch.nn.Module, arch: str, max_slots: int, max_rank: int = 4, max_lora_rank: int = 8, **kw):
    model = copy.deepcopy(base)
    banks = flora.inject(model, TARGETS[arch], max_slots=max_slots, max_rank=max_rank, max_lora_rank=max_lora_rank, **kw)
    return model, banks


def adapter_zoo(banks: flora.AdapterBanks, arch: str, count: int, seed: int = 0) -> dict[str, flora.Adapter]:
    """`count` distinct adapters cycling through FLoRA ranks 1-4, LoRA ranks 1-8, IA3, and FLoRA
    on half of the target modules, all moved far from the identity."""
    shapes = banks.module_shapes
    half = dict(list(shapes.items())[::2])
    ff = tuple(p for p in shapes if any(p.endswith(m) for m in FEEDFORWARD[arch]))
    zoo = {}
    for i in range(count):
        s = seed + i
        kind = ("flora", "lora", "ia3", "flora_half")[i % 4]
        if kind == "flora":
            adapter = flora.init_adapter("flora", 1 + (i // 4) % 4, shapes, seed=s)
        elif kind == "lora":
            adapter = flora.init_adapter("lora", 1 + (i // 4) % 8, shapes, scale=2.0, seed=s)
        elif kind == "ia3":
            adapter = flora.init_adapter("ia3", 1, shapes, feedforward_modules=ff)
        else:
            adapter = flora.init_adapter("flora", 2, half, seed=s)
        zoo[f"{kind}{i}_r{adapter.config.rank}"] = randomised(adapter, 1000 + s)
    return zoo


class Reference:
    """Greedy `generate` per request on merged copies of the base model (merged once per adapter)."""

    def __init__(self, base: torch.nn.Module, adapters: dict[str, flora.Adapter]):
        self.base = base
        self.adapters = adapters
        self._merged: dict[str | None, torch.nn.Module] = {None: base}

    def model(self, adapter: str | None) -> torch.nn.Module:
        if adapter not in self._merged:
            self._merged[adapter] = merge_into(self.base, self.adapters[adapter])
        return self._merged[adapter]

    @torch.no_grad()
    def generate(self, prompt, adapter: str | None, max_new_tokens: int, eos: int | None = EOS) -> list[int]:
        ids = torch.tensor([list(prompt)])
        out = self.model(adapter).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos, pad_token_id=0,
        )
        return out[0, ids.shape[1]:].tolist()

    @torch.no_grad()
    def logprobs(self, prompt, adapter: str | None, output) -> torch.Tensor:
        """log-softmax of the next-token logits at every output position: [len(output), V]."""
        ids = torch.tensor([list(prompt) + list(output)])
        logits = self.model(adapter)(ids).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.float(), dim=-1)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def dict_loader(adapters: dict[str, flora.Adapter], calls: list[str] | None = None):
    """A loader over a dict, recording the names it is asked for."""

    def load(name: str) -> flora.Adapter:
        if calls is not None:
            calls.append(name)
        if name not in adapters:
            raise KeyError(f"no adapter {name!r}")
        return adapters[name]

    return load
