"""The generation engine: continuous batching over a Hugging Face decoder with adapter banks.

    engine = Engine(model, loader=DirectoryLoader("adapters"), config=EngineConfig(max_batch_rows=32))
    outputs = engine.generate([Request(prompt_ids, adapter="julia", max_new_tokens=64), ...])

    engine.start()                                   # or: a background thread of your own runs
    handle = engine.add_request(Request(...))        #     engine.run_forever()
    for event in handle: ...                         # tokens as they come; handle.cancel() stops it
    engine.close()

One step (`step()`, on the engine thread):
  1. take new requests, collect finished adapter loads, honour cancellations;
  2. plan (`Scheduler.plan`): admit waiting requests first come first served within the row
     limit and the token budget, pinning their adapter slots (copying loaded adapters in);
  3. decode: one forward over every decoding row, one new token each, rows of any adapters;
  4. prefill: one forward over this step's prompt chunks; rows whose prompt is complete
     sample their first token;
  5. retire finished rows (free their KV rows and adapter pins), let prefilled rows join the
     decode batch.
Both forwards run `with flora.route(model, slots)`, one slot per row. Per-row KV state lives in
`BatchKV` (left padded, explicit masks and positions), so each row computes what it would
alone: greedy outputs equal `generate` on the model with that row's adapter merged in.

Failures stay with their request: an error while processing one row's token (sampling,
detokenizing for stop strings) fails that request only; a failed prefill forward is run again
row by row, so that only the rows that fail alone fail; a failed decode forward fails the
decoding rows. The engine goes on in every case.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence as Seq
from dataclasses import dataclass

import torch

import flora
from flora.engine.cache import BatchKV
from flora.engine.metrics import EngineMetrics
from flora.engine.request import (
    Request,
    RequestHandle,
    RequestOutput,
    RequestRejected,
    TokenEvent,
    check_request,
)
from flora.engine.sampling import new_generator, sample_tokens, token_logprobs
from flora.engine.scheduler import Admission, Scheduler, Sequence
from flora.engine.slots import AdapterUnavailable, Loader, SlotManager, route_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """max_batch_rows: rows (requests) decoding or prefilling at once.
    max_batch_tokens: tokens one step may compute: decoding rows + padded prefill chunk tokens.
    eos_token_ids: stop tokens of every request (unless it sets ignore_eos); None takes the
        model's `generation_config.eos_token_id`.
    load_threads: adapters loading at once, each on its own background thread (a slow load
        holds one). idle_wait_s: how long an idle engine
        thread sleeps before looking again (new requests and finished loads wake it at once).
    """

    max_batch_rows: int = 32
    max_batch_tokens: int = 512
    eos_token_ids: tuple[int, ...] | None = None
    load_threads: int = 4
    idle_wait_s: float = 0.05

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
        self.config = config or EngineConfig()
        self.detokenize = detokenize
        try:
            self.banks = flora.banks_of(model)
        except ValueError:
            self.banks = None  # a plain model: base-model requests only
        self.context_len = _context_len(model_config)
        self.vocab_size = model_config.vocab_size
        self.num_layers = model_config.num_hidden_layers
        embeddings = model.get_input_embeddings().weight
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self.eos_token_ids = frozenset(
            self.config.eos_token_ids if self.config.eos_token_ids is not None else _model_eos(model)
        )

        self._wake = threading.Event()
        self.slots = SlotManager(self.banks, loader, load_threads=self.config.load_threads, on_loaded=self._wake.set)
        self.scheduler = Scheduler(self.config.max_batch_rows, self.config.max_batch_tokens)
        self.metrics = EngineMetrics()
        self.decoding: list[Sequence] = []  # aligned with the rows of `decode_kv`
        self.decode_kv = BatchKV(self.num_layers, 0, self.device)
        self._joining: list[Sequence] = []  # prompt done this step, joining the decode batch
        self._inbox: deque[Sequence] = deque()
        self._inbox_lock = threading.Lock()
        self._arrivals = 0
        self._generated = 0  # tokens produced in the current step
        self._step_lock = threading.Lock()
        self._runner: threading.Thread | None = None  # the thread in run_forever, if any
        self._stop = threading.Event()
        self._closed = False

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
            self.slots.check(request.adapter)
        except RequestRejected:
            self.metrics.record_rejected()
            raise
        handle = RequestHandle(request)
        sampling = request.sampling
        generator = None
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
            generator = new_generator(seed, self.device)
        stop_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else self.eos_token_ids)
        with self._inbox_lock:
            self._arrivals += 1
            seq = Sequence(request, handle, self._arrivals, time.monotonic(), stop_ids, generator)
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
        self.slots.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.prefilling or self.decoding)

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
        self._take_inbox()
        self._collect_loads()
        busy = self._cancel_requested()
        chunks = self.scheduler.plan(len(self.decoding), self._admit)
        self._generated = 0
        if self.decoding:
            self._decode()
        if chunks:
            self._prefill(chunks)
        busy = self._retire() or busy or bool(chunks) or self._generated > 0
        self.metrics.record_step(
            time.monotonic(), self._generated, sum(n for _, n in chunks),
            queue_length=len(self.scheduler.waiting), running_rows=len(self.decoding) + len(self.scheduler.prefilling),
            prefilling_rows=len(self.scheduler.prefilling), decoding_rows=len(self.decoding),
            adapters_resident=len(self.slots.resident), adapters_loading=self.slots.loading,
            evictions=self.slots.evictions,
        )
        return busy

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            arrived, self._inbox = list(self._inbox), deque()
        for seq in arrived:
            self.scheduler.add(seq)
            self.slots.prefetch(seq.request.adapter)

    def _collect_loads(self) -> None:
        for name, error in self.slots.poll().items():
            for seq in [s for s in self.scheduler.waiting if s.request.adapter == name]:
                self.scheduler.remove(seq)
                self._finish(seq, "error", error=error)

    def _cancel_requested(self) -> bool:
        cancelled = False
        for seq in [*self.scheduler.waiting, *self.scheduler.prefilling]:
            if seq.handle.cancel_requested:
                self.scheduler.remove(seq)
                self._finish(seq, "cancelled")
                cancelled = True
        for seq in self.decoding:
            if seq.handle.cancel_requested and not seq.finished:
                seq.finish_reason = "cancelled"
                cancelled = True
        return cancelled

    def _admit(self, seq: Sequence) -> Admission:
        try:
            status, slot = self.slots.acquire(seq.request.adapter)
        except AdapterUnavailable as err:
            self._finish(seq, "error", error=str(err))
            return Admission.FAILED
        if status is Admission.READY:
            seq.slot = slot
        return status

    def _decode(self) -> None:
        seqs = self.decoding
        try:
            logits = self._forward(self.decode_kv, [[s.output[-1]] for s in seqs], [s.slot for s in seqs])
        except Exception as err:  # noqa: BLE001 - fails these rows, not the engine
            log.exception("decode forward failed for %d rows", len(seqs))
            for s in seqs:
                s.finish_reason, s.error = "error", f"decode forward failed: {err!r}"
            return
        self._accept(seqs, logits)

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> None:
        seqs = [s for s, _ in chunks]
        kv = BatchKV.from_rows([s.kv for s in seqs], self.num_layers, self.device)
        tokens = [list(s.prompt[s.prefilled : s.prefilled + n]) for s, n in chunks]
        try:
            logits = self._forward(kv, tokens, [s.slot for s in seqs])
        except Exception as err:  # noqa: BLE001 - fails the row at fault, not the engine
            if len(chunks) > 1:  # nothing was committed: find the row(s) at fault, one at a time
                log.warning("prefill forward of %d rows failed (%r); running them one by one", len(chunks), err)
                for chunk in chunks:
                    self._prefill([chunk])
                return
            log.exception("prefill forward failed for request %s", seqs[0].request.request_id)
            self.scheduler.remove(seqs[0])
            self._finish(seqs[0], "error", error=f"prefill forward failed: {err!r}")
            return
        done = []
        for i, (s, n) in enumerate(chunks):
            s.prefilled += n
            s.kv = kv.row(i)
            if s.remaining_prompt == 0:
                done.append(i)
                self.scheduler.remove(s)
        if done:
            joining = [seqs[i] for i in done]
            self._accept(joining, logits[done])
            self._joining.extend(joining)

    def _forward(self, kv: BatchKV, chunks: list[list[int]], slots: list[int | None]) -> torch.Tensor:
        """Append `chunks[b]` to row b of `kv` under slot `slots[b]`; last-position logits [B, V]."""
        inputs = kv.prepare(chunks, self.dtype)
        try:
            with torch.inference_mode(), route_rows(self.banks, slots):
                out = self.model(**inputs, past_key_values=kv, use_cache=True, logits_to_keep=1)
        except BaseException:
            kv.abandon()
            raise
        kv.commit()
        return out.logits[:, -1]  # [B, V]

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row and apply it; an error fails only the row it happened in."""
        try:
            picked = self._pick(seqs, logits)
        except Exception:  # noqa: BLE001 - find the row(s) at fault, one at a time
            # (rows that drew before the failure draw again: seeded streams stay reproducible
            # only on the path without errors)
            picked = []
            for i, s in enumerate(seqs):
                try:
                    picked.append(self._pick([s], logits[i : i + 1])[0])
                except Exception as err:  # noqa: BLE001
                    s.finish_reason, s.error = "error", f"sampling failed: {err!r}"
                    picked.append(None)
        now = time.monotonic()
        for s, p in zip(seqs, picked):
            if p is None:
                continue
            try:
                self._append_token(s, *p, now)
            except Exception as err:  # noqa: BLE001
                log.warning("request %s failed while processing its token: %r", s.request.request_id, err)
                s.finish_reason, s.error = "error", f"processing the output failed: {err!r}"

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, tuple | None]]:
        params = [s.request.sampling for s in seqs]
        tokens = sample_tokens(logits, params, [s.generator for s in seqs])
        return list(zip(tokens, token_logprobs(logits, tokens, [p.logprobs for p in params])))

    def _append_token(self, s: Sequence, token: int, logprob: tuple | None, now: float) -> None:
        s.output.append(token)
        self._generated += 1
        if logprob is not None:
            s.logprobs.append(logprob[0])
            s.top_logprobs.append(logprob[1])
        first = s.first_token_s is None
        self.metrics.record_token(
            None if first else now - s.last_token_s, now - s.arrival_s if first else None
        )
        if first:
            s.first_token_s = now
        s.last_token_s = now
        s.handle._emit(TokenEvent(token, len(s.output) - 1, *(logprob or (None, None))))
        if token in s.stop_ids:
            s.finish_reason, s.stop_reason = "stop", token
        elif s.request.stop_strings and (hit := self._stop_string(s)) is not None:
            s.finish_reason, s.stop_reason = "stop", hit
        elif len(s.output) >= s.request.max_new_tokens or len(s.prompt) + len(s.output) >= self.context_len:
            s.finish_reason = "length"

    def _stop_string(self, s: Sequence) -> str | None:
        """The first stop string in the decoded output that was not there one token ago."""
        text = self.detokenize(list(s.output))
        longest = max(len(x) for x in s.request.stop_strings)
        start = max(0, s.text_checked - longest + 1)
        s.text_checked = len(text)
        hits = [(text.find(x, start), x) for x in s.request.stop_strings]
        hits = [(i, x) for i, x in hits if i >= 0]
        return min(hits)[1] if hits else None

    def _retire(self) -> bool:
        """Finish done rows, free their KV rows and pins; let prefilled rows join the decode batch."""
        changed = False
        if any(s.finished for s in self.decoding):
            keep = [i for i, s in enumerate(self.decoding) if not s.finished]
            for s in self.decoding:
                if s.finished:
                    self._finish(s, s.finish_reason)
            self.decode_kv.select(keep)
            self.decoding = [self.decoding[i] for i in keep]
            changed = True
        joining = []
        for s in self._joining:
            if s.finished:
                self._finish(s, s.finish_reason)
            else:
                joining.append(s)
        if joining:
            self.decode_kv.extend([s.kv for s in joining])
            for s in joining:
                s.kv = None
            self.decoding.extend(joining)
        changed = changed or bool(self._joining)
        self._joining = []
        return changed

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        now = time.monotonic()
        s.finish_reason = reason
        s.error = error or s.error
        s.kv = None
        if s.slot is not None:
            self.slots.release(s.request.adapter)
            s.slot = None
        want_logprobs = s.request.sampling.logprobs is not None
        output = RequestOutput(
            request_id=s.request.request_id,
            prompt=s.prompt,
            output_ids=tuple(s.output),
            finish_reason=reason,
            adapter=s.request.adapter,
            stop_reason=s.stop_reason,
            logprobs=tuple(s.logprobs) if want_logprobs else None,
            top_logprobs=tuple(s.top_logprobs) if want_logprobs else None,
            error=s.error if reason == "error" else None,
            ttft_s=None if s.first_token_s is None else s.first_token_s - s.arrival_s,
            latency_s=now - s.arrival_s,
        )
        self.metrics.record_finish(reason, output.latency_s)
        s.handle._finish(output)

    def _fail_all(self, error: str, reason: str = "error") -> None:
        """Finish every request in flight (after an unexpected error, or on close)."""
        for s in [*self.scheduler.waiting, *self.scheduler.prefilling, *self.decoding, *self._joining]:
            if not s.handle.done:
                self._finish(s, reason, error=error)
        self.scheduler.waiting.clear()
        self.scheduler.prefilling.clear()
        self.decoding, self._joining = [], []
        self.decode_kv = BatchKV(self.num_layers, 0, self.device)

    def _idle(self) -> None:
        self._wake.wait(self.config.idle_wait_s)
        self._wake.clear()


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
