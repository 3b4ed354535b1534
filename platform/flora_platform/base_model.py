"""Base models: load any causal LM, or build the embedded default that needs no download.

`load_base(model)` loads a hub id or a local directory. `ensure_embedded_base(cache_dir, docs)`
builds a small StarCoder-architecture model (`gpt_bigcode`, multi-query attention) with a
byte-level BPE tokenizer trained on `docs`, pre-trains it briefly on the mixed corpus, saves it
with `save_pretrained` and returns its directory, which `load_base` then loads like any other
model. The directory is keyed by a hash of every argument and of the corpus, written under a
temporary name and renamed when complete, so a cache hit is always a whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM, PreTrainedTokenizerFast

from flora_platform.data import looks_like_path, mixed_batches, pack_blocks

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # StarCoder's: document separator, bos and eos
PAD_TOKEN = "<|pad|>"
MARKER_NAME = "flora_embedded_base.json"  # written last: its presence means the directory is whole
CACHE_FORMAT = 1  # bump when the build changes, so old caches are not reused


def load_base(model: str, dtype=None, *, load_in_8bit: bool = False, device=None):
    """(model, tokenizer) from a hub id or a local directory; the tokenizer always has a pad token.

    dtype: a torch dtype (or its name); None keeps the checkpoint's own (transformers' "auto").
    load_in_8bit: bitsandbytes int8 linear weights, placed straight on `device` (a CUDA device;
        an 8-bit model cannot be moved afterwards). Untested here: no CUDA GPU or bitsandbytes."""
    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise ValueError(f"model {model!r} looks like a local path but does not exist; pass an existing model directory or a hub id")
    model_path = str(Path(model).expanduser()) if looks_like_path(model) else model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {model!r}: tokenizer has neither a pad nor an eos token; add one to its tokenizer config")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked; any id will do
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    quantized = {}
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        quantized = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **quantized)
    if lm.generation_config is not None and lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer


def enable_activation_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (torch's non-reentrant checkpoint: frozen weights and inputs that need no gradient are fine).

    Transformers checkpoints a block only while that block is in training mode, and the
    fine-tuning loop runs the model in eval mode (`from_pretrained` returns it so and nothing
    switches it: no dropout). So only the blocks themselves are flagged as training; their
    submodules keep eval mode. A block that reads its own flag for functional dropout (Whisper's
    layers) would drop out if its config asked for dropout; Whisper's checkpoints have none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no checkpointable blocks; set train.gradient_checkpointing=false")
    for block in blocks:
        block.training = True


def ensure_embedded_base(
    cache_dir: str | Path,
    docs: dict[str, list[str]],
    *,
    vocab_size: int = 4096,
    n_embd: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_positions: int = 512,
    pretrain_steps: int = 600,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    pretrain_threads: int = 1,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Directory of the embedded base model for `docs` (pass the training split), built if missing.

    progress: called as `progress(step, {"loss": ..., "tokens_per_s": ...})` at every log point,
        e.g. `lambda step, m: mlflow.log_metrics(m, step=step)`.
    The build writes MARKER_NAME with the loss curve and the per-language loss before and after
    pre-training. Defaults (1.2 M parameters, 600 steps of 16 x 128 tokens, about 1.2 M tokens)
    take about 2 minutes on 2 idle CPU cores (~13k tokens/s) and bring the held-out loss of the
    embedded corpus from 8.3 (uniform over 4096 tokens) to 3.7-5.4 per language.
    Pre-training runs on `pretrain_threads` torch threads whatever the process has: how a float
    sum is split over threads changes its last bits, so the weights are a function of the thread
    count (part of the cache key), not of the machine's core count or of how the job was started.
    """
    settings = dict(
        vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        pretrain_steps=pretrain_steps, seq_len=seq_len, batch_size=batch_size, lr=lr, seed=seed,
        pretrain_threads=pretrain_threads,
    )
    _check_settings(docs, settings)
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "settings": settings, "corpus": corpus_digest(docs)}, sort_keys=True).encode())
    target = Path(cache_dir).expanduser() / f"embedded-gpt_bigcode-{key.hexdigest()[:16]}"
    return build_once(target, lambda tmp: _build(tmp, docs, settings, progress), is_complete, "embedded base model")


def build_once(target: Path, build: Callable[[Path], None], complete: Callable[[Path], bool], label: str) -> Path:
    """`target`, made by `build(directory)` unless `complete(target)` already holds.

    The build writes into a temporary sibling that is renamed into place when whole, so readers
    (and concurrent builders) see nothing or everything; an incomplete `target` is rebuilt.
    """
    if complete(target):
        logger.info("%s: cached at %s", label, target)
        return target
    if target.exists():
        logger.warning("%s: %s is incomplete; rebuilding it", label, target)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic on one filesystem
        except OSError:
            if not complete(target):  # not a concurrent builder that finished first
                raise
            logger.info("%s: another process built %s first; using it", label, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (MARKER_NAME, "config.json", "tokenizer.json"))


def corpus_digest(docs: dict[str, list[str]]) -> str:
    """sha256 over languages and documents, with lengths so that boundaries count."""
    h = hashlib.sha256()
    for lang in sorted(docs):
        h.update(f"{lang}\0{len(docs[lang])}\0".encode())
        for text in docs[lang]:
            data = text.encode()
            h.update(f"{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def _check_settings(docs: dict[str, list[str]], s: dict) -> None:
    if not docs or not all(docs.values()):
        raise ValueError("docs must map every language to >= 1 document; load them with load_documents")
    for name in ("n_embd", "n_layer", "n_head", "pretrain_steps", "batch_size", "pretrain_threads"):
        if s[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {s[name]}")
    if s["n_embd"] % s["n_head"]:
        raise ValueError(f"n_embd={s['n_embd']} must be divisible by n_head={s['n_head']}")
    if s["vocab_size"] < 256 + 2:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + eos + pad), got {s['vocab_size']}")
    if not 2 <= s["seq_len"] <= s["n_positions"]:
        raise ValueError(f"seq_len must be in [2, n_positions={s['n_positions']}], got {s['seq_len']}")
    if s["lr"] <= 0:
        raise ValueError(f"lr must be > 0, got {s['lr']}")


def train_tokenizer(docs: dict[str, list[str]], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/StarCoder style: every byte is a token, so any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = [text for lang in sorted(docs) for text in docs[lang]]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # the default rewrites " ." to "." and breaks code
    )


def _build(out: Path, docs: dict[str, list[str]], s: dict, progress) -> None:
    started = time.perf_counter()
    tokenizer = train_tokenizer(docs, s["vocab_size"], s["n_positions"])
    blocks = pack_blocks(docs, tokenizer, s["seq_len"])  # lang -> [N, L]
    logger.info(
        "embedded base model: tokenizer of %d tokens; blocks %s",
        len(tokenizer), {lang: b.shape[0] for lang, b in blocks.items()},
    )
    torch.manual_seed(s["seed"])
    config = GPTBigCodeConfig(
        vocab_size=len(tokenizer), n_positions=s["n_positions"], n_embd=s["n_embd"], n_layer=s["n_layer"],
        n_head=s["n_head"], multi_query=True,
        # A few hundred steps on a few MB: dropout would only slow learning down.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPTBigCodeForCausalLM(config)
    with torch_threads(s["pretrain_threads"]):
        loss_before = language_losses(model, blocks)
        curve = pretrain(model, blocks, steps=s["pretrain_steps"], batch_size=s["batch_size"], lr=s["lr"], seed=s["seed"], progress=progress)
        loss_after = language_losses(model, blocks)
    logger.info("embedded base model: per-language loss %s -> %s", _fmt(loss_before), _fmt(loss_after))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "settings": s, "corpus_digest": corpus_digest(docs), "seconds": round(time.perf_counter() - started, 1),
        "loss_curve": curve, "loss_before": loss_before, "loss_after": loss_after,
        # Not in the key, but what else the weights' last bits depend on (see the README).
        "made_with": made_with(),
    }
    (out / MARKER_NAME).write_text(json.dumps(summary, indent=1))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on `count` intra-op torch threads, then restore the process's own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def made_with() -> dict[str, str]:
    """The torch version and CPU instruction set a model was pre-trained with."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def pretrain(
    model, blocks: dict[str, torch.Tensor], *, steps: int, batch_size: int, lr: float, seed: int, progress=None
) -> list[tuple[int, float]]:
    """Plain AdamW with warm-up and cosine decay over mixed-language batches; returns the logged
    (step, loss) points, the loss averaged over the steps since the previous point."""
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))
    )
    log_every = max(1, steps // 10)
    batches = mixed_batches(blocks, batch_size, seed)
    model.train()
    curve, window_loss, window_tokens, window_start = [], 0.0, 0, time.perf_counter()
    for step in range(1, steps + 1):
        input_ids, _ = next(batches)  # [B, L]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss.item()
        window_tokens += input_ids.numel()
        if step % log_every == 0 or step == steps:
            n = step - (curve[-1][0] if curve else 0)
            metrics = {"loss": window_loss / n, "tokens_per_s": window_tokens / (time.perf_counter() - window_start)}
            logger.info("pretrain step %d/%d loss %.3f tokens/s %.0f", step, steps, metrics["loss"], metrics["tokens_per_s"])
            if progress is not None:
                progress(step, metrics)
            curve.append((step, round(metrics["loss"], 4)))
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    model.eval()
    return curve


@torch.no_grad()
def language_losses(model, blocks: dict[str, torch.Tensor], max_blocks: int = 8) -> dict[str, float]:
    """Mean next-token loss per language over its first `max_blocks` blocks."""
    was_training = model.training
    model.eval()
    losses = {lang: round(model(input_ids=b[:max_blocks], labels=b[:max_blocks]).loss.item(), 4) for lang, b in blocks.items()}
    model.train(was_training)
    return losses


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{lang} {loss:.2f}" for lang, loss in losses.items())
