"""The engine benchmarks run as plain scripts in their quick modes (no vLLM peer, a tiny model)
and write every figure they promise."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(JOBS / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_engine_benchmark_quick(tmp_path):
    run("bench_engine.py", "--quick", "--vllm", "none", "--work-dir", str(tmp_path / "assets"), "--out", str(tmp_path))
    with open(tmp_path / "engine_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert {"ours_base", "ours_flora_r1", "ours_lora_r8", "ours_flora_r1 / ours_base"} <= names
    assert any(n.startswith("host overhead at") for n in names)
    assert any(n.startswith("128 distinct / 16 distinct") for n in names)
    assert all(float(r["value"]) > 0 for r in rows)
    assert (tmp_path / "engine_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_engine_benchmark_refuses_a_missing_vllm(tmp_path):
    done = subprocess.run([sys.executable, str(JOBS / "bench_engine.py"), "--vllm", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "make vllm-venv" in done.stderr


def test_gpu_script_runs_quick_on_cpu(tmp_path):
    done = run("bench_engine_gpu.py", "--quick", "--device", "cpu", "--out", str(tmp_path))
    with open(tmp_path / "engine_cpu.csv", newline="") as f:
        rows = {r["figure"]: r for r in csv.DictReader(f)}
    assert {"none: output tokens/s", "flora_r1: output tokens/s", "flora_r1 / none"} <= set(rows)
    assert any("step / (weights + live KV" in f for f in rows) and "wrote" in done.stdout


def test_kernels_gpu_summary_reads_the_benchmarks_csvs(tmp_path):
    """The GPU script's verdicts, computed from CSVs in the benchmarks' own formats."""
    sys.path.insert(0, str(JOBS))
    import bench_kernels_gpu as summary

    layers = tmp_path / "layers_cuda.csv"
    layers.write_text(
        "device,dtype,timing,model,d,shape,tokens,adapters,rank,method,median_ms,p10_ms,p90_ms,ratio_vs_base\n"
        + "".join(f"cuda,float16,cuda_graph,starcoder-1b,2048,{shape},64,64,1,{m},{ms},0,0,0\n"
                  for shape, table in (("decode", {"base": 0.020, "flora_fused": 0.021, "lora_fused": 0.030}),
                                       ("prefill", {"base": 0.100, "flora_fused": 0.130, "lora_fused": 0.110}))
                  for m, ms in table.items()))
    got = {r["figure"]: r for r in summary.layer_figures(layers)}
    assert got["layer starcoder-1b decode r1: FLoRA fused / base"]["verdict"] == "met"
    assert got["layer starcoder-1b prefill r1: FLoRA fused / base"]["verdict"] == "MISSED"  # 1.3 > 1.15
    assert got["layer starcoder-1b decode r1: FLoRA fused / LoRA fused"]["value"] == 0.7
    serving = tmp_path / "serving_cuda.csv"
    serving.write_text("mode,method,rank,output_tokens_per_s\nthroughput,none,0,1000\nthroughput,flora,1,990\n"
                       "throughput,lora_fused,1,800\nthroughput,flora,2,700\nthroughput,lora_fused,2,760\n")
    got = {r["figure"]: r for r in summary.serving_figures(serving)}
    assert got["engine: FLoRA r1 / no adapter"]["verdict"] == "met"
    assert got["engine: crossover, the rank from which fused LoRA is faster"]["value"] == 2
