"""The sandbox: right verdicts on known-correct and known-wrong programs in every available language,
runaway programs stopped within the limits, no writes outside the working directory, no network.

Everything runs real interpreters in the real sandbox; the checks that need full isolation (root,
namespaces) are skipped, with the reason, where the machine cannot give it.
"""

import json
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flora_platform.evaluation import execution
from flora_platform.evaluation.execution import RUNTIMES, UID_BASE, UID_COUNT, ExecutionLimits, Runtime, Sandbox
from flora_platform.evaluation.problems import language_name, load_problems, truncate_at_stop

HERE = Path(__file__).resolve().parent
RUNAWAY = ExecutionLimits(timeout_s=4, cpu_s=2, max_processes=16, max_output_kb=16, max_file_mb=1, memory_mb=512)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox()


@pytest.fixture(scope="module")
def tight():
    return Sandbox(RUNAWAY)


def needs_full_isolation(sandbox):
    if not sandbox.isolation.full:
        pytest.skip(f"no full isolation on this machine: {sandbox.isolation.describe()}")


def sandbox_pids() -> list[int]:
    """Processes running under any sandbox uid, on the host."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except FileNotFoundError:
                continue
            if UID_BASE <= uid < UID_BASE + UID_COUNT:
                pids.append(int(entry))
    return pids


def assert_nothing_left_running():
    deadline = time.monotonic() + 10
    while sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_pids() == [], "sandboxed processes outlived their run"


# --------------------------------------------------------------------------- verdicts


def wrong_completions() -> dict[tuple[str, str], str]:
    rows = [json.loads(line) for line in (HERE / "wrong_completions.jsonl").read_text().splitlines() if line.strip()]
    return {(language_name(r["language"]), r["name"]): r["completion"] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("language", ["python", "perl", "shell", "ruby", "lua"])
def test_known_correct_passes_and_known_wrong_fails(sandbox, language):
    reason = sandbox.unavailable(language)
    problems = [p for p in load_problems() if p.language == language]
    if reason is not None:
        assert language not in ("python", "shell"), f"{language} must run here: {reason}"
        pytest.skip(f"{language}: {reason}")
    if not problems:
        pytest.skip(f"the packaged problem set has no {language} problems")
    assert len(problems) >= 12
    wrong = wrong_completions()

    def verdicts(problem):
        right = problem.extra["canonical_solution"]
        # A model that wrote exactly the canonical solution would get it cut at no stop token.
        assert truncate_at_stop(right, problem.stop_tokens) == right
        return (sandbox.run(language, problem.program(right)), sandbox.run(language, problem.program(wrong[(language, problem.name)])))

    with ThreadPoolExecutor(2) as pool:  # two at a time: they must get different uids
        results = list(pool.map(verdicts, problems))
    for problem, (right, bad) in zip(problems, results):
        assert right.status == "passed", (problem.name, right.detail, right.stderr[-500:])
        assert bad.status == "failed" and bad.exit_code != 0, (problem.name, bad.status, bad.detail)


def test_exit_status_output_and_stderr_are_reported(sandbox):
    result = sandbox.run("python", "import sys\nprint('out')\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    assert (result.status, result.exit_code) == ("failed", 3)
    assert result.stdout == "out\n" and "boom" in result.stderr
    result = sandbox.run("shell", "echo fine; exit 0\n")
    assert (result.status, result.stdout) == ("passed", "fine\n")


def test_missing_interpreter_is_reported_not_failed(monkeypatch):
    monkeypatch.setitem(RUNTIMES, "nolang", Runtime("nolang", ".x", ("flora-no-such-interpreter",), ""))
    sandbox = Sandbox()
    reason = sandbox.unavailable("nolang")
    assert reason is not None and "flora-no-such-interpreter" in reason
    result = sandbox.run("nolang", "anything")
    assert result.status == "error" and "unavailable" in result.detail
    assert "no runtime is known" in sandbox.unavailable("cobol")


# --------------------------------------------------------------------------- runaway programs


@pytest.mark.parametrize("language,source", [
    ("python", "while True:\n    pass\n"),
    ("perl", "while (1) { }\n"),
    ("shell", "while true; do :; done\n"),
])
def test_infinite_loop_is_stopped_at_the_limit(tight, language, source):
    started = time.monotonic()
    result = tight.run(language, source)
    assert result.status == "timeout", (result.detail, result.stderr)
    assert time.monotonic() - started < RUNAWAY.timeout_s + 3


def test_cpu_limit_stops_a_busy_program_before_the_wall_clock(sandbox):
    busy = Sandbox(ExecutionLimits(timeout_s=60, cpu_s=1))
    started = time.monotonic()
    result = busy.run("python", "while True:\n    pass\n")
    assert result.status == "timeout" and result.signal == "SIGXCPU", (result.status, result.detail)
    assert time.monotonic() - started < 30


def test_sleeping_program_is_killed_at_the_wall_clock(tight):
    started = time.monotonic()
    result = tight.run("shell", "sleep 1000\n")
    assert result.status == "timeout"
    assert time.monotonic() - started < RUNAWAY.timeout_s + 3
    assert_nothing_left_running()


def test_process_count_is_held_by_the_limit(tight):
    """Children that live on: fork fails once the run's uid has max_processes processes."""
    source = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as err:\n"
        "    print('limited', n, err.errno)\n"
    )
    result = tight.run("python", source)
    if not tight.isolation.own_uid:
        pytest.skip(f"RLIMIT_NPROC counts per uid and this run shares the caller's: {tight.isolation.describe()}")
    assert result.status == "passed", (result.detail, result.stderr)
    word, forked, errno = result.stdout.split()
    assert word == "limited" and int(forked) < RUNAWAY.max_processes and int(errno) == 11  # EAGAIN
    assert_nothing_left_running()


def test_fork_bomb_ends_within_the_limits_and_leaves_nothing(tight):
    needs_full_isolation(tight)
    started = time.monotonic()
    result = tight.run("shell", ":(){ :|:& };:\nwait\n")
    assert result.status in ("timeout", "failed", "passed", "error")
    assert time.monotonic() - started < RUNAWAY.timeout_s + 5
    # Even the processes that escaped the process group end with the run.
    escaped = tight.run("shell", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &\necho started\n")
    assert escaped.status == "passed"
    assert_nothing_left_running()


@pytest.mark.parametrize("language,source", [
    ("python", "while True:\n    print('x' * 1000)\n"),
    ("perl", "while (1) { print 'x' x 1000, \"\\n\"; }\n"),
])
def test_huge_output_is_cut_and_the_program_killed(tight, language, source):
    started = time.monotonic()
    result = tight.run(language, source)
    assert result.status == "error" and "output" in result.detail
    assert len(result.stdout.encode()) <= RUNAWAY.max_output_kb << 10
    assert time.monotonic() - started < RUNAWAY.timeout_s


def test_file_size_and_memory_limits_hold(tight):
    big_file = tight.run("python", "open('big', 'wb').write(b'x' * (4 << 20))\n")
    assert big_file.status == "failed" and "File too large" in big_file.stderr
    memory = tight.run("python", "blob = bytearray(2 << 30)\n")
    assert memory.status == "failed" and "MemoryError" in memory.stderr


def test_abort_is_not_swallowed(sandbox):
    result = sandbox.run("python", "import os\nos.abort()\n")
    assert result.status == "error" and result.signal == "SIGABRT"


# --------------------------------------------------------------------------- isolation


def test_program_never_writes_outside_its_directory(sandbox):
    needs_full_isolation(sandbox)
    token = uuid.uuid4().hex
    targets = [
        f"/tmp/flora-escape-{token}", f"/var/tmp/flora-escape-{token}", f"/dev/shm/flora-escape-{token}",
        str(HERE / f"flora-escape-{token}"), str(Path.home() / f"flora-escape-{token}"), f"../flora-escape-{token}",
        f"../../flora-escape-{token}", f"link-to-tmp/flora-escape-{token}",
    ]
    source = (
        "import json, os\n"
        "os.symlink('/tmp', 'link-to-tmp')\n"
        f"targets = {targets!r}\n"
        "written = []\n"
        "for path in targets:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        written.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('inside.txt', 'w').write('ok')\n"
        "os.makedirs(os.environ['TMPDIR'] + '/sub')\n"
        "print(json.dumps({'written': written, 'inside': open('inside.txt').read(), 'cwd': os.getcwd()}))\n"
    )
    result = sandbox.run("python", source)
    assert result.status == "passed", (result.detail, result.stderr)
    out = json.loads(result.stdout)
    assert out["written"] == [] and out["inside"] == "ok"
    cwd = Path(out["cwd"])
    on_host = [t for t in targets if (cwd / t).exists() or Path(t).exists()]
    assert on_host == []
    assert not cwd.exists(), "the working directory must be thrown away"
    shell = sandbox.run("shell", f"echo x > /tmp/flora-escape-{token}-sh || exit 7\n")
    assert shell.exit_code == 7 and not Path(f"/tmp/flora-escape-{token}-sh").exists()


def test_no_network_even_to_loopback(sandbox):
    needs_full_isolation(sandbox)
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # reachable from here
        source = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
        )
        result = sandbox.run("python", source)
        assert result.status == "failed" and "OSError" in result.stderr, result.stderr
    finally:
        server.close()


def test_each_run_gets_a_fresh_directory_and_a_minimal_environment(sandbox):
    probe = (
        "import json, os\n"
        "files = sorted(os.listdir('.'))\n"
        "open('left-behind', 'w').write('x')\n"
        "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'files': files, 'uid': os.getuid()}))\n"
    )
    first = json.loads(sandbox.run("python", probe).stdout)
    second = json.loads(sandbox.run("python", probe).stdout)
    assert set(first["env"]) == {"PATH", "HOME", "TMPDIR", "LANG"}
    assert first["env"]["HOME"].startswith(first["cwd"]) and first["env"]["TMPDIR"].startswith(first["cwd"])
    assert "left-behind" not in second["files"] and "program.py" in second["files"]
    assert first["cwd"] != second["cwd"] and not Path(first["cwd"]).exists()
    if sandbox.isolation.own_uid:
        assert UID_BASE <= first["uid"] < UID_BASE + UID_COUNT


def test_bad_limits_and_modes_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        ExecutionLimits(timeout_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        ExecutionLimits(max_processes=1)
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="strict")
    if not execution.detect_isolation().full:
        with pytest.raises(execution.SandboxUnavailable, match="isolation=auto"):
            Sandbox(isolation="full")
