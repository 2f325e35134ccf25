"""One rollout round over the stage actors: generate -> (refine || score) -> DAPO refills, returned as `Collected`.

Each generator engine's rollouts ObjectRef goes straight to the scorers and refiners, which each take a shard of
it, so results come back in rollout order. With `algo.dynamic_sampling` only the groups the refill keeps are
refined and improvement-scored (each round's kept groups while the next round generates), and the refill judges
a group's signal on the advantages' own rewards: overlong-shaped, over the members without an infrastructure
error. This module owns these remote calls; `loop.run` calls `rollout_phase` as one stage.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

import ray

from rlhf_refiner.config import Config
from rlhf_refiner.records import Collected, Prompt, Refinement, Reward, Rollout, Sample, shard_slice
from rlhf_refiner.remote import flat, gather_stage, wait
from rlhf_refiner.reward import merge

# `Collected` stays importable from here on purpose: async checkpoints written before it moved to records.py
# pickled it as `rlhf_refiner.rollout.Collected` (tests/test_checkpoint.py loads such bytes).

if TYPE_CHECKING:
    import torch

    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.placement import Actors


def shaped_rewards(rollouts: list[Rollout], rewards: list[Reward], config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards the advantages see, (B,) float64: the task's plus DAPO's overlong penalty; and (B,) bool, False
    for infrastructure errors, which get no policy gradient. The refill judges signal on the same two."""
    import torch

    from rlhf_refiner import algo

    cfg = config.algo
    shaped = torch.tensor([r.reward for r in rewards], dtype=torch.float64)
    if cfg.overlong_buffer > 0:
        lengths = torch.tensor([len(r.response_token_ids) for r in rollouts])
        max_length = config.generator.sampling.max_new_tokens
        shaped = shaped + algo.overlong_penalty(lengths, max_length, cfg.overlong_buffer, cfg.overlong_penalty_factor)
    valid = torch.tensor([not r.infra_error for r in rewards], dtype=torch.bool)
    return shaped, valid


def assemble_samples(
    rollouts: list[Rollout], refinements: list[Refinement] | None, rewards: list[Reward], config: Config
) -> list[Sample]:
    """Pair each rollout with its refinement and reward, and attach its advantage (`algo.advantage`) computed on
    `shaped_rewards`; the logged `reward/*` stay the task's."""
    from rlhf_refiner import algo

    cfg, group = config.algo, config.generator.group_size
    shaped, valid = shaped_rewards(rollouts, rewards, config)
    if cfg.advantage == "grpo":
        advantages = algo.group_advantages(shaped, group, cfg.normalize_adv_std, cfg.adv_eps, valid)
    else:
        baseline = cfg.advantage == "reinforce_pp_baseline"
        advantages = algo.reinforce_pp_advantages(shaped, group, baseline, cfg.adv_eps, valid)
    return [
        Sample(
            rollout, refinements[i] if refinements else None, rewards[i], advantages[i].item(), rollout.policy_version
        )
        for i, rollout in enumerate(rollouts)
    ]


def improvement_sample(refinements: list[Refinement], fraction: float, step: int) -> tuple[list[int], int]:
    """Indices of the changed refinements among a reproducible `fraction` of the step's samples, and how many
    samples were drawn. Unchanged a' = a have reward(a') = reward(a) by definition, and a fallback's a' is a copy
    of a (π0 improved nothing), so neither costs a reward call."""
    drawn = sorted(random.Random(step).sample(range(len(refinements)), round(fraction * len(refinements))))
    return [i for i in drawn if not (refinements[i].unchanged or refinements[i].fallback)], len(drawn)


def improvement_metrics(before: list[float], after: list[float], drawn: int) -> dict[str, float]:
    """`refiner/improved_frac` (paper, Fig. 5): share of drawn rollouts with reward(a') > reward(a), and its twins."""
    if drawn == 0:
        return {}
    return {
        "refiner/improved_frac": sum(a > b for b, a in zip(before, after)) / drawn,
        "refiner/worsened_frac": sum(a < b for b, a in zip(before, after)) / drawn,
        "refiner/reward_delta": sum(a - b for b, a in zip(before, after)) / drawn,
        "refiner/improved_eval_count": drawn,
    }


def start_refine(refiners: list[Any], rollout_refs: list[Any]) -> list[list[Any]]:
    """Each refiner refines its shard of every rollouts ref; the calls, in the order `gather_refine` expects."""
    n = len(refiners)
    return [r.refine.options(num_returns=2).remote(ref, i, n) for ref in rollout_refs for i, r in enumerate(refiners)]


def start_refine_groups(refiners: list[Any], rollouts: list[Rollout], groups: list[range]) -> list[list[Any]]:
    """`start_refine` on the rollouts of `groups` (sample indices), put once for all refiners; no call for none."""
    if not (refiners and groups):
        return []
    return start_refine(refiners, [ray.put([rollouts[i] for indices in groups for i in indices])])


def gather_refine(actors: Actors, calls: list[list[Any]], deadline: float) -> tuple[list[Refinement], dict[str, float]]:
    """Wait for `start_refine` calls (any number of submissions): the refinements in call order, metrics merged.
    Timeouts name the actors that refine: `generator-*` on a shared engine."""
    role = "generator" if actors.refiners is actors.generators else "refiner"
    n = len(actors.refiners)
    names = [f"{role}-{i}" for _ in range(len(calls) // n) for i in range(n)]
    return gather_stage(calls, names, f"refine ({role}-*)", "time/refine", deadline)


def score_improvement(
    actors: Actors,
    rollouts: list[Rollout],
    refinements: list[Refinement],
    rewards: list[Reward],
    step: int,
    config: Config,
) -> dict[str, float]:
    """Score the changed a' of a reproducible sample of the refinements and compare them with their a's rewards."""
    changed, drawn = improvement_sample(refinements, config.refiner.improved_eval_fraction, step)
    changed_rollouts, changed_refinements = [rollouts[i] for i in changed], [refinements[i] for i in changed]
    refined_refs = [
        group[0].score_refined.remote(changed_rollouts, changed_refinements) for group in actors.scorer_groups()
    ]
    deadline = config.ray.call_timeout_s
    refined_rewards = merge(wait(refined_refs, "score refined (reward-0, reward-model-0)", deadline))
    pairs = [(rewards[i], r) for i, r in zip(changed, refined_rewards)]
    pairs = [(a, b) for a, b in pairs if not (a.infra_error or b.infra_error)]  # no score to compare
    return improvement_metrics([a.reward for a, _ in pairs], [b.reward for _, b in pairs], drawn)


def collect(actors: Actors, prompts: list[Prompt], step: int, config: Config, refine: bool = True) -> Collected:
    """One round: every generator engine makes G responses for its shard of the prompts; each engine's rollouts
    are scored, and with `refine` refined, as soon as they exist; then a sample of the changed a' is scored for
    `refiner/improved_frac`. Without `refine` (dynamic sampling: the refill refines what it keeps), refinements
    are None."""
    deadline = config.ray.call_timeout_s
    engines = len(actors.generators)
    generated = [
        generator.generate.options(num_returns=2).remote(prompts[shard_slice(len(prompts), i, engines)], step)
        for i, generator in enumerate(actors.generators)
    ]
    rollout_refs = [rollouts_ref for rollouts_ref, _ in generated]
    reward_refs = [
        [scorer.score.remote(ref, i, len(group)) for ref in rollout_refs for i, scorer in enumerate(group)]
        for group in actors.scorer_groups()
    ]
    refine_calls = start_refine(actors.refiners, rollout_refs) if refine else []
    names = [f"generator-{i}" for i in range(engines)]
    rollouts, metrics = gather_stage(generated, names, "generate (generator-*)", "time/generate", deadline)
    rewards = merge([flat(wait(refs, "score (reward-*, reward-model-*)", deadline)) for refs in reward_refs])
    refinements = None
    if refine_calls:
        refinements, refine_metrics = gather_refine(actors, refine_calls, deadline)
        metrics.update(refine_metrics)
        metrics.update(score_improvement(actors, rollouts, refinements, rewards, step, config))
    return Collected(rollouts, refinements, rewards, metrics)


def refill_groups(
    actors: Actors, source: PromptSource, first: Collected, step: int, version: int, config: Config
) -> Collected:
    """DAPO dynamic sampling on the first round (collected without refinement): keep the groups with signal
    (`algo.groups_with_signal` on `shaped_rewards`), over-sampling fresh prompts for at most `algo.max_sampling_rounds`
    extra rounds. A batch still short after that is filled with zero-variance groups (advantage 0: they carry only
    the constraint term), so the learner's batch size never changes. Only the chosen groups are refined: the first
    `prompts_per_step` kept ones as soon as a round's scores keep them (while the next round generates), the
    filling ones at the end; then a sample of them is improvement-scored."""
    from rlhf_refiner import algo

    group, wanted = config.generator.group_size, config.data.prompts_per_step
    deadline = config.ray.call_timeout_s
    rollouts, _, rewards, metrics = first
    kept: list[range] = []  # sample indices of each group with signal, in collection order
    spare: list[range] = []  # the other groups, used only to fill a batch still short after the last round
    refine_calls: list[list[Any]] = []  # over the chosen groups, in chosen order: kept ones, then filling ones
    refining = 0  # chosen groups whose refinement has started
    rounds = 0
    while True:
        shaped, valid = shaped_rewards(rollouts, rewards, config)
        signal = algo.groups_with_signal(shaped, group, valid)
        for g in range(len(kept) + len(spare), len(signal)):  # the groups this round added
            (kept if signal[g] else spare).append(range(g * group, (g + 1) * group))
        # the first `wanted` kept groups are chosen whatever later rounds bring
        refine_calls += start_refine_groups(actors.refiners, rollouts, kept[refining:wanted])
        refining = min(len(kept), wanted)
        if len(kept) >= wanted or rounds >= config.algo.max_sampling_rounds:
            break
        rounds += 1
        more = collect(actors, source.next_batch(version), step, config, refine=False)
        rollouts, rewards = rollouts + more.rollouts, rewards + more.rewards
    chosen_groups = (kept + spare)[:wanted]
    refine_calls += start_refine_groups(actors.refiners, rollouts, chosen_groups[refining:])  # the filling ones
    chosen = [i for indices in chosen_groups for i in indices]
    rollouts, rewards = [rollouts[i] for i in chosen], [rewards[i] for i in chosen]
    refinements = None
    if refine_calls:
        refinements, refine_metrics = gather_refine(actors, refine_calls, deadline)
        metrics.update(refine_metrics)
        metrics.update(score_improvement(actors, rollouts, refinements, rewards, step, config))
    metrics.update({"algo/fill_rate": min(len(kept), wanted) / wanted, "algo/sampling_rounds": rounds})
    return Collected(rollouts, refinements, rewards, metrics)


def rollout_phase(
    actors: Actors, source: PromptSource, prompts: list[Prompt], step: int, version: int, config: Config
) -> Collected:
    """The step's rollouts: one round, then DAPO's refill rounds when dynamic sampling is on."""
    started = time.perf_counter()
    dynamic = config.algo.dynamic_sampling  # then refinement waits for the refill's choice of groups
    collected = collect(actors, prompts, step, config, refine=not dynamic)
    if dynamic:
        collected = refill_groups(actors, source, collected, step, version, config)
    collected.metrics["time/rollout_phase"] = time.perf_counter() - started  # its own duration, even when ahead
    return collected
