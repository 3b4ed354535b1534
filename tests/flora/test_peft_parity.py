"""Our LoRA and IA3 layers against PEFT's own models, for the same directory saved by PEFT.

PEFT is the independent reference: it builds its adapted model from the config, we load the
directory it wrote with `flora.load_adapter` into banks injected into another copy of the same
base model. Adapter weights are randomised before saving (PEFT's LoRA B starts at zero and
IA3's l at one, which would make every comparison pass trivially).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import flora  # noqa: E402

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
ATOL = 1e-5
LORA_IMPLS = ["bmm", "grouped"]


@dataclass
class Arch:
    name: str
    build: callable  # () -> base model
    lora_targets: list[str]
    inject_targets: list[str]  # covers PEFT's LoRA targets and its default IA3 targets


def _gpt_bigcode():
    config = GPTBigCodeConfig(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True,
        bos_token_id=1, eos_token_id=2,
    )
    return GPTBigCodeForCausalLM(config)


def _llama():
    config = LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


ARCHS = {
    "gpt_bigcode": Arch("gpt_bigcode", _gpt_bigcode, ["c_attn"], ["c_attn", "mlp.c_proj"]),
    "llama": Arch("llama", _llama, ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "down_proj"]),
}


def _base_model(arch: Arch) -> torch.nn.Module:
    torch.manual_seed(0)
    return arch.build().eval()


def _randomise_adapter(peft_model, seed: int) -> None:
    """Give every trainable (adapter) parameter random values far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * noise)
            else:
                assert "lora_" in name, name
                p.copy_(0.3 * noise)


def _save_peft(base, peft_config, directory, seed):
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    _randomise_adapter(peft_model, seed)
    peft_model.eval()
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    assert (directory / "adapter_model.safetensors").exists()
    return peft_model


def _ids(batch: int = 6, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def saved(request, tmp_path_factory):
    """Base model, and PEFT LoRA / rsLoRA / IA3 models with the directories they wrote."""
    arch = ARCHS[request.param]
    base = _base_model(arch)
    root = tmp_path_factory.mktemp(f"peft-{arch.name}")
    configs = {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=arch.lora_targets),
        "rslora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=arch.lora_targets, use_rslora=True),
        # No target_modules: PEFT's default IA3 targets for the arch, feed-forward ones included.
        "ia3": peft.IA3Config(task_type="CAUSAL_LM"),
    }
    models = {kind: _save_peft(base, cfg, root / kind, seed=i) for i, (kind, cfg) in enumerate(configs.items())}
    return arch, base, models, root


def _ours(arch: Arch, base, lora_impl: str):
    model = copy.deepcopy(base)
    banks = flora.inject(model, arch.inject_targets, max_slots=4, max_rank=8, lora_impl=lora_impl)
    return model, banks


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("lora_impl", LORA_IMPLS)
@pytest.mark.parametrize("kind", ["lora", "rslora", "ia3"])
def test_single_adapter_matches_peft(saved, kind, lora_impl):
    arch, base, peft_models, root = saved
    ids = _ids()
    want = _logits(peft_models[kind], ids)
    assert (want - _logits(base, ids)).abs().max() > 1e-2, "the adapter must change the logits"

    adapter = flora.load_adapter(root / kind)
    assert adapter.config.kind == ("ia3" if kind == "ia3" else "lora")
    model, banks = _ours(arch, base, lora_impl)
    banks.load(kind, adapter)
    with flora.route(model, [kind] * ids.shape[0]):
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    with flora.route(model, [None] * ids.shape[0]):  # the base slot is still the base model
        torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("lora_impl", LORA_IMPLS)
def test_mixed_batch_matches_separate_runs(saved, lora_impl):
    """Rows alternate LoRA, IA3, base in one forward; each row equals its own reference run."""
    arch, base, peft_models, root = saved
    ids = _ids(batch=6)
    model, banks = _ours(arch, base, lora_impl)
    banks.load("lora", flora.load_adapter(root / "lora"))
    banks.load("ia3", flora.load_adapter(root / "ia3"))

    with flora.route(model, ["lora", "ia3", None] * 2):
        got = _logits(model, ids)
    references = [peft_models["lora"], peft_models["ia3"], base]
    for offset, reference in enumerate(references):
        want = _logits(reference, ids[offset::3])
        torch.testing.assert_close(got[offset::3], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("lora_impl", LORA_IMPLS)
def test_mixed_per_token_slots_match(saved, lora_impl):
    """A [B, L] slot tensor (every token of a row in that row's slot) equals per-row routing."""
    arch, base, peft_models, root = saved
    ids = _ids(batch=3)
    model, banks = _ours(arch, base, lora_impl)
    slots = [banks.load("lora", flora.load_adapter(root / "lora")), banks.load("ia3", flora.load_adapter(root / "ia3")), 0]
    with flora.route(model, torch.tensor(slots)):
        per_row = _logits(model, ids)
    with flora.route(model, torch.tensor(slots)[:, None].expand(ids.shape)):
        per_token = _logits(model, ids)
    torch.testing.assert_close(per_token, per_row, atol=ATOL, rtol=0)
    torch.testing.assert_close(per_row[0:1], _logits(peft_models["lora"], ids[0:1]), atol=ATOL, rtol=0)
