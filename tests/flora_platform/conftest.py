"""Fixtures for platform tests: a real local Ray cluster on loopback and a tiny job config."""

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    """A real single-node Ray cluster bound to 127.0.0.1, shut down even when the test fails."""
    import ray

    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    # address="local": a new cluster for this module, never one a user or another test started.
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def load_job(name: str):
    """Import a job script from jobs/ as a module (jobs are entry points, not a package)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_job_overrides(tmp: Path, **extra) -> list[str]:
    """A fine-tuning job that runs in seconds: a tiny embedded base, two languages, few steps."""
    base = {
        "model.embedded.cache_dir": str(tmp.parent / "base-cache"),  # shared by the module's tests
        "model.embedded.pretrain_steps": 40,
        "model.embedded.n_embd": 64,
        "model.embedded.n_layer": 2,
        "model.embedded.vocab_size": 512,
        "data.languages": "[python,c]",
        "data.max_files_per_language": 30,
        "train.steps": 12,
        "train.batch_size": 4,
        "train.seq_len": 64,
        "train.eval_interval": 6,
        "train.log_interval": 3,
        "train.eval_blocks": 8,
        "run.storage_path": str(tmp / "storage"),
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_speech_overrides(tmp, **extra) -> list[str]:
    """A speech job that runs in seconds: two languages, a tiny Whisper barely pre-trained."""
    shared = tmp.parent  # corpus and model caches shared by the module's tests
    base = {
        "task": "speech",
        "speech.languages": "[de,fr]",
        "speech.per_language": 12,
        "speech.held_out": 4,
        "speech.eval_examples": 4,
        "speech.corpus_dir": str(shared / "speech-corpus"),
        "speech.max_label_tokens": 24,
        "speech.max_new_tokens": 8,
        "model.embedded_whisper.cache_dir": str(shared / "whisper-cache"),
        "model.embedded_whisper.vocab_size": 300,
        "model.embedded_whisper.d_model": 32,
        "model.embedded_whisper.ffn_dim": 64,
        "model.embedded_whisper.max_target_positions": 32,
        "model.embedded_whisper.window_seconds": 6,
        "model.embedded_whisper.pretrain_steps": 10,
        "adapter.rank": 2,
        "train.steps": 6,
        "train.batch_size": 4,
        "train.eval_interval": 3,
        "train.log_interval": 3,
        "run.storage_path": str(tmp / "storage"),
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def builds_under_thread_counts(build, counts=(1, 3)) -> list[tuple[str, bytes]]:
    """(directory name, weights bytes) of `build(f"process-threads-{n}")` run in a process set to
    n torch threads, for each n; checks the build gives the process its own count back."""
    import torch

    before = torch.get_num_threads()
    out = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            path = build(f"process-threads-{threads}")
            assert torch.get_num_threads() == threads  # the process's own count is restored
            out.append((path.name, (path / "model.safetensors").read_bytes()))
    finally:
        torch.set_num_threads(before)
    return out
