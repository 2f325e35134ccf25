"""Runs inside the sandbox (sandbox.py starts it): executes a candidate program against its tests, one fresh
child interpreter per test, and reports one JSON line per test on a dedicated result fd.

Standalone on purpose: it runs under the system interpreter as an unprivileged uid, without our package.
Invariants: the child never sees the expected outputs (comparisons happen here), a child that exits early
produces no verdict marker and fails, and the parent trusts only what arrives on the result fd.
Usage: python3 harness.py RESULT_FD < spec.json
"""

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

PR_SET_DUMPABLE = 4

# Child for call-based tests: define the candidate, call fn_name(*args), send the JSON return value on fd.
CALL_RUNNER = """
import json, os, sys
fd = int(sys.argv[2])
args = json.loads(sys.stdin.read())
os.set_inheritable(fd, False)
namespace = {"__name__": "__main__"}
source = open(sys.argv[1]).read()
exec(compile(source, "candidate.py", "exec"), namespace)
fn_name = sys.argv[3]
solution = namespace.get("Solution")
fn = getattr(solution(), fn_name) if solution is not None and hasattr(solution, fn_name) else namespace[fn_name]
result = fn(*args)
os.write(fd, json.dumps(result, default=repr).encode())
os.close(fd)
"""

# Appended to assert-style tests: reached only if every assert above passed and nothing exited early.
ASSERT_MARKER = "\nimport os as _harness_os\n_harness_os.write({fd}, b'ok')\n"


def classify(returncode: int, stderr: str, timed_out: bool) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if "MemoryError" in stderr or returncode == -signal.SIGKILL:  # SIGKILL here: only the kernel's OOM path
        return "memory"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "syntax_error"
    if last.startswith("AssertionError"):
        return "wrong_answer"
    return "runtime_error"


def run_child(argv: list[str], stdin_text: str, timeout_s: float, output_limit: int, marker: tuple | None):
    """Run one test's child; returns (status, stdout, marker bytes), status None when it exited cleanly.
    `marker` is a (read_fd, write_fd) pipe whose write end only the child holds."""
    with open("stdin.txt", "w") as f:
        f.write(stdin_text)
    with open("stdin.txt") as stdin, open("stdout.txt", "wb") as out, open("stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            argv, stdin=stdin, stdout=out, stderr=err, pass_fds=marker[1:] if marker else (), start_new_session=True
        )
        if marker:
            os.close(marker[1])
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group: grandchildren too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    received = b""
    if marker:
        os.set_blocking(marker[0], False)  # a grandchild that left the group may still hold the write end
        with contextlib.suppress(BlockingIOError):
            received = os.read(marker[0], 1 << 16)
        os.close(marker[0])
    with open("stdout.txt", "rb") as f:
        stdout = f.read(output_limit).decode("utf-8", "replace")
    with open("stderr.txt", "rb") as f:
        stderr = f.read(output_limit).decode("utf-8", "replace")
    if timed_out or proc.returncode != 0:
        return classify(proc.returncode, stderr, timed_out), stdout, received
    return None, stdout, received


def normalise(text: str) -> list[str]:
    lines = [line.strip() for line in text.strip().splitlines()]
    return lines


def call_matches(got, expected) -> bool:
    got = json.loads(json.dumps(got, default=repr))  # tuples -> lists, as in the JSON tests
    return got == expected or (isinstance(expected, list) and len(expected) == 1 and got == expected[0])


def run_test(spec: dict, index: int) -> str:
    kind, case, python = spec["kind"], spec["tests"][index], sys.executable
    timeout_s, limit = spec["test_timeout_s"], spec["output_limit"]
    if kind == "stdio":
        status, stdout, _ = run_child([python, "candidate.py"], case["input"], timeout_s, limit, None)
        if status is not None:
            return status
        return "ok" if normalise(stdout) == normalise(case["output"]) else "wrong_answer"
    marker = os.pipe()
    fd = marker[1]
    if kind == "call":
        argv = [python, "call_runner.py", "candidate.py", str(fd), spec["fn_name"]]
        status, _, marker = run_child(argv, json.dumps(case["input"]), timeout_s, limit, marker)
        if status is not None:
            return status
        if not marker:
            return "runtime_error"  # exited (cleanly) before returning a value
        try:
            got = json.loads(marker)
        except ValueError:
            return "wrong_answer"
        return "ok" if call_matches(got, case["output"]) else "wrong_answer"
    with open("test.py", "w") as f:  # assert-style: program, the test, then the marker
        f.write(spec["program"] + "\n" + spec.get("setup", "") + "\n" + case["code"] + ASSERT_MARKER.format(fd=fd))
    status, _, marker = run_child([python, "test.py"], "", timeout_s, limit, marker)
    if status is not None:
        return status
    return "ok" if marker == b"ok" else "runtime_error"  # no marker: it exited before the asserts ran


def main() -> None:
    result = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    spec = json.loads(sys.stdin.read())
    with contextlib.suppress(OSError, AttributeError):  # children of our uid may not read our fds via /proc
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    os.chdir(spec["workdir"])
    result.write(json.dumps({"ready": True}) + "\n")
    with open("candidate.py", "w") as f:
        f.write(spec["program"])
    with open("call_runner.py", "w") as f:
        f.write(CALL_RUNNER)
    try:
        compile(spec["program"], "candidate.py", "exec")
    except (SyntaxError, ValueError):
        for i in range(len(spec["tests"])):
            result.write(json.dumps({"test": i, "status": "syntax_error", "seconds": 0.0}) + "\n")
        result.write(json.dumps({"done": True}) + "\n")
        return
    for i in range(len(spec["tests"])):
        started = time.monotonic()
        status = run_test(spec, i)
        result.write(json.dumps({"test": i, "status": status, "seconds": time.monotonic() - started}) + "\n")
        if status in ("timeout", "memory") and spec.get("stop_on_timeout", True):
            break  # the rest would likely burn the same budget; the parent scores them as failed
    result.write(json.dumps({"done": True}) + "\n")


if __name__ == "__main__":
    main()
