"""Adapter-affinity routing over two engine replicas and eight adapters, with bounded loopback
load: after a warm-up, requests for an adapter land on the replica that already holds it (each
replica counts, per request, whether the adapter was in its banks on arrival), and the
replicas split the adapters between them instead of each loading every one. Adapter loads and
unloads reach both replicas, and the answer says what each did.
"""

from __future__ import annotations

import copy
import json

import pytest

import flora
from flora_platform.serving.loadgen import run_load
from tests.flora.test_models import randomised

from .conftest import API_KEY, http, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "routing"
ADAPTERS = [f"route_{i}" for i in range(8)]
RATE_PER_S = 8.0
MIN_HIT_RATE = 0.9


@pytest.fixture(scope="module")
def routing(endpoint, assets):
    """Its own application: two replicas serving a directory of eight adapters."""
    from ray import serve

    directory = assets["root"] / "routing_adapters"
    shapes = assets["adapters"]["flora_r2"].config.module_shapes
    for i, name in enumerate(ADAPTERS):
        randomised(flora.init_adapter("flora", 1 + i % 4, shapes, seed=40 + i), 50 + i).save(directory / name)
    args = copy.deepcopy(endpoint["app_args"])
    args["adapters"]["directory"] = str(directory)
    args["deployment"]["num_replicas"] = 2
    serve.run(endpoint["build_app"](args), name=APP, route_prefix=f"/{APP}")
    url = f"{endpoint['url']}/{APP}"
    try:
        wait_for(lambda: len(http("GET", url + "/health/replicas")[2].get("replicas", [])) == 2, 30,
                 "both engine replicas to poll the ingress")
        yield url
    finally:
        serve.delete(APP)


def replicas(url) -> list[dict]:
    """Every engine replica's /health body."""
    status, _, body = http("GET", url + "/health/replicas")
    assert status == 200, body
    return body["replicas"]


def arrivals(url) -> dict[str, dict[str, int]]:
    return {r["replica"]: r["adapter_arrivals"] for r in replicas(url)}


def test_requests_go_to_the_replica_that_holds_their_adapter(routing, record_property):
    warm = run_load(routing, ADAPTERS, rate_per_s=RATE_PER_S, duration_s=2.0, max_tokens=4, api_key=API_KEY, timeout_s=60)
    assert warm.summary()["ok"] == 16, warm.summary()["statuses"]
    before = arrivals(routing)
    report = run_load(routing, ADAPTERS, rate_per_s=RATE_PER_S, duration_s=6.0, max_tokens=8, api_key=API_KEY, timeout_s=60)
    summary = report.summary()
    assert summary["sent"] == 48 and summary["ok"] == 48, summary["statuses"]
    after = arrivals(routing)
    hits = sum(after[r].get("resident", 0) - before.get(r, {}).get("resident", 0) for r in after)
    total = hits + sum(after[r].get("not_resident", 0) - before.get(r, {}).get("not_resident", 0) for r in after)
    held = {r["replica"]: sorted(r["adapters_resident"]) for r in replicas(routing)}
    print(f"\nrouting, 2 replicas, 8 adapters: {hits}/{total} requests found their adapter resident; held: {json.dumps(held)}")
    record_property("routing_hit_rate", hits / total)
    assert total == 48
    assert hits / total >= MIN_HIT_RATE, (hits, total, held)
    # Both replicas serve, and they split the adapters rather than each loading all eight.
    assert all(held.values()) and sum(len(names) for names in held.values()) <= len(ADAPTERS) + 2, held


def test_loading_and_unloading_an_adapter_reaches_every_replica(routing):
    status, _, body = http("POST", routing + "/v1/adapters", {"model": "route_0"})
    assert status == 200 and body["loaded"] is True and body["root"] == "route_0", body
    assert len(body["replicas"]) == 2 and all(r["status_code"] == 200 and r["loaded"] for r in body["replicas"]), body
    assert all("route_0" in r["adapters_resident"] for r in replicas(routing))

    status, _, body = http("DELETE", routing + "/v1/adapters/route_0")
    assert status == 200 and body["unloaded"] is True, body
    assert [r["unloaded"] for r in body["replicas"]] == [True, True]
    assert not any("route_0" in r["adapters_resident"] for r in replicas(routing))

    status, _, body = http("DELETE", routing + "/v1/adapters/no-such-adapter")
    assert status == 404 and len(body["replicas"]) == 2 and "error" in body
    status, _, body = http("POST", routing + "/v1/adapters", {"model": "route_1"}, key="wrong")
    assert status == 401 and {r["status_code"] for r in body["replicas"]} == {401}
    # The adapter still serves after being unloaded everywhere: the replica it lands on loads it again.
    body = {"model": "route_0", "prompt": "def main(", "max_tokens": 4, "temperature": 0}
    assert http("POST", routing + "/v1/completions", body)[0] == 200
