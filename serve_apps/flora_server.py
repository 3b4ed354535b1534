"""Ray Serve application: an OpenAI-compatible endpoint whose replicas batch requests for many
FLoRA adapters into shared forward passes.

    serve run serve_apps/flora.yaml                   # the embedded base + adapters of `make finetune`
    serve deploy serve_apps/flora.yaml                # the same, onto a running cluster
    serve run serve_apps.flora_server:build_app model.max_slots=32 limits.max_tokens=256
    serve run serve_apps/speech.yaml                  # Whisper + the adapters of the speech job:
                                                      # POST /v1/audio/transcriptions

Recipe: args → `ServeConfig` (errors name the field) → the base model resolved once, here (the
embedded default is found in its cache, or built) and the registry fixed → one deployment; each
replica owns one engine, runs its step loop on a thread beside the HTTP handlers, and every
request joins that engine's batches whatever adapter it names. (Not `serve.multiplexed` with
`serve.batch`: that groups requests per adapter, the opposite of what FLoRA is for.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from flora_platform.config import ConfigError, from_dict, to_dict
from flora_platform.serving.api import build_http_app
from flora_platform.serving.config import DeploymentSpec, ServeConfig, default_tracking_uri, parse_args, resolve_paths
from flora_platform.serving.model import is_speech_model, resolve_base
from flora_platform.serving.service import CompletionService
from flora_platform.serving.transcription import TranscriptionService
from serve_apps.metrics import ReplicaMetrics

log = logging.getLogger("ray.serve")

REPO = Path(__file__).resolve().parents[1]  # relative paths in the config are relative to the repository
LIBRARY_LOGGERS = ("flora_platform", "flora.engine")


@serve.deployment(name="flora")
@serve.ingress()
class FloraServer:
    async def __init__(self, config: dict, tracking_uri: str):
        cfg = from_dict(ServeConfig, config)
        _log_through_serve(LIBRARY_LOGGERS)
        api_key = ""
        if cfg.security.api_key_env:
            api_key = os.environ.get(cfg.security.api_key_env, "")
            if not api_key:
                raise ConfigError("security.api_key_env", f"${cfg.security.api_key_env} is empty in the replica's environment")
        self.api_key = api_key
        self.metrics = ReplicaMetrics()
        service_class = TranscriptionService if is_speech_model(cfg.model.name) else CompletionService
        self.service = service_class(cfg, tracking_uri=tracking_uri, on_record=self.metrics.record)
        self.metrics.start(self.service)
        await self.service.preload(cfg.adapters.preload)

    def __serve_build_asgi_app__(self):
        identity = {"replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid()}
        return build_http_app(self.service, self.api_key, identity)

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; a raise makes Serve replace the replica."""
        if not self.service.alive:
            raise RuntimeError("the engine loop has stopped")  # or the transcriber's batch thread

    def __del__(self):
        self.metrics.stop()
        self.service.close()


def build_app(args: dict) -> Application:
    _log_through_serve(LIBRARY_LOGGERS)  # building the embedded base takes minutes: show its progress
    cfg = resolve_paths(parse_args(args), REPO)
    tracking_uri = default_tracking_uri(cfg) if cfg.registry.enabled else ""
    cfg = dataclasses.replace(cfg, model=resolve_base(cfg.model, tracking_uri))
    d = cfg.deployment
    options = dict(
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        # Above the engine's own bound, so that a full replica answers 429 itself; Serve's proxy
        # queue behind it answers 503 with Retry-After once every replica is full.
        max_ongoing_requests=d.max_ongoing_requests or cfg.capacity + 16,
        max_queued_requests=d.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.limits.retry_after_s),
        health_check_period_s=d.health_check_period_s,
    )
    a = d.autoscaling
    if a.max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = d.num_replicas
    log.info("flora app: %s, registry %s, %s", cfg.model.name, tracking_uri or "off", options)
    # The replicas' arguments leave the deployment section out: scaling does not restart them.
    service_config = to_dict(dataclasses.replace(cfg, deployment=DeploymentSpec()))
    return FloraServer.options(**options).bind(service_config, tracking_uri)


def _log_through_serve(names: tuple[str, ...]) -> None:
    """Send these loggers' records to Serve's replica log (JSON with the request id when the
    config asks for it); Serve configures only its own `ray.serve` logger."""
    serve_logger = logging.getLogger("ray.serve")
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = list(serve_logger.handlers)
        logger.setLevel(logging.INFO)
        logger.propagate = False
