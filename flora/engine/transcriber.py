"""Speech transcription with adapters: requests for any mix of adapters share Whisper's forwards.

    transcriber = Transcriber(model, loader=DirectoryLoader("adapters")).start()
    future = transcriber.submit(TranscriptionRequest(features, language="<|de|>", adapter="de"))
    token_ids = future.result()                       # greedy, up to <|endoftext|>
    transcriber.close()

A background thread gathers waiting requests into batches of up to `max_batch_rows` (the first
request of a batch waits at most `batch_wait_s` for company) and runs one Hugging Face
`generate` per batch under `flora.route`, one adapter slot per row: the encoder runs once per
request, inside the batch's encoder forward, and every decoding step is one decoder forward over
all rows, each through its own adapter, with Hugging Face's self- and cross-attention caches.
Each row is forced its own language token. Greedy decoding is per row, so a row's tokens are
what `generate` gives for that request alone on the model with its adapter merged in.

Batches run to completion: a request that arrives while a batch decodes waits for the next
one (Whisper transcripts are short: at most `max_target_positions` tokens). Adapters load in the
background through the engine's `SlotManager`; a request whose adapter is still loading waits
without holding back others, one whose adapter cannot be loaded fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

import flora
from flora.engine.request import RequestRejected
from flora.engine.scheduler import Admission
from flora.engine.slots import AdapterUnavailable, Loader, SlotManager, route_rows

log = logging.getLogger(__name__)

PROMPT_LENGTH = 4  # <|startoftranscript|> <|xx|> <|transcribe|> <|notimestamps|>


@dataclass(frozen=True)
class TranscriberConfig:
    """max_batch_rows: requests decoded together. batch_wait_s: how long the first waiting request
    waits for others before its batch starts. load_threads: adapters loading at once."""

    max_batch_rows: int = 16
    batch_wait_s: float = 0.005
    load_threads: int = 2

    def __post_init__(self):
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows={self.max_batch_rows}: must be >= 1")
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s={self.batch_wait_s}: must be >= 0")


@dataclass(eq=False)
class TranscriptionRequest:
    """features: [num_mel_bins, frames] log-mel features of one clip (the feature extractor's
    output for it). language: the language token, e.g. "<|de|>". adapter: None for the base model.
    max_new_tokens: None allows what the model's decoder length leaves after the prompt."""

    features: torch.Tensor
    language: str
    adapter: str | None = None
    max_new_tokens: int | None = None
    future: Future = field(default_factory=Future, repr=False)
    arrived: float = field(default_factory=time.monotonic, repr=False)


class Transcriber:
    def __init__(self, model: torch.nn.Module, *, loader: Loader | None = None, config: TranscriberConfig | None = None):
        if getattr(model.config, "model_type", None) != "whisper":
            raise ValueError(f"the transcriber serves Whisper models, not {model.config.model_type!r}")
        if model.training:
            raise ValueError("the model is in training mode (dropout would make outputs random): call model.eval() first")
        self.model = model
        self.config = config or TranscriberConfig()
        try:
            self.banks = flora.banks_of(model)
        except ValueError:
            self.banks = None  # a plain model: base-model requests only
        self.languages = dict(getattr(model.generation_config, "lang_to_id", None) or {})
        self.max_new_tokens_limit = model.config.max_target_positions - PROMPT_LENGTH
        self.frames = model.config.max_source_positions * 2  # conv2 halves the mel frames
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._wake = threading.Event()
        self.slots = SlotManager(self.banks, loader, load_threads=self.config.load_threads, on_loaded=self._wake.set)
        self._waiting: deque[TranscriptionRequest] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()  # a batch, or an unload between batches
        self.batches = 0  # generate calls, the rows in them and the tokens they produced: metrics
        self.rows = 0
        self.generated = 0

    # ------------------------------------------------------------------ any thread

    def check(self, request: TranscriptionRequest) -> None:
        """Raise `RequestRejected` naming the field if this request cannot run on this model."""
        if tuple(request.features.shape) != (self.model.config.num_mel_bins, self.frames):
            raise RequestRejected(
                f"features: expected [{self.model.config.num_mel_bins}, {self.frames}] log-mel features "
                f"(the model's feature extractor output for one clip), got {list(request.features.shape)}"
            )
        if self.languages and request.language not in self.languages:
            raise RequestRejected(f"language: {request.language!r} is not one of the model's {sorted(self.languages)}")
        if request.max_new_tokens is None:
            request.max_new_tokens = self.max_new_tokens_limit
        if not 1 <= request.max_new_tokens <= self.max_new_tokens_limit:
            raise RequestRejected(f"max_new_tokens: {request.max_new_tokens} must be in 1..{self.max_new_tokens_limit}")
        self.slots.check(request.adapter)

    def submit(self, request: TranscriptionRequest) -> Future:
        """Queue a request; its future resolves to the generated token ids (prompt excluded,
        <|endoftext|> included when reached) or raises why it failed."""
        self.check(request)
        if self._stop.is_set():
            raise RuntimeError("the transcriber is closed")
        with self._lock:
            self._waiting.append(request)
        self._wake.set()
        return request.future

    def transcribe(self, requests: list[TranscriptionRequest]) -> list[list[int]]:
        """Synchronous: submit all, run batches on this thread if none runs them, return ids in order."""
        futures = [self.submit(r) for r in requests]
        while self._thread is None and not all(f.done() for f in futures):
            if not self.step():
                self._wake.wait(0.01)  # an adapter is loading
                self._wake.clear()
        return [f.result() for f in futures]

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def unload_adapter(self, name: str) -> bool:
        """Unload `name` from the banks between batches; False if it was not resident.
        Raises `AdapterInUse` while a running batch uses it."""
        with self._step_lock:
            return self.slots.unload(name)

    def start(self) -> Transcriber:
        self._thread = threading.Thread(target=self._run, name="flora-transcriber", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.slots.close()
        with self._lock:
            left, self._waiting = list(self._waiting), deque()
        for request in left:
            _settle(request.future, error=RuntimeError("the transcriber was closed before this request ran"))

    # ------------------------------------------------------------------ the batch thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.step():
                self._wake.wait(0.05)
                self._wake.clear()

    def step(self) -> bool:
        """Run one batch of the waiting requests whose adapters are ready; False if none ran."""
        for name, error in self.slots.poll().items():
            self._fail_waiting(name, error)
        with self._lock:
            if not self._waiting:
                return False
            oldest = self._waiting[0].arrived
        pause = oldest + self.config.batch_wait_s - time.monotonic()
        if pause > 0 and len(self._waiting) < self.config.max_batch_rows:
            time.sleep(pause)  # let a burst of requests arrive and share the batch
        with self._step_lock:
            batch, slots = self._admit()
            if not batch:
                return False
            try:
                self._generate(batch, slots)
            finally:
                for request in batch:
                    self.slots.release(request.adapter)
        return True

    def _admit(self) -> tuple[list[TranscriptionRequest], list[int]]:
        """Take up to max_batch_rows waiting requests whose adapter slot could be pinned, in order."""
        batch, slots, kept = [], [], deque()
        with self._lock:
            waiting, self._waiting = self._waiting, deque()
        for request in waiting:
            if request.future.cancelled():
                continue
            if len(batch) == self.config.max_batch_rows:
                kept.append(request)
                continue
            try:
                status, slot = self.slots.acquire(request.adapter)
            except AdapterUnavailable as err:
                _settle(request.future, error=err)
                continue
            if status is Admission.READY:
                batch.append(request)
                slots.append(slot)
            else:  # loading, or every slot pinned by this batch: next time
                kept.append(request)
        with self._lock:
            self._waiting = kept + self._waiting
        return batch, slots

    def _generate(self, batch: list[TranscriptionRequest], slots: list[int]) -> None:
        features = torch.stack([r.features for r in batch]).to(self.device, self.dtype)  # [B, mels, frames]
        longest = max(r.max_new_tokens for r in batch)
        try:
            with torch.inference_mode(), route_rows(self.banks, slots):
                out = self.model.generate(
                    features, language=[r.language for r in batch], task="transcribe", do_sample=False,
                    num_beams=1, max_new_tokens=longest, return_dict_in_generate=True,
                )
        except Exception as err:  # noqa: BLE001 - fails this batch's requests, not the transcriber
            log.exception("transcription batch of %d rows failed", len(batch))
            for request in batch:
                _settle(request.future, error=RuntimeError(f"transcription failed: {err!r}"))
            return
        self.batches += 1
        self.rows += len(batch)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for request, row in zip(batch, out.sequences[:, PROMPT_LENGTH:].tolist()):
            ids = row[: request.max_new_tokens]  # greedy: a shorter budget is a prefix of a longer one
            end = next((i for i, t in enumerate(ids) if t in eos), None)
            ids = ids if end is None else ids[: end + 1]
            self.generated += len(ids)
            _settle(request.future, result=ids)

    def _fail_waiting(self, adapter: str, error: str) -> None:
        with self._lock:
            failed = [r for r in self._waiting if r.adapter == adapter]
            self._waiting = deque(r for r in self._waiting if r.adapter != adapter)
        for request in failed:
            _settle(request.future, error=AdapterUnavailable(f"adapter {adapter!r} could not be loaded: {error}"))


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a request's future unless its caller cancelled it meanwhile (e.g. a timeout)."""
    if future.cancelled():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and here
        pass

