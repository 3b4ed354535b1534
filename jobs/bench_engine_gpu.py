"""The engine's GPU figures in one run: StarCoderBase-1B's real shape on the paper's workload.

    python jobs/bench_engine_gpu.py --out DIR            # one GPU; under 8 minutes on an H100/H200
    python jobs/bench_engine_gpu.py --out DIR --quick --device cpu    # a smoke run of the same code

Needs torch, transformers and (for the attention kernel) triton; no Ray, DeepSpeed or MLflow.

Model: gpt_bigcode at StarCoderBase-1B's published shape (24 layers, width 2048, 16 heads,
multi-query attention, vocabulary 49,152), random weights, float16 (`flora.engine.workload`).
Workload: the paper's 1,000 requests with ShareGPT-like lengths of 50 to 2,000 tokens at full
length, all arriving at once, each generating exactly its output length. Engine: 256 rows,
8,192 tokens per step, CUDA graphs for decode steps, Triton paged attention.

Runs, each warmed up first (one request per row count, so that every graph bucket is captured):
    none      the injected model, every request on the base model
    flora_r1  every request on its own FLoRA rank-1 adapter (1,000 adapters, q and k columns of c_attn)
Figures, each against its target:
    output tokens/s with no adapter                       >= 8x the first engine's 5,113
    flora_r1 / none                                       >= 0.95
    decode step at 256 rows / time to read the weights and the live keys and values at the
    measured device copy bandwidth                        <= 3
Writes `engine_gpu.csv` (figure, value, unit, target, verdict) under `--out` and prints it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import flora  # noqa: E402
from flora.engine import Engine, EngineConfig, Request  # noqa: E402
from flora.engine.workload import build_model, sharegpt_like_lengths  # noqa: E402

FIRST_ENGINE_TOKENS_PER_S = 5113  # the first engine, H100, StarCoderBase-1B shape (README)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="a tiny model and workload: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        shrink, dtype, requests, scale, rows = 32, torch.float32, 24, 0.05, 8
        engine_extra = {"attention": "torch"} if device.type == "cpu" else {}
    else:
        shrink, dtype, requests, scale, rows = 1, torch.float16, args.requests, 1.0, args.rows
        engine_extra = {}
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)

    base = build_model("starcoder-1b", shrink, device, dtype, seed=0)
    lengths = sharegpt_like_lengths(requests, scale=scale, min_total=50 if scale == 1 else 8, max_total=2000)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    prompts = [torch.randint(1, vocab, (p,), generator=gen).tolist() for p, _ in lengths]
    outputs = [o for _, o in lengths]
    print(f"{requests} requests: prompts {sum(map(len, prompts))} tokens, outputs {sum(outputs)} tokens", flush=True)
    config = EngineConfig(max_batch_rows=rows, max_batch_tokens=args.tokens, eos_token_ids=(), **engine_extra)

    banks = flora.inject(base, "gpt_bigcode", max_slots=requests + 1, max_rank=1, max_lora_rank=0)
    adapter = flora.init_adapter("flora", 1, banks.module_shapes, seed=1)
    adapter = flora.Adapter(adapter.config, {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in adapter.tensors.items()})
    names = [f"flora{i}" for i in range(requests)]
    for name in names:
        banks.load(name, adapter)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    engine = Engine(base, config=config)
    kv_bytes_per_token = 2 * base.config.n_layer * engine.decoder.kv_heads * engine.decoder.head_dim * torch.empty(
        (), dtype=dtype).element_size()

    rows_out = []
    results = {}
    for method, adapters in (("none", [None] * requests), ("flora_r1", names)):
        warm_up(engine, rows, vocab, adapters)
        engine.step_stats.clear()
        t0 = time.perf_counter()
        done = engine.generate([Request(p, adapter=a, max_new_tokens=o, ignore_eos=True)
                                for p, a, o in zip(prompts, adapters, outputs)])
        wall = time.perf_counter() - t0
        assert all(d.ok for d in done), [d.error for d in done if not d.ok][:3]
        tps = sum(outputs) / wall
        full = [s for s in engine.step_stats if s.rows == s.tokens == s.drawn == rows]
        results[method] = tps
        print(f"{method}: {tps:,.0f} output tokens/s ({wall:.1f} s); decode steps at {rows} rows: {len(full)}", flush=True)
        rows_out.append(figure(f"{method}: output tokens/s", tps, "tokens/s"))
        if full:
            step = statistics.median(s.wall_s for s in full)
            host = statistics.median(s.host_s for s in full)
            context = statistics.median(s.context_tokens for s in full)
            read = (weight_bytes + context * kv_bytes_per_token) / bandwidth
            rows_out.append(figure(f"{method}: decode step at {rows} rows", step * 1e3, "ms"))
            rows_out.append(figure(f"{method}: host time of that step", host * 1e3, "ms"))
            rows_out.append(figure(f"{method}: keys read per step (median)", context, "tokens"))
            rows_out.append(figure(f"{method}: step / (weights + live KV read at copy bandwidth)", step / read, "x",
                                   target=3.0, below=True))
    rows_out.append(figure("none / first engine's 5,113 tokens/s", results["none"] / FIRST_ENGINE_TOKENS_PER_S, "x", target=8.0))
    rows_out.append(figure("flora_r1 / none", results["flora_r1"] / results["none"], "x", target=0.95))
    rows_out.append(figure("device copy bandwidth", bandwidth / 1e9, "GB/s"))
    rows_out.append(figure("wall time of this script", time.perf_counter() - started, "s", target=480, below=True))
    engine.close()
    write(args.out, rows_out, device)


def warm_up(engine: Engine, rows: int, vocab: int, adapters: list) -> None:
    """Every row count from `rows` down to 1 decodes at least once: each graph bucket is captured."""
    engine.generate([Request([1 + i % (vocab - 1)] * 8, adapter=adapters[i % len(adapters)], max_new_tokens=2 + i,
                             ignore_eos=True) for i in range(rows)])


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy (read + write counted once: what a read costs)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n / best  # a copy reads and writes every byte


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def figure(name: str, value: float, unit: str, target: float | None = None, below: bool = False) -> dict:
    verdict = ""
    if target is not None:
        ok = value <= target if below else value >= target
        verdict = "met" if ok else "MISSED"
    return {"figure": name, "value": round(value, 4), "unit": unit,
            "target": "" if target is None else f"{'<=' if below else '>='} {target}", "verdict": verdict}


def write(out: Path, rows: list[dict], device: torch.device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu" if device.type == "cuda" else device.type
    path = out / f"engine_{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["figure", "value", "unit", "target", "verdict"])
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['figure']:>60}: {r['value']:>12} {r['unit']:<9} {r['target']:>8} {r['verdict']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
