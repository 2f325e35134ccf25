"""Held-out evaluation (`trainer.eval_every`): the generator's current weights answer the held-out prompts with
`eval.*` sampling (greedy by default), the reward stage scores them, and the loop logs `eval/*`.

The same scorers as training, so `eval/reward` is the reward RL optimises (flaw and all) and `eval/accuracy`
the task's own score where the reward gives one (exact match, unit tests); never refined, never trained on.
`scripts/evaluate.py` runs the same prompts and scorers on a saved model without Ray (`summarize` is shared).
This module owns these remote calls.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from rlhf_refiner.config import Config, SamplingConfig
from rlhf_refiner.records import Prompt, Reward, Rollout, shard_slice
from rlhf_refiner.remote import flat, gather_stage, wait
from rlhf_refiner.reward import merge

if TYPE_CHECKING:
    from rlhf_refiner.placement import Actors


def due(step: int, config: Config) -> bool:
    """Whether held-out evaluation runs after `step` (0: before training, on π0's weights)."""
    every = config.trainer.eval_every
    return bool(every) and (step % every == 0 or step == config.trainer.steps)


def sampling(config: Config) -> SamplingConfig:
    """The generator's sampling with the held-out temperature, length and seed."""
    ev, policy = config.eval, config.generator.sampling
    return policy.model_copy(
        update={
            "temperature": ev.temperature,
            "max_new_tokens": ev.max_new_tokens or policy.max_new_tokens,
            "seed": ev.seed,
        }
    )


def summarize(rollouts: list[Rollout], rewards: list[Reward]) -> dict[str, float]:
    """`eval/*` of scored held-out responses: reward, accuracy (where the reward gives one), the reward's parts
    (`eval/task/degenerate_rate`, ...), response length and truncation; infrastructure errors are only counted."""
    scored = [r for r in rewards if not r.infra_error] or rewards
    metrics = {
        "eval/reward": statistics.fmean(r.reward for r in scored),
        "eval/prompts": float(len({r.prompt.prompt_id for r in rollouts})),
        "eval/response_tokens_mean": statistics.fmean(len(r.response_token_ids) for r in rollouts),
        "eval/truncated_frac": sum(not r.finished for r in rollouts) / len(rollouts),
        "eval/infra_error_frac": sum(r.infra_error for r in rewards) / len(rewards),
    }
    accuracies = [r.accuracy for r in scored if r.accuracy is not None]
    if accuracies:
        metrics["eval/accuracy"] = statistics.fmean(accuracies)
    for key in scored[0].components:
        metrics[f"eval/{key}"] = statistics.fmean(r.components.get(key, 0.0) for r in scored)
    return metrics


def evaluate(actors: Actors, prompts: list[Prompt], step: int, config: Config) -> dict[str, Any]:
    """Generate for the held-out prompts on every generator engine (a shard each) and score them: `eval/*`."""
    started = time.perf_counter()
    deadline = config.ray.call_timeout_s
    params, n = sampling(config), config.eval.samples_per_prompt
    engines = len(actors.generators)
    shards = [(i, prompts[shard_slice(len(prompts), i, engines)]) for i in range(engines)]
    shards = [(i, shard) for i, shard in shards if shard]  # fewer held-out prompts than engines
    generated = [
        actors.generators[i].generate.options(num_returns=2).remote(shard, step, params, n, "eval-")
        for i, shard in shards
    ]
    refs = [rollouts_ref for rollouts_ref, _ in generated]
    names = [f"generator-{i}" for i, _ in shards]
    rollouts, _ = gather_stage(generated, names, "eval generate (generator-*)", "time/generate", deadline)
    reward_refs = [
        [scorer.score.remote(ref, i, len(group)) for ref in refs for i, scorer in enumerate(group)]
        for group in actors.scorer_groups()
    ]
    rewards = merge([flat(wait(group, "eval score (reward-*, reward-model-*)", deadline)) for group in reward_refs])
    return {**summarize(rollouts, rewards), "time/eval": time.perf_counter() - started}
