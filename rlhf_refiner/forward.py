"""Forward: a micro-batch's samples -> padded rows -> per-token log-probs and entropy of a causal LM at the
generator's sampling temperature -> the micro-batch's share of its update's loss. The learner calls it with its
DeepSpeed engine (π_θ) and π0; nothing here knows DeepSpeed: any torch module with HF's forward will do.
Invariants: logits at t predict token t+1; every path (one padded pass, length groups cut to their own longest,
each distinct prompt run once with its rows continuing from its key/value cache) gives the same log-probs at each
row's targets (elsewhere: anything, masked by every use). Log-probs and entropy come in vocabulary blocks (algo).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rlhf_refiner import algo
from rlhf_refiner.config import AlgoConfig, Config
from rlhf_refiner.records import Sample


@dataclass
class Rows:
    """A padded forward batch: policy rows first, then refined rows that differ from their response."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    target_mask: torch.Tensor  # (N, T-1): 1 where the next token is a response / refined token
    policy_rows: int  # the first B rows are the policy's sequences
    refined_index: list[int]  # row of each refined sequence (a policy row when a' == a); empty without refiner
    ce_mask: torch.Tensor  # (R, T-1): the CE's tokens, refined row by refined row; all 0 for a refiner fallback
    prompt_lengths: list[int]  # each row's prompt tokens (its response starts there)

    def to(self, device: torch.device) -> Rows:
        return Rows(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.policy_rows,
            self.refined_index,
            self.ce_mask.to(device),
            self.prompt_lengths,
        )

    def head(self, rows: int) -> Rows:
        """The first `rows` rows alone (the policy's), without refined rows or CE."""
        return Rows(
            self.input_ids[:rows],
            self.attention_mask[:rows],
            self.target_mask[:rows],
            rows,
            [],
            self.ce_mask[:0],
            self.prompt_lengths[:rows],
        )


def _pad(sequences: list[tuple[tuple[int, ...], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, prompt length) sequences -> right-padded ids, attention mask, and the target mask (N, T-1): 1
    where the next token is a response token."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.zeros((len(sequences), width - 1))
    for row, (ids, prompt_len) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        target[row, prompt_len - 1 : len(ids) - 1] = 1.0  # logits at t predict token t+1
    return input_ids, attention, target


def _copied(sample: Sample) -> bool:
    """a' == a token for token (a fallback's placeholder too): the CE reuses the policy row."""
    return sample.refinement.refined_token_ids == sample.rollout.response_token_ids


def build_rows(samples: list[Sample], pad_id: int, with_refined: bool, refined_only: bool = False) -> Rows:
    """Padded rows: the policy's sequences, then (`with_refined`) the refined ones that differ from theirs.
    `refined_only`: the refined rows of samples whose a' all differ from a, and nothing else (`ce_mask` is then
    every row's target; `policy_rows` 0)."""
    sequences: list[tuple[tuple[int, ...], int]] = []  # (token ids, prompt length)
    if refined_only and with_refined:
        for s in samples:
            assert not _copied(s), f"sample {s.sample_id}: a' == a has no refined row of its own"
            sequences.append(
                (
                    s.rollout.prompt.prompt_token_ids + s.refinement.refined_token_ids,
                    len(s.rollout.prompt.prompt_token_ids),
                )
            )
        rows = _pad(sequences, pad_id)
        ce = torch.stack([rows[2][i] * (not s.refinement.fallback) for i, s in enumerate(samples)])
        return Rows(rows[0], rows[1], rows[2], 0, list(range(len(samples))), ce, [n for _, n in sequences])
    for s in samples:
        sequences.append(
            (s.rollout.prompt.prompt_token_ids + s.rollout.response_token_ids, len(s.rollout.prompt.prompt_token_ids))
        )
    refined_index: list[int] = []
    if with_refined:
        for i, s in enumerate(samples):
            assert s.refinement is not None, f"sample {s.sample_id} has no refinement"
            if _copied(s):
                refined_index.append(i)
            else:
                refined_index.append(len(sequences))
                prompt = s.rollout.prompt.prompt_token_ids
                sequences.append((prompt + s.refinement.refined_token_ids, len(prompt)))
    input_ids, attention, target = _pad(sequences, pad_id)
    # A fallback's a' = a is only a placeholder (π0's output was unusable): no constraint on that sample, so it
    # leaves the CE and its normaliser, while its policy row keeps its RL targets.
    ce_rows = [target[row] * (not s.refinement.fallback) for row, s in zip(refined_index, samples)]
    ce_mask = torch.stack(ce_rows) if ce_rows else target[:0]
    return Rows(input_ids, attention, target, len(samples), refined_index, ce_mask, [n for _, n in sequences])


def target_starts(target_mask: torch.Tensor, lengths: list[int]) -> list[int]:
    """Each row's first target position (where the logits predict its first response token); a row without
    targets gets its own last position, so a group's kept logits never start past its longest row."""
    has = target_mask > 0
    first = has.float().argmax(-1).tolist()
    return [f if any_target else max(n - 1, 0) for f, any_target, n in zip(first, has.any(-1).tolist(), lengths)]


def length_groups(lengths: list[int], max_groups: int) -> list[list[int]]:
    """Rows (by index) split into at most `max_groups` groups, each to be padded to its own longest row: of the
    splits of the rows sorted by length, the one with the fewest padded tokens (Σ over groups of rows × longest),
    by dynamic programming over the distinct lengths. Each group lists its rows in increasing index order."""
    widths = sorted(set(lengths))
    count = [0]  # count[j]: rows no longer than widths[j - 1]
    for width in widths:
        count.append(count[-1] + lengths.count(width))
    k = min(max_groups, len(widths))
    inf = float("inf")
    # cost[g][j]: fewest padded tokens for the rows of the j shortest widths in g groups; cut[g][j]: where the
    # last of those groups starts
    cost = [[0.0] + [inf] * len(widths)] + [[inf] * (len(widths) + 1) for _ in range(k)]
    cut = [[0] * (len(widths) + 1) for _ in range(k + 1)]
    for g in range(1, k + 1):
        for j in range(1, len(widths) + 1):
            for i in range(g - 1, j):
                value = cost[g - 1][i] + (count[j] - count[i]) * widths[j - 1]
                if value < cost[g][j]:
                    cost[g][j], cut[g][j] = value, i
    best = min(range(1, k + 1), key=lambda g: (cost[g][len(widths)], g))
    bounds, j = [], len(widths)
    for g in range(best, 0, -1):  # the last group covers widths[cut:j]
        bounds.append((widths[cut[g][j]], widths[j - 1]))
        j = cut[g][j]
    return [[i for i, n in enumerate(lengths) if low <= n <= high] for low, high in bounds]


def full_attention_cache(model_config) -> bool:
    """Whether every layer of the model caches plain keys and values over the whole sequence, which the shared
    prompt pass extends: no sliding-window or chunked layers (their caches keep only a window, whose offsets the
    mask would misplace under left padding), no linear-attention or state-space layers (no keys to extend)."""
    text = model_config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    windowed = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    return not windowed and not getattr(text, "attention_chunk_size", None) and hasattr(text, "num_attention_heads")


def at_columns(values: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    """(n, width) rows holding values[r, j] at column columns[r, j] and 0 elsewhere (differentiable in `values`);
    columns may run past `width` (a short row's padding), where values are dropped."""
    spread = torch.zeros(values.shape[0], width + values.shape[1], dtype=values.dtype, device=values.device)
    return spread.scatter(1, columns, values)[:, :width]


def behaviour_logprobs(samples: list[Sample], width: int) -> torch.Tensor:
    """(B, width) engine log-probs of each response token, aligned with `build_rows`' target positions."""
    out = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        start = len(s.rollout.prompt.prompt_token_ids) - 1  # logits at t predict token t+1
        values = torch.tensor(s.rollout.response_logprobs, dtype=out.dtype)
        if len(values) != len(s.rollout.response_token_ids):  # generated before algo.tis_cap was set
            raise ValueError(
                f"sample {s.rollout.sample_id} has no behaviour log-probs, which algo.tis_cap needs (it was generated "
                "before algo.tis_cap was set)"
            )
        out[row, start : start + len(values)] = values
    return out


@dataclass
class MicroBatchLoss:
    """One micro-batch's forward, from `Forward.micro_batch_loss` to the learner's backward."""

    loss: torch.Tensor  # this micro-batch's share of its update's loss (a scalar in the autograd graph)
    metrics: dict[str, float]  # its shares of the update's means (and the KL, CE, entropy it computed)
    trained_tokens: float  # tokens through the forward, padding aside
    # `refiner.monitor` (a CE logged, not trained): Σ log π_θ over the a' = a rows' CE tokens, taken from this
    # graph; the changed a' are scored by `changed_refined_logprob` once the graph is freed. None otherwise.
    copied_logprob: float | None


@dataclass(frozen=True)
class Forward:
    """How one learner rank runs a model over rows (π_θ, or π0 for the KL), and the loss of one micro-batch.
    `policy_one_pass`: the model that trains runs one padded forward (the learner sets it where several forwards
    before one backward would cost it, under ZeRO-3); π0 still takes the cheaper path unless `reference_one_pass`:
    π0 is then the partitioned policy itself (LoRA, its adapter off), whose every forward is a collective of all
    ranks, so each rank runs exactly one, whatever its rows' lengths."""

    pad_id: int
    temperature: float  # the generator's sampling temperature: π_θ is softmax(logits / T)
    algo_config: AlgoConfig  # the loss's terms and coefficients
    device: torch.device
    length_groups: int = 1  # `learner.length_groups`: a forward's default
    keeps_logits: bool = False  # the model's forward takes `logits_to_keep` (logits only from the first target)
    shares_prompts: bool = False  # each distinct prompt runs once and its rows continue from its key/value cache
    policy_one_pass: bool = False
    reference_one_pass: bool = False

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        pad_id: int,
        config: Config,
        device: torch.device,
        policy_one_pass: bool = False,
        reference_one_pass: bool = False,
    ) -> Forward:
        """The forward `config` asks for, where the HF causal LM `model` (π_θ's architecture, π0's too) allows it."""
        # HF causal LMs compute logits only for the last k positions when asked (not the prompt's)
        keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        learner = config.learner
        # HF turns the key/value cache off under gradient checkpointing, and the shared pass needs it
        shares_prompts = (
            learner.shared_prompts
            and keeps_logits
            and not learner.gradient_checkpointing
            and full_attention_cache(model.config)
        )
        return cls(
            pad_id=pad_id,
            # π_θ is the distribution the generator samples from, softmax(logits / T), and vLLM reports its
            # processed log-probs likewise; greedy (T = 0) reports plain log-probs. (top_p < 1 is refused in config.)
            temperature=config.generator.sampling.temperature or 1.0,
            algo_config=config.algo,
            device=device,
            length_groups=learner.length_groups,
            keeps_logits=keeps_logits,
            shares_prompts=shares_prompts,
            policy_one_pass=policy_one_pass,
            reference_one_pass=reference_one_pass,
        )

    def logprobs(
        self,
        model: torch.nn.Module,
        rows: Rows,
        entropy_rows: int = 0,
        groups: int | None = None,
        one_pass: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (N, T-1) of each next token at the sampling temperature, and the entropy (entropy_rows, T-1)
        of the first `entropy_rows` rows (None for 0): the PPO ratio, the CE on a', the entropy and the KL to π0
        (π0 tempered alike) all see the sampled π_θ. Only a row's targets are meaningful: every use masks the rest.
        With `shares_prompts`, each distinct prompt runs once and its rows continue from its key/value cache; the
        rest of each row runs in `length_groups` (default `self.length_groups`), each cut to its own longest and
        scored from its first target position on. `one_pass`: one padded forward of every row."""
        device = rows.input_ids.device
        width = rows.input_ids.shape[1]
        lengths = rows.attention_mask.sum(-1).tolist()
        out = torch.zeros(len(lengths), width - 1, device=device)
        entropy = torch.zeros(entropy_rows, width - 1, device=device) if entropy_rows else None
        max_groups = groups or self.length_groups
        if one_pass:
            max_groups = 1
        elif self.shares_prompts:
            self._shared_prompt_logprobs(model, rows, lengths, out, entropy, max_groups)
            return out, entropy
        starts = target_starts(rows.target_mask, lengths)
        for group in length_groups(lengths, max_groups):
            index = torch.tensor(group, device=device)
            end = max(lengths[i] for i in group)
            start = min(starts[i] for i in group) if self.keeps_logits else 0
            kwargs = {"logits_to_keep": end - start} if self.keeps_logits else {}
            ids = rows.input_ids[index, :end]
            logits = model(input_ids=ids, attention_mask=rows.attention_mask[index, :end], **kwargs).logits
            out[index, start : end - 1] = algo.token_logprobs(logits, ids[:, start + 1 :], self.temperature)
            scored = sum(i < entropy_rows for i in group)  # groups list their rows in order: these come first
            if scored:
                entropy[index[:scored], start : end - 1] = algo.entropy_from_logits(
                    logits[:scored], end - 1 - start, self.temperature
                )
            del logits  # token_logprobs keeps what its backward needs
        return out, entropy

    def _shared_prompt_logprobs(
        self,
        model: torch.nn.Module,
        rows: Rows,
        lengths: list[int],
        out: torch.Tensor,
        entropy: torch.Tensor | None,
        max_groups: int,
    ) -> None:
        """`logprobs` with one pass over the distinct prompts (left-padded, so each one's last token is the last
        column), whose key/value cache each row's response then extends. A row's first response token is scored
        from its prompt's last logits, the rest from its own; both scatter into `out` at the row's positions."""
        from transformers import DynamicCache

        device, temperature = rows.input_ids.device, self.temperature
        ids = rows.input_ids.tolist()
        prompts: dict[tuple[int, ...], int] = {}
        owner = [prompts.setdefault(tuple(ids[i][:n]), len(prompts)) for i, n in enumerate(rows.prompt_lengths)]
        longest = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for prompt, j in prompts.items():
            prompt_ids[j, longest - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[j, longest - len(prompt) :] = 1
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        first = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = [(layer.keys, layer.values) for layer in first.past_key_values.layers]
        model_config = getattr(model, "module", model).config  # the DeepSpeed engine wraps the HF model
        last_logits = first.logits  # (P, 1, V): each prompt's prediction of its rows' first response token
        del first
        width = out.shape[1]
        responses = [n - p for n, p in zip(lengths, rows.prompt_lengths)]
        for group in length_groups(responses, max_groups):
            index = torch.tensor(group, device=device)
            own = torch.tensor([owner[i] for i in group], device=device)
            span = max(1, max(responses[i] for i in group))  # an empty response still gets a (masked) position
            response_ids = torch.full((len(group), span), self.pad_id, dtype=torch.long)
            response_mask = torch.zeros((len(group), span))
            for r, i in enumerate(group):
                p = rows.prompt_lengths[i]
                response_ids[r, : responses[i]] = torch.tensor(ids[i][p : p + responses[i]], dtype=torch.long)
                response_mask[r, : responses[i]] = 1.0
            response_ids, response_mask = response_ids.to(device), response_mask.to(device)
            starts = torch.tensor([rows.prompt_lengths[i] for i in group], device=device)
            logits = model(
                input_ids=response_ids,
                attention_mask=torch.cat([prompt_mask[own], response_mask.long()], -1),
                position_ids=starts[:, None] + torch.arange(span, device=device),
                past_key_values=DynamicCache([(k[own], v[own]) for k, v in cache], config=model_config),
                use_cache=True,
            ).logits  # (g, span, V)
            # response token j of row i sits at position p_i + j and is predicted at p_i + j - 1
            columns = starts[:, None] - 1 + torch.arange(span, device=device)

            head = last_logits[own]
            logprobs = torch.cat(
                [
                    algo.token_logprobs(head, response_ids[:, :1], temperature),
                    algo.token_logprobs(logits, response_ids[:, 1:], temperature),
                ],
                -1,
            )
            out[index] = at_columns(logprobs * response_mask, columns, width)
            scored = sum(i < (0 if entropy is None else len(entropy)) for i in group)  # listed first (in order)
            if scored:
                parts = [algo.entropy_from_logits(head[:scored], 1, temperature)]
                if span > 1:
                    parts.append(algo.entropy_from_logits(logits[:scored], span - 1, temperature))
                values = torch.cat(parts, -1) * response_mask[:scored]
                entropy[index[:scored]] = at_columns(values, columns[:scored], width)
            del logits, head

    @torch.no_grad()
    def response_logprobs(self, policy: torch.nn.Module, samples: list[Sample]) -> torch.Tensor:
        """(B, T-1) log-probs of the sampled responses under `policy` as it is now, without autograd: the PPO
        ratio's denominator for a step's later updates."""
        rows = build_rows(samples, self.pad_id, with_refined=False).to(self.device)
        return self.logprobs(policy, rows, one_pass=self.policy_one_pass)[0]

    def micro_batch_loss(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        samples: list[Sample],
        old_logprobs: torch.Tensor | None,
        norm: algo.Normaliser,
        kl_metric: bool,
    ) -> MicroBatchLoss:
        """Forward of one micro-batch and its share of the update's loss: GRPO's PPO-clip term + the constraint,
        λ·CE on refined responses (`dynamic`; refiner fallbacks carry none), β·KL to π0 (`static_kl`, π0 being
        `reference`), or nothing. Refined rows identical to the sampled response reuse the policy rows, so the
        dynamic constraint costs an extra forward only for the responses the refiner changed; under `static_kl`/
        `none` the CE is a monitor (`MicroBatchLoss.copied_logprob`). `old_logprobs` (B, T-1) is None when the
        weights that sampled the PPO ratio's denominator are the current ones (the step's first update); every term
        divides by the update's counts in `norm`. `kl_metric`: also compute the KL to π0 outside `static_kl`."""
        cfg, device = self.algo_config, self.device
        dynamic = cfg.constraint == "dynamic"
        rows = build_rows(samples, self.pad_id, with_refined=dynamic).to(device)
        B = rows.policy_rows
        logprobs, entropy = self.logprobs(policy, rows, entropy_rows=B, one_pass=self.policy_one_pass)  # (N|B, T-1)
        policy_lp, policy_mask = logprobs[:B], rows.target_mask[:B]
        advantages = torch.tensor([s.advantage for s in samples], device=device)
        if old_logprobs is None:
            old_lp = policy_lp.detach()
        else:  # refined rows can make this batch wider than the policy-only pre-pass; the extra columns are masked
            old_lp = torch.nn.functional.pad(old_logprobs, (0, policy_lp.shape[1] - old_logprobs.shape[1]))
        tokens = float(policy_mask.sum())
        share = tokens / max(norm.tokens, 1.0)  # turns this micro-batch's token means into its share of the update's
        weights, metrics = None, {}
        if cfg.tis_cap is not None:  # the generator's policy (stale, or numerically different) drew the tokens
            behaviour = behaviour_logprobs(samples, policy_lp.shape[1]).to(device)
            weights, tis = algo.truncated_importance_weights(old_lp, behaviour, cfg.tis_cap, policy_mask)
            metrics = {f"learner/{k}": v * share for k, v in tis.items()}
        loss_rl, rl_metrics = algo.ppo_clip_loss(
            policy_lp, old_lp, advantages, policy_mask, cfg.clip_eps, cfg.clip_eps_high, cfg.loss_agg, weights, norm
        )
        loss = loss_rl
        metrics.update({"learner/loss_rl": loss_rl.item(), "learner/clip_frac": rl_metrics["clip_frac"] * share})
        metrics["learner/entropy"] = algo.masked_share(entropy, policy_mask, norm.tokens).item()
        if dynamic:
            index = torch.tensor(rows.refined_index, device=device)
            ce, _ = algo.refined_ce(logprobs[index], rows.ce_mask, norm)
            metrics["learner/ce_refined"] = ce.item()
            loss = loss + cfg.ce_coef * ce
        copied_lp = None
        if not dynamic and samples[0].refinement is not None:  # `refiner.monitor`: the copies' share now
            copies = [i for i, s in enumerate(samples) if _copied(s) and not s.refinement.fallback]
            copied_lp = (policy_lp[copies].detach() * policy_mask[copies]).sum().item()
        if reference is not None and (cfg.constraint == "static_kl" or kl_metric):
            policy_only = rows.head(B)
            with torch.no_grad():
                ref_lp, _ = self.logprobs(reference, policy_only, one_pass=self.reference_one_pass)
            kl, kl_metrics = algo.kl_penalty(policy_lp, ref_lp, policy_mask, cfg.kl_estimator, norm)
            metrics["learner/kl_to_ref"] = kl_metrics["kl_to_ref"]
            if cfg.constraint == "static_kl":
                loss = loss + cfg.kl_coef * kl
        return MicroBatchLoss(loss, metrics, float(rows.attention_mask.sum()), copied_lp)

    @torch.no_grad()
    def changed_refined_logprob(self, policy: torch.nn.Module, samples: list[Sample]) -> float:
        """Σ log π_θ over the refined tokens of the a' that differ from a (fallbacks carry no CE), from a no-grad
        forward of those rows alone. It runs exactly one forward, a row of `samples` when none of its a' changed:
        under ZeRO-3 a forward gathers parameters, a collective of all ranks, so every rank must run one."""
        changed = [s for s in samples if not _copied(s)]
        rows = build_rows(changed or samples[:1], self.pad_id, with_refined=bool(changed), refined_only=True)
        logprobs, _ = self.logprobs(policy, rows.to(self.device), groups=1, one_pass=self.policy_one_pass)
        return (logprobs.cpu() * rows.ce_mask).sum().item() if changed else 0.0
