"""Run generated programs in a sandbox: no network, no view of the host's processes, files or
sockets, resource limits, and nothing left running afterwards.

    sandbox = Sandbox(ExecutionLimits(timeout_s=10))   # SandboxUnavailable if it cannot isolate
    sandbox.unavailable("ruby")              # None, or why ruby programs cannot run here
    result = sandbox.run("python", source)   # ExecutionResult(status="passed", ...)

Every run (`Sandbox.run`) starts bubblewrap (`bwrap`) as an unprivileged user, which works
without root wherever the kernel allows user namespaces; as root, the run first drops to a uid
of its own (one of `UID_COUNT` from `UID_BASE`, locked for the run). bubblewrap gives it:
  - its own user, PID, network, mount, IPC, UTS and cgroup namespaces, and no further user
    namespaces inside: only loopback of its own, no host process visible or signalable, a fresh
    `/proc` showing the run's processes alone, and everything killed when the run ends;
  - a filesystem of the host's `/usr` (with the `/bin`, `/lib` links) and the few `/etc`
    entries interpreters read, all read-only; a minimal `/dev` (null, zero, random, tty...);
    no `/home`, `/root`, `/tmp`, `/run` or `/var`, so no host Unix socket, credential file or
    installed project is reachable; the root itself read-only;
  - a size-capped tmpfs as the working directory (`WORKDIR`), holding the program: the only
    writable place besides a capped `/dev/shm`, gone when the run ends;
  - a seccomp filter (`seccomp.py`) denying ptrace, mount, keyrings, eBPF, perf, io_uring...
Inside, `sandbox_launch.py` sets RLIMIT_CPU / AS / NPROC / FSIZE / NOFILE / CORE, starts the
program as its child with an environment of PATH, HOME and TMPDIR (both in the working directory)
and reports how it ended. RLIMIT_NPROC counts the processes of the run's own user namespace
(Linux >= 5.14), so it holds for exactly this program even when the caller's uid runs many others.
The caller reads stdout and stderr up to `max_output_kb` each and kills bubblewrap at the
wall-clock limit or when the output overflows; bubblewrap's end takes every process of the run.

The default fails closed: where bubblewrap cannot run (not installed, user namespaces disabled,
a container whose seccomp or AppArmor profile forbids them), `Sandbox()` raises
`SandboxUnavailable` saying why. `isolation="none"` runs programs without the sandbox (the limits,
a process group and, as root, a uid per run; the network and the host's files reachable): only
for a machine you can throw away, and what asks for it must say so where results are reported.

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

from flora_platform.evaluation import seccomp

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("sandbox_launch.py")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
UID_BASE = 2_000_000_000  # far above any account or container range
UID_COUNT = 4096
PROBE_UID = UID_BASE + UID_COUNT  # the availability probe's, outside the runs' range
STATUSES = ("passed", "failed", "timeout", "error")
ISOLATION_MODES = ("sandbox", "none")

# Inside the sandbox: where the program runs and where the launcher lies.
WORKDIR = "/sandbox"
INNER_LAUNCHER = "/.flora/sandbox_launch.py"
BWRAP_NAMESPACES = ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--hostname", "sandbox")
HOST_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # symlinks into /usr, or directories
# What interpreters read from /etc: the dynamic loader's cache, Debian's alternatives (lua ->
# lua5.4), the time zone, and the runtimes' own configuration. Nothing else of /etc is visible.
HOST_ETC = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime",
    "/etc/perl", "/etc/R", "/etc/julia", "/etc/racket",
)


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


@dataclass(frozen=True)
class Isolation:
    """How programs run here."""

    sandboxed: bool  # inside bubblewrap (see the module docstring)
    own_uid: bool  # a uid per run (the caller is root)
    seccomp: bool  # the seccomp filter is loaded (x86_64 and aarch64)
    reason: str = ""  # why it is not sandboxed

    def describe(self) -> str:
        if not self.sandboxed:
            return f"none ({self.reason}): network, host files and processes reachable; limits only"
        parts = ["bubblewrap: own user, PID, network, mount, IPC and UTS namespaces", "fresh /proc", "read-only /usr",
                 "no host sockets or devices", "capped tmpfs work directory"]
        parts.append("seccomp filter" if self.seccomp else f"no seccomp filter (no table for {seccomp.machine()})")
        if self.own_uid:
            parts.append("a uid per run")
        return "sandbox (" + "; ".join(parts) + ")"


class SandboxUnavailable(RuntimeError):
    """Programs cannot be isolated on this machine."""


def _bwrap_unavailable() -> str | None:
    if sys.platform != "linux":
        return f"the sandbox needs Linux namespaces, this is {sys.platform}"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if shutil.which("python3", path=SANDBOX_PATH) is None:
        return f"the sandbox's launcher needs python3 on {SANDBOX_PATH}"
    return None


@functools.lru_cache(maxsize=1)
def _bwrap_extras() -> tuple[str, ...]:
    """--disable-userns where bubblewrap has it (>= 0.8); the seccomp filter denies new user
    namespaces on its own, this makes it two locks."""
    usage = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True, text=True, timeout=30).stdout
    return ("--disable-userns",) if "--disable-userns" in usage else ()


@functools.lru_cache(maxsize=1)
def detect_isolation() -> Isolation:
    """Whether programs can be sandboxed here: bubblewrap runs a probe program (once per process)."""
    own_uid = os.geteuid() == 0
    reason = _bwrap_unavailable()
    if reason is None:
        probe = _Launch(ExecutionLimits(), sandboxed=True, uid=PROBE_UID if own_uid else None).run(".py", "pass\n")
        if probe.status != "passed":
            reason = (
                f"bubblewrap could not start a program ({probe.detail}: {probe.stderr.strip()[-300:]}); "
                "it needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0, and in a "
                "container a seccomp and AppArmor profile that allow them and an unmasked /proc)"
            )
    if reason is not None:
        return Isolation(False, own_uid, False, reason)
    return Isolation(True, own_uid, seccomp.filter_program() is not None)


class Sandbox:
    """Runs programs under `limits` (see the module docstring); thread-safe.

    isolation: "sandbox" (bubblewrap; `SandboxUnavailable` where it cannot run) or "none"
    (no isolation but the limits: asked for explicitly, never a fallback).
    """

    def __init__(self, limits: ExecutionLimits | None = None, isolation: str = "sandbox", root: str | Path | None = None):
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation={isolation!r}: choose one of {ISOLATION_MODES}")
        self.limits = limits or ExecutionLimits()
        if isolation == "none":
            log.warning("sandbox isolation=none: generated programs run with the network and host files reachable")
            self.isolation = Isolation(False, os.geteuid() == 0, False, "isolation=none was asked for")
        else:
            found = detect_isolation()
            if not found.sandboxed:
                raise SandboxUnavailable(
                    f"cannot isolate generated programs here: {found.reason}. Set execution.isolation=none "
                    "only to run them unisolated on a machine you can throw away."
                )
            self.isolation = found
        self._root = Path(root) if root else Path(tempfile.gettempdir()) / f"flora-sandbox-{os.geteuid()}"
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
        with self._own_uid() as uid:
            launch = _Launch(self.limits, self.isolation.sandboxed, uid, self._root)
            return launch.run(runtime.extension, source, self.interpreter(language))

    @contextlib.contextmanager
    def _own_uid(self) -> Iterator[int | None]:
        """A uid no other run holds (a lock file per uid, released when the run ends)."""
        if not self.isolation.own_uid:
            yield None
            return
        locks = _private_dir(_private_dir(self._root, 0o711) / "uids", 0o700)
        for offset in random.sample(range(UID_COUNT), UID_COUNT):
            uid = UID_BASE + offset
            fd = os.open(locks / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
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


class _Launch:
    """One program's run: the launcher's spec, the command around it, its verdict."""

    def __init__(self, limits: ExecutionLimits, sandboxed: bool, uid: int | None, root: Path | None = None):
        self.limits, self.sandboxed, self.uid = limits, sandboxed, uid
        self.root = root or Path(tempfile.gettempdir()) / f"flora-sandbox-{os.geteuid()}"
        self.fds: list[int] = []

    def run(self, extension: str, source: str, interpreter: str | None = None) -> ExecutionResult:
        interpreter = interpreter or shutil.which("python3", path=SANDBOX_PATH) or sys.executable
        try:
            if self.sandboxed:
                return self._start(WORKDIR, [interpreter, f"program{extension}"], extension, source)
            # Unsandboxed: a throw-away host directory (the caller's, or the run's uid's).
            work = _private_dir(_private_dir(self.root, 0o711) / "work", 0o711)
            workdir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
            try:
                program = workdir / f"program{extension}"
                program.write_text(source)
                if self.uid is not None:
                    os.chown(workdir, self.uid, self.uid)
                    os.chown(program, self.uid, self.uid)
                return self._start(str(workdir), [interpreter, program.name], extension, source)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds.clear()

    def _data_fd(self, data: bytes) -> int:
        """A file descriptor reading `data` from its start, for bubblewrap to copy into the sandbox."""
        fd = os.memfd_create("flora-sandbox")
        self.fds.append(fd)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _bwrap(self, extension: str, source: str) -> list[str]:
        lim = self.limits
        args = [shutil.which("bwrap") or "bwrap", *BWRAP_NAMESPACES, *_bwrap_extras(), "--ro-bind", "/usr", "/usr"]
        for path in HOST_LINKS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in HOST_ETC:
            args += ["--ro-bind-try", path, path]
        capped = str(lim.workdir_mb << 20)
        args += [
            "--proc", "/proc", "--dev", "/dev", "--size", capped, "--tmpfs", "/dev/shm",
            "--size", capped, "--perms", "0700", "--tmpfs", WORKDIR,
            "--file", str(self._data_fd(source.encode())), f"{WORKDIR}/program{extension}",
            "--ro-bind-data", str(self._data_fd(LAUNCHER.read_bytes())), INNER_LAUNCHER,
        ]
        seccomp_filter = seccomp.filter_program()
        if seccomp_filter is not None:
            args += ["--seccomp", str(self._data_fd(seccomp_filter))]
        return args + ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKDIR]

    def _start(self, workdir: str, argv: list[str], extension: str, source: str) -> ExecutionResult:
        lim = self.limits
        env = {"PATH": SANDBOX_PATH, "HOME": f"{workdir}/home", "TMPDIR": f"{workdir}/tmp", "LANG": "C.UTF-8"}
        limits = {
            "cpu_s": int(lim.cpu_s), "address_space_bytes": lim.memory_mb << 20, "file_bytes": lim.max_file_mb << 20,
            "open_files": lim.open_files, "core_bytes": 0,
        }
        if self.sandboxed or self.uid is not None:
            # Counted per uid in a user namespace: the run's processes alone. Unsandboxed under the
            # caller's own uid it would count all of the caller's processes, so it is left out.
            limits["processes"] = lim.max_processes
        read_end, write_end = os.pipe()
        spec = {"argv": argv, "env": env, "workdir": workdir, "subdirs": ["home", "tmp"], "status_fd": write_end, "limits": limits}
        # The system's python3 (under /usr, so inside the sandbox too; and runnable by any uid).
        python = shutil.which("python3", path=SANDBOX_PATH) or sys.executable
        if self.sandboxed:
            command, cwd = [*self._bwrap(extension, source), python, "-I", "-S", INNER_LAUNCHER, json.dumps(spec)], "/"
        else:
            # The source itself, not its path: the run's uid may not read the installed project.
            command, cwd = [python, "-I", "-S", "-c", LAUNCHER.read_text(), json.dumps(spec)], workdir
        as_user = {} if self.uid is None else {"user": self.uid, "group": self.uid, "extra_groups": []}
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=cwd, pass_fds=(write_end, *self.fds), start_new_session=True, **as_user,
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
