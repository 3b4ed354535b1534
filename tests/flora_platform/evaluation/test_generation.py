"""Completions and perplexity from shared batches equal each adapter run alone on merged weights.

The reference is Hugging Face `generate` / the model's own loss on a copy of the base model with
the adapter merged into its weights (`tests.flora.test_models.merge_into`): no engine, no banks,
no adapted layers. FLoRA on c_attn's q,k columns cannot share banks with IA3 on all of c_attn,
so the adapters below also exercise two bank groups.
"""

import copy

import pytest
import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

import flora
from flora.engine import EngineConfig
from flora_platform.base_model import train_tokenizer
from flora_platform.evaluation.adapters import bank_groups
from flora_platform.evaluation.generation import generate_completions, sample_seed
from flora_platform.evaluation.perplexity import heldout_perplexity
from flora_platform.evaluation.problems import BUILTIN, Problem, load_problems, truncate_at_stop
from tests.flora.test_models import merge_into, randomised

CODE = [
    "def add(a, b):\n    return a + b\n\n# sum the list\nfor x in items:\n    total += x\n",
    "sub add {\n    my ($a, $b) = @_;\n    return $a + $b;\n}\n",
    "add() {\n    echo $(( $1 + $2 ))\n}\nif [ -n \"$x\" ]; then echo yes; fi\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer({"code": CODE * 20}, vocab_size=320, model_max_length=512)


@pytest.fixture(scope="module")
def base(tokenizer):
    torch.manual_seed(0)
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4, multi_query=True,
        initializer_range=0.2,  # outputs that vary from token to token, so that bugs show
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPTBigCodeForCausalLM(config).eval()


def shapes_of(base, targets) -> dict[str, list[int]]:
    return flora.inject(copy.deepcopy(base), targets, max_slots=2, max_rank=1).module_shapes


@pytest.fixture(scope="module")
def adapters(base):
    qk = shapes_of(base, "gpt_bigcode")  # the q,k columns of c_attn
    whole = shapes_of(base, flora.PRESETS["gpt_bigcode-c_attn"])
    ia3_targets, ff = flora.IA3_PRESETS["gpt_bigcode"]
    ia3 = shapes_of(base, ia3_targets)
    ia3_ff = tuple(p for p in ia3 if any(flora.target_matches(f, p) for f in ff))
    return {
        "flora-qk": randomised(flora.init_adapter("flora", 2, qk, seed=1), 11),
        "ia3": randomised(flora.init_adapter("ia3", 1, ia3, feedforward_modules=ia3_ff), 12),
        "lora-whole": randomised(flora.init_adapter("lora", 2, whole, scale=2.0, seed=3), 13),
    }


def problems() -> list[Problem]:
    own = [
        Problem("stops-early", "python", "def f(x):\n", "", ("e", "\n")),  # frequent stops: cut mid-output
        Problem("never-stops", "shell", "add() {\n", "}\n", ("\x00",)),
    ]
    return own + load_problems(BUILTIN, languages=("python", "perl"), max_per_language=1)


def banked(base, adapters):
    groups = bank_groups(copy.deepcopy(base), adapters)
    for model, labels in groups:
        for label in labels:
            flora.banks_of(model).load(label, adapters[label])
    return groups


@torch.no_grad()
def reference_completion(model, tokenizer, problem: Problem, max_new_tokens: int) -> str:
    ids = tokenizer(problem.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return truncate_at_stop(tokenizer.decode(new, skip_special_tokens=True), problem.stop_tokens)


def test_shared_batches_give_each_adapters_own_greedy_completion(base, tokenizer, adapters):
    groups = banked(base, adapters)
    assert [labels for _, labels in groups] == [["flora-qk"], ["ia3", "lora-whole"]]
    jobs = [(label, p) for label in (None, *adapters) for p in problems()]
    completions = []
    for i, (model, labels) in enumerate(groups):
        members = set(labels) | ({None} if i == 0 else set())
        completions += generate_completions(
            model, tokenizer, [j for j in jobs if j[0] in members], n_samples=1, temperature=0.0, top_p=1.0,
            max_new_tokens=24, seed=0, engine_config=EngineConfig(max_batch_rows=6, max_batch_tokens=256),
        )
    assert len(completions) == len(jobs)
    merged = {label: merge_into(base, adapter) for label, adapter in adapters.items()} | {"base": base}
    by_problem = {(p.language, p.name): p for p in problems()}
    for c in completions:
        expected = reference_completion(merged[c.label], tokenizer, by_problem[(c.language, c.problem)], 24)
        assert c.text == expected, (c.label, c.problem)
    assert any(c.finish_reason == "stop" for c in completions) and any(c.finish_reason == "length" for c in completions)
    # The adapters change the outputs: otherwise this test could not fail.
    texts = {c.label: c.text for c in completions if c.problem == "never-stops"}
    assert len(set(texts.values())) == 4


def test_sampled_completions_are_seeded_per_sample(base, tokenizer, adapters):
    (model, labels), _ = banked(base, adapters)
    kwargs = dict(n_samples=3, temperature=0.8, top_p=0.95, max_new_tokens=12, seed=7,
                  engine_config=EngineConfig(max_batch_rows=4, max_batch_tokens=128))
    p = problems()[1]
    together = generate_completions(model, tokenizer, [(None, p), ("flora-qk", p)], **kwargs)
    alone = generate_completions(model, tokenizer, [("flora-qk", p)], **kwargs)
    texts = lambda cs: [c.text for c in cs if c.label == "flora-qk"]  # noqa: E731
    assert texts(together) == texts(alone)  # the same seeds whatever else is in the batch
    assert len(set(texts(alone))) > 1  # and the samples differ from each other
    assert sample_seed(7, "a", p, 0) != sample_seed(7, "a", p, 1)


def test_prompts_longer_than_the_context_are_skipped(base, tokenizer):
    model = copy.deepcopy(base)
    long = Problem("long", "python", "x = 1\n" * 400, "", ("\n",))
    (c,) = generate_completions(model, tokenizer, [(None, long)], n_samples=1, temperature=0.0, top_p=1.0,
                                max_new_tokens=4, seed=0, engine_config=EngineConfig())
    assert c.finish_reason == "skipped" and "context" in c.error


def test_heldout_perplexity_in_shared_batches_equals_the_merged_models_loss(base, adapters):
    gen = torch.Generator().manual_seed(0)
    blocks = {"python": torch.randint(3, base.config.vocab_size, (5, 24), generator=gen),
              "perl": torch.randint(3, base.config.vocab_size, (3, 24), generator=gen)}
    groups = banked(base, adapters)
    wanted = {0: [(None, "python"), (None, "perl"), ("flora-qk", "python")],
              1: [("ia3", "perl"), ("lora-whole", "python"), ("lora-whole", "perl")]}
    scores = {}
    for i, (model, _) in enumerate(groups):
        scores.update(heldout_perplexity(model, blocks, wanted[i], batch_size=3))  # batches mix pairs
    merged = {label: merge_into(base, adapter) for label, adapter in adapters.items()} | {None: base}
    for (label, lang), s in scores.items():
        with torch.no_grad():
            loss = merged[label](input_ids=blocks[lang], labels=blocks[lang]).loss.item()
        assert s["loss"] == pytest.approx(loss, rel=1e-4), (label, lang)
        assert s["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)
        assert s["tokens"] == blocks[lang].shape[0] * 23
    assert len({round(s["loss"], 4) for s in scores.values()}) == len(scores)
    with pytest.raises(ValueError, match="no held-out blocks"):
        heldout_perplexity(groups[0][0], blocks, [(None, "lua")], batch_size=2)
