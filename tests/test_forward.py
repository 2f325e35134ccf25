"""forward.py without DeepSpeed: rows, length groups, and every forward path against one unpadded HF forward per
sequence, on a tiny random Llama built here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhf_refiner import algo
from rlhf_refiner.config import load
from rlhf_refiner.forward import Forward, build_rows, length_groups
from rlhf_refiner.records import Prompt, Refinement, Reward, Rollout, Sample

PAD = 0
A, B, C = (5, 6, 7, 8), (9, 10, 11, 12, 13, 14), (3, 4, 5, 6, 7)
# (prompt, response a, refined a', fallback): two rows share A and two share B; a' changed, copied, or a fallback's
# placeholder; one empty response (no targets, one masked position in the shared pass)
ROWS = [
    (A, (15, 16), (15, 17, 18), False),
    (A, (19, 20, 21, 22), (19, 20, 21, 22), False),
    (B, (1,), (2, 3, 4, 5), False),
    (C, (4, 5, 6), (4, 5, 6), True),
    (B, (), (7,), False),
]
ADVANTAGES = (1.0, -0.5, 0.3, -0.8, 0.6)


def _samples(rows=ROWS) -> list[Sample]:
    samples = []
    for i, ((prompt, response, refined, fallback), advantage) in enumerate(zip(rows, ADVANTAGES, strict=False)):
        rollout = Rollout(
            f"1-{i}-0", Prompt(i, f"q{i}", prompt, None, 0), "", response, (-1.0,) * len(response), True, 0
        )
        refinement = Refinement(rollout.sample_id, "", refined, refined == response, 0, fallback, 0)
        samples.append(Sample(rollout, refinement, Reward(rollout.sample_id, 0.0, None), advantage, 0))
    return samples


def _tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        initializer_range=0.2,  # peaked next-token distributions: a shifted position or token changes log-probs
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def policy():
    return _tiny_llama(0)


@pytest.fixture(scope="module")
def reference():
    return _tiny_llama(1)  # another random model: π0, far enough from π_θ for a non-zero KL


def _forward(model, *overrides: str, **fields) -> Forward:
    """The forward `config` asks for on `model`, with `fields` replacing the chosen paths."""
    config = load(None, list(overrides))
    return dataclasses.replace(Forward.for_model(model, PAD, config, torch.device("cpu")), **fields)


def _one_by_one(model, samples: list[Sample], temperature: float, position_shift: int = 0, target_shift: int = 0):
    """Per-token log-probs and entropies (N, T-1) of `build_rows`' rows (policy rows, then changed a'), each from
    one unpadded HF forward of its own sequence, at the rows' target positions (0 elsewhere), and that mask,
    built here from the sequences. `position_shift` moves the response's positions away from its prompt's, and
    `target_shift` the scored tokens: what a wrong position id or an off-by-one target start would compute."""
    sequences = [(s.rollout.prompt.prompt_token_ids, s.rollout.response_token_ids) for s in samples]
    sequences += [
        (s.rollout.prompt.prompt_token_ids, s.refinement.refined_token_ids)
        for s in samples
        if s.refinement.refined_token_ids != s.rollout.response_token_ids
    ]
    width = max(len(p) + len(r) for p, r in sequences)
    logprobs, entropy, mask = (torch.zeros(len(sequences), width - 1) for _ in range(3))
    with torch.no_grad():
        for row, (prompt, response) in enumerate(sequences):
            ids = torch.tensor([prompt + response])
            positions = torch.arange(ids.shape[1])[None]
            positions[:, len(prompt) :] += position_shift  # rotary positions only matter relative to each other
            logp = torch.log_softmax(model(ids, position_ids=positions).logits[0, :-1] / temperature, -1)
            start, end = len(prompt) - 1, len(prompt) + len(response) - 1  # logits at t predict token t+1
            scored = ids[0, 1 + target_shift :]  # the token each position's logits are taken to predict
            last = min(end, len(scored))
            logprobs[row, start:last] = logp[start:last].gather(-1, scored[start:last, None])[:, 0]
            entropy[row, start:end] = -(logp.exp() * logp).sum(-1)[start:end]
            mask[row, start:end] = 1.0
    return logprobs, entropy, mask


PATHS = {
    "one padded pass": {"one_pass": True},
    "padded, every logit": {"keeps_logits": False, "shares_prompts": False, "length_groups": 1},
    "length groups": {"shares_prompts": False, "length_groups": 3},
    "shared prompts": {"shares_prompts": True, "length_groups": 1},
    "shared prompts, grouped responses": {"shares_prompts": True, "length_groups": 3},
}


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T=1", "T=0.7"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_forward_path_scores_each_row_as_its_own_unpadded_forward(policy, path, temperature):
    """Policy and refined rows (prompts of 4 to 6 tokens, shared by two rows each; responses of 0 to 4 tokens)
    through each path give, at every row's targets, the log-probs of one unpadded HF forward of that row alone,
    to 1e-5; the entropy too, for the policy rows asked for. The target mask is the one built by hand."""
    paths = {key: value for key, value in PATHS[path].items() if key != "one_pass"}
    forward = _forward(policy, f"generator.sampling.temperature={temperature}", **paths)
    samples = _samples()
    rows = build_rows(samples, PAD, with_refined=True)
    expected, expected_entropy, mask = _one_by_one(policy, samples, temperature)
    assert torch.equal(rows.target_mask, mask)
    with torch.no_grad():
        logprobs, entropy = forward.logprobs(
            policy, rows, entropy_rows=len(samples), one_pass="one_pass" in PATHS[path]
        )
    torch.testing.assert_close(logprobs * mask, expected, rtol=0, atol=1e-5)
    policy_mask = mask[: len(samples)]
    torch.testing.assert_close(entropy * policy_mask, expected_entropy[: len(samples)], rtol=0, atol=1e-5)
    assert (expected[mask.bool()] < -1e-3).all()  # log-probs of real size: agreeing to 1e-5 is no accident


def test_a_shifted_position_or_target_is_caught_by_the_one_by_one_comparison(policy):
    """The comparison above has teeth: a response's position ids one off from its prompt's (a shared pass that
    forgot where its rows' prompts end is further off still) or scoring the token after the target moves
    log-probs by far more than 1e-5."""
    samples = _samples()
    rows = build_rows(samples, PAD, with_refined=True)
    forward = _forward(policy, shares_prompts=True, length_groups=3)
    with torch.no_grad():
        logprobs, _ = forward.logprobs(policy, rows)
    for shift in ({"position_shift": 1}, {"target_shift": 1}):
        wrong, _, mask = _one_by_one(policy, samples, 1.0, **shift)
        assert ((logprobs - wrong) * mask).abs().max() > 1e-2, shift


@pytest.mark.parametrize("constraint", ["dynamic", "static_kl"])
def test_every_forward_path_gives_one_padded_passs_loss_and_gradient(policy, reference, constraint):
    """One micro-batch's loss (PPO-clip with TIS against a stale π_old, + λ·CE or β·KL, the KL metric) and its
    gradient are those of the single padded pass on every path: what the learner's step trains on (the
    DeepSpeed-free half of test_learner's `test_grouped_and_shared_prompt_forwards_train_exactly_as_one_...`)."""
    samples = _samples()
    tokens = sum(len(s.rollout.response_token_ids) for s in samples)
    refined = sum(len(s.refinement.refined_token_ids) for s in samples if not s.refinement.fallback)
    norm = algo.Normaliser(float(tokens), float(len(samples) - 1), float(refined), max_tokens=8)
    overrides = (f"algo.constraint={constraint}", "algo.tis_cap=2.0", "algo.clip_eps=0.1")
    old = _forward(reference, *overrides).response_logprobs(reference, samples)  # a ratio away from 1
    results = {}
    for path, fields in PATHS.items():
        paths = {key: value for key, value in fields.items() if key != "one_pass"}
        forward = _forward(policy, *overrides, policy_one_pass="one_pass" in fields, **paths)
        policy.zero_grad()
        part = forward.micro_batch_loss(policy, reference, samples, old, norm, kl_metric=True)
        part.loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in policy.parameters()])
        results[path] = (part, gradient)
    base, base_gradient = results["one padded pass"]
    assert base.metrics["learner/kl_to_ref"] > 0 and base.metrics["learner/clip_frac"] > 0
    assert base.metrics["learner/tis_weight_mean"] != pytest.approx(1.0) and base_gradient.abs().max() > 1e-3
    for path, (part, gradient) in results.items():
        assert part.loss.item() == pytest.approx(base.loss.item(), rel=1e-5, abs=1e-7), path
        assert part.metrics.keys() == base.metrics.keys()
        for key, value in part.metrics.items():
            assert value == pytest.approx(base.metrics[key], rel=1e-5, abs=1e-7), (path, key)
        torch.testing.assert_close(gradient, base_gradient, rtol=1e-4, atol=1e-6, msg=path)
        assert part.trained_tokens == base.trained_tokens
        if constraint == "static_kl":  # a' monitored, not trained: the copies' share from the same log-probs
            assert part.copied_logprob == pytest.approx(base.copied_logprob, rel=1e-5), path
    policy.zero_grad()


def test_the_monitor_ce_is_the_dynamic_ce_from_the_copies_and_one_pass_over_the_changed(policy):
    """Under `none` with refinements the CE is a monitor: the copies' log-probs from the policy rows, plus a
    no-grad pass over the changed a' alone, make the dynamic run's CE, which is (hand-built here) −Σ log π_θ over
    every a' token except the fallback's, over those tokens' count. The loss is the RL term alone."""
    samples = _samples()
    expected, _, mask = _one_by_one(policy, samples, 1.0)
    # refined rows: a' of rows 0, 2, 4 changed (rows 5, 6, 7); a' of row 1 is a copy; row 3 is the fallback's
    ce_rows = [5, 1, 6, 7]
    refined_tokens = float(mask[ce_rows].sum())
    hand_ce = -(expected[ce_rows] * mask[ce_rows]).sum().item() / refined_tokens
    norm = algo.Normaliser(10.0, 4.0, refined_tokens, max_tokens=8)
    with torch.no_grad():
        dynamic = _forward(policy, "algo.constraint=dynamic").micro_batch_loss(policy, None, samples, None, norm, False)
        monitor_forward = _forward(policy, "algo.constraint=none")
        monitor = monitor_forward.micro_batch_loss(policy, None, samples, None, norm, False)
    changed = monitor_forward.changed_refined_logprob(policy, samples)
    monitored_ce = -(monitor.copied_logprob + changed) / refined_tokens
    assert dynamic.copied_logprob is None and "learner/ce_refined" not in monitor.metrics
    assert dynamic.metrics["learner/ce_refined"] == pytest.approx(hand_ce, rel=1e-5)
    assert monitored_ce == pytest.approx(hand_ce, rel=1e-5)
    assert monitor.loss.item() == monitor.metrics["learner/loss_rl"]
    assert dynamic.loss.item() == pytest.approx(dynamic.metrics["learner/loss_rl"] + hand_ce, rel=1e-5)


def test_the_changed_refined_pass_runs_one_forward_whatever_changed(policy):
    """Under ZeRO-3 (`policy_one_pass`) each forward is a collective of all ranks, so a rank none of whose a'
    changed still runs one (and scores nothing)."""
    calls = []
    hook = policy.register_forward_hook(lambda *_: calls.append(1))
    try:
        forward = _forward(policy, "algo.constraint=none", policy_one_pass=True)
        copies = [s for s in _samples() if s.refinement.refined_token_ids == s.rollout.response_token_ids]
        assert forward.changed_refined_logprob(policy, copies) == 0.0 and len(calls) == 1
        assert forward.changed_refined_logprob(policy, _samples()) < 0 and len(calls) == 2
    finally:
        hook.remove()


def test_a_partitioned_reference_runs_one_forward_per_micro_batch(policy, reference):
    """With LoRA under ZeRO-3, π0 is the partitioned policy with its adapter off: every forward of it is a
    collective, so a rank must run exactly one per micro-batch whatever its rows' lengths (`reference_one_pass`);
    the cheaper path runs several (shared prompts, length groups), which deadlocked two ranks of uneven lengths."""
    calls = []
    hook = reference.register_forward_hook(lambda *_: calls.append(1))
    try:
        samples, norm = _samples(), algo.Normaliser(40.0, 5.0, 40.0)
        args = (policy, reference, samples, None, norm, True)
        _forward(policy, "algo.constraint=static_kl", length_groups=4, shares_prompts=True).micro_batch_loss(*args)
        cheaper = len(calls)
        one = _forward(
            policy, "algo.constraint=static_kl", length_groups=4, shares_prompts=True, reference_one_pass=True
        )
        one.micro_batch_loss(*args)
        assert cheaper > 1 and len(calls) - cheaper == 1
    finally:
        hook.remove()


def test_the_cheaper_paths_are_taken_only_where_config_and_model_allow(policy):
    """A Llama's forward keeps logits from a position on, and its cache is plain keys and values: both cheaper
    paths, unless `learner.shared_prompts` is off or gradient checkpointing drops the cache. Greedy sampling
    (T = 0) scores plain log-probs (T = 1)."""
    forward = _forward(policy, "generator.sampling.temperature=0")
    assert forward.keeps_logits and forward.shares_prompts and forward.temperature == 1.0
    assert not _forward(policy, "learner.shared_prompts=false").shares_prompts
    assert not _forward(policy, "learner.gradient_checkpointing=true").shares_prompts

    class NoLogitsToKeep(torch.nn.Module):  # a causal LM whose forward computes every position's logits
        config = policy.config

        def forward(self, input_ids, attention_mask=None):
            return policy(input_ids=input_ids, attention_mask=attention_mask)

    bare = _forward(NoLogitsToKeep())
    assert not bare.keeps_logits and not bare.shares_prompts


def test_behaviour_logprobs_of_samples_generated_without_them_are_refused():
    """The generator returns log-probs only when algo.tis_cap is set; a sample without them (generated before
    tis_cap was turned on) is refused rather than weighted against zeros."""
    from rlhf_refiner.forward import behaviour_logprobs

    sample = _samples()[0]
    sample = dataclasses.replace(sample, rollout=dataclasses.replace(sample.rollout, response_logprobs=()))
    with pytest.raises(ValueError, match="no behaviour log-probs"):
        behaviour_logprobs([sample], 16)


def test_length_groups_pad_the_fewest_tokens():
    """Hand-derived: rows of 2, 2, 2, 2, 5, 9 tokens. One group pads to 6 x 9 = 54 tokens; of the two-group
    splits, {2,2,2,2} {5,9} pads 8 + 18 = 26 (against {2,2,2,2,5} {9}: 25 + 9 = 34); three groups: 8 + 5 + 9."""
    lengths = [2, 9, 2, 5, 2, 2]
    assert length_groups(lengths, 1) == [[0, 1, 2, 3, 4, 5]]
    assert sorted(length_groups(lengths, 2)) == [[0, 2, 4, 5], [1, 3]]
    assert sorted(length_groups(lengths, 3)) == [[0, 2, 4, 5], [1], [3]]
    assert sorted(length_groups(lengths, 8)) == [[0, 2, 4, 5], [1], [3]]  # no more groups than lengths

    # a row without targets (an empty response) keeps logits from its own last position, inside its group
    from rlhf_refiner.forward import target_starts

    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float)
    assert target_starts(mask, [5, 3, 3]) == [2, 2, 1]


def test_the_shared_prompt_pass_is_only_for_full_attention_caches():
    """Sliding-window, chunked and hybrid (linear-attention / state-space) layers cache no plain keys over the
    whole prompt, so their models take the padded path."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3NextConfig

    from rlhf_refiner.forward import full_attention_cache

    assert full_attention_cache(LlamaConfig()) and full_attention_cache(Qwen2Config())
    assert full_attention_cache(MistralConfig(sliding_window=None))
    assert not full_attention_cache(MistralConfig(sliding_window=4096))
    assert not full_attention_cache(Gemma2Config())
    assert not full_attention_cache(Qwen3NextConfig())


def test_length_groups_match_a_brute_force_search():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 14))]
        k = rng.randint(1, 4)
        groups = length_groups(lengths, k)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row exactly once
        assert all(g == sorted(g) for g in groups)
        widths = sorted(set(lengths))
        best = min(
            sum(
                sum(n <= widths[b - 1] and (a == 0 or n > widths[a - 1]) for n in lengths) * widths[b - 1]
                for a, b in zip((0, *cuts), (*cuts, len(widths)))
            )
            for g in range(min(k, len(widths)))
            for cuts in itertools.combinations(range(1, len(widths)), g)
        )
        assert sum(len(g) * max(lengths[i] for i in g) for g in groups) == best, (lengths, k, groups)
