"""`jobs/bench_layers.py --quick` runs as a plain script and writes a complete CSV and a plot."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "bench_layers.py"
METHODS = {"base", "flora", "ia3", "lora_bmm", "lora_grouped"}
QUICK_RANKS = {1, 4}


def test_quick_benchmark_writes_every_method_and_rank(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "headline" in done.stdout

    with open(tmp_path / "layers_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for shape in ("decode", "prefill"):
        here = [r for r in rows if r["shape"] == shape]
        got = {(r["method"], int(r["rank"])) for r in here}
        assert got == {(m, r) for m in METHODS for r in QUICK_RANKS}, shape
        for r in here:
            p10, median, p90 = (float(r[k]) for k in ("p10_ms", "median_ms", "p90_ms"))
            assert 0 < p10 <= median <= p90, r
            assert r["device"] == "cpu" and r["dtype"] == "float32", r
        assert all(float(r["ratio_vs_base"]) == 1.0 for r in here if r["method"] == "base")

    png = tmp_path / "layers_cpu.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
