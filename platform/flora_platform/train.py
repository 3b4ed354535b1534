"""Fine-tuning on Ray Train + DeepSpeed: one adapter per language, trained in shared mixed batches.

`train_loop_per_worker` is the whole worker: load the base model, inject adapter banks, start
every adapter at the base model (or from the last checkpoint), then DeepSpeed steps over the
adapter rows only. Each example is routed through its language's adapter, so N adapters train
for the price of one batch. `build_trainer` wires it into a `TorchTrainer`. What depends on the
model family (data, loss, extra held-out scores) is the task's: `TextTask` here for code models,
`flora_platform.speech.training.SpeechTask` for Whisper (held-out WER).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import flora
from flora_platform import checkpoint as ckpt
from flora_platform.base_model import enable_activation_checkpointing, load_base
from flora_platform.collectives import all_reduce_sum
from flora_platform.config import FinetuneConfig, from_dict
from flora_platform.data import mixed_batches
from flora_platform.preflight import adapter_targets
from flora_platform.speech.training import SpeechTask

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model + adapters


def inject_adapters(model, cfg: FinetuneConfig, names: list[str]) -> flora.AdapterBanks:
    """Inject banks sized for `names` and load a fresh, identity-initialised adapter for each."""
    spec = cfg.adapter
    targets, feedforward = adapter_targets(model, spec)
    banks = flora.inject(
        model, targets, max_slots=len(names) + 1, max_rank=spec.rank,
        max_lora_rank=spec.rank if spec.kind == "lora" else 0,
    )
    shapes = banks.module_shapes
    ff = tuple(p for p in shapes if any(flora.target_matches(t, p) for t in feedforward))
    for i, name in enumerate(names):
        adapter = flora.init_adapter(
            spec.kind, spec.rank, shapes, feedforward_modules=ff, base_model=cfg.model.name, seed=cfg.train.seed + i
        )
        banks.load(name, adapter)
    return banks


def adapter_names(cfg: FinetuneConfig, languages: list[str]) -> list[str]:
    return list(languages) if cfg.adapter.per_language else ["all"]


def deepspeed_config(cfg: FinetuneConfig) -> dict:
    t = cfg.train
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,  # progress is ours
    }
    if t.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


# --------------------------------------------------------------------------- tasks
#
# A task is what differs between model families; the worker loop below is shared. It has
# `languages`, and:
#   load_model(base_path, dtype)               -> the base model in `dtype` (a torch dtype name), not yet on the device
#   batches(batch_size, seed, rank, world, s)  -> endless (inputs dict, languages of the rows)
#   row_losses(model, inputs)                  -> ([B] summed token loss, [B] token count)
#   eval_batches(lang, rank, world, batch_size)-> this worker's share of the held-out inputs
#   score(model, route_names, rank, world, batch_size, device) -> extra held-out metrics
#                                                 (all-reduced), e.g. {"wer/de": 0.31}


def per_row_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed per row: [B] (each row has L-1 predicted tokens)."""
    b, l, v = logits.shape
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1), reduction="none"
    )  # [B·(L-1)]
    return losses.view(b, l - 1).sum(1)


class TextTask:
    """Causal code models on packed token blocks: next-token loss at every position."""

    def __init__(self, loop_config: dict):
        import ray

        self.train_blocks = ray.get(loop_config["train_blocks"])  # lang -> [n, L]
        self.eval_blocks = ray.get(loop_config["eval_blocks"])
        self.languages = sorted(self.train_blocks)

    def load_model(self, base_path: str, dtype: str):
        return load_base(base_path, dtype=dtype)[0]

    def batches(self, batch_size, seed, rank, world, start_step):
        for ids, langs in mixed_batches(self.train_blocks, batch_size, seed, rank=rank, world_size=world, start_step=start_step):
            yield {"input_ids": ids}, langs

    def row_losses(self, model, inputs):
        ids = inputs["input_ids"]
        losses = per_row_token_losses(model(input_ids=ids, use_cache=False).logits, ids)  # no generation: no KV cache
        return losses, torch.full_like(losses, ids.shape[1] - 1)

    def eval_batches(self, lang, rank, world, batch_size):
        shard = self.eval_blocks[lang][rank::world]
        for start in range(0, shard.shape[0], batch_size):
            yield {"input_ids": shard[start : start + batch_size]}

    def score(self, model, route_names, rank, world, batch_size, device) -> dict[str, float]:
        return {}


# The workers' side of each task (config `task`); the driver's side is `prepare.PREPARERS`.
TASKS = {"text": TextTask, "speech": SpeechTask}


def load_task(loop_config: dict) -> TextTask | SpeechTask:
    return TASKS[loop_config.get("task", "text")](loop_config)


# --------------------------------------------------------------------------- losses


def language_sums(row_losses: torch.Tensor, row_tokens: torch.Tensor, row_langs: list[str], languages: list[str]):
    """[n_lang, 2] tensor of (summed token loss, token count) per language, for all-reduce."""
    sums = torch.zeros(len(languages), 2, dtype=torch.float64)
    for loss, tokens, lang in zip(row_losses.detach().double().cpu(), row_tokens.double().cpu(), row_langs):
        i = languages.index(lang)
        sums[i, 0] += loss
        sums[i, 1] += tokens
    return sums


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def evaluate(model, task, route_names, batch_size, device, rank, world) -> dict[str, float]:
    """Held-out mean token loss per language; `route_names(lang)` picks the adapter (None = base)."""
    languages = task.languages
    sums = torch.zeros(len(languages), 2, dtype=torch.float64)
    for i, lang in enumerate(languages):
        for inputs in task.eval_batches(lang, rank, world, batch_size):
            inputs = to_device(inputs, device)
            rows = next(iter(inputs.values())).shape[0]
            with flora.route(model, [route_names(lang)] * rows):
                row_losses, row_tokens = task.row_losses(model, inputs)
            sums[i, 0] += row_losses.double().sum().cpu()
            sums[i, 1] += row_tokens.double().sum().cpu()
    sums = all_reduce_sum(sums)
    return {lang: (sums[i, 0] / sums[i, 1].clamp(min=1)).item() for i, lang in enumerate(languages)}


def eval_metrics(prefix: str, losses: dict[str, float], scores: dict[str, float]) -> dict[str, float]:
    out = {}
    for lang, loss in losses.items():
        out[f"{prefix}_loss/{lang}"] = loss
        out[f"{prefix}_perplexity/{lang}"] = math.exp(min(loss, 50.0))
    out[f"{prefix}_loss/mean"] = statistics.fmean(losses.values())
    out.update({f"{prefix}_{key}": value for key, value in scores.items()})
    return out


# --------------------------------------------------------------------------- the worker


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: `loop_config` holds the config dict, base model path and data refs."""
    import deepspeed
    import ray.train
    from ray.train.torch import get_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: FinetuneConfig = from_dict(FinetuneConfig, loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    task = load_task(loop_config)
    languages = task.languages
    names = adapter_names(cfg, languages)
    to_adapter = (lambda lang: lang) if cfg.adapter.per_language else (lambda lang: "all")

    # Extra values sent with every report (not logged), e.g. a search's bookkeeping: a picklable
    # function of no arguments returning a dict.
    report_extras = loop_config.get("report_extras") or dict

    # The frozen base straight in the training dtype (model.dtype); the adapter banks take its
    # dtype, DeepSpeed's optimizer keeps float32 masters of them under bf16/fp16.
    model = task.load_model(loop_config["base_path"], cfg.base_dtype)
    model.to(device)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    banks = inject_adapters(model, cfg, names)
    start_step, state = 0, {}
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = ckpt.load_checkpoint(d, banks)
        start_step = state["step"]
        log.info("rank %d: resuming from step %d", rank, start_step)

    params = banks.trainable_parameters(names)
    # No weight decay: it would pull the masked (other slots') rows, e.g. the base slot's ones, to zero.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1 + start_step) / warmup))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler,
        config=deepspeed_config(cfg), dist_init_required=False,
    )

    batch_size = cfg.train.batch_size
    base = lambda lang: None  # noqa: E731
    base_eval = state.get("base_eval") or evaluate(engine.module, task, base, batch_size, device, rank, world)
    base_scores = state.get("base_scores")
    if base_scores is None:
        base_scores = task.score(engine.module, base, rank, world, batch_size, device)
    batches = task.batches(batch_size, cfg.train.seed, rank, world, start_step)
    window = torch.zeros(len(languages), 2, dtype=torch.float64)
    step_times: list[float] = []
    window_start = time.perf_counter()
    metrics_writer = metric_writer(loop_config) if rank == 0 else None
    for step in range(start_step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        inputs, langs = next(batches)
        inputs = to_device(inputs, device)
        with flora.route(engine.module, [to_adapter(lang) for lang in langs]):
            row_losses, row_tokens = task.row_losses(engine, inputs)
            loss = row_losses.sum() / row_tokens.sum().clamp(min=1)
            engine.backward(loss)
        engine.step()
        step_times.append(time.perf_counter() - t0)
        window += language_sums(row_losses, row_tokens, langs, languages)

        last = step == cfg.train.steps
        if step % cfg.train.log_interval == 0 or last:
            totals = all_reduce_sum(window)
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train_loss": (totals[:, 0].sum() / totals[:, 1].sum()).item(),
                "tokens_per_s": totals[:, 1].sum().item() / elapsed,  # predicted (loss-bearing) tokens
                "step_time_s": statistics.median(step_times[-cfg.train.log_interval :]),
                "lr": scheduler.get_last_lr()[0],
                **{f"train_loss/{lang}": (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, lang in enumerate(languages)},
            }
            if rank == 0:
                log.info(
                    "step %d/%d  loss %.4f  %.0f tokens/s  %.3f s/step",
                    step, cfg.train.steps, metrics["train_loss"], metrics["tokens_per_s"], metrics["step_time_s"],
                )
                log_metrics(metrics_writer, metrics, step)
            window.zero_()
            window_start = time.perf_counter()

        if step % cfg.train.eval_interval == 0 or last:
            adapted = evaluate(engine.module, task, to_adapter, batch_size, device, rank, world)
            scores = task.score(engine.module, to_adapter, rank, world, batch_size, device)
            metrics = {
                **eval_metrics("eval", adapted, scores),
                **eval_metrics("base_eval", base_eval, base_scores),
                "step": step,
                "resumed_from_step": start_step,
                "step_time_median_s": statistics.median(step_times),
            }
            if rank == 0:
                log.info("step %d eval: %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items() if "/" in k and "perplexity" not in k}))
                log_metrics(metrics_writer, metrics, step)
            state = {"step": step, "base_eval": base_eval, "base_scores": base_scores, "languages": languages}
            report(banks, names, {**metrics, **report_extras()}, state, rank)
    if metrics_writer:
        metrics_writer.close()  # sends what an MLflow outage held back


def report(banks, names, metrics, state, rank) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the adapters-only checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_checkpoint(tmp, banks, names, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def metric_writer(loop_config: dict):
    """Rank 0's writer of metrics over time into the job's MLflow run (None without a run):
    best-effort, so an MLflow outage delays or drops points but never stops training (see
    `tracking.MetricWriter`)."""
    run_id = loop_config.get("mlflow_run_id")
    if not run_id:
        return None
    from flora_platform.tracking import MetricWriter, client_for

    return MetricWriter(client_for(loop_config["tracking_uri"]), run_id)


def log_metrics(writer, metrics: dict, step: int) -> None:
    if writer:
        writer.log(metrics, step)


# --------------------------------------------------------------------------- the trainer


def build_trainer(
    cfg: FinetuneConfig, loop_config: dict, *, name: str, storage_path: str | None = None,
    callbacks: list | None = None,
):
    """A `TorchTrainer` running `train_loop_per_worker` with the config's scaling and fault tolerance.

    `name`: the run's directory under the storage path (the fine-tuning job names it per MLflow
    run, a search per trial). `callbacks`: Ray Train `UserCallback`s, e.g. Tune's `TuneReportCallback` when a search trial runs it.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = cfg.scaling
    # DeepSpeed picks its accelerator when imported: tell the workers which one before they start.
    env = {"DS_ACCELERATOR": "cuda" if scaling.use_gpu else "cpu"}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path or cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
        ),
    )
