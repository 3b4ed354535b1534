"""The local cluster scripts' checks that need no cluster: they refuse before starting anything,
with the fix in the message, and stop.sh ends only sessions it started."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .conftest import REPO, cli_env, session_processes


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / script), *args], env=cli_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_start_refuses_a_state_dir_too_long_for_rays_sockets(tmp_path):
    long_dir = tmp_path / ("x" * 60)
    out = run("cluster/local/start.sh", "--dir", str(long_dir), "--port", "1", "--dashboard-port", "1")
    assert out.returncode == 2
    assert "at most 40" in out.stderr
    assert not list(long_dir.glob("*.pid"))


def test_start_refuses_a_dir_that_holds_a_cluster():
    state = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))  # short enough for the length check
    (state / "head.pid").write_text("1\n")
    try:
        out = run("cluster/local/start.sh", "--dir", str(state))
        assert out.returncode == 1 and "already holds a cluster" in out.stderr
        assert (state / "head.pid").read_text() == "1\n"
    finally:
        shutil.rmtree(state)


def test_stop_ends_the_recorded_session_and_nothing_else(tmp_path):
    # A stand-in node: a session leader with a child, as `setsid ray start --block` is.
    node = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"],
                            start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        (tmp_path / "head.pid").write_text(f"{node.pid}\n")
        for _ in range(100):
            if len(session_processes(node.pid)) == 2:
                break
            time.sleep(0.1)
        out = run("cluster/local/stop.sh", FLORA_CLUSTER_DIR=str(tmp_path), FLORA_STOP_GRACE_S="5")
        assert out.returncode == 0, out.stderr
        assert node.wait(timeout=10) is not None
        assert session_processes(node.pid) == []
        assert bystander.poll() is None, "stop.sh ended a process outside the cluster's sessions"
        assert not (tmp_path / "head.pid").exists()
    finally:
        for p in (node, bystander):
            p.kill()
            p.wait()


def test_stop_with_no_cluster_says_so(tmp_path):
    out = run("cluster/local/stop.sh", FLORA_CLUSTER_DIR=str(tmp_path))
    assert out.returncode == 0 and "no cluster to stop" in out.stdout
