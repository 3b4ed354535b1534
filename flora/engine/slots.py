"""Adapter slots for the engine: load adapters by name in the background, copy them into the
banks between steps, pin them while requests use them, evict the least recently used.

A loader is any callable `name -> flora.Adapter` (for example `DirectoryLoader(root)`); it runs
on a background thread, together with the check that the adapter fits the banks, so that a
slow or failing load delays only the requests for that adapter. The copy into a slot
(`AdapterBanks.load`) happens on the engine thread, between forwards, in `acquire`. When no
slot is free, the least recently used adapter that no admitted request uses is unloaded.
Everything but `check` runs on the engine thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

import flora
from flora.adapter import Adapter, load_adapter
from flora.bank import BASE_NAME, BASE_SLOT, AdapterBanks
from flora.engine.request import RequestRejected
from flora.engine.scheduler import Admission

log = logging.getLogger(__name__)

Loader = Callable[[str], Adapter]


def route_rows(banks: AdapterBanks | None, slots: list[int]):
    """The context in which a forward runs row b through slot `slots[b]` (a plain model: none)."""
    if banks is None:
        return contextlib.nullcontext()
    return flora.route(banks, torch.tensor(slots, dtype=torch.long))


class AdapterUnavailable(RuntimeError):
    """An adapter that cannot be served (unknown, unreadable, or made for another model)."""


class AdapterInUse(RuntimeError):
    """An adapter that cannot be unloaded now because admitted requests use it."""


class DirectoryLoader:
    """Adapters stored as `root/<name>/` directories (flora or PEFT format, see `flora.adapter`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, name: str) -> Path | None:
        # A name is one path component: "../x" or "a/b" must not reach outside `root`.
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            return None
        return self.root / name

    def __contains__(self, name: str) -> bool:
        path = self._path(name)
        return path is not None and path.is_dir()

    def __call__(self, name: str) -> Adapter:
        path = self._path(name)
        if path is None:
            raise KeyError(f"{name!r} is not a valid adapter name (one directory name under {self.root})")
        return load_adapter(path)


class SlotManager:
    """Which adapter is in which slot, who uses it, and what is loading."""

    def __init__(
        self,
        banks: AdapterBanks | None,
        loader: Loader | None,
        *,
        load_threads: int = 1,
        on_loaded: Callable[[], None] | None = None,
    ):
        self.banks = banks
        self.loader = loader
        self._on_loaded = on_loaded
        self._executor = ThreadPoolExecutor(load_threads, thread_name_prefix="flora-adapter-load") if loader else None
        self._loading: dict[str, Future] = {}
        self._loaded: dict[str, Adapter] = {}  # loaded and checked, waiting for a slot
        self._pins: Counter[str] = Counter()  # admitted requests per resident adapter
        self._last_used: dict[str, int] = {}
        self._clock = 0
        self.evictions = 0
        self.loads = 0

    # ------------------------------------------------------------------ any thread

    def check(self, name: str | None) -> None:
        """Reject, at once, adapters that certainly cannot be served."""
        if _is_base(name):
            return
        if self.banks is None:
            raise RequestRejected(
                f"adapter {name!r} requested, but the model has no adapter banks: "
                "call flora.inject(model, ...) before building the Engine, or send adapter=None"
            )
        if name in self.banks.names or name in self._loading or name in self._loaded:
            return
        if self.loader is None:
            raise RequestRejected(
                f"unknown adapter {name!r}: loaded are {self.banks.names}; give the Engine a loader to load others"
            )
        if hasattr(self.loader, "__contains__") and name not in self.loader:
            raise RequestRejected(f"unknown adapter {name!r}: the loader has no adapter of that name")

    # ------------------------------------------------------------------ engine thread

    @property
    def resident(self) -> list[str]:
        return self.banks.names if self.banks is not None else []

    @property
    def loading(self) -> int:
        return len(self._loading) + len(self._loaded)

    def prefetch(self, name: str | None) -> None:
        """Start loading `name` in the background unless it is resident or on its way."""
        if _is_base(name) or self.banks is None or self.loader is None:
            return
        if name in self.banks.names or name in self._loading or name in self._loaded:
            return
        assert self._executor is not None
        future = self._executor.submit(self._load, name)
        self._loading[name] = future
        if self._on_loaded is not None:
            future.add_done_callback(lambda _: self._on_loaded())

    def poll(self) -> dict[str, str]:
        """Collect finished loads; returns `{name: error}` for the loads that failed."""
        failed = {}
        for name, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[name]
            try:
                self._loaded[name] = future.result()
                self.loads += 1
            except Exception as err:  # noqa: BLE001 - any loader error fails that adapter's requests only
                log.warning("adapter %r failed to load: %s", name, err)
                failed[name] = str(err)
        return failed

    def acquire(self, name: str | None) -> tuple[Admission, int | None]:
        """Pin `name`'s slot for one request: (READY, slot), or (WAIT | BLOCKED, None).

        Copies a loaded adapter into a free slot, or into the slot of the least recently used
        adapter no admitted request uses (an eviction). Raises `AdapterUnavailable` if the copy fails.
        """
        if _is_base(name):
            return Admission.READY, BASE_SLOT
        assert self.banks is not None
        if name not in self.banks.names:
            if name not in self._loaded:
                self.prefetch(name)
                return Admission.WAIT, None
            slot = self._free_slot()
            if slot is None:
                return Admission.BLOCKED, None
            adapter = self._loaded.pop(name)
            try:
                self.banks.load(name, adapter, slot)
            except Exception as err:
                raise AdapterUnavailable(f"adapter {name!r} could not be copied into the banks: {err}") from err
            log.debug("adapter %r loaded into slot %d", name, slot)
        self._pins[name] += 1
        self._touch(name)
        return Admission.READY, self.banks.slot_of(name)

    def release(self, name: str | None) -> None:
        if _is_base(name):
            return
        self._pins[name] -= 1
        assert self._pins[name] >= 0, name
        if not self._pins[name]:
            del self._pins[name]
        self._touch(name)

    def unload(self, name: str) -> bool:
        """Drop `name` from the banks (and a finished load waiting for a slot); False if it was
        not resident. Raises `AdapterInUse` while an admitted request uses it."""
        if _is_base(name):
            raise ValueError("the base model cannot be unloaded")
        self._loaded.pop(name, None)
        if self.banks is None or name not in self.banks.names:
            return False
        if self._pins[name]:
            raise AdapterInUse(f"adapter {name!r} is in use by {self._pins[name]} running request(s); retry when they finish")
        self.banks.unload(name)
        self._last_used.pop(name, None)
        log.info("unloaded adapter %r", name)
        return True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _free_slot(self) -> int | None:
        free = [s for s in self.banks.free_slots() if s != BASE_SLOT]
        if free:
            return free[0]
        unused = [n for n in self.banks.names if not self._pins[n]]
        if not unused or self.loader is None:
            return None
        victim = min(unused, key=lambda n: self._last_used.get(n, -1))
        slot = self.banks.unload(victim)
        self._last_used.pop(victim, None)
        self.evictions += 1
        log.info("evicted adapter %r from slot %d", victim, slot)
        return slot

    def _touch(self, name: str) -> None:
        self._clock += 1
        self._last_used[name] = self._clock

    def _load(self, name: str) -> Adapter:
        """Background thread: read the adapter and check that it fits the banks."""
        assert self.loader is not None and self.banks is not None
        try:
            adapter = self.loader(name)
        except Exception as err:
            raise AdapterUnavailable(f"adapter {name!r} could not be loaded: {err!r}") from err
        if not isinstance(adapter, Adapter):
            raise AdapterUnavailable(
                f"the loader returned a {type(adapter).__name__} for {name!r}, not a flora.Adapter"
            )
        try:
            self.banks.check_fits(name, adapter.config)
        except ValueError as err:
            raise AdapterUnavailable(str(err)) from err
        return adapter


def _is_base(name: str | None) -> bool:
    return name is None or name == BASE_NAME
