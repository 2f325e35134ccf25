"""Benchmark `sandbox`: code-eval samples/s under bubblewrap / the same harness run as a plain subprocess
(rlimits only, no namespaces), on the same problems and completions, measured side by side in one run.

Part of `python -m benchmarks`. Goal: >= 0.5.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.runs import ROOT
from rlhf_refiner.config import CodeRewardConfig
from rlhf_refiner.data import code_tests_of
from rlhf_refiner.reward.code_eval import evaluate
from rlhf_refiner.reward.sandbox import Sandbox

FIXTURES = ROOT / "tests" / "fixtures"


def workload(repeats: int) -> list[tuple]:
    """(tests, completion) pairs: the fixture problems' right and wrong completions in all three formats."""
    items = []
    for fmt in ("apps", "humaneval", "mbpp"):
        problems = {}
        for line in (FIXTURES / f"{fmt}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if fmt != "apps" or row["input_output"]:
                problems[str(row["problem_id" if fmt == "apps" else "task_id"])] = code_tests_of(fmt, row)
        for line in (FIXTURES / f"{fmt}_completions.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "while True" not in row["completion"]:  # the timeout case measures the deadline, not the sandbox
                items.append((problems[str(row["task_id"])], row["completion"]))
    return items * repeats


def throughput(sandbox: Sandbox, items: list[tuple], concurrency: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda item: evaluate(sandbox, *item), items))
    assert not any(r.status == "infra_error" for r in results)
    return len(items) / (time.perf_counter() - started)


def figures(quick: bool) -> list[dict]:
    concurrency = 2
    items = workload(2 if quick else 8)
    config = CodeRewardConfig(max_concurrency=concurrency, test_timeout_s=4.0)
    sandboxed = Sandbox(config)
    plain = Sandbox(config.model_copy(update={"allow_unisolated": True}))
    plain.isolation = "none"  # the same harness as a plain subprocess: the baseline
    throughput(sandboxed, items[:4], concurrency)  # warm the page cache for both
    rounds = [(throughput(sandboxed, items, concurrency), throughput(plain, items, concurrency)) for _ in range(2)]
    boxed = sum(r[0] for r in rounds) / len(rounds)
    unboxed = sum(r[1] for r in rounds) / len(rounds)
    result = {
        "name": "sandbox",
        "value": round(boxed / unboxed, 3),
        "goal": ">= 0.5",
        "measured": f"samples/s {boxed:.1f} ({sandboxed.isolation}) vs {unboxed:.1f} (plain subprocess), "
        f"{len(items)} completions of the fixture problems, concurrency {concurrency}, 2 alternating rounds",
    }
    return [result]
