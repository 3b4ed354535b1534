"""Spoken words, and sentences assembled from them: what the embedded Whisper is pre-trained on.

A few hundred sentences per language are too few for a small model to learn recognition from
scratch: it memorises them instead. Here espeak-ng speaks every word of the corpus's word lists
once per *voice* (a speed and a pitch), and `WordSentences` strings random words of one voice
together with short random pauses, so pre-training hears a new sentence at every step. These
sentences are not what the corpus's clips are: espeak-ng speaks a whole sentence with one
intonation and joins its words, so adapters fine-tuned on spoken sentences still have their own
part to learn.

    out_dir/manifest.parquet     path (relative to out_dir), word, locale, voice
    out_dir/clips/<locale>/*.wav 16 kHz mono, silence at both ends trimmed
    out_dir/corpus.json          the arguments it was made with, espeak-ng's version and a digest
                                 of the clips: same arguments and version, files reused
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flora_platform.speech.audio import TARGET_RATE, decode_wav, write_wav
from flora_platform.speech.corpus import (
    MANIFEST_NAME, PITCH, SPEED_WPM, STAMP_NAME, VOICES, WORDS, WORDS_PER_SENTENCE, SpeechExample, as_sentence,
    clear_stale, find_espeak, finish, is_built, speak, spoken_stamp,
)

logger = logging.getLogger(__name__)

BANK_FORMAT = 1  # bump when the layout or the way clips are made changes
SILENCE = 0.02  # |amplitude| under which a clip's first and last samples count as silence
PAUSE_S = (0.0, 0.1)  # between words: whole sentences hardly pause, so no clear gap to lean on
EDGE_S = (0.05, 0.3)  # before the first word and after the last
# Sentences grow by one word every this many pre-training steps, from one word to the
# corpus's longest: one word is the easy case to learn what a word sounds like from.
STEPS_PER_WORD = 400


def synthesize_word_bank(
    out_dir: str | Path, languages: tuple[str, ...] | list[str], voices: int = 12, seed: int = 0, *, log_every: int = 500,
) -> Path:
    """Every word of `WORDS[locale]` spoken in `voices` voices per language, into `out_dir` (returned)."""
    stamp = spoken_stamp(f"words-{BANK_FORMAT}", languages, voices=voices, seed=seed)
    if voices < 1:
        raise ValueError(f"voices must be >= 1, got {voices}")
    out = Path(out_dir).expanduser()
    if is_built(out, stamp):
        logger.info("spoken words: reusing %s", out)
        return out
    espeak = find_espeak()
    clear_stale(out)
    rows, total = [], sum(len(WORDS[lang].split()) for lang in languages) * voices
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        for locale in languages:
            rng = random.Random(f"{seed}:{locale}:voices")
            settings = [(rng.randint(*SPEED_WPM), rng.randint(*PITCH)) for _ in range(voices)]
            (out / "clips" / locale).mkdir(parents=True, exist_ok=True)
            for i, word in enumerate(WORDS[locale].split()):
                for voice, (speed, pitch) in enumerate(settings):
                    path = Path("clips") / locale / f"{locale}_{i:03d}_{voice:02d}.wav"
                    samples = speak(espeak, VOICES[locale], word, speed, pitch, Path(tmp) / "word.wav")
                    write_wav(out / path, trim_silence(samples), TARGET_RATE)
                    rows.append({"path": path.as_posix(), "word": word, "locale": locale, "voice": voice})
                    if len(rows) % log_every == 0 or len(rows) == total:
                        logger.info("spoken words: %d/%d clips", len(rows), total)
    finish(out, rows, stamp)
    return out


def trim_silence(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) > SILENCE)
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples


class WordSentences:
    """Pre-training batches for `flora_platform.speech.model.pretrain`: sentences of random words,
    each spoken in one voice, languages drawn uniformly, never longer than `max_seconds`."""

    def __init__(self, bank_dir: str | Path, max_seconds: float):
        self.bank_dir = Path(bank_dir)
        self.max_samples = int(max_seconds * TARGET_RATE)
        how = json.dumps([max_seconds, PAUSE_S, EDGE_S, STEPS_PER_WORD, WORDS_PER_SENTENCE])
        self._digest = hashlib.sha256((self.bank_dir / STAMP_NAME).read_bytes() + how.encode()).hexdigest()

    def digest(self) -> str:
        """Names the data for the model cache: the bank's stamp (its build arguments, espeak-ng's
        version, the clips' digest) and how sentences are made."""
        return self._digest

    @functools.cached_property
    def clips(self) -> dict[str, dict[int, list[tuple[str, np.ndarray]]]]:
        """locale -> voice -> [(word, samples)], read when the first batch is made (a cached
        model needs only the digest)."""
        clips: dict = defaultdict(lambda: defaultdict(list))
        for row in pq.read_table(self.bank_dir / MANIFEST_NAME).to_pylist():
            samples, _ = decode_wav((self.bank_dir / row["path"]).read_bytes())
            clips[row["locale"]][row["voice"]].append((row["word"], samples))
        return clips

    def batch(self, rng: random.Random, size: int, step: int) -> list[SpeechExample]:
        most = min(WORDS_PER_SENTENCE[1], 1 + step // STEPS_PER_WORD)
        locales = sorted(self.clips)
        return [self.sentence(rng, rng.choice(locales), most) for _ in range(size)]

    def sentence(self, rng: random.Random, locale: str, most_words: int) -> SpeechExample:
        voice = self.clips[locale][rng.choice(sorted(self.clips[locale]))]
        count = rng.randint(1, most_words)
        while True:
            chosen = rng.sample(voice, count)
            parts = [_silence(rng, EDGE_S)]
            for _, samples in chosen:
                parts += [samples, _silence(rng, PAUSE_S)]
            parts[-1] = _silence(rng, EDGE_S)
            audio = np.concatenate(parts)
            if len(audio) <= self.max_samples or count == 1:
                return SpeechExample(audio[: self.max_samples], as_sentence([w for w, _ in chosen]), locale, "train")
            count -= 1  # too long for the model's window: one word fewer


def _silence(rng: random.Random, seconds: tuple[float, float]) -> np.ndarray:
    return np.zeros(int(TARGET_RATE * rng.uniform(*seconds)), dtype=np.float32)
