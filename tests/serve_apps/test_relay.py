"""The pieces of routing without Ray: the routing key of a request, an HTTP request run
in-process through an ASGI app (streaming, disconnects), broadcast answers merged, and the
directory through which engine replicas receive broadcasts."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from flora_platform.serving.directory import ReplicaDirectory
from flora_platform.serving.relay import collect, merge_answers, pack, requested_model, run_asgi


def test_the_routing_key_is_the_model_a_completion_names():
    body = json.dumps({"model": "flora-c@champion", "prompt": "x"}).encode()
    assert requested_model("POST", "/v1/completions", body) == "flora-c@champion"
    assert requested_model("POST", "/v1/chat/completions", body) == "flora-c@champion"
    assert requested_model("POST", "/v1/adapters", body) is None
    assert requested_model("GET", "/v1/completions", body) is None
    assert requested_model("POST", "/v1/completions", b"{not json") is None
    assert requested_model("POST", "/v1/completions", b'["a list"]') is None
    assert requested_model("POST", "/v1/completions", b'{"model": 3}') is None


def test_pack_makes_the_path_relative_to_the_route_prefix():
    scope = {"method": "POST", "path": "/load/v1/completions", "root_path": "/load", "query_string": b"a=1",
             "headers": [(b"x-request-id", b"r1")]}
    assert pack(scope, b"{}") == {"method": "POST", "path": "/v1/completions", "query_string": b"a=1",
                                  "headers": [(b"x-request-id", b"r1")], "body": b"{}"}


def _app():
    app = FastAPI()
    events = {"closed": asyncio.Event()}

    @app.post("/echo")
    async def echo(request: Request):
        return {"body": (await request.body()).decode(), "id": request.headers.get("x-request-id")}

    @app.get("/stream")
    async def stream():
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events["closed"].set()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    return app, events


def _request(method, path, body=b"", headers=()):
    return {"method": method, "path": path, "query_string": b"", "headers": list(headers), "body": body}


def test_run_asgi_answers_streams_and_tells_the_app_when_the_client_leaves():
    app, events = _app()

    async def main():
        status, body = await collect(app, _request("POST", "/echo", b"hello", [(b"x-request-id", b"r7")]))
        assert status == 200 and body == {"body": "hello", "id": "r7"}
        assert (await collect(app, _request("GET", "/nope")))[0] == 404
        assert (await collect(app, _request("GET", "/bug")))[0] == 500
        messages = run_asgi(app, _request("GET", "/stream"))
        start = await messages.__anext__()
        assert start["type"] == "http.response.start" and start["status"] == 200
        first = await messages.__anext__()
        assert first["body"] == b"data: 0\n\n" and first["more_body"]
        await messages.aclose()  # the client went away after one event
        await asyncio.wait_for(events["closed"].wait(), 5)  # the app's generator was closed, not left running

    asyncio.run(main())


def test_merge_answers():
    ok = {"status": 200, "body": {"id": "a", "unloaded": True}}
    not_there = {"status": 200, "body": {"id": "a", "unloaded": False}}
    status, body = merge_answers({"r1": not_there, "r2": ok})
    assert status == 200 and body["unloaded"] is True and body["id"] == "a"
    assert [(r["replica"], r["status_code"], r["unloaded"]) for r in body["replicas"]] == [("r1", 200, False), ("r2", 200, True)]
    status, body = merge_answers({"r1": ok, "r2": {"status": 409, "body": {"error": {"message": "in use"}}}})
    assert status == 409 and body["error"]["message"] == "in use" and len(body["replicas"]) == 2
    status, body = merge_answers({"r1": ok, "r2": None})
    assert status == 504 and body["replicas"][1]["status_code"] == 504
    assert merge_answers({})[0] == 503


def test_the_directory_delivers_broadcasts_to_every_polling_replica_and_drops_silent_ones():
    async def replica(directory, name, answers, stop):
        cursor = None
        while not stop.is_set():
            cursor, requests = await directory.poll(name, cursor, 0.2)
            for seq, request in requests:
                answers.append((name, request["path"]))
                await directory.report(name, seq, {"status": 200, "body": {"by": name}})

    async def main():
        directory = ReplicaDirectory(expiry_s=0.6)
        stop, answers = asyncio.Event(), []
        tasks = [asyncio.create_task(replica(directory, n, answers, stop)) for n in ("a", "b")]
        await asyncio.sleep(0.1)
        assert directory.replicas() == ["a", "b"]
        result = await asyncio.wait_for(directory.broadcast({"path": "/x"}, timeout_s=5), 5)
        assert {r: a["body"]["by"] for r, a in result.items()} == {"a": "a", "b": "b"}
        assert sorted(answers) == [("a", "/x"), ("b", "/x")]
        tasks[1].cancel()  # b stops polling: after expiry_s it is no longer waited for
        result = await asyncio.wait_for(directory.broadcast({"path": "/y"}, timeout_s=10), 5)
        assert list(result) == ["a"]
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


@pytest.mark.parametrize("cursor", [None, 0])
def test_a_new_replica_starts_from_now(cursor):
    async def main():
        directory = ReplicaDirectory()
        directory._requests.append((1, {"path": "/old"}))
        directory._seq = 1
        new_cursor, requests = await directory.poll("late", cursor, 0.05)
        assert new_cursor == 1
        assert requests == ([] if cursor is None else [(1, {"path": "/old"})])

    asyncio.run(main())
