"""The sandbox's seccomp filter: a classic BPF program that bubblewrap loads (`bwrap --seccomp FD`)
before it starts the program, so every process of the run inherits it.

    blob = seccomp.filter_program()     # bytes of struct sock_filter[], or None off x86_64/aarch64

It denies, with EPERM, the system calls a program under test never needs and that widen the kernel
surface an escape would use: tracing and reading other processes, mounting and namespaces, kernel
keyrings, eBPF, perf, userfaultfd and io_uring (both common in kernel exploits), modules, kexec,
reboot, swap, the kernel log, handle-based opens, and a new user namespace by clone(2). Everything else is allowed: the namespaces and
resource limits do the containing; this filter only shrinks what is reachable from inside them.
A system call of another ABI (i386 or x32 on x86_64) kills the process: the numbers below would
not mean the same calls there.

The numbers are the kernel's per-architecture system call table (x86_64: `asm/unistd_64.h`;
aarch64 uses the generic table, `asm-generic/unistd.h`); a test checks them against the headers
where those are installed.
"""

from __future__ import annotations

import errno
import platform
import struct

# (name, x86_64 number, aarch64 number); None where the call does not exist on that architecture.
DENIED: tuple[tuple[str, int | None, int | None], ...] = (
    ("ptrace", 101, 117),
    ("process_vm_readv", 310, 270),
    ("process_vm_writev", 311, 271),
    ("kcmp", 312, 272),
    ("pidfd_getfd", 438, 438),
    ("mount", 165, 40),
    ("umount2", 166, 39),
    ("pivot_root", 155, 41),
    ("open_tree", 428, 428),
    ("move_mount", 429, 429),
    ("fsopen", 430, 430),
    ("fsconfig", 431, 431),
    ("fsmount", 432, 432),
    ("fspick", 433, 433),
    ("mount_setattr", 442, 442),
    ("unshare", 272, 97),
    ("setns", 308, 268),
    ("add_key", 248, 217),
    ("request_key", 249, 218),
    ("keyctl", 250, 219),
    ("bpf", 321, 280),
    ("perf_event_open", 298, 241),
    ("userfaultfd", 323, 282),
    ("io_uring_setup", 425, 425),
    ("io_uring_enter", 426, 426),
    ("io_uring_register", 427, 427),
    ("init_module", 175, 105),
    ("finit_module", 313, 273),
    ("delete_module", 176, 106),
    ("kexec_load", 246, 104),
    ("kexec_file_load", 320, 294),
    ("reboot", 169, 142),
    ("swapon", 167, 224),
    ("swapoff", 168, 225),
    ("syslog", 103, 116),
    ("acct", 163, 89),
    ("quotactl", 179, 60),
    ("vhangup", 153, 58),
    ("name_to_handle_at", 303, 264),
    ("open_by_handle_at", 304, 265),
    ("lookup_dcookie", 212, 18),
    ("iopl", 172, None),
    ("ioperm", 173, None),
    ("uselib", 134, None),
)

# <linux/audit.h>: AUDIT_ARCH_X86_64, AUDIT_ARCH_AARCH64; the x32 ABI's call numbers have this bit.
ARCHES = {"x86_64": (0xC000003E, 1), "aarch64": (0xC00000B7, 2)}
X32_SYSCALL_BIT = 0x40000000
# clone(2) may make a user namespace (its flags are the first argument, which the filter can read);
# clone3(2) passes them in memory, which it cannot, so clone3 answers ENOSYS and the C library
# falls back to clone. bubblewrap >= 0.8 also forbids nested user namespaces (--disable-userns).
CLONE = {"x86_64": 56, "aarch64": 220}
CLONE3 = 435
CLONE_NEWUSER = 0x10000000

# <linux/filter.h> and <linux/seccomp.h>
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0_LOW = 0, 4, 16  # struct seccomp_data (little-endian: the low word first)


def machine() -> str:
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def denied_numbers(arch: str) -> dict[str, int]:
    column = ARCHES[arch][1]
    return {row[0]: row[column] for row in DENIED if row[column] is not None}


def filter_program(arch: str | None = None) -> bytes | None:
    """struct sock_filter[] as bytes for `arch` (default: this machine's), None where no table is known."""
    arch = arch or machine()
    if arch not in ARCHES:
        return None
    # Jumps name their targets; the labels resolve to the relative offsets BPF wants at the end.
    code: list[tuple[int, str | int, str | int, int]] = [
        (BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        (BPF_JEQ_K, 0, "kill", ARCHES[arch][0]),  # another ABI's numbers mean other calls
        (BPF_LD_W_ABS, 0, 0, OFFSET_NR),
    ]
    if arch == "x86_64":
        code.append((BPF_JGE_K, "kill", 0, X32_SYSCALL_BIT))
    code += [(BPF_JEQ_K, "enosys", 0, CLONE3), (BPF_JEQ_K, 0, "numbers", CLONE[arch]),
             (BPF_LD_W_ABS, 0, 0, OFFSET_ARG0_LOW), (BPF_JSET_K, "deny", "allow", CLONE_NEWUSER)]
    labels = {"numbers": len(code)}
    code += [(BPF_JEQ_K, "deny", 0, nr) for nr in sorted(set(denied_numbers(arch).values()))]
    returns = {"allow": SECCOMP_RET_ALLOW, "deny": SECCOMP_RET_ERRNO | errno.EPERM,
               "enosys": SECCOMP_RET_ERRNO | errno.ENOSYS, "kill": SECCOMP_RET_KILL_PROCESS}
    for label, action in returns.items():
        labels[label] = len(code)
        code.append((BPF_RET_K, 0, 0, action))

    def offset(at: int, target: str | int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return b"".join(struct.pack("=HBBI", op, offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(code))
