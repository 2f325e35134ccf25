"""Pure RL math: group advantages, the PPO-clip policy loss, KL estimators, and the CE on refined responses.

Inputs are tensors and floats, outputs are `(loss, metrics)` or tensors; nothing here knows about models,
actors or configs. Shapes: B sequences, T tokens; masks are 1.0 on the tokens a term is averaged over.
The dynamic constraint's CE is normalised over refined tokens, separately from the RL term (docs/method.md).

Every mean over tokens or sequences divides by a `Normaliser`: the counts of the whole optimizer update (every
micro-batch of every rank), so that a loss accumulated over micro-batches and summed over ranks is the update's
mean, Σ_i Σ_t ℓ_it / Σ_i |o_i| for DAPO's token mean, and not a mean of micro-batch means. Without one, the
batch at hand is the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
LossAgg = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over entries where `mask` is 1; 0 when the mask is empty (no NaN)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass(frozen=True)
class Normaliser:
    """The denominators of one optimizer update's means, counted over all of its micro-batches and ranks."""

    tokens: float  # response tokens (the RL term's and the KL's)
    sequences: float  # responses with at least one token
    refined_tokens: float = 0.0  # the CE's tokens (refiner fallbacks carry none)
    max_tokens: int = 1  # Dr. GRPO's constant divisor: `generator.sampling.max_new_tokens`

    @classmethod
    def of(cls, mask: torch.Tensor, refined_mask: torch.Tensor | None = None, max_tokens: int = 1) -> Normaliser:
        """The counts of one (B, T) batch on its own: the normaliser when that batch is the whole update."""
        refined = 0.0 if refined_mask is None else float(refined_mask.sum())
        return cls(float(mask.sum()), float((mask.sum(-1) > 0).sum()), refined, max_tokens)


def masked_share(values: torch.Tensor, mask: torch.Tensor, count: float) -> torch.Tensor:
    """Σ values·mask / count: this batch's share of a mean over `count` entries of the whole update (0 if none)."""
    return (values * mask).sum() / max(count, 1.0)


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


CHUNK_ELEMENTS = 2**24  # logits per fp32 work block: 64 MiB, so V = 152k takes ~110 positions at a time


def _blocks(rows: int, positions: int, vocab: int, chunk: int) -> list[tuple[slice, slice]]:
    """(row, position) slices that tile a (rows, positions, vocab) tensor in blocks of at most ~`chunk` elements
    (a whole row at least when rows are short, a run of positions of one row when a row alone is too big)."""
    if positions * vocab <= chunk:
        step = max(1, chunk // max(positions * vocab, 1))
        return [(slice(r, min(r + step, rows)), slice(0, positions)) for r in range(0, rows, step)]
    step = max(1, chunk // vocab)
    return [
        (slice(r, r + 1), slice(t, min(t + step, positions))) for r in range(rows) for t in range(0, positions, step)
    ]


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.float()
    return torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token] in fp32, one block at a time, forward and backward: neither pass holds more
    than one block's fp32 log-softmax, and nothing vocabulary-sized is saved for the backward beyond the logits
    the model made (a plain `log_softmax(logits.float())` keeps a (B, T, V) fp32 tensor alive until the backward:
    tens of GB at V = 152k). The backward recomputes each block's forward and differentiates it with autograd, so
    values and gradients are bit-identical to the plain expression's."""

    @staticmethod
    def forward(ctx, logits, token_ids, temperature, chunk):
        rows, positions = token_ids.shape
        out = torch.empty(rows, positions, dtype=torch.float32, device=logits.device)
        blocks = _blocks(rows, positions, logits.shape[-1], chunk)
        for r, t in blocks:
            out[r, t] = _log_softmax(logits[r, t], temperature).gather(-1, token_ids[r, t].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, token_ids)
        ctx.temperature, ctx.blocks = temperature, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, token_ids = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # a trailing position beyond token_ids gets no gradient
        for r, t in ctx.blocks:  # each block's forward again, differentiated on its own: one block's graph at a time
            block = logits[r, t].detach().requires_grad_(True)
            with torch.enable_grad():
                logprobs = _log_softmax(block, ctx.temperature).gather(-1, token_ids[r, t].unsqueeze(-1))
            (grad[r, t],) = torch.autograd.grad(logprobs, block, grad_out[r, t].unsqueeze(-1))
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, chunk: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """log π(token_ids[b, t] | ...) under softmax(logits / temperature), in fp32, from logits (B, T', V) whose
    first T positions align with token_ids (B, T). T' may exceed T (a causal LM's last position predicts nothing:
    pass its logits whole rather than a slice, whose backward would allocate another (B, T', V) tensor)."""
    return _TokenLogprobs.apply(logits, token_ids, temperature, chunk)


@torch.no_grad()
def entropy_from_logits(
    logits: torch.Tensor, positions: int | None = None, temperature: float = 1.0, chunk: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """Per-token entropy (B, T) of softmax(logits / temperature) for the first T = `positions` (default all) of
    logits (B, T', V), block by block in fp32. A monitor: no gradient."""
    rows, positions = logits.shape[0], logits.shape[1] if positions is None else positions
    out = torch.empty(rows, positions, dtype=torch.float32, device=logits.device)
    for r, t in _blocks(rows, positions, logits.shape[-1], chunk):
        logp = _log_softmax(logits[r, t], temperature)
        out[r, t] = -(logp.exp() * logp).sum(dim=-1)
    return out


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: LossAgg, norm: Normaliser | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to this batch's share of the update's loss (the whole loss when `norm` is
    None); sequences without tokens are left out. Over the update (sequences i of len_i tokens, L = max_tokens):

    | mode | formula | used by |
    |---|---|---|
    | `seq_mean_token_mean` | mean over sequences of (Σ_t ℓ_it / len_i) | GRPO |
    | `token_mean` | Σ_i Σ_t ℓ_it / Σ_i len_i: long responses weigh more | DAPO |
    | `seq_mean_token_sum` | mean over sequences of (Σ_t ℓ_it / L): a constant divisor | Dr. GRPO |
    """
    norm = norm or Normaliser.of(mask)
    if mode == "token_mean":
        return masked_share(per_token, mask, norm.tokens)
    token_sums = (per_token * mask).sum(-1)  # (B,); 0 for a sequence without tokens
    if mode == "seq_mean_token_mean":
        per_sequence = token_sums / mask.sum(-1).clamp(min=1.0)
    elif mode == "seq_mean_token_sum":
        per_sequence = token_sums / norm.max_tokens
    else:
        raise ValueError(f"unknown loss aggregation '{mode}'")
    return per_sequence.sum() / max(norm.sequences, 1.0)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    loss_agg: LossAgg = "seq_mean_token_mean",
    token_weights: torch.Tensor | None = None,
    norm: Normaliser | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip policy term −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), aggregated by `loss_agg` over `norm`.

    logprobs/old_logprobs/mask are (B, T) over response tokens; advantages is (B,), broadcast over tokens.
    ε_high defaults to ε_low (`clip_eps`): symmetric GRPO/PPO. DAPO's clip-higher sets ε_high > ε_low.
    `token_weights` (B, T), e.g. truncated importance weights of off-policy samples, scale each token's term.
    The metrics are this batch's own means.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(-1)  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, loss_agg, norm)
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


def groups_with_signal(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(num_groups,) bool: groups with at least two valid members whose rewards are not all equal, exactly the
    groups that `group_advantages` gives a nonzero advantage (DAPO dynamic sampling keeps only these). `valid`
    (B,) bool marks real rewards, as in `group_advantages`; default: all."""
    grouped = rewards.view(-1, group_size)  # (num_groups, G)
    mask = torch.ones_like(grouped, dtype=torch.bool) if valid is None else valid.view(-1, group_size)
    high = torch.where(mask, grouped, torch.full_like(grouped, -torch.inf)).max(dim=1).values
    low = torch.where(mask, grouped, torch.full_like(grouped, torch.inf)).min(dim=1).values
    return (mask.sum(dim=1) >= 2) & (high > low)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π0) from tokens sampled from π_θ (Schulman's k1, k2, k3).

    With log-ratio d = log π0 − log π_θ: k1 = −d, k2 = d²/2, k3 = exp(d) − d − 1.

    As *values*, k1 and k3 are unbiased (k3 always ≥ 0, low variance: the metric), k2 is biased. As *loss terms*
    differentiated through log π_θ with the samples held fixed (what a learner does), they differ:

    | estimator | E_πθ[∇ k] | sound as a loss? |
    |---|---|---|
    | k1 | E[∇ log π_θ] = 0 | no: no expected gradient on-policy |
    | k2 | E[(log π_θ − log π0) ∇ log π_θ] = ∇ KL(π_θ ‖ π0) | yes: the reverse KL's gradient (the default) |
    | k3 | E[(1 − π0/π_θ) ∇ log π_θ] = ∇ KL(π0 ‖ π_θ) | no: the forward KL's gradient, not the reverse one |

    Per token, with its prefix held fixed (as every PPO-style learner treats the sampled context): the
    sequence-level reverse KL's gradient also has a score-function term through later tokens, which none of the
    three carries."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator '{estimator}' (expected k1, k2 or k3)")


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLEstimator,
    norm: Normaliser | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean KL(π_θ ‖ π0) over the policy's response tokens (this batch's share of the update's): the static
    constraint's term (before β). The metric is always k3 (unbiased, ≥ 0), whichever estimator is the loss."""
    count = (norm or Normaliser.of(mask)).tokens
    kl = masked_share(kl_estimate(logprobs, ref_logprobs, estimator), mask, count)
    metric = masked_share(kl_estimate(logprobs.detach(), ref_logprobs, "k3"), mask, count)
    return kl, {"kl_to_ref": metric.item()}


def refined_ce(
    refined_logprobs: torch.Tensor, refined_mask: torch.Tensor, norm: Normaliser | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The dynamic constraint's term (before λ): −mean over refined tokens of log π_θ(a'_t | s0, a'_<t).

    Normalised over the update's refined tokens only (`norm.refined_tokens`), independent of the RL term's.
    """
    count = float(refined_mask.sum()) if norm is None else norm.refined_tokens
    ce = -masked_share(refined_logprobs, refined_mask, count)
    return ce, {"ce_refined": ce.item()}


def lr_factor(update: int, total: int, schedule: str, warmup: int, min_ratio: float) -> float:
    """The learning rate of optimizer update `update` (0-based, of `total`) as a fraction of the peak: a linear
    warmup over the first `warmup` updates (1/warmup, 2/warmup, ... 1), then `constant` 1, or a `linear` or
    `cosine` decay that reaches `min_ratio` at the last update."""
    import math

    if update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - 1 - warmup, 1)
    progress = min(max(update - warmup, 0) / span, 1.0)  # 0 at the first update after warmup, 1 at the last
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule '{schedule}'")


def model_flops(num_params: int, tokens: float) -> float:
    """Training FLOPs of `tokens` through a dense decoder: 6 per parameter per token (2 forward, 4 backward),
    the usual MFU numerator (attention and the no-grad reference pass are left out)."""
    return 6.0 * num_params * tokens
