"""The llama family (llama, mistral, qwen2) over packed tokens, from the Hugging Face modules.

Per layer, as `LlamaDecoderLayer` computes it for one sequence:
    x = input_layernorm(h); q, k, v = q_proj(x), k_proj(x), v_proj(x)      [T, H·D], [T, Hkv·D]
    q, k = rotary(q, k, positions)                                          cos/sin looked up per token
    h = h + o_proj(paged_attention(q, k, v))
    x = post_attention_layernorm(h); h = h + down_proj(act(gate_proj(x)) * up_proj(x))
The rotary table is computed once, for every position, by the model's own rotary module (so any
rope scaling it implements applies), and looked up by each token's position. Hugging Face's
`rotate_half(x) * sin` is computed as `x.roll(D/2) * sin_signed` (the first half of sin
negated): the same products, one op less. Linear layers run through `Linears` (plain ones
reading the same input may share one matmul).
"""

from __future__ import annotations

import torch

from flora.engine.models.linear import Linears

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


class LlamaDecoder:
    def __init__(self, model: torch.nn.Module, linears: Linears, max_positions: int | None = None):
        config = model.config
        window = getattr(config, "sliding_window", None)
        context = max_positions or config.max_position_embeddings
        if window is not None and window < context:
            raise ValueError(
                f"{config.model_type} with sliding_window={window} < context {context}: the engine attends "
                "to the whole context; cap the context (EngineConfig.max_model_len) at the window"
            )
        core = model.model
        self.embed = core.embed_tokens
        self.norm = core.norm
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = []
        for layer in core.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm, linears.group(attn.q_proj, attn.k_proj, attn.v_proj), attn.scaling,
                linears.group(attn.o_proj), layer.post_attention_layernorm,
                linears.group(mlp.gate_proj, mlp.up_proj), mlp.act_fn, linears.group(mlp.down_proj),
            ))
        self.lm_head = linears.group(model.lm_head)
        weight = self.embed.weight
        with torch.no_grad():
            positions = torch.arange(context, device=weight.device)[None]
            cos, sin = core.rotary_emb(weight[:1].unsqueeze(0), positions)  # [1, context, D] in the model's dtype
            half = self.head_dim // 2
            self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        t, d = input_ids.shape[0], self.head_dim
        half = d // 2
        h = self.embed(input_ids)  # [T, hidden]
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # [T, 1, D]
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        for i, (norm1, qkv, scaling, o_proj, norm2, gate_up, act, down) in enumerate(self.layers):
            q, k, v = qkv(norm1(h))
            q, k, v = q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)  # [T, H, D], [T, Hkv, D]
            q = (q * cos) + (q.roll(half, -1) * sin)
            k = (k * cos) + (k.roll(half, -1) * sin)
            o = attention.attend(i, q, k, v, scaling)  # [T, H, D]
            h = h + o_proj(o.reshape(t, -1))[0]
            gate, up = gate_up(norm2(h))
            h = h + down(act(gate) * up)[0]
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[0]
