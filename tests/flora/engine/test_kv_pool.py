"""The engine over its KV pool: prefix reuse only under the same adapter load, a pool too small
for a prompt or a long generation, requests holding in the queue until blocks free up, a cancel
that takes effect before the next token, and the llama-family architectures that share our
forward. Outputs are checked against merged-weight `generate` throughout."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flora.engine import Engine, EngineConfig, Request, RequestRejected
from tests.flora.engine.reference import (
    Reference, VOCAB, adapter_zoo, dict_loader, injected, random_prompts, tiny_decoder,
)


def test_prefix_blocks_are_reused_under_the_same_adapter_load_only():
    base = tiny_decoder("llama", seed=4)
    model, banks = injected(base, "llama", max_slots=4)
    zoo = adapter_zoo(banks, "llama", 2, seed=30)
    a, b = list(zoo)
    engine = Engine(model, loader=dict_loader(zoo), config=EngineConfig(max_batch_rows=4, block_size=16))
    ref = Reference(base, zoo)
    prompt = random_prompts([45], seed=31)[0]  # two full blocks before its last token
    suffixed = prompt[:40] + random_prompts([9], seed=32)[0]  # shares the first two blocks

    def run(p, adapter):
        before = engine.blocks.hits
        (out,) = engine.generate([Request(p, adapter=adapter, max_new_tokens=12, ignore_eos=True)])
        assert list(out.output_ids) == ref.generate(p, adapter, 12, eos=None), adapter
        return engine.blocks.hits - before

    assert run(prompt, a) == 0
    assert run(prompt, a) == 2  # the same prompt, the same adapter: its full blocks again
    assert run(suffixed, a) == 2  # a prompt sharing the prefix
    assert run(prompt, b) == 0  # the same tokens under another adapter: nothing shared
    assert run(prompt, None) == 0  # nor under the base model
    assert run(prompt, None) == 2
    engine.unload_adapter(a)  # loaded again later: another load, whose keys may differ
    assert run(prompt, a) == 0
    engine.close()


def test_a_pool_too_small_refuses_prompts_and_caps_generations_but_serves_everyone():
    base = tiny_decoder("gpt_bigcode", seed=5)
    engine = Engine(base, config=EngineConfig(max_batch_rows=4, max_batch_tokens=64, block_size=16, kv_cache_tokens=64))
    ref = Reference(base, {})
    assert engine.max_seq_len == 65 < engine.context_len  # 4 blocks of 16, plus the last token drawn
    with pytest.raises(RequestRejected, match="KV cache holds at most 64"):
        engine.add_request(Request(random_prompts([70], seed=1)[0]))
    # alone, a long generation stops where the pool ends
    prompt = random_prompts([10], seed=2)[0]
    (capped,) = engine.generate([Request(prompt, max_new_tokens=80, ignore_eos=True)])
    assert capped.finish_reason == "length" and list(capped.output_ids) == ref.generate(prompt, None, 55, eos=None)
    # together, six requests need 3x the pool: they hold in the queue or are preempted, all finish
    prompts = random_prompts([20, 33, 5, 40, 12, 25], seed=3)
    outputs = engine.generate([Request(p, max_new_tokens=20, ignore_eos=True) for p in prompts])
    for p, out in zip(prompts, outputs):
        assert out.finish_reason == "length" and list(out.output_ids) == ref.generate(p, None, 20, eos=None)
    snap = engine.metrics.snapshot()
    assert snap["preemptions"] >= 1 and snap["kv_blocks_free"] == snap["kv_blocks_total"] == 4
    engine.close()


def test_a_cancelled_request_gets_no_token_after_the_cancel():
    base = tiny_decoder("llama", seed=6)
    engine = Engine(base, config=EngineConfig(max_batch_rows=2))
    prompts = random_prompts([6, 9], seed=7)
    victim = engine.add_request(Request(prompts[0], max_new_tokens=30, ignore_eos=True))
    other = engine.add_request(Request(prompts[1], max_new_tokens=12, ignore_eos=True))
    for _ in range(4):  # both prompts in the first step (one token each), then three decode steps
        engine.step()
    victim.cancel()
    engine.step()  # the cancel is taken before this step's forward
    out = victim.result(timeout_s=5)
    assert out.finish_reason == "cancelled" and len(out.output_ids) == 4
    assert list(out.output_ids) == Reference(base, {}).generate(prompts[0], None, 4, eos=None)
    while engine.has_work:
        engine.step()
    assert other.result().finish_reason == "length" and len(other.result().output_ids) == 12
    engine.close()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_llama_family_models_share_the_native_forward(arch):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=96, initializer_range=0.2,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # q, k, v projections with a bias
    engine = Engine(model, config=EngineConfig(max_batch_rows=3, max_batch_tokens=32))
    assert type(engine.decoder).__name__ == "LlamaDecoder"
    prompts = random_prompts([7, 30, 3], seed=8)
    outputs = engine.generate([Request(p, max_new_tokens=15, ignore_eos=True) for p in prompts])
    ref = Reference(model, {})
    assert [list(o.output_ids) for o in outputs] == [ref.generate(p, None, 15, eos=None) for p in prompts]
    with pytest.raises(ValueError, match="sliding_window=16"):
        Engine(MistralForCausalLM(MistralConfig(**common, sliding_window=16)).eval())
