"""Replica health and overload: when a replica says it cannot serve, and what Serve does then.

Without Ray: `serving.health.diagnose` on its own, the config fields, and GET /health of a
real service whose engine forward the test stalls or breaks. With Ray: a deployment subclass
(`faulty_server.SwitchableFloraServer`) whose forward the test stalls or breaks through a Serve
handle: a full replica answers 429 itself, and a replica whose every forward fails is replaced
by Serve while no request hangs.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flora_platform.config import ConfigError
from flora_platform.serving.config import HealthSpec, parse_args
from flora_platform.serving.health import Unhealthy, check, diagnose

from .conftest import app_args, free_port, http, wait_for

SPEC = HealthSpec(stall_timeout_s=60, max_failed_steps=8)
HEALTHY = {"alive": True, "has_work": True, "last_ok_step_age_s": 0.05, "failed_steps": 0}


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"alive": False}, "engine loop has stopped"),
    ({"failed_steps": 7}, None),
    ({"failed_steps": 8}, "health.max_failed_steps=8"),
    ({"last_ok_step_age_s": 59.9}, None),
    ({"last_ok_step_age_s": 61.0}, "health.stall_timeout_s=60"),
    ({"last_ok_step_age_s": 3600.0, "has_work": False}, None),  # idle for an hour: nothing to replace
    ({"failed_steps": 9, "has_work": False}, "health.max_failed_steps=8"),  # broken, even when quiet
])
def test_diagnose(change, reason):
    problem = diagnose({**HEALTHY, **change}, SPEC)
    if reason is None:
        assert problem is None
        check({**HEALTHY, **change}, SPEC)
    else:
        assert reason in problem
        with pytest.raises(Unhealthy, match=reason.replace(".", r"\.")):
            check({**HEALTHY, **change}, SPEC)


def test_a_service_without_step_figures_is_judged_on_its_thread_alone():
    assert diagnose({"alive": True}, SPEC) is None  # the transcription service
    assert "stopped" in diagnose({"alive": False}, SPEC)


@pytest.mark.parametrize("args, field", [
    ({"health": {"stall_timeout_s": 0}}, "health.stall_timeout_s"),
    ({"health": {"max_failed_steps": 0}}, "health.max_failed_steps"),
    ({"deployment": {"health_check_period_s": 0}}, "deployment.health_check_period_s"),
    ({"deployment": {"health_check_timeout_s": -1}}, "deployment.health_check_timeout_s"),
])
def test_health_fields_are_checked_naming_the_field(args, field):
    with pytest.raises(ConfigError) as err:
        parse_args(args)
    assert err.value.field == field and str(err.value).startswith(field)
    assert parse_args({}).health == HealthSpec(stall_timeout_s=60.0, max_failed_steps=8)


# ---------------------------------------------------------------------------------- no Ray


@pytest.fixture
def fragile_server(assets):
    """A real service under uvicorn on a loopback port, its health limits small."""
    import uvicorn

    from flora_platform.serving.api import build_http_app
    from flora_platform.serving.service import CompletionService

    args = app_args(assets, registry__enabled=False, security__api_key_env="")
    args["health"] = {"stall_timeout_s": 0.5, "max_failed_steps": 2}
    service = CompletionService(parse_args(args))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_http_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    resume = threading.Event()
    try:
        wait_for(lambda: server.started, 30, "uvicorn to start", every_s=0.05)
        yield {"url": f"http://127.0.0.1:{port}", "service": service, "resume": resume}
    finally:
        resume.set()  # a stalled forward must not outlive the test
        server.should_exit = True
        thread.join(10)
        service.close()


def test_health_reports_a_stalled_and_a_failing_engine(fragile_server, assets):
    url, service, resume = fragile_server["url"], fragile_server["service"], fragile_server["resume"]
    runner = service.engine.runner
    forward = runner.forward
    body = {"model": "flora_r2", "prompt": "def main(", "max_tokens": 4, "temperature": 0}
    status, _, health = http("GET", url + "/health", key=None)
    assert status == 200 and health["status"] == "ok"
    assert health["health"]["failed_steps"] == 0 and health["health"]["has_work"] is False

    # A forward that does not return, with a request waiting: stuck after stall_timeout_s.
    runner.forward = lambda inputs: (resume.wait(30), forward(inputs))[1]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http, "POST", url + "/v1/completions", body, key=None, timeout_s=60)
        stuck = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http("GET", url + "/health", key=None)), 20,
                         "/health to report the stall")[2]
        assert "health.stall_timeout_s=0.5" in stuck["status"]
        assert stuck["health"]["has_work"] is True and stuck["health"]["last_ok_step_age_s"] >= 0.5
        runner.forward = forward
        resume.set()
        assert waiting.result()[0] == 200
    wait_for(lambda: http("GET", url + "/health", key=None)[0] == 200, 10, "/health to recover")

    # Every forward fails: each request fails fast (500); two failed steps make the replica unhealthy.
    def broken(inputs):
        raise RuntimeError("injected: CUDA error: an illegal memory access was encountered")

    runner.forward = broken
    for _ in range(2):
        started = time.monotonic()
        status, _, answer = http("POST", url + "/v1/completions", body, key=None, timeout_s=30)
        assert status == 500 and "forward failed" in answer["error"]["message"]
        assert time.monotonic() - started < 10
    status, _, health = http("GET", url + "/health", key=None)
    assert status == 503 and "health.max_failed_steps=2" in health["status"]
    assert health["health"]["failed_steps"] == 2 and health["health"]["has_work"] is False
    runner.forward = forward
    assert http("POST", url + "/v1/completions", body, key=None)[0] == 200  # a good step resets the count
    status, _, health = http("GET", url + "/health", key=None)
    assert status == 200 and health["health"]["failed_steps"] == 0


# ---------------------------------------------------------------------------------- real Serve

APP = "switchable"
HEALTH_CHECK_PERIOD_S = 1.0
MAX_FAILED_STEPS = 3


@pytest.fixture(scope="module")
def switchable(endpoint):
    """Its own application: one replica of the switchable subclass, checked every second."""
    from ray import serve

    from serve_apps.flora_server import build_app_with
    from tests.serve_apps.faulty_server import SwitchableFloraServer

    args = copy.deepcopy(endpoint["app_args"])
    args["deployment"].update(health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=5)
    args["health"] = {"stall_timeout_s": 60, "max_failed_steps": MAX_FAILED_STEPS}
    deployment = serve.deployment(name="flora")(SwitchableFloraServer)
    serve.run(build_app_with(args, deployment), name=APP, route_prefix=f"/{APP}")
    try:
        yield {**endpoint, "url": f"{endpoint['url']}/{APP}", "handle": serve.get_deployment_handle("flora", app_name=APP), "app_args": args}
    finally:
        serve.delete(APP)


def _headers(answer) -> dict:
    return {k.lower(): v for k, v in answer[1].items()}


@pytest.mark.ray
@pytest.mark.slow
def test_a_full_replica_answers_429_with_retry_after_itself(switchable, assets):
    """The engine's forward is stalled, so admitted requests stay in: the replica holds exactly
    its capacity (8 rows + 4 queued) and refuses the next one with its own 429, not Serve's 503."""
    url, handle = switchable["url"], switchable["handle"]
    limits, engine = switchable["app_args"]["limits"], switchable["app_args"]["engine"]
    capacity = engine["max_batch_rows"] + limits["max_queued_requests"]
    body = {"model": "flora_r2", "prompt": "def main(", "max_tokens": 8, "temperature": 0}
    _, text, _ = assets["reference"].generate("def main(", "flora_r2", 8)
    handle.stall_forward.remote().result(timeout_s=30)
    pool = ThreadPoolExecutor(capacity)
    held = []
    try:
        held = [pool.submit(http, "POST", url + "/v1/completions", body, timeout_s=60) for _ in range(capacity)]
        wait_for(lambda: http("GET", url + "/health")[2]["inflight"] == capacity, 30, "the replica to hold its capacity")
        refused = http("POST", url + "/v1/completions", body, timeout_s=30)
    finally:
        handle.resume_forward.remote().result(timeout_s=30)
        answers = [f.result() for f in held]
        pool.shutdown()
    assert refused[0] == 429, refused
    assert "this replica is full" in refused[2]["error"]["message"]
    assert int(_headers(refused)["retry-after"]) >= max(1, round(limits.get("retry_after_s", 1.0)))
    assert [a[0] for a in answers] == [200] * capacity  # the admitted ones all finish once the engine runs
    assert {a[2]["choices"][0]["text"] for a in answers} == {text}


@pytest.mark.ray
@pytest.mark.slow
def test_a_replica_whose_forwards_all_fail_is_replaced_and_no_request_hangs(switchable, assets):
    url, handle = switchable["url"], switchable["handle"]
    body = {"model": "flora_r4", "prompt": "import os\n", "max_tokens": 6, "temperature": 0}
    _, text, _ = assets["reference"].generate("import os\n", "flora_r4", 6)
    status, _, health = http("GET", url + "/health")
    assert status == 200 and health["health"]["failed_steps"] == 0
    broken_replica = health["replica"]

    handle.break_forward.remote().result(timeout_s=30)
    broken_at = time.monotonic()
    for _ in range(MAX_FAILED_STEPS):  # every request fails fast, and each is a failed step
        started = time.monotonic()
        status, _, answer = http("POST", url + "/v1/completions", body, timeout_s=30)
        assert status == 500 and "forward failed" in answer["error"]["message"], answer
        assert time.monotonic() - started < 10
    status, _, health = http("GET", url + "/health", timeout_s=10)
    if status == 503:  # unless Serve has already stopped it (3 failed checks of 1 s each)
        assert "health.max_failed_steps=3" in health["status"] and health["health"]["failed_steps"] >= 3

    # Requests keep coming while Serve replaces the replica: each gets an HTTP answer in time.
    outcomes: list[tuple[int, float]] = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = http("POST", url + "/v1/completions", body, timeout_s=30)[0]
            except OSError:  # a dropped connection or the client's timeout: a hang
                status = 0
            outcomes.append((status, time.monotonic() - started))
            stop.wait(0.3)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()

    def new_replica():
        try:
            status, _, health = http("GET", url + "/health", timeout_s=5)
        except OSError:
            return None
        return health if status == 200 and isinstance(health, dict) and health.get("replica") != broken_replica else None

    try:
        replacement = wait_for(new_replica, 60, "Serve to replace the unhealthy replica", every_s=0.5)
        replaced_s = time.monotonic() - broken_at
        wait_for(lambda: outcomes and outcomes[-1][0] == 200, 30, "a request to succeed on the new replica")
    finally:
        stop.set()
        asker.join(40)
    print(f"\nreplaced {replaced_s:.1f} s after the forward broke; requests meanwhile: {outcomes}")
    assert replacement["health"]["failed_steps"] == 0
    assert all(status in (200, 500, 503) and took < 30 for status, took in outcomes), outcomes
    status, _, answer = http("POST", url + "/v1/completions", body)
    assert status == 200 and answer["choices"][0]["text"] == text
