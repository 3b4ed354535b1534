"""Generation engine: continuous batching where every request may use a different adapter.

    request    Request, SamplingParams, RequestHandle (stream / cancel), RequestOutput
    engine     the step loop (`Engine`), synchronous `generate` or a background thread
    scheduler  FIFO admission, token budget, chunked prefill, preemption, prefix reuse
    kv_cache   the paged KV pool: fixed-size blocks, free list, prefix cache by (adapter, tokens)
    batch      running sequences as rows of host arrays; a step's packed inputs
    runner     one packed forward per step, the adapter route, CUDA graphs for decode steps
    models     our forward per architecture (llama family, gpt_bigcode), or Hugging Face's
    attention  paged attention for a packed step (PyTorch ops, or the Triton kernel)
    sampling   greedy, temperature, top-k, top-p for the whole batch on the device, seeded per request
    outputs    streaming, stop strings and final outputs, off the engine thread
    slots      adapters by name: background loading, LRU eviction of unused slots
    metrics    queue, batch, throughput, latency, KV pool and slot figures
    transcriber  Whisper: waiting transcription requests for any adapters batched into one generate
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
