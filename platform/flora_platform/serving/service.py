"""One engine per process, shared by every request, whatever adapter it names.

    service = CompletionService(cfg, tracking_uri=...)       # loads the model, starts the engine loop
    target = await service.resolve("flora-python@champion")  # name → engine key, adapter read
    run = service.submit([Request(...), ...])                 # admission: 429 beyond the bounded queue
    async for index, item in run.events(deadline): ...        # TokenEvents, then a RequestOutput each

The engine loop runs on its own thread (`Engine.run_forever`), next to the event loop that serves
HTTP; every admitted request joins the engine's next step, so requests for different adapters
share forward passes. Each engine request has a pump thread that moves its tokens from the
engine's handle onto the event loop (handles block; the event loop must not); the pumps are
bounded by the admission limit, so threads never pile up. Cancelling a run (client gone,
timeout) cancels its engine requests, which leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import flora
from flora.engine import Engine, EngineConfig, Request, RequestHandle, RequestOutput, SamplingParams, TokenEvent
from flora_platform.serving.config import ServeConfig
from flora_platform.serving.model import load_model
from flora_platform.serving.protocol import Choice, Sampling
from flora_platform.serving.sources import AdapterSources, Target
from flora_platform.serving.text import TextStream

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The replica's queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadPrompt(ValueError):
    """A prompt this model cannot run: empty, too long with max_tokens, or a chat without a
    chat template (HTTP 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestRecord:
    """One finished HTTP request, for counters, histograms and the log."""

    request_id: str
    model: str
    source: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None


class Run:
    """The engine requests of one HTTP request, their events merged onto one asyncio queue."""

    def __init__(self, handles: list[RequestHandle], queue: asyncio.Queue):
        self.handles = handles
        self.queue = queue
        self.started_s = time.monotonic()
        self.first_token_s: float | None = None

    async def events(self, deadline_s: float) -> AsyncIterator[tuple[int, TokenEvent | RequestOutput]]:
        """(choice index, TokenEvent) as tokens come, and (index, RequestOutput) as each ends.
        Raises TimeoutError once `deadline_s` (time.monotonic) has passed."""
        remaining = len(self.handles)
        while remaining:
            timeout = deadline_s - time.monotonic()
            if timeout <= 0:
                raise TimeoutError
            index, item = await asyncio.wait_for(self.queue.get(), timeout)
            if isinstance(item, RequestOutput):
                remaining -= 1
            elif self.first_token_s is None:
                self.first_token_s = time.monotonic()
            yield index, item

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.done:
                handle.cancel()

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.started_s


class ChoiceBuilder:
    """Text deltas, logprobs and the finish reason of one choice, as its tokens arrive."""

    def __init__(self, index: int, decode: Callable[[list[int]], str], token_text: Callable[[int], str], stop):
        self.choice = Choice(index)
        self.stream = TextStream(decode, stop)
        self.token_text = token_text
        self.completion_tokens = 0

    def token(self, event: TokenEvent) -> tuple[str, dict | None]:
        """The new text and, if asked for, this token's logprobs (completions format)."""
        self.completion_tokens += 1
        offset = len(self.choice.text)
        delta = self.stream.push(event.token_id)
        self.choice.text += delta
        if event.logprob is None:
            return delta, None
        c = self.choice
        c.tokens.append(self.token_text(event.token_id))
        c.token_logprobs.append(event.logprob)
        c.top_logprobs.append({self.token_text(t): lp for t, lp in (event.top_logprobs or ())})
        c.offsets.append(offset)
        return delta, {"tokens": c.tokens[-1:], "token_logprobs": c.token_logprobs[-1:],
                       "top_logprobs": c.top_logprobs[-1:], "text_offset": c.offsets[-1:]}

    def finish(self, output: RequestOutput) -> str:
        delta = self.stream.finish()
        self.choice.text += delta
        # A stop string the engine did not see (it only checks text complete at each step) still ends the text.
        self.choice.finish_reason = "stop" if self.stream.stopped else output.finish_reason
        return delta


class AdapterService:
    """What every replica's service has, whatever it generates: the model with adapter banks,
    adapter sources (directory and registry), name resolution off the event loop, request
    records, admission up to `capacity`. Subclasses add their engine, `load_adapter`,
    `unload_key`, `alive` and `engine_snapshot` (and `health_status` where the engine reports
    its steps)."""

    def __init__(self, cfg: ServeConfig, model, *, tracking_uri: str = "", on_record: Callable[[RequestRecord], None] | None = None):
        self.cfg = cfg
        self.model = model
        self.banks = flora.banks_of(model)
        self.model_name = cfg.model.public_name
        self.sources = AdapterSources(
            cfg.adapters, cfg.registry, tracking_uri=tracking_uri,
            base_names={self.model_name}, check_fits=self.banks.check_fits, base_model=cfg.model.name,
        )
        self.forwards = ForwardStats()
        self.banks.routing.observe(self.forwards.observe)
        self.on_record = on_record
        self.capacity = cfg.capacity
        self._io = ThreadPoolExecutor(4, thread_name_prefix="flora-adapters")
        self._names: dict[str, set[str]] = defaultdict(set)  # engine key -> names clients used for it
        self.requests: Counter[tuple[str, int]] = Counter()  # (model as requested, HTTP status)
        # Requests naming an adapter, by whether it was in this replica's banks when they arrived
        # (what adapter-affinity routing is for: "resident" / "not_resident").
        self.arrivals: Counter[str] = Counter()
        self._inflight = 0  # engine requests admitted and not yet finished
        self._lock = threading.Lock()

    def admit(self, count: int) -> None:
        """Count `count` more engine requests in, all or none: Overloaded when the replica is full."""
        with self._lock:
            if self._inflight + count > self.capacity:
                raise Overloaded(
                    f"this replica is full ({self._inflight} requests running or queued, limit {self.capacity}): "
                    f"retry after {self.cfg.limits.retry_after_s:g} s",
                    self.cfg.limits.retry_after_s,
                )
            self._inflight += count

    def release(self, count: int) -> None:
        with self._lock:
            self._inflight -= count

    def engine_snapshot(self) -> dict:
        raise NotImplementedError

    def health_status(self) -> dict:
        """What `serving.health.diagnose` judges; here only whether the engine thread runs."""
        return {"alive": self.alive}

    def snapshot(self) -> dict:
        with self._lock:
            inflight = self._inflight
        return {
            "health": self.health_status(),
            "engine": self.engine_snapshot(),
            "inflight": inflight,
            "capacity": self.capacity,
            "forwards": self.forwards.snapshot(),
            "adapters_resident": self.resident(),
            "adapter_arrivals": dict(self.arrivals),
            "requests": self.requests_snapshot(),
        }

    async def preload(self, names) -> None:
        for name in names:
            await self.load_adapter(name)

    async def in_thread(self, fn, *args):
        """Run blocking adapter-source work (disk, MLflow) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def resolve(self, model: str, fresh: bool = False) -> Target:
        """The engine key of `model`, its adapter read and checked (404 / 422 / 503 errors)."""
        target = await self.in_thread(self.sources.resolve, model, fresh)
        if target.key is not None:
            if fresh:
                self.sources.forget(target.key)
            await self.in_thread(self.sources.fetch, target.key)
            for key, names in self._names.items():  # a moved alias names one version at a time
                if key != target.key:
                    names.discard(model)
            self._names[target.key].add(model)
        return target

    def count_arrival(self, target: Target) -> None:
        if target.key is not None:
            self.arrivals["resident" if target.key in self.banks.names else "not_resident"] += 1

    async def load_adapter(self, model: str) -> Target:
        raise NotImplementedError

    def unload_key(self, key: str) -> bool:
        """Drop an engine key from the banks between forwards (AdapterInUse while requests use it)."""
        raise NotImplementedError

    async def unload_adapter(self, model: str) -> tuple[Target, bool]:
        target = await self.in_thread(self.sources.resolve, model, False)  # no download just to unload
        if target.key is None:
            raise ValueError("the base model cannot be unloaded")
        unloaded = await asyncio.get_running_loop().run_in_executor(None, self.unload_key, target.key)
        self.sources.forget(target.key)
        return target, unloaded

    def resident(self) -> dict[str, list[str]]:
        """Engine key -> the names clients used for it, for every adapter in the banks."""
        return {key: sorted(self._names.get(key) or {key}) for key in list(self.banks.names)}

    def record(self, record: RequestRecord) -> None:
        self.requests[(record.model, record.status)] += 1
        log.info(
            "request %s model=%s source=%s status=%d prompt_tokens=%d completion_tokens=%d ttft_s=%s latency_s=%.3f",
            record.request_id, record.model, record.source, record.status, record.prompt_tokens,
            record.completion_tokens, "-" if record.ttft_s is None else f"{record.ttft_s:.3f}", record.latency_s,
        )
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.exception("recording request metrics failed")

    def requests_snapshot(self) -> dict[str, dict[str, int]]:
        per_model: dict[str, dict[str, int]] = defaultdict(dict)
        for (model, status), count in sorted(self.requests.items()):
            per_model[model][str(status)] = count
        return dict(per_model)

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)


class CompletionService(AdapterService):
    """The model, its engine and adapter sources of one replica, with admission and statistics."""

    def __init__(self, cfg: ServeConfig, *, tracking_uri: str = "", on_record: Callable[[RequestRecord], None] | None = None):
        model, self.tokenizer = load_model(cfg.model)
        super().__init__(cfg, model, tracking_uri=tracking_uri, on_record=on_record)
        e = cfg.engine
        self.engine = Engine(
            self.model, loader=self.sources, detokenize=self.decode,
            config=EngineConfig(
                max_batch_rows=e.max_batch_rows, max_batch_tokens=e.max_batch_tokens, load_threads=e.load_threads,
                block_size=e.block_size, kv_cache_tokens=e.kv_cache_tokens or None,
                kv_memory_fraction=e.kv_memory_fraction, prefix_caching=e.prefix_caching,
            ),
        )
        self.context_len = self.engine.context_len
        # The longest prompt the KV pool can take (the context, unless the pool is smaller).
        self.max_prompt_tokens = cfg.limits.max_prompt_tokens or self.engine.max_seq_len - 1
        self._pumps = ThreadPoolExecutor(self.capacity + 8, thread_name_prefix="flora-stream")
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self.engine.run_forever, name="flora-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ lifecycle

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health_status(self) -> dict:
        """The engine's step figures (read without a lock: the engine thread may be stuck)."""
        with self._lock:
            inflight = self._inflight
        engine = self.engine
        return {
            "alive": self.alive,
            "has_work": inflight > 0 or engine.has_work,
            "last_ok_step_age_s": round(time.monotonic() - engine.last_ok_step_s, 3),
            "failed_steps": engine.failed_steps,
        }

    def close(self) -> None:
        self.engine.close()  # fails what is in flight as "cancelled": every pump ends
        self._pumps.shutdown(wait=False, cancel_futures=True)
        super().close()

    # ------------------------------------------------------------------ text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """A token as logprobs name it: its text, or, for a piece of a character (which decodes
        to the replacement character and would collide with other such pieces), its vocabulary entry."""
        text = self.tokenizer.decode([token_id])
        return self.tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text

    def encode(self, prompt: str | list[int], *, special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]

    def render_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadPrompt(
                f"{self.model_name} has no chat template: use /v1/completions, or set model.chat_template", "messages"
            )
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text, special_tokens=False)  # the template writes its own special tokens

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise BadPrompt("prompt is empty: give at least one token", "prompt")
        if len(ids) > self.max_prompt_tokens:
            raise BadPrompt(
                f"prompt has {len(ids)} tokens; this server takes at most {self.max_prompt_tokens}", "prompt"
            )
        if len(ids) + max_tokens > self.context_len:
            raise BadPrompt(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceed the model's context of "
                f"{self.context_len} tokens: lower max_tokens to at most {self.context_len - len(ids)}", "max_tokens"
            )

    # ------------------------------------------------------------------ adapters

    async def load_adapter(self, model: str) -> Target:
        """Resolve `model` afresh (a moved alias is seen now) and copy it into a slot by running
        one token through it. A directory adapter already resident is read from disk again."""
        target = await self.resolve(model, fresh=True)
        if target.key is None:
            return target
        if target.source == "directory":
            await asyncio.get_running_loop().run_in_executor(None, self.engine.unload_adapter, target.key)
        prompt = [self.tokenizer.eos_token_id or 0]
        run = self.submit([Request(prompt, adapter=target.key, max_new_tokens=1, ignore_eos=True,
                                   request_id=f"load-{next(self._ids)}")])
        try:
            async for _, item in run.events(time.monotonic() + self.cfg.limits.request_timeout_s):
                if isinstance(item, RequestOutput):
                    item.raise_for_error()
        finally:
            run.cancel()
        return target

    def unload_key(self, key: str) -> bool:
        return self.engine.unload_adapter(key)

    # ------------------------------------------------------------------ requests

    def engine_requests(self, request_id: str, target: Target, prompts: list[list[int]], s: Sampling) -> list[Request]:
        """One engine request per choice, in OpenAI's order: prompt-major, then n."""
        out = []
        for p, ids in enumerate(prompts):
            for j in range(s.n):
                sampling = SamplingParams(
                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                    seed=None if s.seed is None else s.seed + j, logprobs=s.logprobs,
                )
                out.append(Request(
                    ids, adapter=target.key, max_new_tokens=s.max_tokens, sampling=sampling,
                    stop_strings=s.stop, ignore_eos=s.ignore_eos, request_id=f"{request_id}-{p * s.n + j}",
                ))
        return out

    def submit(self, requests: list[Request]) -> Run:
        """Admit all of `requests` or none (Overloaded) and start streaming their events."""
        self.admit(len(requests))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles: list[RequestHandle] = []
        try:
            for request in requests:
                handles.append(self.engine.add_request(request))
        except BaseException:
            for h in handles:
                h.cancel()
            self.release(len(requests) - len(handles))
            for i, h in enumerate(handles):
                self._pumps.submit(self._pump, i, h, loop, queue)
            raise
        for i, h in enumerate(handles):
            self._pumps.submit(self._pump, i, h, loop, queue)
        return Run(handles, queue)

    def _pump(self, index: int, handle: RequestHandle, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Worker thread: forward one handle's events to the event loop until the request ends."""
        try:
            for event in handle:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            loop.call_soon_threadsafe(queue.put_nowait, (index, handle.result()))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            handle.cancel()
            handle.result()
        finally:
            self.release(1)

    def engine_snapshot(self) -> dict:
        return self.engine.metrics.snapshot()


class ForwardStats:
    """How many adapters each forward pass mixes: the point of FLoRA, observed on the adapter routes
    (one per engine step; one per batch of the transcriber, whose `generate` reuses it per token)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.forwards = 0
        self.mixed = 0  # forwards whose rows use two or more different slots (base included)
        self.max_adapters = 0  # most distinct adapters (base excluded) in one forward
        self.adapters_total = 0

    def observe(self, route) -> None:
        """Called with every route the banks are given (`RouteState.observe`)."""
        adapters = route.plan.adapters
        with self._lock:
            self.forwards += 1
            self.mixed += len(route.active_slots) > 1
            self.max_adapters = max(self.max_adapters, adapters)
            self.adapters_total += adapters

    def snapshot(self) -> dict:
        with self._lock:
            return {"forwards": self.forwards, "mixed_forwards": self.mixed, "max_adapters_per_forward": self.max_adapters,
                    "mean_adapters_per_forward": self.adapters_total / self.forwards if self.forwards else 0.0}
