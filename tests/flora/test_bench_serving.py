"""`jobs/bench_serving.py --preset smoke` runs as a plain script: CSV, plots and report complete."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "bench_serving.py"
RANKED = {"flora", "lora_bmm", "lora_grouped"}
SMOKE_RANKS = {1, 4}


def test_smoke_preset_measures_every_configuration(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    with open(tmp_path / "serving_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    throughput = [r for r in rows if r["mode"] == "throughput"]
    got = {(r["method"], int(r["rank"])) for r in throughput}
    assert got == {("none", 0), ("ia3", 0)} | {(m, r) for m in RANKED for r in SMOKE_RANKS}
    latency = [r for r in rows if r["mode"] == "latency"]
    assert {(r["method"], int(r["rank"])) for r in latency} == {("none", 0)} | {(m, 1) for m in RANKED}
    for r in rows:
        # Every configuration generated every requested token (the script checks each request's
        # count) and took measurable time.
        assert int(r["output_tokens"]) > 0 and float(r["wall_s"]) > 0, r
        tokens_from_rate = float(r["output_tokens_per_s"]) * float(r["wall_s"])
        assert abs(tokens_from_rate - int(r["output_tokens"])) <= 0.01 * int(r["output_tokens"]), r
        assert r["model"] == "starcoder-1b" and r["device"] == "cpu", r
    for r in latency:
        assert float(r["rate_per_s"]) > 0 and 0 < float(r["s_per_token_p50"]) <= float(r["s_per_token_p90"]), r
    assert all(float(r["ratio_vs_none"]) == 1.0 for r in throughput if r["method"] == "none")

    for png in ("serving_cpu_throughput.png", "serving_cpu_latency.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "serving_cpu.md").read_text()
    assert "FLoRA / bmm" in report and "Crossover" in report and "## The paper" in report

    # The report and plots can be rebuilt from the CSV alone.
    (tmp_path / "serving_cpu.md").unlink()
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "smoke", "--report-only", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert (tmp_path / "serving_cpu.md").read_text() == report


def test_bad_arguments_are_usage_errors_naming_the_flag(tmp_path):
    for args, flag in ((["--ranks", "1,x"], "--ranks"), (["--ranks", "0"], "--ranks"),
                       (["--methods", "flora,foo"], "--methods"), (["--models", "gpt-5"], "--models"),
                       (["--modes", "fast"], "--modes")):
        done = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and flag in done.stderr, (args, done.stderr)
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
