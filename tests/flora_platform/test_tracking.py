"""Rank 0's metrics during training (`tracking.MetricWriter`) survive an MLflow outage: a real
MLflow server is stopped and started again mid-run and every point is in the store once, in
order; a client that fails on demand (over a real sqlite store) checks the bounds and counts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest
from mlflow.exceptions import MlflowException

from flora_platform import tracking
from flora_platform.tracking import COUNT_TAGS, MetricWriter, TrackingError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(port: int, store, artifacts, log_path):
    """`mlflow server` on 127.0.0.1:`port` until the block ends, killed (as a crash) even when it fails."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the whole session: uvicorn's worker too
        server.wait(timeout=30)


def steps_and_values(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def point(step: int) -> dict[str, float]:
    return {"train_loss": 10.0 / step, "lr": 1e-3 * step}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_outage_holds_points_and_sends_each_once_in_order(tmp_path):
    port, store, artifacts, server_log = free_port(), tmp_path / "mlflow.db", tmp_path / "artifacts", tmp_path / "server.log"
    with mlflow_server(port, store, artifacts, server_log) as url:
        client = tracking.client_for(url)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        # pause_s=0: every log during the outage tries the server (once), so the first log after
        # it is back sends the backlog; the defaults otherwise.
        writer = MetricWriter(client, run_id, pause_s=0)
        for step in range(1, 6):
            writer.log(point(step), step)
        assert [s for s, _ in steps_and_values(client, run_id, "train_loss")] == [1, 2, 3, 4, 5]

    # Down: no log raises, and none holds a step for long (the first tries 3 times within 1.5 s,
    # the rest once: a refused connection answers at once).
    seconds = []
    for step in range(6, 16):
        start = time.monotonic()
        writer.log(point(step), step)
        seconds.append(time.monotonic() - start)
    assert seconds[0] < 4.0 and max(seconds[1:]) < 1.0, seconds
    assert writer.counts() == {"retried_points": 2 * 2, "buffered_points": 10 * 2, "dropped_points": 0}

    with mlflow_server(port, store, artifacts, server_log):
        writer.log(point(16), 16)  # MLflow is back: the backlog goes in first, oldest first
        assert [s for s, _ in steps_and_values(client, run_id, "lr")] == list(range(1, 17))
        for step in range(17, 21):
            writer.log(point(step), step)
        writer.close()

        for key in ("train_loss", "lr"):
            assert steps_and_values(client, run_id, key) == [(step, point(step)[key]) for step in range(1, 21)], key
        tags = client.get_run(run_id).data.tags
        assert {name: tags[tag] for name, tag in COUNT_TAGS.items()} == {
            "retried_points": "4", "buffered_points": "20", "dropped_points": "0"}


# --------------------------------------------------------------------------- a client that fails on demand


class FlakyClient:
    """A real MlflowClient whose calls fail as a dead server's would while `down`."""

    def __init__(self, client):
        self.client, self.down, self.calls = client, False, 0

    def _call(self, name, *args, **kwargs):
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        return getattr(self.client, name)(*args, **kwargs)

    def log_batch(self, *args, **kwargs):
        return self._call("log_batch", *args, **kwargs)

    def get_run(self, *args, **kwargs):
        return self._call("get_run", *args, **kwargs)


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory):
    return tracking.client_for(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture
def run_id(sqlite_client, request):
    experiment = tracking.experiment_id_for(sqlite_client.tracking_uri, "tracking-tests")
    return sqlite_client.create_run(experiment, run_name=request.node.name).info.run_id


def test_past_the_bound_the_oldest_points_are_dropped_and_counted(sqlite_client, run_id):
    flaky = FlakyClient(sqlite_client)
    writer = MetricWriter(flaky, run_id, backoff_s=0, pause_s=0, max_points=6)
    flaky.down = True
    for step in range(1, 6):  # 10 points, room for 6: steps 1 and 2 go
        writer.log(point(step), step)
    assert writer.dropped_points == 4 and writer.buffered_points == 10
    flaky.down = False
    writer.log(point(6), 6)
    writer.close()
    for key in ("train_loss", "lr"):
        assert steps_and_values(sqlite_client, run_id, key) == [(step, point(step)[key]) for step in range(3, 7)]
    assert sqlite_client.get_run(run_id).data.tags[COUNT_TAGS["dropped_points"]] == "4"


def test_while_down_logs_only_buffer_until_the_pause_is_over(sqlite_client, run_id):
    flaky = FlakyClient(sqlite_client)
    writer = MetricWriter(flaky, run_id, tries=3, backoff_s=0, pause_s=0.3)
    flaky.down = True
    writer.log(point(1), 1)
    assert flaky.calls == 3  # tried 3 times, then paused
    for step in range(2, 5):
        writer.log(point(step), step)
    assert flaky.calls == 3
    time.sleep(0.35)
    writer.log(point(5), 5)
    assert flaky.calls == 4  # one try once the pause is over, not 3 more
    flaky.down = False
    writer.close()
    assert [s for s, _ in steps_and_values(sqlite_client, run_id, "lr")] == [1, 2, 3, 4, 5]


def test_a_batch_mlflow_refuses_is_dropped_at_once(sqlite_client):
    flaky = FlakyClient(sqlite_client)
    writer = MetricWriter(flaky, "0" * 32, backoff_s=1.0)  # no such run: MLflow answers 404
    start = time.monotonic()
    writer.log(point(1), 1)
    writer.close()
    assert time.monotonic() - start < 1.0 and flaky.calls <= 3  # no retries, no backoff (+ the counts' get_run)
    assert writer.counts() == {"retried_points": 0, "buffered_points": 0, "dropped_points": 2}


def test_close_gives_up_within_its_wait_and_counts_what_is_lost(sqlite_client, run_id):
    flaky = FlakyClient(sqlite_client)
    writer = MetricWriter(flaky, run_id, backoff_s=0.05, pause_s=0, close_wait_s=0.5)
    flaky.down = True
    writer.log(point(1), 1)
    start = time.monotonic()
    writer.close()  # must not raise
    assert time.monotonic() - start < 1.5
    assert writer.dropped_points == 2 and sqlite_client.get_metric_history(run_id, "lr") == []


def test_counts_add_up_over_worker_restarts(sqlite_client, run_id):
    for _ in range(2):  # the worker, then the worker Ray Train restarts, both into the same run
        flaky = FlakyClient(sqlite_client)
        writer = MetricWriter(flaky, run_id, backoff_s=0, pause_s=0, max_points=1)
        flaky.down = True
        writer.log(point(1), 1)  # 2 points, room for 1
        flaky.down = False
        writer.close()
    assert sqlite_client.get_run(run_id).data.tags[COUNT_TAGS["dropped_points"]] == "2"


def test_required_calls_fail_naming_what_was_not_recorded(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own ~4 min of retries
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TrackingError, match=rf"logging the summary of run r1: MLflow at {uri} failed") as err:
        tracking.log_summary(uri, "r1", [], "| table |\n")
    assert isinstance(err.value.__cause__, MlflowException)
    (tmp_path / "python").mkdir()
    with pytest.raises(TrackingError, match="logging adapter 'python' of run r1"):
        tracking.log_adapters(uri, "r1", {"python": tmp_path / "python"}, register=True, prefix="flora", tags={})
    with pytest.raises(TrackingError, match="marking run r1 finished"):
        tracking.finish_run(uri, "r1", ok=True)
    tracking.finish_run(uri, "r1", ok=False)  # best-effort: the job is failing already
