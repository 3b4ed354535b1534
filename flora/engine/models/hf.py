"""Any decoder-only Hugging Face model: its own forward over the packed step as one row
(`[1, T]` ids and positions), with our paged attention registered as its attention function.

Transformers hands every attention module's queries, keys and values to the function named by
`config._attn_implementation`; the engine names ours (`flora_paged`) for the length of its own
forwards and passes the step's `StepAttention` through the forward's keyword arguments. Without
that argument (any forward outside the engine) the function is PyTorch's SDPA, as usual. No
attention mask is built: our name has no mask function, which transformers takes to mean that
the attention function masks by itself (as the paged one does, per sequence).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "flora_paged"
_lock = threading.Lock()


def flora_paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None)."""
    step = kwargs.get("flora_attention")
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = step.attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scale)
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, flora_paged_attention)


class HFDecoder:
    def __init__(self, model: torch.nn.Module):
        config = model.config
        self.model = model
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if getattr(config, "multi_query", False):
            self.kv_heads = 1

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        with self._paged():
            out = self.base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                            flora_attention=attention)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @contextmanager
    def _paged(self):
        config = self.model.config
        with _lock:
            previous = config._attn_implementation
            config._attn_implementation = NAME
        try:
            yield
        finally:
            config._attn_implementation = previous
