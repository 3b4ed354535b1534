"""Adapter directories on disk, PEFT directories as PEFT writes them, banks export, and the
errors a user meets at the edges (each must name the problem and the fix)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

import flora

try:
    import peft
except ImportError:  # a dev dependency; only the PEFT tests need it
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")
# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# ----------------------------------------------------------------------------- helpers


def _tiny_starcoder(n_embd: int = 64) -> GPTBigCodeForCausalLM:
    torch.manual_seed(0)
    config = GPTBigCodeConfig(
        vocab_size=100, n_embd=n_embd, n_layer=2, n_head=4, n_positions=64, multi_query=True,
        bos_token_id=1, eos_token_id=2,
    )
    return GPTBigCodeForCausalLM(config).eval()


def _randomised(adapter: flora.Adapter, seed: int = 0) -> flora.Adapter:
    """Same adapter with random tensors (init values are ones/zeros: too easy to round-trip)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype) for k, v in adapter.tensors.items()}
    return flora.Adapter(adapter.config, tensors)


SHAPES = {"enc.0.q": [12, 8], "enc.0.ff": [8, 20], "enc.1.q": [12, 8]}


def _made(kind: str) -> flora.Adapter:
    if kind == "flora":
        return flora.init_adapter("flora", 4, SHAPES, base_model="tiny", seed=3)
    if kind == "lora":
        return flora.init_adapter("lora", 3, SHAPES, scale=8 / 3, seed=4)
    return flora.init_adapter("ia3", 1, SHAPES, feedforward_modules=("enc.0.ff",))


def _assert_same_adapter(got: flora.Adapter, want: flora.Adapter) -> None:
    assert got.config == want.config
    assert sorted(got.tensors) == sorted(want.tensors)
    for key, value in want.tensors.items():
        assert got.tensors[key].dtype == value.dtype, key
        assert torch.equal(got.tensors[key], value), key


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["flora", "lora", "ia3"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    adapter = _randomised(_made(kind))
    adapter.save(tmp_path / kind)
    assert sorted(p.name for p in (tmp_path / kind).iterdir()) == ["adapter.safetensors", "flora_config.json"]
    _assert_same_adapter(flora.load_adapter(tmp_path / kind), adapter)


def test_round_trip_keeps_bfloat16(tmp_path):
    adapter = _made("flora")
    adapter = _randomised(flora.Adapter(adapter.config, {k: v.bfloat16() for k, v in adapter.tensors.items()}))
    _assert_same_adapter(flora.load_adapter(adapter.save(tmp_path / "bf16")), adapter)


@pytest.fixture
def starcoder_banks():
    """Tiny StarCoder with whole c_attn and mlp.c_proj adapted (IA3's feed-forward target)."""
    model = _tiny_starcoder()
    banks = flora.inject(model, ["c_attn", "mlp.c_proj"], max_slots=4, max_rank=8)
    return model, banks


def test_export_returns_loaded_tensors(starcoder_banks):
    _, banks = starcoder_banks
    shapes = banks.module_shapes
    ff = tuple(p for p in shapes if p.endswith("mlp.c_proj"))
    adapters = {
        # Power-of-two rank and scale: folding the scale in and out again is exact.
        "f": _randomised(flora.init_adapter("flora", 4, shapes, seed=1), seed=1),
        "l": _randomised(flora.init_adapter("lora", 4, shapes, scale=2.0, seed=2), seed=2),
        "i": _randomised(flora.init_adapter("ia3", 1, shapes, feedforward_modules=ff), seed=3),
    }
    for name, adapter in adapters.items():
        banks.load(name, adapter)
    for name, adapter in adapters.items():
        _assert_same_adapter(banks.export(name), adapter)


def test_export_of_partial_adapter_after_reload(starcoder_banks):
    """An adapter over some layers only, loaded over another one in the same slot."""
    _, banks = starcoder_banks
    layer0 = {p: s for p, s in banks.module_shapes.items() if ".h.0." in p}
    slot = banks.load("x", _randomised(flora.init_adapter("flora", 8, banks.module_shapes), seed=5))
    partial = _randomised(flora.init_adapter("flora", 2, layer0, seed=6), seed=6)
    assert banks.load("x", partial) == slot  # same name: same slot, nothing else consumed
    _assert_same_adapter(banks.export("x"), partial)
    untouched = banks.layers["transformer.h.1.attn.c_attn"]
    assert untouched.mul_rank[slot] == 0 and untouched.lora_rank[slot] == 0  # identity there


# ----------------------------------------------------------------------------- PEFT directories

PREFIX = "base_model.model."
C_ATTN = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
MLP_PROJ = [f"transformer.h.{i}.mlp.c_proj" for i in range(2)]


def _peft_dir(tmp_path, config, seed=0):
    model = peft.get_peft_model(copy.deepcopy(_tiny_starcoder()), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    directory = tmp_path / "peft"
    model.save_pretrained(str(directory))
    return directory, model


@needs_peft
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_lora_dir_as_peft_writes_it(tmp_path, task_type, use_rslora):
    directory, model = _peft_dir(
        tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type=task_type, use_rslora=use_rslora)
    )
    # What PEFT 0.21 writes: safetensors by default, keys without the adapter name.
    raw = json.loads((directory / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 8
    assert raw["use_rslora"] is use_rslora and raw["base_model_name_or_path"] is None
    assert not (directory / "adapter_model.bin").exists()
    weights = load_file(str(directory / "adapter_model.safetensors"))
    assert set(weights) == {f"{PREFIX}{p}.lora_{ab}.weight" for p in C_ATTN for ab in "AB"}

    adapter = flora.load_adapter(directory)
    assert adapter.config.kind == "lora" and adapter.config.rank == 4
    assert adapter.config.scale == (8 / 2 if use_rslora else 8 / 4)
    assert adapter.config.module_shapes == {p: [96, 64] for p in C_ATTN}
    assert adapter.config.base_model == ""
    params = dict(model.named_parameters())
    for p in C_ATTN:
        assert torch.equal(adapter.tensors[f"{p}.lora_A"], params[f"{PREFIX}{p}.lora_A.default.weight"])
        assert torch.equal(adapter.tensors[f"{p}.lora_B"], params[f"{PREFIX}{p}.lora_B.default.weight"])


@needs_peft
def test_peft_ia3_dir_as_peft_writes_it(tmp_path):
    directory, model = _peft_dir(tmp_path, peft.IA3Config(task_type="CAUSAL_LM"))
    raw = json.loads((directory / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3"
    assert sorted(raw["target_modules"]) == ["c_attn", "mlp.c_proj"] and raw["feedforward_modules"] == ["mlp.c_proj"]
    weights = load_file(str(directory / "adapter_model.safetensors"))
    # Output scalings are stored [Dout, 1], feed-forward (input) ones [1, Din].
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        **{f"{PREFIX}{p}.ia3_l": (96, 1) for p in C_ATTN},
        **{f"{PREFIX}{p}.ia3_l": (1, 256) for p in MLP_PROJ},
    }

    adapter = flora.load_adapter(directory)
    config = adapter.config
    assert (config.kind, config.rank, config.scale) == ("ia3", 1, 1.0)
    assert config.feedforward_modules == tuple(MLP_PROJ)
    assert config.module_shapes == {**{p: [96, -1] for p in C_ATTN}, **{p: [-1, 256] for p in MLP_PROJ}}
    for p in C_ATTN + MLP_PROJ:
        assert torch.equal(adapter.tensors[f"{p}.ia3_l"], weights[f"{PREFIX}{p}.ia3_l"].flatten())

    # A converted PEFT adapter saves in our format and loads back unchanged, and fits the banks.
    _assert_same_adapter(flora.load_adapter(adapter.save(tmp_path / "ours")), adapter)
    banks = flora.inject(_tiny_starcoder(), ["c_attn", "mlp.c_proj"], max_slots=2)
    banks.load("ia3", adapter)
    _assert_same_adapter(banks.export("ia3"), adapter)


@needs_peft
def test_peft_dir_missing_one_factor(tmp_path):
    directory, _ = _peft_dir(tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    weights = load_file(str(directory / "adapter_model.safetensors"))
    del weights[f"{PREFIX}{C_ATTN[0]}.lora_A.weight"]
    save_file(weights, str(directory / "adapter_model.safetensors"))
    with pytest.raises(flora.AdapterLoadError, match=rf"{C_ATTN[0]}\.lora_A\.weight is missing"):
        flora.load_adapter(directory)


def test_pickled_peft_dir_is_refused_without_unpickling(tmp_path, monkeypatch):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]})
    )
    torch.save({f"{PREFIX}{C_ATTN[0]}.lora_A.weight": torch.zeros(4, 64)}, directory / "adapter_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("an adapter file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    with pytest.raises(flora.AdapterLoadError) as err:
        flora.load_adapter(directory)
    message = str(err.value)
    assert "adapter_model.bin" in message and "safetensors" in message and "never loaded" in message


# ----------------------------------------------------------------------------- load errors


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("fmt", ["flora", pytest.param("peft", marks=needs_peft)])
def test_damaged_safetensors(tmp_path, damage, fmt):
    if fmt == "flora":
        directory = _randomised(_made("lora")).save(tmp_path / "a")
        weights = directory / "adapter.safetensors"
    else:
        directory, _ = _peft_dir(tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
        weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy().tobytes())
    else:
        weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(flora.AdapterLoadError, match=r"corrupted or truncated") as err:
        flora.load_adapter(directory)
    assert weights.name in str(err.value)


def test_tensor_shapes_disagreeing_with_config(tmp_path):
    directory = _randomised(_made("flora")).save(tmp_path / "a")
    config = json.loads((directory / "flora_config.json").read_text())
    config["rank"] = 2  # the tensors hold 4 components
    (directory / "flora_config.json").write_text(json.dumps(config))
    with pytest.raises(flora.AdapterLoadError, match=r"flora_A has shape \(4, \d+\), expected \(2, \d+\) for a flora adapter of rank 2"):
        flora.load_adapter(directory)


def test_tensor_missing_from_file(tmp_path):
    directory = _randomised(_made("lora")).save(tmp_path / "a")
    weights = load_file(str(directory / "adapter.safetensors"))
    del weights["enc.0.ff.lora_B"]
    save_file(weights, str(directory / "adapter.safetensors"))
    with pytest.raises(flora.AdapterLoadError, match=r"enc\.0\.ff\.lora_B is missing"):
        flora.load_adapter(directory)


def test_not_an_adapter_dir(tmp_path):
    with pytest.raises(flora.AdapterLoadError, match="no such adapter directory"):
        flora.load_adapter(tmp_path / "nowhere")
    with pytest.raises(flora.AdapterLoadError, match="flora_config.json.*adapter_config.json"):
        flora.load_adapter(tmp_path)


# ----------------------------------------------------------------------------- bank errors


def test_adapter_for_module_the_model_lacks(tmp_path, starcoder_banks):
    _, banks = starcoder_banks
    shapes = {"transformer.h.0.mlp.c_fc": [256, 64]}  # not injected
    adapter = flora.load_adapter(flora.init_adapter("flora", 2, shapes).save(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc.*no adapted layer.*inject"):
        banks.load("x", adapter)
    assert banks.names == []


def test_rank_above_bank_limits():
    model = _tiny_starcoder()
    banks = flora.inject(model, "gpt_bigcode-c_attn", max_slots=3, max_rank=2, max_lora_rank=4)
    shapes = banks.module_shapes
    with pytest.raises(ValueError, match=r"rank 4 > bank max_rank 2.*max_rank>=4"):
        banks.load("f", flora.init_adapter("flora", 4, shapes))
    with pytest.raises(ValueError, match=r"rank 8 > bank max_lora_rank 4"):
        banks.load("l", flora.init_adapter("lora", 8, shapes))
    banks.load("l", flora.init_adapter("lora", 4, shapes))  # LoRA has its own limit


def test_adapter_for_another_base_model(starcoder_banks):
    _, banks = starcoder_banks
    other = flora.inject(_tiny_starcoder(n_embd=32), ["c_attn", "mlp.c_proj"], max_slots=2)
    adapter = flora.init_adapter("flora", 2, other.module_shapes, base_model="tiny-32")
    with pytest.raises(ValueError, match=r"another base model.*tiny-32"):
        banks.load("x", adapter)


@needs_peft
def test_adapter_for_other_columns_of_fused_projection(tmp_path):
    """A PEFT LoRA on the whole c_attn does not fit banks adapting only its q,k columns."""
    directory, _ = _peft_dir(tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    banks = flora.inject(_tiny_starcoder(), "gpt_bigcode", max_slots=2)
    with pytest.raises(ValueError, match=r"other target columns.*\[96, 64\].*\[80, 64\]"):
        banks.load("x", flora.load_adapter(directory))


def test_more_adapters_than_slots(starcoder_banks):
    _, banks = starcoder_banks  # 4 slots: base + 3
    adapter = flora.init_adapter("flora", 2, banks.module_shapes)
    for name in "abc":
        banks.load(name, adapter)
    with pytest.raises(RuntimeError, match=r"all 3 adapter slots are in use.*unload.*max_slots"):
        banks.load("d", adapter)
    freed = banks.unload("b")
    assert banks.load("d", adapter) == freed


def test_base_name_is_reserved(starcoder_banks):
    _, banks = starcoder_banks
    with pytest.raises(ValueError, match="base model"):
        banks.load(flora.BASE_NAME, flora.init_adapter("flora", 2, banks.module_shapes))


def test_unknown_inject_targets():
    model = _tiny_starcoder()
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no nn.Linear.*transformer\.h\.0\.attn\.c_attn"):
        flora.inject(model, ["c_attn", "q_proj"])
    with pytest.raises(ValueError, match=r"no target preset 'nope'"):
        flora.inject(model, "nope")


def test_route_errors(starcoder_banks):
    model, banks = starcoder_banks  # 4 slots
    banks.load("x", flora.init_adapter("flora", 2, banks.module_shapes))
    ids = torch.zeros(2, 3, dtype=torch.long)
    for bad in (torch.tensor([0, 4]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"out of range.*4 slots"):
            with flora.route(model, bad):
                model(ids)
    with pytest.raises(ValueError, match=r"slot 2 holds no adapter.*'x'"):
        with flora.route(model, torch.tensor([1, 2])):
            model(ids)
    with pytest.raises(KeyError, match=r"no adapter named 'y'"):
        with flora.route(model, ["x", "y"]):
            model(ids)
    with pytest.raises(RuntimeError, match="without a route"):  # failed routes leave none set
        model(ids)
