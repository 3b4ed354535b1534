"""The fine-tuning job on a real local Ray cluster, real DeepSpeed and a real sqlite MLflow store."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import flora
from flora_platform import tracking
from flora_platform.base_model import load_base
from flora_platform.config import ConfigError, FinetuneConfig, load_config

from .conftest import load_job, tiny_job_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_worker_run_logs_registers_and_serves(ray_local, tmp_path):
    finetune = load_job("finetune")
    cfg = load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path))
    out = finetune.run(cfg)
    metrics, uri = out["metrics"], cfg.tracking_uri

    for lang in ("python", "c"):
        for key in ("eval_loss", "eval_perplexity", "base_eval_loss", "base_eval_perplexity"):
            assert f"{key}/{lang}" in metrics
    assert metrics["step"] == 12 and metrics["resumed_from_step"] == 0

    client = tracking.client_for(uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["adapter.kind"] == "flora" and run.data.params["scaling.num_workers"] == "2"
    history = client.get_metric_history(out["run_id"], "train_loss")
    assert [m.step for m in history] == [3, 6, 9, 12]  # per-step training loss over time
    for key in ("train_loss/python", "train_loss/c", "tokens_per_s", "eval_perplexity/c", "base_eval_perplexity/python"):
        assert client.get_metric_history(out["run_id"], key), key
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "adapters")}
    assert artifacts == {"adapters/python", "adapters/c"}

    # Registered versions resolve through models:/<name>@<alias> to a directory flora loads.
    (version,) = client.search_model_versions("name='flora-python'")
    assert version.tags["kind"] == "flora" and version.tags["rank"] == "4"
    client.set_registered_model_alias("flora-python", "champion", version.version)
    local = tracking.download_model(uri, "models:/flora-python@champion", tmp_path / "served")
    adapter = flora.load_adapter(local)
    model, _ = load_base(run.data.tags["base_model"])
    banks = flora.inject(model, "gpt_bigcode", max_rank=4)
    banks.load("python", adapter)
    assert banks.names == ["python"]

    # A job stopped after its workers' last checkpoint, before it closed the run: submitted
    # again, it continues that run from the last checkpoint, trains nothing and ends with the
    # final evaluation (no report at all would leave the job without metrics).
    client.set_terminated(out["run_id"], status="KILLED")
    finished = finetune.run(cfg)
    assert finished["run_id"] == out["run_id"] and client.get_run(out["run_id"]).info.status == "FINISHED"
    assert finished["metrics"]["step"] == 12 and finished["metrics"]["resumed_from_step"] == 12
    assert client.get_run(out["run_id"]).data.metrics["resumed_from_step"] == 12  # the attempt's, in MLflow too
    assert finished["metrics"]["eval_loss/mean"] == metrics["eval_loss/mean"]
    assert [m.step for m in client.get_metric_history(out["run_id"], "train_loss")] == [3, 6, 9, 12]
    assert sorted(int(v.version) for v in client.search_model_versions("name='flora-python'")) == [1, 2]


def test_a_finished_run_submitted_again_trains_anew_in_its_own_directory(tmp_path):
    """The same command after a finished run opens a new MLflow run, and Ray Train's directory is
    named by it, so the new run does not resume (and register again) the finished run's last
    checkpoint."""
    finetune = load_job("finetune")
    cfg = load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path))
    params = {"adapter.rank": 4}
    first = tracking.start_or_resume_run(cfg.tracking_uri, "exp", cfg.run.name, params, tags={})
    tracking.finish_run(cfg.tracking_uri, first, ok=True)
    again = tracking.start_or_resume_run(cfg.tracking_uri, "exp", cfg.run.name, params, tags={})
    assert again != first
    assert finetune.train_run_name(cfg, again) != finetune.train_run_name(cfg, first)


def test_unfinished_run_continues_only_with_the_same_settings(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.start_or_resume_run(uri, "exp", "job", {"adapter.rank": 4, "train.lr": 0.008}, tags={})
    tracking.finish_run(uri, first, ok=False)  # a job that died
    assert tracking.start_or_resume_run(uri, "exp", "job", {"adapter.rank": 4, "train.lr": 0.008}, tags={}) == first
    tracking.finish_run(uri, first, ok=False)
    with pytest.raises(ConfigError, match=r"run\.name: 'job' names an unfinished MLflow run .* \(adapter\.rank\)"):
        tracking.start_or_resume_run(uri, "exp", "job", {"adapter.rank": 8, "train.lr": 0.008}, tags={})


def _kill_one_worker_after_first_checkpoint(storage: Path, killed: list, stop: threading.Event):
    """Wait until Ray Train has registered a checkpoint, then SIGKILL one Ray Train worker process."""
    import psutil

    while not stop.is_set():
        # The controller writes this snapshot once it has registered a reported checkpoint; a
        # checkpoint directory alone may belong to a report it has not collected yet.
        if any(storage.glob("*/checkpoint_manager_snapshot.json")):
            # Ray titles each actor's process `ray::<ActorClass>...`.
            workers = [
                p.pid for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")
            ]
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append(workers[-1])
                return
        time.sleep(0.2)


def _run_adapters(cfg: FinetuneConfig, out: dict, dst: Path) -> dict:
    """The run's registered adapters: name -> {tensor name: tensor}."""
    return {
        name: flora.load_adapter(tracking.download_model(cfg.tracking_uri, uri, dst / name)).tensors
        for name, uri in out["adapter_uris"].items()
    }


def _history(cfg: FinetuneConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    points = tracking.client_for(cfg.tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in points)


def test_killed_worker_resumes_exactly_where_it_stopped(ray_local, tmp_path):
    """A run whose worker is killed mid-way ends where an uninterrupted run ends: the same
    adapters, bit for bit, and the same loss at every step, each logged to MLflow once.

    Checkpoints every 7 steps, evaluations every 20, the loss logged every step: a checkpoint
    falls between evaluations and log steps alike, and the killed run has logged steps past its
    last checkpoint that the resumed one redoes."""
    finetune = load_job("finetune")
    settings = {
        "train.steps": 60, "train.eval_interval": 20, "train.checkpoint_interval": 7, "train.log_interval": 1,
        "model.embedded.cache_dir": str(tmp_path.parent / "base-cache"),  # the module's shared base
    }
    ref_cfg = load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path / "reference", **settings))
    reference = finetune.run(ref_cfg)
    assert reference["metrics"]["resumed_from_step"] == 0

    cfg = load_config(FinetuneConfig, None, tiny_job_overrides(tmp_path / "killed", **settings))
    killed, stop = [], threading.Event()
    killer = threading.Thread(
        target=_kill_one_worker_after_first_checkpoint, args=(Path(cfg.storage_path), killed, stop), daemon=True
    )
    killer.start()
    try:
        out = finetune.run(cfg)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    # The worker group restarted from a checkpoint (one every 7 steps), not from step 0, and
    # finished the schedule.
    resumed_from = out["metrics"]["resumed_from_step"]
    assert resumed_from >= 7 and resumed_from % 7 == 0, resumed_from
    assert out["metrics"]["step"] == 60
    assert tracking.client_for(cfg.tracking_uri).get_run(out["run_id"]).info.status == "FINISHED"

    # Exact on CPU: the same data stream, optimizer moments, lr schedule, RNG and loss window.
    ours, theirs = _run_adapters(cfg, out, tmp_path / "a"), _run_adapters(ref_cfg, reference, tmp_path / "b")
    assert ours.keys() == theirs.keys() == {"python", "c"}
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        for key, tensor in ours[name].items():
            assert torch.equal(tensor, theirs[name][key]), (name, key)
    assert out["metrics"]["eval_loss/mean"] == reference["metrics"]["eval_loss/mean"]
    for key in ("train_loss", "train_loss/python", "lr"):
        history = _history(cfg, out["run_id"], key)
        assert [step for step, _ in history] == list(range(1, 61)), key  # each step once
        assert history == _history(ref_cfg, reference["run_id"], key), key
    eval_steps = [step for step, _ in _history(cfg, out["run_id"], "eval_loss/mean")]
    assert eval_steps == [20, 40, 60]
