"""The fine-tuning GPU script: its quick mode runs on CPU without Ray, DeepSpeed or MLflow and
writes every column it promises; its stand-in for DeepSpeed's engine steps as AdamW on float32
masters would."""

import csv
import math
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, load_job

SCRIPT = REPO / "jobs" / "bench_finetune_gpu.py"
# The GPU machine has none of these: the script must not need them (import of each fails here).
NO_CLUSTER = "import runpy, sys; sys.modules.update(dict.fromkeys(['ray', 'deepspeed', 'mlflow'])); "


@pytest.mark.slow  # tens of seconds on a busy 2-core machine, most of it imports
def test_quick_mode_runs_on_cpu_without_ray_deepspeed_or_mlflow(tmp_path):
    argv = [str(SCRIPT), "--quick", "--device", "cpu", "--out", str(tmp_path)]
    code = NO_CLUSTER + f"sys.argv = {argv!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "wrote" in done.stdout

    job = load_job("bench_finetune_gpu")
    with open(tmp_path / "finetune_cpu_runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == job.RUN_FIELDS
        runs = list(reader)
    assert [r["setting"] for r in runs] == ["8x64 checkpointing on", "8x64 checkpointing off"]
    for r in runs:
        assert r["adapters"] == "8" and r["precision"] == "bf16" and not r["error"]
        assert math.isfinite(float(r["tokens_per_s"])) and float(r["tokens_per_s"]) > 0
        assert float(r["step_median_s"]) > 0 and math.isfinite(float(r["final_loss"]))
        assert float(r["estimate_gib"]) > 0 and r["peak_allocated_gib"] == "n/a"  # no allocator stats on CPU
    with open(tmp_path / "finetune_cpu_memory.csv", newline="") as f:
        terms = list(csv.DictReader(f))
    assert [t["setting"] for t in terms] == [r["setting"] for r in runs]
    assert {"weights", "adapters", "optimizer", "activations", "overhead", "total"} <= set(terms[0])
    with open(tmp_path / "finetune_cpu.csv", newline="") as f:
        figures = {r["figure"]: r for r in csv.DictReader(f)}
    assert "8x64 checkpointing on: tokens/s" in figures and figures["wall time of this script"]["verdict"] == "met"


def test_plain_engine_steps_float32_masters_like_adamw():
    """Reference: torch's AdamW on a float32 copy, gradient clipped, then rounded to bfloat16."""
    job = load_job("bench_finetune_gpu")
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn(4, 3) * 10 for _ in range(3)]  # norms above the clip: clipping matters
    param = torch.nn.Parameter(start.to(torch.bfloat16))
    engine = job.PlainEngine(torch.nn.Identity(), [param], lr=1e-2, grad_clip=1.0)
    master = torch.nn.Parameter(start.to(torch.bfloat16).float())
    reference = torch.optim.AdamW([master], lr=1e-2, weight_decay=0.0)
    for g in grads:
        param.grad = g.to(torch.bfloat16)
        engine.step()
        master.grad = g.to(torch.bfloat16).float()
        torch.nn.utils.clip_grad_norm_([master], 1.0)
        reference.step()
        assert param.grad is None
        assert torch.equal(param, master.detach().to(torch.bfloat16))
    assert torch.equal(engine.masters[0], master.detach())  # the master keeps what bf16 rounds off


def test_settings_parse():
    job = load_job("bench_finetune_gpu")
    assert job.parse_settings("8x1024, 4x2048,8x1024:off") == [(8, 1024, True), (4, 2048, True), (8, 1024, False)]
