"""The sandbox's first process of ours: set limits, run the program as a child, report how it ended.

    python3 -I -S sandbox_launch.py '<spec as JSON>'      (or -c "<this file>" with isolation "none")

Run by `execution.Sandbox` inside bubblewrap (or, with isolation "none", directly), as the run's
user. Standard library only: it starts with no site-packages.

  1. create the spec's subdirectories of the working directory (HOME and TMPDIR);
  2. fork; the child sets the resource limits, no new privileges (setuid binaries stay
     powerless), changes into the working directory and execs the program with the spec's
     environment only;
  3. reap children until the program ends; write one JSON line to `status_fd` with its wait
     status and CPU time. A setup failure writes `{"setup_error": ...}` instead.

The program is a child, not this process, so that its wait status (a signal, the CPU time) is
seen whole, and the limits bind the program without binding this report.
"""

import ctypes
import json
import os
import resource
import sys

PR_SET_NO_NEW_PRIVS = 38
LIMITS = {
    "cpu_s": resource.RLIMIT_CPU,
    "address_space_bytes": resource.RLIMIT_AS,
    "processes": resource.RLIMIT_NPROC,
    "file_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "core_bytes": resource.RLIMIT_CORE,
}

_libc = ctypes.CDLL(None, use_errno=True)


def exec_program(spec, status_fd):
    """In the forked child: limits, no new privileges, directory, exec. Never returns."""
    try:
        for name, value in spec["limits"].items():
            # The hard CPU limit a second above the soft one: SIGXCPU first, SIGKILL after.
            hard = value + 1 if name == "cpu_s" else value
            resource.setrlimit(LIMITS[name], (value, hard))
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.chdir(spec["workdir"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as err:  # noqa: BLE001 - whatever it is, the parent must hear of it
        _report(status_fd, {"setup_error": f"starting {spec['argv'][0]}: {err!r}"})
        os._exit(127)


def _report(fd, message):
    os.write(fd, (json.dumps(message) + "\n").encode())


def main():
    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)  # the program never sees it
    try:
        for sub in spec.get("subdirs", ()):
            os.makedirs(os.path.join(spec["workdir"], sub), mode=0o700, exist_ok=True)
    except BaseException as err:  # noqa: BLE001
        _report(status_fd, {"setup_error": f"sandbox setup: {err!r}"})
        return 1
    child = os.fork()
    if child == 0:
        exec_program(spec, status_fd)
    while True:
        pid, status, usage = os.wait4(-1, 0)
        if pid == child:
            break
    _report(status_fd, {"wait_status": status, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kb": usage.ru_maxrss})
    return 0


if __name__ == "__main__":
    sys.exit(main())
