"""`Engine.unload_adapter`: frees the slot between steps, refuses while a request uses it, and a
later request loads the adapter again with the same output."""

from __future__ import annotations

import pytest

from flora.engine import AdapterInUse, Engine, EngineConfig, Request
from tests.flora.engine.reference import Reference, adapter_zoo, dict_loader, injected, random_prompts, tiny_decoder


def test_unload_frees_the_slot_and_refuses_while_in_use():
    base = tiny_decoder("gpt_bigcode")
    model, banks = injected(base, "gpt_bigcode", max_slots=3)
    adapters = adapter_zoo(banks, "gpt_bigcode", 2)
    name = next(iter(adapters))
    calls: list[str] = []
    engine = Engine(model, loader=dict_loader(adapters, calls), config=EngineConfig(max_batch_rows=4))
    (prompt,) = random_prompts([6])
    expected = Reference(base, adapters).generate(prompt, name, 8, eos=None)

    (first,) = engine.generate([Request(prompt, adapter=name, max_new_tokens=8, ignore_eos=True)])
    assert name in banks.names
    assert engine.unload_adapter(name) is True and name not in banks.names
    assert engine.unload_adapter(name) is False  # not resident any more
    with pytest.raises(ValueError):
        engine.unload_adapter("base")

    handle = engine.add_request(Request(prompt, adapter=name, max_new_tokens=8, ignore_eos=True))
    while name not in banks.names or handle.done:  # step until it is admitted (its slot pinned)
        engine.step()
    with pytest.raises(AdapterInUse):
        engine.unload_adapter(name)
    while not handle.done:
        engine.step()
    second = handle.result()
    assert list(first.output_ids) == list(second.output_ids) == expected
    assert calls == [name, name]  # loaded, unloaded, loaded again
    engine.close()
