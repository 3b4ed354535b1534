"""The replica's figures on Ray's Prometheus endpoint (next to Serve's own `ray_serve_*` metrics).

Per request (tagged with the `model` the client named, once it resolved): requests by HTTP
status, latency and time to first token histograms, prompt and completion tokens. Per replica,
exported every `interval_s` from the engine's snapshot: queue length, running rows, tokens/s,
adapters resident and loading, evictions, in-flight requests, and how many adapters each forward
pass mixes. Figures that may stay zero for long (evictions) are gauges of the replica's total:
a Ray counter appears only after its first increment. Ray prefixes every name with `ray_` (e.g. `ray_flora_engine_queue_length`).
"""

from __future__ import annotations

import logging
import threading

from ray.serve.metrics import Counter, Gauge, Histogram

from flora_platform.serving.service import CompletionService, RequestRecord

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

GAUGES = {  # engine snapshot key -> (metric name, description)
    "queue_length": ("flora_engine_queue_length", "engine requests waiting for a row"),
    "running_rows": ("flora_engine_running_rows", "rows prefilling or decoding"),
    "tokens_per_s": ("flora_engine_tokens_per_s", "generated tokens per second (recent window)"),
    "adapters_resident": ("flora_engine_adapters_resident", "adapters in the banks"),
    "adapters_loading": ("flora_engine_adapters_loading", "adapters being read or waiting for a slot"),
    "evictions": ("flora_engine_evictions", "adapters evicted from a slot for another, since the replica started"),
    "ttft_s_p50": ("flora_engine_ttft_p50_s", "median time to first token (recent requests)"),
    "itl_s_p50": ("flora_engine_itl_p50_s", "median time between tokens (recent tokens)"),
}
COUNTERS = {  # cumulative figure -> (metric name, description)
    "generated_tokens": ("flora_engine_generated_tokens", "tokens generated"),
    "forwards": ("flora_forwards", "forward passes of the model"),
    "mixed_forwards": ("flora_mixed_forwards", "forward passes whose rows use two or more adapters (base included)"),
}


class ReplicaMetrics:
    def __init__(self):
        self.requests = Counter("flora_requests", "HTTP requests by the model named and status", tag_keys=("model", "status"))
        self.latency = Histogram("flora_request_latency_s", "arrival to last byte", LATENCY_BUCKETS_S, tag_keys=("model",))
        self.ttft = Histogram("flora_ttft_s", "arrival to first generated token", LATENCY_BUCKETS_S, tag_keys=("model",))
        self.prompt_tokens = Counter("flora_prompt_tokens", "prompt tokens", tag_keys=("model",))
        self.completion_tokens = Counter("flora_completion_tokens", "generated tokens returned", tag_keys=("model",))
        self.gauges = {key: Gauge(name, desc) for key, (name, desc) in GAUGES.items()}
        self.inflight = Gauge("flora_inflight_requests", "engine requests admitted (running or queued)")
        self.max_adapters = Gauge("flora_max_adapters_per_forward", "most distinct adapters in one forward pass so far")
        self.counters = {key: Counter(name, desc) for key, (name, desc) in COUNTERS.items()}
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, r: RequestRecord) -> None:
        """Called by the service for every finished request."""
        model = r.model if r.source != "-" else "<unresolved>"  # unknown names would grow the tag set
        self.requests.inc(tags={"model": model, "status": str(r.status)})
        self.latency.observe(r.latency_s, tags={"model": model})
        if r.ttft_s is not None:
            self.ttft.observe(r.ttft_s, tags={"model": model})
        if r.prompt_tokens:
            self.prompt_tokens.inc(r.prompt_tokens, tags={"model": model})
        if r.completion_tokens:
            self.completion_tokens.inc(r.completion_tokens, tags={"model": model})

    def export(self, service: CompletionService) -> None:
        snap = service.snapshot()
        engine, forwards = snap["engine"], snap["forwards"]
        for key, gauge in self.gauges.items():
            if engine.get(key) is not None:
                gauge.set(float(engine[key]))
        self.inflight.set(snap["inflight"])
        self.max_adapters.set(forwards["max_adapters_per_forward"])
        totals = {"generated_tokens": engine["generated_tokens"],
                  "forwards": forwards["forwards"], "mixed_forwards": forwards["mixed_forwards"]}
        for key, value in totals.items():
            delta = value - self._last.get(key, 0)
            if delta > 0:
                self.counters[key].inc(delta)
            self._last[key] = value

    def start(self, service: CompletionService, interval_s: float = 1.0) -> None:
        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.export(service)
                except Exception:  # noqa: BLE001 - metrics must not take the replica down
                    log.exception("exporting engine metrics failed")

        self._thread = threading.Thread(target=loop, name="flora-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
