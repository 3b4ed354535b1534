"""Serving FLoRA adapters over an OpenAI-compatible HTTP API; nothing here imports Ray.

    config    ServeConfig: model, engine limits, adapter sources, registry, request limits, deployment
    model     the base model with adapter banks, the embedded default resolved like the fine-tuning job
    sources   adapter names → adapters: a local directory and the MLflow registry, cached on disk
    protocol  OpenAI completions / chat requests parsed and checked; response and chunk bodies
    text      incremental detokenisation with stop strings
    service   one engine per process: admission (a bounded queue), streaming, cancellation, stats
    api       the FastAPI app: routes, API key, errors as OpenAI error bodies
    loadgen   a fixed-rate load generator for the endpoint (loopback tests and benchmarks)

The Ray Serve deployment that wraps these is `serve_apps/flora_server.py`.
"""
