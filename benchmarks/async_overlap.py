"""Figure `async_overlap`: quickstart step time with `trainer.async_steps=1` / max(rollout-side time, learner-side
time = learn + weight sync) of the same steps, next to the synchronous run's step time / the sum (`sync_step`).
Both runs go side by side in one invocation, on the same π0 and config. Part of `python -m benchmarks` (full
suite). Goal for `async_overlap`: <= 1.10 (the overlap hides the shorter side almost entirely).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks.runs import mean, train


def figures(quick: bool) -> list[dict]:
    steps = 6 if quick else 20
    config = "configs/quickstart.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        sync_rows = train(Path(tmp) / "sync", steps, config, quick)
        async_rows = train(
            Path(tmp) / "async",
            steps,
            config,
            quick,
            "trainer.async_steps=1",
            "buffer.max_staleness=1",
            "algo.tis_cap=2.0",
        )
    # as in benchmarks/steps.py: a run's last step is no steady one (the async run's makes no rollouts ahead)
    sync_rows, async_rows = sync_rows[:-1], async_rows[:-1]
    sync_step = mean(sync_rows, "time/step")
    sync_parts = sum(mean(sync_rows, k) for k in ("time/rollout_phase", "time/learn", "time/sync"))
    async_step = mean(async_rows, "time/step")
    # learner side = learning + the weight sync (which waits for both sides)
    async_bound = statistics.fmean(max(r["time/rollout_phase"], r["time/learn"] + r["time/sync"]) for r in async_rows)
    shape = f"quickstart config, {steps} steps each (first 2 and the last dropped), same π0"
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
    return results
