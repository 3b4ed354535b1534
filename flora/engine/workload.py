"""Benchmark workloads without downloads: ShareGPT-like request lengths, Poisson arrivals, and
the paper's model shapes with random weights.

The vLLM throughput benchmark samples ShareGPT conversations: long-tailed lengths with means of
about 161 prompt and 338 output tokens (vLLM paper, LLaMA tokenizer), filtered to prompts of
4..1,024 tokens, outputs of at least 4 and requests of at most 2,048 tokens. We draw each
length from a lognormal with that mean (sigma 1.0 for prompts, 0.8 for outputs) and apply the
same filter; `min_total`/`max_total` narrow it further (the FLoRA paper's 1,000-request subset
spans 50 to 2,000 tokens). `scale` then multiplies both lengths (smaller runs with the same
shape of distribution), clipped to at least `min_tokens`.
"""

from __future__ import annotations

import math

import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, LlamaConfig, LlamaForCausalLM

PROMPT_MEAN, PROMPT_SIGMA = 161, 1.0
OUTPUT_MEAN, OUTPUT_SIGMA = 338, 0.8


def sharegpt_like_lengths(
    n: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    min_total: int = 8,
    max_total: int = 2048,
    min_tokens: int = 4,
) -> list[tuple[int, int]]:
    """`n` (prompt tokens, output tokens) pairs, reproducible for a given seed."""
    if n < 1 or scale <= 0 or min_tokens < 1 or not 8 <= min_total <= max_total:
        raise ValueError(
            f"n={n}, scale={scale}, min_tokens={min_tokens}, min_total={min_total}, "
            f"max_total={max_total}: need n >= 1, scale > 0, min_tokens >= 1, 8 <= min_total <= max_total"
        )
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[int, int]] = []
    while len(out) < n:
        p = _lognormal(gen, PROMPT_MEAN, PROMPT_SIGMA)
        o = _lognormal(gen, OUTPUT_MEAN, OUTPUT_SIGMA)
        if 4 <= p <= 1024 and o >= 4 and min_total <= p + o <= max_total:
            out.append((max(min_tokens, round(p * scale)), max(min_tokens, round(o * scale))))
    return out


def _lognormal(gen: torch.Generator, mean: float, sigma: float) -> int:
    """An integer draw from the lognormal with this mean and log-space sigma."""
    z = float(torch.randn((), generator=gen))
    return int(math.exp(z * sigma + math.log(mean) - sigma * sigma / 2))


def poisson_arrivals(n: int, rate_per_s: float, *, seed: int = 0) -> list[float]:
    """Arrival times (seconds from 0) of `n` requests of a Poisson process at `rate_per_s`."""
    if rate_per_s <= 0:
        raise ValueError(f"rate_per_s={rate_per_s}: must be > 0")
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate_per_s, generator=gen)
    return torch.cumsum(gaps, 0).tolist()


# Published configs: (architecture, width, heads, kv heads, layers, feed-forward width, vocabulary).
MODELS = {
    "starcoder-1b": ("gpt_bigcode", 2048, 16, 1, 24, 8192, 49152),
    "starcoder-3b": ("gpt_bigcode", 2816, 22, 1, 36, 11264, 49152),
    "starcoder-15b": ("gpt_bigcode", 6144, 48, 1, 40, 24576, 49152),
    "llama-2-7b": ("llama", 4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": ("llama", 5120, 40, 40, 40, 13824, 32000),
}


def build_model(name: str, shrink: int, device: torch.device, dtype: torch.dtype, seed: int):
    """The model `name` from its published config divided by `shrink`, random weights."""
    arch, width, heads, kv_heads, layers, ffn, vocab = MODELS[name]
    heads_k = max(1, heads // shrink)
    width_k = width if shrink == 1 else max(32 * heads_k, width // shrink // heads_k * heads_k)
    kv_k = heads_k if kv_heads == heads else max(1, kv_heads // shrink)
    layers_k, ffn_k, vocab_k = max(2, layers // shrink), max(64, ffn // shrink), max(256, vocab // shrink)
    torch.manual_seed(seed)
    if arch == "gpt_bigcode":
        config = GPTBigCodeConfig(
            vocab_size=vocab_k, n_positions=2048, n_embd=width_k, n_layer=layers_k, n_head=heads_k,
            n_inner=ffn_k, multi_query=kv_k == 1, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )
        cls = GPTBigCodeForCausalLM
    else:
        config = LlamaConfig(
            vocab_size=vocab_k, hidden_size=width_k, intermediate_size=ffn_k, num_hidden_layers=layers_k,
            num_attention_heads=heads_k, num_key_value_heads=kv_k, max_position_embeddings=2048,
            bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )
        cls = LlamaForCausalLM
    with torch.device(device):
        model = cls(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
