"""Per-worker GPU memory of a fine-tuning run, estimated before any worker starts.

The shape comes from the model's config alone: the model is built on the meta device (no
weights, no download beyond config.json) to count its parameters, and adapter banks are injected
into it to count theirs. Semantics, in bytes per worker, for N workers under ZeRO stage z:

    weights      P·w                       z <= 2: the frozen base, whole on every worker (ZeRO
                                           1/2 partition only the optimizer's tensors: the adapters')
                 P·w/N + G·w               z = 3: this worker's partition of the base, plus the
                                           parameters all-gathered at once while a forward or
                                           backward runs: G = min(P, live + prefetch), DeepSpeed's
                                           stage3_max_live_parameters and prefetch bucket, which
                                           the job pins (`ZERO3_*` below)
    adapters     Pa·t                      the adapter banks, in the training dtype
    gradients    Pa·t / (N if z >= 2 else 1)
    optimizer    Pa·(8 + m) / (N if z >= 1 else 1)
                                           AdamW's two float32 moments, plus a float32 master
                                           copy (m = 4) when training in bf16/fp16, else m = 0
    activations  without checkpointing: L · s·b·h·(34 + 5·a·s/h) · t/2
                 with checkpointing:    L · s·b·h·t  (each block's input)
                                        + s·b·h·(34 + 5·a·s/h) · t/2  (one block recomputed)
                 + logits: s·b·V·(t + 8)   (the logits, their float32 copy for the loss, its softmax)
    overhead     2 GB: CUDA context, cuBLAS and NCCL workspaces, allocator slack

P base parameters (w bytes each: 2 for bf16/fp16, 4 for float32, 1 for 8-bit), Pa adapter
parameters (every slot's rows: the optimizer holds whole banks), t bytes per training-dtype
value, L layers, h hidden size, a heads, V vocabulary, s sequence length, b micro-batch.

The activation term is the per-layer estimate of Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (2022), eq. 1: s·b·h·(34 + 5·a·s/h) bytes in 16-bit
(34 covers the inputs the attention and MLP keep for the backward, 5·a·s/h the a·s² attention
scores, softmax and dropout mask). With scaled-dot-product attention (transformers' default
`sdpa`: flash or memory-efficient kernels on a GPU) no score matrix is kept, so the 5·a·s/h term
is dropped unless the model runs eager attention. It is an upper bound for this job: a frozen
base keeps fewer inputs (no weight gradients), multi-query attention keeps smaller keys and
values, and the loop runs without dropout. GB here is 10^9 bytes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

import flora
from flora_platform.config import ConfigError, FinetuneConfig
from flora_platform.preflight import adapter_targets

log = logging.getLogger(__name__)

GB = 1e9
# ZeRO-3's bounds on gathered (whole) parameters, in parameters: the job's DeepSpeed config sets
# these (DeepSpeed's defaults), so the estimate of a sharded base counts what the run keeps.
ZERO3_LIVE_PARAMETERS = 10**9
ZERO3_PREFETCH_PARAMETERS = 5 * 10**7
OVERHEAD_BYTES = 2 * GB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: counts and sizes, no weights."""

    parameters: int  # P: the base model's
    adapter_parameters: int  # Pa: the adapter banks' trained tensors, every slot
    layers: int  # L
    hidden: int  # h
    heads: int  # a
    vocab: int  # V
    keeps_attention_scores: bool  # eager attention keeps the [b, a, s, s] scores


@dataclass(frozen=True)
class Setting:
    """What the estimate varies: the knobs a config turns."""

    seq_len: int  # s
    micro_batch: int  # b
    weight_bytes: float  # w
    train_bytes: int  # t
    checkpointing: bool
    zero_stage: int
    num_workers: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per worker, by what holds them."""

    weights: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return sum(dataclasses.astuple(self))

    def table(self) -> str:
        rows = [*dataclasses.asdict(self).items(), ("total", self.total)]
        return "\n".join(["| per worker | GB |", "| --- | ---: |", *(f"| {k} | {v / GB:.2f} |" for k, v in rows)])


def block_activation_bytes(shape: ModelShape, s: Setting) -> float:
    """One transformer block's activations kept for the backward (the paper's eq. 1, scaled from
    16-bit to the training dtype; without the score term under sdpa)."""
    per_token = 34 + (5 * shape.heads * s.seq_len / shape.hidden if shape.keeps_attention_scores else 0)
    return s.seq_len * s.micro_batch * shape.hidden * per_token * s.train_bytes / 2


def estimate_memory(shape: ModelShape, s: Setting) -> MemoryEstimate:
    """Per-worker bytes of a run (see the module's docstring for each term)."""
    n = s.num_workers
    weights = shape.parameters * s.weight_bytes  # replicated under ZeRO 0..2 (module docstring)
    if s.zero_stage == 3:
        gathered = min(shape.parameters, ZERO3_LIVE_PARAMETERS + ZERO3_PREFETCH_PARAMETERS)
        weights = (shape.parameters / n + gathered) * s.weight_bytes
    pa = shape.adapter_parameters
    master = 4 if s.train_bytes < 4 else 0
    if s.checkpointing:
        kept = shape.layers * s.seq_len * s.micro_batch * shape.hidden * s.train_bytes + block_activation_bytes(shape, s)
    else:
        kept = shape.layers * block_activation_bytes(shape, s)
    logits = s.seq_len * s.micro_batch * shape.vocab * (s.train_bytes + 8)
    return MemoryEstimate(
        weights=weights,
        adapters=pa * s.train_bytes,
        gradients=pa * s.train_bytes / (n if s.zero_stage >= 2 else 1),
        optimizer=pa * (8 + master) / (n if s.zero_stage >= 1 else 1),
        activations=kept + logits,
        overhead=OVERHEAD_BYTES,
    )


# --------------------------------------------------------------------------- from a config


def model_shape(model_config, adapter, n_adapters: int) -> ModelShape:
    """Count a causal LM's parameters and its adapter banks' on the meta device (no weights).

    model_config: a transformers config (e.g. `AutoConfig.from_pretrained(path)`); adapter: an
    `AdapterSpec`; n_adapters: adapters trained together (the banks hold one more slot, the base)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    parameters = sum(p.numel() for p in model.parameters())
    targets, _ = adapter_targets(model, adapter)
    lora_rank = adapter.rank if adapter.kind == "lora" else 0
    flora.inject(model, targets, max_slots=n_adapters + 1, max_rank=adapter.rank, max_lora_rank=lora_rank)
    trained = ("lora_a", "lora_b") if adapter.kind == "lora" else ("a", "b")
    adapter_parameters = sum(
        getattr(m, name).numel() for m in model.modules() if isinstance(m, flora.AdaptedLinear) for name in trained
    )
    text = model.config.get_text_config()
    return ModelShape(
        parameters=parameters, adapter_parameters=adapter_parameters, layers=text.num_hidden_layers,
        hidden=text.hidden_size, heads=text.num_attention_heads, vocab=text.vocab_size,
        keeps_attention_scores=model.config._attn_implementation == "eager",
    )


def job_setting(cfg: FinetuneConfig) -> Setting:
    t = cfg.train
    train_bytes = DTYPE_BYTES[{"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[t.precision]]
    # A float32 base under a 16-bit precision is cast on the device: it trains at train_bytes.
    weight_bytes = 1 if cfg.model.quantization == "8bit" else min(DTYPE_BYTES[cfg.base_dtype], train_bytes)
    return Setting(
        seq_len=t.seq_len, micro_batch=t.batch_size, weight_bytes=weight_bytes, train_bytes=train_bytes,
        checkpointing=t.gradient_checkpointing, zero_stage=t.zero_stage, num_workers=cfg.scaling.num_workers,
    )


def fixes(shape: ModelShape, s: Setting, budget: float) -> list[str]:
    """Single changes of the config under which the estimate fits `budget` bytes, cheapest first."""
    def fits(**change) -> float | None:
        total = estimate_memory(shape, dataclasses.replace(s, **change)).total
        return total if total <= budget else None

    out = []
    if not s.checkpointing and (total := fits(checkpointing=True)):
        out.append(f"train.gradient_checkpointing=true ({total / GB:.1f} GB)")
    for b in (s.micro_batch // 2**k for k in range(1, s.micro_batch.bit_length())):
        if total := fits(micro_batch=b):
            out.append(f"train.batch_size={b} ({total / GB:.1f} GB)")
            break
    for seq in (s.seq_len // 2**k for k in range(1, 6)):
        if seq >= 16 and (total := fits(seq_len=seq)):
            out.append(f"train.seq_len={seq} ({total / GB:.1f} GB)")
            break
    if s.train_bytes == 4 and (total := fits(train_bytes=2, weight_bytes=min(s.weight_bytes, 2))):
        out.append(f"train.precision=bf16 with model.dtype=auto ({total / GB:.1f} GB)")
    return out


def check_memory(cfg: FinetuneConfig, base_path: str, n_adapters: int) -> MemoryEstimate:
    """Log the per-worker estimate; refuse a run that cannot fit scaling.gpu_memory_gb (0: no check)."""
    from transformers import AutoConfig

    shape = model_shape(AutoConfig.from_pretrained(base_path), cfg.adapter, n_adapters)
    setting = job_setting(cfg)
    estimate = estimate_memory(shape, setting)
    log.info(
        "memory per worker, estimated (%.0f M base and %.2f M adapter parameters; %s):\n%s",
        shape.parameters / 1e6, shape.adapter_parameters / 1e6,
        ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(setting).items()), estimate.table(),
    )
    budget = cfg.scaling.gpu_memory_gb * GB
    if budget and estimate.total > budget:
        options = fixes(shape, setting, budget)
        knob = options[0].split("=")[0] if options else "scaling.gpu_memory_gb"
        raise ConfigError(
            knob, f"a worker needs about {estimate.total / GB:.1f} GB ({summary(estimate)}), more than "
            f"scaling.gpu_memory_gb={cfg.scaling.gpu_memory_gb:g}; "
            + (f"each of these fits: {'; '.join(options)}" if options else "no single change of batch size, "
               "sequence length, checkpointing or precision fits: use a smaller model or larger GPUs"),
        )
    return estimate


def summary(e: MemoryEstimate) -> str:
    return ", ".join(f"{k} {v / GB:.1f}" for k, v in dataclasses.asdict(e).items())


# --------------------------------------------------------------------------- the README's table

# StarCoder shapes (GPTBigCode, multi-query attention, 8192 positions, 49,152 tokens).
STARCODER_SHAPES = {
    "starcoderbase-1b": dict(n_layer=24, n_embd=2048, n_head=16),
    "starcoderbase-3b": dict(n_layer=36, n_embd=2816, n_head=22),
    "starcoder (15B)": dict(n_layer=40, n_embd=6144, n_head=48),
}


def starcoder_table(gpu_memory_gb: float = 80, seq_len: int = 2048, n_adapters: int = 4) -> str:
    """Markdown: the estimate for StarCoder 1B/3B/15B in bf16 with the default adapter (FLoRA
    rank 4 on the preset targets, `n_adapters` of them), micro-batch 1 and 8, checkpointing off
    and on, per worker: one worker (ZeRO-2, the base whole) and 8 workers under ZeRO-3 (the base
    sharded, see the module docstring), against `gpu_memory_gb`."""
    from transformers import GPTBigCodeConfig

    adapter = FinetuneConfig().adapter
    lines = [
        "| model | parameters | micro-batch | checkpointing | workers (ZeRO) | weights | activations | total GB | "
        f"fits {gpu_memory_gb:g} GB |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for name, dims in STARCODER_SHAPES.items():
        config = GPTBigCodeConfig(vocab_size=49152, n_positions=8192, multi_query=True, bos_token_id=0, eos_token_id=0, **dims)
        shape = model_shape(config, adapter, n_adapters)
        for workers, stage in ((1, 2), (8, 3)):
            for batch in (1, 8):
                for checkpointing in (False, True):
                    s = Setting(seq_len=seq_len, micro_batch=batch, weight_bytes=2, train_bytes=2,
                                checkpointing=checkpointing, zero_stage=stage, num_workers=workers)
                    e = estimate_memory(shape, s)
                    lines.append(
                        f"| {name} | {shape.parameters / 1e9:.2f} B | {batch} | {'on' if checkpointing else 'off'} | "
                        f"{workers} ({stage}) | {e.weights / GB:.1f} | {e.activations / GB:.1f} | {e.total / GB:.1f} | "
                        f"{'yes' if e.total <= gpu_memory_gb * GB else 'no'} |"
                    )
    return "\n".join(lines)
