"""Greedy engine outputs equal Hugging Face `generate` run alone on a copy of the base model with
the request's adapter merged into the weights: rows of 18 adapters of mixed kinds and ranks plus
the base model in every forward, staggered arrivals, prompts longer than a step's token budget
(chunked prefill), more adapters than slots (evictions, background loads), a KV pool too small
for everyone (preemption and recompute), and the same prompt under different adapters (no KV
shared across adapters); through our forward and through Hugging Face's modules, with the
PyTorch attention and with the Triton kernel over CUDA-graph-style static buffers.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from flora.engine import Engine, EngineConfig, Request, SamplingParams
from flora.kernels import HAS_TRITON
from tests.flora.engine.reference import (
    ARCHS, EOS, Reference, adapter_zoo, dict_loader, injected, random_prompts, tiny_decoder,
)


def run_staggered(engine: Engine, requests: list[Request], arrivals: list[int]):
    """Add request i before engine step `arrivals[i]`; step until every request is done."""
    handles: dict[int, object] = {}
    step = 0
    while len(handles) < len(requests) or not all(h.done for h in handles.values()):
        for i, at in enumerate(arrivals):
            if at == step:
                handles[i] = engine.add_request(requests[i])
        if not engine.step():
            time.sleep(0.001)  # only background adapter loads are in flight
        step += 1
        assert step < 5000, "the engine stopped making progress"
    return [handles[i].result() for i in range(len(requests))]


# "together": slots for all 18 adapters and room for 24 rows, so that 16+ distinct adapters share
# forwards; "evicting": 7 adapter slots for 18 adapters, 6 rows, a token budget of 20, arrivals
# spread over 40 steps; "preempting": together, in a pool of 12 blocks of 16 tokens; "hf_modules":
# together through Hugging Face's forward; "triton_graphs": together with the Triton attention
# kernel, decode steps over padded static buffers; "kernels": together with every adapted layer
# through the Triton adapter kernels (FLoRA/IA3/base fused, fused LoRA). Triton runs in its
# interpreter on a CPU.
TOGETHER = dict(max_slots=20, rows=26, tokens=1024, arrive_by=2, min_new=10)
MODES = {
    "together": TOGETHER,
    "evicting": dict(max_slots=8, rows=6, tokens=20, arrive_by=40, min_new=1),
    "preempting": dict(TOGETHER, engine=dict(kv_cache_tokens=192)),
    "hf_modules": dict(TOGETHER, engine=dict(model_impl="hf")),
    "triton_graphs": dict(TOGETHER, engine=dict(attention="triton", graphs="static", max_graph_rows=32)),
    "kernels": dict(TOGETHER, inject=dict(kernels="triton", lora_impl="fused")),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_merged_generate(arch, mode):
    m = MODES[mode]
    if (m.get("engine", {}).get("attention") == "triton" or "inject" in m) and not HAS_TRITON:
        pytest.skip("needs triton")
    base = tiny_decoder(arch)
    model, banks = injected(base, arch, max_slots=m["max_slots"], **m.get("inject", {}))
    adapters = adapter_zoo(banks, arch, 18)
    names = list(adapters)
    rng = random.Random(0)
    # Every adapter at least once, the base model too, then random picks.
    picks = [None, *names, *rng.choices([None, *names], k=7)]
    lengths = [rng.randint(1, 45) for _ in picks]
    lengths[1] = 70  # longer than a step's token budget
    prompts = random_prompts(lengths, seed=1)
    for i in (1, 2, 3):  # one prompt under the base model and three adapters
        prompts[i] = prompts[0]
    max_new = [rng.randint(m["min_new"], 20) for _ in picks]
    ref = Reference(base, adapters)
    # Every third request also stops at a token its output would reach half way (or never).
    halfway = [(lambda out: out[len(out) // 2])(ref.generate(p, a, n)) for p, a, n in zip(prompts, picks, max_new)]
    stops = [(t,) if i % 3 == 2 else () for i, t in enumerate(halfway)]
    requests = [
        Request(p, adapter=a, max_new_tokens=n, stop_token_ids=s, request_id=f"r{i}")
        for i, (p, a, n, s) in enumerate(zip(prompts, picks, max_new, stops))
    ]
    arrivals = sorted(rng.randint(0, m["arrive_by"]) for _ in requests)
    arrivals[:4] = [0, 0, 0, 0]
    engine = Engine(
        model, loader=dict_loader(adapters),
        config=EngineConfig(max_batch_rows=m["rows"], max_batch_tokens=m["tokens"], **m.get("engine", {})),
    )
    adapters_per_forward = []
    banks.routing.observe(lambda route: adapters_per_forward.append(route.plan.adapters))

    outputs = run_staggered(engine, requests, arrivals)

    expected = [ref.generate(r.prompt, r.adapter, r.max_new_tokens, eos=[EOS, *r.stop_token_ids]) for r in requests]
    for r, out, exp in zip(requests, outputs, expected):
        assert out.ok, out.error
        assert list(out.output_ids) == exp, f"{r.request_id} ({r.adapter}, prompt {len(r.prompt)})"
        stopped = exp[-1] in (EOS, *r.stop_token_ids)
        assert out.finish_reason == ("stop" if stopped else "length"), r.request_id
        assert out.stop_reason == (exp[-1] if stopped else None)
    # The test can fail: the same prompt gives different outputs under different adapters ...
    assert len({tuple(e) for e in expected[:4]}) == 4
    # ... and the workload did what it claims.
    metrics = engine.metrics.snapshot()
    if mode == "evicting":
        assert metrics["evictions"] >= len(adapters) - 7
        assert max(lengths) > m["tokens"]  # prefilled in chunks
    elif mode == "preempting":
        assert metrics["preemptions"] >= 3 and metrics["evictions"] == 0
    else:
        assert max(adapters_per_forward) >= 16 and metrics["evictions"] == 0
    if mode == "triton_graphs":
        assert len(engine.runner.graphs.graphs) >= 2  # several buckets replayed with padding rows
    assert sum(len(e) < r.max_new_tokens for r, e in zip(requests, expected)) >= 3  # stopped early
    assert metrics["requests_finished"] == len(requests) and metrics["running_rows"] == 0
    engine.close()


def test_greedy_equals_generate_without_adapter_banks():
    """A plain model (no flora.inject) serves base-model requests, with rows joining mid-decode."""
    base = tiny_decoder("gpt_bigcode", seed=3)
    requests = [Request(p, max_new_tokens=n) for p, n in zip(random_prompts([7, 30, 2, 19, 11], seed=2), [12, 3, 20, 8, 16])]
    engine = Engine(base, config=EngineConfig(max_batch_rows=3, max_batch_tokens=8))
    outputs = run_staggered(engine, requests, [0, 2, 3, 9, 10])
    ref = Reference(base, {})
    for r, out in zip(requests, outputs):
        assert list(out.output_ids) == ref.generate(r.prompt, None, r.max_new_tokens)


def test_seeded_sampling_is_reproducible_in_any_batch():
    base = tiny_decoder("llama", seed=1)
    model, banks = injected(base, "llama", max_slots=4)
    adapters = adapter_zoo(banks, "llama", 3, seed=5)
    names = list(adapters)
    prompt = random_prompts([9], seed=4)[0]
    sampling = SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    target = Request(prompt, adapter=names[0], max_new_tokens=24, sampling=sampling, ignore_eos=True)
    others = [
        Request(p, adapter=a, max_new_tokens=20, sampling=SamplingParams(temperature=1.0, seed=i))
        for i, (p, a) in enumerate(zip(random_prompts([30, 4, 17, 25], seed=6), [None, *names]))
    ]
    config = EngineConfig(max_batch_rows=5, max_batch_tokens=16)
    alone = Engine(model, config=config, loader=dict_loader(adapters)).generate([target])[0]
    mixed = Engine(model, config=config, loader=dict_loader(adapters)).generate([*others[:2], target, *others[2:]])[2]
    assert alone.output_ids == mixed.output_ids
    reseeded = Request(prompt, adapter=names[0], max_new_tokens=24, ignore_eos=True,
                       sampling=SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=99))
    other_seed = Engine(model, config=config, loader=dict_loader(adapters)).generate([reseeded])[0]
    assert other_seed.output_ids != alone.output_ids  # the seed matters, so the test can fail
    greedy = Reference(base, adapters).generate(prompt, names[0], 24, eos=None)
    assert list(alone.output_ids) != greedy  # it did sample


def test_logprobs_match_the_merged_model():
    base = tiny_decoder("gpt_bigcode", seed=2)
    model, banks = injected(base, "gpt_bigcode", max_slots=4)
    adapters = adapter_zoo(banks, "gpt_bigcode", 3, seed=7)
    prompts = random_prompts([5, 23, 12], seed=8)
    requests = [
        Request(p, adapter=a, max_new_tokens=10, sampling=SamplingParams(temperature=0.8, seed=i, logprobs=3))
        for i, (p, a) in enumerate(zip(prompts, [None, *list(adapters)[:2]]))
    ]
    outputs = Engine(model, loader=dict_loader(adapters), config=EngineConfig(max_batch_rows=3, max_batch_tokens=12)).generate(requests)
    ref = Reference(base, adapters)
    for r, out in zip(requests, outputs):
        expected = ref.logprobs(r.prompt, r.adapter, out.output_ids)  # [n, V]
        chosen = expected.gather(1, torch.tensor(out.output_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=2e-4, rtol=2e-4)
        for step, top in enumerate(out.top_logprobs):
            values, ids = expected[step].topk(3)
            assert [t for t, _ in top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([p for _, p in top]), values, atol=2e-4, rtol=2e-4)
