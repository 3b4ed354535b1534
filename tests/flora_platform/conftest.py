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
