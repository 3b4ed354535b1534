"""Ray Serve application: an OpenAI-compatible endpoint whose replicas batch requests for many
FLoRA adapters into shared forward passes.

    serve run serve_apps/flora.yaml                   # the embedded base + adapters of `make finetune`
    serve deploy serve_apps/flora.yaml                # the same, onto a running cluster
    serve run serve_apps.flora_server:build_app model.max_slots=32 limits.max_tokens=256
    serve run serve_apps/speech.yaml                  # Whisper + the adapters of the speech job:
                                                      # POST /v1/audio/transcriptions

Recipe: args → `ServeConfig` (errors name the field) → the base model resolved once, here (the
embedded default is found in its cache, or built) and the registry fixed → two deployments:

  ingress (`FloraIngress`, one replica, no CPU reserved): the HTTP entry. It reads a completion's
      `model` and passes the request on through a handle with `multiplexed_model_id=model`, so
      that Serve's model-multiplexing router sends it preferably to an engine replica that
      already holds that adapter (else to the one holding the fewest, then to any; queue
      lengths decide among candidates). Requests for the base model, and every other route,
      go to any engine replica. POST /v1/adapters, DELETE /v1/adapters/{name} and
      GET /health/replicas go to every engine replica and answer with what each one did.
  flora (`FloraServer`, `deployment.num_replicas` or autoscaled): each replica owns one engine,
      runs its step loop on a thread beside the HTTP handlers (`build_http_app`, run in-process
      on the requests the ingress relays, `serving.relay`), and every request joins that
      engine's batches whatever adapter it names: affinity decides where an adapter lives, not
      what a forward mixes.

Why this shape: an OpenAI client names the adapter in the JSON body, which Serve's proxy does
not read, so a deployment of ours must read it and set the routing key. `serve.multiplexed` is
used only for what it is good at, knowing which replica holds which adapter: its loader just
resolves the name (the engine loads adapters into slots itself) and its per-replica limit is
the engine's adapter slots, so both evict least-recently-used names alike. (Not `serve.batch`
keyed by the multiplexed id: that groups requests per adapter, the opposite of what FLoRA is
for.) Serve offers no public way to call one given replica, so broadcasts go the other way:
every engine replica long-polls the ingress's `ReplicaDirectory` (`serving.directory`) for
requests to run, which is also why the ingress has one replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.config import BackpressureConfig

from flora_platform.config import ConfigError, from_dict, to_dict
from flora_platform.serving.api import build_http_app
from flora_platform.serving.directory import ReplicaDirectory
from flora_platform.serving.config import DeploymentSpec, ServeConfig, default_tracking_uri, parse_args, resolve_paths
from flora_platform.serving.health import check
from flora_platform.serving.relay import build_ingress_app, collect, run_asgi
from flora_platform.serving.model import is_speech_model, resolve_base
from flora_platform.serving.service import CompletionService
from flora_platform.serving.transcription import TranscriptionService
from serve_apps.metrics import ReplicaMetrics

log = logging.getLogger("ray.serve")

REPO = Path(__file__).resolve().parents[1]  # relative paths in the config are relative to the repository
LIBRARY_LOGGERS = ("flora_platform", "flora.engine")
INGRESS = "ingress"  # the ingress deployment's name, which engine replicas poll
POLL_WAIT_S = 2.0  # an engine replica's long poll of the directory; silent for 3× this, it is dropped


@serve.deployment(name="flora")
class FloraServer:
    """One engine replica: the service and its HTTP app, reached through the ingress."""

    async def __init__(self, config: dict, tracking_uri: str):
        self.cfg = cfg = from_dict(ServeConfig, config)
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
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app = build_http_app(self.service, api_key, {"replica": self.replica, "pid": os.getpid()})

        # What Serve's router knows this replica holds: the names requests used, as many as
        # the banks have adapter slots (the base model's slot excluded), least recent out first.
        @serve.multiplexed(max_num_models_per_replica=cfg.model.max_slots - 1)
        async def hold(model: str):
            return await self.service.resolve(model)  # raises for unknown names: nothing is held

        self.hold = hold
        for name in cfg.adapters.preload:
            await self.service.load_adapter(name)
            await self.hold(name)
        self.directory = serve.get_deployment_handle(INGRESS, app_name=context.app_name)
        self._follow = asyncio.get_running_loop().create_task(self._follow_directory())

    async def relay(self, request: dict):
        """An HTTP request from the ingress, answered as ASGI messages (a streaming call)."""
        model = serve.get_multiplexed_model_id()
        if model:
            try:
                await self.hold(model)
            except Exception:  # noqa: BLE001 - the app answers it properly (404, 422, 503)
                pass
        async for message in run_asgi(self.app, request):
            yield message

    async def _follow_directory(self) -> None:
        """Run the requests broadcast to every replica (adapter loads and unloads, /health)."""
        cursor = None
        while True:
            try:
                cursor, requests = await self.directory.poll.remote(self.replica, cursor, POLL_WAIT_S)
                for seq, request in requests:
                    status, body = await collect(self.app, request)
                    if status == 200 and request["method"] == "POST" and request["path"] == "/v1/adapters":
                        await self.hold(body["id"])  # loaded here: tell the router
                    await self.directory.report.remote(self.replica, seq, {"status": status, "body": body})
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the ingress restarting, or this replica stopping
                log.warning("polling the ingress for broadcast requests failed; retrying", exc_info=True)
                await asyncio.sleep(1.0)

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; after 3 raises in a row it replaces the
        replica. Raises when the engine loop (or the transcriber's batch thread) has stopped, has
        stalled with requests waiting, or fails every forward (`serving.health`)."""
        check(self.service.health_status(), self.cfg.health)

    def __del__(self):
        if getattr(self, "_follow", None) is not None:
            self._follow.cancel()
        self.metrics.stop()
        self.service.close()


@serve.deployment(name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class FloraIngress:
    """The HTTP entry: routes by adapter, broadcasts adapter loads and unloads (module docstring)."""

    def __init__(self, engines: DeploymentHandle, config: dict):
        cfg = from_dict(ServeConfig, config)
        _log_through_serve(LIBRARY_LOGGERS)
        self.engines = engines
        self.directory = ReplicaDirectory(expiry_s=3 * POLL_WAIT_S)
        self.broadcast_timeout_s = cfg.limits.request_timeout_s
        self.base_models = frozenset({cfg.model.public_name, "base"})
        self.retry_after_s = cfg.limits.retry_after_s

    def __serve_build_asgi_app__(self):
        return build_ingress_app(self._send, self._broadcast, base_models=self.base_models,
                                 busy=(BackPressureError,), retry_after_s=self.retry_after_s)

    async def _send(self, request: dict, model: str | None):
        handle = self.engines.options(method_name="relay", stream=True)
        if model is not None:
            handle = handle.options(multiplexed_model_id=model)
        messages = handle.remote(request)
        try:
            async for message in messages:
                yield message
        finally:
            messages.cancel()  # a no-op once the answer is complete

    async def _broadcast(self, request: dict) -> dict:
        return await self.directory.broadcast(request, self.broadcast_timeout_s)

    # Called by the engine replicas through a handle.
    async def poll(self, replica: str, cursor: int | None, wait_s: float):
        return await self.directory.poll(replica, cursor, wait_s)

    async def report(self, replica: str, seq: int, answer: dict) -> None:
        await self.directory.report(replica, seq, answer)


def build_app(args: dict) -> Application:
    """The application `serve run` / `serve deploy` builds from a config's args (Serve calls an
    application builder with that one dictionary)."""
    return build_app_with(args, FloraServer)


def build_app_with(args: dict, deployment: Deployment) -> Application:
    """`build_app` with another engine deployment: a test's subclass of FloraServer
    (`tests/serve_apps/faulty_server.py` adds fault switches)."""
    _log_through_serve(LIBRARY_LOGGERS)  # building the embedded base takes minutes: show its progress
    cfg = resolve_paths(parse_args(args), REPO)
    tracking_uri = default_tracking_uri(cfg) if cfg.registry.enabled else ""
    cfg = dataclasses.replace(cfg, model=resolve_base(cfg.model, tracking_uri))
    d = cfg.deployment
    options = dict(
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        # Above the engine's own bound, so that a full replica answers 429 itself; beyond the
        # queue in front of the replicas (the ingress's handle) the ingress answers 503 with Retry-After.
        max_ongoing_requests=d.max_ongoing_requests or cfg.capacity + 16,
        max_queued_requests=d.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.limits.retry_after_s),
        health_check_period_s=d.health_check_period_s,
        health_check_timeout_s=d.health_check_timeout_s,
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
    engines = deployment.options(**options).bind(service_config, tracking_uri)
    # The ingress holds every request on its way: room for all engine replicas' and their queue.
    most_replicas = max(d.num_replicas, a.max_replicas)
    ingress_ongoing = options["max_ongoing_requests"] * most_replicas + max(d.max_queued_requests, 0) + most_replicas + 16
    return FloraIngress.options(max_ongoing_requests=ingress_ongoing).bind(engines, service_config)


def _log_through_serve(names: tuple[str, ...]) -> None:
    """Send these loggers' records to Serve's replica log (JSON with the request id when the
    config asks for it); Serve configures only its own `ray.serve` logger."""
    serve_logger = logging.getLogger("ray.serve")
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = list(serve_logger.handlers)
        logger.setLevel(logging.INFO)
        logger.propagate = False
