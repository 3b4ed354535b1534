"""Escape attempts against the real sandbox (bubblewrap), each with its own expected verdict: what
a model-written program might do to the machine that evaluates it, and what it must get instead.

The host side of each attempt is real: a process with a secret in its environment, a Unix socket
and a loopback TCP server listening, the installed project on disk. The program reports what it
reached; the test checks that report, the verdict, and the host afterwards. The last test runs the
same sandbox from a process that is not root, as on the cluster image (USER ray).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import flora_platform
from flora_platform.evaluation import execution, seccomp
from flora_platform.evaluation.execution import ExecutionLimits, Sandbox

LIMITS = ExecutionLimits(timeout_s=4, cpu_s=2, max_processes=16, max_output_kb=16, max_file_mb=1, memory_mb=512)
NOBODY = 65534


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


@pytest.fixture
def host_secret():
    """A host process of ours with a secret in its environment, as a Ray worker holds API keys."""
    token = f"flora-secret-{uuid.uuid4().hex}"
    proc = subprocess.Popen(["sleep", "120"], env={"PATH": os.environ["PATH"], "FLORA_TEST_SECRET": token})
    deadline = time.monotonic() + 10
    while token.encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes():  # readable once it has exec'd
        assert time.monotonic() < deadline, "the host process never showed its environment"
        time.sleep(0.01)
    try:
        yield token, proc
    finally:
        proc.kill()
        proc.wait()


def run_json(sandbox, source, status="passed"):
    result = sandbox.run("python", textwrap.dedent(source))
    assert result.status == status, (result.status, result.detail, result.stderr[-800:])
    return json.loads(result.stdout) if status == "passed" else result


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def wait_until_gone(marker: str, seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --------------------------------------------------------------------------- other processes


def test_reading_another_process_environment(sandbox, host_secret):
    token, proc = host_secret
    out = run_json(sandbox, f"""
        import json, os
        found = []
        for pid in os.listdir('/proc'):
            try:
                if {token!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read():
                    found.append(pid)
            except OSError:
                pass
        print(json.dumps({{'found': found, 'host_pid_visible': os.path.exists('/proc/{proc.pid}/environ')}}))
    """)
    assert out == {"found": [], "host_pid_visible": False}


def test_host_proc_is_not_visible(sandbox):
    out = run_json(sandbox, """
        import json, os
        pids = [p for p in os.listdir('/proc') if p.isdigit()]
        print(json.dumps({'pids': len(pids), 'init': open('/proc/1/cmdline', 'rb').read().decode(errors='replace')}))
    """)
    host_init = Path("/proc/1/cmdline").read_bytes().decode(errors="replace")
    assert out["pids"] <= 4, out  # bubblewrap's init, the launcher, the program
    assert out["init"] != host_init and "bwrap" in out["init"]


def test_signalling_a_host_process(sandbox, host_secret):
    _, proc = host_secret
    out = run_json(sandbox, f"""
        import json, os, signal
        try:
            os.kill({proc.pid}, signal.SIGKILL)
            outcome = 'killed'
        except OSError as err:
            outcome = type(err).__name__
        print(json.dumps({{'outcome': outcome}}))
    """)
    assert out["outcome"] == "ProcessLookupError" and proc.poll() is None


# --------------------------------------------------------------------------- sockets and network


def test_connecting_to_host_unix_sockets(sandbox):
    """A socket file (as Ray's raylet and plasma sockets) and an abstract one (as many daemons)."""
    directory = Path(tempfile.mkdtemp(prefix="flora-sock-"))
    directory.chmod(0o755)
    path, abstract = directory / "service.sock", f"\0flora-test-{uuid.uuid4().hex}"
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    try:
        servers[0].bind(str(path))
        servers[1].bind(abstract)
        for server in servers:
            server.listen()
        os.chmod(path, 0o777)
        for address in (str(path), abstract):  # reachable from here
            socket.socket(socket.AF_UNIX).connect(address)
        out = run_json(sandbox, f"""
            import json, socket
            outcomes = []
            for address in ({str(path)!r}, {abstract!r}):
                try:
                    socket.socket(socket.AF_UNIX).connect(address)
                    outcomes.append('connected')
                except OSError as err:
                    outcomes.append(type(err).__name__)
            print(json.dumps(outcomes))
        """)
        assert out == ["FileNotFoundError", "ConnectionRefusedError"], out
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(directory)


def test_connecting_to_a_loopback_port(sandbox):
    """Ray's GCS, the dashboard, an unauthenticated MLflow: all listen on the host's loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # reachable from here
        out = run_json(sandbox, f"""
            import json, socket
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=5)
                outcome = 'connected'
            except OSError as err:
                outcome = type(err).__name__
            print(json.dumps(outcome))
        """)
        assert out == "ConnectionRefusedError"
    finally:
        server.close()


def test_reaching_the_metadata_service_or_any_network(sandbox):
    out = run_json(sandbox, """
        import json, socket
        outcomes = {}
        for host, port in (('169.254.169.254', 80), ('8.8.8.8', 53)):
            try:
                socket.create_connection((host, port), timeout=3)
                outcomes[host] = 'connected'
            except OSError as err:
                outcomes[host] = err.errno
        print(json.dumps({'outcomes': outcomes, 'interfaces': [name for _, name in socket.if_nameindex()]}))
    """)
    assert set(out["outcomes"].values()) == {101}, out  # ENETUNREACH: no route at all
    assert out["interfaces"] == ["lo"]


# --------------------------------------------------------------------------- files and devices


def test_writing_outside_the_working_directory(sandbox):
    token = uuid.uuid4().hex
    here = Path(__file__).resolve().parent
    targets = [
        f"/tmp/flora-escape-{token}", f"/var/tmp/flora-escape-{token}", f"/dev/shm/../flora-escape-{token}",
        str(here / f"flora-escape-{token}"), str(Path.home() / f"flora-escape-{token}"), f"../flora-escape-{token}",
        f"/usr/flora-escape-{token}", f"/etc/flora-escape-{token}", f"link-to-tmp/flora-escape-{token}",
    ]
    out = run_json(sandbox, f"""
        import json, os
        os.symlink('/tmp', 'link-to-tmp')
        written = []
        for path in {targets!r}:
            try:
                with open(path, 'w') as f:
                    f.write('escaped')
                written.append(path)
            except OSError:
                pass
        open('inside.txt', 'w').write('ok')
        os.makedirs(os.environ['TMPDIR'] + '/sub')
        print(json.dumps({{'written': written, 'inside': open('inside.txt').read()}}))
    """)
    assert out == {"written": [], "inside": "ok"}
    assert [t for t in targets if Path(t).exists() or (Path("/") / t).exists()] == []
    shell = sandbox.run("shell", f"echo x > /tmp/flora-escape-{token}-sh || exit 7\n")
    assert shell.exit_code == 7 and not Path(f"/tmp/flora-escape-{token}-sh").exists()


def test_rewriting_the_installed_project(sandbox):
    """Later Ray workers import flora_platform and the virtualenv's packages: neither is even visible."""
    package = Path(flora_platform.__file__).resolve().parent
    targets = [str(package / "__init__.py"), str(package / f"flora-escape-{uuid.uuid4().hex}.py"), sys.prefix]
    out = run_json(sandbox, f"""
        import json, os
        seen, written = [], []
        for path in {targets!r}:
            seen.append(os.path.exists(path))
            try:
                with open(path if path.endswith('.py') else path + '/evil.pth', 'a') as f:
                    f.write('import os')
                written.append(path)
            except OSError:
                pass
        print(json.dumps({{'seen': seen, 'written': written}}))
    """)
    assert out == {"seen": [False, False, False], "written": []}
    assert "import os" not in (package / "__init__.py").read_text()[-20:] and not Path(targets[1]).exists()


def test_devices_are_the_harmless_few(sandbox):
    out = run_json(sandbox, """
        import json, os
        opened = []
        for dev in ('/dev/kmsg', '/dev/mem', '/dev/sda', '/dev/vda', '/dev/nvidia0', '/dev/fuse', '/dev/net/tun'):
            try:
                os.close(os.open(dev, os.O_RDONLY))
                opened.append(dev)
            except OSError:
                pass
        print(json.dumps({'devices': sorted(os.listdir('/dev')), 'opened': opened}))
    """)
    assert out["opened"] == []
    assert set(out["devices"]) <= {"null", "zero", "full", "random", "urandom", "tty", "console", "pts", "ptmx",
                                   "shm", "fd", "stdin", "stdout", "stderr", "core", "mqueue"}


def test_kernel_surface_is_filtered(sandbox):
    """Namespaces, mounts, ptrace, keyrings, eBPF and io_uring: denied by the seccomp filter."""
    if seccomp.filter_program() is None:
        pytest.skip(f"no seccomp table for {seccomp.machine()}")
    numbers = seccomp.denied_numbers(seccomp.machine())
    calls = {name: numbers[name] for name in ("unshare", "mount", "ptrace", "keyctl", "bpf", "io_uring_setup", "perf_event_open")}
    out = run_json(sandbox, f"""
        import ctypes, json
        libc = ctypes.CDLL(None, use_errno=True)
        errnos = {{}}
        for name, nr in {calls!r}.items():
            ctypes.set_errno(0)
            result = libc.syscall(nr, 0, 0, 0, 0, 0)
            errnos[name] = ctypes.get_errno() if result == -1 else 'succeeded'
        ctypes.set_errno(0)
        clone_newuser = libc.syscall({seccomp.CLONE[seccomp.machine()]}, 0x10000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
        errnos['clone(CLONE_NEWUSER)'] = ctypes.get_errno() if clone_newuser == -1 else 'succeeded'
        ctypes.set_errno(0)
        clone3 = libc.syscall({seccomp.CLONE3}, 0, 0, 0, 0, 0)
        import os, subprocess, threading
        thread = threading.Thread(target=lambda: None)
        thread.start(); thread.join()
        child = subprocess.run(['true']).returncode  # fork and exec still work
        status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
        print(json.dumps({{'errnos': errnos, 'clone3': ctypes.get_errno() if clone3 == -1 else 'succeeded', 'child': child,
                          'seccomp': status['Seccomp'].strip(), 'no_new_privs': status['NoNewPrivs'].strip()}}))
    """)
    assert out["errnos"] == {name: 1 for name in [*calls, "clone(CLONE_NEWUSER)"]}, out  # EPERM each
    assert out["clone3"] == 38 and out["child"] == 0  # ENOSYS: the C library falls back to clone
    assert out["seccomp"] == "2" and out["no_new_privs"] == "1"


# --------------------------------------------------------------------------- resources


def test_fork_bomb_is_held_and_stopped(sandbox):
    marker = f"flora-bomb-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = sandbox.run("python", textwrap.dedent(f"""
        import os, sys
        sys.argv[0] = {marker!r}
        refused = 0
        while True:
            try:
                if os.fork() == 0:
                    os.execv('/bin/sleep', [{marker!r}, '600'])
            except OSError:
                refused += 1
    """))
    assert result.status == "timeout", (result.status, result.detail)
    assert time.monotonic() - started < LIMITS.timeout_s + 3
    assert wait_until_gone(marker) == [], "processes of the fork bomb outlived the run"


def test_memory_bomb_is_refused(sandbox):
    result = sandbox.run("python", "blobs = []\nwhile True:\n    blobs.append(bytearray(16 << 20))\n")
    assert result.status == "failed" and "MemoryError" in result.stderr, (result.status, result.detail)


def test_filling_the_working_directory_is_capped(sandbox):
    result = sandbox.run("python", textwrap.dedent("""
        import itertools
        for i in itertools.count():
            with open(f'f{i}', 'wb') as f:
                f.write(b'x' * (512 << 10))
    """))
    assert result.status == "failed" and "No space left on device" in result.stderr, (result.status, result.stderr[-300:])


def test_infinite_output_is_cut(sandbox):
    result = sandbox.run("shell", "yes flora\n")
    assert result.status == "error" and "output" in result.detail
    assert len(result.stdout.encode()) <= LIMITS.max_output_kb << 10


def test_sleeping_forever_and_daemons_end_with_the_run(sandbox):
    marker = f"flora-daemon-{uuid.uuid4().hex}"
    started = time.monotonic()
    result = sandbox.run("shell", f"setsid bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 < /dev/null &\nexec -a {marker} sleep 600\n")
    assert result.status == "timeout"
    assert time.monotonic() - started < LIMITS.timeout_s + 3
    assert wait_until_gone(marker) == []
    daemon = sandbox.run("shell", f"setsid bash -c 'exec -a {marker} sleep 600' >/dev/null 2>&1 < /dev/null &\necho started\n")
    assert daemon.status == "passed" and daemon.stdout == "started\n"
    assert wait_until_gone(marker) == [], "a daemon the program left behind outlived the run"


# --------------------------------------------------------------------------- as a non-root user

NON_ROOT_SCRIPT = """
import json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from flora_platform.evaluation.execution import ExecutionLimits, Sandbox
sandbox = Sandbox(ExecutionLimits(timeout_s=5, cpu_s=2, max_processes=16))
server = socket.create_server(('127.0.0.1', 0))
probe = '''
import json, os, socket
try:
    socket.create_connection(('127.0.0.1', %d), timeout=3); net = 'connected'
except OSError as err:
    net = type(err).__name__
try:
    open('/tmp/flora-nonroot-escape', 'w'); wrote = True
except OSError:
    wrote = False
n = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            import time; time.sleep(5); os._exit(0)
        n += 1
except OSError:
    pass
print(json.dumps({'uid': os.getuid(), 'net': net, 'wrote': wrote, 'forked': n, 'pids': len([p for p in os.listdir('/proc') if p.isdigit()])}))
''' % server.getsockname()[1]
result = sandbox.run('python', probe)
print(json.dumps({'caller': os.geteuid(), 'isolation': sandbox.isolation.describe(), 'status': result.status,
                  'detail': result.detail, 'stderr': result.stderr[-500:], 'report': result.stdout}))
"""


def test_sandbox_works_for_a_non_root_caller():
    """The sandbox as the cluster image's `ray` user runs it: no root, no uid switching. The caller
    also has many processes of its own, which must not eat into the run's process limit."""
    if os.geteuid() == 0:
        # The sandbox's own modules, readable by an unprivileged user wherever this checkout lies.
        copy = Path(tempfile.mkdtemp(prefix="flora-nonroot-"))
        try:
            package = copy / "flora_platform" / "evaluation"
            package.mkdir(parents=True)
            for name in ("execution.py", "seccomp.py", "sandbox_launch.py"):
                shutil.copy(Path(execution.__file__).with_name(name), package / name)
            (copy / "flora_platform" / "__init__.py").write_text("")
            (package / "__init__.py").write_text("")
            for path in [copy, *copy.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "cwd": "/"}
            crowd = [subprocess.Popen(["sleep", "60"], **as_nobody) for _ in range(24)]
            try:
                python = shutil.which("python3", path=execution.SANDBOX_PATH)
                done = subprocess.run([python, "-I", "-c", NON_ROOT_SCRIPT, str(copy)], capture_output=True, text=True, timeout=120,
                                      env={"PATH": execution.SANDBOX_PATH}, **as_nobody)
            finally:
                for proc in crowd:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
        finally:
            shutil.rmtree(copy)
    else:
        done = subprocess.run([sys.executable, "-c", NON_ROOT_SCRIPT, str(Path(flora_platform.__file__).parents[1])],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["caller"] != 0 and out["isolation"].startswith("sandbox (bubblewrap"), out
    assert out["status"] == "passed", out
    report = json.loads(out["report"])
    assert report["uid"] == out["caller"] and report["net"] == "ConnectionRefusedError" and not report["wrote"]
    # 16 processes for the run: the program and its children, besides bubblewrap's init and the launcher.
    assert 10 <= report["forked"] < 16 and report["pids"] <= 20, report
    assert not Path("/tmp/flora-nonroot-escape").exists()


# --------------------------------------------------------------------------- failing closed


def test_without_bubblewrap_evaluation_refuses_to_run(monkeypatch):
    which = shutil.which
    monkeypatch.setattr(execution.shutil, "which", lambda name, path=None: None if name == "bwrap" else which(name, path=path))
    execution.detect_isolation.cache_clear()
    try:
        with pytest.raises(execution.SandboxUnavailable, match="bubblewrap is not installed.*isolation=none"):
            Sandbox()
        bare = Sandbox(isolation="none")  # only when asked for, by name
        assert not bare.isolation.sandboxed
    finally:
        execution.detect_isolation.cache_clear()
