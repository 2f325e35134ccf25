"""Hand-derived checks of algo.py on 3-element tensors; the arithmetic is in the comments."""

import math

import pytest
import torch

from rlhf_refiner import algo


def test_group_advantages_hand_derived():
    # group 1: [1, 0, 0.5] -> mean 0.5, unbiased std = sqrt((0.25+0.25+0)/2) = 0.5 -> [1, -1, 0]
    # group 2: [2, 2, 2] -> all equal -> 0 (no signal)
    adv = algo.group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0]), group_size=3, eps=0.0)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0, 0.0, 0.0])


def test_group_advantages_without_std():
    # mean-centred only: [3, 1, 2] - 2 = [1, -1, 0]
    adv = algo.group_advantages(torch.tensor([3.0, 1.0, 2.0]), group_size=3, normalize_std=False)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0])


def test_group_advantages_leave_infra_errors_out_of_the_group_statistics():
    # group [1, 0, (9 invalid)]: mean of the valid two 0.5, unbiased std sqrt(0.5) -> ±0.5/0.7071; invalid -> 0
    # group [(invalid), 3, 3]: valid rewards agree -> 0 everywhere
    rewards = torch.tensor([1.0, 0.0, 9.0, 5.0, 3.0, 3.0])
    valid = torch.tensor([True, True, False, False, True, True])
    adv = algo.group_advantages(rewards, group_size=3, eps=0.0, valid=valid)
    assert adv.tolist() == pytest.approx([0.70710678, -0.70710678, 0.0, 0.0, 0.0, 0.0])
    # all valid: the same as without a mask
    assert torch.equal(
        algo.group_advantages(rewards, 3, valid=torch.ones(6, dtype=torch.bool)), algo.group_advantages(rewards, 3)
    )


def test_reinforce_pp_leaves_infra_errors_out():
    # valid [1, 3] (the 100 is an infra error): mean 2, centred [-1, 1], std sqrt(2) -> ±0.7071; invalid -> 0
    adv = algo.reinforce_pp_advantages(
        torch.tensor([1.0, 100.0, 3.0, 3.0]), 2, baseline=False, eps=0.0, valid=torch.tensor([True, False, True, False])
    )
    assert adv.tolist() == pytest.approx([-0.70710678, 0.0, 0.70710678, 0.0])


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        algo.group_advantages(torch.zeros(6), group_size=4)


def test_ppo_clip_loss_hand_derived():
    # advantages [1, 0, -1], ratios [1.3, 1.0, 0.7], eps 0.2, one token per sequence:
    #   seq 0: min(1.3*1, 1.2*1) = 1.2          -> -1.2 (clipped)
    #   seq 1: 0                                 ->  0
    #   seq 2: min(0.7*-1, 0.8*-1) = -0.8        ->  0.8 (clipped)
    # loss = mean(-1.2, 0, 0.8) = -0.4/3; clipped tokens: 2 of 3
    old = torch.zeros(3, 1)
    new = torch.log(torch.tensor([[1.3], [1.0], [0.7]]))
    loss, metrics = algo.ppo_clip_loss(new, old, torch.tensor([1.0, 0.0, -1.0]), torch.ones(3, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.4 / 3, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(2 / 3)


def test_ppo_clip_loss_is_sequence_mean_of_token_means_and_ignores_masked():
    # seq 0 has tokens with ratio 1 and adv 2 -> per-token -2 on 2 tokens (3rd masked, huge ratio ignored) -> -2
    # seq 1 has one token, ratio 1, adv -1 -> +1 ; loss = (-2 + 1) / 2 = -0.5
    new = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = algo.ppo_clip_loss(new, torch.zeros(2, 3), torch.tensor([2.0, -1.0]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.5)


def test_kl_estimators_hand_derived():
    # log π_θ = [0, 0, 0], log π0 = [0, ln 2, -ln 2]  ->  d = log π0 - log π_θ = [0, ln2, -ln2]
    # k1 = -d = [0, -ln2, ln2]; k2 = d²/2 = [0, ln2²/2, ln2²/2]; k3 = e^d - d - 1 = [0, 1 - ln2, -0.5 + ln2]
    lp = torch.zeros(3)
    ref = torch.tensor([0.0, math.log(2), -math.log(2)])
    ln2 = math.log(2)
    assert algo.kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0, -ln2, ln2])
    assert algo.kl_estimate(lp, ref, "k2").tolist() == pytest.approx([0, ln2**2 / 2, ln2**2 / 2])
    assert algo.kl_estimate(lp, ref, "k3").tolist() == pytest.approx([0, 1 - ln2, -0.5 + ln2])


def test_kl_penalty_masks_and_averages():
    # k3 on the 2 unmasked tokens: [1 - ln2, -0.5 + ln2] -> mean = 0.25
    lp = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2), -math.log(2), 7.0]])
    kl, metrics = algo.kl_penalty(lp, ref, torch.tensor([[1.0, 1.0, 0.0]]), "k3")
    assert kl.item() == pytest.approx(0.25)
    assert metrics["kl_to_ref"] == pytest.approx(0.25)


def test_kl_zero_when_policy_equals_reference():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    for estimator in ("k1", "k2", "k3"):
        assert algo.kl_estimate(lp, lp, estimator).abs().max().item() == 0.0


def test_refined_ce_hand_derived():
    # refined token probs [0.5, 0.25, (masked)] -> CE = -(ln .5 + ln .25)/2 = 1.5 ln 2
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ce, metrics = algo.refined_ce(lp, torch.tensor([[1.0, 1.0, 0.0]]))
    assert ce.item() == pytest.approx(1.5 * math.log(2))
    assert metrics["ce_refined"] == pytest.approx(1.5 * math.log(2))


def test_refined_ce_gradient_on_unchanged_response():
    # a' == a: the CE is the NLL of the policy's own sampled tokens. With logits z over 3 tokens and the target
    # token 0 at one position, dCE/dz = softmax(z) - onehot(0). For z = [0, ln 2, ln 1] -> p = [1/4, 2/4, 1/4]
    # so the gradient is [-3/4, 1/2, 1/4]: it raises the sampled token, i.e. it reinforces a good answer.
    logits = torch.tensor([[[0.0, math.log(2), 0.0]]], requires_grad=True)  # (B=1, T=1, V=3)
    lp = algo.token_logprobs(logits, torch.tensor([[0]]))
    ce, _ = algo.refined_ce(lp, torch.ones(1, 1))
    ce.backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([-0.75, 0.5, 0.25])
    assert ce.item() == pytest.approx(math.log(4))


def test_entropy_from_logits():
    # uniform over 4 -> ln 4; one-hot-ish (huge margin) -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = algo.entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_masked_mean_of_empty_mask_is_zero():
    assert algo.masked_mean(torch.tensor([1.0, 2.0]), torch.zeros(2)).item() == 0.0


def test_asymmetric_clip_hand_derived():
    # DAPO clip-higher, ε_low 0.2, ε_high 0.28; advantages [1, 1, -1], ratios [1.3, 1.25, 0.7]:
    #   seq 0: min(1.3, 1.28) = 1.28 -> -1.28 (clipped at 1 + ε_high)
    #   seq 1: min(1.25, 1.28) = 1.25 -> -1.25 (inside the wider upper range: not clipped)
    #   seq 2: min(-0.7, -0.8) = -0.8 -> 0.8 (clipped at 1 - ε_low)
    # loss = (-1.28 - 1.25 + 0.8) / 3 = -1.73 / 3; clipped tokens: 2 of 3
    new = torch.log(torch.tensor([[1.3], [1.25], [0.7]]))
    loss, metrics = algo.ppo_clip_loss(
        new, torch.zeros(3, 1), torch.tensor([1.0, 1.0, -1.0]), torch.ones(3, 1), clip_eps=0.2, clip_eps_high=0.28
    )
    assert loss.item() == pytest.approx(-1.73 / 3, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(2 / 3)


def test_loss_aggregation_modes_hand_derived():
    # per-token losses: seq 0 = [1, 2, 3] (3 tokens), seq 1 = [4, masked, masked] (1 token)
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token_mean: (1+2+3+4)/4 = 2.5; seq_mean_token_mean: (2 + 4)/2 = 3; seq_mean_token_sum: (6 + 4)/2 = 5
    assert algo.aggregate(per_token, mask, "token_mean").item() == pytest.approx(2.5)
    assert algo.aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert algo.aggregate(per_token, mask, "seq_mean_token_sum").item() == pytest.approx(5.0)


def test_reinforce_pp_without_baseline_whitens_over_the_batch():
    # rewards [1, 2, 3, 6]: batch mean 3, centred [-2, -1, 0, 3], unbiased std sqrt(14/3) = 2.1602
    adv = algo.reinforce_pp_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group_size=2, baseline=False, eps=0.0)
    std = math.sqrt(14 / 3)
    assert adv.tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])


def test_reinforce_pp_baseline_subtracts_group_mean_then_batch_std():
    # groups [1, 3] and [5, 5]: minus group means -> [-1, 1, 0, 0]; batch std (unbiased) = sqrt(2/3)
    adv = algo.reinforce_pp_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2, baseline=True, eps=0.0)
    std = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([-1 / std, 1 / std, 0.0, 0.0])
    # all rewards equal: no signal, no NaN
    assert algo.reinforce_pp_advantages(torch.ones(4), 2, baseline=True).tolist() == [0.0] * 4


def test_overlong_penalty_hand_derived():
    # max 16 tokens, buffer 4, factor 1: lengths 12 -> 0; 14 -> -(2/4) = -0.5; 16 -> -1; 20 -> -1 (capped)
    pen = algo.overlong_penalty(torch.tensor([12, 14, 16, 20]), max_length=16, buffer=4, factor=1.0)
    assert pen.tolist() == pytest.approx([0.0, -0.5, -1.0, -1.0])
    assert algo.overlong_penalty(torch.tensor([16]), 16, buffer=0, factor=1.0).tolist() == [0.0]


def test_groups_with_signal():
    # groups [1, 1], [0, 1], [0.5, 0.5] -> only the middle one has variance
    keep = algo.groups_with_signal(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), group_size=2)
    assert keep.tolist() == [False, True, False]


def test_truncated_importance_weights_hand_derived():
    # log-ratios old - behaviour: [ln 0.5, 0, ln 3] -> weights [0.5, 1, 3], cap 2 -> [0.5, 1, 2]; last token masked
    old = torch.tensor([[math.log(0.5), 0.0, math.log(3.0), 5.0]])
    behaviour = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, metrics = algo.truncated_importance_weights(old, behaviour, cap=2.0, mask=mask)
    assert weights.tolist()[0] == pytest.approx([0.5, 1.0, 2.0, 0.0])
    assert metrics["tis_weight_mean"] == pytest.approx(3.5 / 3)
    assert metrics["tis_truncated_frac"] == pytest.approx(1 / 3)


def test_ppo_clip_loss_scales_each_token_by_its_weight():
    # ratio 1, advantage 1: per-token loss -1; weights [0.5, 2] -> token mean of [-0.5, -2] = -1.25
    zeros, mask = torch.zeros(1, 2), torch.ones(1, 2)
    loss, _ = algo.ppo_clip_loss(zeros, zeros, torch.tensor([1.0]), mask, 0.2, token_weights=torch.tensor([[0.5, 2.0]]))
    assert loss.item() == pytest.approx(-1.25)


def test_model_flops_is_six_per_parameter_per_token():
    # 1M parameters, 1000 tokens: 2 (forward) + 4 (backward) multiply-adds per parameter per token
    assert algo.model_flops(1_000_000, 1000) == 6e9


def test_seq_mean_token_sum_divides_by_dr_grpo_constant():
    # seq sums 6 and 4 (as in the test above), max_new_tokens L = 4: (6/4 + 4/4) / 2 sequences = 1.25, whatever the
    # lengths (3 and 1): Dr. GRPO's constant divisor, so the effective learning rate does not grow with length
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norm = algo.Normaliser(tokens=4, sequences=2, max_tokens=4)
    assert algo.aggregate(per_token, mask, "seq_mean_token_sum", norm).item() == pytest.approx(1.25)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_shares_over_a_global_normaliser_add_up_to_the_whole_batchs_loss(mode):
    # Uneven lengths: a mean of micro-batch means would weigh the short micro-batch's tokens more. Shares of the
    # update's normaliser add up to the loss of the update taken whole, however it is split.
    torch.manual_seed(0)
    per_token = torch.randn(6, 5)
    lengths = torch.tensor([5, 1, 1, 4, 0, 2])
    mask = (torch.arange(5) < lengths[:, None]).float()
    whole = algo.aggregate(per_token, mask, mode, algo.Normaliser.of(mask, max_tokens=5))
    norm = algo.Normaliser.of(mask, max_tokens=5)  # counted over the whole update
    for split in ([6], [2, 4], [1, 1, 1, 3]):
        parts = zip(per_token.split(split), mask.split(split))
        assert sum(algo.aggregate(p, m, mode, norm) for p, m in parts).item() == pytest.approx(whole.item())
    naive = sum(algo.aggregate(p, m, mode) for p, m in zip(per_token.split(2), mask.split(2))) / 3
    assert naive.item() != pytest.approx(whole.item())  # the per-micro-batch mean that this replaces


def test_ce_and_kl_shares_over_the_updates_token_counts():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.9, 0.1]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    norm = algo.Normaliser(tokens=6.0, sequences=4.0, refined_tokens=6.0)  # this batch: 3 of the update's 6 tokens
    ce, _ = algo.refined_ce(lp, mask, norm)
    assert ce.item() == pytest.approx(-(math.log(0.5) + math.log(0.25) + math.log(0.9)) / 6)
    kl, metrics = algo.kl_penalty(lp, lp + 0.1, mask, "k2", norm)
    assert kl.item() == pytest.approx(3 * 0.5 * 0.01 / 6)
    assert metrics["kl_to_ref"] == pytest.approx(3 * (math.exp(0.1) - 1.1) / 6, rel=1e-5)  # the metric: k3


@pytest.mark.parametrize(
    ("estimator", "expected"), [("k1", "zero"), ("k2", "reverse"), ("k3", "forward")], ids=["k1", "k2", "k3"]
)
def test_kl_estimators_as_loss_terms_have_these_expected_gradients(estimator, expected):
    # Exact expectation over a 4-token categorical π_θ = softmax(θ): E_x~πθ[∇θ k(x)] with x held fixed, as a
    # learner differentiates a loss on sampled tokens. Only k2's is the gradient of the reverse KL(π_θ ‖ π0).
    theta = torch.tensor([0.3, -1.0, 0.8, 0.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 1.0]), -1)

    def grad_of(objective):
        logp = torch.log_softmax(theta, -1)
        return torch.autograd.grad(objective(logp), theta)[0]

    # one estimate per token x, weighted by π_θ(x) as a constant: the expected gradient of the sampled loss
    grad = grad_of(lambda logp: (logp.exp().detach() * algo.kl_estimate(logp, ref, estimator)).sum())
    targets = {
        "zero": torch.zeros(4),
        "reverse": grad_of(lambda logp: (logp.exp() * (logp - ref)).sum()),  # ∇ KL(π_θ ‖ π0)
        "forward": grad_of(lambda logp: (ref.exp() * (ref - logp)).sum()),  # ∇ KL(π0 ‖ π_θ)
    }
    assert grad.tolist() == pytest.approx(targets[expected].tolist(), abs=1e-6)
    others = [v for name, v in targets.items() if name != expected]
    assert all(grad.tolist() != pytest.approx(v.tolist(), abs=1e-4) for v in others)


@pytest.mark.parametrize("chunk", [10**9, 64, 7], ids=["one-block", "row-blocks", "position-blocks"])
def test_chunked_token_logprobs_match_log_softmax_values_and_gradients(chunk):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)  # 5 positions, the last predicts nothing
    ids = torch.randint(0, 11, (3, 4))
    weights = torch.randn(3, 4, dtype=torch.float64)
    lp = algo.token_logprobs(logits, ids, temperature=0.7, chunk=chunk)
    (lp * weights).sum().backward()
    plain_logits = logits.detach().clone().requires_grad_(True)
    plain = torch.log_softmax(plain_logits[:, :-1].float() / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    (plain * weights.float()).sum().backward()
    assert torch.allclose(lp.double(), plain.double(), atol=1e-5)
    assert torch.allclose(logits.grad.double(), plain_logits.grad.double(), atol=1e-5)
    assert logits.grad[:, -1].abs().sum() == 0
    entropy = algo.entropy_from_logits(logits.detach(), positions=4, temperature=0.7, chunk=chunk)
    logp = torch.log_softmax(logits.detach()[:, :-1] / 0.7, -1)
    assert torch.allclose(entropy.double(), -(logp.exp() * logp).sum(-1), atol=1e-5)


def test_token_logprobs_saves_no_vocabulary_sized_copy_for_the_backward():
    # At V = 152k a saved (N, T, V) fp32 log-softmax is tens of GB. Count the bytes autograd keeps for the backward
    # beyond the logits themselves (which the model's forward made anyway): only (N, T)-sized tensors.
    logits = torch.randn(4, 33, 1000, requires_grad=True)
    ids = torch.randint(0, 1000, (4, 32))
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs = algo.token_logprobs(logits, ids, chunk=4000)  # what is saved now lives until the backward
    assert sum(saved) <= 4 * 32 * 8  # the token ids (int64)
    logprobs.sum().backward()  # (recomputes one block at a time)
    assert logits.grad.abs().sum() > 0


def test_lr_factor_warms_up_then_follows_the_schedule():
    # 6 updates, 2 of warmup: 1/2, 2/2, then the decay over updates 2..5 (progress 0, 1/3, 2/3, 1) to min 0.1
    factors = {s: [algo.lr_factor(u, 6, s, 2, 0.1) for u in range(6)] for s in ("constant", "linear", "cosine")}
    assert factors["constant"] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert factors["linear"] == pytest.approx([0.5, 1.0, 1.0, 1 - 0.9 / 3, 1 - 1.8 / 3, 0.1])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 1 / 3, 2 / 3, 1)]
    assert factors["cosine"] == pytest.approx([0.5, 1.0, *cosine])
    assert algo.lr_factor(0, 6, "linear", 0, 0.0) == 1.0 and algo.lr_factor(5, 6, "linear", 0, 0.0) == 0.0
