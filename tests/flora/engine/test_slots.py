"""Adapter slots: LRU eviction of adapters no request uses, background loading that delays
only its own requests, no starvation of a request waiting for a slot, load failures."""

from __future__ import annotations

import re
import threading
import time

import pytest

import flora
from flora.engine import DirectoryLoader, Engine, EngineConfig, Request, RequestRejected
from flora.engine.scheduler import Admission
from flora.engine.slots import SlotManager
from tests.flora.engine.reference import Reference, adapter_zoo, dict_loader, injected, random_prompts, tiny_decoder


@pytest.fixture(scope="module")
def setup():
    base = tiny_decoder("gpt_bigcode")
    model, banks = injected(base, "gpt_bigcode", max_slots=3)  # two adapter slots
    return base, model, banks, adapter_zoo(banks, "gpt_bigcode", 4)


def acquire(slots: SlotManager, name: str):
    """Acquire, letting a background load finish first."""
    for _ in range(2000):
        status, slot = slots.acquire(name)
        if status is not Admission.WAIT:
            return status, slot
        time.sleep(0.002)
        slots.poll()
    raise AssertionError(f"{name} never loaded")


def test_lru_eviction_spares_adapters_in_use(setup):
    _, model, banks, zoo = setup
    for name in banks.names:
        banks.unload(name)
    a, b, c, d = zoo
    calls = []
    slots = SlotManager(banks, dict_loader(zoo, calls))
    assert acquire(slots, a)[0] is Admission.READY
    assert acquire(slots, b)[0] is Admission.READY
    slots.release(b)
    slots.release(a)  # a used last: b is the least recently used
    assert acquire(slots, c)[0] is Admission.READY  # evicts b
    assert sorted(banks.names) == sorted([a, c]) and slots.evictions == 1
    # a and c in use: d has nowhere to go until one is released
    assert acquire(slots, a)[0] is Admission.READY
    assert acquire(slots, d) == (Admission.BLOCKED, None)
    slots.release(c)
    status, slot = acquire(slots, d)
    assert status is Admission.READY and banks.slot_of(d) == slot and c not in banks.names
    assert slots.evictions == 2 and calls == [a, b, c, d]  # each load once
    slots.close()


def test_load_failures_and_misfits_are_adapter_errors(setup):
    _, model, banks, zoo = setup
    other = flora.init_adapter("flora", 1, {"transformer.h.0.attn.c_attn": [32, 16]})  # another base model
    slots = SlotManager(banks, dict_loader({**zoo, "other": other}))
    for name, match in (("missing", "could not be loaded.*no adapter 'missing'"), ("other", "made for another base model")):
        assert slots.acquire(name) == (Admission.WAIT, None)
        for _ in range(2000):
            failed = slots.poll()
            if failed:
                break
            time.sleep(0.002)
        assert list(failed) == [name] and re.search(match, failed[name]), failed
    slots.close()


def test_directory_loader(tmp_path, setup):
    _, model, banks, zoo = setup
    name = next(iter(zoo))
    zoo[name].save(tmp_path / "julia")
    loader = DirectoryLoader(tmp_path)
    assert "julia" in loader and "lua" not in loader and ".." not in loader and "../tmp" not in loader
    assert loader("julia").config == zoo[name].config
    with pytest.raises(KeyError, match="not a valid adapter name"):
        loader("../julia")
    engine = Engine(model, loader=loader)
    with pytest.raises(RequestRejected, match="unknown adapter 'lua'"):
        engine.add_request(Request([3, 4], adapter="lua"))
    engine.close()


def test_slow_load_delays_only_its_requests_and_nobody_starves(setup):
    base, model, banks, zoo = setup
    for name in banks.names:
        banks.unload(name)
    a, b, slow, _ = zoo
    gate = threading.Event()
    fast = dict_loader(zoo)

    def loader(name):
        if name == slow:
            assert gate.wait(30)
        return fast(name)

    engine = Engine(model, loader=loader, config=EngineConfig(max_batch_rows=4, max_batch_tokens=32))
    prompts = iter(random_prompts([3 + i % 7 for i in range(200)], seed=9))

    def add(adapter, n=6):
        return engine.add_request(Request(next(prompts), adapter=adapter, max_new_tokens=n, ignore_eos=True))

    handles = [add(a), add(slow), add(b)]
    while not (handles[0].done and handles[2].done):
        engine.step()
    assert not handles[1].done  # a and b ran while `slow` was still loading
    # Keep both slots busy with overlapping requests for a and b, one more every step, from
    # before `slow` is loaded until it is served: it gets a slot only because admission stops
    # behind it once it waits for one.
    handles += [add(a, 10), add(b, 10)]
    engine.step()
    gate.set()
    for step in range(300):
        if handles[1].done:
            break
        handles.append(add((a, b)[step % 2], 10))
        if not engine.step():
            time.sleep(0.002)
    assert handles[1].done, "the request for `slow` starved"
    for h in handles:
        h.cancel()  # the rest need not run to the end
    while engine.has_work:
        engine.step()
    ref = Reference(base, zoo)
    outputs = [h.result() for h in handles]
    assert outputs[1].finish_reason == "length"
    for h, out in zip(handles, outputs):
        n = len(out.output_ids)
        assert n or out.finish_reason == "cancelled"
        if n:
            assert list(out.output_ids) == ref.generate(h.request.prompt, h.request.adapter, n, eos=None)
    assert engine.metrics.snapshot()["evictions"] >= 1
    engine.close()
