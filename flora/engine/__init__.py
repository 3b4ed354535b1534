"""Generation engine: continuous batching where every request may use a different adapter.

    request  Request, SamplingParams, RequestHandle (stream / cancel), RequestOutput
    sampling greedy, temperature, top-k, top-p with a random stream per request
    cache    per-row KV state (left padded, explicit masks and positions) for a HF decoder
    scheduler FIFO admission, token budget, chunked prefill
    slots    adapters by name: background loading, LRU eviction of unused slots
    engine   the step loop (`Engine`), synchronous `generate` or a background thread
    transcriber  Whisper: waiting transcription requests for any adapters batched into one generate
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
from flora.engine.transcriber import Transcriber, TranscriberConfig, TranscriptionRequest

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
    "Transcriber",
    "TranscriberConfig",
    "TranscriptionRequest",
]
