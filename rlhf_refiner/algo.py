"""Pure RL math: group advantages, the PPO-clip policy loss, KL estimators, and the CE on refined responses.

Inputs are tensors and floats, outputs are `(loss, metrics)` or tensors; nothing here knows about models,
actors or configs. Shapes: B sequences, T tokens; masks are 1.0 on the tokens a term is averaged over.
The dynamic constraint's CE is normalised over refined tokens, separately from the RL term (METHOD.md).
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
LossAgg = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over entries where `mask` is 1; 0 when the mask is empty (no NaN)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's (unbiased) std.

    `rewards` is (B,) with the G responses of a prompt contiguous, B = num_groups * G. A group whose rewards
    all agree gets advantage 0 (no signal), whatever `eps` is. `valid` (B,) bool marks real rewards; the others
    (infrastructure errors) get advantage 0 and stay out of their group's mean and std.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    mask = torch.ones_like(grouped) if valid is None else valid.view(-1, group_size).to(grouped.dtype)
    count = mask.sum(dim=1, keepdim=True)  # (num_groups, 1) valid samples per group
    mean = (grouped * mask).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = (grouped - mean) * mask
    if normalize_std and group_size > 1:
        std = ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centred = torch.where((std > 0) & (count > 1), centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log π(token_ids[b, t] | ...) from logits (B, T, V) aligned with token_ids (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (B, T) of the categorical distributions given by logits (B, T, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: LossAgg) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; sequences without tokens are left out.

    | mode | formula | used by |
    |---|---|---|
    | `seq_mean_token_mean` | mean over sequences of (sum over tokens / tokens in the sequence) | GRPO |
    | `token_mean` | sum over all tokens / all tokens: long responses weigh more | DAPO |
    | `seq_mean_token_sum` | mean over sequences of (sum over tokens): no length normaliser | Dr. GRPO-style |
    """
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    token_sums = (per_token * mask).sum(-1)  # (B,)
    lengths = mask.sum(-1)
    has_tokens = (lengths > 0).float()
    if mode == "seq_mean_token_mean":
        per_sequence = token_sums / lengths.clamp(min=1.0)
    elif mode == "seq_mean_token_sum":
        per_sequence = token_sums
    else:
        raise ValueError(f"unknown loss aggregation '{mode}'")
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    loss_agg: LossAgg = "seq_mean_token_mean",
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip policy term −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), aggregated by `loss_agg`.

    logprobs/old_logprobs/mask are (B, T) over response tokens; advantages is (B,), broadcast over tokens.
    ε_high defaults to ε_low (`clip_eps`): symmetric GRPO/PPO. DAPO's clip-higher sets ε_high > ε_low.
    `token_weights` (B, T), e.g. truncated importance weights of off-policy samples, scale each token's term.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, loss_agg)
    clip_frac = masked_mean((clipped < unclipped).float(), mask)  # tokens where the clip is active
    return loss, {"clip_frac": clip_frac.item(), "ratio_mean": masked_mean(ratio, mask).item()}


def truncated_importance_weights(
    old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """TIS: per-token weights min(π_old / π_behaviour, cap), detached, for samples drawn by an older (or
    numerically different) policy than the one the PPO ratio starts from. All (B, T); 0 outside `mask`."""
    weights = torch.exp(old_logprobs - behaviour_logprobs).detach()
    truncated = weights.clamp(max=cap) * mask
    metrics = {
        "tis_weight_mean": masked_mean(truncated, mask).item(),
        "tis_truncated_frac": masked_mean((weights > cap).float(), mask).item(),
    }
    return truncated, metrics


def reinforce_pp_advantages(
    rewards: torch.Tensor, group_size: int, baseline: bool, eps: float = 1e-6, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE++ advantages: rewards whitened over the whole batch (not per group).

    With `baseline` (REINFORCE++-baseline), each reward first has its group's mean subtracted, then the batch
    std divides. Without it, the batch mean and std whiten the raw rewards. (B,) in, (B,) out. Rewards that
    `valid` marks False (infrastructure errors) get 0 and enter no mean or std.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    mask = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    if baseline:
        centred = group_advantages(rewards, group_size, normalize_std=False, valid=mask)
    else:
        centred = torch.where(mask, rewards - rewards[mask].mean(), torch.zeros_like(rewards))
    kept = centred[mask]
    std = kept.std() if kept.numel() > 1 else torch.zeros(())
    return centred / (std + eps) if std > 0 else torch.zeros_like(centred)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to `max_length - buffer` tokens, then falling
    linearly to −`factor` at `max_length`, and −`factor` beyond. (B,) lengths in, (B,) penalties (≤ 0) out."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float64)
    into_buffer = (lengths.double() - (max_length - buffer)).clamp(min=0.0)
    return -(into_buffer / buffer).clamp(max=1.0) * factor


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(num_groups,) bool: groups whose rewards are not all equal (DAPO dynamic sampling keeps only these)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) > 0


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π0) from tokens sampled from π_θ (Schulman's k1, k2, k3).

    With log-ratio d = log π0 − log π_θ: k1 = −d, k2 = d²/2, k3 = exp(d) − d − 1 (unbiased, always ≥ 0).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator '{estimator}' (expected k1, k2 or k3)")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: KLEstimator
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean KL(π_θ ‖ π0) over the policy's response tokens: the static constraint's term (before β)."""
    kl = masked_mean(kl_estimate(logprobs, ref_logprobs, estimator), mask)
    return kl, {"kl_to_ref": kl.item()}


def refined_ce(refined_logprobs: torch.Tensor, refined_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The dynamic constraint's term (before λ): −mean over refined tokens of log π_θ(a'_t | s0, a'_<t).

    Normalised over refined tokens only, so it is independent of the RL term's normaliser.
    """
    ce = -masked_mean(refined_logprobs, refined_mask)
    return ce, {"ce_refined": ce.item()}


def model_flops(num_params: int, tokens: float) -> float:
    """Training FLOPs of `tokens` through a dense decoder: 6 per parameter per token (2 forward, 4 backward),
    the usual MFU numerator (attention and the no-grad reference pass are left out)."""
    return 6.0 * num_params * tokens
