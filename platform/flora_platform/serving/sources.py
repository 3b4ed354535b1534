"""Where adapters come from: what a request's `model` names, and the adapter files behind it.

    "base" | the served model's name      the base model (no adapter)
    "<name>"                              `<adapters.directory>/<name>/` (flora or PEFT format)
    "<name>@<alias>", "models:/<name>@<alias>"
                                          the version an MLflow registry alias points at
                                          (`@latest` is the newest version)
    "models:/<name>/<version>"            one registered version

A request's `model` resolves to a `Target` whose `key` is the engine's adapter name: the directory
name, or `models:/<name>/<version>` for the registry. An alias is looked up again once its answer
is `refresh_interval_s` old (or at once with `fresh=True`); a moved alias gives a new key, so
requests already running finish on the old version while new ones load the new one, and the old
version leaves the banks when the engine needs its slot. Registered versions are downloaded once
into `cache_dir/<name>/<version>/` (versions never change) and read from there.

Everything here blocks (disk, MLflow): the service calls it on worker threads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flora
from flora.adapter import CONFIG_NAME, PEFT_CONFIG_NAME
from flora_platform.serving.config import AdapterDirSpec, RegistrySpec

log = logging.getLogger(__name__)

BASE = flora.BASE_NAME
_REF = re.compile(r"^(?:models:/)?(?P<name>[^@/\s][^@\s]*?)(?:@(?P<alias>[^@/\s]+)|/(?P<version>\d+))$")
MEMORY_CACHE_SIZE = 64  # adapters kept in memory after loading (they are small: rank × widths)


class AdapterNotFound(LookupError):
    """The `model` names nothing servable (HTTP 404)."""


class AdapterInvalid(ValueError):
    """The adapter exists but cannot be served: unreadable, or made for another base model (HTTP 422)."""


class RegistryUnavailable(RuntimeError):
    """MLflow could not be asked (HTTP 503: try again)."""


@dataclass(frozen=True)
class Target:
    """What a request's `model` resolved to. key: the engine's adapter name (None = base model)."""

    model: str
    key: str | None
    source: str  # "base" | "directory" | "registry"
    version: str = ""


def parse_registry_ref(model: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of a registry reference, or None if `model` is not one.

    A bare name is not a reference (it is looked up in the adapter directory); `models:/<name>`
    without an alias or version is rejected by the caller with a hint."""
    if "@" not in model and not model.startswith("models:/"):
        return None
    m = _REF.match(model)
    if m is None:
        return None
    return m["name"], m["alias"], m["version"]


class AdapterSources:
    """Resolve names (`resolve`), read adapters (`fetch`, also the engine's loader), list them."""

    def __init__(
        self,
        adapters: AdapterDirSpec,
        registry: RegistrySpec,
        *,
        tracking_uri: str,
        base_names: set[str],
        check_fits: Callable[[str, flora.AdapterConfig], None],
        base_model: str = "",
    ):
        self.directory = Path(adapters.directory) if adapters.directory else None
        self.cache_dir = Path(adapters.cache_dir).expanduser()
        self.registry = registry
        self.tracking_uri = tracking_uri if registry.enabled else ""
        self.base_names = {BASE, *base_names}
        self.check_fits = check_fits
        self.base_model = base_model  # the served base (directory or hub id), checked against registry runs
        self._aliases: dict[tuple[str, str], tuple[str, float]] = {}  # (name, alias) -> (version, looked up at)
        self._memory: OrderedDict[str, flora.Adapter] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._client = None
        self._listing: tuple[list[dict], float] | None = None

    # ------------------------------------------------------------------ names

    def resolve(self, model: str, fresh: bool = False) -> Target:
        if not isinstance(model, str) or not model:
            raise AdapterNotFound("model is empty: name the base model, an adapter, or <name>@<alias>")
        if model in self.base_names:
            return Target(model, None, "base")
        ref = parse_registry_ref(model)
        if ref is not None:
            return self._resolve_registry(model, *ref, fresh=fresh)
        if model.startswith("models:/"):
            raise AdapterNotFound(f"{model!r}: write models:/<name>@<alias> or models:/<name>/<version>")
        if self._directory_has(model):
            return Target(model, model, "directory")
        where = [f"the base model ({', '.join(sorted(self.base_names))})"]
        if self.directory is not None:
            where.append(f"an adapter directory under {self.directory}")
        if self.tracking_uri:
            where.append("a registry reference (<name>@<alias>, e.g. flora-python@champion, or models:/<name>/<version>)")
        raise AdapterNotFound(f"unknown model {model!r}: it is not {', nor '.join(where)}")

    def _directory_has(self, name: str) -> bool:
        if self.directory is None or name in (".", "..") or any(c in name for c in "/\\:@"):
            return False
        path = self.directory / name
        return (path / CONFIG_NAME).is_file() or (path / PEFT_CONFIG_NAME).is_file()

    def _resolve_registry(self, model: str, name: str, alias: str | None, version: str | None, fresh: bool) -> Target:
        if not self.tracking_uri:
            raise AdapterNotFound(f"{model!r} names a registry adapter, but this deployment has no registry (registry.enabled)")
        if version is None:
            version = self._alias_version(name, alias, fresh)
        else:
            self._call(lambda c: c.get_model_version(name, version), f"{name} version {version}")
        return Target(model, f"models:/{name}/{version}", "registry", version)

    def _alias_version(self, name: str, alias: str, fresh: bool) -> str:
        cached = self._aliases.get((name, alias))
        if cached and not fresh and time.monotonic() - cached[1] < self.registry.refresh_interval_s:
            return cached[0]
        try:
            version = self._call(lambda c: c.get_model_version_by_alias(name, alias), f"{name}@{alias}").version
        except RegistryUnavailable:
            if cached is None:
                raise
            log.warning("registry unreachable; keeping %s@%s -> version %s", name, alias, cached[0])
            return cached[0]
        if cached and cached[0] != str(version):
            log.info("registry alias %s@%s moved: version %s -> %s", name, alias, cached[0], version)
        self._aliases[(name, alias)] = (str(version), time.monotonic())
        return str(version)

    def _call(self, fn, what: str):
        from mlflow.exceptions import MlflowException

        try:
            if self._client is None:
                from flora_platform.tracking import client_for

                self._client = client_for(self.tracking_uri)
            return fn(self._client)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise AdapterNotFound(f"{what} is not in the registry at {self.tracking_uri}: {err.message}") from err
            raise RegistryUnavailable(f"the registry at {self.tracking_uri} failed for {what}: {err.message}") from err
        except Exception as err:  # noqa: BLE001 - database and network errors of any kind
            raise RegistryUnavailable(f"the registry at {self.tracking_uri} failed for {what}: {err!r}") from err

    # ------------------------------------------------------------------ adapters

    def fetch(self, key: str) -> flora.Adapter:
        """The adapter behind an engine key, checked against the banks; memory, then disk, then MLflow."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one download per key, however many requests wait for it
            with self._lock:
                if key in self._memory:
                    return self._memory[key]
            if key.startswith("models:/"):
                self._check_trained_base(key)
                directory = self._download(key)
            else:
                directory = self._directory_path(key)
            try:
                adapter = flora.load_adapter(directory)
                self.check_fits(key, adapter.config)
            except ValueError as err:  # AdapterLoadError is a ValueError too
                raise AdapterInvalid(f"adapter {key!r} cannot be served: {err}") from err
            with self._lock:
                self._memory[key] = adapter
                while len(self._memory) > MEMORY_CACHE_SIZE:
                    self._memory.popitem(last=False)
            return adapter

    __call__ = fetch  # the engine's loader: name -> flora.Adapter

    def forget(self, key: str) -> None:
        """Drop the in-memory copy, so the next fetch reads the files again."""
        with self._lock:
            self._memory.pop(key, None)

    def _directory_path(self, key: str) -> Path:
        if not self._directory_has(key):
            raise AdapterNotFound(f"no adapter {key!r} under {self.directory}")
        return self.directory / key

    def _check_trained_base(self, key: str) -> None:
        """Refuse a registered adapter whose fine-tuning run recorded another base model: its
        shapes may fit (same architecture and sizes) while its weights mean nothing here."""
        from flora_platform.serving.model import same_base

        name, version = key.removeprefix("models:/").rsplit("/", 1)
        mv = self._call(lambda c: c.get_model_version(name, version), key)
        try:
            trained_on = self._client.get_run(mv.run_id).data.tags.get("base_model", "") if mv.run_id else ""
        except Exception as err:  # noqa: BLE001 - a deleted run: nothing recorded to check against
            log.warning("cannot read the run of %s (%s); serving it unchecked", key, err)
            return
        if trained_on and self.base_model and not same_base(trained_on, self.base_model):
            raise AdapterInvalid(
                f"{key} was trained on base model {trained_on}, but this deployment serves {self.base_model}: "
                "serve that base (model.name), or pick a version trained on this one"
            )

    def _download(self, key: str) -> Path:
        name, version = key.removeprefix("models:/").rsplit("/", 1)
        target = self.cache_dir / re.sub(r"[^A-Za-z0-9._-]", "_", name) / version
        if (target / CONFIG_NAME).is_file() or (target / PEFT_CONFIG_NAME).is_file():
            return target
        from flora_platform.tracking import download_model

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=target.parent))
        try:
            started = time.perf_counter()
            try:
                local = download_model(self.tracking_uri, key, tmp)
            except Exception as err:  # noqa: BLE001 - MLflow and storage errors of any kind
                raise RegistryUnavailable(f"downloading {key} from {self.tracking_uri} failed: {err!r}") from err
            try:
                os.rename(local, target)  # atomic: another replica sees nothing or everything
            except OSError:
                if not target.is_dir():
                    raise
            log.info("downloaded %s to %s in %.2f s", key, target, time.perf_counter() - started)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ listing

    def available(self) -> list[dict]:
        """Adapters one could request: directory adapters and registry aliases (cached like aliases)."""
        now = time.monotonic()
        if self._listing and now - self._listing[1] < self.registry.refresh_interval_s:
            return self._listing[0]
        found = []
        if self.directory is not None and self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if self._directory_has(path.name):
                    found.append({"id": path.name, "source": "directory", "root": path.name})
        if self.tracking_uri:
            prefix = self.registry.name_prefix.replace("'", "")
            try:
                models = self._call(
                    lambda c: c.search_registered_models(filter_string=f"name LIKE '{prefix}%'" if prefix else None),
                    "the registered models",
                )
            except (RegistryUnavailable, AdapterNotFound) as err:
                log.warning("cannot list registry adapters: %s", err)
                models = []
            for rm in models:
                for alias, version in sorted((rm.aliases or {}).items()):
                    found.append({"id": f"{rm.name}@{alias}", "source": "registry", "root": f"models:/{rm.name}/{version}"})
                found.append({"id": f"{rm.name}@latest", "source": "registry", "root": f"models:/{rm.name}@latest"})
        self._listing = (found, now)
        return found
