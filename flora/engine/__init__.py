"""Generation engine: continuous batching where every request may use a different adapter.

    request  Request, SamplingParams, RequestHandle (stream / cancel), RequestOutput
    sampling greedy, temperature, top-k, top-p with a random stream per request
    cache    per-row KV state (left padded, explicit masks and positions) for a HF decoder
    scheduler FIFO admission, token budget, chunked prefill
    slots    adapters by name: background loading, LRU eviction of unused slots
    engine   the step loop (`Engine`), synchronous `generate` or a background thread
    metrics  queue, batch, throughput, latency and slot figures
"""

from flora.engine.engine import Engine, EngineConfig
from flora.engine.metrics import EngineMetrics
from flora.engine.request import (
    Request,
    RequestFailed,
    RequestHandle,
    RequestOutput,
    RequestRejected,
    SamplingParams,
    TokenEvent,
)
from flora.engine.slots import AdapterInUse, AdapterUnavailable, DirectoryLoader

__all__ = [
    "AdapterInUse",
    "AdapterUnavailable",
    "DirectoryLoader",
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "Request",
    "RequestFailed",
    "RequestHandle",
    "RequestOutput",
    "RequestRejected",
    "SamplingParams",
    "TokenEvent",
]
