"""What the engine reports: queue and batch sizes, throughput, latencies, adapter slots, the KV
pool, and how much of each step the host spends outside the model.

The engine thread records steps, the output side tokens and finished requests; `snapshot()`
may be called from any thread (it reads under a lock). Latency statistics cover the last
`window` requests, token gaps or steps, throughput the last `window_s` seconds.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque


class EngineMetrics:
    def __init__(self, window: int = 1024, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.window_s = window_s
        self._tokens: deque[tuple[float, int]] = deque()  # (time, generated tokens) per step
        self._ttft: deque[float] = deque(maxlen=window)
        self._itl: deque[float] = deque(maxlen=window)
        self._latency: deque[float] = deque(maxlen=window)
        self._host_s: deque[float] = deque(maxlen=window)  # step wall time minus the model's
        self.gauges = {
            "queue_length": 0, "running_rows": 0, "prefilling_rows": 0, "decoding_rows": 0,
            "adapters_resident": 0, "adapters_loading": 0, "evictions": 0,
            "kv_blocks_total": 0, "kv_blocks_free": 0, "prefix_cache_hit_blocks": 0, "preemptions": 0,
        }
        self.counters = {
            "steps": 0, "generated_tokens": 0, "prompt_tokens": 0,
            "requests_finished": 0, "requests_failed": 0, "requests_cancelled": 0, "requests_rejected": 0,
        }

    # ------------------------------------------------------------------ recording

    def record_step(self, now: float, generated: int, prompt: int, host_s: float | None = None, **gauges: int) -> None:
        """One step: tokens drawn, prompt tokens computed, and (for steps that ran the model) the
        time the host spent outside it."""
        with self._lock:
            self.counters["steps"] += 1
            self.counters["generated_tokens"] += generated
            self.counters["prompt_tokens"] += prompt
            self.gauges.update(gauges)
            if host_s is not None:
                self._host_s.append(host_s)
            if generated:
                self._tokens.append((now, generated))
            while self._tokens and self._tokens[0][0] < now - self.window_s:
                self._tokens.popleft()

    def record_tokens(self, ttft_s: list[float], gaps_s: list[float]) -> None:
        """A step's first-token times and gaps since the previous token."""
        with self._lock:
            self._ttft.extend(ttft_s)
            self._itl.extend(gaps_s)

    def record_finish(self, finish_reason: str, latency_s: float) -> None:
        with self._lock:
            key = {"error": "requests_failed", "cancelled": "requests_cancelled"}
            self.counters[key.get(finish_reason, "requests_finished")] += 1
            self._latency.append(latency_s)

    def record_rejected(self) -> None:
        with self._lock:
            self.counters["requests_rejected"] += 1

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> dict[str, float | int | None]:
        """Gauges, counters, tokens_per_s, and mean / p50 / p90 of ttft_s, itl_s, latency_s and
        host_overhead_s (per step: wall time minus the model's forward and sampling)."""
        with self._lock:
            out: dict[str, float | int | None] = {**self.gauges, **self.counters}
            now = time.monotonic()
            recent = [(t, n) for t, n in self._tokens if t >= now - self.window_s]
            span = (now - recent[0][0]) if recent else 0.0
            # Tokens of the window per second of it; one step alone counts over window_s.
            out["tokens_per_s"] = sum(n for _, n in recent) / max(span, 1e-3) if len(recent) > 1 else (
                sum(n for _, n in recent) / self.window_s
            )
            for name, values in (("ttft_s", self._ttft), ("itl_s", self._itl), ("latency_s", self._latency),
                                 ("host_overhead_s", self._host_s)):
                out.update(_summary(name, list(values)))
        return out


def _summary(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_mean": None, f"{name}_p50": None, f"{name}_p90": None}
    values = sorted(values)
    return {
        f"{name}_mean": statistics.fmean(values),
        f"{name}_p50": values[len(values) // 2],
        f"{name}_p90": values[min(len(values) - 1, int(0.9 * len(values)))],
    }
