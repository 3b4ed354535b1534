"""A speech run repeats itself on one machine: the spoken corpus and the pre-trained embedded
Whisper come out bit for bit the same, and their caches name what they were made with."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from flora_platform.speech import corpus
from flora_platform.speech.corpus import STAMP_NAME, SpeechExample, espeak_version, synthesize_corpus
from flora_platform.speech.model import MARKER_NAME, ExamplePool, ensure_embedded_whisper

from ..conftest import builds_under_thread_counts

NO_ESPEAK = "espeak-ng is not installed (`make install` installs it where apt-get may run)"
SENTENCES = {"de": ["Der Hund ist alt.", "Die Katze ist klein."], "fr": ["Le chat est calme.", "La porte est rouge."]}
RATE = 16_000


def clip_bytes(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted((directory / "clips").rglob("*.wav"))}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=NO_ESPEAK)
def test_corpus_spoken_twice_is_the_same_bytes_and_names_its_espeak(tmp_path):
    first = synthesize_corpus(tmp_path / "a", ("de", "fr"), per_language=3, held_out=1, seed=5)
    second = synthesize_corpus(tmp_path / "b", ("de", "fr"), per_language=3, held_out=1, seed=5)
    assert clip_bytes(first) == clip_bytes(second) and len(clip_bytes(first)) == 8
    stamp = json.loads((first / STAMP_NAME).read_text())
    assert stamp == json.loads((second / STAMP_NAME).read_text())
    assert stamp["espeak_ng"] == espeak_version() and stamp["espeak_ng"][0].isdigit()
    assert len(stamp["clips_sha256"]) == 64


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=NO_ESPEAK)
def test_a_corpus_from_another_espeak_version_is_spoken_again(tmp_path, monkeypatch, caplog):
    synthesize_corpus(tmp_path, ("de",), per_language=2, held_out=0)
    monkeypatch.setattr(corpus, "espeak_version", lambda: "0.0-elsewhere")
    with caplog.at_level(logging.INFO, logger="flora_platform.speech.corpus"):
        synthesize_corpus(tmp_path, ("de",), per_language=2, held_out=0)
    assert "reusing" not in caplog.text and "clips spoken" in caplog.text
    assert json.loads((tmp_path / STAMP_NAME).read_text())["espeak_ng"] == "0.0-elsewhere"


def tone_pool() -> ExamplePool:
    """Clips without espeak-ng: a noisy sine per sentence."""
    examples, t = [], np.arange(RATE) / RATE
    for i, (locale, sentence) in enumerate((lang, s) for lang, rows in SENTENCES.items() for s in rows):
        noise = np.random.default_rng(i).normal(0, 0.01, t.size)
        audio = (0.5 * np.sin(2 * np.pi * (200 + 60 * i) * t) + noise).astype(np.float32)
        examples.append(SpeechExample(audio, sentence, locale, "train"))
    return ExamplePool(examples)


def test_pretraining_gives_the_same_weights_whatever_threads_the_process_has(tmp_path):
    """Before pre-training fixed its own thread count, a process with 1 and one with 3 torch
    threads (a 1-core and a many-core machine, or `ray job submit` and `python jobs/...`) made
    different weights under the same cache key."""
    tiny = dict(vocab_size=300, d_model=32, ffn_dim=64, max_target_positions=32, window_seconds=2,
                pretrain_data=tone_pool(), pretrain_steps=12)
    weights = builds_under_thread_counts(lambda name: ensure_embedded_whisper(tmp_path / name, SENTENCES, **tiny))
    assert weights[0] == weights[1]  # same cache key, same bytes
    made = json.loads((tmp_path / "process-threads-3" / weights[1][0] / MARKER_NAME).read_text())
    assert made["settings"]["pretrain_threads"] == 1 and made["made_with"]["torch"] == torch.__version__
    other = ensure_embedded_whisper(tmp_path / "two", SENTENCES, **tiny, pretrain_threads=2)
    assert other.name != weights[0][0]  # the thread count is part of the key


def test_pretrain_threads_below_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pretrain_threads must be >= 1"):
        ensure_embedded_whisper(tmp_path, SENTENCES, pretrain_threads=0)
