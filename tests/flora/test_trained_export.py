"""What training changes is what `export` writes: after optimiser steps on FLoRA and IA3 slots
together, each exported adapter merged into the base weights (`merge_into`, the independent
spec) gives the trained model's outputs for that adapter's rows."""

import torch

import flora
from tests.flora.test_models import merge_into
from tests.flora.tiny_models import tiny_gpt_bigcode


def test_exported_adapters_reproduce_the_trained_rows():
    base = tiny_gpt_bigcode()
    model = tiny_gpt_bigcode()
    targets, feedforward = flora.IA3_PRESETS["gpt_bigcode"]
    banks = flora.inject(model, targets, max_slots=3, max_rank=2, max_lora_rank=0)
    shapes = banks.module_shapes
    ff = tuple(p for p in shapes if any(flora.target_matches(f, p) for f in feedforward))
    assert ff, "the preset scales some feed-forward inputs"
    banks.load("ia3", flora.init_adapter("ia3", 1, shapes, feedforward_modules=ff))
    banks.load("flora", flora.init_adapter("flora", 2, shapes, seed=1))
    optimizer = torch.optim.Adam(banks.trainable_parameters(["ia3", "flora"]), lr=0.05)
    ids = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    names = ["ia3", "flora", "ia3", "flora"]
    for _ in range(3):
        with flora.route(model, names):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad(), flora.route(model, names):
        trained = model(input_ids=ids).logits
    for i, name in enumerate(names[:2]):
        adapter = banks.export(name)
        moved = max((v - 1).abs().max().item() for v in adapter.tensors.values()) if name == "ia3" else 1.0
        assert moved > 1e-3, "training must have changed the adapter for this test to mean anything"
        with torch.no_grad():
            reference = merge_into(base, adapter)(input_ids=ids[i::2]).logits
        torch.testing.assert_close(trained[i::2], reference, rtol=1e-4, atol=1e-5)
