"""HTTP requests carried across a Serve handle: the ingress packs a request, an engine replica
runs it through its own FastAPI app in-process, and the ASGI messages of the answer come back
one by one (so server-sent events still stream, and cancelling the call cancels the request).

    request = pack(scope, body)                  # on the ingress: a plain, picklable dict
    async for message in run_asgi(app, request): # on an engine replica: http.response.* messages
        ...
    status, body = await collect(app, request)   # the whole answer, JSON parsed (broadcasts)
    model = requested_model(method, path, body)  # what routing keys on

No Ray here: the Serve side (handles, multiplexing) is in `serve_apps/flora_server.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")  # JSON bodies naming the adapter in `model`


def pack(scope: dict, body: bytes) -> dict:
    """The parts of an ASGI HTTP scope an engine replica needs, path relative to the route prefix."""
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return {"method": scope["method"], "path": path, "query_string": scope.get("query_string", b""),
            "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])], "body": body}


def requested_model(method: str, path: str, body: bytes) -> str | None:
    """The `model` a completion or chat request names, or None (other routes, unreadable bodies)."""
    if method != "POST" or path not in ROUTED_PATHS:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


def _scope(request: dict) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request["method"], "path": request["path"], "raw_path": request["path"].encode(),
        "root_path": "", "query_string": request["query_string"], "headers": request["headers"],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
    }


async def run_asgi(app, request: dict) -> AsyncIterator[dict]:
    """Run `request` through the ASGI `app` and yield its `http.response.start` and
    `http.response.body` messages until the body ends. Closing the iterator early (the client
    went away) tells the app the client disconnected, then cancels it."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    done = object()
    task = asyncio.ensure_future(app(_scope(request), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(done))
    started = False
    try:
        while True:
            message = await messages.get()
            if message is done:
                if task.exception() is not None:
                    log.error("the app failed on %s %s", request["method"], request["path"], exc_info=task.exception())
                if not started:  # the app ended without answering: a bug
                    yield {"type": "http.response.start", "status": 500,
                           "headers": [(b"content-type", b"application/json")]}
                    yield {"type": "http.response.body", "body": b'{"error": {"message": "internal error", "code": 500}}'}
                return
            if message["type"] == "http.response.start":
                started = True
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 1.0)  # let it see the disconnect and clean up
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - it is being abandoned either way
                task.cancel()


async def collect(app, request: dict) -> tuple[int, object]:
    """(status, body parsed as JSON, or text) of `request` run through `app`."""
    status, chunks = 500, []
    async for message in run_asgi(app, request):
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            chunks.append(message.get("body", b""))
    text = b"".join(chunks).decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def merge_answers(answers: dict[str, dict | None]) -> tuple[int, dict]:
    """One answer to a request broadcast to every replica: each replica's own under `replicas`
    (its body, its `replica` id and HTTP `status_code`);
    200 with the first body when every replica answered 200 (`unloaded` true if any replica
    unloaded), else the first failing replica's status and error (504 for no answer, 503
    when no replica is running)."""
    replicas = []
    for replica, answer in answers.items():
        if answer is None:
            answer = {"status": 504, "body": {"error": {"message": "no answer from this replica in time", "code": 504}}}
        body = answer["body"] if isinstance(answer["body"], dict) else {"text": answer["body"]}
        replicas.append({**body, "replica": replica, "status_code": answer["status"]})
    if not replicas:
        return 503, {"error": {"message": "no engine replica is running; retry", "code": 503}, "replicas": []}
    failed = [r for r in replicas if r["status_code"] != 200]
    first = failed[0] if failed else replicas[0]
    body = {k: v for k, v in first.items() if k not in ("replica", "status_code")}
    if not failed and "unloaded" in body:
        body["unloaded"] = any(r.get("unloaded") for r in replicas)
    return first["status_code"], {**body, "replicas": replicas}


def build_ingress_app(send, broadcast, *, base_models: frozenset[str], busy: tuple[type[Exception], ...] = (), retry_after_s: float = 1.0):
    """The application's HTTP entry (Starlette): every request goes on to an engine replica,
    requests naming an adapter with it as the routing key; POST /v1/adapters, DELETE
    /v1/adapters/{name} and GET /health/replicas go to every engine replica (`merge_answers`).

    send(request, model) -> async iterator of ASGI messages (one replica's answer); raises one of
        `busy` when every replica is full and the queue before them too (503 + Retry-After).
    broadcast(request) -> {replica: answer or None}.
    base_models: names of the base model, which any replica serves (no routing key).
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def to_all(request):
        packed = pack(request.scope, await request.body())
        if packed["path"] == "/health/replicas":
            packed["path"] = "/health"
        status, body = merge_answers(await broadcast(packed))
        return JSONResponse(body, status_code=status)

    async def to_one(request):
        body = await request.body()
        packed = pack(request.scope, body)
        model = requested_model(packed["method"], packed["path"], body)
        messages = send(packed, None if model in base_models else model)
        try:
            start = await messages.__anext__()
        except busy as err:
            await messages.aclose()
            retry = str(max(1, round(retry_after_s)))
            return JSONResponse({"error": {"message": f"every replica is full: retry after {retry} s ({err})", "code": 503}},
                                status_code=503, headers={"Retry-After": retry})

        async def body_chunks():
            try:
                async for message in messages:
                    if message["type"] == "http.response.body":
                        yield message.get("body", b"")
            finally:
                await messages.aclose()  # the client went away: cancel the replica's side too

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])
                   if k.lower() != b"content-length"}
        return StreamingResponse(body_chunks(), status_code=start["status"], headers=headers)

    methods = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[
        Route("/v1/adapters", to_all, methods=["POST"]),
        Route("/v1/adapters/{name:path}", to_all, methods=["DELETE"]),
        Route("/health/replicas", to_all, methods=["GET"]),
        Route("/{path:path}", to_one, methods=methods),
    ])
