"""gpt_bigcode (StarCoder) over packed tokens, from the Hugging Face modules.

Per block, as `GPTBigCodeBlock` computes it for one sequence:
    q | k | v = attn.c_attn(ln_1(h))      multi-query: [T, H·D | D | D]; else per head [H, 3·D]
    h = h + attn.c_proj(paged_attention(q, k, v))
    h = h + mlp.c_proj(act(mlp.c_fc(ln_2(h))))
with learned absolute positions added to the token embeddings. Linear layers run through `Linears`.
"""

from __future__ import annotations

import torch

from flora.engine.models.linear import Linears


class GPTBigCodeDecoder:
    def __init__(self, model: torch.nn.Module, linears: Linears, max_positions: int | None = None):
        config = model.config
        core = model.transformer
        self.wte, self.wpe = core.wte, core.wpe
        self.ln_f = core.ln_f
        self.hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden // self.num_heads
        self.multi_query = config.multi_query
        self.kv_heads = 1 if self.multi_query else self.num_heads
        self.scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.blocks = [
            (b.ln_1, linears.group(b.attn.c_attn), linears.group(b.attn.c_proj), b.ln_2,
             linears.group(b.mlp.c_fc), b.mlp.act, linears.group(b.mlp.c_proj))
            for b in core.h
        ]
        self.lm_head = linears.group(model.lm_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        t, d = input_ids.shape[0], self.head_dim
        h = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        for i, (ln_1, c_attn, c_proj, ln_2, c_fc, act, mlp_proj) in enumerate(self.blocks):
            qkv = c_attn(ln_1(h))[0]
            if self.multi_query:  # [T, hidden + 2·D]
                q, k, v = qkv.split((self.hidden, d, d), dim=-1)
                q, k, v = q.reshape(t, self.num_heads, d), k.view(t, 1, d), v.view(t, 1, d)
            else:  # [T, H, 3·D]: q, k, v per head
                q, k, v = qkv.view(t, self.num_heads, 3 * d).split(d, dim=-1)
                q = q.contiguous()
            o = attention.attend(i, q, k, v, self.scale)  # [T, H, D]
            h = h + c_proj(o.reshape(t, self.hidden))[0]
            h = h + mlp_proj(act(c_fc(ln_2(h))[0]))[0]
        return self.ln_f(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[0]
