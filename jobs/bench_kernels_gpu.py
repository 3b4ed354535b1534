"""The adapter kernels' GPU figures in one run: layers, then the engine end to end.

    python jobs/bench_kernels_gpu.py --out DIR        # one GPU; under 8 minutes on an H100/H200

Needs torch, transformers and triton; no Ray, DeepSpeed or MLflow. Runs, each in its own process
with a time limit (what finished stays written if a later part runs out of time):
  1. `bench_layers.py` on CUDA in float16: StarCoder-1B and 15B and Llama-2-7B widths, decode and
     prefill, 64 distinct adapters, ranks 1-16, every method (base, FLoRA fused and PyTorch,
     LoRA fused, bmm and grouped, IA3), CUDA-graph replays -> layers_cuda.csv / .png
  2. `bench_serving.py --preset gpu`: StarCoderBase-1B's real shape, the paper's 1,000 requests
     at full length, every request on its own adapter, no adapter / FLoRA / LoRA fused / LoRA
     bmm at ranks 1, 2 and 4 -> serving_cuda.csv / .md / plots
and writes `kernels_gpu.csv`: every target of the kernels' issue with its figure and verdict.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

JOBS = Path(__file__).resolve().parent

LAYERS = ["--device", "cuda", "--dtype", "float16", "--models", "starcoder-1b,starcoder-15b,llama-2-7b",
          "--adapters", "64", "--ranks", "1,2,4,8,16", "--budget-s", "0.25"]
SERVING = ["--preset", "gpu", "--device", "cuda", "--models", "starcoder-1b", "--ranks", "1,2,4",
           "--methods", "none,flora,lora_fused,lora_bmm", "--modes", "throughput", "--scale", "1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers-timeout-s", type=int, default=150)
    parser.add_argument("--serving-timeout-s", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run("bench_layers.py", LAYERS + ["--out", str(args.out)], args.layers_timeout_s)
    run("bench_serving.py", SERVING + ["--out", str(args.out)], args.serving_timeout_s)
    rows = layer_figures(args.out / "layers_cuda.csv") + serving_figures(args.out / "serving_cuda.csv")
    rows.append(figure("wall time of this script", time.perf_counter() - started, "s", 480, below=True))
    path = args.out / "kernels_gpu.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["figure", "value", "unit", "target", "verdict"])
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['figure']:>70}: {r['value']:>10} {r['unit']:<5} {r['target']:>8} {r['verdict']}")
    print(f"wrote {path}")


def run(script: str, argv: list[str], timeout_s: int) -> None:
    print(f"== {script} {' '.join(argv)}", flush=True)
    try:
        subprocess.run([sys.executable, str(JOBS / script), *argv], timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        print(f"{script} ran past {timeout_s} s: what it wrote so far counts", flush=True)


def read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def layer_figures(path: Path) -> list[dict]:
    rows = read(path)
    out = []
    for shape, target in (("decode", 1.1), ("prefill", 1.15)):
        for model in dict.fromkeys(r["model"] for r in rows):
            ms = {r["method"]: float(r["median_ms"]) for r in rows
                  if r["model"] == model and r["shape"] == shape and r["rank"] == "1"}
            if "flora_fused" in ms:
                out.append(figure(f"layer {model} {shape} r1: FLoRA fused / base", ms["flora_fused"] / ms["base"], "x",
                                  target, below=True))
            if shape == "decode" and "flora_fused" in ms and "lora_fused" in ms:
                out.append(figure(f"layer {model} decode r1: FLoRA fused / LoRA fused", ms["flora_fused"] / ms["lora_fused"],
                                  "x", 0.8, below=True))
    return out or [figure("layer figures", 0, "", None, note="not measured")]


def serving_figures(path: Path) -> list[dict]:
    rows = [r for r in read(path) if r["mode"] == "throughput"]
    tps = {(r["method"], int(r["rank"])): float(r["output_tokens_per_s"]) for r in rows}
    out = []
    if ("none", 0) in tps:
        out.append(figure("engine: no adapter, output tokens/s", tps[("none", 0)], "tok/s"))
    if ("none", 0) in tps and ("flora", 1) in tps:
        out.append(figure("engine: FLoRA r1 / no adapter", tps[("flora", 1)] / tps[("none", 0)], "x", 0.97))
    for rank in (1, 2, 4):
        for lora in ("lora_fused", "lora_bmm"):
            if ("flora", rank) in tps and (lora, rank) in tps:
                out.append(figure(f"engine: FLoRA / {lora} at rank {rank}", tps[("flora", rank)] / tps[(lora, rank)], "x"))
    ranks = sorted(r for (m, r) in tps if m == "flora" and ("lora_fused", r) in tps)
    behind = [r for r in ranks if tps[("lora_fused", r)] > tps[("flora", r)]]
    if ranks:
        note = f"from rank {behind[0]}" if behind else f"not up to rank {ranks[-1]} (0 in value)"
        out.append(figure("engine: crossover, the rank from which fused LoRA is faster", behind[0] if behind else 0,
                          "rank", None, note=note))
    return out or [figure("engine figures", 0, "", None, note="not measured")]


def figure(name, value, unit, target=None, below=False, note="") -> dict:
    verdict = note
    if target is not None:
        verdict = "met" if (value <= target if below else value >= target) else "MISSED"
    return {"figure": name, "value": round(value, 4), "unit": unit,
            "target": "" if target is None else f"{'<=' if below else '>='} {target}", "verdict": verdict}


if __name__ == "__main__":
    main()
