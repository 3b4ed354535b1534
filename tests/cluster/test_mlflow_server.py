"""platform/mlflow/server.sh: a real MLflow server on a free loopback port, with a sqlite store and
a local artifact directory; a run, an artifact and a registered version go in over HTTP and are
read back from the store and the directory themselves; the server answers only on 127.0.0.1,
refuses foreign Host headers, and `stop` ends every process it started (the fixture also stops
it, and checks, when the test fails)."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from .conftest import REPO, cli_env, free_ports, kill_sessions, session_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SCRIPT = REPO / "platform/mlflow/server.sh"


@dataclass
class Server:
    url: str
    port: int
    store: Path
    artifacts: Path
    state: Path
    options: list[str]
    env: dict[str, str]

    def script(self, action: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), action, *self.options], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture
def mlflow_server(tmp_path):
    (port,) = free_ports(1)
    server = Server(
        url=f"http://127.0.0.1:{port}", port=port, store=tmp_path / "mlflow.db", artifacts=tmp_path / "artifacts",
        state=tmp_path / "state",
        options=["--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--artifacts-destination", str(tmp_path / "artifacts"), "--state-dir", str(tmp_path / "state"),
                 "--workers", "1"],
        env=cli_env(),
    )
    pidfile = server.state / "server.pid"
    session = None
    try:
        started = server.script("start")
        session = int(pidfile.read_text()) if pidfile.exists() else None
        assert started.returncode == 0, started.stdout + started.stderr
        yield server
    finally:
        stopped = server.script("stop", timeout_s=60)
        left = kill_sessions([session]) if session else []
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not left, f"stop left MLflow processes running: {left}"


def get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_server_tracks_runs_artifacts_and_registry_over_http(mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    server = mlflow_server
    assert get(f"{server.url}/health") == (200, "OK")
    assert server.script("status").returncode == 0

    # Bound to loopback only: every listening socket of the server's processes is on 127.0.0.1.
    session = int((server.state / "server.pid").read_text())
    listening = {
        c.laddr.ip for p in session_processes(session) for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
    }
    assert listening == {"127.0.0.1"}
    # MLflow's host check: a request naming another host (DNS rebinding) is refused.
    status, _ = get(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", host="attacker.example")
    assert status == 403

    client = MlflowClient(server.url)
    experiment = client.create_experiment("cluster-test")
    run = client.create_run(experiment, run_name="through-the-server")
    client.log_param(run.info.run_id, "adapter.rank", "4")
    client.log_metric(run.info.run_id, "eval_loss/python", 1.25, step=3)
    note = tmp_path / "adapter_note.txt"
    note.write_text("rank 4 FLoRA adapter\n")
    client.log_artifact(run.info.run_id, str(note), artifact_path="adapters/python")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("flora-python")
    version = client.create_model_version("flora-python", f"runs:/{run.info.run_id}/adapters/python", run.info.run_id)
    client.set_registered_model_alias("flora-python", "champion", version.version)

    # Read back from the stores themselves, not through the server.
    direct = MlflowClient(f"sqlite:///{server.store}")
    stored = direct.get_run(run.info.run_id)
    assert stored.data.params == {"adapter.rank": "4"} and stored.data.metrics == {"eval_loss/python": 1.25}
    assert stored.info.status == "FINISHED"
    assert direct.get_model_version_by_alias("flora-python", "champion").run_id == run.info.run_id
    (copied,) = server.artifacts.rglob("adapter_note.txt")
    assert copied.read_text() == "rank 4 FLoRA adapter\n"
    # And a client downloads the artifact through the server's proxy.
    mlflow.set_tracking_uri(server.url)
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapters/python",
                                                dst_path=str(tmp_path / "download"))
    assert (Path(local) / "adapter_note.txt").read_text() == "rank 4 FLoRA adapter\n"

    stopped = server.script("stop", timeout_s=60)
    assert stopped.returncode == 0, stopped.stderr
    assert session_processes(session) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/health", timeout=5)


def test_command_names_postgres_and_s3_stores_and_extra_hosts():
    out = subprocess.run(
        [str(SCRIPT), "command", "--host", "0.0.0.0", "--allowed-hosts", "flora-mlflow,flora-mlflow:5000"],
        env=cli_env(FLORA_MLFLOW_BACKEND_URI="postgresql://flora:secret@db:5432/mlflow",
                    FLORA_MLFLOW_ARTIFACTS="s3://bucket/mlflow"),
        cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
    )
    words = out.stdout.split()
    assert words[:2] == ["mlflow", "server"]
    option = {words[i]: words[i + 1] for i in range(2, len(words) - 1, 2)}
    assert option["--backend-store-uri"] == "postgresql://flora:secret@db:5432/mlflow"
    assert option["--artifacts-destination"] == "s3://bucket/mlflow"
    assert option["--host"] == "0.0.0.0"
    assert option["--allowed-hosts"].replace("\\", "") == "flora-mlflow,flora-mlflow:5000"


def test_defaults_are_loopback_and_the_stores_make_finetune_writes(tmp_path):
    out = subprocess.run([str(SCRIPT), "command"], env=cli_env(FLORA_STORAGE=str(tmp_path)), cwd=REPO,
                         capture_output=True, text=True, timeout=30, check=True)
    words = out.stdout.split()
    option = {words[i]: words[i + 1] for i in range(2, len(words) - 1, 2)}
    assert option["--host"] == "127.0.0.1"
    # cluster/local/submit.sh gives jobs sqlite:///$FLORA_STORAGE/mlflow.db: the UI shows those runs.
    assert option["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert option["--artifacts-destination"] == f"{tmp_path}/mlartifacts"
