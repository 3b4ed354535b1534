"""Driver-side preparation of a fine-tuning job: everything that can fail before a worker starts.

Corpus → held-out split → base model (the embedded default is built and cached here) → target
check on a meta-device copy of the model (no weights loaded) → tokenised, packed blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import flora
from flora_platform.base_model import ensure_embedded_base
from flora_platform.config import ConfigError, FinetuneConfig
from flora_platform.data import load_documents, looks_like_path, pack_blocks, split_documents

log = logging.getLogger(__name__)


@dataclass
class PreparedJob:
    base_path: str  # a local directory or hub id that `from_pretrained` loads
    languages: list[str]
    train_blocks: dict[str, torch.Tensor]  # lang -> [n, seq_len]
    eval_blocks: dict[str, torch.Tensor]  # lang -> [m, seq_len]

    def worker_data(self) -> dict:
        """What the workers' task reads (`flora_platform.train.TextTask`), as object refs."""
        import ray

        return {"task": "text", "train_blocks": ray.put(self.train_blocks), "eval_blocks": ray.put(self.eval_blocks)}


def prepare_for_task(cfg: FinetuneConfig):
    """The prepared job of `cfg.task`: a `PreparedJob`, or a `PreparedSpeechJob` for task=speech.
    Both have `base_path`, `languages` and `worker_data()`."""
    if cfg.task == "speech":
        from flora_platform.speech.prepare import prepare_speech_job

        return prepare_speech_job(cfg)
    return prepare_job(cfg)


def prepare_job(cfg: FinetuneConfig) -> PreparedJob:
    try:
        docs = load_documents(cfg.data)
        train_docs, eval_docs = split_documents(docs, cfg.data.eval_fraction, cfg.data.seed)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError("data", str(err)) from err
    base_path = resolve_base_model(cfg, train_docs)
    check_targets(cfg, base_path)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    seq_len = cfg.train.seq_len
    train_blocks = pack_blocks(train_docs, tokenizer, seq_len)
    eval_blocks = {k: spread(v, cfg.train.eval_blocks) for k, v in pack_blocks(eval_docs, tokenizer, seq_len).items()}
    languages = sorted(docs)
    for lang in languages:
        log.info("%s: %d train blocks, %d held-out blocks of %d tokens", lang, len(train_blocks[lang]), len(eval_blocks[lang]), seq_len)
    return PreparedJob(base_path, languages, train_blocks, eval_blocks)


def spread(rows, n: int):
    """`n` rows (blocks of a tensor, or items of a list) evenly spaced over all of them, so that a
    held-out sample covers every held-out document or speaker, not just the first ones."""
    if len(rows) <= n:
        return rows
    picked = torch.linspace(0, len(rows) - 1, n).round().long()
    return rows[picked] if isinstance(rows, torch.Tensor) else [rows[i] for i in picked.tolist()]


def resolve_base_model(cfg: FinetuneConfig, train_docs: dict[str, list[str]]) -> str:
    name = cfg.model.name
    if name == "embedded":
        e = cfg.model.embedded
        path = ensure_embedded_base(
            Path(e.cache_dir).expanduser(), train_docs, vocab_size=e.vocab_size, n_embd=e.n_embd,
            n_layer=e.n_layer, n_head=e.n_head, n_positions=e.n_positions, pretrain_steps=e.pretrain_steps,
        )
        return str(path)
    return resolve_model_name(name)


def resolve_model_name(name: str) -> str:
    """A model directory made absolute (checked to hold a model), or a hub id as given."""
    if looks_like_path(name) or Path(name).exists():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError("model.name", f"{name}: no model directory (config.json) there")
        return str(path.resolve())
    return name  # a hub id: from_pretrained fetches it (needs network or a warm HF cache)


def check_targets(cfg: FinetuneConfig, base_path: str) -> None:
    """Inject into a weightless (meta-device) copy of the model to check targets and ranks."""
    from transformers import AutoConfig, AutoModelForCausalLM, WhisperForConditionalGeneration

    from flora_platform.train import adapter_targets

    try:
        config = AutoConfig.from_pretrained(base_path)
    except (OSError, ValueError) as err:
        raise ConfigError("model.name", f"cannot load a model config from {base_path!r}: {err}") from err
    speech = config.model_type == "whisper"
    if speech != (cfg.task == "speech"):
        raise ConfigError(
            "task", f"{cfg.model.name!r} is a {config.model_type!r} model: task=speech takes Whisper models, "
            "task=text causal language models"
        )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config) if speech else AutoModelForCausalLM.from_config(config)
    try:
        targets, _ = adapter_targets(model, cfg.adapter)
        flora.inject(model, targets, max_slots=2, max_rank=cfg.adapter.rank)
    except ValueError as err:
        raise ConfigError("adapter.targets", str(err)) from err
