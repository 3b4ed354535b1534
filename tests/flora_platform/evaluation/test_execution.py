"""The sandbox's verdicts and limits: right verdicts on known-correct and known-wrong programs in
every available language, runaway programs stopped within the limits, a fresh directory and a
minimal environment per run. Escape attempts are in test_sandbox_escapes.py.

Everything runs real interpreters in the real sandbox (bubblewrap, which `make install` puts on
the machine); where it cannot run, these tests fail: the sandbox fails closed, and so do they.
"""

import json
import os
import time
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
    """Children that live on: fork fails once the run has max_processes processes."""
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
    assert result.status == "passed", (result.detail, result.stderr)
    word, forked, errno = result.stdout.split()
    assert word == "limited" and int(forked) < RUNAWAY.max_processes and int(errno) == 11  # EAGAIN
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
    assert first["cwd"] == execution.WORKDIR
    assert first["env"]["HOME"].startswith(first["cwd"]) and first["env"]["TMPDIR"].startswith(first["cwd"])
    assert "left-behind" not in second["files"] and "program.py" in second["files"]
    if sandbox.isolation.own_uid:
        assert UID_BASE <= first["uid"] < UID_BASE + UID_COUNT and first["uid"] != os.getuid()


def test_unisolated_runs_only_when_asked_and_keeps_its_limits():
    """isolation="none" runs in a throw-away host directory with the same verdicts and limits."""
    bare = Sandbox(RUNAWAY, isolation="none")
    assert not bare.isolation.sandboxed and "none" in bare.isolation.describe()
    probe = bare.run("python", "import os\nprint(os.getcwd())\nopen('x', 'w').write('1')\n")
    assert probe.status == "passed", (probe.detail, probe.stderr)
    workdir = Path(probe.stdout.strip())
    assert workdir.parent.parent.name.startswith("flora-sandbox-") and not workdir.exists()
    assert bare.run("python", "while True:\n    pass\n").status == "timeout"
    assert bare.run("python", "import sys\nsys.exit(4)\n").exit_code == 4


def test_bad_limits_and_modes_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        ExecutionLimits(timeout_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        ExecutionLimits(max_processes=1)
    for mode in ("strict", "auto", "full"):
        with pytest.raises(ValueError, match="isolation"):
            Sandbox(isolation=mode)
