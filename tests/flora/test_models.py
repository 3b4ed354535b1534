"""A mixed batch through a whole injected model equals, row for row, the same rows run through
copies of the base model with each row's adapter merged into the weights (the independent spec).
"""

import copy

import pytest
import torch

import flora
from flora.inject import _column_range
from flora.kernels import HAS_TRITON

from tests.flora.tiny_models import model_inputs, row, tiny_gpt_bigcode, tiny_llama, tiny_whisper

BUILDERS = {"gpt_bigcode": tiny_gpt_bigcode, "llama": tiny_llama, "whisper": tiny_whisper}
IA3_FF = {  # feed-forward (input-scaled) IA3 modules among each preset's targets
    "gpt_bigcode": (),
    "llama": (),
    "whisper": ("fc2",),
}


def randomised(adapter: flora.Adapter, seed: int) -> flora.Adapter:
    """Move an initialised adapter away from the identity so the test can fail."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v + torch.randn(v.shape, generator=gen) for k, v in adapter.tensors.items()}
    return flora.Adapter(adapter.config, tensors)


def make_adapters(banks: flora.AdapterBanks, arch: str) -> dict[str, flora.Adapter]:
    shapes = banks.module_shapes
    ff = tuple(p for p in shapes if any(p.endswith(m) for m in IA3_FF[arch]))
    return {
        "flora_r1": randomised(flora.init_adapter("flora", 1, shapes, seed=1), 11),
        "flora_r4": randomised(flora.init_adapter("flora", 4, shapes, seed=2), 12),
        "ia3": randomised(flora.init_adapter("ia3", 1, shapes, feedforward_modules=ff), 13),
        "lora_r3": randomised(flora.init_adapter("lora", 3, shapes, scale=2.0, seed=3), 14),
        # An adapter on half the modules: the others must stay the base layers for its rows.
        "flora_half": randomised(flora.init_adapter("flora", 2, dict(list(shapes.items())[::2]), seed=4), 15),
    }


@torch.no_grad()
def merge_into(base: torch.nn.Module, adapter: flora.Adapter) -> torch.nn.Module:
    """A copy of `base` with the adapter's change applied to the weights: W0 ∘ (s·BA), W0 + s·BA, l ∘ W0."""
    merged = copy.deepcopy(base)
    config = adapter.config
    for path in config.module_shapes:
        linear = merged.get_submodule(path)
        lo, hi = (0, linear.out_features)
        if config.module_shapes[path][0] != linear.out_features:  # a column range of a fused layer
            lo, hi = _column_range(merged, path, linear, ("q", "k"))
        w, t = linear.weight[lo:hi], adapter.module_tensors(path)
        if config.kind == "flora":
            w.mul_((config.scale * t["flora_B"] @ t["flora_A"]).T)
        elif config.kind == "lora":
            w.add_(config.scale * t["lora_B"] @ t["lora_A"])
        elif path in config.feedforward_modules:
            w.mul_(t["ia3_l"][None, :])
        else:
            w.mul_(t["ia3_l"][:, None])
            if linear.bias is not None:
                linear.bias[lo:hi].mul_(t["ia3_l"])
    return merged


def output(model, inputs):
    return model(**inputs).logits


@pytest.mark.parametrize("lora_impl", ["grouped", "bmm", "triton"])
@pytest.mark.parametrize("arch", ["gpt_bigcode", "llama", "whisper"])
def test_mixed_batch_equals_merged_models(arch, lora_impl):
    """`triton`: every adapted layer through the Triton kernels (FLoRA/IA3/base fused, fused LoRA;
    in Triton's interpreter on a CPU), on the per-row slots of a padded batch."""
    if lora_impl == "triton" and not HAS_TRITON:
        pytest.skip("needs triton")
    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    kernels = "triton" if lora_impl == "triton" else "torch"
    banks = flora.inject(model, arch, max_slots=8, max_rank=4, kernels=kernels,
                         lora_impl="fused" if lora_impl == "triton" else lora_impl)
    adapters = make_adapters(banks, arch)
    for name, adapter in adapters.items():
        banks.load(name, adapter)

    names = [None, *adapters, "flora_r4", None, "lora_r3", "flora_r1"]  # base rows included
    inputs = model_inputs(base, len(names))
    with torch.no_grad(), flora.route(model, names):
        mixed = output(model, inputs)

    merged = {name: merge_into(base, adapter) for name, adapter in adapters.items()}
    with torch.no_grad():
        for i, name in enumerate(names):
            expected = output(base if name is None else merged[name], row(inputs, i))
            torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=2e-5, msg=f"row {i} ({name})")
            if name is not None:  # each adapter changes its rows far beyond that tolerance
                assert (expected - output(base, row(inputs, i))).abs().max() > 1e-3, name


def test_whole_c_attn_and_column_range_targets_differ():
    model = tiny_gpt_bigcode()
    banks = flora.inject(model, "gpt_bigcode")
    (path, shape), *_ = banks.module_shapes.items()
    assert shape == [64 + 16, 64]  # the q and k columns of c_attn (head_dim 16, one kv head)
    whole = flora.inject(tiny_gpt_bigcode(), "gpt_bigcode-c_attn")
    assert whole.module_shapes[path] == [64 + 2 * 16, 64]


@pytest.mark.parametrize("arch", ["gpt_bigcode", "llama", "whisper"])
def test_fresh_flora_adapter_leaves_logits_unchanged(arch):
    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    banks = flora.inject(model, arch, max_rank=8)
    adapter = flora.init_adapter("flora", 4, banks.module_shapes, seed=0)
    for path in adapter.config.module_shapes:  # scale·BA is exactly all ones ...
        t = adapter.module_tensors(path)
        assert torch.equal(adapter.config.scale * t["flora_B"] @ t["flora_A"], torch.ones(t["flora_B"].shape[0], t["flora_A"].shape[1]))
        assert len({tuple(c.tolist()) for c in t["flora_B"].T}) == 4  # ... with distinct components
    banks.load("new", adapter)
    inputs = model_inputs(base, 3)
    with torch.no_grad(), flora.route(model, ["new"] * 3):
        torch.testing.assert_close(output(model, inputs), output(base, inputs), rtol=1e-5, atol=1e-5)


def test_gradients_reach_adapter_rows_only():
    model = tiny_gpt_bigcode()
    banks = flora.inject(model, "gpt_bigcode", max_slots=4, max_rank=4)
    for name, seed in (("julia", 1), ("lua", 2)):
        banks.load(name, flora.init_adapter("flora", 2, banks.module_shapes, seed=seed))
    params = banks.trainable_parameters(["julia"])
    inputs = model_inputs(model, 4)
    with flora.route(model, ["julia", "lua", None, "julia"]):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    slot, other = banks.slot_of("julia"), banks.slot_of("lua")
    for layer in banks.layers.values():
        for p in (layer.a, layer.b):
            assert p.grad[slot, :2].abs().sum() > 0  # both rank components of the trained adapter
            assert p.grad[slot, 2:].abs().sum() == 0  # unused components
            assert p.grad[other].abs().sum() == 0 and p.grad[0].abs().sum() == 0  # other slots, base
    base_params = [p for n, p in model.named_parameters() if not any(p is q for q in params)]
    assert base_params and all(p.grad is None and not p.requires_grad for p in base_params)
    # the two rank components get different gradients, so they can move apart
    layer = next(iter(banks.layers.values()))
    assert not torch.allclose(layer.a.grad[slot, 0], layer.a.grad[slot, 1])


def test_route_is_required_and_restored():
    model = tiny_gpt_bigcode()
    flora.inject(model, "gpt_bigcode")
    inputs = model_inputs(model, 2)
    with pytest.raises(RuntimeError, match="flora.route"):
        model(**inputs)
    with flora.route(model, [None, None]):
        with flora.route(model, torch.tensor([0])):
            model(**row(inputs, 0))
        model(**inputs)  # the outer route is back
