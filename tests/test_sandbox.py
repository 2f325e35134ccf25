"""The code reward's sandbox: the three test formats, hostile candidates, concurrency, fail-closed, and the CLI.

Containment tests are phrased so that the candidate prints "contained" only when its attack failed: a passing
test then proves the attack was stopped, not merely that something ran. bubblewrap is required (CI installs it).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlhf_refiner.config import CodeRewardConfig
from rlhf_refiner.records import CodeTests
from rlhf_refiner.reward import sandbox as sandbox_module
from rlhf_refiner.reward.code_eval import evaluate, extract_code, program_of, reward_of
from rlhf_refiner.reward.sandbox import Sandbox, SandboxUnavailableError

FIXTURES = Path(__file__).parent / "fixtures"
CONTAINED = CodeTests("stdio", json.dumps([{"input": "", "output": "contained"}]))
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def box() -> Sandbox:
    sb = Sandbox(CodeRewardConfig(test_timeout_s=1.0, max_concurrency=3, memory_mb=512, max_seconds=20))
    assert sb.isolation in ("bwrap", "bwrap-shared-uid")
    return sb


def contained(box: Sandbox, attack: str) -> str:
    return evaluate(box, CONTAINED, attack).status


STDIO = CodeTests("stdio", json.dumps([{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]))
CALL = CodeTests("call", json.dumps([{"input": [[1, 5, 2]], "output": [5]}, {"input": [[-4]], "output": -4}]), "top")
ASSERTS = CodeTests("assert", json.dumps([{"code": "assert sq(2) == 4"}, {"code": "assert sq(-3) == 9"}]))


@pytest.mark.parametrize(
    ("tests", "program", "status", "passed"),
    [
        (STDIO, "a, b = map(int, input().split())\nprint(a + b)", "ok", 2),
        (STDIO, "print(3)", "wrong_answer", 1),  # right on the first input only
        (STDIO, "print(1/0)", "runtime_error", 0),
        (STDIO, "def f(:\n", "syntax_error", 0),
        (CALL, "def top(xs):\n    return max(xs)", "ok", 2),
        (CALL, "class Solution:\n    def top(self, xs):\n        return max(xs)", "ok", 2),  # LeetCode style
        (CALL, "def top(xs):\n    return xs[0]", "wrong_answer", 1),
        (ASSERTS, "def sq(x):\n    return x * x", "ok", 2),
        (ASSERTS, "def sq(x):\n    return 4", "wrong_answer", 1),
    ],
)
def test_formats_give_structured_results(box, tests, program, status, passed):
    result = evaluate(box, tests, program)
    assert (result.status, result.tests_passed, result.tests_total) == (status, passed, 2)
    assert result.passed == (passed == 2) and result.isolation == box.isolation
    assert reward_of(result, "fraction") == passed / 2
    assert reward_of(result, "all_or_nothing") == float(passed == 2)


@pytest.mark.parametrize(
    "early_exit",
    ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)"],
)
def test_early_exit_never_fakes_a_pass(box, early_exit):
    # every assert would fail, but the program leaves before they run, with exit status 0
    program = "def sq(x):\n    return -1\n" + early_exit
    assert evaluate(box, ASSERTS, program).tests_passed == 0
    assert evaluate(box, CALL, "def top(xs):\n    " + early_exit.replace("\n", "\n    ")).tests_passed == 0


def test_infinite_loop_and_ignored_signals_time_out(box):
    program = "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
    program += "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n"
    started = time.monotonic()
    result = evaluate(box, STDIO, program)
    assert result.status == "timeout" and result.tests_passed == 0
    assert time.monotonic() - started < 15  # the parent's deadline held (generous: this is not a benchmark)


def test_catastrophic_regex_in_c_is_killed(box):
    assert evaluate(box, STDIO, "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')").status == "timeout"


def test_memory_hog_is_contained(box):
    assert evaluate(box, STDIO, "x = bytearray(8 * 1024**3)\nprint(3)").status == "memory"


def test_fork_flood_is_contained_and_leaves_no_processes(box):
    flood = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert evaluate(box, STDIO, flood).status in ("timeout", "runtime_error")
    uids = range(box.config.base_uid, box.config.base_uid + box.concurrency)
    rows = subprocess.run(["ps", "-eo", "uid=,stat="], capture_output=True, text=True).stdout.splitlines()
    alive = [row for row in rows if int(row.split()[0]) in uids and not row.split()[1].startswith("Z")]
    assert not alive  # Sandbox.run returns only after the slot's processes are gone


def test_fork_flood_does_not_starve_a_neighbour(box):
    flood = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    with ThreadPoolExecutor(3) as pool:
        floods = [pool.submit(evaluate, box, STDIO, flood) for _ in range(2)]
        honest = pool.submit(evaluate, box, STDIO, "a, b = map(int, input().split())\nprint(a + b)")
        assert honest.result().status == "ok"
        assert all(f.result().status != "ok" for f in floods)


def test_output_flood_is_capped(box):
    result = evaluate(box, STDIO, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert result.status in ("runtime_error", "timeout") and result.tests_passed == 0


def test_writes_outside_the_work_dir_fail(box, tmp_path):
    target = tmp_path / "pwned"
    attack = (
        "import os\nok = 0\n"
        f"for path in ({str(target)!r}, '/usr/pwned', '/pwned', '/etc/pwned'):\n"
        "    try:\n        open(path, 'w').write('x')\n    except OSError:\n        ok += 1\n"
        "open('scratch.txt', 'w').write('allowed')\n"  # the private work dir is writable
        "print('contained' if ok == 4 else 'escaped')\n"
    )
    assert contained(box, attack) == "ok"
    assert not target.exists() and not Path("/usr/pwned").exists()


def test_network_is_unreachable(box):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        attack = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n    print('escaped')\n"
            "except OSError:\n    print('contained')\n"
        )
        assert contained(box, attack) == "ok"


def test_secrets_in_environment_and_files_are_invisible(box, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_TEST_SECRET", "hunter2")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("hunter2")
    attack = (
        "import os\nleaks = [k for k, v in os.environ.items() if 'hunter2' in v]\n"
        f"for path in ({str(secret_file)!r}, '/root/.bashrc', {str(Path.home())!r}):\n"
        "    if os.path.exists(path):\n        leaks.append(path)\n"
        "print('contained' if not leaks else leaks)\n"
    )
    assert contained(box, attack) == "ok"


def test_killing_the_parent_or_everything_is_contained(box):
    assert evaluate(box, STDIO, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)").tests_passed == 0
    assert evaluate(box, STDIO, "import os, signal\nos.kill(-1, signal.SIGKILL)").tests_passed == 0
    # the evaluator, and the test process, are still here and still work
    assert evaluate(box, STDIO, "a, b = map(int, input().split())\nprint(a + b)").status == "ok"


def test_sandbox_that_cannot_start_is_an_infra_error_not_a_fail(box, monkeypatch):
    broken = Sandbox(box.config.model_copy(update={"infra_retries": 2}))
    monkeypatch.setattr(broken, "bwrap", "/nonexistent/bwrap")  # every start fails before the harness runs
    result = evaluate(broken, STDIO, "print(3)")
    assert result.status == "infra_error" and result.attempts == 3
    assert reward_of(result, "fraction") == 0.0  # the worker flags it; see test_reward_worker_flags_infra_errors


def test_fail_closed_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailableError, match="reward.code.allow_unisolated"):
        Sandbox(CodeRewardConfig())
    unisolated = Sandbox(CodeRewardConfig(allow_unisolated=True, test_timeout_s=1.0))
    result = evaluate(unisolated, STDIO, "a, b = map(int, input().split())\nprint(a + b)")
    assert (result.status, result.isolation) == ("ok", "none")
    assert evaluate(unisolated, ASSERTS, "def sq(x):\n    return x * x").status == "ok"  # the judge, outside bwrap


def test_code_extraction_and_humaneval_programs():
    assert extract_code("Here:\n```python\nprint(1)\n```\nand\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_code("print(3)") == "print(3)"
    tests = CodeTests("assert", "[]", fn_name="add", program_prefix="def add(a, b):\n    '''Sum.'''\n")
    assert program_of(tests, "    return a + b\n") == "def add(a, b):\n    '''Sum.'''\n    return a + b\n"
    restated = "```python\ndef add(a, b):\n    return a + b\n```"
    assert program_of(tests, restated).endswith("\ndef add(a, b):\n    return a + b\n")


APPS_LAST = [("4004", "timeout")]  # an infinite loop


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("apps", [("4001", "ok"), ("4001", "wrong_answer"), ("4002", "ok"), ("4002", "wrong_answer"), *APPS_LAST]),
        ("humaneval", [("HumanEval/0", "ok"), ("HumanEval/1", "ok"), ("HumanEval/1", "runtime_error")]),
        ("mbpp", [("11", "ok"), ("12", "wrong_answer")]),
    ],
)
def test_code_eval_command_line(tmp_path, fmt, expected):
    out = tmp_path / "R.json"
    cmd = [sys.executable, "-m", "rlhf_refiner.reward.code_eval", "--problems", str(FIXTURES / f"{fmt}.jsonl")]
    cmd += ["--format", fmt, "--completions", str(FIXTURES / f"{fmt}_completions.jsonl"), "--out", str(out)]
    cmd += ["--test-timeout-s", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [(str(r["task_id"]), r["status"]) for r in report["results"]] == expected
    assert all(r["isolation"].startswith("bwrap") for r in report["results"])
    assert all({"passed", "tests_passed", "tests_total", "seconds"} <= r.keys() for r in report["results"])
    assert report["summary"]["completions"] == len(expected)
    if fmt == "apps":
        assert report["summary"]["problems_without_tests"] == 1  # problem 4003 has an empty input_output
