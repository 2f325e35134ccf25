"""Pure RL math: group advantages, the PPO-clip policy loss, KL estimators, and the CE on refined responses.

Inputs are tensors and floats, outputs are `(loss, metrics)` or tensors; nothing here knows about models,
actors or configs. Shapes: B sequences, T tokens; masks are 1.0 on the tokens a term is averaged over.
The dynamic constraint's CE is normalised over refined tokens, separately from the RL term (METHOD.md).
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over entries where `mask` is 1; 0 when the mask is empty (no NaN)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's (unbiased) std.

    `rewards` is (B,) with the G responses of a prompt contiguous, B = num_groups * G. A group whose rewards
    all agree gets advantage 0 (no signal), whatever `eps` is.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        std = grouped.std(dim=1, keepdim=True)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log π(token_ids[b, t] | ...) from logits (B, T, V) aligned with token_ids (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (B, T) of the categorical distributions given by logits (B, T, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's policy term: −min(r·A, clip(r, 1−ε, 1+ε)·A) per token, averaged per sequence, then over sequences.

    logprobs/old_logprobs/mask are (B, T) over response tokens; advantages is (B,), broadcast over tokens.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    has_tokens = (mask.sum(-1) > 0).float()
    loss = (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    clip_frac = masked_mean((clipped < unclipped).float(), mask)  # tokens where the clip is active
    return loss, {"clip_frac": clip_frac.item(), "ratio_mean": masked_mean(ratio, mask).item()}


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
