"""The generation engine: continuous batching over a paged KV pool, every request on its own adapter.

    engine = Engine(model, loader=DirectoryLoader("adapters"), config=EngineConfig(max_batch_rows=32))
    outputs = engine.generate([Request(prompt_ids, adapter="julia", max_new_tokens=64), ...])

    engine.start()                                   # or: a background thread of your own runs
    handle = engine.add_request(Request(...))        #     engine.run_forever()
    for event in handle: ...                         # tokens as they come; handle.cancel() stops it
    engine.close()

One step (`step()`, on the engine thread):
  1. take new requests, finished adapter loads, cancellations and stop-string hits;
  2. plan (`Scheduler.schedule`): every decoding row, prompt chunks of prefilling rows, newly
     admitted requests (their adapter slots pinned), within the row and token budgets; blocks
     for all of them, preempting the newest rows when the pool is short;
  3. one packed forward over all of those tokens (`ModelRunner`), each token through its own
     adapter slot, attention reading the KV pool through block tables;
  4. draw the next token of every row whose chunk reached its end (`sampling.sample`, on the
     device, one read back to the host);
  5. record the step in the batch arrays, put newly full blocks in the prefix cache, retire the
     rows that finished, and hand the tokens to the output side (`OutputProcessor`: streaming,
     stop strings, final outputs), on its own thread when the loop runs in the background.
Greedy outputs equal `generate` on the model with the request's adapter merged in, whatever
else shares the batch.

Failures stay with their request: if a forward fails, the step's rows run again one by one
and only those that fail alone fail; an error while delivering one request's tokens fails that
request. The engine goes on in every case. What it cannot fix alone (a device error that fails
every forward, a kernel that never returns) shows in two figures a supervisor reads from any
thread: `last_ok_step_s`, when a step last ended without every forward failing (a step that
ran no forward counts: the loop turns), and `failed_steps`, how many steps that ran the model
in a row had every forward fail (or raised), steps without a forward in between not counting.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence as Seq
from dataclasses import dataclass

import torch

import flora
from flora.engine.attention import BACKENDS, select_backend
from flora.engine.batch import BatchState, StepPlan
from flora.engine.kv_cache import BlockManager, KVPool
from flora.engine.metrics import EngineMetrics
from flora.engine.models import IMPLS, Linears, build_decoder
from flora.engine.outputs import Ended, OutputProcessor, OutputThread, TokenBatch
from flora.engine.request import Request, RequestHandle, RequestOutput, RequestRejected, check_request
from flora.engine.runner import GRAPH_MODES, ModelRunner
from flora.engine.sampling import sample
from flora.engine.scheduler import Admission, Scheduler, Sequence
from flora.engine.slots import AdapterUnavailable, Loader, SlotManager

log = logging.getLogger(__name__)

SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class StepStats:
    """A step that ran the model: its wall time, the part in the model's forward and the sampler
    (`model_s`; the rest, `host_s`, is host work: scheduling, inputs, bookkeeping), its rows
    and tokens, how many tokens it drew, and the keys its attention read (`context_tokens`)."""

    wall_s: float
    model_s: float
    rows: int
    tokens: int
    drawn: int
    context_tokens: int

    @property
    def host_s(self) -> float:
        return self.wall_s - self.model_s


@dataclass(frozen=True)
class EngineConfig:
    """max_batch_rows: requests running (prefilling or decoding) at once.
    max_batch_tokens: tokens one step computes: one per decoding row plus prefill chunks.
    eos_token_ids: stop tokens of every request (unless it sets ignore_eos); None takes the
        model's `generation_config.eos_token_id`.
    load_threads: adapters loading at once, each on its own background thread.
    idle_wait_s: how long an idle engine thread sleeps before looking again (new requests,
        cancellations and finished loads wake it at once).
    block_size: tokens per KV block. kv_cache_tokens: the pool's size in tokens; None sizes it:
        on CUDA `kv_memory_fraction` of the memory free after loading the model, less room for
        activations; elsewhere room for every row at the full context, at most `cpu_kv_cache_gb`.
    prefix_caching: reuse the KV blocks of a prompt prefix seen before under the same adapter.
    attention: "auto" (Triton on CUDA, PyTorch ops elsewhere), "torch" or "triton".
    model_impl: "auto" (our forward for llama-family and gpt_bigcode models, Hugging Face's with
        our attention for others), "native" or "hf".
    cpu_matmul: "auto" (oneDNN with prepacked weights on CPU, see `flora.engine.models.linear`;
        a second copy of the linear weights), "onednn" or "torch" (PyTorch's own, no copy).
    graphs: CUDA graphs for decode steps, "auto" (on CUDA), "off", or "static" (the same static
        buffers without capture, on any device: for tests). max_graph_rows: the largest batch
        captured (default: max_batch_rows, at most 256).
    max_model_len: cap on prompt + output tokens (default: the model's context).
    output_thread: deliver tokens (streams, stop strings, outputs) from a thread of their own
        while the loop runs in the background: "auto" does so on CUDA, where the device computes
        while host threads are free; on a CPU the forward already uses every core, so there the
        engine thread delivers them itself between steps.
    """

    max_batch_rows: int = 32
    max_batch_tokens: int = 512
    eos_token_ids: tuple[int, ...] | None = None
    load_threads: int = 4
    idle_wait_s: float = 0.05
    block_size: int = 16
    kv_cache_tokens: int | None = None
    kv_memory_fraction: float = 0.9
    cpu_kv_cache_gb: float = 4.0
    prefix_caching: bool = True
    attention: str = "auto"
    model_impl: str = "auto"
    cpu_matmul: str = "auto"
    graphs: str = "auto"
    max_graph_rows: int | None = None
    max_model_len: int | None = None
    output_thread: str | bool = "auto"

    def __post_init__(self):
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows={self.max_batch_rows}: must be >= 1")
        if self.max_batch_tokens < self.max_batch_rows:
            raise ValueError(
                f"max_batch_tokens={self.max_batch_tokens} < max_batch_rows={self.max_batch_rows}: "
                "every row needs at least one token per step; raise max_batch_tokens"
            )
        if self.load_threads < 1:
            raise ValueError(f"load_threads={self.load_threads}: must be >= 1")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size}: must be a power of two")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens}: must hold at least one block ({self.block_size})")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction={self.kv_memory_fraction}: must be in (0, 1]")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention={self.attention!r}: choose one of {BACKENDS}")
        if self.model_impl not in IMPLS:
            raise ValueError(f"model_impl={self.model_impl!r}: choose one of {IMPLS}")
        if self.cpu_matmul not in ("auto", "torch", "onednn"):
            raise ValueError(f"cpu_matmul={self.cpu_matmul!r}: choose one of ('auto', 'torch', 'onednn')")
        if self.graphs not in GRAPH_MODES:
            raise ValueError(f"graphs={self.graphs!r}: choose one of {GRAPH_MODES}")
        if self.output_thread not in ("auto", True, False):
            raise ValueError(f"output_thread={self.output_thread!r}: choose 'auto', True or False")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len}: must be >= 2")
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))


class Engine:
    """Continuous batching where every row may use a different adapter (see the module docstring).

    model: a decoder-only Hugging Face causal LM in eval mode, with `flora.inject` applied if
        requests name adapters. loader: `name -> flora.Adapter` for adapters not in the banks
        (e.g. `DirectoryLoader(root)`); None serves only what is loaded already.
    detokenize: token ids -> text (e.g. `tokenizer.decode`), needed for stop strings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        loader: Loader | None = None,
        config: EngineConfig | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        model_config = model.config
        if getattr(model_config, "is_encoder_decoder", False):
            raise ValueError(
                f"{model_config.model_type} is an encoder-decoder model: the engine serves decoder-only models"
            )
        if model.training:
            raise ValueError(
                "the model is in training mode (dropout would make outputs random): call model.eval() first"
            )
        self.model = model
        self.config = cfg = config or EngineConfig()
        self.detokenize = detokenize
        try:
            self.banks = flora.banks_of(model)
        except ValueError:
            self.banks = None  # a plain model: base-model requests only
        self.context_len = min(_context_len(model_config), cfg.max_model_len or math.inf)
        self.vocab_size = model_config.vocab_size
        embeddings = model.get_input_embeddings().weight
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self.eos_token_ids = frozenset(cfg.eos_token_ids if cfg.eos_token_ids is not None else _model_eos(model))

        linears = Linears.build(model, "onednn" if cfg.cpu_matmul in ("auto", "onednn") else "torch")
        self.decoder = build_decoder(model, linears, cfg.model_impl, max_positions=self.context_len)
        num_layers = model_config.num_hidden_layers
        per_block = KVPool.bytes_per_block(num_layers, cfg.block_size, self.decoder.kv_heads, self.decoder.head_dim, self.dtype)
        num_blocks = self._pool_blocks(per_block)
        self.blocks = BlockManager(num_blocks, cfg.block_size, prefix_caching=cfg.prefix_caching)
        self.pool = KVPool.allocate(num_layers, num_blocks, cfg.block_size, self.decoder.kv_heads,
                                    self.decoder.head_dim, self.dtype, self.device)
        # The longest sequence: the context, or what the pool holds alone (+1: the last token
        # drawn is never computed).
        self.max_seq_len = int(min(self.context_len, self.blocks.usable_blocks * cfg.block_size + 1))
        if self.max_seq_len < self.context_len:
            log.warning("the KV pool holds %d tokens per sequence, less than the context (%d): raise kv_cache_tokens",
                        self.max_seq_len - 1, self.context_len)
        self.batch = BatchState(cfg.max_batch_rows, self.max_seq_len, cfg.block_size)
        self.scheduler = Scheduler(self.batch, self.blocks, cfg.max_batch_tokens, admit=self._admit,
                                   release=self._release_adapter, adapter_key=self._adapter_key)
        self.runner = ModelRunner(
            self.decoder, self.banks, self.pool, select_backend(cfg.attention, self.device), self.device,
            linear=linears.route_linear(), graphs=cfg.graphs, max_graph_rows=min(cfg.max_graph_rows or cfg.max_batch_rows, 256),
            max_blocks_per_seq=self.batch.max_blocks,
        )

        self._wake = threading.Event()
        self.slots = SlotManager(self.banks, loader, load_threads=cfg.load_threads, on_loaded=self._wake.set)
        self.metrics = EngineMetrics()
        self.outputs = OutputProcessor(self.metrics, detokenize, on_stop=self._request_stop)
        threaded = cfg.output_thread is True or (cfg.output_thread == "auto" and self.device.type == "cuda")
        self._output_thread = OutputThread(self.outputs) if threaded else None
        self._inbox: deque[Sequence] = deque()
        self._cancels: deque[Sequence] = deque()
        self._stops: deque[Sequence] = deque()  # ended by the output side (stop string, error)
        self._inbox_lock = threading.Lock()
        self._arrivals = 0
        self._step_lock = threading.Lock()
        self._runner: threading.Thread | None = None  # the thread in run_forever, if any
        self._stop = threading.Event()
        self._closed = False
        self.step_stats: deque[StepStats] = deque(maxlen=4096)  # the latest steps that ran the model
        # Health, read from other threads (plain attribute reads; see the module docstring).
        self.last_ok_step_s = time.monotonic()  # a step that ran no model (idle, loading) counts as ok
        self.failed_steps = 0
        self._forwards_ok = 0  # forwards of the current step that succeeded

    # ------------------------------------------------------------------ any thread

    def add_request(self, request: Request) -> RequestHandle:
        """Queue a request; raise `RequestRejected` (naming the field) if it cannot run."""
        if not isinstance(request, Request):
            raise TypeError(f"add_request takes a flora.engine.Request, got {type(request).__name__}")
        if self._closed:
            raise RuntimeError("the engine is closed")
        try:
            check_request(
                request, context_len=self.context_len, vocab_size=self.vocab_size,
                can_detokenize=self.detokenize is not None,
            )
            if len(request.prompt) >= self.max_seq_len:
                raise RequestRejected(
                    f"prompt has {len(request.prompt)} tokens but the KV cache holds at most {self.max_seq_len - 1} "
                    f"per sequence ({self.blocks.usable_blocks} blocks of {self.blocks.block_size}): shorten the "
                    "prompt or raise EngineConfig.kv_cache_tokens"
                )
            self.slots.check(request.adapter)
        except RequestRejected:
            self.metrics.record_rejected()
            raise
        handle = RequestHandle(request)
        sampling = request.sampling
        seed = sampling.seed & SEED_MASK if sampling.seed is not None else secrets.randbits(62)
        stop_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else self.eos_token_ids)
        with self._inbox_lock:
            self._arrivals += 1
            seq = Sequence(request, handle, self._arrivals, time.monotonic(), stop_ids, seed,
                           tokens=list(request.prompt), num_prompt=len(request.prompt))
            handle._on_cancel = lambda: self._request_cancel(seq)
            self._inbox.append(seq)
        self._wake.set()
        return handle

    def unload_adapter(self, name: str) -> bool:
        """Unload `name` from the banks between two steps; returns False if it was not resident.

        Raises `AdapterInUse` while an admitted request uses it. Waiting requests for it load it again.
        """
        with self._step_lock:
            return self.slots.unload(name)

    def generate(self, requests: Iterable[Request]) -> list[RequestOutput]:
        """Run these requests to the end and return their outputs in order (failed ones included)."""
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(self.add_request(request))
        except Exception:
            for h in handles:
                h.cancel()
            raise
        if self._runner is None:
            while not all(h.done for h in handles):
                if not self.step():
                    self._idle()
        return [h.result() for h in handles]

    def start(self) -> Engine:
        """Run the step loop on a background thread until `stop()` or `close()`."""
        if self._runner is not None:
            raise RuntimeError("the engine is already running")
        self._stop.clear()
        thread = threading.Thread(target=self.run_forever, name="flora-engine", daemon=True)
        self._runner = thread
        thread.start()
        return self

    def run_forever(self) -> None:
        """Step whenever there is work, sleep otherwise, until `stop()`; runs on the calling thread."""
        self._runner = threading.current_thread()
        try:
            while not self._stop.is_set():
                try:
                    busy = self._locked_step()
                except Exception as err:  # noqa: BLE001 - a bug must not kill serving silently
                    log.exception("engine step failed; failing the requests in flight")
                    self.failed_steps += 1
                    with self._step_lock:
                        self._fail_all(f"engine step failed: {err!r}")
                    busy = False
                if not busy:
                    self._idle()
        finally:
            self._runner = None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the step loop (requests in flight stay queued; `start()` resumes them)."""
        runner = self._runner
        self._stop.set()
        self._wake.set()
        if runner is not None and runner is not threading.current_thread():
            runner.join(timeout_s)

    def close(self) -> None:
        """Stop, cancel what is still in flight, and shut the loader threads down."""
        self.stop()
        self._closed = True
        with self._step_lock:
            self._take_inbox()
            self._fail_all("the engine was closed", reason="cancelled")
            if self._output_thread is not None:
                self._output_thread.close()  # after delivering everything put before
                self._output_thread = None
        self.slots.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.batch.running or self._cancels or self._stops)

    def _request_cancel(self, seq: Sequence) -> None:
        self._cancels.append(seq)
        self._wake.set()

    def _request_stop(self, seq: Sequence) -> None:
        self._stops.append(seq)
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread

    def step(self) -> bool:
        """Run one iteration (see the module docstring); returns whether anything ran."""
        runner = self._runner
        if runner is not None and runner is not threading.current_thread():
            raise RuntimeError("the engine runs on its own thread (start/run_forever): do not call step() too")
        return self._locked_step()

    def _locked_step(self) -> bool:
        with self._step_lock:
            return self._step()

    def _step(self) -> bool:
        started = time.perf_counter()
        self._take_inbox()
        self._collect_loads()
        busy = self._take_cancels()
        plan = self.scheduler.schedule()
        generated = prompt_tokens = 0
        model_s = None
        if plan is not None:
            busy = True
            self._forwards_ok = 0
            generated, prompt_tokens, context_tokens, model_s = self._run(plan)
        if plan is not None and not self._forwards_ok:
            self.failed_steps += 1  # every forward of this step failed, its rows alone too
        else:  # a step without a forward (idle, waiting for a load) keeps the count: one request
            if plan is not None:  # at a time under a sticky fault must still add up
                self.failed_steps = 0
            self.last_ok_step_s = time.monotonic()
        running = self.batch.running
        prefilling = self.scheduler.prefilling
        stats = None
        if plan is not None:
            stats = StepStats(time.perf_counter() - started, model_s, len(plan.rows), plan.num_tokens, generated,
                              context_tokens)
            self.step_stats.append(stats)
        self.metrics.record_step(
            time.monotonic(), generated, prompt_tokens, host_s=None if stats is None else stats.host_s,
            queue_length=len(self.scheduler.waiting), running_rows=running, prefilling_rows=prefilling,
            decoding_rows=running - prefilling, adapters_resident=len(self.slots.resident),
            adapters_loading=self.slots.loading, evictions=self.slots.evictions,
            kv_blocks_total=self.blocks.usable_blocks, kv_blocks_free=self.blocks.free_blocks,
            prefix_cache_hit_blocks=self.blocks.hits, preemptions=self.scheduler.preemptions,
        )
        return busy

    def _run(self, plan: StepPlan) -> tuple[int, int, int, float]:
        """Forward and draw for `plan`; returns tokens drawn, prompt tokens computed, keys read,
        and seconds in the model and the sampler.

        A failure reruns the plan's rows one by one, so that only the rows that fail alone fail
        (nothing is recorded for a failed forward: keys it wrote lie past what the rows computed).
        """
        inputs = self.batch.inputs(plan)
        try:
            logits = self.runner.forward(inputs)
            started = time.perf_counter()
            sampled = sample(logits, inputs.sampling)  # reads the tokens back: waits for the device
            model_s = self.runner.compute_s + time.perf_counter() - started
            self._forwards_ok += 1
        except Exception as err:  # noqa: BLE001 - fails the rows at fault, not the engine
            if len(plan.rows) > 1:
                log.warning("a forward of %d rows failed (%r); running them one by one", len(plan.rows), err)
                results = [self._run(plan.subset([i])) for i in range(len(plan.rows)) if self.batch.active[plan.rows[i]]]
                return tuple(sum(r[k] for r in results) for k in range(4))
            seq = self.batch.seqs[int(plan.rows[0])]
            log.exception("forward failed for request %s", seq.request.request_id)
            self._end(seq, "error", f"forward failed: {err!r}")
            return 0, 0, 0, 0.0
        now = time.monotonic()
        done = self.batch.advance(plan, inputs.sample_rows, sampled.tokens, now)
        self.metrics.record_tokens(done.ttft_s.tolist(), done.gaps_s.tolist())
        self.scheduler.register_full_blocks(plan)
        seqs = [self.batch.seqs[r] for r in inputs.sample_rows.tolist()]
        for i in (done.stopped | done.length).nonzero()[0].tolist():
            self.scheduler.finish(seqs[i])
        self._deliver(TokenBatch(seqs, sampled, done.stopped, done.length, now))
        return len(seqs), inputs.prompt_tokens, inputs.context_tokens, model_s

    def _deliver(self, item) -> None:
        if self._output_thread is not None:
            self._output_thread.put(item)
        else:
            self.outputs.process(item)

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End a request that gets no further token: free what it holds, tell its caller."""
        if seq.state == "done":
            return
        self.scheduler.finish(seq)
        self._deliver(Ended(seq, reason, error))

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            arrived, self._inbox = list(self._inbox), deque()
        for seq in arrived:
            self.scheduler.add(seq)
            self.slots.prefetch(seq.request.adapter)

    def _collect_loads(self) -> None:
        for name, error in self.slots.poll().items():
            for seq in [s for s in self.scheduler.waiting if s.request.adapter == name]:
                self._end(seq, "error", error)

    def _take_cancels(self) -> bool:
        busy = bool(self._cancels or self._stops)
        while self._cancels:
            self._end(self._cancels.popleft(), "cancelled")
        while self._stops:  # the output side already ended these: only free what they hold
            seq = self._stops.popleft()
            if seq.state != "done":
                self.scheduler.finish(seq)
        return busy

    def _admit(self, seq: Sequence) -> Admission:
        try:
            status, slot = self.slots.acquire(seq.request.adapter)
        except AdapterUnavailable as err:
            seq.state = "done"
            self._deliver(Ended(seq, "error", str(err)))
            return Admission.FAILED
        if status is Admission.READY:
            seq.slot = slot
        return status

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.slots.release(seq.request.adapter)
            seq.slot = None

    def _adapter_key(self, slot: int) -> int:
        return 0 if self.banks is None else self.banks.load_id(slot)

    def _fail_all(self, error: str, reason: str = "error") -> None:
        """End every request in flight (after an unexpected error, or on close)."""
        running = [s for s in self.batch.seqs if s is not None]
        for seq in [*self.scheduler.waiting, *running, *self._cancels]:
            self._end(seq, reason, error)
        self._cancels.clear()
        self._stops.clear()

    def _idle(self) -> None:
        self._wake.wait(self.config.idle_wait_s)
        self._wake.clear()

    # ------------------------------------------------------------------ sizing

    def _pool_blocks(self, bytes_per_block: int) -> int:
        """Blocks of the KV pool (block 0, the scratch block, included)."""
        cfg = self.config
        one_sequence = -(-int(self.context_len) // cfg.block_size)
        if cfg.kv_cache_tokens is not None:
            return 1 + -(-cfg.kv_cache_tokens // cfg.block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cfg.kv_memory_fraction - _activation_bytes(self.model.config, cfg, self.dtype)
            blocks = int(budget // bytes_per_block)
            if blocks < one_sequence:
                raise ValueError(
                    f"after the model and its activations, {max(budget, 0) / 2**30:.2f} GiB is left for the KV "
                    f"cache: not one sequence of {int(self.context_len)} tokens; lower max_batch_tokens or "
                    "max_model_len, or raise kv_memory_fraction"
                )
            return 1 + blocks
        want = cfg.max_batch_rows * one_sequence
        cap = int(cfg.cpu_kv_cache_gb * 2**30 // bytes_per_block)
        return 1 + max(min(want, cap), one_sequence)


def _activation_bytes(model_config, cfg: EngineConfig, dtype: torch.dtype) -> float:
    """A generous estimate of one step's activations, the logits and sampling's copies of them,
    and room for CUDA graphs and the allocator's slack."""
    hidden = model_config.hidden_size
    inner = getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None) or 4 * hidden
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (8 * hidden + 3 * inner) * element
    logits = cfg.max_batch_rows * model_config.vocab_size * 4 * 6
    return cfg.max_batch_tokens * per_token + logits + 2**30


def _context_len(config) -> int:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {config.model_type}: set config.max_position_embeddings")


def _model_eos(model) -> Seq[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)
