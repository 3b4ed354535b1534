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
