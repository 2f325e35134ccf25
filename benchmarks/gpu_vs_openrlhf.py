"""GPU benchmark: our `static_kl` and `dynamic` runs vs OpenRLHF's GRPO (`openrlhf.cli.train_ppo_ray`,
`--advantage_estimator group_norm --use_kl_loss`) on the same job: configs/bench/gpu_0.5b.yaml (Qwen2.5-0.5B,
natural-language addition, same prompts, group size, batch, lengths, learning rate, KL β, same GPUs).

    pip install openrlhf  # on the GPU machine, next to this project's `gpu` extra
    python -m benchmarks.gpu_vs_openrlhf --gpus 3 [--steps 4 12]

Throughput by differencing: each system runs twice, for `--steps` S1 and S2 steps, and samples/s =
(S2 - S1) x samples per step / (T2 - T1), which cancels start-up (engine loads, compilation) without parsing
either system's logs. tokens/s/GPU = samples/s x mean (prompt + response) tokens of our run / GPUs. Prints JSON
lines (`vs_openrlhf`, `vs_openrlhf_dynamic`) and appends them to benchmarks/RESULTS.md with the GPU's name.
Not run yet: no GPU has been lent to this project (docs/cluster.md, "GPU status").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import RESULTS, machine_info, record
from benchmarks.runs import ROOT, load_config

REWARD_FUNC = '''
import re

def reward_func(queries, prompts, labels):
    """The arithmetic task's natural-style score (rlhf_refiner.task.score_final_answer): 1 if the last number
    of the response is the answer."""
    import torch
    from rlhf_refiner.task import score_final_answer

    rewards = [score_final_answer(q[len(p):], a).reward for q, p, a in zip(queries, prompts, labels)]
    return {"rewards": torch.tensor(rewards), "scores": torch.tensor(rewards), "extra_logs": {}}
'''


def prompts_file(config, path: Path, steps: int) -> None:
    """The same prompts our PromptSource serves, as OpenRLHF input rows (chat-templated by OpenRLHF)."""
    from transformers import AutoTokenizer

    from rlhf_refiner.data import PromptSource

    source = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(config.model.path))
    rows = [{"prompt": p.query, "label": p.answer} for _ in range(steps) for p in source.next_batch(0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, timeout=6 * 3600)
    return time.perf_counter() - started


def ours(config_file: str, steps: int, out: Path, constraint: str) -> list[str]:
    return [sys.executable, "scripts/train.py", "--config", config_file, f"trainer.output_dir={out}",
            f"trainer.steps={steps}", f"algo.constraint={constraint}", "trainer.overwrite=true"]  # fmt: skip


def openrlhf(config, steps: int, data: Path, reward: Path, out: Path, gpus: int) -> list[str]:
    samples = config.data.prompts_per_step * config.generator.group_size
    return [
        sys.executable, "-m", "openrlhf.cli.train_ppo_ray",
        "--pretrain", config.model.path, "--prompt_data", str(data), "--input_key", "prompt", "--label_key", "label",
        "--apply_chat_template", "--remote_rm_url", str(reward),
        "--actor_num_nodes", "1", "--actor_num_gpus_per_node", "1",
        "--ref_num_nodes", "1", "--ref_num_gpus_per_node", "1",
        "--vllm_num_engines", str(max(1, gpus - 2)), "--vllm_tensor_parallel_size", "1",
        "--vllm_gpu_memory_utilization", str(config.generator.engine.gpu_memory_utilization),
        "--advantage_estimator", "group_norm", "--use_kl_loss", "--kl_estimator", config.algo.kl_estimator,
        "--init_kl_coef", str(config.algo.kl_coef), "--n_samples_per_prompt", str(config.generator.group_size),
        "--rollout_batch_size", str(config.data.prompts_per_step), "--train_batch_size", str(samples),
        "--micro_train_batch_size", str(config.learner.micro_batch_size),
        "--micro_rollout_batch_size", str(config.learner.micro_batch_size),
        "--max_epochs", "1", "--num_episodes", "1", "--max_samples", str(steps * config.data.prompts_per_step),
        "--prompt_max_len", "512", "--generate_max_len", str(config.generator.sampling.max_new_tokens),
        "--temperature", str(config.generator.sampling.temperature), "--actor_learning_rate", str(config.learner.lr),
        "--zero_stage", "2", "--bf16", "--gradient_checkpointing", "--vllm_sync_backend", "nccl",
        "--save_path", str(out), "--save_steps", "-1",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench/gpu_0.5b.yaml")
    parser.add_argument(
        "--gpus", type=int, default=3, help="GPUs each system may use (ours: learner, generator, refiner)"
    )
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 12))
    args = parser.parse_args()
    import torch

    config = load_config(args.config, False)
    samples = config.data.prompts_per_step * config.generator.group_size
    short, long = args.steps
    card = torch.cuda.get_device_name(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "reward_func.py").write_text(REWARD_FUNC)
        prompts_file(config, tmp / "prompts.jsonl", long)
        for name in ("static_kl", "dynamic"):
            t = [timed(ours(args.config, s, tmp / f"ours-{name}-{s}", name)) for s in (short, long)]
            results[name] = (long - short) * samples / (t[1] - t[0])
        rows = [json.loads(line) for line in (tmp / f"ours-dynamic-{long}" / "metrics.jsonl").read_text().splitlines()]
        tokens = sum(r["learner/tokens_per_s"] * r["time/learner_compute"] for r in rows) / len(rows) / samples
        t = [timed(openrlhf(config, s, tmp / "prompts.jsonl", tmp / "reward_func.py", tmp / f"orlhf-{s}", args.gpus))
             for s in (short, long)]  # fmt: skip
        results["openrlhf"] = (long - short) * samples / (t[1] - t[0])
    per_gpu = {name: value * tokens / args.gpus for name, value in results.items()}
    shape = (f"{config.model.path}, {args.config}, {samples} samples/step, steps {short} vs {long} differenced, "
             f"{args.gpus}x {card}; tokens/s/GPU: ours {per_gpu['static_kl']:.0f} static_kl, "
             f"{per_gpu['dynamic']:.0f} dynamic, OpenRLHF {per_gpu['openrlhf']:.0f}")  # fmt: skip
    figures = [
        {"name": "vs_openrlhf", "value": round(results["static_kl"] / results["openrlhf"], 3), "goal": ">= 1.0",
         "measured": shape},
        {"name": "vs_openrlhf_dynamic", "value": round(results["dynamic"] / results["openrlhf"], 3), "goal": ">= 0.8",
         "measured": shape},
    ]  # fmt: skip
    for figure in figures:
        print(json.dumps(figure))
    record(figures, f"{card}; {machine_info()}", quick=False, path=RESULTS)


if __name__ == "__main__":
    main()
