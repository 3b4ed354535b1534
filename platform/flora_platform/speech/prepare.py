"""Driver-side preparation of a speech fine-tuning job (task=speech): everything that can fail
before a worker starts.

Examples (the embedded corpus is spoken here, or a Common Voice-style source is read) →
held-out split → base model (the embedded Whisper is built and pre-trained here, cached: on
sentences of separately spoken words for the embedded corpus, see `pretrain_data`) →
language-token and target checks on a weightless copy → examples ready to ship to workers.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from flora_platform.config import ConfigError, FinetuneConfig
from flora_platform.preflight import check_targets, resolve_model_name, spread
from flora_platform.speech.audio import TARGET_RATE
from flora_platform.data import looks_like_path
from flora_platform.speech.corpus import (
    DEFAULT_LANGUAGES, CorpusError, SpeechExample, espeak_version, is_dataset_repository, load_examples, load_hub_examples,
    synthesize_corpus,
)
from flora_platform.speech.model import (
    PROMPT_LENGTH, ExamplePool, PretrainData, audio_window_seconds, decoder_prompt, ensure_embedded_whisper,
)
from flora_platform.speech.word_bank import WordSentences, synthesize_word_bank

log = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("test", "dev", "validation")  # the first one a language has is its held-out split


@dataclass
class PreparedSpeechJob:
    base_path: str  # a local directory or hub id that `load_speech_model` loads
    languages: list[str]
    train: dict[str, list[SpeechExample]]  # locale -> training examples
    held_out: dict[str, list[SpeechExample]]  # locale -> up to speech.eval_examples held-out examples
    # For the run's tags: what made the data that the config does not say (espeak-ng's version).
    tags: dict[str, str] = field(default_factory=dict)

    def worker_data(self) -> dict:
        """What the workers' task reads (`flora_platform.speech.training.SpeechTask`), as object refs."""
        import ray

        return {"task": "speech", "train_examples": ray.put(self.train), "held_out_examples": ray.put(self.held_out)}


def prepare_speech_job(cfg: FinetuneConfig) -> PreparedSpeechJob:
    if cfg.scaling.gpu_memory_gb:
        raise ConfigError("scaling.gpu_memory_gb", "the memory estimate covers causal code models (task=text) only; "
                                                   "set 0 for task=speech")
    examples = read_examples(cfg)
    train, held_out = split_examples(examples, cfg.speech.eval_fraction, cfg.speech.seed)
    held_out = {lang: spread(rows, cfg.speech.eval_examples) for lang, rows in held_out.items()}
    clips = [ex for rows in (*train.values(), *held_out.values()) for ex in rows]
    if cfg.model.name == "embedded":  # before the model is built (and pre-trained on these clips)
        check_clip_lengths(cfg, cfg.model.embedded_whisper.window_seconds, clips)
    base_path = resolve_speech_model(cfg, train)
    check_speech_model(cfg, base_path, sorted(train), clips)
    for lang in sorted(train):
        log.info("%s: %d training clips, %d held-out clips", lang, len(train[lang]), len(held_out[lang]))
    tags = {"espeak_ng": str(espeak_version())} if cfg.speech.source == "embedded" else {}
    return PreparedSpeechJob(base_path, sorted(train), train, held_out, tags)


def read_examples(cfg: FinetuneConfig) -> list[SpeechExample]:
    s = cfg.speech
    locales = list(s.languages) or None
    try:
        if s.source == "embedded":
            languages = tuple(s.languages) or DEFAULT_LANGUAGES
            key = f"{'-'.join(languages)}_{s.per_language}x{s.held_out}_seed{s.seed}"
            corpus = synthesize_corpus(Path(s.corpus_dir).expanduser() / key, languages, s.per_language, s.held_out, s.seed)
            examples = load_examples(corpus, locales=locales)
        elif is_hub_source(s.source):
            source = str(Path(s.source).expanduser()) if looks_like_path(s.source) else s.source
            examples = load_hub_examples(source, list(s.languages), train_rows=s.per_language, held_out_rows=s.held_out)
        else:
            path = Path(s.source).expanduser()
            if not path.exists():
                raise CorpusError(f"{s.source} does not exist; pass a corpus directory, a .parquet/.tsv file "
                                  "or a Hugging Face dataset id")
            examples = load_examples(path, locales=locales)
    except (ValueError, RuntimeError) as err:  # CorpusError, bad audio, unknown embedded language; no espeak-ng
        raise ConfigError("speech.source", str(err)) from err
    missing = sorted(set(locales or ()) - {ex.locale for ex in examples})
    if missing:
        raise ConfigError("speech.languages", f"{missing} have no examples in {s.source}")
    if not examples:
        raise ConfigError("speech.source", f"{s.source} holds no examples")
    return examples


def is_hub_source(source: str) -> bool:
    """A Hugging Face dataset: a hub id that is no local path, or a downloaded dataset repository."""
    path = Path(source).expanduser()
    return (not looks_like_path(source) and not path.exists()) or is_dataset_repository(path)


def split_examples(
    examples: list[SpeechExample], eval_fraction: float, seed: int,
) -> tuple[dict[str, list[SpeechExample]], dict[str, list[SpeechExample]]]:
    """(train, held-out) per locale. A locale's held-out examples are its test split (else dev or
    validation); a locale with none of those holds out `eval_fraction` of its training examples."""
    by_split: dict[str, dict[str, list[SpeechExample]]] = defaultdict(lambda: defaultdict(list))
    for ex in examples:
        by_split[ex.locale][ex.split].append(ex)
    train, held_out = {}, {}
    for locale, splits in sorted(by_split.items()):
        rows = splits.get("train", [])
        held = next((splits[name] for name in HELD_OUT_SPLITS if splits.get(name)), None)
        if held is None:
            rows = list(rows)
            random.Random(f"{seed}:{locale}").shuffle(rows)
            n = max(1, round(len(rows) * eval_fraction))
            held, rows = rows[:n], rows[n:]
        if not rows:
            raise ConfigError("speech.source", f"locale {locale!r} has no training examples (split 'train') left to train on")
        train[locale], held_out[locale] = rows, held
    return train, held_out


def resolve_speech_model(cfg: FinetuneConfig, train: dict[str, list[SpeechExample]]) -> str:
    name = cfg.model.name
    if name == "embedded":
        e = cfg.model.embedded_whisper
        try:
            path = ensure_embedded_whisper(
                Path(e.cache_dir).expanduser(), {lang: [ex.sentence for ex in rows] for lang, rows in train.items()},
                vocab_size=e.vocab_size, d_model=e.d_model, encoder_layers=e.encoder_layers,
                decoder_layers=e.decoder_layers, attention_heads=e.attention_heads, ffn_dim=e.ffn_dim,
                max_target_positions=e.max_target_positions, window_seconds=e.window_seconds, seed=cfg.train.seed,
                pretrain_data=pretrain_data(cfg, train) if e.pretrain_steps else None,
                pretrain_steps=e.pretrain_steps, pretrain_lr=e.pretrain_lr, pretrain_ctc_weight=e.pretrain_ctc_weight,
                pretrain_threads=e.pretrain_threads,
            )
        except ValueError as err:
            raise ConfigError("model.embedded_whisper", str(err)) from err
        return str(path)
    return resolve_model_name(name)


def pretrain_data(cfg: FinetuneConfig, train: dict[str, list[SpeechExample]]) -> PretrainData:
    """What the embedded Whisper is pre-trained on: for the embedded corpus, new sentences of its
    words spoken one by one (its few hundred sentences per language would be memorised); for
    any other source, its own training clips."""
    if cfg.speech.source != "embedded":
        return ExamplePool([ex for lang in sorted(train) for ex in train[lang]])
    languages = tuple(sorted(train))
    try:
        bank = synthesize_word_bank(
            Path(cfg.speech.corpus_dir).expanduser() / f"words_{'-'.join(languages)}_seed{cfg.speech.seed}",
            languages, seed=cfg.speech.seed,
        )
    except (ValueError, RuntimeError) as err:
        raise ConfigError("speech.source", str(err)) from err
    return WordSentences(bank, cfg.model.embedded_whisper.window_seconds)


def check_clip_lengths(cfg: FinetuneConfig, window_s: float, examples: list[SpeechExample]) -> None:
    """Every clip fits the model's window: longer ones would be cut, and their transcripts with them."""
    longest = max(examples, key=lambda ex: len(ex.audio))
    if len(longest.audio) > window_s * TARGET_RATE:
        field = "model.embedded_whisper.window_seconds" if cfg.model.name == "embedded" else "speech.source"
        raise ConfigError(
            field, f"a {longest.locale} clip ({longest.sentence!r}) is {len(longest.audio) / TARGET_RATE:.1f} s long, "
            f"but the model sees {window_s:g} s at a time: use shorter clips or a longer window",
        )


def check_speech_model(cfg: FinetuneConfig, base_path: str, languages: list[str], clips: list[SpeechExample]) -> None:
    """Whisper? A language token per locale? Lengths within its decoder and its window? Targets
    that match? Checked without loading weights."""
    from transformers import AutoConfig, WhisperProcessor

    check_targets(cfg, base_path)  # also: is it Whisper
    config = AutoConfig.from_pretrained(base_path)
    try:
        processor = WhisperProcessor.from_pretrained(base_path)
    except (OSError, ValueError) as err:
        raise ConfigError("model.name", f"cannot load a Whisper tokenizer and feature extractor from {base_path!r}: {err}") from err
    for lang in languages:
        try:
            decoder_prompt(processor.tokenizer, lang)
        except ValueError as err:
            raise ConfigError("speech.languages", str(err)) from err
    for name, limit in (("max_label_tokens", config.max_target_positions - 1),
                        ("max_new_tokens", config.max_target_positions - PROMPT_LENGTH)):
        if getattr(cfg.speech, name) > limit:
            raise ConfigError(
                f"speech.{name}",
                f"must be <= {limit} (the model's max_target_positions is {config.max_target_positions}), "
                f"got {getattr(cfg.speech, name)}",
            )
    check_clip_lengths(cfg, audio_window_seconds(processor), clips)
