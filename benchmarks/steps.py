"""Step-level figures from real training runs, side by side in one invocation on the same π0 and config:
`dynamic_overhead`, `orchestration`, `sync`, `vs_trl` and `vs_trl_dynamic` (TRL in its own process, see
benchmarks/trl_grpo.py). The quickstart's tiny π0 always; SmolLM2-135M too in the full suite, if prepared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runs import ROOT, load_config, mean, train


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


def shape_figures(config_file: str, label: str, steps: int, quick: bool, overrides: tuple[str, ...]) -> list[dict]:
    from rlhf_refiner.loop import resolve_model_path

    config = load_config(config_file, quick, "trainer.output_dir=/tmp/unused", *overrides)
    samples = config.data.prompts_per_step * config.generator.group_size
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            constraint: train(
                Path(tmp) / constraint, steps, config_file, quick, f"algo.constraint={constraint}", *overrides
            )
            for constraint in ("static_kl", "dynamic")
        }
    trl = trl_samples_per_s(config_file, steps, quick, overrides)
    step = {name: mean(rows, "time/step") for name, rows in runs.items()}
    ours = {name: samples / s for name, s in step.items()}
    dyn = runs["dynamic"]
    stages = ["time/generate", "time/refine", "time/learner_compute", "sync/seconds"]
    compute = sum(mean(dyn, key) for key in stages)
    sync_s, sync_mb = mean(dyn, "sync/seconds"), mean(dyn, "sync/bytes") / 2**20
    copy_s = copy_seconds(resolve_model_path(config))
    shape = (
        f"{label}, {config_file} {' '.join(overrides)}, {samples} samples/step, {steps} steps per run (warm-up dropped)"
    )
    return [
        {
            "name": "dynamic_overhead",
            "value": round(step["dynamic"] / step["static_kl"], 3),
            "goal": "<= 1.25",
            "measured": f"step {step['dynamic']:.2f}s dynamic / {step['static_kl']:.2f}s static_kl; {shape}",
        },
        {
            "name": "orchestration",
            "value": round((step["dynamic"] - compute) / step["dynamic"], 3),
            "goal": "<= 0.05",
            "measured": f"(step {step['dynamic']:.2f}s - stage compute {compute:.2f}s) / step, dynamic, sync mode; "
            "stages: " + ", ".join(f"{k} {mean(dyn, k):.3f}s" for k in stages) + f"; {shape}",
        },
        {
            "name": "sync",
            "value": round(sync_s / copy_s, 2),
            "goal": "report",
            "measured": f"weight sync {sync_s * 1e3:.1f} ms (gloo, learner -> vLLM, incl. load) / in-process copy "
            f"{copy_s * 1e3:.2f} ms of the same {sync_mb:.1f} MiB; {shape}",
        },
        {
            "name": "vs_trl",
            "value": round(ours["static_kl"] / trl["samples_per_s"], 3),
            "goal": ">= 1.0",
            "measured": f"samples/s {ours['static_kl']:.1f} (ours, static_kl) / {trl['samples_per_s']:.1f} (TRL "
            f"GRPOTrainer, beta={config.algo.kl_coef}, HF generate); {shape}",
        },
        {
            "name": "vs_trl_dynamic",
            "value": round(ours["dynamic"] / trl["samples_per_s"], 3),
            "goal": ">= 0.8",
            "measured": f"samples/s {ours['dynamic']:.1f} (ours, dynamic) / {trl['samples_per_s']:.1f} (TRL); {shape}",
        },
    ]


def figures(quick: bool) -> list[dict]:
    results = shape_figures("configs/quickstart.yaml", "tiny π0 (embedded)", 3 if quick else 12, quick, ())
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    if not quick and smollm2.exists():
        results += shape_figures("configs/smollm2.yaml", "SmolLM2-135M-Instruct", 4, quick, ())
    return results
