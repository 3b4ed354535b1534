"""Load at a fixed arrival rate with mixed adapters (loopback only, bounded in count and time):
nothing is lost; then a replica is killed mid-load and Serve replaces it without a hang.

The paper serves 8 requests/s; with a 2-layer model on two shared CPU cores that rate is kept,
with short completions (16 tokens), for a few seconds per phase.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from flora_platform.serving.loadgen import RETRYABLE, run_load

from .conftest import API_KEY, DIRECTORY_ADAPTERS, http, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODELS = ["tiny", *DIRECTORY_ADAPTERS]
RATE_PER_S = 8.0
APP = "load"  # its own application with two replicas, beside the one-replica app of test_server


@pytest.fixture(scope="module")
def load_endpoint(endpoint):
    from ray import serve

    args = endpoint["app_args"]
    serve.run(endpoint["build_app"]({**args, "deployment": {**args["deployment"], "num_replicas": 2}}),
              name=APP, route_prefix=f"/{APP}")
    try:
        yield {**endpoint, "url": f"{endpoint['url']}/{APP}"}
    finally:
        serve.delete(APP)


def test_fixed_rate_mixed_adapters_lose_no_request(load_endpoint, record_property):
    report = run_load(load_endpoint["url"], MODELS, rate_per_s=RATE_PER_S, duration_s=6.0, max_tokens=16,
                      api_key=API_KEY, timeout_s=60)
    summary = report.summary()
    print("\nload, 2 replicas:", json.dumps(summary))
    record_property("load", summary)
    assert summary["sent"] == 48 and summary["ok"] == 48, summary["statuses"]
    assert set(summary["per_model"]) == set(MODELS)
    assert summary["latency_p99_s"] < 10


def _replicas(endpoint) -> dict[int, str]:
    """pid -> replica id of the replicas answering /health, sampled a few times."""
    seen = {}
    for _ in range(20):
        body = http("GET", endpoint["url"] + "/health")[2]
        seen[body["pid"]] = body["replica"]
        if len(seen) >= 2:
            break
    return seen


def _running_replicas() -> int:
    from ray import serve

    engines = serve.status().applications[APP].deployments["flora"]  # not the ingress in front of them
    return engines.replica_states.get("RUNNING", 0)


def test_a_replica_killed_mid_load_is_replaced_and_no_request_hangs(load_endpoint, record_property):
    wait_for(lambda: _running_replicas() == 2, 60, "two running replicas")
    pids = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(_replicas(load_endpoint)), 30, "both replicas to answer")
    victim = sorted(pids)[0]
    killed_at_s = 1.5

    def kill_soon():
        time.sleep(killed_at_s)
        os.kill(victim, signal.SIGKILL)  # a replica process of the cluster this test started

    killer = threading.Thread(target=kill_soon, daemon=True)
    killer.start()
    # Longer answers than above, so that requests are running on the replica when it dies.
    report = run_load(load_endpoint["url"], MODELS, rate_per_s=RATE_PER_S, duration_s=6.0, max_tokens=64,
                      api_key=API_KEY, timeout_s=30)
    killer.join()
    summary = report.summary()
    print("\nload, 2 replicas, one killed at 1.5 s:", json.dumps(summary))
    record_property("load_replica_killed", summary)
    # Every request got an HTTP answer (status 0 would be a hang or a dropped connection), and
    # each one is a success or a status clients retry.
    assert summary["sent"] == 48
    assert all(o.status == 200 or o.status in RETRYABLE for o in report.outcomes), summary["statuses"]
    # The surviving replica keeps serving while the other is down: requests sent after the kill
    # succeed (how many depends on the machine's speed; its bounded queue answers the rest 429).
    after_kill = [o for o in report.outcomes if o.sent_s > killed_at_s + 0.5]
    assert any(o.status == 200 for o in after_kill), [(round(o.sent_s, 2), o.status) for o in report.outcomes]
    # Serve starts a replacement; both replicas serve again.
    wait_for(lambda: _running_replicas() == 2, 90, "Serve to replace the killed replica", every_s=1)
    new_pids = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(_replicas(load_endpoint)), 30, "two replicas answering")
    assert victim not in new_pids
    after = run_load(load_endpoint["url"], MODELS, rate_per_s=RATE_PER_S, duration_s=1.0, max_tokens=8, api_key=API_KEY)
    assert after.summary()["ok"] == 8
