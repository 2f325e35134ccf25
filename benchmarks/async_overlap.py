"""Benchmark `async_overlap`: quickstart step time with `trainer.async_steps=1` / max(rollout-side time,
learner-side time = learn + weight sync) of the same steps, next to the synchronous run's step time / the sum.
Both runs go side by side in one invocation, on the same π0 and config.

    python benchmarks/async_overlap.py [--quick] [--steps N]

Prints one JSON line per figure and appends dated rows with machine info to benchmarks/RESULTS.md. Goal for
`async_overlap`: <= 1.10 (the overlap hides the shorter side almost entirely).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS, machine_info, record  # noqa: E402


def run(out: Path, steps: int, *overrides: str) -> list[dict]:
    from rlhf_refiner import config as config_lib
    from rlhf_refiner import loop

    config = config_lib.load(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"trainer.output_dir={out}",
            f"trainer.steps={steps}",
            "trainer.save_final=false",
            "metrics.wandb_mode=disabled",
            "metrics.progress_bar=false",
            *overrides,
        ],
    )
    loop.run(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[2:]  # steady state: the first steps warm the engines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        sync_rows = run(Path(tmp) / "sync", steps)
        async_rows = run(
            Path(tmp) / "async", steps, "trainer.async_steps=1", "buffer.max_staleness=1", "algo.tis_cap=2.0"
        )
    mean = statistics.fmean
    sync_step = mean(r["time/step"] for r in sync_rows)
    sync_parts = mean(r["time/rollout_phase"] + r["time/learn"] + r["time/sync"] for r in sync_rows)
    async_step = mean(r["time/step"] for r in async_rows)
    # learner side = learning + the weight sync (which waits for both sides)
    async_bound = mean(max(r["time/rollout_phase"], r["time/learn"] + r["time/sync"]) for r in async_rows)
    shape = f"quickstart config, {steps} steps each (first 2 dropped), same π0"
    results = [
        {
            "name": "async_overlap",
            "value": round(async_step / async_bound, 3),
            "goal": "<= 1.10",
            "measured": f"async step {async_step:.2f}s / max(rollout, learn + sync) {async_bound:.2f}s; {shape}",
        },
        {
            "name": "sync_step",
            "value": round(sync_step / sync_parts, 3),
            "goal": "report",
            "measured": f"sync step {sync_step:.2f}s / (rollout + learn + sync) {sync_parts:.2f}s; async/sync step "
            f"{async_step / sync_step:.3f}; {shape}",
        },
    ]
    for result in results:
        print(json.dumps(result))
    record(results, machine_info(), quick=args.quick, path=args.results)


if __name__ == "__main__":
    main()
