"""Runs inside the sandbox (sandbox.py starts it): judges a candidate program against its tests, one fresh
candidate interpreter per test, and reports one JSON line per test on a dedicated result fd.

Standalone on purpose: it runs under the system interpreter as an unprivileged uid, without our package.
The rule it keeps: **the candidate's process can influence nothing but the values it returns.**
- stdio (APPS): the candidate reads the test's input and writes its stdout to an anonymous file; this process
  compares the text.
- call (APPS fn_name) and assert (MBPP asserts, HumanEval's `check`): the candidate's interpreter is a server
  (`harness.py serve`) that runs the program and then answers calls to its functions with their return values, in
  a tagged JSON form of plain data (builtin values; anything else is a wrong answer). The test's own code runs
  here, in the judge, with the candidate's functions replaced by proxies that send the arguments over and decode
  the answer into builtin values this process built: the expected values never reach the candidate, and every
  comparison is builtin equality. This process never runs candidate code.
Nothing that decides a verdict is reachable from the candidate: the result fd is closed before its exec, the test
code stays in this process's memory, this process is not dumpable (no /proc/<pid>/mem, fd or ptrace) and, as
bubblewrap's pid 1, gets none of the candidate's signals; the candidate runs under a seccomp filter (no processes,
ptrace or scheduling changes: `DENIED`); and this process's own failure is a record on the result fd, never
something the parent infers from stderr or from a missing line.
A test's time is CPU time (the candidate's, and in our own PID namespace every process it started); a wall-clock
backstop stops sleepers, and a candidate that was runnable but waited for a CPU most of that time, and still wanted
one when stopped, was starved: an infrastructure error, reported as such, not a timeout.
Usage: python3 harness.py RESULT_FD < spec.json; the candidate side: python3 harness.py serve REQUEST_FD RESPONSE_FD
"""

import ast
import builtins
import contextlib
import ctypes
import decimal
import errno
import fractions
import importlib
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

PR_SET_DUMPABLE = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MAX_DEPTH = 64  # nesting of a value that crosses between the processes
POLL_S = 0.05  # how often a waiting judge looks at the candidate's clocks
# The judge ignores every signal it can, so that a candidate's kill() cannot end it with a traceback (which would read
# as our crash, an infrastructure error); SIGKILL and SIGSTOP leave it without verdicts, which fails the candidate.
IGNORED_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD))
STARVED_SHARE = 0.5  # starved: waited for a CPU for at least this share of the time, and used less than it

# --- what a candidate's process may not do: a seccomp filter installed before its exec ---------------------------

# Denied: starting processes (threads are allowed), reading or writing other processes' memory, changing its own
# scheduling, and memory that no rlimit counts. A candidate then has no detached process to hide CPU time in (a
# child reaped behind SIGCHLD=SIG_IGN leaves no trace in any rusage), write forged output later or crowd itself out
# with, cannot ptrace another process, and cannot lower its own priority or yield its CPU in a loop (runnable and
# waiting, using none: on a loaded machine that looks starved) to look starved. clone3 answers ENOSYS, on which
# glibc falls back to clone, where the flags can be checked.
DENIED = ("fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "setpriority", "sched_setparam",
          "sched_setscheduler", "sched_setattr", "sched_setaffinity", "sched_yield",
          # memory outside RLIMIT_AS and the work dir's size: System V shared memory, anonymous files, and the
          # private mounts a nested user namespace would allow
          "shmget", "memfd_create", "unshare", "setns", "mount")  # fmt: skip
SYSCALLS = {  # audit arch, clone, clone3 and the denied calls' numbers, for the architectures the filter knows
    "x86_64": (0xC000003E, 56, 435, {"fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
               "process_vm_writev": 311, "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144,
               "sched_setattr": 314, "sched_setaffinity": 203, "sched_yield": 24, "shmget": 29, "memfd_create": 319,
               "unshare": 272, "setns": 308, "mount": 165}),
    "aarch64": (0xC00000B7, 220, 435, {"ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
                "setpriority": 140, "sched_setparam": 118, "sched_setscheduler": 119, "sched_setattr": 274,
                "sched_setaffinity": 122, "sched_yield": 124, "shmget": 194, "memfd_create": 279, "unshare": 97,
                "setns": 268, "mount": 40}),
}  # fmt: skip
CLONE_THREAD = 0x00010000
X32_BIT = 0x40000000  # x86_64's x32 syscall numbers: another way in, denied whole


def seccomp_program(machine: str) -> bytes | None:
    """The classic-BPF seccomp program for `machine` (None where we know no syscall numbers): another architecture's
    calls (i386's int 0x80), x32 calls and `DENIED` fail with EPERM, clone3 with ENOSYS; clone only with
    CLONE_THREAD (a thread); everything else is allowed."""
    if machine not in SYSCALLS:
        return None
    arch, clone, clone3, numbers = SYSCALLS[machine]
    load, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    answers = {"allow": 0x7FFF0000, "eperm": 0x00050000 | 1, "enosys": 0x00050000 | 38}  # SECCOMP_RET_*
    # (code, jump if true, jump if false, k): jumps name labels, resolved to offsets below
    code = [(load, None, None, 4), (jeq, None, "eperm", arch), (load, None, None, 0), (jset, "eperm", None, X32_BIT)]
    code += [(jeq, "clone", None, clone), (jeq, "enosys", None, clone3)]
    code += [(jeq, "eperm", None, numbers[name]) for name in DENIED if name in numbers]
    code += [(ret, None, None, answers["allow"])]
    labels = {"clone": len(code)}
    code += [(load, None, None, 16), (jset, "allow", "eperm", CLONE_THREAD)]  # clone's flags: args[0], low word
    for answer in ("allow", "eperm", "enosys"):
        labels[answer] = len(code)
        code.append((ret, None, None, answers[answer]))
    words = []
    for at, (op, true, false, k) in enumerate(code):
        jt, jf = (0 if label is None else labels[label] - at - 1 for label in (true, false))
        words.append(op.to_bytes(2, "little") + bytes([jt, jf]) + k.to_bytes(4, "little"))
    return b"".join(words)


def install_seccomp(program: bytes) -> None:
    """Install `program` on this process (a candidate's, between fork and exec): no_new_privs, then the filter."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    fprog = Program(len(program) // 8, program)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # NO_NEW_PRIVS, SET_SECCOMP
        raise OSError(ctypes.get_errno(), "seccomp filter not installed")


# --- plain data: the only form in which a value crosses between the candidate and the judge ---------------------

CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
MAX_ITEMS = 10**6  # items taken from an iterator a candidate returns; more is not a value a test compares
MAX_INT_HEX = 25_000  # hex digits of one int (100k bits): bigger ones would cost the judge's arithmetic, not theirs
VIEWS = (type({}.keys()), type({}.values()), type({}.items()), range)


def encode(value, depth=0):
    """A value as tagged JSON of plain data. A subclass of a builtin type (Counter, OrderedDict, a namedtuple, an
    int subclass) goes as its builtin base's data, read through the base type's own methods: the judge compares only
    builtins it builds itself, so no method of the candidate's ever takes part. An iterator or view (map, filter, a
    generator, dict.keys()) goes as the list it yields; Decimal and Fraction as themselves. Anything else (an
    object, a function, a class instance) is not plain data."""
    kind = type(value)
    if depth > MAX_DEPTH:
        raise ValueError("nested too deep to be plain data")
    if value is None or kind is bool:
        return value
    if isinstance(value, int):
        value = int.__int__(value)
        return value if -(2**63) <= value < 2**63 else {"int": hex(value)}  # hex: no decimal digit limit
    if isinstance(value, float):
        value = float.__float__(value)
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(memoryview(value)).hex()}
    if isinstance(value, complex):
        return {"complex": [complex.__getattribute__(value, "real"), complex.__getattribute__(value, "imag")]}
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return {base.__name__: [encode(item, depth + 1) for item in base.__iter__(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    if type(value).__module__ == "decimal" and type(value).__name__ == "Decimal":
        return {"decimal": str(value)}
    if type(value).__module__ == "fractions" and type(value).__name__ == "Fraction":
        return {"fraction": [encode(value.numerator), encode(value.denominator)]}
    if isinstance(value, VIEWS) or (hasattr(value, "__next__") and hasattr(value, "__iter__")):
        items = []
        for item in value:
            if len(items) == MAX_ITEMS:
                raise ValueError(f"an iterator of more than {MAX_ITEMS} items")
            items.append(encode(item, depth + 1))
        return {"list": items} if isinstance(value, VIEWS) else {"iter": items}
    raise TypeError(f"a {kind.__name__} is not plain data")


def decode(node, depth=0):
    """The builtin value of a tagged JSON node; ValueError/TypeError for anything that is not plain data."""
    kind = type(node)
    if node is None or kind in (bool, int, float, str):
        return node
    if depth > MAX_DEPTH or kind is not dict or len(node) != 1:
        raise ValueError("not plain data")
    ((tag, body),) = node.items()
    if tag in CONTAINERS and type(body) is list:
        return CONTAINERS[tag](decode(item, depth + 1) for item in body)
    if tag == "dict" and type(body) is list and all(type(pair) is list and len(pair) == 2 for pair in body):
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    if tag == "int" and type(body) is str and len(body) <= MAX_INT_HEX:
        return int(body, 16)
    if tag == "iter" and type(body) is list:
        return iter([decode(item, depth + 1) for item in body])
    if tag == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    if tag == "decimal" and type(body) is str and len(body) < 10_000:
        return decimal.Decimal(body)
    if tag == "fraction" and type(body) is list and len(body) == 2:
        return fractions.Fraction(decode(body[0], depth + 1), decode(body[1], depth + 1))
    raise ValueError("not plain data")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def message(payload: dict) -> bytes:
    """One message a line (JSON escapes newlines), UTF-8 rather than \\u escapes: 1-4 bytes a character, not 6-12."""
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")


# --- the candidate's side: run the program, then answer calls with values ---------------------------------------


def serve(request_fd: int, response_fd: int) -> None:
    """The candidate's interpreter: the program runs here (and the test's setup after it, as it would in one file),
    then each request {call, args, kwargs} is answered {value, args} (args: the list, dict and set arguments the
    call changed in place, by position: part of the answer), {raised: exception name} or {invalid: why}. Nothing
    here is trusted."""
    for fd in (request_fd, response_fd):
        os.set_inheritable(fd, False)  # not into processes the candidate starts
    requests = os.fdopen(request_fd, "rb")
    hello = json.loads(requests.readline())
    namespace = {"__name__": "__candidate__"}  # a `__main__` block (reading input, running unittest) stays out
    with open(hello["program"]) as f:
        exec(compile(f.read(), "candidate.py", "exec"), namespace)
    if hello["setup"]:
        exec(compile(hello["setup"], "setup.py", "exec"), namespace)
    write_all(response_fd, message({"ready": True}))
    for line in requests:
        request = json.loads(line)
        try:
            args = [decode(a) for a in request["args"]]
            before = request["args"]  # as sent: an argument whose encoding differs afterwards was changed in place
            kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
            solution = namespace.get("Solution") if hello["solution_class"] else None  # APPS' LeetCode style
            name = request["call"]
            fn = (
                getattr(solution(), name) if isinstance(solution, type) and hasattr(solution, name) else namespace[name]
            )
            value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - the candidate's exception is its answer, reported by name
            reply = {"raised": type(e).__name__}
        else:
            try:
                after = [encode(a) if isinstance(a, (list, dict, set)) else None for a in args]
                changed = {i: a for i, (a, b) in enumerate(zip(after, before)) if a is not None and a != b}
                reply = {"value": encode(value), "args": changed}
            except BaseException as e:  # noqa: BLE001 - not plain data, or the candidate's own code raised in it
                reply = {"invalid": f"{type(e).__name__}"}
        write_all(response_fd, message(reply))


# --- the judge's side ---------------------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds of a process (all its threads) and of the children it has reaped; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold anything
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLOCK_TICKS  # utime, stime, cutime, cstime


def run_queue_wait(pid: int) -> float | None:
    """Seconds the process's main thread spent runnable but waiting for a CPU (schedstat); None where the kernel
    keeps no scheduler statistics. The main thread's alone: threads a candidate spins up to crowd it out use CPU."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def runnable(pid: int) -> bool:
    """Whether the process's main thread is running or waiting for a CPU now, not asleep, blocked or stopped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"R"
    except (OSError, IndexError):
        return False


def starved(waited: float | None, cpu: float, elapsed: float, running: bool = True) -> bool:
    """Whether a candidate that ran `elapsed` wall-clock seconds was starved: its main thread waited for a CPU most
    of that time while everything it ran used little CPU, and (`running`) still wanted one at the end. A candidate
    that crowds itself out with its own threads or processes uses the CPU it waits for; one that sleeps does not
    wait, and one asleep at the deadline slept through it, however long a loaded machine kept it from starting;
    with no statistics, it was not."""
    return running and waited is not None and waited >= STARVED_SHARE * elapsed and cpu < STARVED_SHARE * elapsed


def others_cpu(child: int) -> float:
    """CPU seconds of the sandbox's processes other than this one and `child` (a process the candidate detached is
    reparented to us, pid 1, and stays listed until `kill_strays` reaps it). Only meaningful in our own PID
    namespace; where the seccomp filter applies, the candidate cannot start one."""
    return sum(
        process_cpu(int(entry))
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) not in (os.getpid(), child)
    )


def kill_strays() -> None:
    """Before a test, in our own PID namespace, whose pid 1 we are: kill every other process, so that nothing a
    previous candidate detached runs on into the next test, and reap them (the namespace's init reaps orphans)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry), signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:  # the dead ones; one still dying is reaped before the next test
            pass


def clear_workdir() -> None:
    """Before a test: everything the previous candidate wrote goes (a full tmpfs must not fail the next test). Best
    effort, and first made ours again: the candidate, of our uid, may have taken the permissions away."""

    def unlock(function, path, _) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path) or ".", 0o700)
            function(path)

    with contextlib.suppress(OSError):
        os.chmod(".", 0o700)
        for entry in os.listdir("."):
            if entry == "candidate.py":
                continue
            if os.path.isdir(entry) and not os.path.islink(entry):
                with contextlib.suppress(OSError):
                    os.chmod(entry, 0o700)
                shutil.rmtree(entry, onerror=unlock)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry)


def classify(returncode: int, stderr: str) -> str:
    if returncode == -signal.SIGXCPU:
        return "timeout"
    if "MemoryError" in stderr or returncode == -signal.SIGKILL:  # SIGKILL here: only the kernel's OOM path
        return "memory"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last.startswith(("SyntaxError", "IndentationError", "TabError")):
        return "syntax_error"
    if last.startswith("AssertionError"):
        return "wrong_answer"
    return "runtime_error"


class CandidateFailed(BaseException):
    """The candidate's process died, ran out of time or answered with something that is not a value: the test fails
    with `status`. A BaseException, so that a test's `except Exception` cannot swallow it."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class Candidate:
    """One test's candidate process, watched: CPU seconds against the test's limit and a wall-clock backstop.
    Runs `argv` in its own session, `stdin_text` as its input and its output in anonymous files. `cpu` counts the
    candidate's CPU time and, in our own PID namespace, that of every process it detached; `waited` its main
    thread's time waiting for a CPU."""

    def __init__(self, spec: dict, argv: list[str], stdin_text: str = "", pass_fds: tuple[int, ...] = ()) -> None:
        self.cpu_limit = spec["test_timeout_s"]
        self.wall_limit = spec["test_timeout_s"] * spec["wall_factor"]
        self.output_limit = spec["output_limit"]
        self.namespaced = spec["own_pid_namespace"]
        hard = math.ceil(self.cpu_limit) + 1  # the kernel's backstop behind our own, exact CPU check

        program = spec["seccomp"]

        def limits() -> None:
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
            for number in IGNORED_SIGNALS:  # the judge ignores them; the candidate gets the usual defaults
                signal.signal(number, signal.SIG_DFL)
            if program is not None:
                install_seccomp(program)

        # stdin, stdout and stderr are anonymous files that only this process can name: a candidate cannot delete,
        # replace or lock them away (its work dir's files are its own), and the judge reads them after it exits
        self.stdout, self.stderr = os.memfd_create("stdout"), os.memfd_create("stderr")
        stdin = os.memfd_create("stdin")
        try:
            write_all(stdin, stdin_text.encode())
            os.lseek(stdin, 0, os.SEEK_SET)
            for attempt in range(5):
                try:
                    self.proc = subprocess.Popen(
                        argv,
                        stdin=stdin,
                        stdout=self.stdout,
                        stderr=self.stderr,
                        pass_fds=pass_fds,
                        start_new_session=True,
                        preexec_fn=limits,
                    )
                    break
                except BlockingIOError:  # EAGAIN: the previous candidate's killed processes are still being reaped
                    time.sleep(0.02 * (attempt + 1))
            else:
                raise CandidateFailed("runtime_error")  # only the candidate's processes fill this uid's table
        except BaseException:
            os.close(self.stdout)
            os.close(self.stderr)
            raise
        finally:
            os.close(stdin)
        self.started = time.monotonic()
        self.others_at_start = others_cpu(self.proc.pid) if self.namespaced else 0.0
        self.cpu, self.waited, self.elapsed = 0.0, None, 0.0

    def _read_clocks(self) -> None:
        """Read the clocks of the process (alive, or exited and not yet reaped)."""
        others = others_cpu(self.proc.pid) - self.others_at_start if self.namespaced else 0.0
        self.cpu = process_cpu(self.proc.pid) + others
        self.waited = run_queue_wait(self.proc.pid)
        self.elapsed = time.monotonic() - self.started

    def check(self, answered: bool = False) -> None:
        """Raise CandidateFailed once the test used its CPU seconds or ran past the wall-clock backstop. `answered`:
        the candidate has just replied, so it was working up to now, whatever its state as it waits for more."""
        self._read_clocks()
        if self.cpu >= self.cpu_limit:
            raise CandidateFailed("timeout")
        if self.elapsed >= self.wall_limit:
            if starved(self.waited, self.cpu, self.elapsed, answered or runnable(self.proc.pid)):
                raise CandidateFailed("infra_error")  # it wanted a CPU and the machine gave it none
            raise CandidateFailed("timeout")  # it slept or blocked

    def exited(self) -> bool:
        """Whether the process has exited; if so its clocks are read (before /proc forgets them) and it is reaped."""
        if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return False
        self._read_clocks()
        _, status = os.waitpid(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return True

    def wait(self) -> None:
        """Wait for the process to exit within the test's limits; raise CandidateFailed if it does not."""
        exit_fd = os.pidfd_open(self.proc.pid)  # readable once the process exits (Linux 5.3)
        try:
            while not self.exited():
                if not select.select([exit_fd], [], [], POLL_S)[0]:
                    self.check()
        finally:
            os.close(exit_fd)

    def output(self, which: str) -> str:
        """The candidate's stdout or stderr, up to the output limit."""
        fd = self.stdout if which == "stdout" else self.stderr
        return os.pread(fd, self.output_limit, 0).decode("utf-8", "replace")

    def failure(self) -> str:
        """The status of a process that exited without answering."""
        return classify(self.proc.returncode, self.output("stderr")) if self.proc.returncode else "runtime_error"

    def finish(self, status: str) -> str:
        """A test's status once it has run: a timeout if its CPU time went over the limit on the way."""
        if self.proc.returncode is None:  # a server, still waiting for calls
            self._read_clocks()
        return "timeout" if self.cpu >= self.cpu_limit else status

    def close(self) -> None:
        if self.proc.returncode is None:
            self._read_clocks()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the whole group: grandchildren too
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # and itself, should it have left its group
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc.returncode is None:
            self.proc.returncode = os.waitstatus_to_exitcode(os.waitpid(self.proc.pid, 0)[1])
        for fd in (self.stdout, self.stderr):
            os.close(fd)


class Server(Candidate):
    """The candidate as a server of its functions (`serve`): the judge calls them with data and gets data back.
    `failed` keeps the first failure, so that a test's bare `except:` that swallows it changes nothing."""

    def __init__(self, spec: dict) -> None:
        request_read, self.requests = os.pipe()
        self.responses, response_write = os.pipe()
        argv = [sys.executable, os.path.abspath(__file__), "serve", str(request_read), str(response_write)]
        try:
            super().__init__(spec, argv, pass_fds=(request_read, response_write))
        except BaseException:
            os.close(self.requests)
            os.close(self.responses)
            raise
        finally:  # the candidate's ends: only it holds them
            os.close(request_read)
            os.close(response_write)
        os.set_blocking(self.requests, False)
        self.buffer = b""
        self.failed: str | None = None

    def load(self, setup: str, solution_class: bool) -> None:
        """Have the candidate run its program (then the test's setup); returns once it is ready for calls."""
        self._send({"program": "candidate.py", "setup": setup, "solution_class": solution_class})
        if self._receive().get("ready") is not True:
            self._fail("wrong_answer")

    def _fail(self, status: str):
        self.failed = self.failed or status
        raise CandidateFailed(self.failed)

    def check(self, answered: bool = False) -> None:
        try:
            super().check(answered)
        except CandidateFailed as failed:
            self._fail(failed.status)

    def _send(self, payload: dict) -> None:
        data = memoryview(message(payload))
        while data:
            if not select.select([], [self.requests], [], POLL_S)[1]:
                self.check()
                continue
            try:
                data = data[os.write(self.requests, data) :]
            except BrokenPipeError:
                self._died()

    def _receive(self) -> dict:
        while b"\n" not in self.buffer:
            if not select.select([self.responses], [], [], POLL_S)[0]:
                self.check()
                continue
            chunk = os.read(self.responses, 1 << 16)
            if not chunk:
                self._died()
            self.buffer += chunk
            if len(self.buffer) > 4 * self.output_limit:
                self._fail("wrong_answer")  # an answer (with the arguments it changed) larger than any test's value
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            self._fail("wrong_answer")
        return reply if type(reply) is dict else {}

    def _died(self) -> None:
        """The candidate closed its side: it exited (or is exiting) without answering."""
        self.wait()
        self._fail(self.failure())

    def call(self, name: str, args: tuple, kwargs: dict):
        """`name(*args, **kwargs)` in the candidate's process, as a value built here."""
        if self.failed:
            raise CandidateFailed(self.failed)
        try:
            request = {
                "call": name,
                "args": [encode(a) for a in args],
                "kwargs": {k: encode(v) for k, v in kwargs.items()},
            }
        except (TypeError, ValueError) as e:
            raise TypeError(f"the test passes {name} an argument that is not plain data ({e})") from None
        self._send(request)
        reply = self._receive()
        if "raised" in reply:  # the candidate raised: a builtin exception is raised here too, for tests that expect it
            exception = getattr(builtins, str(reply["raised"]), None)
            # StopIteration and its async twin are control flow: map(), filter() and next(it, default) would swallow
            # one raised here, and a test of all(map(f, xs)) would pass on a candidate that only raises
            control_flow = (StopIteration, StopAsyncIteration)
            if (
                isinstance(exception, type)
                and issubclass(exception, Exception)
                and not issubclass(exception, control_flow)
            ):
                with contextlib.suppress(TypeError):  # one that needs more arguments (UnicodeError) is a failure
                    raise exception(f"raised by the candidate's {name}")
            self._fail("runtime_error")
        try:
            value = decode(reply["value"])
            changed = {int(i): decode(a) for i, a in reply["args"].items() if 0 <= int(i) < len(args)}
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError):
            self._fail("wrong_answer")
        for i, after in changed.items():  # in-place changes of the arguments, as a test in one process sees them
            arg = args[i]
            if type(arg) is list and type(after) is list:
                arg[:] = after
            elif type(arg) in (dict, set) and type(after) is type(arg):
                arg.clear()
                arg.update(after)
        if time.monotonic() - self.started >= self.wall_limit:  # decoding a costly answer is the test's time too
            self.check(answered=True)
        return value

    def proxy(self, name: str):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def finish(self, status: str) -> str:
        return self.failed or super().finish(status)

    def close(self) -> None:
        super().close()
        for fd in (self.requests, self.responses):  # one pair per test: a long test list must not run out of fds
            os.close(fd)


def free_names(source: str) -> tuple[set[str], set[str]]:
    """(names a test's code reads but never binds, the subset it calls)."""
    read, bound, called = set(), set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(node.func.id)
    free = read - bound
    return free, free & called


def test_status(test: Callable[[], bool]) -> str:
    """The status of a test the judge runs on the candidate's answers: ok when it holds; an AssertionError is a wrong
    answer and any other exception (the test's, or a builtin one the candidate raised) a runtime error. The
    candidate's own failures (CandidateFailed) are BaseExceptions and pass through."""
    try:
        return "ok" if test() else "wrong_answer"
    except AssertionError:
        return "wrong_answer"
    except Exception:  # noqa: BLE001 - raised on the candidate's answers: its failure, not ours
        return "runtime_error"


def judge_asserts(server: Server, spec: dict, code: str) -> str:
    """Run a test's assertion code here, on the candidate's answers. The trusted code (HumanEval's prompt, with its
    helper functions; MBPP's setup) runs here too; every name the test reads that none of it binds, and the entry
    point, is the candidate's: a proxy. A name the test only reads attributes of and that names a standard module
    (MBPP tests use `math` that the candidate imported) is that module, imported here."""
    namespace = {"__name__": "__judge__"}
    exec(compile(spec["prefix"], "prompt.py", "exec"), namespace)
    exec(compile(spec["setup"], "setup.py", "exec"), namespace)
    free, called = free_names(code)
    for name in sorted(free - namespace.keys() - vars(builtins).keys()):
        if name in sys.stdlib_module_names and name not in called:
            namespace[name] = importlib.import_module(name)
        else:
            namespace[name] = server.proxy(name)
    if spec["fn_name"]:
        namespace[spec["fn_name"]] = server.proxy(spec["fn_name"])
    test = compile(code, "test.py", "exec")
    return test_status(lambda: exec(test, namespace) is None)


def call_matches(got, expected) -> bool:
    try:
        got = json.loads(json.dumps(got))  # tuples -> lists and int keys -> str, as in the JSON tests; a set fails
    except (TypeError, ValueError):
        return False
    return got == expected or (isinstance(expected, list) and len(expected) == 1 and got == expected[0])


def output_matches(got: str, expected: str) -> bool:
    """APPS' stdout check: the same lines (each stripped), or the same whitespace-separated tokens, a number within
    1e-6 (absolute or relative) of the expected one counting as the same, as APPS' own checker allows."""
    if [line.strip() for line in got.strip().splitlines()] == [line.strip() for line in expected.strip().splitlines()]:
        return True
    got_tokens, expected_tokens = got.split(), expected.split()
    if len(got_tokens) != len(expected_tokens):
        return False
    for a, b in zip(got_tokens, expected_tokens):
        if a == b:
            continue
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6):
            return False
    return True


def run_test(spec: dict, index: int) -> tuple[str, Candidate | None]:
    """One test in a fresh candidate process: its status, and the candidate (its clocks), if one started."""
    case = spec["tests"][index]
    candidate = None
    try:
        if spec["own_pid_namespace"]:
            kill_strays()
        clear_workdir()
        if spec["kind"] == "stdio":
            candidate = Candidate(spec, [sys.executable, "candidate.py"], case["input"])
            candidate.wait()
            if candidate.proc.returncode != 0:
                return candidate.failure(), candidate
            same = output_matches(candidate.output("stdout"), case["output"])
            return candidate.finish("ok" if same else "wrong_answer"), candidate
        candidate = Server(spec)
        candidate.load(spec["setup"], solution_class=spec["kind"] == "call")
        if spec["kind"] == "call":
            status = test_status(
                lambda: call_matches(candidate.call(spec["fn_name"], tuple(case["input"]), {}), case["output"])
            )
        else:
            status = judge_asserts(candidate, spec, case["code"])
        return candidate.finish(status), candidate
    except CandidateFailed as failed:
        return failed.status, candidate
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM):
            raise  # ours: the parent hears of it (a crash record) and reruns the candidate
        return "runtime_error", candidate  # space the candidate used up (nothing else shares it): its failure
    finally:
        if candidate is not None:
            candidate.close()


def judge(spec: dict, result) -> None:
    """Every test of one candidate, one result line each, then `done`."""
    with open("candidate.py", "w", encoding="utf-8", errors="surrogatepass") as f:  # a lone surrogate: not UTF-8,
        f.write(spec["program"])  # so the interpreter's compile (and ours) calls it a syntax error, as it is
    try:
        compile(spec["program"], "candidate.py", "exec")
    except (SyntaxError, ValueError):
        for i in range(len(spec["tests"])):
            result.write(json.dumps({"test": i, "status": "syntax_error", "seconds": 0.0}) + "\n")
        result.write(json.dumps({"done": True}) + "\n")
        return
    except (RecursionError, MemoryError):
        pass  # too deep for this parser's stack: the candidate's own interpreter says what it is
    for i in range(len(spec["tests"])):
        started = time.monotonic()
        status, candidate = run_test(spec, i)
        record = {"test": i, "status": status, "seconds": time.monotonic() - started}
        if candidate is not None:  # the candidate's clocks, for the parent's starvation verdict at its deadline
            record.update(cpu_seconds=candidate.cpu, waited_seconds=candidate.waited, elapsed_seconds=candidate.elapsed)
        result.write(json.dumps(record) + "\n")
        if status in ("timeout", "memory", "infra_error") and spec.get("stop_on_timeout", True):
            break  # the rest would likely burn the same budget (or, starved, be rerun): the parent scores them
    result.write(json.dumps({"done": True}) + "\n")


def main() -> None:
    """The judge's own failure is reported as such, on the result fd, which no candidate can reach: the parent never
    reads a verdict, or an infrastructure error, out of stderr (a candidate can write there through bubblewrap's
    init) or out of a missing line (a candidate can kill or stop the judge: then its tests fail)."""
    for number in IGNORED_SIGNALS:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_IGN)
    result = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    spec = json.loads(sys.stdin.read())
    with contextlib.suppress(OSError, AttributeError):  # children of our uid may not read our fds via /proc
        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    spec["seccomp"] = seccomp_program(os.uname().machine)
    os.chdir(spec["workdir"])
    result.write(json.dumps({"ready": True, "seccomp": spec["seccomp"] is not None}) + "\n")
    try:
        judge(spec, result)
    except BaseException:  # noqa: BLE001 - ours: said on the result fd (the parent reruns the candidate), re-raised
        result.write(json.dumps({"crash": traceback.format_exc()[-2000:]}) + "\n")
        raise


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
