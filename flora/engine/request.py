"""What a caller gives the engine (`Request`, `SamplingParams`) and what it gets back (a
`RequestHandle` that streams `TokenEvent`s and ends with a `RequestOutput`).

Field checks happen where a request is built (`__post_init__`), checks against the model and
the adapters where it is added (`check_request`, `Engine.add_request`); both raise
`RequestRejected`, whose message names the field and the fix. A rejected request never reaches
the engine, so it cannot disturb running ones.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

FINISH_REASONS = ("stop", "length", "cancelled", "error")
MAX_LOGPROBS = 20
_ids = itertools.count()


class RequestRejected(ValueError):
    """A request the engine will not run; the message names the field and how to fix it."""


class RequestFailed(RuntimeError):
    """A request that was accepted but failed while it ran (adapter load, processing error)."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. `temperature=0` is greedy (argmax of the logits).

    Otherwise logits / temperature, then the `top_k` largest (0 = all), then the smallest set of
    most probable tokens whose probability reaches `top_p` (1 = all), in Hugging Face's order.
    seed: per-request random stream (same seed, same tokens, whatever else is in the batch);
        None draws a fresh seed. logprobs: None, or k >= 0 to return the chosen token's
        log-probability under the model (raw logits, before temperature and filtering) and the
        k most likely alternatives.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also catches NaN
            raise RequestRejected(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise RequestRejected(f"top_p={self.top_p}: must be in (0, 1]; 1 disables it")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestRejected(f"top_k={self.top_k!r}: must be an int >= 0; 0 disables it")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestRejected(f"seed={self.seed!r}: must be an int or None")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise RequestRejected(f"logprobs={self.logprobs!r}: must be None or an int in 0..{MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    """One generation: prompt token ids, the adapter to use (None = base model), when to stop.

    Generation stops at `max_new_tokens`, at the model's context length, after a token in
    `stop_token_ids` (or the model's end-of-sequence ids unless `ignore_eos`), or once the
    decoded output contains one of `stop_strings` (needs the engine's `detokenize`). The
    stopping token is part of the output, as in Hugging Face `generate`.
    """

    prompt: Sequence[int]
    adapter: str | None = None
    max_new_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    ignore_eos: bool = False
    request_id: str = ""

    def __post_init__(self):
        prompt = self.prompt.tolist() if isinstance(self.prompt, torch.Tensor) else self.prompt
        try:
            prompt = tuple(int(t) for t in prompt)
        except (TypeError, ValueError) as err:
            raise RequestRejected(f"prompt must be a sequence of token ids ({err})") from err
        if not prompt:
            raise RequestRejected("prompt is empty: give at least one token id (e.g. the BOS token)")
        object.__setattr__(self, "prompt", prompt)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestRejected(f"max_new_tokens={self.max_new_tokens!r}: must be an int >= 1")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise RequestRejected(f"adapter={self.adapter!r}: give an adapter name, or None for the base model")
        if not isinstance(self.sampling, SamplingParams):
            raise RequestRejected(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.stop_strings, str):
            raise RequestRejected("stop_strings is one string: pass a list of strings, e.g. [\"\\n\\n\"]")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise RequestRejected(f"stop_strings={self.stop_strings!r}: every stop string must be a non-empty str")
        if not self.request_id:
            object.__setattr__(self, "request_id", f"req-{next(_ids)}")


def check_request(request: Request, *, context_len: int, vocab_size: int, can_detokenize: bool) -> None:
    """Checks against the model: prompt ids in the vocabulary, room for one new token."""
    if len(request.prompt) >= context_len:
        raise RequestRejected(
            f"prompt has {len(request.prompt)} tokens but the model's context is {context_len}: "
            f"shorten it to at most {context_len - 1} tokens (one position is needed for the first new token)"
        )
    bad = [t for t in request.prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejected(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    bad = [t for t in request.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejected(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if request.stop_strings and not can_detokenize:
        raise RequestRejected("stop_strings need a detokenizer: build the Engine with detokenize=tokenizer.decode")


class TokenEvent(NamedTuple):
    """One generated token as it is streamed. logprob / top_logprobs only when asked for.
    (A named tuple: one is made per token of every request.)"""

    token_id: int
    index: int  # position in the output, from 0
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token id, log-prob), best first


@dataclass(frozen=True)
class RequestOutput:
    """The end of a request. finish_reason: "stop" | "length" | "cancelled" | "error"."""

    request_id: str
    prompt: tuple[int, ...]
    output_ids: tuple[int, ...]
    finish_reason: str
    adapter: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    error: str | None = None
    ttft_s: float | None = None  # arrival to first token
    latency_s: float | None = None  # arrival to finish

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"

    def raise_for_error(self) -> RequestOutput:
        if self.finish_reason == "error":
            raise RequestFailed(f"request {self.request_id}: {self.error}")
        return self


_END = object()


class RequestHandle:
    """The caller's side of one request: stream tokens, wait for the output, or cancel.

    Iterating yields `TokenEvent`s as the engine produces them and stops when the request ends
    (the engine must be stepping: `Engine.start()` or another thread calling `step()`); events
    are consumed as they are read, so stream from one consumer. `result()` needs no streaming.
    Thread-safe: the engine side writes, any thread reads or cancels. Emitting an event is a
    deque append of a plain tuple (the `TokenEvent` is made by the reader); the lock is taken
    only to wake a consumer that waits.
    """

    def __init__(self, request: Request):
        self.request = request
        self._events: deque = deque()
        self._ready = threading.Condition()
        self._waiting = False  # a consumer waits on `_ready` for the next event
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._output: RequestOutput | None = None
        self._on_cancel = None  # set by the engine: tells it at once, so it never scans for cancels

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request; it ends with finish_reason "cancelled" (if not done).

        The engine takes it out before its next step, so no token is computed for it after that.
        """
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            try:
                event = self._events.popleft()
            except IndexError:
                with self._ready:
                    # Set before looking again: an emit after the look sees it and wakes us.
                    self._waiting = True
                    while not self._events:
                        self._ready.wait()
                    self._waiting = False
                continue
            if event is _END:
                self._events.appendleft(_END)  # later iterations end at once too
                return
            yield TokenEvent(*event)

    def result(self, timeout_s: float | None = None) -> RequestOutput:
        """Block until the request ends; raise TimeoutError after `timeout_s`."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout_s} s")
        assert self._output is not None
        return self._output

    # ------------------------------------------------------------------ engine side

    def _emit(self, event: tuple) -> None:
        """`event`: the fields of a `TokenEvent`, (token_id, index[, logprob, top_logprobs])."""
        self._events.append(event)
        if self._waiting:
            with self._ready:
                self._ready.notify()

    def _finish(self, output: RequestOutput) -> None:
        self._output = output
        self._done.set()
        self._emit(_END)
