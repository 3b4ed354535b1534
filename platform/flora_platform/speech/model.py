"""Whisper for speech: load any checkpoint, or build the embedded default that needs no download.

`load_speech_model(name)` loads a hub id (`openai/whisper-tiny`) or a local directory as
`(WhisperForConditionalGeneration, WhisperProcessor)`. `ensure_embedded_whisper(cache_dir,
sentences_by_locale)` builds a tiny multilingual Whisper with random weights and its own
byte-level BPE tokenizer trained on the sentences, saves it with `save_pretrained` and returns
its directory, which `load_speech_model` then loads like any other checkpoint. The cache follows
`flora_platform.base_model`: keyed by a hash of the settings and the corpus, built under a
temporary name and renamed when whole.

Every decoder sequence starts with Whisper's prompt, the language token forced per example:

    <|startoftranscript|> <|xx|> <|transcribe|> <|notimestamps|> text ... <|endoftext|>

`encode_batch` turns `SpeechExample`s into the inputs and labels of one training step;
`transcribe` decodes greedily, each example under its own language token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import (
    AutoConfig,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from flora_platform.base_model import (
    EOS_TOKEN, PAD_TOKEN, build_once, corpus_digest, made_with, torch_threads, train_tokenizer,
)
from flora_platform.data import looks_like_path
from flora_platform.speech.audio import TARGET_RATE
from flora_platform.speech.corpus import SpeechExample

logger = logging.getLogger(__name__)

START_OF_TRANSCRIPT = "<|startoftranscript|>"
TRANSCRIBE = "<|transcribe|>"
NO_TIMESTAMPS = "<|notimestamps|>"
# Whisper's control tokens in Whisper's own order, after the text vocabulary: generate() takes
# <|nospeech|> to be no_timestamps_token_id - 1 and every id above <|notimestamps|> to be a
# timestamp, so the order is part of the contract.
TASK_TOKENS = ["<|translate|>", TRANSCRIBE]
CONTROL_TOKENS = TASK_TOKENS + ["<|startoflm|>", "<|startofprev|>", "<|nospeech|>", NO_TIMESTAMPS]
PROMPT_LENGTH = 4  # <|startoftranscript|> <|xx|> <|transcribe|> <|notimestamps|>
# generate() lower-cases language names before looking them up, so a locale token must be
# lower case to be reachable; no "|" or spaces, which would break the <|xx|> form.
LOCALE_PATTERN = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
MARKER_NAME = "flora_embedded_whisper.json"  # written last: its presence means the directory is whole
CACHE_FORMAT = 4  # bump when the build changes, so old caches are not reused


def load_speech_model(name_or_path: str, dtype=None) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """(model, processor) from a hub id or a local directory holding a Whisper checkpoint.

    dtype: a torch dtype (or its name); None keeps the checkpoint's own."""
    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ValueError(
            f"speech model {name_or_path!r} looks like a local path but does not exist; pass an existing "
            "Whisper directory or a hub id such as openai/whisper-tiny"
        )
    path = str(Path(name_or_path).expanduser()) if looks_like_path(name_or_path) else name_or_path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read a model config from {name_or_path!r}: {err}") from err
    if config.model_type != "whisper":
        raise ValueError(
            f"speech model {name_or_path!r} is a {config.model_type!r} model, not Whisper; pass a Whisper "
            "checkpoint (e.g. openai/whisper-tiny) or a directory made by ensure_embedded_whisper"
        )
    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype)
    processor = WhisperProcessor.from_pretrained(path)
    return model, processor


def ensure_embedded_whisper(
    cache_dir: str | Path,
    sentences_by_locale: dict[str, list[str]],
    *,
    vocab_size: int = 1024,
    d_model: int = 64,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    attention_heads: int = 4,
    ffn_dim: int = 256,
    max_target_positions: int = 64,
    window_seconds: int = 30,
    seed: int = 0,
    pretrain_data: PretrainData | None = None,
    pretrain_steps: int = 0,
    pretrain_lr: float = 2e-3,
    pretrain_ctc_weight: float = 0.5,
    pretrain_threads: int = 1,
) -> Path:
    """Directory of the embedded Whisper for these sentences (pass the training split), built if missing.

    The model has random weights: it is a base to fine-tune, not a recogniser. Its tokenizer has
    one language token `<|xx|>` per locale (sorted) and learns at most `vocab_size` text tokens
    from the sentences; its feature extractor is Whisper's (80 mel bins, 16 kHz) over windows of
    `window_seconds` (Whisper's 30 s by default; a shorter window makes the encoder's sequence,
    and so training on a CPU, proportionally cheaper: clips longer than it are refused).

    pretrain_steps > 0: train every weight for that many AdamW steps on batches from
    `pretrain_data` (see `pretrain`), so that adapters start from a model that has heard the
    languages, as Whisper has for the paper's. It runs on `pretrain_threads` torch threads
    whatever the process had: how a float sum is split over threads changes its last bits, so
    the weights are a function of the thread count (part of the cache key), not of the machine's
    core count or of how the job was started.
    """
    settings = dict(
        vocab_size=vocab_size, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        attention_heads=attention_heads, ffn_dim=ffn_dim, max_target_positions=max_target_positions,
        window_seconds=window_seconds, seed=seed, pretrain_steps=pretrain_steps, pretrain_lr=pretrain_lr,
        pretrain_ctc_weight=pretrain_ctc_weight, pretrain_threads=pretrain_threads,
    )
    _check_settings(sentences_by_locale, settings)
    if pretrain_steps and pretrain_data is None:
        raise ValueError("pretrain_steps > 0 needs pretrain_data")
    # Same key recipe as base_model's cache; the format tag keeps the two kinds apart.
    key = hashlib.sha256(json.dumps(
        {"format": f"whisper-{CACHE_FORMAT}", "settings": settings, "corpus": corpus_digest(sentences_by_locale),
         "pretrain_data": pretrain_data.digest() if pretrain_steps else None},
        sort_keys=True,
    ).encode())
    target = Path(cache_dir).expanduser() / f"embedded-whisper-{key.hexdigest()[:16]}"
    return build_once(
        target, lambda tmp: _build(tmp, sentences_by_locale, settings, pretrain_data), is_complete, "embedded whisper"
    )


class PretrainData(Protocol):
    """Where pre-training batches come from: `ExamplePool` (a source's own training clips) or
    `flora_platform.speech.word_bank.WordSentences` (new sentences at every step)."""

    def digest(self) -> str:
        """Names the data in the model cache's key: same digest, same batches."""

    def batch(self, rng: random.Random, size: int, step: int) -> list[SpeechExample]:
        """`size` mixed-language examples for pre-training step `step` (from 1)."""


class ExamplePool:
    """Pre-training batches drawn at random from fixed examples."""

    def __init__(self, examples: Sequence[SpeechExample]):
        if not examples:
            raise ValueError("pre-training needs at least one example")
        self.examples = list(examples)

    def digest(self) -> str:
        """Hash of the examples' audio, transcripts and locales, in order."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(f"{ex.locale}\0{ex.sentence}\0{len(ex.audio)}\0".encode())
            h.update(np.ascontiguousarray(ex.audio, dtype=np.float32).tobytes())
        return h.hexdigest()

    def batch(self, rng: random.Random, size: int, step: int) -> list[SpeechExample]:
        return rng.sample(self.examples, min(size, len(self.examples)))


def is_complete(path: Path) -> bool:
    names = (MARKER_NAME, "config.json", "generation_config.json", "tokenizer.json", "processor_config.json")
    return all((path / name).is_file() for name in names)


def _check_settings(sentences_by_locale: dict[str, list[str]], s: dict) -> None:
    if not sentences_by_locale or not all(sentences_by_locale.values()):
        raise ValueError("sentences_by_locale must map every locale to >= 1 sentence (the training transcripts)")
    bad = [loc for loc in sentences_by_locale if not LOCALE_PATTERN.fullmatch(loc)]
    if bad:
        raise ValueError(
            f"locales {bad} cannot name a Whisper language token: use lower-case letters, digits, '-' and '_' "
            "(e.g. 'de', 'sv-se'), since generate() lower-cases the language it is given"
        )
    for name in ("d_model", "encoder_layers", "decoder_layers", "attention_heads", "ffn_dim", "window_seconds"):
        if s[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {s[name]}")
    if s["pretrain_steps"] < 0 or s["pretrain_lr"] <= 0:
        raise ValueError(f"pretrain_steps must be >= 0 and pretrain_lr > 0, got {s['pretrain_steps']} and {s['pretrain_lr']}")
    if s["pretrain_threads"] < 1:
        raise ValueError(f"pretrain_threads must be >= 1, got {s['pretrain_threads']}")
    if not 0 <= s["pretrain_ctc_weight"] < 1:
        raise ValueError(f"pretrain_ctc_weight must be in [0, 1), got {s['pretrain_ctc_weight']}")
    if s["d_model"] % s["attention_heads"]:
        raise ValueError(f"d_model={s['d_model']} must be divisible by attention_heads={s['attention_heads']}")
    if s["vocab_size"] < 256 + 2:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + eos + pad), got {s['vocab_size']}")
    if s["max_target_positions"] <= PROMPT_LENGTH:
        raise ValueError(f"max_target_positions must be > {PROMPT_LENGTH} (the decoder prompt), got {s['max_target_positions']}")


def build_whisper_tokenizer(sentences_by_locale: dict[str, list[str]], vocab_size: int, model_max_length: int) -> WhisperTokenizer:
    """A WhisperTokenizer over a byte-level BPE learned from the sentences, with Whisper's special tokens.

    The text vocabulary comes first (`<|endoftext|>` and `<|pad|>` at 0 and 1, then bytes and
    merges), the special tokens after it in Whisper's order with one language token per locale.
    """
    learned = json.loads(train_tokenizer(sentences_by_locale, vocab_size, model_max_length).backend_tokenizer.to_str())
    # tokenizers writes merges as [a, b] pairs (newer) or "a b" strings (older).
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["model"]["merges"]]
    tokenizer = WhisperTokenizer(
        vocab=learned["model"]["vocab"], merges=merges, pad_token=PAD_TOKEN, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # the default rewrites " ." to "." and so changes transcripts
    )
    languages = [f"<|{locale}|>" for locale in sorted(sentences_by_locale)]
    tokenizer.add_special_tokens({"additional_special_tokens": [START_OF_TRANSCRIPT, *languages, *CONTROL_TOKENS]})
    # The constructor built its post-processor before these tokens existed; rebuild it.
    tokenizer.set_prefix_tokens()
    return tokenizer


def _build(out: Path, sentences_by_locale: dict[str, list[str]], s: dict, pretrain_data: PretrainData | None) -> None:
    started = time.perf_counter()
    tokenizer = build_whisper_tokenizer(sentences_by_locale, s["vocab_size"], s["max_target_positions"])
    ids = tokenizer.convert_tokens_to_ids
    feature_extractor = WhisperFeatureExtractor(chunk_length=s["window_seconds"])
    torch.manual_seed(s["seed"])
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=s["d_model"],
        encoder_layers=s["encoder_layers"], decoder_layers=s["decoder_layers"],
        encoder_attention_heads=s["attention_heads"], decoder_attention_heads=s["attention_heads"],
        encoder_ffn_dim=s["ffn_dim"], decoder_ffn_dim=s["ffn_dim"],
        # One position per two mel frames (conv2 has stride 2): 1500 for Whisper's 30 s window.
        max_source_positions=feature_extractor.nb_max_frames // 2,
        max_target_positions=s["max_target_positions"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=ids(START_OF_TRANSCRIPT),
        # Whisper's defaults name ids of OpenAI's vocabulary; here they would be arbitrary tokens.
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        lang_to_id={f"<|{loc}|>": ids(f"<|{loc}|>") for loc in sorted(sentences_by_locale)},
        task_to_id={name.strip("<|>"): ids(name) for name in TASK_TOKENS},
        no_timestamps_token_id=ids(NO_TIMESTAMPS), prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=True,  # no max_length: callers pass max_new_tokens, and both set draws a warning per call
    )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    final_loss = None
    if s["pretrain_steps"]:
        with torch_threads(s["pretrain_threads"]):
            final_loss = pretrain(model, processor, pretrain_data, s["pretrain_steps"], s["pretrain_lr"],
                                  s["max_target_positions"] - 1, s["seed"], ctc_weight=s["pretrain_ctc_weight"])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {
        "settings": s, "corpus_digest": corpus_digest(sentences_by_locale), "locales": sorted(sentences_by_locale),
        "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()), "pretrain_loss": final_loss,
        "seconds": round(time.perf_counter() - started, 1),
        # Not in the key, but what else the weights' last bits depend on (see the README's Speech section).
        "made_with": made_with(),
    }
    (out / MARKER_NAME).write_text(json.dumps(summary, indent=1))
    logger.info("embedded whisper: %d parameters, %d tokens, locales %s", summary["parameters"], len(tokenizer), summary["locales"])


def pretrain(model, processor, data: PretrainData, steps: int, lr: float, max_label_tokens: int, seed: int, *,
             ctc_weight: float = 0.5, batch_size: int = 8, log_every: int = 100) -> float:
    """Train every weight on `data`'s batches at a constant learning rate; returns the mean
    decoder loss of the last 50 steps.

    ctc_weight > 0 adds a CTC loss on the encoder's output through a linear head that is
    dropped afterwards (hybrid CTC/attention training, Watanabe et al. 2017). CTC's alignment is
    monotonic, so it teaches the encoder where each word is from the first steps; the decoder's
    cross-attention alone finds that out late, and a model this small finds it not at all before
    it has memorised its training sentences.
    """
    rng = random.Random(seed)
    blank = len(processor.tokenizer)  # one class past the vocabulary
    ctc_head = torch.nn.Linear(model.config.d_model, blank + 1)
    parameters = [*model.parameters(), *ctc_head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = data.batch(rng, batch_size, step)
        inputs = encode_batch(processor, batch, max_label_tokens)
        out = model(**inputs)
        loss = out.loss
        if ctc_weight:
            loss = (1 - ctc_weight) * loss + ctc_weight * _ctc_loss(
                ctc_head, out.encoder_last_hidden_state, inputs["labels"], processor.tokenizer.eos_token_id, blank)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % log_every == 0 or step == steps:
            logger.info("embedded whisper pre-training: step %d/%d, decoder loss %.3f (%.0f s)", step, steps,
                        sum(losses[-log_every:]) / len(losses[-log_every:]), time.perf_counter() - started)
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


def _ctc_loss(head: torch.nn.Linear, encoded: torch.Tensor, labels: torch.Tensor, eos_id: int, blank: int) -> torch.Tensor:
    """CTC of the transcripts (the labels' text tokens, <|endoftext|> excluded) given the encoder's
    output [B, T, D]."""
    log_probs = head(encoded).log_softmax(-1).transpose(0, 1)  # [T, B, V + 1]
    keep = (labels != -100) & (labels != eos_id)  # text tokens only
    targets = [row[mask] for row, mask in zip(labels, keep)]
    return torch.nn.functional.ctc_loss(
        log_probs, torch.cat(targets), torch.full((len(targets),), encoded.shape[1], dtype=torch.long),
        torch.tensor([len(t) for t in targets]), blank=blank, zero_infinity=True,
    )


# --------------------------------------------------------------------------- prompts and batches


def decoder_prompt(tokenizer, locale: str) -> list[int]:
    """[<|startoftranscript|>, <|locale|>, <|transcribe|>, <|notimestamps|>] as ids.

    Looked up by name: WhisperTokenizer.prefix_tokens computes the language id from its position
    in OpenAI's 99-language list, which a tokenizer with only its own locales does not follow.
    """
    names = [START_OF_TRANSCRIPT, f"<|{locale}|>", TRANSCRIBE, NO_TIMESTAMPS]
    prompt = tokenizer.convert_tokens_to_ids(names)
    # Whisper's unk is <|endoftext|>, so a missing token comes back as a valid id: check by name.
    missing = [name for name, i in zip(names, prompt) if i is None or tokenizer.convert_ids_to_tokens(i) != name]
    if names[1] in missing:
        raise ValueError(
            f"the tokenizer has no language token {names[1]} for locale {locale!r}; its language tokens are "
            f"{language_tokens(tokenizer)}: train an adapter only for those, or build the model with this locale"
        )
    if missing:
        raise ValueError(f"the tokenizer lacks Whisper's special tokens {missing}; is this a Whisper tokenizer?")
    return prompt


def language_tokens(tokenizer) -> list[str]:
    """The `<|xx|>` tokens of a Whisper tokenizer that name languages (not tasks, controls or timestamps)."""
    other = {START_OF_TRANSCRIPT, EOS_TOKEN, PAD_TOKEN, *CONTROL_TOKENS}
    found = (t.content for t in tokenizer.added_tokens_decoder.values())
    return sorted(t for t in found if t not in other and re.fullmatch(r"<\|[a-z][a-z0-9_-]*\|>", t))


def audio_window_seconds(processor) -> float:
    """How much audio the model sees at once: 30 s for OpenAI's Whisper checkpoints."""
    return processor.feature_extractor.n_samples / TARGET_RATE


def audio_features(processor, audios: Sequence[np.ndarray]) -> torch.Tensor:
    """[B, 80, F] log-mel features of 16 kHz clips, each padded to the model's window
    (F = 3000 frames for Whisper's 30 s)."""
    window = audio_window_seconds(processor)
    for i, audio in enumerate(audios):
        if len(audio) > window * TARGET_RATE:
            raise ValueError(
                f"clip {i} is {len(audio) / TARGET_RATE:.1f} s long; this model sees {window:g} s at a time, and "
                "the feature extractor would cut the rest silently: cut it into shorter clips"
            )
    return processor.feature_extractor(list(audios), sampling_rate=TARGET_RATE, return_tensors="pt").input_features


def encode_batch(processor, examples: Sequence[SpeechExample], max_label_tokens: int) -> dict[str, torch.Tensor]:
    """Model inputs and labels of one mixed-language batch; `model(**batch).loss` trains on it.

    input_features [B, 80, F]; decoder_input_ids and labels [B, L], L = the longest
    prompt + text + <|endoftext|> minus one, at most `max_label_tokens`. labels[t] is the token
    after decoder_input_ids[t]; -100 where the next token is part of the forced prompt or
    padding, so the loss covers the text and <|endoftext|> only. Text longer than the budget is
    cut (its <|endoftext|> then falls off too). No decoder attention mask: padding is on the
    right and attention is causal, so no real position ever attends to a pad.
    """
    if max_label_tokens < PROMPT_LENGTH:
        raise ValueError(f"max_label_tokens={max_label_tokens} leaves no room for a label after the {PROMPT_LENGTH}-token prompt")
    if not examples:
        raise ValueError("encode_batch needs at least one example")
    tokenizer = processor.tokenizer
    texts = tokenizer([ex.sentence for ex in examples], add_special_tokens=False).input_ids
    sequences, cut = [], 0
    for ex, text in zip(examples, texts):
        sequence = decoder_prompt(tokenizer, ex.locale) + text + [tokenizer.eos_token_id]
        if len(sequence) > max_label_tokens + 1:
            sequence, cut = sequence[: max_label_tokens + 1], cut + 1
        sequences.append(sequence)
    if cut:
        logger.warning("encode_batch: %d of %d transcripts cut to max_label_tokens=%d", cut, len(examples), max_label_tokens)
    length = max(len(s) for s in sequences) - 1
    decoder_input_ids = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(examples), length), -100, dtype=torch.long)  # [B, L]
    for row, sequence in enumerate(sequences):
        n = len(sequence) - 1
        decoder_input_ids[row, :n] = torch.tensor(sequence[:-1])
        labels[row, PROMPT_LENGTH - 1 : n] = torch.tensor(sequence[PROMPT_LENGTH:])
    return {
        "input_features": audio_features(processor, [ex.audio for ex in examples]),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
    }


# --------------------------------------------------------------------------- decoding


@torch.no_grad()
def transcribe_ids(model, processor, audios: Sequence[np.ndarray], locales: Sequence[str], max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding, batched, each clip under its own language token.

    Returns [B, 4 + N] token ids: each row's prompt, then up to `max_new_tokens` generated
    tokens, right-padded with the pad id after <|endoftext|>."""
    if len(audios) != len(locales):
        raise ValueError(f"{len(audios)} clips but {len(locales)} locales; pass one locale per clip")
    limit = model.config.max_target_positions - PROMPT_LENGTH
    if not 1 <= max_new_tokens <= limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in 1..{limit} (max_target_positions - the prompt)")
    tokenizer = processor.tokenizer
    prompts = [decoder_prompt(tokenizer, locale) for locale in locales]  # checks every locale first
    features = audio_features(processor, audios).to(model.device, model.dtype)  # [B, 80, 3000]
    out = model.generate(
        features,
        # generate() accepts one language per row and looks "<|xx|>" up in lang_to_id as is.
        language=[tokenizer.convert_ids_to_tokens(p[1]) for p in prompts],
        task="transcribe", do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,  # keeps the prompt in `sequences`
    )
    sequences = out.sequences  # [B, 4 + N]
    assert sequences[:, :PROMPT_LENGTH].tolist() == prompts, (sequences[:, :PROMPT_LENGTH], prompts)
    return sequences


def transcribe(model, processor, audios: Sequence[np.ndarray], locales: Sequence[str], max_new_tokens: int) -> list[str]:
    """One transcript per clip: greedy, each clip under its own language token."""
    sequences = transcribe_ids(model, processor, audios, locales, max_new_tokens)
    texts = processor.tokenizer.batch_decode(sequences[:, PROMPT_LENGTH:], skip_special_tokens=True)
    return [text.strip() for text in texts]
