"""Delivering what the engine computed: token events, stop strings, final outputs, latency figures.

The engine thread hands over each step's drawn tokens in one `TokenBatch` (arrays, plus the
sequences they belong to) and the end of any request that stops without a token (`Ended`:
cancelled, failed); it records token latencies itself, vectorised over the batch. `OutputProcessor.process` turns these into each caller's stream of
`TokenEvent`s and its final `RequestOutput`: the only Python per row and token, kept off the
engine thread. With a background engine loop it runs on its own thread (`OutputThread`); when
the caller steps the engine itself it runs inline, so that a step's events are out when `step()`
returns.

Stop strings are found here, in the decoded text: a hit ends the request at once (its output
ends with the token that completed the string) and asks the engine to free the row
(`on_stop`), which it does before its next step; a token the engine drew for the row meanwhile
is dropped. An error while decoding one request's text fails that request only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flora.engine.metrics import EngineMetrics
from flora.engine.request import RequestOutput
from flora.engine.sampling import Sampled
from flora.engine.scheduler import Sequence

log = logging.getLogger(__name__)


@dataclass
class TokenBatch:
    """One step's tokens: `seqs[i]` drew `sampled.tokens[i]`; `stopped` / `length` say which ended."""

    seqs: list[Sequence]
    sampled: Sampled
    stopped: np.ndarray
    length: np.ndarray
    time_s: float


@dataclass
class Ended:
    """A request that ends without a new token (cancelled, failed, the engine closed)."""

    seq: Sequence
    reason: str
    error: str | None = None


class OutputProcessor:
    def __init__(
        self,
        metrics: EngineMetrics,
        detokenize: Callable[[list[int]], str] | None,
        on_stop: Callable[[Sequence], None],
    ):
        self.metrics = metrics
        self.detokenize = detokenize
        self.on_stop = on_stop

    def process(self, item: TokenBatch | Ended) -> None:
        if isinstance(item, TokenBatch):
            self._tokens(item)
        else:
            self._end(item.seq, item.reason, error=item.error)

    def _tokens(self, batch: TokenBatch) -> None:
        now = batch.time_s
        sampled = batch.sampled
        tokens = sampled.tokens.tolist()
        ended = (batch.stopped | batch.length).tolist()
        with_logprobs = sampled.logprob is not None
        for i, seq in enumerate(batch.seqs):  # the one loop per row and token: keep it lean
            if seq.done:
                continue  # ended by a stop string or an error while the engine drew this token
            token = tokens[i]
            try:
                output = seq.output
                output.append(token)
                if seq.first_token_s is None:
                    seq.first_token_s = now
                if with_logprobs and seq.request.sampling.logprobs is not None:
                    seq.handle._emit(self._with_logprobs(seq, token, sampled, i))
                else:
                    seq.handle._emit((token, len(output) - 1))
                if ended[i]:
                    self._end(seq, "stop", stop_reason=token) if batch.stopped[i] else self._end(seq, "length")
                elif seq.request.stop_strings and (hit := self._stop_string(seq)) is not None:
                    self._end(seq, "stop", stop_reason=hit)
                    self.on_stop(seq)
            except Exception as err:  # noqa: BLE001 - fails this request, not the others
                log.warning("request %s failed while processing its token: %r", seq.request.request_id, err)
                self._end(seq, "error", error=f"processing the output failed: {err!r}")
                self.on_stop(seq)

    @staticmethod
    def _with_logprobs(seq: Sequence, token: int, sampled: Sampled, i: int) -> tuple:
        k = seq.request.sampling.logprobs
        logprob = float(sampled.logprob[i])
        top = tuple(zip(sampled.top_ids[i, :k].tolist(), sampled.top_logprobs[i, :k].tolist()))
        seq.logprobs.append(logprob)
        seq.top_logprobs.append(top)
        return token, len(seq.output) - 1, logprob, top

    def _stop_string(self, seq: Sequence) -> str | None:
        """The first stop string in the decoded output that was not there one token ago."""
        text = self.detokenize(list(seq.output))
        longest = max(len(x) for x in seq.request.stop_strings)
        start = max(0, seq.text_checked - longest + 1)
        seq.text_checked = len(text)
        hits = [(text.find(x, start), x) for x in seq.request.stop_strings]
        hits = [(i, x) for i, x in hits if i >= 0]
        return min(hits)[1] if hits else None

    def _end(self, seq: Sequence, reason: str, *, error: str | None = None, stop_reason=None) -> None:
        if seq.done:
            return
        seq.done = True
        want_logprobs = seq.request.sampling.logprobs is not None
        output = RequestOutput(
            request_id=seq.request.request_id,
            prompt=seq.request.prompt,
            output_ids=tuple(seq.output),
            finish_reason=reason,
            adapter=seq.request.adapter,
            stop_reason=stop_reason,
            logprobs=tuple(seq.logprobs) if want_logprobs else None,
            top_logprobs=tuple(seq.top_logprobs) if want_logprobs else None,
            error=error if reason == "error" else None,
            ttft_s=None if seq.first_token_s is None else seq.first_token_s - seq.arrival_s,
            latency_s=time.monotonic() - seq.arrival_s,
        )
        self.metrics.record_finish(reason, output.latency_s)
        seq.handle._finish(output)


class OutputThread:
    """Runs an `OutputProcessor` on its own thread, in the order items are put."""

    def __init__(self, processor: OutputProcessor):
        self.processor = processor
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="flora-engine-outputs", daemon=True)
        self._thread.start()

    def put(self, item: TokenBatch | Ended) -> None:
        self._queue.put(item)

    def close(self) -> None:
        """Process what was put, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.processor.process(item)
            except Exception:  # noqa: BLE001 - a bug here must not stop every stream
                log.exception("processing engine outputs failed")
