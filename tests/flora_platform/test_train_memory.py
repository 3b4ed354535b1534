"""The switches that make a base fit: its load dtype, activation checkpointing, 8-bit refusals."""

import copy

import pytest
import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

import flora
from flora_platform.base_model import enable_activation_checkpointing, train_tokenizer
from flora_platform.config import ConfigError, FinetuneConfig, load_config
from flora_platform.preflight import check_base_loading
from flora_platform.train import TextTask, inject_adapters, per_row_token_losses


def tiny_model(seed: int = 0) -> GPTBigCodeForCausalLM:
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=3, n_head=4, multi_query=True)
    return GPTBigCodeForCausalLM(config).eval()  # eval, as from_pretrained returns it and the loop runs it


def config(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, ["adapter.targets=[attn.c_attn,mlp.c_fc]", "adapter.rank=2", *overrides])


@pytest.mark.parametrize(
    "overrides, dtype",
    [
        ([], "float32"),
        (["train.precision=bf16"], "bfloat16"),
        (["train.precision=fp16"], "float16"),
        (["train.precision=bf16", "model.dtype=float32"], "float32"),  # the old way: DeepSpeed casts on the device
        (["train.precision=bf16", "model.dtype=bfloat16"], "bfloat16"),
    ],
)
def test_base_dtype_follows_the_training_precision(overrides, dtype):
    assert config(*overrides).base_dtype == dtype


@pytest.mark.parametrize("overrides", [["model.dtype=bfloat16"], ["model.dtype=float16", "train.precision=bf16"], ["model.dtype=int4"]])
def test_a_base_dtype_the_precision_would_recast_is_refused(overrides):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert str(err.value).startswith("model.dtype")


def test_the_worker_loads_the_base_in_bf16_and_exports_float32_adapters(tmp_path):
    tokenizer = train_tokenizer({"python": ["def f(x):\n    return x + 1\n"] * 4}, 300, 32)
    tiny_model().save_pretrained(tmp_path)  # float32 on disk
    tokenizer.save_pretrained(tmp_path)
    cfg = config("train.precision=bf16")

    model = TextTask.load_model(None, str(tmp_path), cfg.base_dtype)  # the task's method, without its data
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    banks = inject_adapters(model, cfg, ["python"])
    assert {p.dtype for p in banks.trainable_parameters(["python"])} == {torch.bfloat16}  # banks take the base's dtype
    assert {t.dtype for t in banks.export("python").tensors.values()} == {torch.float32}  # files as before


def adapter_grads(model, cfg, ids, checkpointing: bool):
    """(loss, {param name: grad}, adapted-layer forward calls) of one step over mixed adapters."""
    if checkpointing:
        enable_activation_checkpointing(model)
    names = ["python", "c"]
    banks = inject_adapters(model, cfg, names)
    params = banks.trainable_parameters(names)
    with torch.no_grad():  # move the adapters off the identity so that every factor matters
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    layer = next(m for m in model.modules() if isinstance(m, flora.AdaptedLinear))
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    with flora.route(model, ["python", "c", "python", "c"]):
        loss = per_row_token_losses(model(input_ids=ids).logits, ids).sum() / (ids.numel() - ids.shape[0])
        loss.backward()  # inside the route: checkpointed blocks recompute under the same slots
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


def test_activation_checkpointing_gives_the_same_loss_and_adapter_gradients():
    cfg = config()
    model = tiny_model()
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))  # [B, L]
    loss_off, grads_off, calls_off = adapter_grads(copy.deepcopy(model), cfg, ids, checkpointing=False)
    loss_on, grads_on, calls_on = adapter_grads(copy.deepcopy(model), cfg, ids, checkpointing=True)

    assert (calls_off, calls_on) == (1, 2)  # with checkpointing the block ran again in the backward
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_off.keys() == grads_on.keys() and len(grads_off) == 2 * 2 * 3  # a and b of 2 targets x 3 layers
    for name, grad in grads_off.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7)


def test_eight_bit_is_refused_naming_what_is_missing(monkeypatch):
    with pytest.raises(ConfigError, match=r"^model\.quantization: .*CUDA GPU.*scaling\.use_gpu=true"):
        check_base_loading(config("model.quantization=8bit"))
    gpu = config("model.quantization=8bit", "scaling.use_gpu=true")
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^model\.quantization: .*bitsandbytes"):
        check_base_loading(gpu)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^model\.quantization: .*int8"):  # both there: flora's layers cannot read int8 yet
        check_base_loading(gpu)
    check_base_loading(config())  # none: nothing to check
