"""Spoken words and the sentences assembled from them (the embedded Whisper's pre-training data)."""

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from flora_platform.speech.audio import TARGET_RATE, decode_wav
from flora_platform.speech.corpus import WORDS, WORDS_PER_SENTENCE, as_sentence
from flora_platform.speech.word_bank import SILENCE, STEPS_PER_WORD, WordSentences, synthesize_word_bank

LANGUAGES = ("de", "en")
VOICES = 2


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (`make install` installs it where apt-get may run)")
    return synthesize_word_bank(tmp_path_factory.mktemp("words") / "bank", LANGUAGES, voices=VOICES, seed=0)


def test_every_word_in_every_voice_trimmed(bank_dir):
    rows = pq.read_table(bank_dir / "manifest.parquet").to_pylist()
    for locale in LANGUAGES:
        spoken = [(r["word"], r["voice"]) for r in rows if r["locale"] == locale]
        assert sorted(spoken) == sorted((w, v) for w in WORDS[locale].split() for v in range(VOICES))
    for row in rows[:: len(rows) // 10]:
        samples, rate = decode_wav((bank_dir / row["path"]).read_bytes())
        assert rate == TARGET_RATE and 0.1 < len(samples) / rate < 1.5, row
        # Trimmed: sound at both ends (16-bit rounding may move the edge by one step).
        assert abs(samples[0]) > SILENCE - 1e-4 and abs(samples[-1]) > SILENCE - 1e-4, row


def test_second_call_reuses_the_files_and_other_arguments_rebuild(bank_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flora_platform.speech.word_bank"):
        assert synthesize_word_bank(bank_dir, LANGUAGES, voices=VOICES, seed=0) == bank_dir
    assert "reusing" in caplog.text
    with pytest.raises(ValueError, match=r"no word list for \['xx'\]"):
        synthesize_word_bank(tmp_path, ("xx",))
    with pytest.raises(ValueError, match="voices must be >= 1"):
        synthesize_word_bank(tmp_path, ("en",), voices=0)


def test_sentences_string_words_of_one_voice_and_grow_with_the_steps(bank_dir):
    data = WordSentences(bank_dir, max_seconds=6)
    first = data.batch(random.Random(0), 64, step=1)
    assert {len(ex.sentence.split()) for ex in first} == {1}  # the first steps hear single words
    assert {ex.locale for ex in first} == set(LANGUAGES)  # languages mixed in one batch
    later = data.batch(random.Random(0), 200, step=100 * STEPS_PER_WORD)
    lengths = {len(ex.sentence.split()) for ex in later}
    assert max(lengths) == WORDS_PER_SENTENCE[1] and min(lengths) == 1
    for ex in later:
        words = ex.sentence.rstrip(".").split()
        assert ex.sentence == as_sentence(words) and ex.sentence[0].isupper()
        assert {w.lower() for w in words} <= {w.lower() for w in WORDS[ex.locale].split()}, ex.sentence
        assert ex.audio.dtype == np.float32 and len(ex.audio) <= 6 * TARGET_RATE
    # Same seed, same batch: the model cache may key on the data's digest.
    again = data.batch(random.Random(0), 200, step=100 * STEPS_PER_WORD)
    assert [ex.sentence for ex in again] == [ex.sentence for ex in later]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(again, later))


def test_a_one_word_sentence_is_that_words_clip_between_silences(bank_dir):
    data = WordSentences(bank_dir, max_seconds=6)
    ex = data.sentence(random.Random(3), "de", most_words=1)
    word = ex.sentence.rstrip(".")
    clips = [samples for w, samples in (pair for voice in data.clips["de"].values() for pair in voice) if w.lower() == word.lower()]
    loud = np.flatnonzero(ex.audio)
    spoken = ex.audio[loud[0] : loud[-1] + 1]
    assert any(len(c) == len(spoken) and np.array_equal(c, spoken) for c in clips)


def test_sentences_longer_than_the_window_lose_words(bank_dir):
    short = WordSentences(bank_dir, max_seconds=1.5)
    batch = short.batch(random.Random(1), 50, step=100 * STEPS_PER_WORD)
    assert all(len(ex.audio) <= 1.5 * TARGET_RATE for ex in batch)
    assert max(len(ex.sentence.split()) for ex in batch) < WORDS_PER_SENTENCE[1]  # 7 words never fit in 1.5 s
    assert WordSentences(bank_dir, 6).digest() != short.digest()
