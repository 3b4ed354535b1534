"""The embedded espeak-ng corpus (files, manifest, cache) and Common Voice-style sources."""

import io
import json
import logging
import shutil
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from flora_platform.speech.audio import AudioError
from flora_platform.speech.corpus import (
    WORDS, CorpusError, is_dataset_repository, load_examples, load_hub_examples, synthesize_corpus,
)

LANGUAGES = ("en", "de")
NO_ESPEAK = "espeak-ng is not installed (`make install` installs it where apt-get may run)"
PER_LANGUAGE, HELD_OUT = 3, 1


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip(NO_ESPEAK)
    out = tmp_path_factory.mktemp("speech") / "corpus"
    return synthesize_corpus(out, languages=LANGUAGES, per_language=PER_LANGUAGE, held_out=HELD_OUT, seed=0)


def read_wav(path: Path):
    """(samples [N] in [-1, 1], the header) of a 16-bit WAV, read with `wave`."""
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        return np.frombuffer(w.readframes(params.nframes), dtype="<i2") / 32768.0, params


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_manifest_and_splits(corpus_dir):
    manifest = pq.read_table(corpus_dir / "manifest.parquet")
    assert manifest.column_names == ["path", "sentence", "locale", "split"]
    rows = manifest.to_pylist()
    for locale in LANGUAGES:
        mine = [r for r in rows if r["locale"] == locale]
        assert [r["split"] for r in mine].count("train") == PER_LANGUAGE
        assert [r["split"] for r in mine].count("test") == HELD_OUT
        assert len({r["sentence"] for r in mine}) == len(mine)  # held-out sentences are unseen
        vocabulary = set(WORDS[locale].split())
        for r in mine:
            words = r["sentence"].rstrip(".").split()
            assert 3 <= len(words) <= 7 and r["sentence"][0].isupper() and r["sentence"].endswith(".")
            assert {words[0][0].lower() + words[0][1:], words[0]} & vocabulary and set(words[1:]) <= vocabulary


def test_clips_are_16k_speech_of_plausible_length(corpus_dir):
    rows = pq.read_table(corpus_dir / "manifest.parquet").to_pylist()
    for r in rows:
        samples, params = read_wav(corpus_dir / r["path"])
        assert (params.framerate, params.nchannels, params.sampwidth) == (16_000, 1, 2)
        seconds = len(samples) / 16_000
        words = len(r["sentence"].split())
        assert 0.15 * words < seconds < 1.5 * words + 1.0, (r, seconds)  # 130-190 words/min plus pauses
        assert np.sqrt(np.mean(samples**2)) > 0.01, r  # not silent


def test_second_call_reuses_the_files(corpus_dir, caplog):
    files = sorted(corpus_dir.rglob("*.wav")) + [corpus_dir / "manifest.parquet"]
    before = {f: f.stat().st_mtime_ns for f in files}
    with caplog.at_level(logging.INFO, logger="flora_platform.speech.corpus"):
        again = synthesize_corpus(corpus_dir, languages=LANGUAGES, per_language=PER_LANGUAGE, held_out=HELD_OUT, seed=0)
    assert again == corpus_dir
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert "reusing" in caplog.text and "clips spoken" not in caplog.text


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason=NO_ESPEAK)
def test_other_arguments_rebuild(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="flora_platform.speech.corpus"):
        synthesize_corpus(tmp_path, languages=("es",), per_language=2, held_out=0, seed=0)
        first = pq.read_table(tmp_path / "manifest.parquet").column("sentence").to_pylist()
        synthesize_corpus(tmp_path, languages=("es",), per_language=2, held_out=0, seed=1)
    second = pq.read_table(tmp_path / "manifest.parquet").column("sentence").to_pylist()
    assert first != second and len(second) == 2
    assert caplog.text.count("2/2 clips spoken") == 2


def test_missing_espeak_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH directory: no espeak-ng
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        synthesize_corpus(tmp_path / "corpus", languages=("en",), per_language=1, held_out=0)


def test_unknown_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no word list for \['xx'\]"):
        synthesize_corpus(tmp_path, languages=("en", "xx"))


def test_load_examples_from_the_corpus(corpus_dir):
    examples = load_examples(corpus_dir)
    manifest = pq.read_table(corpus_dir / "manifest.parquet").to_pylist()
    assert [(e.sentence, e.locale, e.split) for e in examples] == [(r["sentence"], r["locale"], r["split"]) for r in manifest]
    for e, r in zip(examples, manifest):
        samples, _ = read_wav(corpus_dir / r["path"])
        assert e.audio.dtype == np.float32
        np.testing.assert_allclose(e.audio, samples, atol=1e-4)  # already 16 kHz: decoded as written
    assert {e.locale for e in load_examples(corpus_dir, locales=["de"])} == {"de"}


def test_common_voice_parquet_with_audio_arrays(tmp_path):
    t = np.arange(8_000) / 8_000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    table = pa.table({
        "audio": [tone.tolist(), tone[:4_000].tolist()],
        "sampling_rate": [8_000, 8_000],
        "sentence": ["Bonjour à tous.", "Merci."],
        "locale": ["fr", "fr"],
        "client_id": ["x", "y"],  # Common Voice's other columns are ignored
    })
    pq.write_table(table, tmp_path / "validated.parquet")
    examples = load_examples(tmp_path / "validated.parquet")
    assert [(e.sentence, e.locale, e.split) for e in examples] == [("Bonjour à tous.", "fr", "train"), ("Merci.", "fr", "train")]
    assert [len(e.audio) for e in examples] == [16_000, 8_000]  # resampled 8 kHz -> 16 kHz
    assert np.abs(examples[0].audio[100:-100]).max() == pytest.approx(0.3, rel=0.02)


def test_hugging_face_audio_structs_and_split_column(tmp_path):
    clip = wav_bytes(np.full(22_050, 0.25), 22_050)
    table = pa.table({
        "audio": [{"bytes": clip, "path": "a.wav"}, {"bytes": clip, "path": "b.wav"}],
        "sentence": ["Hola.", "Adiós."],
        "locale": ["es", "es"],
        "split": ["train", "test"],
    })
    pq.write_table(table, tmp_path / "data.parquet")
    examples = load_examples(tmp_path / "data.parquet")
    assert [e.split for e in examples] == ["train", "test"] and [len(e.audio) for e in examples] == [16_000, 16_000]


def test_common_voice_tsv_with_clips_folder(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "common_voice_it_1.wav").write_bytes(wav_bytes(np.full(16_000, 0.1), 16_000))
    (tmp_path / "test.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\tlocale\n"
        'abc\tcommon_voice_it_1.wav\tLui dice "ciao".\t2\tit\n', encoding="utf-8",
    )
    [example] = load_examples(tmp_path / "test.tsv")
    assert (example.sentence, example.locale, example.split) == ('Lui dice "ciao".', "it", "test")  # split from test.tsv


def test_missing_sentence_column_is_named(tmp_path):
    pq.write_table(pa.table({"path": ["a.wav"], "locale": ["en"]}), tmp_path / "bad.parquet")
    with pytest.raises(CorpusError, match=r"no `sentence` column \(columns: \['locale', 'path'\]\)"):
        load_examples(tmp_path / "bad.parquet")


@pytest.mark.parametrize("row,error,message", [
    ({"path": "gone.wav"}, CorpusError, r"row 0: audio file 'gone.wav' not found"),
    ({"path": "clip.mp3"}, AudioError, r"clip.mp3: audio is not in a format read here.*FLAC, MP3 or OGG"),
    ({"path": "long.wav"}, AudioError, r"row 0: .*long.wav: audio is 31.0 s long"),
])
def test_unreadable_audio_names_the_row_and_file(tmp_path, row, error, message):
    (tmp_path / "clip.mp3").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00")
    (tmp_path / "long.wav").write_bytes(wav_bytes(np.zeros(8_000 * 31), 8_000))
    pq.write_table(pa.table({**{k: [v] for k, v in row.items()}, "sentence": ["x"], "locale": ["en"]}), tmp_path / "m.parquet")
    with pytest.raises(error, match=message):
        load_examples(tmp_path / "m.parquet")


def test_sources_that_are_not_speech_data(tmp_path):
    with pytest.raises(CorpusError, match="holds no manifest.parquet"):
        load_examples(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CorpusError, match="not a speech source"):
        load_examples(tmp_path / "notes.txt")
    pq.write_table(pa.table({"audio": [[0.0, 0.1]], "sentence": ["x"], "locale": ["en"]}), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match="needs a `sampling_rate` column"):
        load_examples(tmp_path / "a.parquet")


def hub_layout_dataset(root: Path) -> Path:
    """A Hugging Face dataset repository as the hub serves Common Voice: one config per locale,
    parquet shards per split, an `audio` feature holding the file bytes (MP3 for fr, WAV for de)."""
    # What `datasets` writes for an Audio column (written with pyarrow: datasets' own writer
    # would need torchcodec to encode audio it is handed as bytes already).
    features = {"audio": {"_type": "Audio"}, "sentence": {"dtype": "string", "_type": "Value"},
                "locale": {"dtype": "string", "_type": "Value"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    configs = []
    for locale, fmt in (("de", "WAV"), ("fr", "MP3")):
        files = []
        for split, n in (("train", 3), ("test", 2)):
            clips = []
            for i in range(n):
                out = io.BytesIO()
                tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(22_050) / 22_050)
                soundfile.write(out, tone, 22_050, format=fmt)
                clips.append({"bytes": out.getvalue(), "path": f"{locale}_{split}_{i}.{fmt.lower()}"})
            rows = {"audio": clips, "sentence": [f"{locale} {split} {i}." for i in range(n)], "locale": [locale] * n}
            path = f"{locale}/{split}-00000.parquet"
            (root / locale).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(rows).replace_schema_metadata(metadata), root / path)
            files.append(f"  - split: {split}\n    path: {path}")
        configs.append(f"- config_name: {locale}\n  data_files:\n" + "\n".join(files))
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n# speech\n")
    return root


def test_hugging_face_dataset_by_config_per_locale_streams_what_it_needs(tmp_path):
    repo = hub_layout_dataset(tmp_path / "cv")
    assert is_dataset_repository(repo)
    examples = load_hub_examples(str(repo), ["de", "fr"], train_rows=2, held_out_rows=5)
    got = [(ex.locale, ex.split, ex.sentence) for ex in examples]
    assert got == [("de", "train", "de train 0."), ("de", "train", "de train 1."), ("de", "test", "de test 0."),
                   ("de", "test", "de test 1."), ("fr", "train", "fr train 0."), ("fr", "train", "fr train 1."),
                   ("fr", "test", "fr test 0."), ("fr", "test", "fr test 1.")]
    for ex in examples:  # decoded (MP3 too) and resampled to 16 kHz: about one second each
        assert ex.audio.dtype == np.float32 and abs(len(ex.audio) - 16_000) < 1_200, (ex.sentence, len(ex.audio))
    with pytest.raises(CorpusError, match="name them in speech.languages"):
        load_hub_examples(str(repo), [], train_rows=2, held_out_rows=1)
    with pytest.raises(CorpusError, match="cannot open config 'xx'"):
        load_hub_examples(str(repo), ["xx"], train_rows=2, held_out_rows=1)


def test_the_speech_job_takes_a_hugging_face_dataset_as_its_source(tmp_path):
    from flora_platform.config import ConfigError, FinetuneConfig, load_config
    from flora_platform.speech.prepare import read_examples, split_examples

    repo = hub_layout_dataset(tmp_path / "cv")
    overrides = ["task=speech", f"speech.source={repo}", "speech.per_language=3", "speech.held_out=2"]
    cfg = load_config(FinetuneConfig, None, [*overrides, "speech.languages=[de,fr]"])
    train, held_out = split_examples(read_examples(cfg), cfg.speech.eval_fraction, cfg.speech.seed)
    assert {k: len(v) for k, v in train.items()} == {"de": 3, "fr": 3}
    assert {k: len(v) for k, v in held_out.items()} == {"de": 2, "fr": 2}  # the test splits
    with pytest.raises(ConfigError, match=r"^speech\.source: .*name them in speech\.languages"):
        read_examples(load_config(FinetuneConfig, None, overrides))
