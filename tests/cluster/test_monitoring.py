"""The Prometheus scrape config points at the service discovery file Ray's head writes, and every
query of the Grafana dashboard names a metric that exists: the flora replicas' metrics as
serve_apps/metrics.py registers them (named the way Ray exports them), or Ray Serve's own as
Ray's bundled Serve dashboards query them. The two-node test scrapes the live names too."""

from __future__ import annotations

import ast
import json
import re

import pytest
import yaml
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray.dashboard.modules.metrics.dashboards import serve_dashboard_panels, serve_deployment_dashboard_panels

from .conftest import REPO

PROMETHEUS = REPO / "platform/monitoring/prometheus.yml"
DASHBOARD = REPO / "platform/monitoring/grafana/flora-serving.json"
# What the issue asks the dashboard to show, by the metric that carries it.
MUST_SHOW = {
    "queue length": "ray_flora_engine_queue_length",
    "running rows": "ray_flora_engine_running_rows",
    "tokens/s": "ray_flora_engine_tokens_per_s",
    "time to first token": "ray_flora_ttft_s_bucket",
    "inter-token latency": "ray_flora_engine_itl_p50_s",
    "adapters resident": "ray_flora_engine_adapters_resident",
    "evictions": "ray_flora_engine_evictions",
    "requests per adapter": "ray_flora_requests_total",
    "Serve HTTP requests": "ray_serve_num_http_requests_total",
    "Serve replicas": "ray_serve_deployment_replica_healthy",
}


def flora_metric_names() -> set[str]:
    """Exported names of every metric serve_apps/metrics.py registers: Ray prefixes `ray_`,
    counters get `_total`, histograms `_bucket`, `_sum`, `_count`."""
    tree = ast.parse((REPO / "serve_apps/metrics.py").read_text())
    kinds: dict[str, str] = {}
    tables = {}
    for node in ast.walk(tree):
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("GAUGES", "COUNTERS"):
            # {snapshot key: (metric name, description)}
            tables[target.id] = [name for name, _ in ast.literal_eval(node.value).values()]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Counter", "Gauge", "Histogram"):
            first = node.args[0]
            if isinstance(first, ast.Constant):
                kinds[first.value] = node.func.id
    # Gauges and counters built in a loop over the GAUGES / COUNTERS tables.
    kinds.update({name: "Gauge" for name in tables.get("GAUGES", [])})
    kinds.update({name: "Counter" for name in tables.get("COUNTERS", [])})
    suffixes = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{name}{s}" for name, kind in kinds.items() for s in suffixes[kind]}


def ray_serve_metric_names() -> set[str]:
    """Every ray_serve_* name that Ray's own Serve dashboards query."""
    panels = serve_dashboard_panels.SERVE_GRAFANA_PANELS + serve_deployment_dashboard_panels.SERVE_DEPLOYMENT_GRAFANA_PANELS
    return {name for panel in panels for target in panel.targets for name in re.findall(r"ray_serve_\w+", target.expr)}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if isinstance(variable.get("query"), dict):
            exprs.append(variable["query"]["query"])
    return exprs


def unknown_metrics(exprs: list[str], known: set[str]) -> set[str]:
    # Metric names are the identifiers outside {label matchers} and quoted strings.
    found = set()
    for expr in exprs:
        bare = re.sub(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]", "", expr)
        found |= {w for w in re.findall(r"[a-zA-Z_:][\w:]*", bare) if w.startswith("ray_")}
    return found - known


def test_prometheus_scrapes_the_service_discovery_files_ray_writes():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert set(config) <= {"global", "scrape_configs", "rule_files", "alerting", "remote_write", "remote_read"}
    (job,) = config["scrape_configs"]
    files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
    assert all(f.endswith("/" + PROMETHEUS_SERVICE_DISCOVERY_FILE) for f in files)
    # Ray's default temp dir (a plain `ray start`, the launcher's head) and start.sh's head.
    state_dir = re.search(r"FLORA_CLUSTER_DIR:-([^}]+)\}", (REPO / "cluster/local/start.sh").read_text()).group(1)
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in files
    assert f"{state_dir}/head/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in files


def test_dashboard_queries_name_existing_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    known = flora_metric_names() | ray_serve_metric_names()
    exprs = dashboard_exprs(dashboard)
    assert exprs and unknown_metrics(exprs, known) == set()
    used = " ".join(exprs)
    missing = {topic for topic, metric in MUST_SHOW.items() if metric not in used}
    assert not missing, f"the dashboard shows nothing for {missing}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_metric_check_finds_a_misspelled_metric():
    known = flora_metric_names() | ray_serve_metric_names()
    assert "ray_flora_engine_queue_length" in known and "ray_flora_ttft_s_bucket" in known
    assert unknown_metrics(['sum(rate(ray_flora_request_total{model="x"}[1m]))'], known) == {"ray_flora_request_total"}


@pytest.mark.parametrize("name", sorted(MUST_SHOW.values()))
def test_required_metric_exists(name):
    assert name in flora_metric_names() | ray_serve_metric_names()
