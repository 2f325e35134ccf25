"""Driver-side code of loop.py and rollout.py that needs no cluster: advantages assembly, the improved-fraction
metric, DAPO refills, which samples the refiner sees (fake actors), and generator recovery's version stamp."""

from types import SimpleNamespace

import pytest

from rlhf_refiner.config import load
from rlhf_refiner.loop import step_metrics
from rlhf_refiner.placement import Actors
from rlhf_refiner.records import Collected, Prompt, Refinement, Reward, Rollout
from rlhf_refiner.rollout import assemble_samples, improvement_metrics, improvement_sample


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
    from rlhf_refiner import rollout

    config = load(None, ["generator.group_size=2", "data.prompts_per_step=3", "algo.max_sampling_rounds=2"])
    rollouts, rewards = [], []
    for pid, rs in enumerate([[1, 1], [0, 1], [0, 0]]):  # only group 1 has signal
        r, w = _group(pid, rs)
        rollouts, rewards = rollouts + r, rewards + w
    extra = iter([[[0.5, 0.5]], [[0.2, 0.9]]])  # round 1: flat; round 2: one group with signal

    def fake_collect(actors, prompts, step, cfg, refine=True):
        assert not refine  # the refill refines only what it keeps
        groups = [_group(10 + i, rs) for i, rs in enumerate(next(extra))]
        return Collected([x for g in groups for x in g[0]], None, [x for g in groups for x in g[1]], {})

    monkeypatch.setattr(rollout, "collect", fake_collect)
    source = _Source()
    first = Collected(rollouts, None, rewards, {})
    actors = SimpleNamespace(refiners=[])
    out_rollouts, _, out_rewards, metrics = rollout.refill_groups(actors, source, first, 1, 0, config)
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


def test_refill_judges_signal_on_the_rewards_the_advantages_use():
    # G = 2, max_new_tokens 4, overlong buffer 2 (factor 1): lengths 1, 2 -> penalty 0; 3 -> -0.5; 4 -> -1.
    # group 0: raw [1, 0] but the 0 is an infrastructure error -> one valid member: advantage 0, no signal
    # group 1: raw [1, 0.5], lengths [3, 1] -> shaped [0.5, 0.5]: advantage 0, no signal
    # group 2: raw [1, 1], lengths [1, 4] -> shaped [1, 0]: signal (raw rewards alone say none)
    # group 3: raw [0, 1]: signal. Raw rewards would keep groups 0 and 1; the advantages need 2 and 3.
    from rlhf_refiner import rollout

    config = load(
        None,
        [
            "generator.group_size=2", "data.prompts_per_step=2", "algo.max_sampling_rounds=0",
            "algo.dynamic_sampling=true", "generator.sampling.max_new_tokens=4", "algo.overlong_buffer=2",
        ],
    )  # fmt: skip
    rollouts, rewards = [], []
    cases = [
        ([1.0, 0.0], [1, 1], {1}),
        ([1.0, 0.5], [3, 1], set()),
        ([1.0, 1.0], [1, 4], set()),
        ([0.0, 1.0], [1, 1], set()),
    ]
    for pid, (raw, lengths, infra) in enumerate(cases):
        prompt = Prompt(pid, "1+1=", (1,), "2", 0)
        for k, (reward, length) in enumerate(zip(raw, lengths)):
            rollouts.append(Rollout(f"1-{pid}-{k}", prompt, "2", (5,) * length, (), True, 0))
            rewards.append(Reward(f"1-{pid}-{k}", reward, None, infra_error=k in infra))
    from rlhf_refiner import algo

    shaped, valid = rollout.shaped_rewards(rollouts, rewards, config)
    assert shaped.tolist() == [1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 1.0]
    assert algo.groups_with_signal(shaped, 2, valid).tolist() == [False, False, True, True]
    first = Collected(rollouts, None, rewards, {})
    out = rollout.refill_groups(SimpleNamespace(refiners=[]), _Source(), first, 1, 0, config)
    assert [r.sample_id for r in out.rollouts] == ["1-2-0", "1-2-1", "1-3-0", "1-3-1"]
    assert out.metrics["algo/fill_rate"] == 1.0
    assert all(s.advantage != 0 for s in assemble_samples(out.rollouts, None, out.rewards, config))


class _Method:
    """Stands in for an actor method: `.remote` runs it at once, and its value stands in for the ObjectRef."""

    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args):
        return self.fn(*args)


def _fake_actors(log: list, flat_prompts: set[int], refiners: int = 2):
    """One generator (G = 2; the second response is longer), one reward worker (reward 1 for every response of
    a prompt in `flat_prompts`, else 0 and 1), and `refiners` refiners; `log` records each call's sample ids."""
    from rlhf_refiner.records import shard_slice

    def generate(prompts, step):
        log.append(("generate", [p.prompt_id for p in prompts]))
        rollouts = [
            Rollout(f"{step}-{p.prompt_id}-{k}", p, "r", (5,) * (k + 1), (), True, 0) for p in prompts for k in (0, 1)
        ]
        return rollouts, {"generator/tokens_per_s": 1.0, "time/generate": 1.0}

    def reward(r):
        pid, k = r.prompt.prompt_id, int(r.sample_id.rsplit("-", 1)[1])
        return Reward(r.sample_id, 1.0 if pid in flat_prompts else float(k), None)

    def score(rollouts, shard, num_shards):
        return [reward(r) for r in rollouts[shard_slice(len(rollouts), shard, num_shards)]]

    def score_refined(rollouts, refinements):
        log.append(("score_refined", [r.sample_id for r in rollouts]))
        return [Reward(r.sample_id, 0.5, None) for r in rollouts]

    def refine(rollouts, shard, num_shards):
        part = rollouts[shard_slice(len(rollouts), shard, num_shards)]
        log.append(("refine", [r.sample_id for r in part]))
        refinements = [Refinement(r.sample_id, "a'", (7,), False, 1, False, 0) for r in part]
        return refinements, ({"refiner/unchanged_frac": 0.0, "time/refine": 0.5} if part else {})

    refiner = [SimpleNamespace(refine=_Method(refine)) for _ in range(refiners)]
    return Actors(
        learners=[],
        generators=[SimpleNamespace(generate=_Method(generate))],
        refiners=refiner,
        rewards=[SimpleNamespace(score=_Method(score), score_refined=_Method(score_refined))],
        reward_models=[],
        buffer=None,
        placement_group=None,
        generator_options=[],
    )


class _Prompts:
    def __init__(self, first_id: int):
        self.next_id = first_id

    def next_batch(self, version):
        prompts = [Prompt(self.next_id + i, "q", (1,), None, version) for i in range(2)]
        self.next_id += 2
        return prompts


def _no_ray(monkeypatch):
    import ray

    from rlhf_refiner import remote, rollout

    def wait(refs, stage, timeout_s):
        return list(refs)

    monkeypatch.setattr(rollout, "wait", wait)  # its own waits, and those of `remote.gather_stage`
    monkeypatch.setattr(remote, "wait", wait)
    monkeypatch.setattr(ray, "put", lambda value: value)


def _calls(log, kind):
    return [ids for name, ids in log if name == kind]


@pytest.mark.parametrize(
    ("rounds", "flat", "chosen", "refined", "improved"),
    [
        # round 0: prompt 0 flat, 1 kept (refined at once); round 1: both flat; the batch is filled with prompt 0.
        # a' scores 0.5: improved over rewards [0, 1, 1, 1] once in 4
        (1, {0, 2, 3}, [1, 0], [[1], [0]], 0.25),
        # round 1: prompts 2 and 3 kept; one is needed: prompt 3 (and flat prompt 0) are never refined.
        # rewards [0, 1, 0, 1]: improved twice in 4
        (2, {0}, [1, 2], [[1], [2]], 0.5),
    ],
)
def test_dynamic_sampling_refines_and_improvement_scores_only_the_chosen_groups(
    monkeypatch, rounds, flat, chosen, refined, improved
):
    from rlhf_refiner import rollout

    _no_ray(monkeypatch)
    config = load(None, ["generator.group_size=2", "data.prompts_per_step=2", "algo.dynamic_sampling=true",
                         f"algo.max_sampling_rounds={rounds}"])  # fmt: skip
    log = []
    out = rollout.rollout_phase(_fake_actors(log, flat), _Prompts(2), _Prompts(0).next_batch(0), 1, 0, config)
    ids = [f"1-{pid}-{k}" for pid in chosen for k in (0, 1)]
    assert [r.sample_id for r in out.rollouts] == ids
    assert [f.sample_id for f in out.refinements] == [r.sample_id for r in out.rewards] == ids
    # each submission is sharded over both refiners; a kept group's refinement starts before the next round
    per_group = [[f"1-{pid}-0", f"1-{pid}-1"] for [pid] in refined]
    assert _calls(log, "refine") == [[sample] for pair in per_group for sample in pair]
    kinds = [name for name, _ in log]
    assert kinds.index("refine") < kinds.index("generate", 1)
    assert _calls(log, "score_refined") == [ids]  # improvement-scored: the chosen samples only
    assert out.metrics["time/refine"] == 1.0  # refiner-0's two calls, 0.5 s each
    assert out.metrics["refiner/improved_frac"] == improved and out.metrics["algo/sampling_rounds"] == 1


def test_without_dynamic_sampling_every_rollout_is_refined_alongside_scoring(monkeypatch):
    from rlhf_refiner import rollout

    _no_ray(monkeypatch)
    config = load(None, ["generator.group_size=2", "data.prompts_per_step=2"])
    log = []
    out = rollout.rollout_phase(_fake_actors(log, {0}), _Prompts(2), _Prompts(0).next_batch(0), 1, 0, config)
    ids = ["1-0-0", "1-0-1", "1-1-0", "1-1-1"]
    assert [f.sample_id for f in out.refinements] == [r.sample_id for r in out.rollouts] == ids
    assert [name for name, _ in log] == ["generate", "refine", "refine", "score_refined"]
    assert "algo/fill_rate" not in out.metrics and out.metrics["time/refine"] == 0.5


def test_recovery_stamps_the_weights_with_the_learners_own_version(monkeypatch):
    """Async: step k+1's rollouts start from version k-1 while the learner makes k. An engine dying in them is
    recreated after that step (rank 0's calls run in order), so the sync sends version k and must say k."""
    import ray

    from rlhf_refiner import loop

    def handle(actor_id: str) -> SimpleNamespace:
        return SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: actor_id))

    learner, generator = handle("learner-0"), handle("generator-0")
    learner.policy_version = 1  # the step already submitted has made version 1
    learner.__ray_call__ = _Method(lambda fn: fn(learner))
    synced, recreated = [], []
    monkeypatch.setattr(loop, "wait", lambda refs, stage, timeout_s: list(refs))
    monkeypatch.setattr(loop.placement, "recreate_generator", lambda actors, index, *_: recreated.append(index))
    monkeypatch.setattr(loop, "connect_weight_sync", lambda actors, config: 2**20)
    monkeypatch.setattr(loop, "sync_weights", lambda actors, version, bucket_bytes, config: synced.append(version))
    failures = [ray.exceptions.RayActorError(actor_id="generator-0")]

    def rollouts_from_version_0():
        if failures:
            raise failures.pop()
        return "rollouts"

    config = load(None, ["trainer.async_steps=1", "buffer.max_staleness=1"])
    recovery = loop.Recovery(SimpleNamespace(learners=[learner], generators=[generator]), "model", config)
    assert recovery.run(rollouts_from_version_0) == "rollouts"
    assert recreated == [0] and synced == [1] and recovery.generator_restarts == 1


def test_a_missing_model_dir_or_an_unreachable_hub_id_is_a_config_error(tmp_path, monkeypatch):
    from rlhf_refiner.config import ConfigError
    from rlhf_refiner.loop import resolve_model_path

    with pytest.raises(ConfigError, match=f"model.path '{tmp_path}/absent' is not a directory"):
        resolve_model_path(load(None, [f"model.path={tmp_path}/absent"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: as on a node without network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # and an empty cache
    with pytest.raises(ConfigError, match="model.path 'no-such-org/no-such-model' is not a local directory.*hub"):
        resolve_model_path(load(None, ["model.path=no-such-org/no-such-model"]))


def test_logged_samples_are_spread_over_prompts_with_the_refiners_edits_first():
    from rlhf_refiner.metrics import spread_samples

    # a step's rows come one prompt's G samples at a time; q1's second sample is the only edit
    rows = [
        {"query": q, "response": f"{q}{k}", "refined": f"{q}{k}" if (q, k) != ("q1", 1) else "fixed"}
        for q in ("q0", "q1", "q2")
        for k in range(3)
    ]
    picked = [(r["query"], r["response"]) for r in spread_samples(rows, 4)]
    assert picked == [("q1", "q11"), ("q0", "q00"), ("q2", "q20"), ("q0", "q01")]
    assert spread_samples(rows, 0) == []
    no_refiner = [{**r, "refined": None} for r in rows]  # constraint=none: no a' at all
    assert [r["query"] for r in spread_samples(no_refiner, 3)] == ["q0", "q1", "q2"]


def test_start_up_is_its_own_phase_and_the_progress_bar_counts_training_only(tmp_path, capsys):
    from rlhf_refiner.metrics import MetricsLogger

    config = load(None, [f"trainer.output_dir={tmp_path}", "metrics.wandb_mode=disabled", "metrics.progress_bar=true"])
    logger = MetricsLogger(config, tmp_path, total_steps=10, start_step=4)
    logger.phase("starting the actors: learner-0")
    assert logger.progress is None  # no bar (and no rate, no ETA) while the actors start
    logger.begin_training()
    assert (logger.progress.n, logger.progress.total) == (4, 10)  # a resumed run's bar starts at its checkpoint
    logger.log(5, {"reward/mean": 0.5})
    logger.close({"steps": 10})
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].endswith("] starting the actors: learner-0") and lines[1].endswith("] training")
    assert "step 5: reward 0.500" in out.out + out.err
    assert "5/10" in out.err  # the bar: 4 restored steps plus the one trained


def test_the_summary_keeps_a_resumed_runs_earlier_evaluations(tmp_path):
    import json

    from rlhf_refiner.metrics import MetricsLogger

    rows = [{"step": 0, "eval/reward": 0.4, "eval/accuracy": 0.3}, {"step": 1, "reward/mean": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # before the checkpoint
    config = load(None, [f"trainer.output_dir={tmp_path}", "metrics.wandb_mode=disabled", "metrics.progress_bar=false"])
    logger = MetricsLogger(config, tmp_path, total_steps=4, start_step=1)
    logger.log(2, {"eval/reward": 0.6, "eval/accuracy": 0.5})
    summary = {}
    logger.close(summary)
    assert summary["eval"] == {
        "0": {"eval/accuracy": 0.3, "eval/reward": 0.4},
        "2": {"eval/accuracy": 0.5, "eval/reward": 0.6},
    }
