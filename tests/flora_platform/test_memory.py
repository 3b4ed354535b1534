"""The per-worker memory estimate: its terms by hand, its parameter counts against real models,
and the refusal that names what to change."""

import dataclasses

import pytest
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

import flora
from flora_platform.config import ConfigError, FinetuneConfig, load_config
from flora_platform.memory import (
    GB, ZERO3_LIVE_PARAMETERS, ZERO3_PREFETCH_PARAMETERS, MemoryEstimate, ModelShape, Setting, check_memory, estimate_memory,
    fixes, model_shape,
)

# A 2-layer GPT-BigCode: h 16, 2 heads, V 100; FLoRA rank 2 on attn.c_attn (16 -> 16 + 2·8
# multi-query columns) and mlp.c_fc (16 -> 64), 3 adapters + the base slot.
TINY = GPTBigCodeConfig(vocab_size=100, n_positions=64, n_embd=16, n_layer=2, n_head=2, multi_query=True)


def adapter():
    return load_config(FinetuneConfig, None, ["adapter.targets=[attn.c_attn,mlp.c_fc]", "adapter.rank=2"]).adapter


def test_parameter_counts_match_the_real_model():
    shape = model_shape(TINY, adapter(), n_adapters=3)
    model = GPTBigCodeForCausalLM(TINY)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    banks = flora.inject(model, ["attn.c_attn", "mlp.c_fc"], max_slots=4, max_rank=2)
    layers = [m for m in model.modules() if isinstance(m, flora.AdaptedLinear)]
    assert shape.adapter_parameters == sum(m.a.numel() + m.b.numel() for m in layers)
    # By hand: per layer, c_attn b [4, 2, 16] + a [4, 2, 32], c_fc b [4, 2, 16] + a [4, 2, 64].
    assert shape.adapter_parameters == 2 * 4 * 2 * (16 + 32 + 16 + 64) == 2048
    assert (shape.layers, shape.hidden, shape.heads, shape.vocab) == (2, 16, 2, 100)
    assert banks.names == []


SHAPE = ModelShape(parameters=1000, adapter_parameters=100, layers=2, hidden=16, heads=2, vocab=100,
                   keeps_attention_scores=False)
BF16 = Setting(seq_len=8, micro_batch=4, weight_bytes=2, train_bytes=2, checkpointing=False, zero_stage=2, num_workers=2)


def test_terms_by_hand():
    e = estimate_memory(SHAPE, BF16)
    assert e.weights == 1000 * 2  # replicated under ZeRO-2
    assert e.adapters == 100 * 2
    assert e.gradients == 100 * 2 / 2  # partitioned from ZeRO-2
    assert e.optimizer == 100 * (8 + 4) / 2  # two fp32 moments + an fp32 master, partitioned
    logits = 8 * 4 * 100 * (2 + 8)
    block = 8 * 4 * 16 * 34  # s·b·h·34 bytes in 16-bit, no score term under sdpa
    assert e.activations == 2 * block + logits
    assert e.overhead == 2 * GB
    assert e.total == pytest.approx(2000 + 200 + 100 + 600 + 2 * block + logits + 2 * GB)

    on = estimate_memory(SHAPE, dataclasses.replace(BF16, checkpointing=True))
    assert on.activations == 2 * 8 * 4 * 16 * 2 + block + logits  # block inputs + one block recomputed

    eager = estimate_memory(dataclasses.replace(SHAPE, keeps_attention_scores=True), BF16)
    assert eager.activations == 2 * 8 * 4 * 16 * (34 + 5 * 2 * 8 / 16) + logits

    fp32 = estimate_memory(SHAPE, dataclasses.replace(BF16, weight_bytes=4, train_bytes=4))
    assert (fp32.weights, fp32.optimizer, fp32.activations) == (4000, 100 * 8 / 2, 2 * 2 * block + 8 * 4 * 100 * 12)

    # ZeRO-3 shards the base too: a worker holds 1/N of it, plus what is gathered at once, at
    # most DeepSpeed's live parameters and prefetch bucket (here the whole small model).
    zero3 = estimate_memory(SHAPE, dataclasses.replace(BF16, zero_stage=3, num_workers=4))
    assert zero3.weights == (1000 / 4 + 1000) * 2 and zero3.gradients == 100 * 2 / 4
    big = dataclasses.replace(SHAPE, parameters=15_500_000_000)
    sharded = estimate_memory(big, dataclasses.replace(BF16, zero_stage=3, num_workers=2))
    assert sharded.weights == (15.5e9 / 2 + ZERO3_LIVE_PARAMETERS + ZERO3_PREFETCH_PARAMETERS) * 2
    assert estimate_memory(big, BF16).weights == 15.5e9 * 2  # ZeRO-2: replicated


def test_fixes_name_each_knob_that_fits():
    setting = dataclasses.replace(BF16, seq_len=64)  # sequences are not cut below 16
    e = estimate_memory(SHAPE, setting)
    # A budget just under the estimate: every knob that lowers it fits.
    options = fixes(SHAPE, setting, e.total - 1)
    knobs = [o.split("=")[0] for o in options]
    assert knobs == ["train.gradient_checkpointing", "train.batch_size", "train.seq_len"]
    assert fixes(SHAPE, BF16, 2 * GB) == []  # the overhead alone does not fit


def test_a_run_that_cannot_fit_is_refused_naming_the_knob(tmp_path, caplog):
    GPTBigCodeForCausalLM(TINY).save_pretrained(tmp_path)  # only its config.json is read
    overrides = ["adapter.targets=[attn.c_attn,mlp.c_fc]", "adapter.rank=2", "train.seq_len=64", "train.batch_size=64"]
    cfg = load_config(FinetuneConfig, None, overrides)
    with caplog.at_level("INFO", logger="flora_platform.memory"):
        fine = check_memory(cfg, str(tmp_path), n_adapters=3)  # no budget: logged, not checked
    assert "| total |" in caplog.text and isinstance(fine, MemoryEstimate)
    budget = (fine.total - 1) / GB
    with pytest.raises(ConfigError) as err:
        check_memory(load_config(FinetuneConfig, None, overrides + [f"scaling.gpu_memory_gb={budget}"]), str(tmp_path), 3)
    assert str(err.value).startswith("train.gradient_checkpointing: a worker needs about")
    assert "train.batch_size=32" in str(err.value) and "scaling.gpu_memory_gb=" in str(err.value)
