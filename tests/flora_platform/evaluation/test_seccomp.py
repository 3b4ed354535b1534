"""The sandbox's seccomp filter: its system call numbers against the kernel headers (where installed),
and its decisions, for both architectures, by running the BPF program in a small interpreter of
the instructions it uses. test_sandbox_escapes.py checks it in the real kernel."""

import errno
import re
import struct
from pathlib import Path

import pytest

from flora_platform.evaluation import seccomp

HEADERS = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), "aarch64": Path("/usr/include/asm-generic/unistd.h")}
ALLOW, DENY = seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_ERRNO | errno.EPERM


def run_filter(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """The action of a classic BPF seccomp program for one call (loads, JEQ/JGE/JSET, RET only)."""
    data = struct.pack("=IIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = insns[pc]
        if op == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif op == seccomp.BPF_RET_K:
            return k
        else:
            taken = {seccomp.BPF_JEQ_K: acc == k, seccomp.BPF_JGE_K: acc >= k, seccomp.BPF_JSET_K: bool(acc & k)}[op]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_numbers_match_the_kernel_headers(arch):
    header = HEADERS[arch]
    if not header.exists():
        pytest.skip(f"{header} is not installed")
    defined = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", header.read_text())}
    expected = {name: defined[name] for name in seccomp.denied_numbers(arch)}
    assert seccomp.denied_numbers(arch) == expected
    assert (defined["clone"], defined["clone3"]) == (seccomp.CLONE[arch], seccomp.CLONE3)


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_filter_decisions(arch):
    program = seccomp.filter_program(arch)
    audit, other = seccomp.ARCHES[arch][0], 0x40000003  # AUDIT_ARCH_I386
    for name, nr in seccomp.denied_numbers(arch).items():
        assert run_filter(program, audit, nr) == DENY, name
    for nr in (0, 1, 2, 57, 59, 63, 64, 221, 260):  # read/write/open/fork/execve... on one arch or the other
        if nr not in seccomp.denied_numbers(arch).values() and nr != seccomp.CLONE[arch]:
            assert run_filter(program, audit, nr) == ALLOW, nr
    clone = seccomp.CLONE[arch]
    assert run_filter(program, audit, clone, 0x01200011) == ALLOW  # what fork() passes
    assert run_filter(program, audit, clone, 0x003D0F00) == ALLOW  # what pthread_create passes
    assert run_filter(program, audit, clone, seccomp.CLONE_NEWUSER | 17) == DENY
    assert run_filter(program, audit, seccomp.CLONE3) == seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run_filter(program, other, 0) == seccomp.SECCOMP_RET_KILL_PROCESS
    if arch == "x86_64":
        assert run_filter(program, audit, seccomp.X32_SYSCALL_BIT | 0) == seccomp.SECCOMP_RET_KILL_PROCESS


def test_unknown_architecture_has_no_filter():
    assert seccomp.filter_program("riscv64") is None
