"""The HTTP API (FastAPI): OpenAI-compatible completions and chat, adapters, models, health.

    POST   /v1/completions          prompt (str | [str] | token ids), stream (server-sent events), n, ...
    POST   /v1/chat/completions     when the tokenizer has a chat template
    POST   /v1/audio/transcriptions Whisper models: multipart `file` (WAV, FLAC, MP3, OGG) + `model` (the adapter),
                                    optional `language`, `response_format` (json | text | verbose_json)
    GET    /v1/models               the base model, adapters resident and adapters available
    POST   /v1/adapters             {"model": "<name>" | "<name>@<alias>"}: resolve afresh and load
    DELETE /v1/adapters/{name}      unload from this replica's banks (409 while requests use it)
    GET    /health                  200 with the engine's figures while the replica is healthy, else 503
                                    with the reason (`serving.health`: loop stopped, stalled, failing)

These are one replica's routes. In the Serve app an ingress relays each request to one replica
(`serving.relay`), and sends POST/DELETE /v1/adapters to every replica (see serve_apps/flora_server.py).

Errors are OpenAI error bodies: 400 (the field is named), 401, 404 (unknown model), 409, 413,
422 (adapter unusable), 429 + Retry-After (queue full), 503 (registry down), 504 (timeout).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import UploadFile

from flora.engine import AdapterInUse, AdapterUnavailable, RequestOutput, RequestRejected
from flora_platform.serving import protocol
from flora_platform.serving.health import diagnose
from flora_platform.serving.protocol import ApiError
from flora_platform.serving.service import BadPrompt, ChoiceBuilder, CompletionService, Overloaded, RequestRecord, Run
from flora_platform.serving.sources import AdapterInvalid, AdapterNotFound, RegistryUnavailable, Target
from flora_platform.serving.transcription import TranscriptionService

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's code for a client that closed the connection first


def as_api_error(err: Exception) -> ApiError | None:
    """The HTTP answer for an error raised while serving, or None for a bug (500)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, AdapterNotFound):
        return ApiError(404, str(err), param="model")
    if isinstance(err, (AdapterInvalid, AdapterUnavailable)):
        return ApiError(422, str(err), param="model")
    if isinstance(err, RegistryUnavailable):
        return ApiError(503, str(err), headers={"Retry-After": "5"})
    if isinstance(err, Overloaded):
        return ApiError(429, str(err), headers={"Retry-After": str(max(1, round(err.retry_after_s)))})
    if isinstance(err, BadPrompt):
        return ApiError(400, str(err), param=err.param)
    if isinstance(err, RequestRejected):
        return ApiError(400, str(err))
    if isinstance(err, AdapterInUse):
        return ApiError(409, str(err))
    if isinstance(err, TimeoutError):
        return ApiError(504, "the request did not finish within limits.request_timeout_s and was cancelled")
    return None


def build_http_app(service: CompletionService | TranscriptionService, api_key: str = "", identity: dict | None = None) -> FastAPI:
    """The routes over `service`; `api_key` ("" = none) guards /v1/*; `identity` (e.g. the
    replica id and pid) is added to /health answers."""
    identity = dict(identity or {})
    app = FastAPI(title="flora", description="FLoRA adapters, batched per forward pass", docs_url=None, redoc_url=None)
    limits = service.cfg.limits

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def authorize(request: HttpRequest) -> None:
        if not api_key:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the openai client's api_key)")

    async def read_json(request: HttpRequest) -> dict:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"the request body has {size} bytes; the limit is {limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise ApiError(413, f"the request body has {len(raw)} bytes; the limit is {limits.max_body_bytes}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from err

    def request_id(request: HttpRequest) -> str:
        # Serve's proxy sets x-request-id (the client's, or a new one) and echoes it in the response.
        return request.headers.get("x-request-id") or uuid.uuid4().hex

    @app.get("/health")
    async def health():
        snapshot = service.snapshot()
        problem = diagnose(snapshot["health"], service.cfg.health)
        body = {"status": problem or "ok", **identity, **snapshot}
        return JSONResponse(body, status_code=503 if problem else 200)

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        created = int(time.time())
        entries = {service.model_name: {"source": "base", "root": service.cfg.model.name, "loaded": True}}
        for key, names in service.resident().items():
            for name in names:
                entries[name] = {"source": "registry" if key.startswith("models:/") else "directory", "root": key, "loaded": True}
        available = await service.in_thread(service.sources.available)
        for entry in available:
            entries.setdefault(entry["id"], {"source": entry["source"], "root": entry["root"], "loaded": False})
        data = [{"id": name, "object": "model", "created": created, "owned_by": "flora", **info} for name, info in entries.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load(request: HttpRequest):
        authorize(request)
        body = await read_json(request)
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model: required, e.g. {\"model\": \"flora-python@champion\"}", param="model")
        target = await _answer(service.load_adapter(model))
        return {"id": model, "root": target.key, "source": target.source, "version": target.version, "loaded": True}

    @app.delete("/v1/adapters/{name:path}")
    async def unload(name: str, request: HttpRequest):
        authorize(request)
        try:
            target, unloaded = await _answer(service.unload_adapter(name))
        except ValueError as err:
            raise ApiError(400, str(err)) from err
        return {"id": name, "root": target.key, "unloaded": unloaded}

    if isinstance(service, TranscriptionService):

        @app.post("/v1/audio/transcriptions")
        async def transcriptions(request: HttpRequest):
            authorize(request)
            return await _transcribe(service, request_id(request), request)

        return app

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        authorize(request)
        params = protocol.parse_completion(await read_json(request), limits)
        return await _generate(service, request_id(request), params, None)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        authorize(request)
        params = protocol.parse_chat(await read_json(request), limits)
        return await _generate(service, request_id(request), params, params.messages)

    return app


TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


async def _transcription_form(request: HttpRequest, max_bytes: int) -> tuple[bytes, str, str | None, str]:
    """(audio bytes, model, language, response_format) of an OpenAI transcription upload."""
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > max_bytes:
        raise ApiError(413, f"the upload has {size} bytes; the limit is {max_bytes} (limits.max_audio_bytes)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send multipart/form-data with a `file` (WAV, FLAC, MP3 or OGG) and a `model`, as OpenAI's clients do", param="file")
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=max_bytes)
    except Exception as err:  # noqa: BLE001 - starlette's MultiPartException and malformed bodies
        raise ApiError(400, f"unreadable multipart body: {err}", param="file") from err
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "file: required, the audio as an uploaded file (WAV, FLAC, MP3 or OGG)", param="file")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    model = fields.get("model", "")
    if not model:
        raise ApiError(400, "model: required, the adapter (e.g. flora-speech-de@champion) or the base model", param="model")
    response_format = fields.get("response_format") or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise ApiError(400, f"response_format: {response_format!r} is not one of {TRANSCRIPTION_FORMATS}", param="response_format")
    temperature = fields.get("temperature")
    try:
        greedy = temperature is None or float(temperature) == 0
    except ValueError:
        greedy = False
    if not greedy:
        raise ApiError(400, f"temperature: {temperature!r}; this server decodes greedily: send 0 or leave it out", param="temperature")
    if fields.get("prompt"):
        raise ApiError(400, "prompt: a decoding prompt is not supported; leave it out", param="prompt")
    data = await upload.read()
    if len(data) > max_bytes:
        raise ApiError(413, f"the upload has {len(data)} bytes; the limit is {max_bytes} (limits.max_audio_bytes)")
    return data, model, fields.get("language") or None, response_format


async def _transcribe(service: TranscriptionService, rid: str, request: HttpRequest):
    started = time.monotonic()
    model, status, result = "<unresolved>", 500, None  # 500 stands for a bug, raised as it is
    try:
        data, model, language, response_format = await _transcription_form(request, service.cfg.limits.max_audio_bytes)
        result = await _answer(service.transcribe(model, data, language, started + service.cfg.limits.request_timeout_s))
        status = 200
    except ApiError as err:
        status = err.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    finally:
        service.record(RequestRecord(
            request_id=rid, model=model, source=result.target.source if result else "-", status=status,
            prompt_tokens=0, completion_tokens=result.tokens if result else 0,
            latency_s=time.monotonic() - started, ttft_s=None,
        ))
    if response_format == "text":
        return PlainTextResponse(result.text)
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": result.language, "duration": result.duration_s, "text": result.text}
    return {"text": result.text}


async def _answer(awaitable):
    try:
        return await awaitable
    except Exception as err:
        api = as_api_error(err)
        if api is None:
            raise
        raise api from err


async def _generate(service: CompletionService, rid: str, params, messages: list[dict] | None):
    """Resolve, tokenise, admit, then answer at once (JSON) or as server-sent events."""
    chat = messages is not None
    s = params.sampling
    started = time.monotonic()
    target: Target | None = None
    prompts: list[list[int]] = []
    try:
        target = await service.resolve(params.model)
        service.count_arrival(target)
        prompts = [service.render_chat(messages)] if chat else [service.encode(p) for p in params.prompts]
        for ids in prompts:
            service.check_prompt(ids, s.max_tokens)
        run = service.submit(service.engine_requests(rid, target, prompts, s))
    except Exception as err:
        api = as_api_error(err)
        _record(service, rid, params.model if target else "<unresolved>", target, api.status if api else 500, prompts, [], None, started)
        if api is None:
            raise
        raise api from err
    prefix = "chatcmpl-" if chat else "cmpl-"
    builders = [ChoiceBuilder(i, service.decode, service.token_text, s.stop) for i in range(len(prompts) * s.n)]
    deadline = started + service.cfg.limits.request_timeout_s
    if params.stream:
        events = _sse(service, run, builders, prefix + rid, params, chat, deadline, rid, target, prompts, started)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    status = 500
    try:
        async for index, item in run.events(deadline):
            if isinstance(item, RequestOutput):
                if item.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {item.error}")
                builders[index].finish(item)
            else:
                builders[index].token(item)
        status = 200
    except asyncio.CancelledError:
        status = CLIENT_GONE
        raise
    except Exception as err:
        api = as_api_error(err)
        status = api.status if api else 500
        if api is None:
            raise
        raise api from err
    finally:
        run.cancel()  # a no-op when everything finished; otherwise (timeout, client gone) stop the rows
        _record(service, rid, params.model, target, status, prompts, builders, run.ttft_s, started)
    usage = protocol.usage_body(sum(len(p) for p in prompts), sum(b.completion_tokens for b in builders))
    build = protocol.chat_body if chat else protocol.completion_body
    return build(prefix + rid, params.model, [b.choice for b in builders], usage, s.logprobs is not None)


async def _sse(service, run: Run, builders, cid, params, chat, deadline, rid, target, prompts, started) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token with new text, a last chunk per choice with its
    finish reason, optionally a usage chunk, then [DONE]. An error after the first byte can no
    longer change the status: it is sent as an error event before [DONE]."""
    status = 200
    try:
        if chat:
            for b in builders:  # OpenAI's first chat chunk carries the role
                yield _event(protocol.chat_chunk(cid, params.model, b.choice.index, {"role": "assistant", "content": ""}, None, None))
        async for index, item in run.events(deadline):
            b = builders[index]
            if isinstance(item, RequestOutput):
                if item.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {item.error}")
                delta, logprobs, finish = b.finish(item), None, item.finish_reason
            else:
                (delta, logprobs), finish = b.token(item), None
                if not delta and logprobs is None:
                    continue  # a token that completes no character yet
            if chat:
                lp = protocol.chat_logprobs(_tail(b, logprobs)) if logprobs else None
                content = {"content": delta} if delta or finish is None else {}
                yield _event(protocol.chat_chunk(cid, params.model, index, content, finish, lp))
            else:
                yield _event(protocol.completion_chunk(cid, params.model, index, delta, finish, logprobs))
        if params.include_usage:
            usage = protocol.usage_body(sum(len(p) for p in prompts), sum(b.completion_tokens for b in builders))
            yield _event({"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                          "created": int(time.time()), "model": params.model, "choices": [], "usage": usage})
    except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
        status = CLIENT_GONE
        raise
    except Exception as err:  # noqa: BLE001 - reported in the stream; the status line is already sent
        api = as_api_error(err) or ApiError(500, f"internal error: {err!r}")
        status = api.status
        if api.status == 500:
            log.exception("request %s failed while streaming", rid)
        yield _event(api.body())
    finally:
        # Reached on normal ends, errors, and when the client disconnects (the generator is closed).
        run.cancel()
        _record(service, rid, params.model, target, status, prompts, builders, run.ttft_s, started)
    yield "data: [DONE]\n\n"


def _tail(builder: ChoiceBuilder, logprobs: dict) -> protocol.Choice:
    c = protocol.Choice(builder.choice.index)
    c.tokens, c.token_logprobs, c.top_logprobs = logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
    return c


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _record(service, rid, model, target, status, prompts, builders, ttft_s, started) -> None:
    service.record(RequestRecord(
        request_id=rid, model=model, source=target.source if target else "-", status=status,
        prompt_tokens=sum(len(p) for p in prompts), completion_tokens=sum(b.completion_tokens for b in builders),
        latency_s=time.monotonic() - started, ttft_s=ttft_s,
    ))
