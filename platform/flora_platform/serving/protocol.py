"""The OpenAI completions and chat-completions wire format: requests checked, responses built.

Requests are plain JSON objects checked field by field (`ApiError(400)` names the field), so
that the `openai` client works unchanged and a mistake gets a message rather than a 422 dump.
Differences from OpenAI's API, on purpose: `model` names an adapter; `logprobs` allows up to
`MAX_LOGPROBS` alternatives; `top_k` and `ignore_eos` are accepted as extensions; parameters
this server cannot honour (`echo`, `best_of` > n, `suffix`, penalties, `logit_bias`) are refused
rather than ignored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from flora.engine.request import MAX_LOGPROBS
from flora_platform.serving.config import LimitsSpec

MAX_STOP = 4


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    logprobs: int | None
    ignore_eos: bool


@dataclass(frozen=True)
class CompletionParams:
    model: str
    prompts: list  # each a str or a list of token ids
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class ChatParams:
    model: str
    messages: list[dict]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


# --------------------------------------------------------------------------- checks

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
           "stream_options", "user", "ignore_eos", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def parse_completion(body, limits: LimitsSpec) -> CompletionParams:
    body = _object(body, COMPLETION_FIELDS)
    if body.get("echo"):
        raise _bad("echo", "not supported: the response holds the completion only")
    if body.get("suffix"):
        raise _bad("suffix", "not supported (no fill-in-the-middle)")
    prompts = _prompts(body.get("prompt"))
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _bad("logprobs", f"must be an integer in 0..{MAX_LOGPROBS} or null, got {logprobs!r}")
    sampling = _sampling(body, limits, "max_tokens", logprobs, len(prompts))
    best_of = body.get("best_of")
    if best_of is not None and best_of != sampling.n:
        raise _bad("best_of", "not supported: leave it out (or equal to n)")
    stream, usage = _stream(body)
    return CompletionParams(_model(body), prompts, sampling, stream, usage)


def parse_chat(body, limits: LimitsSpec) -> ChatParams:
    body = _object(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "must be an object with a string role and content")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"messages[{i}].content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        clean.append({"role": m["role"], "content": content})
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise _bad("logprobs", f"must be true or false, got {want!r}")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_LOGPROBS):
        raise _bad("top_logprobs", f"must be an integer in 0..{MAX_LOGPROBS}, got {top!r}")
    if top is not None and not want:
        raise _bad("top_logprobs", "needs logprobs: true")
    if "max_completion_tokens" in body and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    sampling = _sampling(body, limits, "max_tokens", (top or 0) if want else None, 1)
    stream, usage = _stream(body)
    return ChatParams(_model(body), clean, sampling, stream, usage)


def _object(body, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise _bad(unknown[0], f"unknown parameter; supported: {', '.join(sorted(known))}")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(name, "not supported: leave it out or 0")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "not supported")
    return body


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: the base model's name, an adapter name, or <name>@<alias>")
    return model


def _prompts(prompt) -> list:
    """str | [str] | [int] | [[int]] → a list of prompts, each a str or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise _bad("prompt", "must be a string, a list of strings, a list of token ids, or a list of such lists (none empty)")


def _sampling(body: dict, limits: LimitsSpec, tokens_field: str, logprobs: int | None, prompts: int) -> Sampling:
    max_tokens = body.get("max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default for completions
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(tokens_field, f"must be an integer >= 1, got {max_tokens!r}")
    if max_tokens > limits.max_tokens:
        raise _bad(tokens_field, f"{max_tokens} is above this server's limit of {limits.max_tokens}")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("top_p", "must be > 0")
    top_k = body.get("top_k", 0)
    if top_k is None:
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise _bad("top_k", f"must be an integer >= 0 (0 = off), got {top_k!r}")
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or n < 1:
        raise _bad("n", f"must be an integer >= 1, got {n!r}")
    if n * prompts > limits.max_choices:
        raise _bad("n", f"{prompts} prompt(s) × n={n} choices is above this server's limit of {limits.max_choices}")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("seed", f"must be an integer or null, got {seed!r}")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "must be true or false")
    return Sampling(max_tokens, temperature, top_p, top_k, n, tuple(stop), seed, logprobs, ignore_eos)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise _bad(name, f"must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise _bad("stream_options", "only {\"include_usage\": true|false} is supported")
    if options and not stream:
        raise _bad("stream_options", "only allowed with stream: true")
    return stream, bool(options.get("include_usage"))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- responses


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


def completion_logprobs(choice: Choice) -> dict:
    return {"tokens": choice.tokens, "token_logprobs": choice.token_logprobs,
            "top_logprobs": choice.top_logprobs, "text_offset": choice.offsets}


def chat_logprobs(choice: Choice) -> dict:
    content = []
    for tok, lp, top in zip(choice.tokens, choice.token_logprobs, choice.top_logprobs or [{}] * len(choice.tokens)):
        content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()]})
    return {"content": content}


def completion_body(rid: str, model: str, choices: list[Choice], usage: dict, want_logprobs: bool) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": completion_logprobs(c) if want_logprobs else None} for c in choices],
        "usage": usage,
    }


def chat_body(rid: str, model: str, choices: list[Choice], usage: dict, want_logprobs: bool) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason,
                     "logprobs": chat_logprobs(c) if want_logprobs else None} for c in choices],
        "usage": usage,
    }


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
