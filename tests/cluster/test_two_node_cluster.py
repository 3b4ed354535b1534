"""A real two-node Ray cluster on this machine: cluster/local/start.sh starts a head and a worker
as separate `ray start` processes on 127.0.0.1 (free ports, their own temp dirs), the
fine-tuning job goes in through cluster/local/submit.sh (`ray job submit`) and must put one of
its two training workers on each node, then `serve deploy` puts the Serve app's two replicas on
the two nodes and answers a completion with the adapter the job registered. stop.sh ends
exactly those nodes' processes, also when the test fails; the fixture checks nothing is left.

Each node offers 1 CPU and the job asks for 2 workers of 1 CPU each, so no node can hold both:
the spread is forced, then read back from Ray's state API (the worker actors' node ids).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flora_platform.config import FinetuneConfig, load_config
from tests.flora_platform.conftest import tiny_job_overrides

from .conftest import REPO, cli_env, free_ports, kill_sessions, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class LocalCluster:
    state: Path
    dashboard_url: str
    env: dict[str, str]


@pytest.fixture
def two_nodes():
    # Short on purpose: Ray's socket paths live under the temp dirs and must stay < 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="flora-2n-", dir="/tmp"))
    gcs_port, dashboard_port = free_ports(2)
    env = cli_env(FLORA_CLUSTER_DIR=str(state))
    sessions: list[int] = []
    began = time.monotonic()
    try:
        start = subprocess.run(
            [str(REPO / "cluster/local/start.sh"), "--workers", "1", "--cpus", "1",
             "--port", str(gcs_port), "--dashboard-port", str(dashboard_port)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        sessions = [int(p.read_text()) for p in state.glob("*.pid")]
        assert start.returncode == 0, start.stdout + start.stderr
        assert len(sessions) == 2, sorted(p.name for p in state.iterdir())
        print(f"cluster started in {time.monotonic() - began:.1f} s", flush=True)
        yield LocalCluster(state, f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        began = time.monotonic()
        stop = subprocess.run([str(REPO / "cluster/local/stop.sh")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        print(f"cluster stopped in {time.monotonic() - began:.1f} s", flush=True)
        left = kill_sessions(sessions)
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not left, f"stop.sh left processes of the cluster running: {left}"


def ray_list(cluster: LocalCluster, kind: str, *filters: str) -> list[dict]:
    """`ray list <kind>` from Ray's state API on the head's dashboard, as dicts."""
    args = ["ray", "list", kind, "--address", cluster.dashboard_url, "--format", "json", "--detail", "--limit", "1000"]
    for f in filters:
        args += ["--filter", f]
    out = subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_finetune_spans_both_nodes_and_serve_deploys_across_them(two_nodes, tmp_path):
    cluster = two_nodes
    began = time.monotonic()

    def phase(name: str) -> None:  # shown with the failure (or with -s): where the time went
        print(f"{time.monotonic() - began:6.1f} s  {name}", flush=True)

    def two_alive_nodes():
        alive = ray_list(cluster, "nodes", "state=ALIVE")
        return alive if len(alive) == 2 else None

    nodes = wait_for(two_alive_nodes, 60, "two alive nodes")
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
    phase("two nodes alive")

    # --- fine-tuning: `ray job submit` through the same script `make finetune` uses
    overrides = tiny_job_overrides(tmp_path, **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 1})
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = subprocess.run(
        [str(REPO / "cluster/local/submit.sh"), "jobs/finetune.py", "--config", "jobs/configs/default.yaml", *overrides],
        env={**cluster.env, "RAY_ADDRESS": cluster.dashboard_url, "FLORA_STORAGE": str(tmp_path / "storage"),
             "MLFLOW_TRACKING_URI": tracking_uri},
        cwd=REPO, capture_output=True, text=True, timeout=480,
    )
    log = job.stdout + job.stderr
    phase(f"fine-tuning job ended ({job.returncode})")
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log and "Held-out perplexity per language" in log, log[-4000:]

    train_workers = ray_list(cluster, "actors", "class_name=RayTrainWorker")
    assert len(train_workers) == 2, train_workers
    assert {a["node_id"] for a in train_workers} == {head, worker}, "the two training workers did not span both nodes"

    # --- serving: the repository's Serve config, pointed at the job's base model and registry
    serve_port = free_ports(1)[0]
    config = serve_config_for_test(tmp_path, overrides, tracking_uri, serve_port)
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run(["serve", "deploy", str(config_path), "--address", cluster.dashboard_url],
                            env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    phase("serve deploy sent")

    def app_running():
        status = subprocess.run(["serve", "status", "--address", cluster.dashboard_url],
                                env=cluster.env, capture_output=True, text=True, timeout=60)
        app = yaml.safe_load(status.stdout)["applications"]["flora"]
        assert app["status"] != "DEPLOY_FAILED", app
        return app["status"] == "RUNNING"

    wait_for(app_running, 300, "the Serve app to be RUNNING", interval_s=3)
    phase("Serve app running")
    replicas = [a for a in ray_list(cluster, "actors", "state=ALIVE") if a["class_name"] == "ServeReplica:flora:flora"]
    assert len(replicas) == 2 and {a["node_id"] for a in replicas} == {head, worker}, replicas

    status, answer = post_json(f"http://127.0.0.1:{serve_port}/v1/completions",
                               {"model": "flora-python@latest", "prompt": "def ", "max_tokens": 8, "temperature": 0})
    assert status == 200, answer
    assert answer["model"] == "flora-python@latest"
    assert answer["usage"]["completion_tokens"] >= 1 and answer["choices"][0]["text"], answer
    phase("completion answered")

    # --- metrics: Prometheus finds every node through the head's service discovery file
    targets = json.loads((cluster.state / "head" / "prom_metrics_service_discovery.json").read_text())
    addresses = {t for group in targets for t in group["targets"]}
    assert len(addresses) >= 2, addresses  # one metrics endpoint per node (and the head's dashboard)
    scraped = wait_for(lambda: _scrape_has(addresses, "ray_flora_requests_total"), 60,
                       "the replica's request counter on a node's metrics endpoint", interval_s=3)
    assert 'model="flora-python@latest"' in scraped
    phase("metrics scraped")


def serve_config_for_test(tmp_path: Path, finetune_overrides: list[str], tracking_uri: str, port: int) -> dict:
    """serve_apps/flora.yaml with the job's tiny base and registry, two 1-CPU replicas, a free port."""
    config = yaml.safe_load((REPO / "serve_apps/flora.yaml").read_text())
    # One proxy, on the head: a proxy per node would make both bind the same port of this machine.
    config["proxy_location"] = "HeadOnly"
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    args = app["args"]
    # The served banks must adapt the modules the job adapted (its adapter.targets).
    job = load_config(FinetuneConfig, str(REPO / "jobs/configs/default.yaml"), finetune_overrides)
    args["model"].update(finetune_overrides=finetune_overrides, targets=list(job.adapter.targets), torch_threads=1)
    args["registry"]["tracking_uri"] = tracking_uri
    args["adapters"]["cache_dir"] = str(tmp_path / "adapter-cache")
    args["deployment"].update(num_replicas=2, num_cpus=1)
    return config


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _scrape_has(addresses: set[str], metric: str) -> str | None:
    for address in addresses:
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue
        if metric in text:
            return text
    return None
