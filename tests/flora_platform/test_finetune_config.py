"""A bad fine-tuning config fails before any worker starts, with a message naming the field."""

import shutil

import pytest

from flora_platform.config import ConfigError, FinetuneConfig, load_config

from .conftest import load_job, tiny_job_overrides, tiny_speech_overrides


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.languages=[python,klingon]", "languages"),
        ("adapter.rank=0", "adapter.rank"),
        ("adapter.targets=[no_such_module]", "adapter.targets"),
        ("model.name=./no/such/model", "model.name"),
        ("train.steps=-1", "train.steps"),
        ("adapter.kind=dora", "adapter.kind"),
        ("train.lr=fast", "train.lr"),
        ("tracking.nonsense=1", "tracking.nonsense"),
        ("model.quantization=8bit", "model.quantization"),  # no CUDA GPU asked for (and no bitsandbytes)
        ("model.dtype=bfloat16", "model.dtype"),  # train.precision is fp32
        ("data.stream_cpus=-1", "stream_cpus"),
        ("data.shuffle_blocks=0", "shuffle_blocks"),
        ("model.embedded.pretrain_threads=0", "model.embedded"),
        ("model.embedded.n_head=3", "model.embedded"),
    ],
)
def test_bad_config_fails_before_any_worker(tmp_path, override, field):
    import ray

    finetune = load_job("finetune")
    with pytest.raises(ConfigError) as err:
        cfg = load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path) + [override])
        finetune.run(cfg)
    assert field in str(err.value)
    assert not ray.is_initialized()


def test_empty_corpus_names_the_source(tmp_path):
    import ray

    finetune = load_job("finetune")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="source"):
        finetune.run(load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path, **{"data.source": str(empty), "data.languages": "[]"})))
    assert not ray.is_initialized()


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the embedded corpus")


@needs_espeak
@pytest.mark.parametrize(
    "override, field",
    [
        ("speech.languages=[de,xx]", "speech.source"),  # no word list for xx in the embedded corpus
        ("speech.max_new_tokens=40", "speech.max_new_tokens"),  # beyond the model's 32 positions
        ("speech.eval_examples=0", "speech.eval_examples"),
        ("task=vision", "task"),
        ("adapter.targets=[no_such_module]", "adapter.targets"),
        ("speech.source=./no/such/corpus", "speech.source"),
        ("model.embedded_whisper.window_seconds=1", "model.embedded_whisper.window_seconds"),  # clips are longer
        ("model.embedded_whisper.pretrain_ctc_weight=1", "model.embedded_whisper"),  # nothing left for the decoder
        ("train.zero_stage=3", "train.zero_stage"),  # held-out decoding cannot run under ZeRO-3
    ],
)
def test_bad_speech_config_fails_before_any_worker(tmp_path, override, field):
    import ray

    finetune = load_job("finetune")
    with pytest.raises(ConfigError) as err:
        finetune.run(load_config(FinetuneConfig, None, tiny_speech_overrides(tmp_path) + [override]))
    assert str(err.value).startswith(field), err.value
    assert not ray.is_initialized()


@needs_espeak
def test_a_code_model_is_refused_for_speech(tmp_path):
    """model.name pointing at a causal code model with task=speech names the task field."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    finetune = load_job("finetune")
    with pytest.raises(ConfigError) as err:
        finetune.run(load_config(FinetuneConfig, None, tiny_speech_overrides(tmp_path, **{"model.name": str(tmp_path / "gpt2")})))
    assert str(err.value).startswith("task")
