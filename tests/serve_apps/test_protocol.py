"""Request checks, streamed text and the serving config, without Ray (fast)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from flora_platform.config import ConfigError
from flora_platform.serving.config import ServeConfig, parse_args, resolve_paths
from flora_platform.serving.protocol import ApiError, parse_chat, parse_completion
from flora_platform.serving.sources import parse_registry_ref
from flora_platform.serving.text import TextStream

REPO = Path(__file__).resolve().parents[2]
LIMITS = ServeConfig().limits


def bad(body, field):
    with pytest.raises(ApiError) as err:
        parse_completion(body, LIMITS)
    assert err.value.status == 400 and err.value.param == field, err.value.message
    return err.value.message


def test_completion_requests_are_checked_field_by_field():
    ok = parse_completion({"model": "a", "prompt": ["x", "y"], "max_tokens": 5, "n": 2, "stop": "\n", "seed": 3}, LIMITS)
    assert ok.prompts == ["x", "y"] and ok.sampling.n == 2 and ok.sampling.stop == ("\n",)
    assert ok.sampling.temperature == 1.0  # OpenAI's default
    assert parse_completion({"model": "a", "prompt": [1, 2, 3]}, LIMITS).prompts == [[1, 2, 3]]
    assert parse_completion({"model": "a", "prompt": [[1], [2, 3]]}, LIMITS).prompts == [[1], [2, 3]]
    assert "integer >= 1" in bad({"model": "a", "prompt": "x", "max_tokens": -1}, "max_tokens")
    assert "limit" in bad({"model": "a", "prompt": "x", "max_tokens": LIMITS.max_tokens + 1}, "max_tokens")
    bad({"model": "a", "prompt": "x", "max_tokens": True}, "max_tokens")
    bad({"model": "a", "prompt": ""[:0] or []}, "prompt")
    bad({"model": "a", "prompt": [1, "x"]}, "prompt")
    bad({"model": "a", "prompt": "x", "temperature": -0.1}, "temperature")
    bad({"model": "a", "prompt": "x", "top_p": 0}, "top_p")
    bad({"model": "a", "prompt": "x", "n": 0}, "n")
    bad({"model": "a", "prompt": ["x"] * 3, "n": 3}, "n")  # 9 choices > max_choices
    bad({"model": "a", "prompt": "x", "stop": ["a", ""]}, "stop")
    bad({"model": "a", "prompt": "x", "logprobs": 99}, "logprobs")
    bad({"model": "a", "prompt": "x", "echo": True}, "echo")
    bad({"model": "a", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty")
    bad({"model": "a", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options")
    assert "unknown parameter" in bad({"model": "a", "prompt": "x", "max_token": 3}, "max_token")
    bad({"prompt": "x"}, "model")
    with pytest.raises(ApiError):
        parse_completion(["not", "an", "object"], LIMITS)


def test_chat_requests():
    p = parse_chat({"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2}, LIMITS)
    assert p.messages == [{"role": "user", "content": "hi"}] and p.sampling.max_tokens == 3 and p.sampling.logprobs == 2
    with pytest.raises(ApiError):
        parse_chat({"model": "a", "messages": []}, LIMITS)
    with pytest.raises(ApiError):
        parse_chat({"model": "a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, LIMITS)


def test_registry_references():
    assert parse_registry_ref("flora-python@champion") == ("flora-python", "champion", None)
    assert parse_registry_ref("models:/flora-python@champion") == ("flora-python", "champion", None)
    assert parse_registry_ref("models:/flora-python/12") == ("flora-python", None, "12")
    assert parse_registry_ref("flora-python") is None  # a directory adapter's name
    assert parse_registry_ref("models:/flora-python") is None
    assert parse_registry_ref("a@b@c") is None


@pytest.fixture(scope="module")
def tokenizer():
    from flora_platform.base_model import train_tokenizer

    texts = ["def main():\n    return 'héllo wörld ✓'\n", "x = [1, 2, 3]  # ünïcode\n"] * 10
    return train_tokenizer({"python": texts}, vocab_size=300, model_max_length=64)


@pytest.mark.parametrize("stop", [(), ("\n",), ("return", "ö"), ("zz", "2, 3"), ("✓",)])
def test_streamed_text_adds_up_to_the_full_decode_cut_at_stop(tokenizer, stop):
    """Random token ids (invalid UTF-8 included) and real texts: deltas never hold a stop string
    and always concatenate to the whole decode cut before its first stop string."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(0)
    cases = [tokenizer("def main():\n    return 'héllo wörld ✓'\nx = [1, 2, 3]")["input_ids"]]
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))] for _ in range(60)]
    for ids in cases:
        stream = TextStream(decode, stop)
        pieces = [stream.push(t) for t in ids] + [stream.finish()]
        text = decode(ids)
        expected = text[: min((text.find(s) for s in stop if s in text), default=len(text))]
        assert "".join(pieces) == expected
        assert all(s not in "".join(pieces) for s in stop)
    # Incremental: a plain ASCII text is released well before the end.
    ids = tokenizer("x = [1, 2, 3]\ny = x\n")["input_ids"]
    stream = TextStream(decode)
    assert sum(1 for t in ids if stream.push(t)) >= len(ids) // 2


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^engine\.max_batch_tokens"):
        parse_args({"engine": {"max_batch_rows": 8, "max_batch_tokens": 4}})
    with pytest.raises(ConfigError, match=r"^engine\.block_size: must be a power of two"):
        parse_args({"engine": {"block_size": 24}})
    with pytest.raises(ConfigError, match=r"^engine\.kv_memory_fraction"):
        parse_args({"engine": {"kv_memory_fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"^model\.max_slots"):
        parse_args({"model.max_slots": "1"})  # a `serve run ... model.max_slots=1` argument
    with pytest.raises(ConfigError, match=r"^limits\.max_tokns"):
        parse_args({"limits": {"max_tokns": 3}})
    with pytest.raises(ConfigError, match=r"^model\.dtype"):
        parse_args({"model": {"dtype": "fp8"}})
    cfg = parse_args({"model.max_slots": "32", "limits": {"max_tokens": 64}})
    assert cfg.model.max_slots == 32 and cfg.limits.max_tokens == 64


@pytest.mark.parametrize("name", ["flora.yaml", "flora-h100.yaml"])
def test_shipped_serve_configs_are_valid(name):
    from ray.serve.schema import ServeDeploySchema

    text = (REPO / "serve_apps" / name).read_text()
    assert text.startswith("# serve "), "a Serve config opens with the command that runs it"
    raw = yaml.safe_load(text)
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    assert app["import_path"] == "serve_apps.flora_server:build_app"
    cfg = resolve_paths(parse_args(app["args"]), REPO)
    if cfg.model.name == "embedded":
        assert Path(cfg.model.finetune_config).is_file()
        assert cfg.registry.tracking_uri == f"sqlite:///{REPO / 'runs' / 'mlflow.db'}"


def test_the_serving_library_imports_no_ray(tmp_path):
    """Only serve_apps/ is Ray-specific: the HTTP app and the service run under any ASGI server."""
    import subprocess
    import sys

    probe = "import sys, flora_platform.serving.api, flora_platform.serving.loadgen; print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
