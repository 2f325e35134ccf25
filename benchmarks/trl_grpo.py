"""The baseline of `vs_trl`: TRL's `GRPOTrainer` on the same job as one of our configs, in its own process.

Same model, prompts (rendered with the same chat template), reward (`rules.arithmetic`), group size, prompts per
step, response length, sampling, learning rate, clip ε and KL β (`algo.kl_coef`, so beta > 0). HF `generate`, no
vLLM: TRL's vLLM colocate mode fails on CPU at its first weight sync ("'Parameter' object has no attribute
'weight_loader'"), so this is TRL's working CPU configuration. Gradient checkpointing is off, as in our learner.

    python -m benchmarks.trl_grpo --config configs/quickstart.yaml --steps 6 [--bf16] [overrides...]

With `model.lora.rank` > 0 among the overrides, TRL trains the same peft LoRA adapter.

Prints one JSON object: samples/s over the steps after the warm-up, the mean step time, and where a step's time
goes (`stages`: seconds per step in generation, reward, the policy's and the reference's forwards, backward and
optimizer; what is left is TRL's own work between them: advantages, gradient clipping, logging).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from benchmarks.runs import load_config, warmup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="TRL's bf16 mixed precision (CPU autocast), not the figure")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_refiner import lora
    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.loop import resolve_model_path
    from rlhf_refiner.reward.rules import arithmetic

    config = load_config(args.config, args.quick, "trainer.output_dir=/tmp/unused", *args.overrides)
    model_path = resolve_model_path(config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    source = PromptSource(config.data, config.task, tokenizer)
    prompts = [p for _ in range(args.steps) for p in source.next_batch(0)]
    dataset = Dataset.from_list([{"prompt": tokenizer.decode(p.prompt_token_ids), "answer": p.answer} for p in prompts])

    def reward(prompts, completions, answer, **_):
        return [arithmetic(c, a, config.task, "trl")[0] for c, a in zip(completions, answer)]

    stage_seconds: list[dict[str, float]] = [{}]  # one dict per step, the current one last

    def timed(method, stage):
        """`method`, adding its seconds to the current step's `stage` (a callable of the call's args: a name)."""

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                name = stage(*args) if callable(stage) else stage
                stage_seconds[-1][name] = stage_seconds[-1].get(name, 0.0) + time.perf_counter() - started

        return wrapper

    class StepClock(TrainerCallback):
        ends: list[float] = []

        def on_train_begin(self, *_, optimizer=None, **__):
            optimizer.step = timed(optimizer.step, "optimizer")

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            stage_seconds.append({})

    samples = config.data.prompts_per_step * config.generator.group_size
    sampling = config.generator.sampling
    with tempfile.TemporaryDirectory() as out:
        grpo = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=samples,
            gradient_accumulation_steps=1,
            num_generations=config.generator.group_size,
            max_completion_length=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            beta=config.algo.kl_coef,
            epsilon=config.algo.clip_eps,
            loss_type="grpo",
            learning_rate=config.learner.lr,
            max_steps=args.steps,
            shuffle_dataset=False,
            gradient_checkpointing=False,
            use_cpu=True,
            bf16=args.bf16,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=config.trainer.seed,
        )
        clock = StepClock()
        started = time.perf_counter()
        # the same adapter as ours; TRL then takes π0 as the policy with the adapter off, as we do
        peft_config = lora.peft_config(config.model.lora) if config.model.lora.rank else None
        trainer = GRPOTrainer(
            model=model_path,
            reward_funcs=[reward],
            args=grpo,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
            peft_config=peft_config,
        )
        trainer._generate = timed(trainer._generate, "generate")  # HF generate, decoding included
        trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
        trainer._get_per_token_logps_and_entropies = timed(
            trainer._get_per_token_logps_and_entropies,
            lambda model, *_: "reference_forward" if model is trainer.ref_model else "policy_forward",
        )
        trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
        trainer.train()
    ends = [started, *clock.ends]
    steady = [b - a for a, b in zip(ends, ends[1:])][warmup(args.steps) :]
    step = sum(steady) / len(steady)
    kept = stage_seconds[warmup(args.steps) : len(steady) + warmup(args.steps)]
    stages = {name: sum(s.get(name, 0.0) for s in kept) / len(kept) for name in sorted({k for s in kept for k in s})}
    print(
        json.dumps(
            {"samples_per_s": samples / step, "step_seconds": step, "samples_per_step": samples, "stages": stages}
        )
    )


if __name__ == "__main__":
    main()
