"""The fine-tuning job's GPU figures in one run: StarCoderBase-1B's real shape, 8 languages' adapters.

    python jobs/bench_finetune_gpu.py --out DIR            # one GPU; under 8 minutes on an H100/H200
    python jobs/bench_finetune_gpu.py --out DIR --quick --device cpu    # a smoke run of the same code

Needs torch and transformers; no Ray, DeepSpeed or MLflow (a GPU machine here has none of them).
It runs the job's own pieces on one device: `FinetuneConfig` (model.name=bigcode/starcoderbase-1b,
FLoRA rank 4 on the preset targets, one adapter per language, train.precision=bf16), the base in
the config's `base_dtype` and in eval mode as `load_base` returns it, `enable_activation_checkpointing`,
`inject_adapters`, `mixed_batches` over 8 languages, `causal_row_losses` and `train_step`. The one
stand-in is `PlainEngine` below, for DeepSpeed's engine (see its docstring).

Model: gpt_bigcode at StarCoderBase-1B's published config (24 layers, width 2048, 16 heads,
multi-query attention, 8,192 positions, vocabulary 49,152, MLP 8,192), random weights built
straight on the device in bfloat16 (no download). Data: random tokens, 64 blocks per language.

Each setting (batch x sequence length, checkpointing on or off) builds a fresh model, runs
`--warmup` steps, then `--steps` timed steps (synchronised), and records:
    tokens/s       predicted (loss-bearing) tokens per second, B·(L-1) per step, as the job logs it
    step median    seconds per step (batch drawn, moved to the device, forward, backward, AdamW)
    peak memory    torch.cuda.max_memory_allocated and max_memory_reserved over warm-up and timed
                   steps, and the device's peak: reserved + what the process holds outside torch's
                   allocator (CUDA context, kernels, library handles; read after the steps): what
                   the worker takes of the GPU, what the estimate's 2 GB overhead term covers
    estimate       `flora_platform.memory.estimate_memory` on the same config, as the job logs it
                   before any worker starts; target: within 20% of the device's peak
Writes under `--out` (default $OUT): `finetune_gpu.csv` (figure, value, unit, target, verdict, as
the other GPU scripts), `finetune_gpu_runs.csv` (a row per setting), `finetune_gpu_memory.csv`
(the estimate's terms per setting) and `finetune_gpu.png` when matplotlib is installed
(`finetune_cpu*` on CPU, where peak memory is not measured).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "platform")]  # run from a checkout, nothing installed
from transformers import AutoModelForCausalLM, GPTBigCodeConfig  # noqa: E402

from flora_platform.base_model import enable_activation_checkpointing  # noqa: E402
from flora_platform.config import FinetuneConfig, from_dict  # noqa: E402
from flora_platform.data import mixed_batches  # noqa: E402
from flora_platform.memory import GB, estimate_memory, job_setting, model_shape  # noqa: E402
from flora_platform.train import adapter_names, causal_row_losses, inject_adapters, to_device, train_step  # noqa: E402

GIB = 2**30
LANGUAGES = ["c", "cpp", "go", "java", "javascript", "python", "rust", "typescript"]
# StarCoderBase-1B's config.json (bigcode/starcoderbase-1b), the fields that set the shape.
STARCODERBASE_1B = dict(vocab_size=49152, n_positions=8192, n_embd=2048, n_layer=24, n_head=16, n_inner=8192,
                        multi_query=True, activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0)
TINY = dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=256, multi_query=True,
            activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0)
RUN_FIELDS = ["setting", "batch_size", "seq_len", "gradient_checkpointing", "adapters", "rank", "precision",
              "steps_timed", "step_median_s", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib",
              "cuda_context_gib", "peak_device_gib", "estimate_gib", "estimate_over_peak_device",
              "estimate_over_peak_allocated", "within_20pct", "final_loss", "error"]


class TextTask:
    """The job's text task, as much of it as `train_step` reads: its row losses."""

    row_losses = staticmethod(causal_row_losses)


class PlainEngine:
    """DeepSpeed's engine in plain PyTorch, as much of it as `train_step` uses (`module`, `__call__`,
    `backward`, `step`): the GPU machines here have no DeepSpeed, and on one GPU its ZeRO
    partitioning has nothing to split. What it keeps of DeepSpeed's config (`deepspeed_config`):
    under bf16/fp16 the optimizer steps float32 master copies of the trained parameters and copies
    them back into the 16-bit ones (DeepSpeed's bf16 optimizer does so), gradients are clipped to
    `train.grad_clip` in total norm (`gradient_clipping`), and are dropped after each step."""

    def __init__(self, model, params: list[torch.nn.Parameter], lr: float, grad_clip: float):
        self.module = model
        self.params = params
        # float32 parameters are their own masters.
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in params]
        for m in self.masters:
            m.requires_grad_(True)
        # No weight decay, as the job: it would pull the masked rows (other slots') to zero.
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.0)
        self.grad_clip = grad_clip

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip)
        self.optimizer.step()
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)
            p.grad = None
            m.grad = None


def job_config(batch_size: int, seq_len: int, checkpointing: bool, precision: str, rank: int) -> FinetuneConfig:
    """The fine-tuning job's config for this setting, built as the job builds it (`from_dict`)."""
    return from_dict(FinetuneConfig, {
        "model": {"name": "bigcode/starcoderbase-1b", "dtype": "auto"},
        "adapter": {"kind": "flora", "rank": rank, "per_language": True},
        "train": {"batch_size": batch_size, "seq_len": seq_len, "precision": precision,
                  "gradient_checkpointing": checkpointing},
        "scaling": {"num_workers": 1, "use_gpu": True},
    })


def build_base(model_config: GPTBigCodeConfig, dtype: torch.dtype, device: torch.device, seed: int):
    """Random weights straight on `device` in `dtype` (no float32 copy, no download); eval mode,
    as `load_base` (`from_pretrained`) returns a model and the job trains it (no dropout)."""
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), dtype=dtype)  # it sets config.dtype
    return model.eval()


def random_blocks(vocab: int, seq_len: int, blocks_per_language: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {lang: torch.randint(1, vocab, (blocks_per_language, seq_len), generator=gen) for lang in LANGUAGES}


def run_setting(args, model_config, device, batch_size: int, seq_len: int, checkpointing: bool) -> tuple[dict, dict]:
    """(row of finetune_*_runs.csv, the estimate's terms in bytes) for one setting."""
    cfg = job_config(batch_size, seq_len, checkpointing, args.precision, args.rank)
    names = adapter_names(cfg, LANGUAGES)
    estimate = estimate_memory(model_shape(model_config, cfg.adapter, len(names)), job_setting(cfg))
    row = {"setting": f"{batch_size}x{seq_len} checkpointing {'on' if checkpointing else 'off'}",
           "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": checkpointing,
           "adapters": len(names), "rank": args.rank, "precision": args.precision,
           "estimate_gib": round(estimate.total / GIB, 3)}
    print(f"== {row['setting']}: estimate {estimate.total / GIB:.2f} GiB", flush=True)
    release_memory(device)  # the previous setting's model, so that its cached blocks count nowhere
    try:
        t0 = time.perf_counter()
        # As the job's worker: the base in the config's dtype on the device, checkpointing, adapters.
        model = build_base(model_config, getattr(torch, cfg.base_dtype), device, seed=cfg.train.seed)
        model.to(device)  # a no-op here; the job loads on the CPU and moves
        if cfg.train.gradient_checkpointing:
            enable_activation_checkpointing(model)
        banks = inject_adapters(model, cfg, names)
        engine = PlainEngine(model, banks.trainable_parameters(names), cfg.lr, cfg.train.grad_clip)
        blocks = random_blocks(model_config.vocab_size, seq_len, args.blocks_per_language, seed=cfg.train.seed)
        batches = mixed_batches(blocks, batch_size, cfg.train.seed)
        print(f"   built in {time.perf_counter() - t0:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, tokens, loss = train_timed(engine, batches, device, args.warmup, args.steps)
        row.update(steps_timed=len(times), step_median_s=round(statistics.median(times), 5),
                   tokens_per_s=round(tokens / sum(times), 1), final_loss=round(loss, 4), error="")
        print(f"   {row['tokens_per_s']:,.0f} tokens/s, {row['step_median_s'] * 1e3:.1f} ms/step, loss {loss:.3f}",
              flush=True)
        row.update(measured_memory(device, estimate.total))
    except torch.cuda.OutOfMemoryError as err:  # a setting that does not fit is a result too
        print(f"   out of memory: {str(err)[:200]}", flush=True)
        row["error"] = "out of memory"
    return row, dataclasses.asdict(estimate)


def train_timed(engine, batches, device: torch.device, warmup: int, steps: int) -> tuple[list[float], int, float]:
    """(seconds of each timed step, predicted tokens in them, the last step's mean token loss);
    a step is timed as the job times it: from drawing the batch to the optimizer's step."""
    times, tokens, loss = [], 0, float("nan")
    for step in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        ids, langs = next(batches)  # [B, L], a language per row: each row through its own adapter
        row_losses, row_tokens = train_step(engine, TextTask, to_device({"input_ids": ids}, device), langs)
        sync(device)
        if step >= warmup:  # warm-up steps are not timed
            times.append(time.perf_counter() - t)
            tokens += int(row_tokens.sum().item())
        loss = (row_losses.sum() / row_tokens.sum()).item()
    return times, tokens, loss


def measured_memory(device: torch.device, estimate_bytes: float) -> dict:
    """The peaks since the last reset against the estimate; "n/a" on CPU (no allocator statistics)."""
    keys = ("peak_allocated_gib", "peak_reserved_gib", "cuda_context_gib", "peak_device_gib",
            "estimate_over_peak_device", "estimate_over_peak_allocated", "within_20pct")
    if device.type != "cuda":
        return dict.fromkeys(keys, "n/a")
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    # What the process holds outside torch's allocator (CUDA context, loaded kernels, library
    # handles), read after the steps so that everything they loaded counts.
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    peak = reserved + context
    ratio = estimate_bytes / peak
    print(f"   peak allocated {allocated / GIB:.2f} GiB, reserved {reserved / GIB:.2f} GiB, "
          f"device {peak / GIB:.2f} GiB; estimate / device peak {ratio:.2f}", flush=True)
    values = (allocated / GIB, reserved / GIB, context / GIB, peak / GIB, ratio, estimate_bytes / allocated)
    return {**{k: round(v, 3) for k, v in zip(keys, values)}, "within_20pct": abs(ratio - 1) <= 0.2}


def release_memory(device: torch.device) -> None:
    gc.collect()  # a model caught in a reference cycle goes only at a collection
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_settings(text: str) -> list[tuple[int, int, bool]]:
    """"8x1024,4x2048,8x1024:off" -> [(8, 1024, True), (4, 2048, True), (8, 1024, False)]."""
    out = []
    for item in text.split(","):
        shape, _, mode = item.strip().partition(":")
        if mode not in ("", "on", "off") or "x" not in shape:
            raise SystemExit(f"--settings: {item!r} is not BxL or BxL:off (e.g. 8x1024,8x1024:off)")
        b, seq = (int(v) for v in shape.split("x"))
        out.append((b, seq, mode != "off"))
    return out


def figure(name: str, value, unit: str, target: str = "", ok: bool | None = None) -> dict:
    value = round(value, 4) if isinstance(value, float) else value
    return {"figure": name, "value": value, "unit": unit, "target": target,
            "verdict": "" if ok is None else ("met" if ok else "MISSED")}


def figures(runs: list[dict], wall_s: float, budget_s: float) -> list[dict]:
    out = []
    for r in runs:
        if r.get("error"):
            out.append(figure(f"{r['setting']}: error", r["error"], ""))
            continue
        out.append(figure(f"{r['setting']}: tokens/s", r["tokens_per_s"], "tokens/s"))
        out.append(figure(f"{r['setting']}: step median", r["step_median_s"], "s"))
        if r["peak_device_gib"] != "n/a":
            out.append(figure(f"{r['setting']}: peak allocated", r["peak_allocated_gib"], "GiB"))
            out.append(figure(f"{r['setting']}: peak on the device (reserved + context)", r["peak_device_gib"], "GiB"))
            out.append(figure(f"{r['setting']}: estimate", r["estimate_gib"], "GiB"))
            out.append(figure(f"{r['setting']}: estimate / device peak", r["estimate_over_peak_device"], "x",
                              "0.8 to 1.2", r["within_20pct"]))
    out.append(figure("wall time of this script", wall_s, "s", f"<= {budget_s:g}", wall_s <= budget_s))
    return out


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, runs: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    runs = [r for r in runs if not r.get("error")]
    labels = [r["setting"].replace(" checkpointing ", "\nckpt ") for r in runs]
    x = range(len(runs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(x, [r["tokens_per_s"] for r in runs])
    left.set(title="train tokens/s (8 adapters, mixed batches)", xticks=list(x), xticklabels=labels)
    if runs and runs[0]["peak_device_gib"] != "n/a":
        w = 0.27
        for i, (key, name) in enumerate((("peak_allocated_gib", "peak allocated"),
                                         ("peak_device_gib", "peak on device"), ("estimate_gib", "estimate"))):
            right.bar([v + (i - 1) * w for v in x], [r[key] for r in runs], w, label=name)
        right.legend()
    right.set(title="memory (GiB)", xticks=list(x), xticklabels=labels)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                        help="output directory (default: $OUT)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--settings", default="8x1024,4x2048,16x2048,8x1024:off",
                        help="BxL[:off] per run, comma-separated; :off turns gradient checkpointing off")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--blocks-per-language", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no new setting after this many seconds (the script must end within 8 minutes)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps: checks the script runs")
    args = parser.parse_args()
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here; pass --device cpu (with --quick)")
    model_config = GPTBigCodeConfig(**(TINY if args.quick else STARCODERBASE_1B))
    if args.quick:
        args.settings = "8x64,8x64:off" if args.settings == parser.get_default("settings") else args.settings
        args.warmup, args.steps, args.blocks_per_language = 1, 3, 4
    settings = parse_settings(args.settings)
    started = time.perf_counter()
    name = "gpu" if device.type == "cuda" else device.type
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'tiny gpt_bigcode' if args.quick else 'StarCoderBase-1B shape'} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {len(LANGUAGES)} adapters, settings {args.settings}", flush=True)

    runs, memory_rows = [], []
    for batch_size, seq_len, checkpointing in settings:
        if time.perf_counter() - started > args.budget_s:
            print(f"past --budget-s={args.budget_s:g}: skipping {batch_size}x{seq_len}", flush=True)
            continue
        row, terms = run_setting(args, model_config, device, batch_size, seq_len, checkpointing)
        runs.append(row)
        release_memory(device)
        memory_rows.append({"setting": row["setting"], **{k: round(v / GIB, 3) for k, v in terms.items()},
                            "total": round(sum(terms.values()) / GIB, 3)})
        # Written after every setting: what finished stays if a later one runs out of time.
        write_csv(args.out / f"finetune_{name}_runs.csv", RUN_FIELDS, runs)
        write_csv(args.out / f"finetune_{name}_memory.csv", list(memory_rows[0]), memory_rows)

    rows = figures(runs, time.perf_counter() - started, budget_s=480)
    path = args.out / f"finetune_{name}.csv"
    write_csv(path, ["figure", "value", "unit", "target", "verdict"], rows)
    plot(args.out / f"finetune_{name}.png", runs)
    for r in rows:
        print(f"{r['figure']:>72}: {r['value']:>10} {r['unit']:<8} {r['target']:>10} {r['verdict']}")
    print(f"memory estimate terms in GiB (GB = {GB:.0e} bytes in flora_platform.memory): finetune_{name}_memory.csv")
    print(f"wrote {path}")
    if not all(math.isfinite(r["final_loss"]) for r in runs if not r.get("error")):
        raise SystemExit("a loss is not finite")


if __name__ == "__main__":
    main()
