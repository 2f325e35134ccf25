"""The baseline of `vs_trl`: TRL's `GRPOTrainer` on the same job as one of our configs, in its own process.

Same model, prompts (rendered with the same chat template), reward (`rules.arithmetic`), group size, prompts per
step, response length, sampling, learning rate, clip ε and KL β (`algo.kl_coef`, so beta > 0). HF `generate`, no
vLLM: TRL's vLLM colocate mode fails on CPU at its first weight sync ("'Parameter' object has no attribute
'weight_loader'"), so this is TRL's working CPU configuration. Gradient checkpointing is off, as in our learner.

    python -m benchmarks.trl_grpo --config configs/quickstart.yaml --steps 6 [overrides...]

Prints one JSON object: samples/s over the steps after the warm-up, and the mean step time.
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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

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

    class StepClock(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

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
            bf16=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=config.trainer.seed,
        )
        clock = StepClock()
        started = time.perf_counter()
        trainer = GRPOTrainer(
            model=model_path,
            reward_funcs=[reward],
            args=grpo,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    ends = [started, *clock.ends]
    steady = [b - a for a, b in zip(ends, ends[1:])][warmup(args.steps) :]
    step = sum(steady) / len(steady)
    print(json.dumps({"samples_per_s": samples / step, "step_seconds": step, "samples_per_step": samples}))


if __name__ == "__main__":
    main()
