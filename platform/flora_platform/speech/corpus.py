"""Speech examples (16 kHz audio, transcript, locale, split): the embedded corpus and Common Voice-style sources.

The embedded corpus needs no download: `synthesize_corpus` writes random sentences from small
per-language word lists (`WORDS`), spoken by espeak-ng with a different speed and pitch per
clip, into a directory laid out like a loadable source:

    out_dir/manifest.parquet     path (relative to out_dir), sentence, locale, split
    out_dir/clips/<locale>/*.wav 16 kHz mono 16-bit PCM
    out_dir/corpus.json          the arguments it was made with, espeak-ng's version and a digest
                                 of the clips: same arguments and version, files reused

`load_examples` reads that directory, or a Common Voice-style file: a .parquet or .tsv with
`sentence`, `locale`, and `path` (a WAV, FLAC, MP3 or OGG file, relative to the file's directory
or its `clips/`) or `audio` (the file's bytes, a Hugging Face audio struct, or an array with a
`sampling_rate` column). `load_hub_examples` reads a Hugging Face dataset laid out as Common
Voice is (a config per locale), by hub id or from a downloaded copy.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flora_platform.speech.audio import (
    MAX_SECONDS, TARGET_RATE, AudioError, check_samples, decode_audio, decode_wav, to_16k, write_wav,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
STAMP_NAME = "corpus.json"
CORPUS_FORMAT = 1  # bump when the layout or the way clips are made changes
SPLITS = ("train", "test")

# ~60 common words per language, spelled as that language writes them (nouns capitalised in
# German, accents everywhere), so that unnormalised WER has case and accents to get right.
WORDS = {
    "en": """the a man woman child dog cat house city water bread book car tree sun moon night day
        morning river garden window door table friend teacher doctor music school road is was sees
        has likes finds reads opens makes brings red green small big old new quiet happy cold warm
        today tomorrow always never often here there and but with under""",
    "de": """der die das ein eine Mann Frau Kind Hund Katze Haus Stadt Wasser Brot Buch Auto Baum
        Sonne Mond Nacht Tag Morgen Fluss Garten Fenster Tür Tisch Freund Lehrer Musik Schule Straße
        ist war sieht hat liebt findet liest öffnet macht bringt rot grün klein groß alt neu leise
        glücklich kalt warm heute immer nie oft hier dort und aber mit unter""",
    "es": """el la un una hombre mujer niño perro gato casa ciudad agua pan libro coche árbol sol
        luna noche día mañana río jardín ventana puerta mesa amigo maestro música escuela calle es
        era ve tiene quiere encuentra lee abre hace trae rojo verde pequeño grande viejo nuevo
        tranquilo feliz frío caliente hoy siempre nunca aquí allí y pero con también""",
    "fr": """le la un une homme femme enfant chien chat maison ville eau pain livre voiture arbre
        soleil lune nuit jour matin rivière jardin fenêtre porte table ami professeur musique école
        rue est était voit a aime trouve lit ouvre fait apporte rouge vert petit grand vieux nouveau
        calme heureux froid chaud aujourd'hui demain toujours jamais souvent ici et mais avec""",
    "it": """il la un una uomo donna bambino cane gatto casa città acqua pane libro macchina albero
        sole luna notte giorno mattina fiume giardino finestra porta tavolo amico maestro musica
        scuola strada è era vede ha ama trova legge apre fa prende rosso verde piccolo grande
        vecchio nuovo tranquillo felice freddo caldo oggi domani sempre mai spesso qui lì e ma con""",
}
VOICES = {"en": "en-us", "de": "de", "es": "es", "fr": "fr-fr", "it": "it"}  # espeak-ng voice per locale
DEFAULT_LANGUAGES = tuple(WORDS)
WORDS_PER_SENTENCE = (3, 7)
SPEED_WPM = (130, 190)  # espeak-ng's default is 175
PITCH = (25, 75)  # espeak-ng's range is 0..99, default 50


class CorpusError(ValueError):
    """A speech source that cannot be read: the message names the file or column and the fix."""


@dataclass
class SpeechExample:
    audio: np.ndarray  # [N] float32, 16 kHz, mono
    sentence: str
    locale: str
    split: str


def synthesize_corpus(
    out_dir: str | Path,
    languages: tuple[str, ...] | list[str] = DEFAULT_LANGUAGES,
    per_language: int = 40,
    held_out: int = 10,
    seed: int = 0,
    *,
    log_every: int = 50,
) -> Path:
    """Speak `per_language` train and `held_out` test sentences per language into `out_dir`.

    Returns out_dir (pass it to `load_examples`). Sentences are distinct within a language, so
    no test sentence is also a train sentence. Each language draws from its own seeded stream:
    adding a language leaves the others' clips unchanged.
    """
    stamp = spoken_stamp(CORPUS_FORMAT, languages, per_language=per_language, held_out=held_out, seed=seed)
    if per_language < 1 or held_out < 0:
        raise ValueError(f"per_language={per_language}, held_out={held_out}: need per_language >= 1 and held_out >= 0")
    out = Path(out_dir).expanduser()
    if is_built(out, stamp):
        logger.info("speech corpus: reusing %s", out)
        return out
    espeak = find_espeak()
    clear_stale(out)

    rows, total = [], len(languages) * (per_language + held_out)
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp:
        for locale in languages:
            rng = random.Random(f"{seed}:{locale}")
            sentences = _distinct_sentences(rng, WORDS[locale].split(), per_language + held_out)
            (out / "clips" / locale).mkdir(parents=True, exist_ok=True)
            for i, sentence in enumerate(sentences):
                split = "train" if i < per_language else "test"
                path = Path("clips") / locale / f"{locale}_{split}_{i:05d}.wav"
                speed, pitch = rng.randint(*SPEED_WPM), rng.randint(*PITCH)
                write_wav(out / path, speak(espeak, VOICES[locale], sentence, speed, pitch, Path(tmp) / "clip.wav"), TARGET_RATE)
                rows.append({"path": path.as_posix(), "sentence": sentence, "locale": locale, "split": split})
                if len(rows) % log_every == 0 or len(rows) == total:
                    logger.info("speech corpus: %d/%d clips spoken", len(rows), total)
    finish(out, rows, stamp)
    return out


def load_examples(
    source: str | Path, *, locales: list[str] | None = None, max_seconds: float = MAX_SECONDS,
) -> list[SpeechExample]:
    """Examples from a corpus directory or a Common Voice-style .parquet/.tsv file, audio at 16 kHz.

    locales: keep only these (rows of other locales are not decoded).
    split: the `split` column when there is one, else the file's name when it names a split
        (Common Voice's train.tsv, dev.tsv, test.tsv), else "train".
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise CorpusError(
                f"{path} holds no {MANIFEST_NAME}; pass a directory made by synthesize_corpus "
                "or a Common Voice-style .parquet/.tsv file"
            )
        path = path / MANIFEST_NAME
    rows = _read_rows(path)
    columns = set(rows[0]) if rows else set()
    for required in ("sentence", "locale"):
        if required not in columns:
            raise CorpusError(f"{path} has no `{required}` column (columns: {sorted(columns)}); "
                              "a speech source needs sentence, locale, and path or audio")
    if not columns & {"path", "audio"}:
        raise CorpusError(f"{path} has neither a `path` nor an `audio` column (columns: {sorted(columns)})")
    default_split = path.stem if path.stem in ("train", "dev", "validation", "test") else "train"
    examples = []
    for i, row in enumerate(rows):
        if locales is not None and row["locale"] not in locales:
            continue
        if row["sentence"] is None:
            raise CorpusError(f"{path} row {i}: the sentence is empty")
        try:
            samples, rate = _row_audio(row, path.parent, max_seconds)
        except (AudioError, CorpusError) as err:
            raise type(err)(f"{path} row {i}: {err}") from err
        examples.append(SpeechExample(
            audio=to_16k(samples, rate), sentence=str(row["sentence"]), locale=str(row["locale"]),
            split=str(row.get("split") or default_split),
        ))
    logger.info("speech examples: %d from %s", len(examples), path)
    return examples


def spoken_stamp(fmt, languages, **arguments) -> dict:
    """What a directory spoken from `WORDS` is made of (its format, languages, arguments, a
    digest of their word lists and the espeak-ng that speaks them), kept in its stamp file;
    languages without a word list refused.

    espeak-ng's version is part of it because its releases speak the same text differently: a
    directory spoken by another version (an upgrade, a cache copied from another machine) is
    spoken again instead of reused."""
    unknown = [lang for lang in languages if lang not in WORDS]
    if unknown:
        raise ValueError(f"no word list for {unknown}; the embedded speech corpus has {sorted(WORDS)}")
    words = hashlib.sha256(json.dumps([WORDS[lang] for lang in languages]).encode()).hexdigest()[:16]
    return {"format": fmt, "languages": list(languages), **arguments, "words": words, "espeak_ng": espeak_version()}


def espeak_version() -> str | None:
    """The installed espeak-ng's version ("1.51"), None when there is none on PATH."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return None
    out = subprocess.run([espeak, "--version"], check=True, capture_output=True, text=True, timeout=30).stdout
    # "eSpeak NG text-to-speech: 1.51  Data at: /usr/lib/x86_64-linux-gnu/espeak-ng-data"
    found = re.search(r"text-to-speech:\s*(\S+)", out)
    return found.group(1) if found else out.strip()


def clear_stale(out: Path) -> None:
    """Remove what an earlier or interrupted build left; the stamp first, so a half-rebuilt
    directory is never taken for a whole one."""
    for stale in (out / STAMP_NAME, out / MANIFEST_NAME):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "clips", ignore_errors=True)


def finish(out: Path, rows: list[dict], stamp: dict) -> None:
    """Write the manifest, then the stamp that marks the directory whole, with a digest of the
    clips' bytes: what is keyed on the stamp (the embedded Whisper's cache) is keyed on the audio."""
    pq.write_table(pa.Table.from_pylist(rows), out / MANIFEST_NAME)
    (out / STAMP_NAME).write_text(json.dumps({**stamp, "clips_sha256": clips_digest(out, [r["path"] for r in rows])}, indent=1))


def clips_digest(out: Path, paths: list[str]) -> str:
    """sha256 over the clips' paths and bytes, in manifest order: equal digests, equal audio."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path}\0".encode())
        h.update((out / path).read_bytes())
    return h.hexdigest()


def is_dataset_repository(path: Path) -> bool:
    """A directory laid out as a Hugging Face dataset repository (a README.md with its configs, as
    `huggingface-cli download --repo-type dataset` leaves it), not a corpus made here."""
    return path.is_dir() and (path / "README.md").is_file() and not (path / MANIFEST_NAME).is_file()


def load_hub_examples(
    source: str, locales: list[str], *, train_rows: int, held_out_rows: int, max_seconds: float = MAX_SECONDS,
) -> list[SpeechExample]:
    """Examples from a Hugging Face audio dataset with one config per locale and `audio` and
    `sentence` columns (Common Voice's layout), by hub id or from a downloaded repository.

    Streamed: at most `train_rows` rows of each locale's train split and `held_out_rows` of its
    test split (else validation, else dev) are read, so a multi-gigabyte language costs what is used.
    """
    import datasets

    if not locales:
        raise CorpusError(f"{source} is a Hugging Face dataset with one config per language: name them in speech.languages")
    examples = []
    for locale in locales:
        try:
            splits = datasets.get_dataset_split_names(source, locale)
        except Exception as err:  # not found, no such config, offline, gated: all say why
            local = "" if Path(source).exists() else f"; if {source} is meant as a local file or directory, it does not exist"
            raise CorpusError(f"cannot open config {locale!r} of the Hugging Face dataset {source}: {err}{local}") from err
        held = next((name for name in ("test", "validation", "dev") if name in splits), None)
        for split, limit in (("train", train_rows), (held, held_out_rows)):
            if split is None or split not in splits or limit == 0:
                continue
            try:
                rows = datasets.load_dataset(source, locale, split=split, streaming=True)
            except Exception as err:
                raise CorpusError(f"cannot read split {split!r} of config {locale!r} of {source}: {err}") from err
            if isinstance((rows.features or {}).get("audio"), datasets.Audio):
                rows = rows.cast_column("audio", datasets.Audio(decode=False))  # bytes: decoded here, MP3 included
            for i, row in enumerate(itertools.islice(rows, limit)):
                if "sentence" not in row or "audio" not in row:
                    raise CorpusError(f"{source} ({locale}, {split}) has no `sentence` or `audio` column (columns: {sorted(row)})")
                try:
                    samples, rate = _row_audio(row, Path("."), max_seconds)
                except (AudioError, CorpusError) as err:
                    raise type(err)(f"{source} ({locale}, {split}) row {i}: {err}") from err
                examples.append(SpeechExample(to_16k(samples, rate), str(row["sentence"]), locale,
                                              "train" if split == "train" else "test"))
        logger.info("speech examples: %s %s: %d", source, locale, sum(ex.locale == locale for ex in examples))
    return examples


def is_built(out: Path, stamp: dict) -> bool:
    """A whole directory made with `stamp`'s arguments (the stamp file also holds the clips' digest)."""
    try:
        written = json.loads((out / STAMP_NAME).read_text())
        if {key: written.get(key) for key in stamp} != stamp:
            return False
        paths = pq.read_table(out / MANIFEST_NAME, columns=["path"]).column("path").to_pylist()
    except (OSError, ValueError, KeyError, AttributeError, pa.ArrowException):
        return False
    return all((out / p).is_file() for p in paths)


def as_sentence(words: list[str]) -> str:
    """The words as a written sentence: first letter capitalised, a full stop at the end."""
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + "."


def _distinct_sentences(rng: random.Random, words: list[str], count: int) -> list[str]:
    sentences: list[str] = []
    seen: set[str] = set()
    while len(sentences) < count:
        sentence = as_sentence(rng.sample(words, rng.randint(*WORDS_PER_SENTENCE)))
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def find_espeak() -> str:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError(
            "espeak-ng is not on PATH; the embedded speech corpus is spoken by it. "
            "Install it with `apt-get install espeak-ng` (`make install` does this)"
        )
    return espeak


def speak(espeak: str, voice: str, text: str, speed: int, pitch: int, wav_path: Path) -> np.ndarray:
    """`text` spoken by espeak-ng at `speed` words per minute and `pitch` (0..99), as 16 kHz samples."""
    command = [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav_path), text]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} ({err.stderr.strip()}); "
                           f"`espeak-ng --voices` lists the installed voices") from err
    samples, rate = decode_wav(wav_path.read_bytes())
    return to_16k(samples, rate)


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        if path.suffix == ".tsv":
            # Common Voice's TSVs hold quotes inside sentences: no quoting, tabs only.
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        raise CorpusError(f"cannot read {path}: {err}") from err
    raise CorpusError(f"{path} is not a speech source; pass a directory with {MANIFEST_NAME}, a .parquet or a .tsv file")


def _row_audio(row: dict, base: Path, max_seconds: float) -> tuple[np.ndarray, int]:
    """One row's audio as (samples, rate), from whichever form the row carries it in."""
    audio = row.get("audio")
    if isinstance(audio, (bytes, bytearray)):
        return decode_audio(bytes(audio), max_seconds=max_seconds)
    if isinstance(audio, dict):  # Hugging Face's Audio feature: {bytes, path} stored, {array, sampling_rate} decoded
        if audio.get("bytes"):
            return decode_audio(audio["bytes"], max_seconds=max_seconds)
        if audio.get("array") is not None:
            rate = int(audio["sampling_rate"])
            return check_samples(audio["array"], rate, max_seconds=max_seconds), rate
        if audio.get("path"):
            return _file_audio(audio["path"], base, max_seconds)
        raise AudioError(f"the audio struct holds no bytes, array or path (keys: {sorted(audio)})")
    if audio is not None:  # a bare array: the rate is in its own column
        if row.get("sampling_rate") is None:
            raise CorpusError("an `audio` array needs a `sampling_rate` column (Hz) next to it")
        rate = int(row["sampling_rate"])
        return check_samples(audio, rate, max_seconds=max_seconds), rate
    if not row.get("path"):
        raise CorpusError("the row has neither audio nor a path")
    return _file_audio(row["path"], base, max_seconds)


def _file_audio(name: str, base: Path, max_seconds: float) -> tuple[np.ndarray, int]:
    # Common Voice keeps clips in clips/ beside its TSVs; its `path` column is the bare file name.
    candidates = [Path(name)] if Path(name).is_absolute() else [base / name, base / "clips" / name]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return decode_audio(candidate.read_bytes(), max_seconds=max_seconds)
            except AudioError as err:
                raise AudioError(f"{candidate}: {err}") from err
    raise CorpusError(f"audio file {name!r} not found (looked at {', '.join(str(c) for c in candidates)})")
