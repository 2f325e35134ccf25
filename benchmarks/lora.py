"""LoRA figures, side by side in one invocation on the same π0 and config (the dynamic constraint):

- `lora_sync`: a LoRA run's adapter-only sync (seconds per step, incl. the engine's load) / a full fine-tune's
  full-weight sync of the same model;
- `lora_step`, `lora_step_merged`: LoRA step time / full fine-tune step time, with the adapter synced alone into
  vLLM's LoRA support, and merged into a plain engine (`model.lora.sync`);
- `shared_engine_memory`: the peak resident memory of the run's engine actors (generator and refiner processes,
  summed, sampled every 0.1 s), one shared engine / separate engines, both LoRA;
- `shared_engine_step`: step time, shared / separate;
- `vs_trl_lora`, `vs_trl_lora_merged`: our LoRA dynamic run's samples/s (either sync) / TRL `GRPOTrainer` with
  the same peft LoRA (benchmarks/trl_grpo.py), same model and job.

On the tiny π0 (quick: a briefly trained one) and, in the full suite, SmolLM2-135M (if prepared). Every arm's
refiner decodes without speculation (the shared engine's generator engine has none), so the layouts differ only
in where π0 runs.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from benchmarks.runs import load_config, mean, train
from benchmarks.steps import trl_samples_per_s

LORA = ("model.lora.rank=16", "model.lora.alpha=32")
SHARED = ("placement.shared_engine=true",)
ARMS = {"full": (), "lora": LORA, "lora_merged": (*LORA, "model.lora.sync=merged"), "lora_shared": (*LORA, *SHARED)}
ENGINE_ACTORS = ("ray::Generator", "ray::Refiner")  # Ray's process titles of the engine actors


class PeakRSS:
    """Samples the summed resident memory of every engine actor process until stopped; `peak` is the largest sum."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s, self.peak = period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.period_s):
            total = 0
            for process in psutil.process_iter(["cmdline", "memory_info"]):
                cmdline = " ".join(process.info["cmdline"] or ())
                if process.info["memory_info"] is not None and cmdline.startswith(ENGINE_ACTORS):
                    total += process.info["memory_info"].rss
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def shape_figures(config_file: str, label: str, steps: int, quick: bool, overrides: tuple[str, ...]) -> list[dict]:
    overrides = ("refiner.speculative.method=none", "refiner.copy_verify=false", *overrides)
    config = load_config(config_file, quick, "trainer.output_dir=/tmp/unused", *overrides)
    samples = config.data.prompts_per_step * config.generator.group_size
    runs, peaks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, extra in ARMS.items():
            with PeakRSS() as rss:
                runs[arm] = train(Path(tmp) / arm, steps, config_file, quick, *extra, *overrides)[:-1]
            peaks[arm] = rss.peak
    trl = trl_samples_per_s(config_file, steps, quick, (*LORA, *overrides))
    step = {arm: mean(rows, "time/step") for arm, rows in runs.items()}
    sync = {arm: mean(rows, "sync/seconds") for arm, rows in runs.items()}
    sync_mb = {arm: mean(rows, "sync/bytes") / 2**20 for arm, rows in runs.items()}
    shape = (
        f"{label}, {config_file} {' '.join(overrides)}, LoRA {' '.join(LORA)}, {samples} samples/step, {steps} "
        "steps per run (warm-up and the last dropped), the arms one after another"
    )
    stages = ("time/generate", "time/refine", "time/learner_compute", "sync/seconds")

    def breakdown(arm: str) -> str:
        return ", ".join(f"{k} {mean(runs[arm], k):.3f}s" for k in stages if k in runs[arm][0])

    def vs_trl(arm: str) -> float:
        return samples / step[arm] / trl["samples_per_s"]

    trl_stages = ", ".join(f"{k} {v:.3f}s" for k, v in trl.get("stages", {}).items())
    return [
        {
            "name": "lora_sync",
            "value": round(sync["lora"] / sync["full"], 4),
            "goal": "<= 0.05",
            "measured": f"adapter sync {sync['lora'] * 1e3:.1f} ms ({sync_mb['lora']:.2f} MiB) / full-weight sync "
            f"{sync['full'] * 1e3:.1f} ms ({sync_mb['full']:.1f} MiB), gloo, incl. the engine's load; {shape}",
        },
        *(
            {
                "name": name,
                "value": round(step[arm] / step["full"], 3),
                "goal": "<= 0.8 on SmolLM2",
                "measured": f"step {step[arm]:.3f}s LoRA, {how} ({breakdown(arm)}) / {step['full']:.3f}s full "
                f"fine-tune ({breakdown('full')}); {shape}",
            }
            for name, arm, how in (
                ("lora_step", "lora", "adapter synced alone"),
                ("lora_step_merged", "lora_merged", "merged sync"),
            )
        ),
        {
            "name": "shared_engine_memory",
            "value": round(peaks["lora_shared"] / peaks["lora"], 3),
            "goal": "<= 0.6",
            "measured": f"peak RSS of the engine actors {peaks['lora_shared'] / 2**30:.2f} GiB (one shared engine) / "
            f"{peaks['lora'] / 2**30:.2f} GiB (generator + refiner engines); {shape}",
        },
        {
            "name": "shared_engine_step",
            "value": round(step["lora_shared"] / step["lora"], 3),
            "goal": "<= 1.05",
            "measured": f"step {step['lora_shared']:.3f}s shared ({breakdown('lora_shared')}) / {step['lora']:.3f}s "
            f"separate ({breakdown('lora')}); {shape}",
        },
        *(
            {
                "name": name,
                "value": round(vs_trl(arm), 3),
                "goal": ">= 1.5",
                "measured": f"samples/s {samples / step[arm]:.2f} (ours, LoRA, {how}, dynamic, separate engines) / "
                f"{trl['samples_per_s']:.2f} (TRL GRPOTrainer with the same peft LoRA, beta={config.algo.kl_coef}); "
                f"TRL stages/step: {trl_stages} of {trl['step_seconds']:.3f}s; {shape}",
            }
            for name, arm, how in (
                ("vs_trl_lora", "lora", "adapter sync"),
                ("vs_trl_lora_merged", "lora_merged", "merged sync"),
            )
        ),
    ]


def figures(quick: bool) -> list[dict]:
    # the KL metric at the library's cadence, as at scale (the quickstart logs it every step for its console line)
    results = shape_figures("configs/quickstart.yaml", "tiny π0 (embedded)", 4 if quick else 10, quick,
                            ("algo.kl_metric_every=10",))  # fmt: skip
    smollm2 = Path("~/.cache/rlhf_refiner/smollm2-135m-instruct").expanduser()
    if not quick and smollm2.exists():
        results += shape_figures("configs/smollm2.yaml", "SmolLM2-135M-Instruct", 5, quick, ())
    return results
