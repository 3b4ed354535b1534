"""Fine-tuning on Ray Train + DeepSpeed: one adapter per language, trained in shared mixed batches.

`train_loop_per_worker` is the whole worker: load the base model, inject adapter banks, start
every adapter at the base model (or from the last checkpoint: adapters, optimizer, scheduler, RNG
and data position, so a resumed run continues exactly), then DeepSpeed steps over the adapter
rows only. Each example is routed through its language's adapter, so N adapters train
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
from flora_platform.preflight import adapter_targets
from flora_platform.speech.training import SpeechTask
from flora_platform.streaming import TrainStream

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
    if t.zero_stage == 3:
        # ZeRO-3 partitions every parameter of the model, the frozen base included (1/world of
        # each tensor per rank) and all-gathers a module's own parameters around its forward and
        # backward. An `AdaptedLinear` reads its child's `base.weight` without calling the child:
        # DeepSpeed's external-parameter discovery gathers it on the first access and registers
        # it with the adapted layer, whose hooks fetch it from then on (tests/flora_platform/
        # test_finetune_zero3.py). Not `leaf_module`: with the adapted layers as leaves the
        # backward sees empty bank gradients. How many gathered parameters stay whole at once
        # is pinned here, as `memory.estimate_memory` counts them.
        from flora_platform.memory import ZERO3_LIVE_PARAMETERS, ZERO3_PREFETCH_PARAMETERS

        config["zero_optimization"].update(
            stage3_max_live_parameters=ZERO3_LIVE_PARAMETERS, stage3_prefetch_bucket_size=ZERO3_PREFETCH_PARAMETERS,
        )
    if t.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def empty_parameters_to_buffers(model: torch.nn.Module) -> None:
    """Hold the model's empty parameters (the LoRA banks of a FLoRA run, sized for no rows) as
    buffers: ZeRO-3 partitions and all-gathers every parameter and cannot gather an empty one."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.numel() == 0:
                del module._parameters[name]
                module.register_buffer(name, param.data)


def gathered_adapters(banks: flora.AdapterBanks):
    """A context in which this rank holds every adapter bank whole, to read (export) them.

    Under ZeRO-3 the banks are partitioned like the base: outside a forward a rank holds 1/world
    of each (`param.data` is empty). Every rank must enter it together (it all-gathers, read-only:
    nothing is written back); without ZeRO-3 it does nothing.
    """
    import contextlib

    params = [p for layer in banks.layers.values() for p in layer.parameters(recurse=False)]
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


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


def causal_row_losses(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's ([B] summed next-token loss, [B] predicted tokens) on packed `input_ids` [B, L]."""
    ids = inputs["input_ids"]
    losses = per_row_token_losses(model(input_ids=ids, use_cache=False).logits, ids)  # no generation: no KV cache
    return losses, torch.full_like(losses, ids.shape[1] - 1)


class TextTask:
    """Causal code models on packed token blocks: next-token loss at every position. Training
    blocks stream through Ray Data (`flora_platform.streaming`); held-out blocks are in memory."""

    def __init__(self, loop_config: dict):
        import ray

        self.loop_config = loop_config
        self.eval_blocks = ray.get(loop_config["eval_blocks"])  # lang -> [n, L]
        self.languages = sorted(self.eval_blocks)

    def load_model(self, base_path: str, dtype: str):
        return load_base(base_path, dtype=dtype)[0]

    def batches(self, batch_size, seed, rank, world, start_step):
        import ray

        lc = self.loop_config
        cfg = from_dict(FinetuneConfig, lc["config"])
        stream = TrainStream(
            lc["train_sources"], tokenizer_path=lc["base_path"], held_out=ray.get(lc["held_out"]),
            seq_len=cfg.train.seq_len, batch_size=batch_size, seed=seed, rank=rank, world=world,
            data=cfg.data,
        )
        for ids, langs in stream.batches(start_step):
            yield {"input_ids": ids}, langs

    @staticmethod
    def row_losses(model, inputs):
        return causal_row_losses(model, inputs)

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
        batches = list(task.eval_batches(lang, rank, world, batch_size))
        # Under ZeRO-3 every forward all-gathers the base with the other ranks: each rank runs as
        # many as the busiest one, the extra ones on a batch whose losses are not counted.
        counts = torch.zeros(world, dtype=torch.float64)
        counts[rank] = len(batches)
        extra = int(all_reduce_sum(counts).max().item()) - len(batches)
        filler = next(iter(task.eval_batches(lang, 0, 1, batch_size))) if extra else None
        for n, inputs in enumerate(batches + [filler] * extra):
            inputs = to_device(inputs, device)
            rows = next(iter(inputs.values())).shape[0]
            with flora.route(model, [route_names(lang)] * rows):
                row_losses, row_tokens = task.row_losses(model, inputs)
            if n < len(batches):
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
    start_step, state, rank_state = 0, {}, None
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = ckpt.load_checkpoint(d, banks)
            rank_state = ckpt.load_rank_state(d, rank)
        start_step = state["step"]
        check_resumable(state, rank_state, world, start_step)
        log.info("rank %d: resuming from step %d", rank, start_step)

    params = banks.trainable_parameters(names)
    # No weight decay: it would pull the masked (other slots') rows, e.g. the base slot's ones, to zero.
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.train.warmup_steps)
    # An adapters-only checkpoint has no scheduler state: restart the schedule at its step.
    offset = start_step if resumed and rank_state is None else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1 + offset) / warmup))
    if cfg.train.zero_stage == 3:
        empty_parameters_to_buffers(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler,
        config=deepspeed_config(cfg), dist_init_required=False,
    )
    # This rank's share of the train loss since the last logged step: [n_lang, 2].
    window = torch.zeros(len(languages), 2, dtype=torch.float64)
    if rank_state is not None:
        restore_training_state(engine, scheduler, rank_state, rank, world)
        window = rank_state["window"]

    batch_size = cfg.train.batch_size
    base = lambda lang: None  # noqa: E731
    base_eval = state.get("base_eval") or evaluate(engine.module, task, base, batch_size, device, rank, world)
    base_scores = state.get("base_scores")
    if base_scores is None:
        base_scores = task.score(engine.module, base, rank, world, batch_size, device)
    # The held-out metrics of the adapters so far, sent with reports between evaluations (a
    # search's scheduler needs its metric in every report); at step 0 the adapters are the base.
    last_eval = state.get("last_eval") or {
        **eval_metrics("eval", base_eval, base_scores), **eval_metrics("base_eval", base_eval, base_scores), "step": 0,
    }
    if start_step >= cfg.train.steps:
        # The run had checkpointed its last step when it was stopped (a job or a search
        # interrupted while that report was on its way): nothing is left to train, but whoever
        # waits on this run (the job, Tune) must see it end there, so the last report goes again.
        log.info("rank %d: the checkpoint is the run's last step (%d): reporting it again", rank, start_step)
        attempt = {"resumed_from_step": start_step}
        if rank == 0 and (writer := metric_writer(loop_config)):
            log_metrics(writer, attempt, start_step, set())
            writer.close()
        report(banks, names, {**last_eval, **attempt, **report_extras()}, state,
               training_state(engine, scheduler, start_step, window), rank)
        return
    batches = task.batches(batch_size, cfg.train.seed, rank, world, start_step)
    step_times: list[float] = []
    window_start = time.perf_counter()
    metrics_writer = metric_writer(loop_config) if rank == 0 else None
    # Points the MLflow run already holds: those of the steps a worker logged after its last
    # checkpoint and before it died. Resuming is exact, so this run would log the same losses
    # again; it skips them instead, and the run holds each step once.
    logged = logged_points(loop_config) if rank == 0 else set()
    for step in range(start_step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        inputs, langs = next(batches)
        row_losses, row_tokens = train_step(engine, task, to_device(inputs, device), [to_adapter(lang) for lang in langs])
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
                log_metrics(metrics_writer, metrics, step, logged)
            window.zero_()
            window_start = time.perf_counter()

        evaluating = step % cfg.train.eval_interval == 0 or last
        if evaluating:
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
                log_metrics(metrics_writer, metrics, step, logged)
            last_eval = metrics
        if evaluating or step % cfg.train.checkpoint_every == 0:
            # Every report carries a checkpoint: the last one is then never older than the last
            # evaluation, and every worker reports the same number of times (report is a barrier).
            state = {
                "step": step, "world_size": world, "base_eval": base_eval, "base_scores": base_scores,
                "languages": languages, "last_eval": last_eval,
            }
            metrics = last_eval if evaluating else {**last_eval, "checkpoint_step": step}
            own = training_state(engine, scheduler, step, window)
            report(banks, names, {**metrics, **report_extras()}, state, own, rank)
    if metrics_writer:
        metrics_writer.close()  # sends what an MLflow outage held back


def train_step(engine, task, inputs: dict, route: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step over a mixed batch, row i through adapter `route[i]`: the mean token
    loss of the batch, backward, optimizer step. `engine` is DeepSpeed's (or anything with its
    `module`, `__call__`, `backward(loss)` and `step()`). Returns the rows' (summed loss, tokens)."""
    with flora.route(engine.module, route):
        row_losses, row_tokens = task.row_losses(engine, inputs)
        loss = row_losses.sum() / row_tokens.sum().clamp(min=1)
        engine.backward(loss)
    engine.step()
    return row_losses, row_tokens


def training_state(engine, scheduler, step: int, window: torch.Tensor) -> dict:
    """What this rank needs, besides the adapters, to continue after `step` as if never stopped."""
    return {
        "step": step,
        "optimizer": engine.optimizer.state_dict(),  # under ZeRO: this rank's partition
        "scheduler": scheduler.state_dict(),
        "rng": ckpt.rng_states(),
        "window": window.clone(),  # train-loss sums not yet logged
    }


def report(banks, names, metrics, state, rank_state, rank) -> None:
    """Every worker reports (it is a barrier) a checkpoint with its own `rank_state`; rank 0's
    also holds the adapters and `state`. Ray Train merges the workers' files into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        with gathered_adapters(banks):  # every rank: under ZeRO-3 an all-gather
            if rank == 0:
                ckpt.save_checkpoint(tmp, banks, names, state)
        ckpt.save_rank_state(tmp, rank, rank_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def check_resumable(state: dict, rank_state: dict | None, world: int, step: int) -> None:
    saved_world = state.get("world_size", world)
    if saved_world != world:
        # Each rank's optimizer file holds its ZeRO partition, cut for the saved world size.
        raise ValueError(
            f"the checkpoint at step {step} was written by {saved_world} workers and {world} resume it; "
            f"set scaling.num_workers={saved_world}, or start a new run (run.name)"
        )
    if rank_state is None:
        log.warning("the checkpoint at step %d holds the adapters only: the optimizer's moments restart "
                    "from zero and the learning-rate schedule from its step", step)
    else:
        assert rank_state["step"] == step, (rank_state["step"], step)


def restore_training_state(engine, scheduler, rank_state: dict, rank: int, world: int) -> None:
    """Load this rank's optimizer state (its shard under ZeRO), scheduler and RNG states."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, ZeROOptimizer):
        # ZeRO's loader takes every rank's state and picks its own; the fp32 masters come from
        # the checkpoint, not from the (possibly bf16) adapters, so nothing is rounded.
        shards = [rank_state["optimizer"] if r == rank else None for r in range(world)]
        optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(rank_state["optimizer"])
    scheduler.load_state_dict(rank_state["scheduler"])
    ckpt.set_rng_states(rank_state["rng"])


def metric_writer(loop_config: dict):
    """Rank 0's writer of metrics over time into the job's MLflow run (None without a run):
    best-effort, so an MLflow outage delays or drops points but never stops training (see
    `tracking.MetricWriter`)."""
    run_id = loop_config.get("mlflow_run_id")
    if not run_id:
        return None
    from flora_platform.tracking import MetricWriter, client_for

    return MetricWriter(client_for(loop_config["tracking_uri"]), run_id)


def logged_points(loop_config: dict) -> set[tuple[str, int]]:
    """(key, step) of every metric point the job's MLflow run holds; empty without a run, or
    (with a warning) when MLflow does not answer: then replayed steps may be logged twice."""
    run_id = loop_config.get("mlflow_run_id")
    if not run_id:
        return set()
    from flora_platform.tracking import client_for, mlflow_http

    client = client_for(loop_config["tracking_uri"])
    try:
        with mlflow_http(max_retries=2, timeout_s=10):
            keys = client.get_run(run_id).data.metrics
            return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}
    except Exception as err:  # noqa: BLE001 - best effort, like MetricWriter: training goes on
        log.warning("MLflow run %s: could not read its metrics (%s); steps replayed since the last "
                    "checkpoint may be logged twice", run_id, err)
        return set()


# Figures of the attempt, not of the training: a replayed step logs them anew (the latest point
# at a step is the newest), so a resumed run's evaluations say where it resumed from.
ATTEMPT_METRICS = frozenset({"resumed_from_step"})


def log_metrics(writer, metrics: dict, step: int, logged: set[tuple[str, int]]) -> None:
    """Log the points of `metrics` at `step` that the run does not hold yet (`logged`); those of
    `ATTEMPT_METRICS` always."""
    new = {key: value for key, value in metrics.items() if key in ATTEMPT_METRICS or (key, step) not in logged}
    if writer and new:
        writer.log(new, step)


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
    # Torch threads per worker as Ray's default gives them (its CPUs, at least 1), also where the
    # cluster's environment sets OMP_NUM_THREADS: float sums, and so the adapters, depend on it.
    env["OMP_NUM_THREADS"] = str(max(1, math.floor(scaling.cpus_per_worker)))
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
