"""Run generated programs in a sandbox: one throw-away directory each, resource limits, no network,
no writes anywhere else, and nothing left running afterwards.

    sandbox = Sandbox(ExecutionLimits(timeout_s=10))
    sandbox.unavailable("ruby")              # None, or why ruby programs cannot run here
    result = sandbox.run("python", source)   # ExecutionResult(status="passed", ...)

Every run (`Sandbox.run`):
  - writes the program into a fresh directory, and runs `sandbox_launch.py` there under
    `unshare --mount --net --pid --fork --kill-child` (new mount, network and PID namespaces);
  - the launcher puts a size-capped tmpfs over that directory, remounts everything else
    read-only, and starts the interpreter as a child under a uid of its own (one of
    `UID_COUNT` from `UID_BASE`, locked for the run so concurrent runs never share one), with
    every group dropped, no new privileges, RLIMIT_CPU / AS / NPROC / FSIZE / NOFILE / CORE set
    before exec, and an environment of PATH, HOME and TMPDIR (the last two inside the directory);
  - the caller reads stdout and stderr up to `max_output_kb` each and kills the whole process
    group at the wall-clock limit or when the output overflows; the end of the PID namespace
    takes every process the program started with it, even ones that left the process group.

A uid of its own per run makes RLIMIT_NPROC (counted per uid) hold for exactly this program
and keeps concurrent runs from starving each other. Where namespaces are unavailable (not root,
no `unshare`), `isolation="auto"` falls back to what is left and says so (`Sandbox.isolation`):
as root, the own uid and the limits; otherwise only the limits and the process group. Then a
program can reach the network and write wherever that user may; `isolation="full"` refuses to
run instead.

Verdicts: passed (exit status 0), failed (any other exit status: a failed test, an exception,
a syntax error), timeout (wall-clock or CPU limit), error (killed by another signal, output over
the limit, or the sandbox could not start it; `detail` says which). stderr is kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("sandbox_launch.py")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
UNSHARE_ARGS = ("--mount", "--net", "--pid", "--fork", "--kill-child")
UID_BASE = 2_000_000_000  # far above any account or container range
UID_COUNT = 4096
STATUSES = ("passed", "failed", "timeout", "error")
ISOLATION_MODES = ("auto", "full", "none")


@dataclass(frozen=True)
class Runtime:
    """How to run one language: the file extension and interpreter candidates on SANDBOX_PATH."""

    language: str
    extension: str
    interpreters: tuple[str, ...]
    probe: str  # a program that exits 0: proves the interpreter runs inside the sandbox


RUNTIMES = {
    r.language: r
    for r in (
        Runtime("python", ".py", ("python3",), "pass\n"),
        Runtime("perl", ".pl", ("perl",), "exit 0;\n"),
        Runtime("shell", ".sh", ("bash",), "exit 0\n"),
        Runtime("ruby", ".rb", ("ruby",), "exit 0\n"),
        Runtime("lua", ".lua", ("lua", "lua5.4", "lua5.3", "luajit"), "os.exit(0)\n"),
        Runtime("javascript", ".js", ("node",), "process.exit(0);\n"),
        Runtime("julia", ".jl", ("julia",), "exit(0)\n"),
        Runtime("r", ".r", ("Rscript",), "quit(status = 0)\n"),
        Runtime("racket", ".rkt", ("racket",), "#lang racket\n(exit 0)\n"),
    )
}


@dataclass(frozen=True)
class ExecutionLimits:
    """Per program. timeout_s: wall clock; cpu_s: RLIMIT_CPU; memory_mb: RLIMIT_AS (address
    space, so runtimes that reserve much more than they use need more); max_processes:
    RLIMIT_NPROC for the run's own uid; max_file_mb: RLIMIT_FSIZE; max_output_kb: captured
    stdout and stderr each (more kills the program); workdir_mb: the working directory's tmpfs."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16
    max_output_kb: int = 64
    workdir_mb: int = 64
    open_files: int = 256

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_output_kb", "workdir_mb", "open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.max_processes < 2:
            raise ValueError(f"max_processes must be >= 2 (the interpreter and one child), got {self.max_processes}")


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can enforce on this machine."""

    namespaces: bool  # no network, read-only host filesystem, everything killed at the end
    own_uid: bool  # a uid per run: RLIMIT_NPROC holds, and nothing of other users is writable
    reason: str = ""  # why anything is missing

    @property
    def full(self) -> bool:
        return self.namespaces and self.own_uid

    def describe(self) -> str:
        if self.full:
            return "full (own uid; private mount, network and PID namespaces; read-only host)"
        parts = ["own uid" if self.own_uid else "same uid as the caller", "no namespaces: network reachable, host writable"]
        return f"partial ({'; '.join(parts)}): {self.reason}"


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # passed | failed | timeout | error
    exit_code: int | None = None
    signal: str | None = None
    duration_s: float = 0.0
    cpu_s: float | None = None
    stdout: str = ""
    stderr: str = ""
    detail: str = ""  # why, when not passed

    def to_dict(self) -> dict:
        return asdict(self)


class SandboxUnavailable(RuntimeError):
    """The isolation asked for cannot be had on this machine."""


@functools.lru_cache(maxsize=1)
def detect_isolation() -> Isolation:
    """The strongest isolation this machine gives (probed once per process)."""
    if sys.platform != "linux":
        return Isolation(False, False, f"namespaces and per-run uids need Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        return Isolation(False, False, "not running as root: cannot switch uid or create namespaces")
    unshare = shutil.which("unshare")
    if unshare is None:
        return Isolation(False, True, "`unshare` (util-linux) is not installed")
    try:
        probe = subprocess.run([unshare, *UNSHARE_ARGS, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Isolation(False, True, f"`unshare` failed to run: {err}")
    if probe.returncode != 0:
        return Isolation(False, True, f"`unshare {' '.join(UNSHARE_ARGS)}` failed: {probe.stderr.strip()[:200]}")
    return Isolation(True, True)


class Sandbox:
    """Runs programs under `limits` (see the module docstring); thread-safe.

    isolation: "auto" (the strongest available, with a warning when it is not full), "full"
    (raise `SandboxUnavailable` unless it is), "none" (limits and process group only).
    """

    def __init__(self, limits: ExecutionLimits | None = None, isolation: str = "auto", root: str | Path | None = None):
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation={isolation!r}: choose one of {ISOLATION_MODES}")
        self.limits = limits or ExecutionLimits()
        found = detect_isolation()
        if isolation == "full" and not found.full:
            raise SandboxUnavailable(
                f"full isolation is not available here ({found.reason}); run as root on Linux with "
                "util-linux `unshare`, or set execution.isolation=auto to run with less"
            )
        if isolation == "none":
            found = Isolation(False, False, "isolation=none was asked for")
        elif not found.full:
            log.warning("sandbox isolation is %s", found.describe())
        self.isolation = found
        self._root = _private_dir(Path(root) if root else Path(tempfile.gettempdir()) / f"flora-sandbox-{os.geteuid()}", 0o711)
        self._work = _private_dir(self._root / "work", 0o711)
        self._uids = _private_dir(self._root / "uids", 0o700)
        self._unshare = shutil.which("unshare") if found.namespaces else None
        self._availability: dict[str, str | None] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ languages

    def interpreter(self, language: str) -> str | None:
        runtime = RUNTIMES.get(language)
        if runtime is None:
            return None
        for name in runtime.interpreters:
            path = shutil.which(name, path=SANDBOX_PATH)
            if path:
                return path
        return None

    def unavailable(self, language: str) -> str | None:
        """None when `language` runs here, else the reason (no runtime, no interpreter, probe failed)."""
        with self._lock:
            if language in self._availability:
                return self._availability[language]
        runtime = RUNTIMES.get(language)
        if runtime is None:
            reason = f"no runtime is known for {language!r} (known: {sorted(RUNTIMES)})"
        elif self.interpreter(language) is None:
            reason = f"no interpreter on {SANDBOX_PATH}: looked for {', '.join(runtime.interpreters)}"
        else:
            probe = self._run(language, runtime.probe)
            reason = None if probe.status == "passed" else f"the interpreter does not run in the sandbox: {probe.detail} {probe.stderr[-300:]}".strip()
        with self._lock:
            self._availability[language] = reason
        return reason

    # ------------------------------------------------------------------ running

    def run(self, language: str, source: str) -> ExecutionResult:
        """Run `source` as a program of `language`; an unavailable language gives status "error"."""
        reason = self.unavailable(language)
        if reason is not None:
            return ExecutionResult("error", detail=f"{language} is unavailable: {reason}")
        return self._run(language, source)

    def _run(self, language: str, source: str) -> ExecutionResult:
        runtime = RUNTIMES[language]
        interpreter = self.interpreter(language)
        with self._own_uid() as uid:
            workdir = Path(tempfile.mkdtemp(prefix="run-", dir=self._work))
            try:
                program = workdir / f"program{runtime.extension}"
                program.write_text(source)
                if uid is not None and not self.isolation.namespaces:
                    # No tmpfs of its own: the program writes into this directory directly.
                    os.chown(workdir, uid, uid)
                    os.chown(program, uid, uid)
                return self._launch(workdir, [interpreter, program.name], uid)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

    def _launch(self, workdir: Path, argv: list[str], uid: int | None) -> ExecutionResult:
        lim = self.limits
        env = {"PATH": SANDBOX_PATH, "HOME": str(workdir / "home"), "TMPDIR": str(workdir / "tmp"), "LANG": "C.UTF-8"}
        read_end, write_end = os.pipe()
        spec = {
            "argv": argv, "env": env, "workdir": str(workdir), "subdirs": ["home", "tmp"],
            "uid": uid, "gid": uid, "status_fd": write_end,
            "tmpfs_bytes": lim.workdir_mb << 20 if self.isolation.namespaces else 0,
            "read_only_root": self.isolation.namespaces,
            "limits": {
                "cpu_s": int(lim.cpu_s), "address_space_bytes": lim.memory_mb << 20, "processes": lim.max_processes,
                "file_bytes": lim.max_file_mb << 20, "open_files": lim.open_files, "core_bytes": 0,
            },
        }
        command = [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)]
        if self._unshare:
            command = [self._unshare, *UNSHARE_ARGS, *command]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=workdir, pass_fds=(write_end,), start_new_session=True,
            )
        except OSError as err:
            os.close(read_end)
            return ExecutionResult("error", detail=f"sandbox could not start: {err}")
        finally:
            os.close(write_end)
        try:
            stdout, stderr, stopped = _collect(proc, started + lim.timeout_s, lim.max_output_kb << 10)
            reports = _read_reports(read_end)
        finally:
            os.close(read_end)
        duration = time.monotonic() - started
        return _verdict(lim, proc.returncode, reports, stopped, duration, stdout, stderr)

    @contextlib.contextmanager
    def _own_uid(self) -> Iterator[int | None]:
        """A uid no other run holds (a lock file per uid, released when the run ends)."""
        if not self.isolation.own_uid:
            yield None
            return
        for offset in random.sample(range(UID_COUNT), UID_COUNT):
            uid = UID_BASE + offset
            fd = os.open(self._uids / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)
            return
        raise RuntimeError(f"all {UID_COUNT} sandbox uids are in use; run fewer programs at once")


def _private_dir(path: Path, mode: int) -> Path:
    """Create `path` (owned by us, not writable by others) or check that an existing one is so."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = path.lstat()
    if path.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SandboxUnavailable(f"{path} must be a directory owned by uid {os.geteuid()} and writable by it alone; remove it")
    os.chmod(path, mode)
    return path


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str]:
    """Read stdout and stderr until the program ends; kill its process group at `deadline` or when
    a stream passes `cap` bytes. Returns (stdout, stderr, why it was stopped: "", "timeout", "output")."""
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    stopped = ""
    with selectors.DefaultSelector() as sel:
        for stream in buffers:
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                if len(buffers[key.fileobj]) > cap:
                    stopped = "output"
            if stopped:
                break
    if not stopped:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "timeout"
    if stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for stream in buffers:
        stream.close()
    return bytes(buffers[proc.stdout][:cap]), bytes(buffers[proc.stderr][:cap]), stopped


def _read_reports(fd: int) -> list[dict]:
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    reports = []
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            reports.append(json.loads(line))
    return reports


def _verdict(lim: ExecutionLimits, returncode, reports, stopped, duration, stdout, stderr) -> ExecutionResult:
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    common = dict(duration_s=round(duration, 3), stdout=out, stderr=err)
    setup_error = next((r["setup_error"] for r in reports if "setup_error" in r), None)
    ended = next((r for r in reports if "wait_status" in r), None)
    cpu = round(ended["cpu_s"], 3) if ended else None
    if stopped == "timeout":
        return ExecutionResult("timeout", cpu_s=cpu, detail=f"killed at the wall-clock limit of {lim.timeout_s:g} s", **common)
    if stopped == "output":
        return ExecutionResult("error", cpu_s=cpu, detail=f"killed: output over the limit of {lim.max_output_kb} KiB", **common)
    if setup_error:
        return ExecutionResult("error", detail=f"sandbox: {setup_error}", **common)
    if ended is None:
        return ExecutionResult("error", exit_code=returncode, detail=f"sandbox ended without a report (exit status {returncode})", **common)
    code = os.waitstatus_to_exitcode(ended["wait_status"])
    if code >= 0:
        status = "passed" if code == 0 else "failed"
        return ExecutionResult(status, exit_code=code, cpu_s=cpu, detail="" if code == 0 else f"exit status {code}", **common)
    name = signal.Signals(-code).name
    if name == "SIGXCPU" or (name == "SIGKILL" and cpu is not None and cpu >= lim.cpu_s):
        return ExecutionResult("timeout", signal=name, cpu_s=cpu, detail=f"killed at the CPU limit of {lim.cpu_s} s", **common)
    if name == "SIGXFSZ":
        return ExecutionResult("error", signal=name, cpu_s=cpu, detail=f"killed: a file over the limit of {lim.max_file_mb} MiB", **common)
    return ExecutionResult("error", signal=name, cpu_s=cpu, detail=f"killed by {name}", **common)
