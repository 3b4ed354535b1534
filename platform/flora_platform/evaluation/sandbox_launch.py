"""The sandbox's first process: set the sandbox up, run the program as a child, report how it ended.

    python -I -S sandbox_launch.py '<spec as JSON>'

Run by `execution.Sandbox`, as root inside fresh mount, network and PID namespaces
(`unshare --mount --net --pid --fork --kill-child`) when the machine allows it; then this
process is PID 1 of the PID namespace, and when it exits the kernel kills every process the
program left behind. Standard library only: it starts before any site-packages are importable.

Steps (each optional, as the spec says):
  1. mount a size-capped tmpfs over the working directory, holding a copy of its files: the
     program's only writable place, gone when the namespace ends;
  2. remount every other mount read-only (`/proc/self/mountinfo`), so that nothing outside
     the working directory can be written, whoever the program runs as;
  3. fork; the child sets resource limits, drops every group and switches to the sandbox uid
     (no new privileges: setuid binaries stay powerless), changes into the working directory
     and execs the program with the spec's environment only;
  4. reap children until the program ends; write one JSON line to `status_fd` with its wait
     status and CPU time. A setup failure writes `{"setup_error": ...}` instead.

The program is a child, not PID 1 itself, because PID 1 of a namespace ignores signals it has
no handler for (a program killing itself with SIGABRT would "succeed").
"""

import ctypes
import json
import os
import resource
import stat
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_REMOUNT, MS_BIND = 1024, 2048, 32, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
# Per-mount options that a read-only bind remount must repeat, or it would clear them.
KEPT_FLAGS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}
PR_SET_NO_NEW_PRIVS = 38
LIMITS = {
    "cpu_s": resource.RLIMIT_CPU,
    "address_space_bytes": resource.RLIMIT_AS,
    "processes": resource.RLIMIT_NPROC,
    "file_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
    "core_bytes": resource.RLIMIT_CORE,
}
MAX_COPIED_BYTES = 16 << 20  # the working directory holds the program: small files only

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _unescape(path):
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    out, i = bytearray(), 0
    raw = path.encode()
    while i < len(raw):
        if raw[i] == 92 and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode()


def private_tmpfs_workdir(workdir, size_bytes, uid, gid):
    """Replace the working directory by a tmpfs of `size_bytes` holding a copy of its files."""
    files = {}
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_COPIED_BYTES:
            raise ValueError(f"{path}: the working directory may hold only regular files up to {MAX_COPIED_BYTES} bytes")
        with open(path, "rb") as f:
            files[name] = (f.read(), stat.S_IMODE(st.st_mode))
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_bytes},nr_inodes=4096,mode=0700,uid={uid},gid={gid}")
    for name, (data, mode) in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        os.chown(path, uid, gid)


def remount_read_only(except_path):
    for line in open("/proc/self/mountinfo").read().splitlines():
        fields = line.split()
        mount_point, options = _unescape(fields[4]), fields[5].split(",")
        if mount_point == except_path or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= KEPT_FLAGS.get(option, 0)
        try:
            _mount(None, mount_point, None, flags)
        except OSError:
            # A mount point hidden under a later mount is not reachable by path, and then
            # neither by the program; anything else that stays writable is fatal.
            if os.path.ismount(mount_point) and not _is_read_only(mount_point):
                raise


def _is_read_only(path):
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def exec_program(spec, status_fd):
    """In the forked child: limits, identity, directory, exec. Never returns."""
    try:
        for name, value in spec["limits"].items():
            # The hard CPU limit a second above the soft one: SIGXCPU first, SIGKILL after.
            hard = value + 1 if name == "cpu_s" else value
            resource.setrlimit(LIMITS[name], (value, hard))
        uid, gid = spec.get("uid"), spec.get("gid")
        if uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
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
        workdir = spec["workdir"]
        if spec.get("tmpfs_bytes") or spec.get("read_only_root"):
            _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
        if spec.get("tmpfs_bytes"):
            private_tmpfs_workdir(workdir, spec["tmpfs_bytes"], spec.get("uid") or 0, spec.get("gid") or 0)
        for sub in spec.get("subdirs", ()):
            path = os.path.join(workdir, sub)
            os.makedirs(path, mode=0o700, exist_ok=True)
            if spec.get("uid") is not None:
                os.chown(path, spec["uid"], spec["gid"])
        if spec.get("read_only_root"):
            remount_read_only(workdir)
    except BaseException as err:  # noqa: BLE001
        _report(status_fd, {"setup_error": f"sandbox setup: {err!r}"})
        return 1
    child = os.fork()
    if child == 0:
        exec_program(spec, status_fd)
    while True:  # PID 1 also inherits orphans: reap them too, until the program itself ends
        pid, status, usage = os.wait4(-1, 0)
        if pid == child:
            break
    _report(status_fd, {"wait_status": status, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kb": usage.ru_maxrss})
    return 0


if __name__ == "__main__":
    sys.exit(main())
