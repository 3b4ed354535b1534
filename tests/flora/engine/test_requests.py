"""The request API around the step loop: bad requests rejected with clear errors and without
disturbing running ones, failures kept to their request, stop strings, the context limit,
streaming and cancelling from other threads, and the metrics."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import flora
from flora.engine import Engine, EngineConfig, Request, RequestRejected, SamplingParams
from tests.flora.tiny_models import tiny_whisper
from tests.flora.engine.reference import (
    Reference, adapter_zoo, dict_loader, injected, random_prompts, tiny_decoder,
)

CONTEXT = 96


@pytest.fixture(scope="module")
def setup():
    base = tiny_decoder("gpt_bigcode", context=CONTEXT)
    model, banks = injected(base, "gpt_bigcode", max_slots=4)
    zoo = adapter_zoo(banks, "gpt_bigcode", 3, seed=20)
    return base, model, zoo, Reference(base, zoo)


def chars(ids) -> str:
    """A toy detokenizer: one letter per token."""
    return "".join(chr(ord("a") + t % 26) for t in ids)


def test_bad_requests_are_rejected_and_running_ones_carry_on(setup):
    base, model, zoo, ref = setup
    names = list(zoo)
    other = flora.init_adapter("flora", 1, {"transformer.h.0.attn.c_attn": [32, 16]}, base_model="other-model")
    engine = Engine(model, loader=dict_loader({**zoo, "other": other}), config=EngineConfig(max_batch_rows=4, max_batch_tokens=16))
    prompts = random_prompts([8, 20, 5], seed=21)
    good = [engine.add_request(Request(p, adapter=a, max_new_tokens=12)) for p, a in zip(prompts, [None, *names[:2]])]
    for _ in range(3):
        engine.step()
    bad = {
        "prompt is empty": lambda: Request([]),
        "prompt has 96 tokens but the model's context is 96": lambda: Request([5] * CONTEXT),
        "max_new_tokens=0": lambda: Request([5], max_new_tokens=0),
        "max_new_tokens=-3": lambda: Request([5], max_new_tokens=-3),
        r"outside the vocabulary \[0, 128\)": lambda: Request([5, 128]),
        "stop_strings need a detokenizer": lambda: Request([5], stop_strings=["x"]),
        "temperature": lambda: Request([5], sampling=SamplingParams(temperature=-1)),
        "adapter=''": lambda: Request([5], adapter=""),
    }
    for match, make in bad.items():
        with pytest.raises(RequestRejected, match=match):
            engine.add_request(make())
        engine.step()
    # Adapters are checked when loaded, in the background: the request ends with an error.
    unknown = engine.add_request(Request([5, 6], adapter="nope"))
    misfit = engine.add_request(Request([5, 6], adapter="other"))
    while engine.has_work:
        if not engine.step():
            time.sleep(0.002)
    assert unknown.result().finish_reason == "error" and "could not be loaded" in unknown.result().error
    assert misfit.result().finish_reason == "error"
    assert "made for another base model" in misfit.result().error and "other-model" in misfit.result().error
    for h in good:
        out = h.result()
        assert list(out.output_ids) == ref.generate(h.request.prompt, h.request.adapter, 12)
    metrics = engine.metrics.snapshot()
    assert metrics["requests_rejected"] == 3  # too long, outside the vocabulary, no detokenizer (the engine's checks)
    assert metrics["requests_failed"] == 2 and metrics["requests_finished"] == 3
    engine.close()


def test_no_banks_or_no_loader_rejects_adapters_at_once(setup):
    base, model, zoo, _ = setup
    with pytest.raises(RequestRejected, match="no adapter banks"):
        Engine(base).add_request(Request([5], adapter="julia"))
    with pytest.raises(RequestRejected, match="unknown adapter 'julia'"):
        Engine(model).add_request(Request([5], adapter="julia"))
    with pytest.raises(ValueError, match="encoder-decoder"):
        Engine(tiny_whisper())


def test_an_error_in_one_request_fails_only_that_request(setup):
    base, model, zoo, ref = setup

    def detokenize(ids):  # only the victim has stop strings, so only it calls this
        if len(ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken token")
        return chars(ids)

    engine = Engine(model, loader=dict_loader(zoo), detokenize=detokenize)
    prompts = random_prompts([6, 9, 12], seed=22)
    requests = [
        Request(prompts[0], adapter=list(zoo)[0], max_new_tokens=10),
        Request(prompts[1], max_new_tokens=10, stop_strings=["zzzz"]),
        Request(prompts[2], adapter=list(zoo)[1], max_new_tokens=10),
    ]
    outputs = engine.generate(requests)
    assert outputs[1].finish_reason == "error" and "broken token" in outputs[1].error
    assert len(outputs[1].output_ids) == 3
    for i in (0, 2):
        assert outputs[i].ok and list(outputs[i].output_ids) == ref.generate(requests[i].prompt, requests[i].adapter, 10)
    with pytest.raises(flora.engine.RequestFailed, match="broken token"):
        outputs[1].raise_for_error()


def test_a_forward_that_fails_on_one_prompt_fails_only_that_request(setup):
    base, model, zoo, ref = setup
    poison = 127
    embeddings = model.get_input_embeddings()
    forward = embeddings.forward

    def fragile_forward(input_ids):  # a model that cannot digest one token
        if (input_ids == poison).any():
            raise RuntimeError("poisoned input")
        return forward(input_ids)

    engine = Engine(model, loader=dict_loader(zoo), config=EngineConfig(max_batch_rows=4, max_batch_tokens=64))
    prompts = random_prompts([6, 9, 12, 4], seed=27)
    prompts = [[t % poison for t in p] for p in prompts]  # only the victim holds the poison
    prompts[2][3] = poison
    requests = [Request(p, adapter=a, max_new_tokens=8) for p, a in zip(prompts, [None, *zoo])]
    embeddings.forward = fragile_forward
    try:
        outputs = engine.generate(requests)  # all four prompts share one forward
    finally:
        embeddings.forward = forward
    assert outputs[2].finish_reason == "error" and "poisoned input" in outputs[2].error
    for i in (0, 1, 3):
        assert outputs[i].ok and list(outputs[i].output_ids) == ref.generate(prompts[i], requests[i].adapter, 8)
    assert engine.metrics.snapshot()["requests_failed"] == 1


def test_stop_strings_and_the_context_limit(setup):
    base, model, zoo, ref = setup
    adapter = list(zoo)[2]
    prompt = random_prompts([10], seed=23)[0]
    full = ref.generate(prompt, adapter, 20, eos=None)
    text = chars(full)
    stop = text[6:9]  # a stop string that completes at output token 9 (or earlier)
    first = next(k for k in range(1, 21) if stop in chars(full[:k]))
    engine = Engine(model, loader=dict_loader(zoo), detokenize=chars)
    out = engine.generate([Request(prompt, adapter=adapter, max_new_tokens=20, stop_strings=["never", stop], ignore_eos=True)])[0]
    assert list(out.output_ids) == full[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    # A prompt 3 tokens short of the context gets 3 new tokens, as generate would give it.
    long_prompt = random_prompts([CONTEXT - 3], seed=24)[0]
    out = engine.generate([Request(long_prompt, max_new_tokens=10, ignore_eos=True)])[0]
    assert out.finish_reason == "length" and list(out.output_ids) == ref.generate(long_prompt, None, 3, eos=None)


def test_streaming_and_cancelling_from_other_threads(setup):
    base, model, zoo, ref = setup
    names = list(zoo)
    engine = Engine(model, loader=dict_loader(zoo), config=EngineConfig(max_batch_rows=3, max_batch_tokens=24)).start()
    try:
        prompts = random_prompts([7, 11, 5, 14], seed=25)
        results: dict[int, list] = {}

        def client(i, adapter, cancel_after=None):
            handle = engine.add_request(Request(prompts[i], adapter=adapter, max_new_tokens=15, ignore_eos=True))
            events = []
            for event in handle:
                events.append(event)
                if cancel_after is not None and len(events) == cancel_after:
                    handle.cancel()
            results[i] = (events, handle.result(timeout_s=30))

        threads = [
            threading.Thread(target=client, args=(0, names[0])),
            threading.Thread(target=client, args=(1, None, 4)),
            threading.Thread(target=client, args=(2, names[1])),
            threading.Thread(target=client, args=(3, names[0])),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 4
        for i, (events, out) in results.items():
            assert [e.index for e in events] == list(range(len(events)))
            assert tuple(e.token_id for e in events) == out.output_ids
            expected = ref.generate(prompts[i], out.adapter, 15, eos=None)
            if i == 1:
                assert out.finish_reason == "cancelled" and 4 <= len(out.output_ids) < 15
                assert list(out.output_ids) == expected[: len(out.output_ids)]
            else:
                assert out.finish_reason == "length" and list(out.output_ids) == expected
        # A request cancelled while it waits ends at once, with no tokens.
        engine.stop()
        waiting = engine.add_request(Request(prompts[0], max_new_tokens=5))
        waiting.cancel()
        engine.start()
        assert waiting.result(timeout_s=10).finish_reason == "cancelled" and waiting.result().output_ids == ()
        with pytest.raises(RuntimeError, match="own thread"):
            engine.step()
    finally:
        engine.close()


def test_metrics(setup):
    base, model, zoo, _ = setup
    engine = Engine(model, loader=dict_loader(zoo), config=EngineConfig(max_batch_rows=2, max_batch_tokens=8))
    requests = [Request(p, adapter=a, max_new_tokens=6, ignore_eos=True)
                for p, a in zip(random_prompts([5, 12, 3, 9, 4], seed=26), [None, *zoo, None])]
    handles = [engine.add_request(r) for r in requests]
    seen = []
    while engine.has_work:
        if engine.step():
            seen.append(engine.metrics.snapshot())
        else:
            time.sleep(0.002)
    assert max(m["queue_length"] for m in seen) >= 2  # two rows at a time: the others queue
    assert max(m["running_rows"] for m in seen) == 2
    assert max(m["prefilling_rows"] for m in seen) >= 1
    final = engine.metrics.snapshot()
    assert final["generated_tokens"] == 30 and final["prompt_tokens"] == sum(len(r.prompt) for r in requests)
    assert final["requests_finished"] == 5 and final["running_rows"] == 0 and final["queue_length"] == 0
    assert final["tokens_per_s"] > 0 and final["adapters_resident"] == 3 and final["evictions"] == 0
    assert 0 < final["ttft_s_p50"] <= final["latency_s_p90"] and final["itl_s_mean"] > 0
    outs = [h.result() for h in handles]
    assert all(o.ttft_s is not None and o.ttft_s <= o.latency_s for o in outs)
    assert torch.tensor([o.ttft_s for o in outs]).mean().item() == pytest.approx(final["ttft_s_mean"])
