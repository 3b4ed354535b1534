"""Driver-side preparation of a fine-tuning job: everything that can fail before a worker starts.

Corpus sample → held-out split → base model (the embedded default is built and cached here) →
target check on a meta-device copy of the model (no weights loaded) → per-worker memory estimate,
checked against scaling.gpu_memory_gb → held-out blocks; the training documents stay in the
source, streamed by the workers through Ray Data (`flora_platform.streaming`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flora_platform.base_model import ensure_embedded_base
from flora_platform.config import ConfigError, FinetuneConfig
from flora_platform.data import CorpusConfig, load_documents, pack_blocks, split_documents
from flora_platform.memory import check_memory
from flora_platform.preflight import check_base_loading, check_targets, resolve_model_name, spread
from flora_platform.speech.prepare import PreparedSpeechJob, prepare_speech_job
from flora_platform.stream_tasks import document_digest
from flora_platform.streaming import language_sources

log = logging.getLogger(__name__)


@dataclass
class PreparedJob:
    base_path: str  # a local directory or hub id that `from_pretrained` loads
    languages: list[str]
    data: CorpusConfig  # the source the workers stream their training documents from
    held_out: frozenset[bytes]  # SHA-1 of every held-out document: never trained on
    eval_blocks: dict[str, torch.Tensor]  # lang -> [m, seq_len]

    def worker_data(self) -> dict:
        """What the workers' task reads (`flora_platform.train.TextTask`): one lazy Ray Dataset
        per language (read when a worker streams it), and object refs. Needs Ray started."""
        import ray

        return {
            "task": "text", "train_sources": language_sources(self.data, self.languages),
            "held_out": ray.put(self.held_out), "eval_blocks": ray.put(self.eval_blocks),
        }


def prepare_job(cfg: FinetuneConfig) -> PreparedJob:
    """Read a bounded sample of the source (`data`'s caps) for the held-out split and an embedded
    base's tokenizer; the training documents are streamed by the workers, not read here."""
    try:
        docs = load_documents(cfg.data)
        train_docs, eval_docs = split_documents(docs, cfg.data.eval_fraction, cfg.data.seed)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError("data", str(err)) from err
    base_path = resolve_base_model(cfg, train_docs)
    check_targets(cfg, base_path)
    check_memory(cfg, base_path, n_adapters=len(docs) if cfg.adapter.per_language else 1)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    seq_len = cfg.train.seq_len
    eval_blocks = {k: spread(v, cfg.train.eval_blocks) for k, v in pack_blocks(eval_docs, tokenizer, seq_len).items()}
    languages = sorted(docs)
    held_out = frozenset(document_digest(text) for texts in eval_docs.values() for text in texts)
    for lang in languages:
        log.info("%s: %d held-out blocks of %d tokens from %d documents; training streams the rest of the source",
                 lang, len(eval_blocks[lang]), seq_len, len(eval_docs[lang]))
    return PreparedJob(base_path, languages, cfg.data, held_out, eval_blocks)


def resolve_base_model(cfg: FinetuneConfig, train_docs: dict[str, list[str]]) -> str:
    name = cfg.model.name
    if name == "embedded":
        e = cfg.model.embedded
        try:
            path = ensure_embedded_base(
                Path(e.cache_dir).expanduser(), train_docs, vocab_size=e.vocab_size, n_embd=e.n_embd,
                n_layer=e.n_layer, n_head=e.n_head, n_positions=e.n_positions, pretrain_steps=e.pretrain_steps,
                pretrain_threads=e.pretrain_threads,
            )
        except ValueError as err:  # a setting of the base, e.g. n_embd not divisible by n_head
            raise ConfigError("model.embedded", str(err)) from err
        return str(path)
    return resolve_model_name(name)


# The driver-side preparation of each task (config `task`); the workers' side is `train.TASKS`.
PREPARERS = {"text": prepare_job, "speech": prepare_speech_job}


def prepare_for_task(cfg: FinetuneConfig) -> PreparedJob | PreparedSpeechJob:
    """The prepared job of `cfg.task`: both kinds have `base_path`, `languages` and `worker_data()`."""
    check_base_loading(cfg)
    return PREPARERS[cfg.task](cfg)
