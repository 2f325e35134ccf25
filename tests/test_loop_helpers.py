"""Driver-side helpers of loop.py that need no cluster: advantages assembly and the improved-fraction metric."""

import pytest

from rlhf_refiner.config import load
from rlhf_refiner.loop import assemble_samples, improvement_metrics, improvement_sample, step_metrics
from rlhf_refiner.records import Prompt, Refinement, Reward, Rollout


def _refinement(i: int, unchanged: bool) -> Refinement:
    return Refinement(f"1-{i}-0", "x", (1,), unchanged, 0 if unchanged else 1, False, 0)


def test_improvement_sample_draws_a_reproducible_fraction_and_keeps_only_changed():
    refinements = [_refinement(i, unchanged=i % 2 == 0) for i in range(10)]
    changed, drawn = improvement_sample(refinements, 0.5, step=7)
    assert drawn == 5
    assert all(not refinements[i].unchanged for i in changed)
    assert (changed, drawn) == improvement_sample(refinements, 0.5, step=7)
    assert improvement_sample(refinements, 0.0, step=7) == ([], 0)


def test_improvement_sample_spends_no_reward_call_on_fallbacks():
    # a fallback's a' is a placeholder copy of a (π0's output was unusable): drawn, but not re-scored, so it
    # counts as neither improved nor worsened
    fallbacks = [Refinement(f"1-{i}-0", "x", (1,), False, 0, True, 0) for i in range(4)]
    assert improvement_sample(fallbacks, 1.0, step=3) == ([], 4)


def test_improvement_metrics_hand_derived():
    # 4 samples drawn, 3 of them changed: rewards a -> a' of (0.2 -> 0.5), (1.0 -> 0.5), (0.3 -> 0.3)
    # improved 1/4, worsened 1/4, delta (0.3 - 0.5 + 0) / 4 = -0.05 (the unchanged one contributes 0)
    m = improvement_metrics([0.2, 1.0, 0.3], [0.5, 0.5, 0.3], drawn=4)
    assert m["refiner/improved_frac"] == 0.25
    assert m["refiner/worsened_frac"] == 0.25
    assert m["refiner/reward_delta"] == pytest.approx(-0.05)
    assert improvement_metrics([], [], drawn=0) == {}


def test_assemble_samples_gives_group_advantages_and_step_metrics():
    config = load(None, ["generator.group_size=2"])
    prompt = Prompt(0, "1+1=", (1,), "2", 0)
    rollouts = [Rollout(f"1-0-{k}", prompt, r, (5,), (-0.1,), True, 0) for k, r in enumerate(["2", "3"])]
    rewards = [Reward("1-0-0", 1.0, 1.0, {"digits": 1.0}), Reward("1-0-1", 0.0, 0.0, {"digits": 0.0})]
    samples = assemble_samples(rollouts, None, rewards, config)
    # group of 2: mean 0.5, unbiased std = sqrt(0.5) -> advantages ±0.5/0.7071 = ±0.7071
    assert [s.advantage for s in samples] == pytest.approx([0.70710678, -0.70710678], abs=1e-5)
    metrics, rows = step_metrics(samples)
    assert metrics["reward/mean"] == 0.5 and metrics["task/accuracy"] == 0.5 and metrics["reward/digits"] == 0.5
    assert [r["response"] for r in rows] == ["2", "3"] and rows[0]["refined"] is None


def test_step_metrics_name_task_parts_as_task_metrics():
    config = load(None, ["generator.group_size=2"])
    prompt = Prompt(0, "1+1=", (1,), "2", 0)
    rollouts = [Rollout(f"1-0-{k}", prompt, r, (5,), (-0.1,), True, 0) for k, r in enumerate(["2=1+1", "2"])]
    parts = [{"verbosity": 0.2, "task/degenerate_rate": 1.0}, {"verbosity": 0.0, "task/degenerate_rate": 0.0}]
    rewards = [Reward(r.sample_id, 1.0, 0.0, p) for r, p in zip(rollouts, parts)]
    metrics, _ = step_metrics(assemble_samples(rollouts, None, rewards, config))
    # one of two samples carries the pattern; the bonus part stays a reward part
    assert metrics["task/degenerate_rate"] == 0.5 and metrics["reward/verbosity"] == pytest.approx(0.1)
    assert "reward/task/degenerate_rate" not in metrics


def _group(prompt_id: int, rewards: list[float]):
    prompt = Prompt(prompt_id, "1+1=", (1,), "2", 0)
    rollouts = [Rollout(f"1-{prompt_id}-{k}", prompt, "2", (5,) * (k + 1), (), True, 0) for k in range(len(rewards))]
    return rollouts, [Reward(r.sample_id, x, None) for r, x in zip(rollouts, rewards)]


class _Source:
    def __init__(self):
        self.batches = 0

    def next_batch(self, version):
        self.batches += 1
        return []


def test_refill_groups_replaces_flat_groups_then_fills(monkeypatch):
    from rlhf_refiner import loop

    config = load(None, ["generator.group_size=2", "data.prompts_per_step=3", "algo.max_sampling_rounds=2"])
    rollouts, rewards = [], []
    for pid, rs in enumerate([[1, 1], [0, 1], [0, 0]]):  # only group 1 has signal
        r, w = _group(pid, rs)
        rollouts, rewards = rollouts + r, rewards + w
    extra = iter([[[0.5, 0.5]], [[0.2, 0.9]]])  # round 1: flat; round 2: one group with signal

    def fake_collect(actors, prompts, step, cfg):
        groups = [_group(10 + i, rs) for i, rs in enumerate(next(extra))]
        return [x for g in groups for x in g[0]], None, [x for g in groups for x in g[1]], {}

    monkeypatch.setattr(loop, "collect", fake_collect)
    source = _Source()
    out_rollouts, _, out_rewards, metrics = loop.refill_groups(None, source, rollouts, None, rewards, 1, 0, config)
    # kept: group 1 (round 0) and the round-2 group; still one short after 2 rounds -> filled with the first flat one
    assert [r.sample_id for r in out_rollouts] == ["1-1-0", "1-1-1", "1-10-0", "1-10-1", "1-0-0", "1-0-1"]
    assert [r.reward for r in out_rewards] == [0, 1, 0.2, 0.9, 1, 1]
    assert metrics == {"algo/fill_rate": 2 / 3, "algo/sampling_rounds": 2}
    assert source.batches == 2


def test_assemble_samples_reinforce_pp_and_overlong_penalty():
    # group size 2, rewards [1, 1] and [1, 1]: all equal, but the overlong penalty (max 4 tokens, buffer 2)
    # shapes them by length: lengths 1, 2, 3, 4 -> penalties 0, 0, -0.5, -1 -> shaped [1, 1, 0.5, 0]
    config = load(
        None,
        [
            "generator.group_size=2",
            "generator.sampling.max_new_tokens=4",
            "algo.overlong_buffer=2",
            "algo.advantage=reinforce_pp",
        ],
    )
    prompt = Prompt(0, "1+1=", (1,), "2", 0)
    rollouts = [Rollout(f"1-0-{k}", prompt, "2", (5,) * (k + 1), (), True, 0) for k in range(4)]
    rewards = [Reward(r.sample_id, 1.0, 1.0) for r in rollouts]
    samples = assemble_samples(rollouts, None, rewards, config)
    # batch-whitened: mean 0.625, centred [.375, .375, -.125, -.625], unbiased std = sqrt(0.6875/3) = 0.47871
    std = (0.6875 / 3) ** 0.5
    assert [s.advantage for s in samples] == pytest.approx(
        [0.375 / std, 0.375 / std, -0.125 / std, -0.625 / std], abs=1e-5
    )
    assert [s.reward.reward for s in samples] == [1.0] * 4  # the logged reward is the task's, unshaped


def test_tied_embeddings_are_refused_on_cpu_before_any_actor(tmp_path):
    from transformers import LlamaConfig

    from rlhf_refiner.generator import check_reloadable

    LlamaConfig(hidden_size=64, num_attention_heads=2, tie_word_embeddings=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}.*ties its input and output embeddings"):
        check_reloadable(str(tmp_path), load(None))
    LlamaConfig(hidden_size=64, num_attention_heads=2, tie_word_embeddings=False).save_pretrained(tmp_path)
    check_reloadable(str(tmp_path), load(None))  # untied: accepted


def test_merge_calls_of_a_fanned_out_stage():
    from rlhf_refiner.metrics import merge_calls

    calls = [  # (actor, samples, metrics): refiner-0 ran two calls one after the other, refiner-1 one
        ("refiner-0", 2, {"refiner/unchanged_frac": 1.0, "refiner/tokens_per_s": 10.0, "time/refine": 1.0}),
        ("refiner-0", 6, {"refiner/unchanged_frac": 0.5, "refiner/tokens_per_s": 20.0, "time/refine": 2.0}),
        ("refiner-1", 8, {"refiner/unchanged_frac": 0.25, "refiner/tokens_per_s": 5.0, "time/refine": 2.5,
                          "refiner/spec_accept_rate": 0.4}),
        ("refiner-1", 0, {}),  # an empty shard carries nothing
    ]  # fmt: skip
    merged = merge_calls(calls, "time/refine")
    # busiest actor: refiner-0, 1 + 2 = 3 s (refiner-1: 2.5 s); tokens: 10*1 + 20*2 + 5*2.5 = 62.5 over 3 s
    assert merged["time/refine"] == 3.0
    assert merged["refiner/tokens_per_s"] == pytest.approx(62.5 / 3)
    assert merged["refiner/unchanged_frac"] == pytest.approx((2 * 1.0 + 6 * 0.5 + 8 * 0.25) / 16)  # 7 / 16
    assert merged["refiner/spec_accept_rate"] == pytest.approx(0.4)  # only the call that reports it
    one = {"generator/truncated_frac": 0.25, "generator/tokens_per_s": 8.0, "time/generate": 0.5}
    assert merge_calls([("generator-0", 16, one)], "time/generate") == pytest.approx(one)
