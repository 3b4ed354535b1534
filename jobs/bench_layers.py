"""Layer benchmark: base vs FLoRA vs IA3 vs LoRA (fused, bmm, grouped) on StarCoder/Llama layers.

    python jobs/bench_layers.py [--quick] [--out DIR] [--device cpu|cuda] [--dtype float32]
        [--models starcoder-1b,llama-2-7b] [--adapters 64] [--ranks 1,2,4]
    ray job submit --working-dir . -- python jobs/bench_layers.py --device cuda --dtype float16

The paper's Fig. 2 on one adapted square layer `d x d` (StarCoder-1B/3B/15B and Llama-2-7B
widths): time of each method relative to the plain base layer, versus rank, for decode (64 rows
x 1 token, one adapter per row) and prefill (8 rows x 256 tokens) batches whose rows draw from
1, 8 or 64 distinct adapters. Methods, all on the same inputs:
    base          F.linear(x, w0, bias)
    flora         ops.flora_linear at that rank (PyTorch ops)
    flora_fused   the Triton kernel: FLoRA fused into the base matmul (`flora.kernels.flora_linear`)
    ia3           ops.flora_linear with a rank-1 bank whose input side is ones (IA3's cost here)
    lora_fused    base + the Triton LoRA kernel over tokens grouped by adapter (`flora.kernels.lora`)
    lora_bmm      base + ops.lora_delta_bmm (the paper's baseline)
    lora_grouped  base + ops.lora_delta_grouped, one matmul pair per adapter
Token slots and groupings are computed once outside the timing, as a model shares them across
its layers. The fused methods run on CUDA with Triton only (on a CPU the kernels run in
Triton's interpreter: right, but not a speed). Banks hold rank 16 and each call asks for the
rank measured, as `flora.layers` does.

On CUDA every call is captured once into a CUDA graph and the graph is replayed (`timing`
column `cuda_graph`; `--eager` times plain calls): at these shapes a base layer is ~20 us of GPU
work, so eager timing measures Python and kernel launches, not the method. A serving engine
hides launches the same way (CUDA graphs for decode), so graph replay is the figure that
carries over. A call that cannot be captured is timed eagerly and flagged `eager` in the CSV.

Timing: per (model, shape, adapters) every method runs interleaved, round-robin, so drift of a
shared machine hits all alike; medians over repeats under `torch.inference_mode()`. Cheap
methods get more repeats than expensive ones (a time budget per method, at least
`min_repeats`). Base and IA3 do not depend on rank: they are timed once per group and their
row is repeated for every rank. Writes `layers_<device>.csv` and `layers_<device>.png` under
`--out` and prints the headline ratios. Imports only `flora.ops`, torch and (for the plot)
matplotlib, so it runs on a GPU machine without the platform layer; it imports no Ray.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Run from a bare checkout too (a GPU box with only torch, transformers, safetensors): the
# repository root holds the `flora` package.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from flora import ops  # noqa: E402
from flora.kernels import HAS_TRITON  # noqa: E402

MODELS = {"starcoder-1b": 2048, "starcoder-3b": 2816, "starcoder-15b": 6144, "llama-2-7b": 4096}  # name -> d
SHAPES = {"decode": (64, 1), "prefill": (8, 256)}  # name -> (rows, tokens per row)
ADAPTERS = (1, 8, 64)
RANKS = (1, 2, 4, 8, 16)
METHODS = ("base", "flora", "flora_fused", "ia3", "lora_fused", "lora_bmm", "lora_grouped")
FUSED = ("flora_fused", "lora_fused")
RANKLESS = ("base", "ia3")
Y_TICKS = (0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CSV_COLUMNS = (
    "device dtype timing model d shape tokens adapters rank method median_ms p10_ms p90_ms "
    "ratio_vs_base"
).split()


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure. A method gets `ceil(budget_s / call_s)` repeats within bounds."""

    models: tuple[str, ...]
    ranks: tuple[int, ...]
    adapters: tuple[int, ...]
    budget_s: dict[str, float]  # per method and group, by shape
    min_repeats: int
    max_repeats: int
    # Calls longer than this skip the warmup: the first call's extra cost is small next to them
    # and a median over >= 3 repeats drops a slow first repeat anyway.
    heavy_call_s: float = 1.0
    min_sample_s: float = 0.0  # repeat a call within one sample up to this (GPU: tiny calls)


FULL = Plan(tuple(MODELS), RANKS, ADAPTERS, {"decode": 0.6, "prefill": 2.5}, 3, 25)
QUICK = Plan(("starcoder-1b",), (1, 4), (64,), {"decode": 0.1, "prefill": 0.1}, 3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d=2048, ranks 1 and 4, few repeats")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "layers")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--eager", action="store_true",
                        help="CUDA: time plain calls instead of CUDA-graph replays")
    parser.add_argument("--threads", type=int, default=cores,
                        help="torch CPU threads (default: the cores this process may use)")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--adapters", help="comma-separated distinct-adapter counts (default 1,8,64)")
    parser.add_argument("--ranks", help="comma-separated ranks (default 1,2,4,8,16)")
    parser.add_argument("--budget-s", type=float, help="seconds of samples per method and group (both shapes)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch; use --device cpu")
    plan = QUICK if args.quick else FULL
    try:
        if args.models:
            models = tuple(args.models.split(","))
            if set(models) - set(MODELS):
                parser.error(f"--models: unknown {sorted(set(models) - set(MODELS))}; choose from {list(MODELS)}")
            plan = dataclasses.replace(plan, models=models)
        if args.adapters:
            plan = dataclasses.replace(plan, adapters=tuple(int(a) for a in args.adapters.split(",")))
        if args.ranks:
            plan = dataclasses.replace(plan, ranks=tuple(int(r) for r in args.ranks.split(",")))
    except ValueError as err:
        parser.error(f"--adapters / --ranks take comma-separated integers ({err})")
    if any(r < 1 or r > max(RANKS) for r in plan.ranks) or any(a < 1 for a in plan.adapters):
        parser.error(f"--ranks must lie in 1..{max(RANKS)} and --adapters be >= 1")
    if args.budget_s:
        plan = dataclasses.replace(plan, budget_s={"decode": args.budget_s, "prefill": args.budget_s})
    if args.device == "cuda":  # GPU calls take microseconds: time several per sample
        plan = dataclasses.replace(plan, min_sample_s=2e-3)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu"
    print(f"bench_layers: {device_name}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {'quick' if args.quick else 'full'} run, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    started = time.perf_counter()
    rows = []
    for model in plan.models:
        for shape in SHAPES:
            n_rows = SHAPES[shape][0]
            for adapters in sorted({min(a, n_rows) for a in plan.adapters}):
                rows += bench_group(plan, device, dtype, args.dtype, model, shape, adapters,
                                    graphs=device.type == "cuda" and not args.eager)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.device
    csv_path, png_path = args.out / f"layers_{tag}.csv", args.out / f"layers_{tag}.png"
    write_csv(rows, csv_path)
    plot(rows, png_path, title=f"{device_name}, {args.dtype}")
    print_headline(rows)
    print(f"wrote {csv_path} and {png_path}")


# --------------------------------------------------------------------------- measuring


def bench_group(plan, device, dtype, dtype_name, model, shape, adapters, graphs) -> list[dict]:
    """Time every method and rank on one (model, shape, adapters); return CSV rows.

    `graphs`: replace each call by the replay of a CUDA graph captured from it.
    """
    d = MODELS[model]
    n_rows, n_tokens = SHAPES[shape]
    max_rank = max(RANKS)
    g = torch.Generator().manual_seed(0)
    rand = lambda *size: torch.randn(*size, generator=g).to(device, dtype)  # noqa: E731
    w0 = rand(d, d) / math.sqrt(d)  # [Dout, Din]
    bias = rand(d)  # [Dout]
    x = rand(n_rows, n_tokens, d)  # [B, L, Din]
    # Every one of the `adapters` slots (1..adapters; slot 0 is the base model, as in the banks)
    # is used, in shuffled order.
    slots = (torch.arange(n_rows) % adapters + 1)[torch.randperm(n_rows, generator=g)].to(device)  # [B]
    a = 1 + 0.1 * rand(adapters + 1, max_rank, d)  # [S, R, Dout]
    b = 1 + 0.1 * rand(adapters + 1, max_rank, d)  # [S, R, Din]
    a[0], b[0] = 0, 0
    a[0, 0], b[0, 0] = 1, 1  # the base model's identity row
    lora_a = rand(adapters + 1, max_rank, d) / math.sqrt(d)  # [S, R, Din]
    lora_b = 0.01 * rand(adapters + 1, max_rank, d)  # [S, R, Dout]
    # IA3 on attention outputs, PEFT's way: l ∘ (W0 x + c), so the bias gain is `l` too.
    ia3 = [ops.ia3_bank_rows(1 + 0.1 * rand(d), False, 1, d, d) for _ in range(adapters + 1)]
    ia3_a, ia3_b = (torch.stack(t) for t in zip(*ia3))  # [S, 1, Dout], [S, 1, Din]
    ia3_gain = ia3_a[:, 0]  # [S, Dout]
    groups = ops.group_tokens(slots)
    fused = device.type == "cuda" and HAS_TRITON
    methods = [m for m in METHODS if fused or m not in FUSED]

    def lora(delta_fn, r):
        la, lb = lora_a[:, :r], lora_b[:, :r]
        # In place on the fresh base output, as a serving layer can under inference mode.
        return lambda: F.linear(x, w0, bias).add_(delta_fn(la, lb))

    calls = {("base", None): lambda: F.linear(x, w0, bias)}
    calls[("ia3", None)] = lambda: ops.flora_linear(x, w0, bias, ia3_a, ia3_b, slots, 1, ia3_gain)
    for r in plan.ranks:
        calls[("flora", r)] = lambda r=r: ops.flora_linear(x, w0, bias, a, b, slots, rank=r)
        calls[("lora_bmm", r)] = lora(lambda la, lb: ops.lora_delta_bmm(x, la, lb, slots), r)
        calls[("lora_grouped", r)] = lora(
            lambda la, lb: ops.lora_delta_grouped(x, la, lb, slots, groups), r
        )
    if fused:
        from flora.kernels.flora_linear import flora_linear_fused
        from flora.kernels.lora import LoraTiles, lora_add_fused

        token_slots = slots.repeat_interleave(n_tokens)  # [B·L], once per forward in a model
        tiles = LoraTiles.build(token_slots.cpu().numpy(), range(1, adapters + 1), device)
        for r in plan.ranks:
            calls[("flora_fused", r)] = lambda r=r: flora_linear_fused(x, w0, bias, a, b, token_slots, r)
            calls[("lora_fused", r)] = lambda r=r: lora_add_fused(F.linear(x, w0, bias), x, lora_a, lora_b, r, tiles)

    label = f"{model} d={d} {shape} adapters={adapters}"
    print(f"{label}: timing {len(calls)} calls ...", flush=True)
    started = time.perf_counter()
    with torch.inference_mode():
        timing = {key: device.type for key in calls}
        if graphs:
            for key, fn in calls.items():
                calls[key], timing[key] = as_graph_replay(fn)
        samples = measure(calls, plan, device, shape)
    elapsed = time.perf_counter() - started

    base_ms = statistics.median(samples[("base", None)]) * 1e3
    # The load average flags figures taken while other processes competed for the cores.
    print(f"{label}: base {base_ms:.2f} ms ({elapsed:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for r in plan.ranks:
        ratios = []
        for method in methods:
            key = (method, None if method in RANKLESS else r)
            ts = [t * 1e3 for t in samples[key]]
            p10, p90 = percentiles(ts)
            rows.append(dict(
                device=device.type, dtype=dtype_name, timing=timing[key], model=model, d=d,
                shape=shape,
                tokens=n_rows * n_tokens, adapters=adapters, rank=r, method=method,
                median_ms=round(statistics.median(ts), 4), p10_ms=round(p10, 4),
                p90_ms=round(p90, 4), ratio_vs_base=round(statistics.median(ts) / base_ms, 4),
            ))
            ratios.append(f"{method} {rows[-1]['ratio_vs_base']:.3f}")
        print(f"  {label} rank={r}: " + "  ".join(ratios[1:]), flush=True)
    return rows


def as_graph_replay(fn):
    """`(replay, "cuda_graph")` for a CUDA graph captured from `fn`, or `(fn, "eager")`.

    Warm-up runs on a side stream first, as capture requires (cuBLAS workspaces, allocator).
    The graph keeps its output buffer alive, so replays allocate nothing.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:  # e.g. an op that syncs with the host
        print(f"  not capturable, timed eagerly: {str(err).splitlines()[0]}", flush=True)
        torch.cuda.synchronize()
        return fn, "eager"
    return graph.replay, "cuda_graph"


def measure(calls, plan, device, shape) -> dict:
    """Seconds per call of every entry of `calls`, sampled round-robin; `{key: [s, ...]}`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Predict each call's cost from one base call so that heavy calls can skip the warmup.
    sync()
    base_s = time_calls(calls[("base", None)], 1, device)
    per_call_s, number = {}, {}
    for key, fn in calls.items():
        units = key[1] if key[0].startswith("flora") else 1  # FLoRA at rank r: up to r base matmuls
        if base_s * units > plan.heavy_call_s:
            per_call_s[key] = base_s * units
        else:
            per_call_s[key] = time_calls(fn, 1, device)  # warmup, and the cost estimate
        number[key] = max(1, math.ceil(plan.min_sample_s / max(per_call_s[key], 1e-9)))
    repeats = {
        key: min(plan.max_repeats, max(plan.min_repeats,
                 math.ceil(plan.budget_s[shape] / (per_call_s[key] * number[key]))))
        for key in calls
    }
    samples = {key: [] for key in calls}
    keys = list(calls)
    for i in range(max(repeats.values())):
        # Round-robin, every method once per round, starting one further each round so that no
        # method always runs right after the same other one (caches, clocks).
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            if i < repeats[key]:
                samples[key].append(time_calls(calls[key], number[key], device))
    return samples


def time_calls(fn, number: int, device: torch.device) -> float:
    """Mean seconds of `number` back-to-back calls of `fn`, device work included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    started = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - started) / number


def percentiles(ts: list[float]) -> tuple[float, float]:
    """(p10, p90) by linear interpolation; with fewer than two samples both are the sample."""
    if len(ts) < 2:
        return ts[0], ts[0]
    deciles = statistics.quantiles(ts, n=10, method="inclusive")
    return deciles[0], deciles[-1]


# --------------------------------------------------------------------------- reporting


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Fig. 2 of the paper: time relative to base vs rank, one panel per shape x model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (the CSV has every figure)")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    styles = {
        "base": dict(color="black", linestyle="--", label="base"),
        "flora": dict(color="tab:red", marker="o", linestyle=":", label="FLoRA (PyTorch)"),
        "flora_fused": dict(color="tab:red", marker="o", label="FLoRA (fused)"),
        "ia3": dict(color="tab:green", marker="^", label="IA3"),
        "lora_fused": dict(color="tab:blue", marker="s", label="LoRA (fused)"),
        "lora_bmm": dict(color="tab:cyan", marker="s", linestyle=":", label="LoRA (bmm)"),
        "lora_grouped": dict(color="tab:purple", marker="D", label="LoRA (grouped)"),
    }
    fig, axes = plt.subplots(
        len(shapes), len(models), figsize=(4.2 * len(models), 3.4 * len(shapes)),
        squeeze=False, sharex=True,
    )
    for i, shape in enumerate(shapes):
        for j, model in enumerate(models):
            ax = axes[i][j]
            here = [r for r in rows if r["shape"] == shape and r["model"] == model]
            adapters = max(r["adapters"] for r in here)
            for method, style in styles.items():
                pts = sorted((r["rank"], r["ratio_vs_base"]) for r in here
                             if r["method"] == method and r["adapters"] == adapters)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
            ax.set_xscale("log", base=2)
            # Log y: FLoRA grows ~linearly with rank while the others stay near 1.
            ax.set_yscale("log", base=2)
            ax.set_yticks(ratio_ticks(*ax.get_ylim()))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ranks = sorted({r["rank"] for r in here})
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.set_title(f"{model} (d={here[0]['d']}), {shape}\n"
                         f"{here[0]['tokens']} tokens, {adapters} adapters", fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(shapes) - 1:
                ax.set_xlabel("rank")
            if j == 0:
                ax.set_ylabel("time / base layer")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Adapted d x d layer vs base layer ({title})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio_ticks(lo: float, hi: float) -> list[float]:
    """Round ratios within [lo, hi], 1 included, spaced at least a tenth of the log range."""
    gap = math.log2(hi / lo) / 10
    up, down = [1.0], [1.0]
    for t in Y_TICKS:
        if 1 < t <= hi and math.log2(t / up[-1]) >= gap:
            up.append(t)
    for t in reversed(Y_TICKS):
        if lo <= t < 1 and math.log2(down[-1] / t) >= gap:
            down.append(t)
    return down[:0:-1] + up


def print_headline(rows: list[dict]) -> None:
    """Rank 1 at the most adapters per shape: FLoRA against base and LoRA, fused where measured."""
    print("\nheadline, rank 1, most distinct adapters (time ratios; < 1 means the first is faster)")
    columns = (("flora/base", "flora", "base"), ("flora/bmm", "flora", "lora_bmm"),
               ("fused/base", "flora_fused", "base"), ("fused/lora_fused", "flora_fused", "lora_fused"),
               ("ia3/base", "ia3", "base"), ("bmm/base", "lora_bmm", "base"), ("grouped/base", "lora_grouped", "base"))
    print(f"{'model':<15}{'shape':<9}{'adapters':>9}" + "".join(f"{c:>17}" for c, _, _ in columns))
    for model in dict.fromkeys(r["model"] for r in rows):
        for shape in dict.fromkeys(r["shape"] for r in rows):
            here = [r for r in rows
                    if r["model"] == model and r["shape"] == shape and r["rank"] == 1]
            if not here:
                continue
            adapters = max(r["adapters"] for r in here)
            ms = {r["method"]: r["median_ms"] for r in here if r["adapters"] == adapters}
            cells = [f"{ms[a] / ms[b]:>17.3f}" if a in ms and b in ms else f"{'-':>17}" for _, a, b in columns]
            print(f"{model:<15}{shape:<9}{adapters:>9}" + "".join(cells))


if __name__ == "__main__":
    main()
