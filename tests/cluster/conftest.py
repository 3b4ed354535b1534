"""Helpers for the cluster and service tests: free loopback ports, the environment Ray's CLI
needs, and the processes of a session (every node and server the scripts start leads one)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on now (held open together while choosing)."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def cli_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's tools first on PATH and Ray's token mode named when
    ~/.ray/auth_token exists (Ray 2.60's CLI needs it then)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if Path("~/.ray/auth_token").expanduser().exists():
        env.setdefault("RAY_AUTH_MODE", "token")
    env.update(extra)
    return env


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes of session `sid` (zombies are dead already)."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def kill_sessions(sids: list[int]) -> list[str]:
    """SIGKILL whatever is left of these sessions; returns what was left (for the failure message)."""
    left = [p for sid in sids for p in session_processes(sid)]
    described = []
    for p in left:
        try:
            described.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.Error:
            continue
    return described


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 1.0):
    """Poll `predicate` until it returns something truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - the service may not answer yet
            last_error = err
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error!r})")
