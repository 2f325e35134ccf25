"""Step-level figures from real training runs, side by side in one invocation on the same π0 and config:
`dynamic_overhead`, `orchestration`, `sync`, `vs_trl` and `vs_trl_dynamic` (TRL in its own process, see
benchmarks/trl_grpo.py), and in the full suite `vs_trl_async` / `vs_trl_dynamic_async` (ours with
`trainer.async_steps=1`). A round runs every arm once, one after another; the full suite takes the median of 3
rounds on the quickstart's tiny π0, and one round on SmolLM2-135M (if prepared). Each figure's text carries
both sides' stage breakdown.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runs import ROOT, load_config, mean, train, warmup


def copy_seconds(model_path: str, repeats: int = 5) -> float:
    """In-process copy of the model's parameters, tensor by tensor: the floor of any weight sync."""
    import torch
    from transformers import AutoModelForCausalLM

    sources = [p.detach().clone() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters()]
    targets = [torch.empty_like(p) for p in sources]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for target, source in zip(targets, sources):
            target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return best


def trl_samples_per_s(config_file: str, steps: int, quick: bool, overrides: tuple[str, ...]) -> dict:
    command = [sys.executable, "-m", "benchmarks.trl_grpo", "--config", config_file, "--steps", str(steps)]
    # TRL (accelerate) is one process here: a rendezvous inherited from the caller (a learner set up in the calling
    # process exports MASTER_PORT and holds that port) would send it into init_process_group on a taken port.
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"}
    done = subprocess.run(
        [*command, *(["--quick"] if quick else []), *overrides],
        cwd=ROOT,
        env={key: value for key, value in os.environ.items() if key not in launcher},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"TRL baseline failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


ARMS = {  # ours, each a training run of the same config; the async arms only in the full suite
    "static_kl": ("algo.constraint=static_kl",),
    "dynamic": ("algo.constraint=dynamic",),
    "static_kl_async": ("algo.constraint=static_kl", "trainer.async_steps=1", "buffer.max_staleness=1"),
    "dynamic_async": ("algo.constraint=dynamic", "trainer.async_steps=1", "buffer.max_staleness=1"),
}
STAGES = ["time/generate", "time/refine", "time/learner_compute", "sync/seconds"]


def one_round(config_file: str, steps: int, quick: bool, overrides: tuple[str, ...], arms: list[str]) -> dict:
    """Every arm of ours and TRL's baseline once, one after another: each arm's steady step time and stage means."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {arm: train(Path(tmp) / arm, steps, config_file, quick, *ARMS[arm], *overrides) for arm in arms}
    # The last step is no steady step: outside static_kl it runs π0's forward for the KL metric whatever
    # algo.kl_metric_every says (a run's last value), and an async run's last step makes no rollouts ahead.
    runs = {arm: rows[:-1] for arm, rows in runs.items()}
    out = {
        arm: {"step": mean(rows, "time/step"), **{key: mean(rows, key) for key in STAGES if key in rows[0]}}
        for arm, rows in runs.items()
    }
    out["sync_bytes"] = mean(runs["dynamic"], "sync/bytes")
    out["trl"] = trl_samples_per_s(config_file, steps, quick, overrides)
    return out


def spread(values: list[float]) -> str:
    """The median of the rounds' values, with their range."""
    values = sorted(values)
    if len(values) == 1:
        return f"{values[0]:.3f} (1 round)"
    return f"{statistics.median(values):.3f} (median of {len(values)} rounds, {values[0]:.3f}-{values[-1]:.3f})"


def shape_figures(
    config_file: str,
    label: str,
    steps: int,
    quick: bool,
    overrides: tuple[str, ...],
    rounds: int,
    arms: list[str],
    overhead_goal: str,
) -> list[dict]:
    from rlhf_refiner.loop import resolve_model_path

    config = load_config(config_file, quick, "trainer.output_dir=/tmp/unused", *overrides)
    samples = config.data.prompts_per_step * config.generator.group_size
    measured = [one_round(config_file, steps, quick, overrides, arms) for _ in range(rounds)]
    copy_s = copy_seconds(resolve_model_path(config))
    shape = (
        f"{label}, {config_file} {' '.join(overrides)}, {samples} samples/step, {steps} steps per run (the first "
        f"{warmup(steps)} and the last dropped), {rounds} round(s) of every arm side by side"
    )

    def figure(name: str, goal: str, per_round, detail) -> dict:
        values = [per_round(m) for m in measured]
        median_round = sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]
        return {
            "name": name,
            "value": round(statistics.median(values), 3),
            "goal": goal,
            "measured": f"{spread(values)}; the median round's: {detail(measured[median_round])}; {shape}",
        }

    def sps(m: dict, arm: str) -> float:
        return samples / m[arm]["step"]

    def trl_detail(arm: str):
        return lambda m: (
            f"samples/s {sps(m, arm):.1f} (ours, {arm}) / {m['trl']['samples_per_s']:.1f} (TRL GRPOTrainer, "
            f"beta={config.algo.kl_coef}, HF generate); TRL stages/step: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in m["trl"].get("stages", {}).items())
            + f" of {m['trl']['step_seconds']:.3f}s; ours: "
            + ", ".join(f"{k} {v:.3f}s" for k, v in m[arm].items() if k != "step")
            + f" of {m[arm]['step']:.3f}s"
        )

    results = [
        figure(
            "dynamic_overhead",
            overhead_goal,
            lambda m: m["dynamic"]["step"] / m["static_kl"]["step"],
            lambda m: f"step {m['dynamic']['step']:.3f}s dynamic / {m['static_kl']['step']:.3f}s static_kl",
        ),
        figure(
            "orchestration",
            "<= 0.05",
            lambda m: (m["dynamic"]["step"] - sum(m["dynamic"].get(k, 0.0) for k in STAGES)) / m["dynamic"]["step"],
            lambda m: (
                "(step - stage compute) / step, dynamic, sync mode; stages: "
                + ", ".join(f"{k} {m['dynamic'].get(k, 0.0):.3f}s" for k in STAGES)
            ),
        ),
        figure(
            "sync",
            "report",
            lambda m: m["dynamic"]["sync/seconds"] / copy_s,
            lambda m: (
                f"weight sync {m['dynamic']['sync/seconds'] * 1e3:.1f} ms (gloo, learner -> vLLM, incl. load) / "
                f"in-process copy {copy_s * 1e3:.2f} ms of the same {m['sync_bytes'] / 2**20:.1f} MiB"
            ),
        ),
        figure("vs_trl", ">= 1.0", lambda m: sps(m, "static_kl") / m["trl"]["samples_per_s"], trl_detail("static_kl")),
        figure(
            "vs_trl_dynamic", ">= 0.9", lambda m: sps(m, "dynamic") / m["trl"]["samples_per_s"], trl_detail("dynamic")
        ),
    ]
    for arm, name, goal in (
        ("static_kl_async", "vs_trl_async", ">= 1.0"),
        ("dynamic_async", "vs_trl_dynamic_async", ">= 0.9"),
    ):
        if arm in arms:
            results.append(figure(name, goal, lambda m, a=arm: sps(m, a) / m["trl"]["samples_per_s"], trl_detail(arm)))
    return results


def figures(quick: bool) -> list[dict]:
    sync_arms = ["static_kl", "dynamic"]
    arms = sync_arms if quick else list(ARMS)
    results = shape_figures(
        "configs/quickstart.yaml",
        "tiny π0 (embedded)",
        4 if quick else 12,
        quick,
        # the KL metric at the library's cadence, as at scale: the quickstart logs it every step for its console
        # line, which makes `dynamic` pay a π0 forward for a metric on every step
        ("algo.kl_metric_every=10",),
        1 if quick else 3,
        arms,
        "<= 1.10",
    )
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    if not quick and smollm2.exists():  # ~7 min a round on 2 cores (2026-12-04): one round, the synchronous arms
        label = "SmolLM2-135M-Instruct"
        results += shape_figures("configs/smollm2.yaml", label, 6, quick, (), 1, sync_arms, "<= 1.30")
    return results
