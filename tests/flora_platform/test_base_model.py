"""The embedded base model: built, cached, loaded like any model, better than random; load_base errors."""

import inspect
import json
import math
import textwrap

import pytest
import torch
from transformers import GPTBigCodeForCausalLM, PreTrainedTokenizerFast

from flora_platform import base_model
from flora_platform.base_model import MARKER_NAME, ensure_embedded_base, load_base
from flora_platform.data import pack_blocks

from .conftest import builds_under_thread_counts

TINY = dict(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64, pretrain_steps=30, seq_len=32, batch_size=8, lr=1e-2)


def tiny_corpus() -> dict[str, list[str]]:
    """A few KB per language, written here so the tests do not depend on the machine's files."""
    python = [inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap)]
    c = [
        f"static int add_{i}(int a, int b)\n{{\n    return a + b * {i};\n}}\n\n"
        f"int main(void)\n{{\n    int x = add_{i}({i}, 2);\n    printf(\"%d\\n\", x);\n    return 0;\n}}\n"
        for i in range(60)
    ]
    shell = [
        f'#!/bin/sh\nset -e\nfor f in "$@"; do\n    if [ -f "$f" ]; then\n        echo "file {i}: $f"\n    fi\ndone\nexit 0\n'
        for i in range(60)
    ]
    return {"c": c, "python": python, "shell": shell}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and 2 threads on shared cores can be 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    cache = tmp_path_factory.mktemp("bases")
    calls = []
    path = ensure_embedded_base(cache, tiny_corpus(), progress=lambda step, metrics: calls.append((step, metrics)), **TINY)
    return cache, path, calls


def test_builds_a_complete_directory_and_reports_progress(built):
    cache, path, calls = built
    assert path.parent == cache and base_model.is_complete(path)
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary directory left behind
    assert [step for step, _ in calls] == list(range(3, 31, 3))
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for _, m in calls)
    summary = json.loads((path / MARKER_NAME).read_text())
    assert summary["settings"]["n_embd"] == 32 and len(summary["loss_curve"]) == 10


def test_second_call_is_a_cache_hit_and_other_settings_are_not(built, monkeypatch):
    cache, path, _ = built
    mtime = (path / MARKER_NAME).stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(base_model, "_build", no_build)
    assert ensure_embedded_base(cache, tiny_corpus(), **TINY) == path
    assert (path / MARKER_NAME).stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="rebuilt"):  # other settings: another model
        ensure_embedded_base(cache, tiny_corpus(), **{**TINY, "seed": 1})
    other_docs = {**tiny_corpus(), "shell": tiny_corpus()["shell"][:-1]}
    with pytest.raises(AssertionError, match="rebuilt"):  # other corpus: another model
        ensure_embedded_base(cache, other_docs, **TINY)
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_loads_back_through_load_base_as_a_starcoder_model(built):
    _, path, _ = built
    model, tokenizer = load_base(str(path))
    assert isinstance(model, GPTBigCodeForCausalLM) and model.config.multi_query
    assert model.config.n_embd == 32 and model.config.n_layer == 2
    assert len(tokenizer) == model.config.vocab_size == 512
    assert tokenizer.eos_token_id == model.config.eos_token_id and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert load_base(str(path), dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_pretraining_beats_the_same_model_at_random_init(built):
    _, path, _ = built
    model, tokenizer = load_base(str(path))
    blocks = pack_blocks(tiny_corpus(), tokenizer, seq_len=32)
    torch.manual_seed(0)
    untrained = GPTBigCodeForCausalLM(model.config).eval()
    with torch.no_grad():
        for lang, ids in blocks.items():  # [N, 32]
            trained_loss = model(input_ids=ids, labels=ids).loss.item()
            random_loss = untrained(input_ids=ids, labels=ids).loss.item()
            assert random_loss > math.log(512) - 0.5, lang  # an untrained model is near uniform
            assert trained_loss < random_loss - 0.3, (lang, trained_loss, random_loss)


def test_tokenizer_round_trips_code(built):
    _, path, _ = built
    _, tokenizer = load_base(str(path))
    for text in [
        "def f(x):\n\treturn x  .  y  # tabs, double spaces , and ' quotes'\n",
        'printf("%d\\n", a[i]);  /* ünïcode — 漢字 */\r\n',
        "  leading and trailing spaces  \n\n\n",
        "echo \"$HOME\" | tr -d ' ' >/dev/null 2>&1 &&  ls",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded_base(tmp_path, tiny_corpus(), **{**TINY, "pretrain_steps": 1})
    assert list(tmp_path.iterdir()) == []


def test_pretraining_gives_the_same_weights_whatever_threads_the_process_has(tmp_path):
    """`ray job submit` starts the driver on 1 torch thread, `python jobs/finetune.py` on every
    core: under one cache key both must build the same base, and the key follows the count the
    build uses."""
    small = {**TINY, "pretrain_steps": 6}
    weights = builds_under_thread_counts(lambda name: ensure_embedded_base(tmp_path / name, tiny_corpus(), **small))
    assert weights[0] == weights[1]  # same cache key, same bytes
    made = json.loads((tmp_path / "process-threads-3" / weights[1][0] / MARKER_NAME).read_text())
    assert made["settings"]["pretrain_threads"] == 1 and made["made_with"]["torch"] == torch.__version__
    other = ensure_embedded_base(tmp_path / "two", tiny_corpus(), **small, pretrain_threads=2)
    assert other.name != weights[0][0]  # the thread count is part of the key


def test_load_base_gives_a_pad_token_to_tokenizers_without_one(built, tmp_path):
    _, path, _ = built
    model, tokenizer = load_base(str(path))
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    assert bare.pad_token is None
    bare.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    _, loaded = load_base(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="model .*does not exist"):
        load_base(str(tmp_path / "no" / "such-model"))
    with pytest.raises(ValueError, match="model './missing-model'"):
        load_base("./missing-model")
    with pytest.raises(ValueError, match="n_head"):
        ensure_embedded_base(tmp_path, tiny_corpus(), **{**TINY, "n_head": 3})
    with pytest.raises(ValueError, match="seq_len"):
        ensure_embedded_base(tmp_path, tiny_corpus(), **{**TINY, "seq_len": 128})
    with pytest.raises(ValueError, match="pretrain_threads must be >= 1"):
        ensure_embedded_base(tmp_path, tiny_corpus(), **{**TINY, "pretrain_threads": 0})
