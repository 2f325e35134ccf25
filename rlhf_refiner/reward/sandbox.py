"""Sandbox: runs hostile candidate code against its tests in a fresh bubblewrap sandbox per candidate.

Isolation, outermost first: the parent owns a wall-clock deadline and kills the sandbox's whole process group;
bubblewrap gives new user/PID/network/mount/IPC/UTS namespaces (the judge, harness.py, is their pid 1), a read-only
/usr, a private size-capped tmpfs as the only writable place, a cleared environment, --die-with-parent and a new
session; each candidate process runs under the judge's seccomp filter; rlimits (address
space, CPU, processes, file size, open files, no core) apply to every process inside; each concurrent slot runs
as its own unprivileged uid, so RLIMIT_NPROC caps one candidate's fork flood without starving its neighbours.
Verdicts come only from harness.py's result fd, and are decided where the candidate cannot reach them (harness.py).
A sandbox that fails to start, or whose candidate was starved of CPU, is an infrastructure error: it is retried a
bounded number of times and never scored as a wrong answer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_refiner.config import CodeRewardConfig
from rlhf_refiner.reward.harness import starved

HARNESS = Path(__file__).with_name("harness.py")
STATUSES = ("ok", "wrong_answer", "runtime_error", "timeout", "memory", "syntax_error", "infra_error")
SANDBOX_DIR = "/sandbox"  # inside: the harness (read-only) and, under work/, the private tmpfs


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing or cannot create namespaces, and `reward.code.allow_unisolated` is false."""


@dataclass(frozen=True)
class Execution:
    """Sandbox -> code_eval: per-test statuses of one candidate program, in test order."""

    statuses: tuple[str, ...]  # one per expected test; tests never reported count as failed
    seconds: float
    isolation: str  # "bwrap" | "bwrap-shared-uid" | "none"
    attempts: int  # sandbox starts used (>1 after infrastructure retries)
    detail: str = ""  # why tests are missing, or the infrastructure error
    stderr: str = field(default="", repr=False)

    @property
    def infra_error(self) -> bool:
        """A test unscored for an infrastructure reason: the candidate is rerun, or, out of retries, has no verdict."""
        return "infra_error" in self.statuses


def bwrap_works(bwrap: str | None) -> bool:
    """Whether bubblewrap exists and can create the namespaces we use (containers may forbid user namespaces)."""
    if bwrap is None:
        return False
    probe = [bwrap, "--unshare-all", "--ro-bind", "/", "/", "/usr/bin/true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Sandbox:
    def __init__(self, config: CodeRewardConfig, concurrency: int | None = None) -> None:
        """`concurrency`: sandboxes running at once (slots), when `config.max_concurrency` leaves it open; the caller
        knows the CPUs it was given (a reward worker: `reward.num_cpus`)."""
        self.config = config
        self.bwrap = shutil.which("bwrap")
        if bwrap_works(self.bwrap):
            self.isolation = "bwrap" if os.geteuid() == 0 else "bwrap-shared-uid"
        elif config.allow_unisolated:
            self.isolation = "none"
        else:
            raise SandboxUnavailableError(
                "bubblewrap (`bwrap`) is not installed or cannot create user namespaces, so candidate code cannot "
                "be isolated; install the Debian package `bubblewrap`, or set reward.code.allow_unisolated=true "
                "to run it with rlimits only"
            )
        self.python = config.python
        if not os.access(self.python, os.X_OK):
            raise FileNotFoundError(f"reward.code.python '{self.python}' is not an executable interpreter")
        self.concurrency = config.max_concurrency or concurrency or max(1, len(os.sched_getaffinity(0)))
        self.slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.concurrency):
            self.slots.put(slot)

    def _command(self, workdir: str) -> list[str]:
        harness = [self.python, "-I", "-S", "-B"] if self.isolation == "none" else [self.python, "-I", "-B"]
        if self.isolation == "none":
            return [*harness, str(HARNESS), "{fd}"]
        cmd = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--as-pid-1"]
        cmd += ["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", workdir]
        cmd += ["--ro-bind", "/usr", "/usr"]
        for link in ("bin", "sbin", "lib", "lib64", "lib32"):  # merged-/usr systems: these are symlinks
            target = Path("/") / link
            if target.is_symlink():
                cmd += ["--symlink", os.readlink(target), f"/{link}"]
            elif target.is_dir():
                cmd += ["--ro-bind", str(target), f"/{link}"]
        python_root = Path(os.path.realpath(self.python)).parents[1]
        if not str(python_root).startswith("/usr"):  # an interpreter outside /usr (e.g. a venv's base) is bound
            cmd += ["--ro-bind", str(python_root), str(python_root)]
        # read-only /proc (no /proc/self/autogroup to lower its own priority through) and /dev (no unsized tmpfs to
        # fill: /dev/shm is there; the device nodes still work)
        cmd += ["--proc", "/proc", "--remount-ro", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
        cmd += ["--dir", SANDBOX_DIR]
        cmd += ["--ro-bind", str(HARNESS), f"{SANDBOX_DIR}/harness.py"]
        cmd += ["--size", str(self.config.tmpfs_mb * 2**20), "--tmpfs", workdir, "--chdir", workdir]
        cmd += ["--remount-ro", "/"]  # bwrap's own root tmpfs: nothing outside the work dir is writable
        return [*cmd, *harness, f"{SANDBOX_DIR}/harness.py", "{fd}"]

    def _limits(self, slot: int):
        cfg = self.config

        def apply() -> None:  # runs in the child between fork and exec
            mib = 2**20
            resource.setrlimit(resource.RLIMIT_AS, (cfg.memory_mb * mib, cfg.memory_mb * mib))
            cpu = math.ceil(cfg.max_seconds) + 1  # the harness's own; it gives each test's candidate its limit
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            resource.setrlimit(resource.RLIMIT_FSIZE, (cfg.file_size_mb * mib, cfg.file_size_mb * mib))
            resource.setrlimit(resource.RLIMIT_NOFILE, (cfg.max_open_files, cfg.max_open_files))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if os.geteuid() == 0:  # root ignores RLIMIT_NPROC: drop to this slot's own uid first
                uid = cfg.base_uid + slot
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                resource.setrlimit(resource.RLIMIT_NPROC, (cfg.max_processes, cfg.max_processes))

        return apply

    def run(self, spec: dict[str, Any]) -> Execution:
        """Run `spec` (kind, program, tests, ...; see harness.py) in a fresh sandbox; retries infra failures."""
        slot = self.slots.get()
        try:
            started = time.monotonic()
            attempts = self.config.infra_retries + 1
            for attempt in range(1, attempts + 1):
                execution = self._run_once(spec, slot, started, attempt)
                if not execution.infra_error or attempt == attempts:
                    return execution
                time.sleep(0.05 * attempt)  # backoff: the slot's previous sandbox may still be tearing down
            raise AssertionError("unreachable: the last attempt returns")
        finally:
            self._reap(slot)
            self.slots.put(slot)

    def _reap(self, slot: int) -> None:
        """As root, kill every process of the slot's uid before the slot is reused: orphans that left the process
        group (no namespace tears them down in `none` mode), and a PID namespace still being torn down, which
        would otherwise make the slot's next sandbox fail to fork under RLIMIT_NPROC."""
        if os.geteuid() != 0:
            return
        uid = self.config.base_uid + slot

        def as_slot_uid() -> None:
            os.setgid(uid)
            os.setuid(uid)

        subprocess.run(["kill", "-9", "-1"], preexec_fn=as_slot_uid, capture_output=True, timeout=30)

    def _run_once(self, spec: dict[str, Any], slot: int, started: float, attempt: int) -> Execution:
        cfg = self.config
        tests = len(spec["tests"])

        def infra_error(reason: str, stderr: str = "") -> Execution:  # every test unscored, never failed
            elapsed = time.monotonic() - started
            return Execution(("infra_error",) * tests, elapsed, self.isolation, attempt, reason, stderr)

        with tempfile.TemporaryDirectory(prefix="rlhf-sandbox-") as host_dir:
            workdir = f"{SANDBOX_DIR}/work" if self.isolation != "none" else host_dir
            if self.isolation == "none":
                os.chmod(host_dir, 0o777)  # the slot's uid writes here
            limits = {
                "workdir": workdir,
                "test_timeout_s": cfg.test_timeout_s,
                "wall_factor": cfg.wall_factor,
                "output_limit": cfg.output_limit_bytes,
                "own_pid_namespace": self.isolation != "none",  # bubblewrap's, whose pid 1 the harness is
            }
            payload = json.dumps({**spec, **limits}).encode()
            read_fd, write_fd = os.pipe()
            command = [part.replace("{fd}", str(write_fd)) for part in self._command(workdir)]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    preexec_fn=self._limits(slot),
                    env=env,
                )
            except OSError as e:  # e.g. EAGAIN from fork: the infrastructure failed, not the candidate
                os.close(read_fd)
                os.close(write_fd)
                return infra_error(f"sandbox did not start: {e}")
            os.close(write_fd)
            per_test = cfg.test_timeout_s * cfg.wall_factor + 0.5  # the harness's own backstop, and a margin
            deadline = time.monotonic() + min(cfg.max_seconds, cfg.startup_s + tests * per_test)
            records, stderr, expired = self._collect(proc, payload, read_fd, deadline)
        statuses: list[str] = []
        ready = done = False
        crash = next((record["crash"] for record in records if "crash" in record), None)
        clocks = [0.0, 0.0, 0.0]  # the reported tests' candidate CPU, run-queue wait and wall-clock seconds
        for record in records:
            ready |= record.get("ready", False)
            done |= record.get("done", False)
            if "status" in record and record["status"] in STATUSES and len(statuses) < tests:
                statuses.append(record["status"])
                for i, key in enumerate(("cpu_seconds", "waited_seconds", "elapsed_seconds")):
                    clocks[i] += record.get(key) or 0.0
        seconds = time.monotonic() - started
        if not ready:  # the sandbox never started the harness: bwrap failed, or the slot was still busy
            return infra_error("deadline before the harness started" if expired else stderr.strip()[-300:], stderr)
        if crash is not None:  # the judge's own failure, said on the result fd: ours, not the candidate's
            return infra_error(str(crash)[-300:], stderr)
        detail = ""
        if len(statuses) < tests:
            missing = "timeout" if expired else "runtime_error"
            detail = "wall-clock deadline" if expired else ("stopped after a timeout" if done else "harness killed")
            if expired and statuses and starved(clocks[1], clocks[0], clocks[2]):  # slow because the machine was
                missing, detail = "infra_error", "wall-clock deadline, candidate starved of CPU"
            if done and statuses and statuses[-1] in ("timeout", "memory", "infra_error"):
                missing = statuses[-1]
            statuses += [missing] * (tests - len(statuses))
        return Execution(tuple(statuses), seconds, self.isolation, attempt, detail, stderr)

    def _collect(
        self, proc: subprocess.Popen, payload: bytes, read_fd: int, deadline: float
    ) -> tuple[list[dict], str, bool]:
        """Feed the spec, read result lines and (capped) stderr until the harness exits or the deadline passes,
        then kill the sandbox's process group. Returns (records, stderr, deadline expired)."""
        assert proc.stdin is not None and proc.stderr is not None
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        selector = selectors.DefaultSelector()
        selector.register(read_fd, selectors.EVENT_READ, "result")
        selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        result, stderr, open_streams, expired = b"", b"", 2, False
        cap = self.config.output_limit_bytes
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                expired = True
                break
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "result":
                    result = (result + chunk)[: 4 * cap]  # lines are tiny; a flood here is the harness's, capped
                else:
                    stderr = (stderr + chunk)[:cap]
        selector.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(read_fd)
        proc.stderr.close()
        records = []
        for line in result.decode("utf-8", "replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records, stderr.decode("utf-8", "replace"), expired
