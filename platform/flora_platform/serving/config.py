"""The serving config: frozen dataclasses built from a Serve config's `args` (or `key.sub=value`s).

    serve run serve_apps/flora.yaml                                   # args from the YAML
    serve run serve_apps.flora_server:build_app model.max_slots=32    # or from the command line

Every check names the field: `limits.max_tokens: must be >= 1, got 0`. Relative paths are
resolved against one root (the repository, where `serve run` is started) by `resolve_paths`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flora_platform.config import ConfigError, from_dict

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def _at_least(section: str, obj, names: tuple[str, ...], low: float) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < low:
            raise ConfigError(f"{section}.{name}", f"must be >= {low:g}, got {value}")


@dataclass(frozen=True)
class ModelSpec:
    """The base model and its adapter banks.

    name: "embedded" (the small code model the fine-tuning job builds and trains adapters for),
        a local model directory, or a Hugging Face hub id.
    finetune_config / finetune_overrides: for "embedded", the fine-tuning job config whose base
        model to serve (same corpus and settings give the same cached model; built if missing).
    served_name: the `model` id clients use for the base model ("base" always works too).
    targets: adapted modules (patterns or a preset name); () = the architecture's preset, which
        is what the fine-tuning job adapts.
    max_slots: adapters resident at once per replica, the base model's slot included.
    torch_threads: intra-op threads of this replica (0 = torch's default); match num_cpus.
    chat_template: a Jinja chat template for /v1/chat/completions ("" = the tokenizer's own).
    """

    name: str = "embedded"
    finetune_config: str = "jobs/configs/default.yaml"
    finetune_overrides: tuple[str, ...] = ()
    served_name: str = ""
    targets: tuple[str, ...] = ()
    max_slots: int = 16
    max_rank: int = 8
    max_lora_rank: int = 8
    dtype: str = "auto"
    device: str = "auto"
    torch_threads: int = 0
    chat_template: str = ""

    def __post_init__(self):
        if not self.name:
            raise ConfigError("model.name", "give 'embedded', a model directory or a hub id")
        if self.max_slots < 2:
            raise ConfigError("model.max_slots", f"must be >= 2 (slot 0 is the base model), got {self.max_slots}")
        _at_least("model", self, ("max_rank",), 1)
        _at_least("model", self, ("max_lora_rank", "torch_threads"), 0)
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype", f"{self.dtype!r} is not one of {DTYPES}")
        if self.device not in DEVICES:
            raise ConfigError("model.device", f"{self.device!r} is not one of {DEVICES}")

    @property
    def public_name(self) -> str:
        return self.served_name or self.name


@dataclass(frozen=True)
class EngineSpec:
    """The continuous-batching engine of each replica (see `flora.engine.EngineConfig`).

    block_size: tokens per KV block. kv_cache_tokens: the KV pool's size in tokens (0 = sized
    from free memory: `kv_memory_fraction` of it on a GPU). prefix_caching: reuse the KV blocks
    of a prompt prefix seen before under the same adapter.
    """

    max_batch_rows: int = 16
    max_batch_tokens: int = 512
    load_threads: int = 2
    block_size: int = 16
    kv_cache_tokens: int = 0
    kv_memory_fraction: float = 0.9
    prefix_caching: bool = True

    def __post_init__(self):
        _at_least("engine", self, ("max_batch_rows", "load_threads", "block_size"), 1)
        _at_least("engine", self, ("kv_cache_tokens",), 0)
        if self.block_size & (self.block_size - 1):
            raise ConfigError("engine.block_size", f"must be a power of two, got {self.block_size}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError("engine.kv_memory_fraction", f"must be in (0, 1], got {self.kv_memory_fraction}")
        if self.max_batch_tokens < self.max_batch_rows:
            raise ConfigError(
                "engine.max_batch_tokens",
                f"{self.max_batch_tokens} < engine.max_batch_rows={self.max_batch_rows}: every row needs a token per step",
            )


@dataclass(frozen=True)
class AdapterDirSpec:
    """directory: adapters as `<directory>/<name>/` (flora or PEFT format); "" = none.
    cache_dir: where registry adapters are downloaded, one folder per registered version.
    preload: adapter names (or `<name>@<alias>`) loaded when a replica starts."""

    directory: str = ""
    cache_dir: str = "~/.cache/flora/adapters"
    preload: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistrySpec:
    """The MLflow registry the fine-tuning job writes: `<name>@<alias>` or `models:/<name>/<version>`.

    tracking_uri: "" = $MLFLOW_TRACKING_URI, else the fine-tuning config's store.
    name_prefix: registered models listed by GET /v1/models (any registered name is servable).
    refresh_interval_s: how long an alias → version answer is trusted; a moved alias is
        picked up after at most this long, or at once by POST /v1/adapters.
    """

    enabled: bool = True
    tracking_uri: str = ""
    name_prefix: str = "flora-"
    refresh_interval_s: float = 30.0

    def __post_init__(self):
        _at_least("registry", self, ("refresh_interval_s",), 0)


@dataclass(frozen=True)
class LimitsSpec:
    """Per replica. max_queued_requests: engine requests waiting beyond the running rows; more
    are answered 429 with Retry-After. request_timeout_s: a request still unfinished is
    cancelled (504). max_prompt_tokens: 0 = the model's context. max_choices: prompts × n of one
    request. max_audio_bytes: the largest upload to /v1/audio/transcriptions (OpenAI's limit)."""

    max_queued_requests: int = 32
    request_timeout_s: float = 120.0
    max_tokens: int = 512
    max_prompt_tokens: int = 0
    max_choices: int = 8
    max_body_bytes: int = 1 << 20
    max_audio_bytes: int = 25 << 20
    retry_after_s: float = 1.0

    def __post_init__(self):
        _at_least("limits", self, ("max_queued_requests", "max_prompt_tokens", "retry_after_s"), 0)
        _at_least("limits", self, ("max_tokens", "max_choices", "max_body_bytes", "max_audio_bytes"), 1)
        if not self.request_timeout_s > 0:
            raise ConfigError("limits.request_timeout_s", f"must be > 0, got {self.request_timeout_s}")


@dataclass(frozen=True)
class SecuritySpec:
    """api_key_env: the environment variable holding the API key clients must send
    (`Authorization: Bearer <key>` or `X-API-Key`); "" = no key (loopback deployments)."""

    api_key_env: str = ""


@dataclass(frozen=True)
class HealthSpec:
    """When a replica reports itself unhealthy, so that Serve replaces it (see `serving.health`).

    stall_timeout_s: requests are queued or running and no engine step has ended well for this
        long (a hung kernel, a deadlock). Above the slowest legitimate step: a first prefill, a
        CUDA graph capture.
    max_failed_steps: this many engine steps in a row had every forward fail (a sticky device
        error, memory that never comes back); a request that fails alone does not count.
    """

    stall_timeout_s: float = 60.0
    max_failed_steps: int = 8

    def __post_init__(self):
        if not self.stall_timeout_s > 0:
            raise ConfigError("health.stall_timeout_s", f"must be > 0, got {self.stall_timeout_s}")
        _at_least("health", self, ("max_failed_steps",), 1)


@dataclass(frozen=True)
class AutoscalingSpec:
    """max_replicas > 0 turns Serve's autoscaler on (then deployment.num_replicas is ignored)."""

    min_replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 8.0

    def __post_init__(self):
        _at_least("deployment.autoscaling", self, ("min_replicas", "max_replicas"), 0)
        if self.max_replicas and self.max_replicas < self.min_replicas:
            raise ConfigError(
                "deployment.autoscaling.max_replicas", f"{self.max_replicas} < min_replicas={self.min_replicas}"
            )


@dataclass(frozen=True)
class DeploymentSpec:
    """Replicas and their resources; Serve's own `deployments:` entries in a config override these.

    max_ongoing_requests: HTTP requests inside one replica (0 = the engine's rows + queue + 16,
        so that the replica's own 429 answers first). max_queued_requests: requests waiting in
        the ingress's handle when every replica is full; beyond, the ingress answers 503 with Retry-After.
    health_check_period_s / health_check_timeout_s: how often Serve calls a replica's health
        check, and how long it waits for an answer. Serve replaces a replica after 3 failed
        checks in a row (Ray 2.60), so one whose engine is unhealthy (see `HealthSpec`) is
        stopped within about 3 × health_check_period_s (× 1.1, Serve's jitter), or 3 ×
        health_check_timeout_s if the check itself hangs, and a new one started.
    """

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 0
    max_queued_requests: int = 64
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)

    def __post_init__(self):
        _at_least("deployment", self, ("num_replicas",), 1)
        _at_least("deployment", self, ("num_cpus", "num_gpus", "max_ongoing_requests"), 0)
        if self.max_queued_requests < -1:
            raise ConfigError("deployment.max_queued_requests", "must be >= 0, or -1 for no limit")
        for name in ("health_check_period_s", "health_check_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"deployment.{name}", f"must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServeConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    adapters: AdapterDirSpec = field(default_factory=AdapterDirSpec)
    registry: RegistrySpec = field(default_factory=RegistrySpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    security: SecuritySpec = field(default_factory=SecuritySpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    deployment: DeploymentSpec = field(default_factory=DeploymentSpec)

    @property
    def capacity(self) -> int:
        """Engine requests one replica holds: running rows plus the bounded queue."""
        return self.engine.max_batch_rows + self.limits.max_queued_requests


def parse_args(args: dict | None) -> ServeConfig:
    """A ServeConfig from a Serve config's `args` mapping; `a.b=value` keys (from `serve run
    module:build_app a.b=value`) are nested, their string values parsed as YAML."""
    raw: dict = {}
    for key, value in (args or {}).items():
        if "." not in key:
            raw[key] = _merge(raw.get(key), value)
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part} is not a section")
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return from_dict(ServeConfig, raw)


def _merge(old, new):
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new


def resolve_paths(cfg: ServeConfig, root: Path) -> ServeConfig:
    """Relative paths (and relative sqlite:/// URIs) made absolute against `root`; `~` expanded."""

    def path(value: str) -> str:
        if not value:
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (root / p).resolve())

    model = cfg.model
    if model.name != "embedded" and (model.name.startswith((".", "~", "/")) or (root / model.name).is_dir()):
        model = dataclasses.replace(model, name=path(model.name))
    model = dataclasses.replace(model, finetune_config=path(model.finetune_config))
    adapters = dataclasses.replace(cfg.adapters, directory=path(cfg.adapters.directory), cache_dir=path(cfg.adapters.cache_dir))
    registry = cfg.registry
    uri = registry.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        registry = dataclasses.replace(registry, tracking_uri="sqlite:///" + path(uri.removeprefix("sqlite:///")))
    return dataclasses.replace(cfg, model=model, adapters=adapters, registry=registry)


def default_tracking_uri(cfg: ServeConfig) -> str:
    """registry.tracking_uri, else $MLFLOW_TRACKING_URI, else the fine-tuning config's store."""
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from flora_platform.config import FinetuneConfig, load_config

    finetune = load_config(FinetuneConfig, cfg.model.finetune_config or None, list(cfg.model.finetune_overrides))
    return finetune.tracking_uri
