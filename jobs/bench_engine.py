"""Engine benchmark: our engine against vLLM on the same weights, requests and row limit (CPU).

    make vllm-venv                     # once: vLLM's CPU build in its own virtualenv (.venv-vllm)
    python jobs/bench_engine.py [--quick] [--out DIR] [--threads N] [--vllm PYTHON|none]

Model: a llama built from a config with random weights (6 layers, width 512, 8 heads of which 4
key/value heads, MLP 1376, vocabulary 4096, context 1024), written with `save_pretrained`; both
engines load that directory. Adapters on the llama preset's targets (q_proj, k_proj), written
to disk and loaded from there by both sides: 16 LoRA rank-8 adapters in PEFT's format, and 16
FLoRA rank-1 adapters in ours (vLLM has no FLoRA).

Throughput: `--requests` (64) requests, all arriving at once, ShareGPT-like prompt and output
lengths (`flora.engine.workload`) times `--scale` (0.25), every request generating exactly its
output length (greedy, end-of-sequence ignored), request i on adapter i % 16:
    ours_base      our engine, every row on the base model (the injected model, slot 0)
    ours_flora_r1  our engine, 16 FLoRA rank-1 adapters mixed in every batch
    ours_lora_r8   our engine, 16 LoRA rank-8 adapters mixed
    ours_base_hf   ours_base through Hugging Face's modules with our paged attention (model_impl="hf")
    ours_base_mkl  ours_base with PyTorch's own CPU matmuls (MKL) instead of oneDNN's (cpu_matmul="torch")
    vllm_base      vLLM, no adapter
    vllm_lora_r8   vLLM, the same 16 LoRA adapters (enable_lora, max_loras=16)
Both engines get the same row limit (`--rows`, vLLM's max_num_seqs), token budget (`--tokens`,
max_num_batched_tokens) and CPU threads. vLLM runs in a long-lived subprocess in its own
virtualenv (`jobs/vllm_peer.py`); each method is warmed up once, then `--repeats` timed runs go
round-robin over the methods, so the machine's load hits all alike; medians count. Greedy token
agreement with vLLM is reported for the base model and for the LoRA adapters.

Host overhead: decode steps at 256 rows (256 requests, 16-token prompts): per step, wall time
minus the time in the model's forward and the sampler (`Engine.step_stats`); median over steps.
Everything else a step does counts: scheduling, inputs, attention metadata, the adapter route,
bookkeeping, and on a CPU delivering the tokens (streams, stop checks, outputs), which the
engine thread does itself there.

Many adapters: a bank of 4,096 FLoRA rank-1 slots, 1,024 requests at 256 rows, each on its own
adapter (1,024 distinct, 256 in every step) against the same requests cycling over 16 adapters.

Output under `--out`: `engine_<device>.csv` (every figure), `engine_<device>.png`, and the
ratios against the targets on stdout. Imports flora, torch, transformers, safetensors and
matplotlib; no Ray, so it also runs on a bare machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import flora  # noqa: E402
from flora.engine import DirectoryLoader, Engine, EngineConfig, Request  # noqa: E402
from flora.engine.workload import sharegpt_like_lengths  # noqa: E402

ADAPTERS = 16
FIRST_ENGINE_HOST_MS = 3.56  # the first engine's host time per decode step at 256 rows (README)
METHODS = ("ours_base", "ours_flora_r1", "ours_lora_r8", "ours_base_hf", "ours_base_mkl", "vllm_base", "vllm_lora_r8")
TARGETS = ["q_proj", "k_proj"]
CSV_COLUMNS = ["section", "name", "value", "unit", "detail"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--scale", type=float, default=0.25, help="multiplies ShareGPT-like lengths")
    parser.add_argument("--rows", type=int, default=32, help="rows at once (vLLM: max_num_seqs)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (vLLM: max_num_batched_tokens)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both engines (0: every core)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, round-robin; the median counts")
    parser.add_argument("--vllm", default=str(REPO_ROOT / ".venv-vllm" / "bin" / "python"),
                        help="python of vLLM's virtualenv, or 'none' to skip the peer")
    parser.add_argument("--sections", default="throughput,host,adapters", help="which parts to run")
    parser.add_argument("--work-dir", type=Path, default=Path("~/.cache/flora/bench_engine").expanduser(),
                        help="where the model and adapter directories are written")
    parser.add_argument("--quick", action="store_true", help="a smaller smoke run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "engine")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if sections - {"throughput", "host", "adapters"}:
        parser.error(f"--sections {args.sections!r}: choose from throughput, host, adapters")
    if args.quick:
        args.requests, args.scale, args.repeats = 16, 0.1, 1
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    vllm_python = None if args.vllm == "none" else Path(args.vllm)
    if vllm_python is not None and not vllm_python.exists():
        parser.error(f"--vllm {vllm_python} does not exist: run `make vllm-venv` first, or pass --vllm none")

    model_dir, flora_dirs, lora_dirs = write_assets(args.work_dir, quick=args.quick)
    rows: list[dict] = []
    if "throughput" in sections:
        rows += throughput(args, model_dir, flora_dirs, lora_dirs, vllm_python, threads)
    if "host" in sections:
        rows += host_overhead(model_dir, 64 if args.quick else 256)
    if "adapters" in sections:
        rows += many_adapters(model_dir, args.repeats, quick=args.quick)
    write_results(args.out, rows, threads)


# --------------------------------------------------------------------------- model and adapters


def llama_config(quick: bool) -> LlamaConfig:
    width, layers = (128, 2) if quick else (512, 6)
    return LlamaConfig(
        vocab_size=4096, hidden_size=width, intermediate_size=width * 43 // 16, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )


def write_assets(root: Path, quick: bool) -> tuple[Path, list[Path], list[Path]]:
    """The model and the 16 + 16 adapter directories (written once per configuration)."""
    config = llama_config(quick)
    root = root / f"llama-{config.hidden_size}x{config.num_hidden_layers}"
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    model = load_model(model_dir)
    banks = flora.inject(model, TARGETS, max_slots=2, max_rank=1, max_lora_rank=8)
    flora_dirs, lora_dirs = [], []
    gen = torch.Generator().manual_seed(1)
    for i in range(ADAPTERS):
        flora_dir, lora_dir = root / f"flora{i}", root / f"lora{i}"
        if not (flora_dir / "flora_config.json").exists():
            adapter = flora.init_adapter("flora", 1, banks.module_shapes, seed=i)
            moved = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in adapter.tensors.items()}
            flora.Adapter(adapter.config, moved).save(flora_dir)
        if not (lora_dir / "adapter_config.json").exists():
            write_peft_lora(lora_dir, banks.module_shapes, rank=8, alpha=16, seed=100 + i)
        flora_dirs.append(flora_dir)
        lora_dirs.append(lora_dir)
    return model_dir, flora_dirs, lora_dirs


def write_peft_lora(directory: Path, module_shapes: dict, rank: int, alpha: int, seed: int) -> None:
    """A LoRA adapter in PEFT's on-disk format (what vLLM and PEFT read), both factors non-zero."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (dout, din) in module_shapes.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, din, generator=gen) / din ** 0.5
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(dout, rank, generator=gen) * 0.05
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": TARGETS, "lora_dropout": 0.0,
              "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": ""}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def load_model(model_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# --------------------------------------------------------------------------- throughput vs vLLM


def throughput(args, model_dir, flora_dirs, lora_dirs, vllm_python, threads) -> list[dict]:
    lengths = sharegpt_like_lengths(args.requests, scale=args.scale, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 4096, (p,), generator=gen).tolist() for p, _ in lengths]
    outputs = [o for _, o in lengths]
    print(f"{len(prompts)} requests: prompt tokens mean {statistics.fmean(map(len, prompts)):.0f}, output tokens "
          f"mean {statistics.fmean(outputs):.0f} (max {max(outputs)}); {threads} threads, {args.rows} rows")
    flora_names = [d.name for d in flora_dirs]
    lora_names = [d.name for d in lora_dirs]
    model = load_model(model_dir)
    flora.inject(model, TARGETS, max_slots=2 * ADAPTERS + 1, max_rank=1, max_lora_rank=8)
    engines = {
        variant: Engine(model, loader=DirectoryLoader(model_dir.parent), config=EngineConfig(
            max_batch_rows=args.rows, max_batch_tokens=args.tokens, eos_token_ids=(), **extra))
        for variant, extra in (("native", {}), ("hf", {"model_impl": "hf"}), ("mkl", {"cpu_matmul": "torch"}))
    }
    peer = VLLMPeer(vllm_python, model_dir, lora_dirs, args, threads) if vllm_python else None

    def ours(names, variant="native"):
        adapters = [names[i % ADAPTERS] if names else None for i in range(len(prompts))]
        start = time.perf_counter()
        results = engines[variant].generate([Request(p, adapter=a, max_new_tokens=o, ignore_eos=True)
                                             for p, a, o in zip(prompts, adapters, outputs)])
        wall = time.perf_counter() - start
        assert all(r.ok and len(r.output_ids) == o for r, o in zip(results, outputs)), [r.error for r in results]
        return wall, [list(r.output_ids) for r in results]

    runs = {
        "ours_base": lambda: ours(None),
        "ours_flora_r1": lambda: ours(flora_names),
        "ours_lora_r8": lambda: ours(lora_names),
        "ours_base_hf": lambda: ours(None, "hf"),
        "ours_base_mkl": lambda: ours(None, "mkl"),
    }
    if peer is not None:
        runs["vllm_base"] = lambda: peer.generate(prompts, outputs, None)
        runs["vllm_lora_r8"] = lambda: peer.generate(prompts, outputs, lora_names)
    walls: dict[str, list[float]] = {m: [] for m in runs}
    tokens: dict[str, list] = {}
    try:
        for method, run in runs.items():
            tokens[method] = run()[1]  # warm-up: loads adapters, compiles, fills caches
        for repeat in range(args.repeats):
            for method, run in runs.items():
                wall, _ = run()
                walls[method].append(wall)
                print(f"{method:>14} #{repeat}: {sum(outputs) / wall:8.1f} tokens/s  wall {wall:6.2f} s", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        if peer is not None:
            peer.close()
    out = []
    for method, w in walls.items():
        out.append(row("throughput", method, sum(outputs) / statistics.median(w), "output tokens/s",
                       f"median of {len(w)}: " + " ".join(f"{sum(outputs) / x:.0f}" for x in w)))
    # A ratio is the median over repeats of the two methods' ratio within the repeat: the runs of
    # one repeat follow each other within seconds, so the machine's slower and faster spells cancel.
    for a, b, target in (("ours_base", "vllm_base", 1.0), ("ours_flora_r1", "ours_base", 0.95),
                         ("ours_flora_r1", "vllm_lora_r8", 2.0), ("ours_lora_r8", "vllm_lora_r8", None),
                         ("ours_lora_r8", "ours_base", None), ("vllm_lora_r8", "vllm_base", None),
                         ("ours_base_hf", "ours_base", None), ("ours_base_mkl", "ours_base", None)):
        if a in walls and b in walls:
            paired = [wb / wa for wa, wb in zip(walls[a], walls[b])]  # tokens/s of a over tokens/s of b
            out.append(ratio_row(f"{a} / {b}", statistics.median(paired), target,
                                 "per repeat: " + " ".join(f"{x:.2f}" for x in paired)))
    for a, b in (("ours_base", "vllm_base"), ("ours_lora_r8", "vllm_lora_r8"), ("ours_base_hf", "ours_base"),
                 ("ours_base_mkl", "ours_base")):
        if a in tokens and b in tokens:
            same = sum(x == y for xs, ys in zip(tokens[a], tokens[b]) for x, y in zip(xs, ys))
            total = sum(len(xs) for xs in tokens[a])
            whole = sum(xs == ys for xs, ys in zip(tokens[a], tokens[b]))
            out.append(row("agreement", f"{a} vs {b}", same / total, "fraction of greedy tokens equal",
                           f"{same}/{total} tokens; {whole}/{len(tokens[a])} requests identical"))
            print(f"greedy tokens equal, {a} vs {b}: {same}/{total}; requests identical {whole}/{len(tokens[a])}")
    return out


class VLLMPeer:
    """`jobs/vllm_peer.py` in vLLM's virtualenv, fed one job per timed run."""

    def __init__(self, python: Path, model_dir: Path, lora_dirs: list[Path], args, threads: int):
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}", OMP_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)
        command = [str(python), str(REPO_ROOT / "jobs" / "vllm_peer.py"), "--model", str(model_dir),
                   "--rows", str(args.rows), "--tokens", str(args.tokens)]
        for d in lora_dirs:
            command += ["--lora", f"{d.name}={d}"]
        print("starting vLLM:", " ".join(command[:2]), "...", flush=True)
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(model_dir.parent))
        self._read("READY")

    def generate(self, prompts, outputs, names):
        job = {"prompts": prompts, "max_tokens": outputs,
               "loras": [names[i % ADAPTERS] for i in range(len(prompts))] if names else None}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self._read("RESULT "))
        return result["wall_s"], result["tokens"]

    def _read(self, marker: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker):]
        raise RuntimeError(f"vLLM exited (status {self.proc.wait()}) before answering; its log is above")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------- host overhead, many adapters


def host_overhead(model_dir: Path, rows: int) -> list[dict]:
    """Median host time of decode steps with every row running, on the base model."""
    model = load_model(model_dir)
    flora.inject(model, TARGETS, max_slots=2, max_rank=1, max_lora_rank=0)
    engine = Engine(model, config=EngineConfig(max_batch_rows=rows, max_batch_tokens=16 * rows, eos_token_ids=()))
    gen = torch.Generator().manual_seed(2)
    outputs = engine.generate([Request(torch.randint(3, 4096, (16,), generator=gen).tolist(), max_new_tokens=48,
                                       ignore_eos=True) for _ in range(rows)])
    assert all(o.ok for o in outputs)
    engine.close()
    steps = [s for s in engine.step_stats if s.rows == s.tokens == s.drawn == rows][3:]  # past allocator warm-up
    host = statistics.median(s.host_s for s in steps) * 1e3
    wall = statistics.median(s.wall_s for s in steps) * 1e3
    print(f"decode steps at {rows} rows: {len(steps)}; step {wall:.2f} ms, host overhead {host:.3f} ms (median)")
    return [row("host", f"decode step at {rows} rows", wall, "ms", "median wall time"),
            row("host", f"host overhead at {rows} rows", host, "ms", "median of wall time minus model forward and sampler; target <= 1 ms")]


def many_adapters(model_dir: Path, repeats: int, quick: bool) -> list[dict]:
    """1,024 distinct FLoRA rank-1 adapters in flight against 16, from a bank of 4,096 slots."""
    slots, distinct, rows = (512, 128, 64) if quick else (4096, 1024, 256)
    model = load_model(model_dir)
    banks = flora.inject(model, TARGETS, max_slots=slots + 1, max_rank=1, max_lora_rank=0)
    gen = torch.Generator().manual_seed(3)
    for i in range(distinct):
        adapter = flora.init_adapter("flora", 1, banks.module_shapes, seed=i)
        banks.load(f"a{i}", flora.Adapter(adapter.config, {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                                                           for k, v in adapter.tensors.items()}))
    prompts = [torch.randint(3, 4096, (16,), generator=gen).tolist() for _ in range(distinct)]
    engine = Engine(model, config=EngineConfig(max_batch_rows=rows, max_batch_tokens=16 * rows, eos_token_ids=()))

    def run(k):
        start = time.perf_counter()
        out = engine.generate([Request(p, adapter=f"a{i % k}", max_new_tokens=32, ignore_eos=True) for i, p in enumerate(prompts)])
        assert all(r.ok for r in out)
        return 32 * len(prompts) / (time.perf_counter() - start)

    run(distinct)
    tps = {16: [], distinct: []}
    for _ in range(max(repeats, 2)):
        for k in tps:
            tps[k].append(run(k))
            print(f"{k:>5} distinct adapters: {tps[k][-1]:8.1f} tokens/s", flush=True)
    engine.close()
    paired = [a / b for a, b in zip(tps[distinct], tps[16])]
    return [row("adapters", f"{k} distinct FLoRA r1 adapters ({slots} slots, {rows} rows)", statistics.median(v),
                "output tokens/s", " ".join(f"{x:.0f}" for x in v)) for k, v in tps.items()] + [
        ratio_row(f"{distinct} distinct / 16 distinct", statistics.median(paired), 0.95,
                  "per repeat: " + " ".join(f"{x:.2f}" for x in paired))]


# --------------------------------------------------------------------------- results


def row(section, name, value, unit, detail="") -> dict:
    return {"section": section, "name": name, "value": round(value, 4), "unit": unit, "detail": detail}


def ratio_row(name, value, target, detail="") -> dict:
    verdict = "" if target is None else f"target >= {target}: {'met' if value >= target else 'MISSED'}"
    print(f"{name} = {value:.3f} {verdict} {detail}")
    return row("ratio", name, value, "x", "; ".join(x for x in (verdict, detail) if x))


def write_results(out: Path, rows: list[dict], threads: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "engine_cpu.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    host = [r for r in rows if r["section"] == "host" and r["name"].startswith("host overhead")]
    if host:  # beside the first engine's figure, recorded before it was replaced
        host = [row("host", "first engine (recorded)", FIRST_ENGINE_HOST_MS, "ms"), dict(host[0], name="this engine")]
    panels = [("throughput", [r for r in rows if r["section"] == "throughput"]),
              ("adapters", [r for r in rows if r["section"] == "adapters"]), ("host", host)]
    panels = [(s, rs) for s, rs in panels if rs]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    titles = {"throughput": "output tokens/s, same requests and weights", "adapters": "FLoRA r1: distinct adapters in flight",
              "host": "host time per decode step at 256 rows, ms"}
    for ax, (section, rs) in zip(axes[0], panels):
        colors = ["tab:orange" if r["name"].startswith("vllm") else "tab:gray" if r["name"].endswith(("_hf", "_mkl"))
                  else "tab:blue" for r in rs]
        ax.bar([r["name"].split(" (")[0] for r in rs], [r["value"] for r in rs], color=colors)
        ax.set_title(titles[section])
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"flora engine vs vLLM (CPU, {threads} threads)")
    fig.tight_layout()
    png = out / "engine_cpu.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
