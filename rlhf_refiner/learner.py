"""Learner: the policy under DeepSpeed. step(batch) -> metrics; source of weight syncs; saves HF checkpoints.

`learner.num_ranks` data-parallel ranks, one `Learner` actor each. Every rank gets the whole batch and trains on
its shard of each update; DeepSpeed averages gradients over ranks, and ZeRO partitions the state. Methods that
touch the model (step, sync, checkpoints, save_pretrained) are collectives: the driver calls them on every rank.
One step = `learner.updates_per_step` optimizer updates over the batch, each accumulated over micro-batches.
Loss = GRPO's PPO-clip term + the constraint: λ·CE on refined responses (`dynamic`; refiner fallbacks carry
none), β·KL to π0 (`static_kl`), or nothing, all at the generator's sampling temperature. Refined rows identical
to the sampled response reuse the policy forward pass, so the dynamic constraint costs an extra forward only for
the responses the refiner changed; under `static_kl`/`none` the CE is a monitor, computed without autograd.
Every term is normalised by the whole update's counts (all micro-batches, all ranks, `algo.Normaliser`), and
the backward undoes DeepSpeed's averaging over accumulation steps and ranks, so an update's gradient is the same
however it is split. Log-probs and entropy are computed in vocabulary blocks (algo.token_logprobs), from a
forward that runs each distinct prompt once (its rows continue from its key/value cache) and the rest in length
groups, with logits only where a target is. π0 (the reference) is loaded only when the KL is in the loss or
`algo.log_kl_to_ref` asks for the metric.
The only module that touches DeepSpeed.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlhf_refiner import algo
from rlhf_refiner.config import DEEPSPEED_PRECISION, Config
from rlhf_refiner.metrics import redirect_actor_output
from rlhf_refiner.records import Batch, Sample, shard_slice
from rlhf_refiner.weight_sync import ParamMeta, SyncGroup, free_port, plan_buckets, send_weights

# Each rank's share of the update's loss terms and token means (normalised by the update's global counts): they
# add up over micro-batches and ranks, and average over the step's updates.
SHARES = (
    "learner/loss",
    "learner/loss_rl",
    "learner/ce_refined",
    "learner/kl_to_ref",
    "learner/entropy",
    "learner/clip_frac",
    "learner/tis_weight_mean",
    "learner/tis_truncated_frac",
)
SUMMED_METRICS = ("learner/tokens_per_s", "learner/samples", *SHARES)  # over ranks; the rest (MFU too) are means
MAX_METRICS = ("time/learner_compute",)  # the slowest rank is the step's critical path


@dataclass
class _Rows:
    """A padded forward batch: policy rows first, then refined rows that differ from their response."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    target_mask: torch.Tensor  # (N, T-1): 1 where the next token is a response / refined token
    policy_rows: int  # the first B rows are the policy's sequences
    refined_index: list[int]  # row of each refined sequence (a policy row when a' == a); empty without refiner
    ce_mask: torch.Tensor  # (R, T-1): the CE's tokens, refined row by refined row; all 0 for a refiner fallback
    prompt_lengths: list[int]  # each row's prompt tokens (its response starts there)

    def to(self, device: torch.device) -> _Rows:
        return _Rows(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.policy_rows,
            self.refined_index,
            self.ce_mask.to(device),
            self.prompt_lengths,
        )

    def head(self, rows: int) -> _Rows:
        """The first `rows` rows alone (the policy's), without refined rows or CE."""
        return _Rows(
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


def build_rows(samples: list[Sample], pad_id: int, with_refined: bool, refined_only: bool = False) -> _Rows:
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
        return _Rows(rows[0], rows[1], rows[2], 0, list(range(len(samples))), ce, [n for _, n in sequences])
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
    return _Rows(input_ids, attention, target, len(samples), refined_index, ce_mask, [n for _, n in sequences])


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


def rank_share(samples: list[Sample], updates: int, rank: int, world_size: int) -> list[Sample]:
    """This rank's samples: its contiguous shard of each of the `updates` consecutive mini-batches, in order."""
    per_update = len(samples) // updates
    return [
        s
        for u in range(updates)
        for s in samples[u * per_update : (u + 1) * per_update][shard_slice(per_update, rank, world_size)]
    ]


def local_counts(samples: list[Sample]) -> list[float]:
    """[response tokens, responses with tokens, CE tokens] of this rank's part of an update: its share of the
    `algo.Normaliser` (the CE's tokens are a' of every sample with a refinement that is not a fallback)."""
    lengths = [len(s.rollout.response_token_ids) for s in samples]
    refined = sum(
        len(s.refinement.refined_token_ids) for s in samples if s.refinement is not None and not s.refinement.fallback
    )
    return [float(sum(lengths)), float(sum(n > 0 for n in lengths)), float(refined)]


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's: throughputs, counts and each rank's shares of the update's means add
    up, times take the slowest rank, and the rest (the same on every rank, or per-rank means) average."""
    combined = {}
    for key in per_rank[0]:
        values = [metrics[key] for metrics in per_rank]
        if key in SUMMED_METRICS:
            combined[key] = sum(values)
        elif key in MAX_METRICS:
            combined[key] = max(values)
        else:
            combined[key] = sum(values) / len(values)
    return combined


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


def rng_state() -> dict[str, object]:
    """The RNG states a rank's training draws from: torch's CPU generator and, on GPU, every CUDA device's."""
    state: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, object] | torch.Tensor) -> None:
    """Restore `rng_state()`'s states (a bare tensor: a checkpoint from before CUDA states were kept)."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("this checkpoint holds CUDA RNG states, and this learner rank has no CUDA device")
        torch.cuda.set_rng_state_all(state["cuda"])


def offloads_optimizer(config: Config) -> bool:
    """Whether `learner.deepspeed` moves the optimizer state to the host (ZeRO `offload_optimizer`)."""
    offload = config.learner.deepspeed.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam (the same update, in AdamW mode, on host memory) when the optimizer state is
    offloaded, which DeepSpeed requires: it refuses a torch optimizer there."""
    lr, decay = config.learner.lr, config.learner.weight_decay
    if offloads_optimizer(config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its C++ op on first use (cached)

        return DeepSpeedCPUAdam(model.parameters(), lr=lr, weight_decay=decay, adamw_mode=True)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=decay)


def mixed_precision(config: Config) -> dict[str, Any]:
    """DeepSpeed's section for `model.dtype` when `learner.deepspeed` names none: bf16 and fp16 weights then train
    against fp32 master copies (fp16 with dynamic loss scaling). Without it, ZeRO stage 0 hands plain AdamW bf16
    weights, and at lr 1e-6 every update rounds to zero (tested); a section that says otherwise is refused in
    config."""
    key = DEEPSPEED_PRECISION.get(config.model.dtype)
    if key is None or config.learner.deepspeed.keys() & DEEPSPEED_PRECISION.values():
        return {}
    return {key: {"enabled": True}}


def make_lr_schedule(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """`learner.lr_schedule` with its warmup (algo.lr_factor) over `learner.lr_schedule_updates` optimizer updates
    (default: the run's); past them a decayed schedule stays at its final learning rate."""
    cfg, total = config.learner, config.lr_schedule_span
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: algo.lr_factor(update, total, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr_ratio)
    )


class Learner:
    """One data-parallel rank. Construction is cheap; `setup` joins the ranks' process group (rank 0 hosts its
    store at `master_addr:master_port`) and builds the DeepSpeed engine, so the driver can ask rank 0 for a port
    before any rank blocks in the rendezvous."""

    def __init__(self, model_path: str, config: Config, rank: int = 0, world_size: int = 1) -> None:
        redirect_actor_output()  # metrics.actor_output=file: into the run's logs/
        self.model_path, self.config, self.rank, self.world_size = model_path, config, rank, world_size
        self.policy_version = 0
        self.sync_group: SyncGroup | None = None

    def free_port(self) -> int:
        """A free port on this rank's node: rank 0's for the ranks' rendezvous and for the weight-sync store."""
        return free_port()

    def setup(self, master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config, model_path = self.config, self.model_path
        torch.manual_seed(config.trainer.seed)
        torch.set_num_threads(config.learner.torch_threads)
        # This actor is its own launcher, so it sets what torchrun would set. Ray gives a GPU actor exactly its
        # device (CUDA_VISIBLE_DEVICES), which is therefore local device 0.
        os.environ.update(
            {
                "RANK": str(self.rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port or free_port()),
            }
        )
        deepspeed.init_distributed(
            dist_backend="gloo" if config.learner.num_gpus == 0 else "nccl",
            auto_mpi_discovery=False,
            verbose=False,
            timeout=datetime.timedelta(seconds=config.ray.call_timeout_s),  # the deadline of every collective
        )
        dtype = getattr(torch, config.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # Llama-3's tokenizer has no pad token. Pads are masked out of attention and of every loss, so any id works.
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if config.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.num_params = sum(p.numel() for p in model.parameters())
        per_rank = config.data.prompts_per_step * config.generator.group_size // config.learner.updates_per_step
        per_rank //= self.world_size
        micro = min(config.learner.micro_batch_size, per_rank)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": per_rank // micro,
            "gradient_clipping": config.learner.grad_clip,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            **mixed_precision(config),
            **config.learner.deepspeed,
        }
        optimizer = make_optimizer(model, config)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_lr_schedule(optimizer, config), config=ds_config
        )  # DeepSpeed steps the schedule once per optimizer update and keeps its state in checkpoints
        self.micro_batch_size = micro
        # π_θ is the distribution the generator samples from, softmax(logits / T), and vLLM reports its processed
        # log-probs likewise; greedy (T = 0) reports plain log-probs. (top_p < 1 is refused in config.)
        self.temperature = config.generator.sampling.temperature or 1.0
        self.zero_stage = self.engine.zero_optimization_stage()
        # HF causal LMs compute logits only for the last k positions when asked (not the prompt's)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        # HF turns the key/value cache off under gradient checkpointing, and the shared pass needs it
        self.shares_prompts = (
            config.learner.shared_prompts
            and self.keeps_logits
            and not config.learner.gradient_checkpointing
            and full_attention_cache(model.config)
        )
        self.ref_model = None
        if config.algo.constraint == "static_kl" or config.algo.log_kl_to_ref:  # every rank: π0 on its own rows
            self.ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
            self.ref_model.to(self.engine.device)

    # ---- training -------------------------------------------------------------------------------------------
    def _forward(
        self, model, rows: _Rows, entropy_rows: int = 0, groups: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (N, T-1) of each next token at the sampling temperature, and the entropy (entropy_rows, T-1)
        of the first `entropy_rows` rows (None for 0): the PPO ratio, the CE on a', the entropy and the KL to π0
        (π0 tempered alike) all see the sampled π_θ. Positions that are no row's target are 0.
        With `learner.shared_prompts`, each distinct prompt runs once and its rows continue from its key/value
        cache; the rest of each row runs in `length_groups` (default `learner.length_groups`), each cut to its
        own longest and scored from its first target position on. Under ZeRO-3 the policy runs one padded forward
        (see below); π0, a plain module, still takes the cheaper path."""
        device = rows.input_ids.device
        width = rows.input_ids.shape[1]
        lengths = rows.attention_mask.sum(-1).tolist()
        out = torch.zeros(len(lengths), width - 1, device=device)
        entropy = torch.zeros(entropy_rows, width - 1, device=device) if entropy_rows else None
        max_groups = groups or self.config.learner.length_groups
        if self.zero_stage == 3 and model is self.engine:
            # ZeRO-3 releases a module's gathered parameters in the backward only after its last forward's use:
            # several forwards before one backward would hold the whole model gathered. One padded forward.
            max_groups = 1
        elif self.shares_prompts:
            self._shared_prompt_forward(model, rows, lengths, out, entropy, max_groups)
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

    def _shared_prompt_forward(
        self,
        model,
        rows: _Rows,
        lengths: list[int],
        out: torch.Tensor,
        entropy: torch.Tensor | None,
        max_groups: int,
    ) -> None:
        """`_forward` with one pass over the distinct prompts (left-padded, so each one's last token is the last
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

    def _micro_step(
        self, samples: list[Sample], old_logprobs: torch.Tensor | None, norm: algo.Normaliser, kl_metric: bool
    ) -> dict[str, float]:
        """Forward + backward of one micro-batch; `old_logprobs` (B, T-1) is None when the weights that sampled
        the PPO ratio's denominator are the current ones (the step's first update). Returns this micro-batch's
        shares (`SHARES`) of the update's means, whose denominators `norm` counts."""
        cfg = self.config.algo
        dynamic = cfg.constraint == "dynamic"
        device = self.engine.device
        rows = build_rows(samples, self.pad_id, with_refined=dynamic).to(device)
        B = rows.policy_rows
        logprobs, entropy = self._forward(self.engine, rows, entropy_rows=B)  # (N, T-1), (B, T-1)
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
        monitor = not dynamic and samples[0].refinement is not None  # `refiner.monitor`: the CE as a metric only
        if monitor:  # the copies' share now, from this graph's log-probs; the changed a' after the backward
            copies = [i for i, s in enumerate(samples) if _copied(s) and not s.refinement.fallback]
            copied_lp = (policy_lp[copies].detach() * policy_mask[copies]).sum().item()
        if self.ref_model is not None and (cfg.constraint == "static_kl" or kl_metric):
            policy_only = rows.head(B)
            with torch.no_grad():
                ref_lp, _ = self._forward(self.ref_model, policy_only)
            kl, kl_metrics = algo.kl_penalty(policy_lp, ref_lp, policy_mask, cfg.kl_estimator, norm)
            metrics["learner/kl_to_ref"] = kl_metrics["kl_to_ref"]
            if cfg.constraint == "static_kl":
                loss = loss + cfg.kl_coef * kl
        # `loss` is this micro-batch's share of its update's loss. DeepSpeed would divide it by the accumulation
        # steps (not here: scale_wrt_gas=False) and average the gradients over ranks (undone by the factor), so
        # the update's gradient is that of Σ over micro-batches and ranks: the loss of the update taken whole.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        del logprobs, policy_lp
        if monitor:  # out of the autograd graph, and after it is freed: a no-grad forward of the changed a' only
            metrics["learner/ce_refined"] = -(copied_lp + self._changed_refined_lp(samples)) / max(
                norm.refined_tokens, 1.0
            )
        boundary = self.engine.is_gradient_accumulation_boundary()
        # ZeRO 1-3 report the (pre-clip) norm after the step; stage 0 does not, so take it from the grads first.
        stage0_norm = self._grad_norm() if boundary and self.zero_stage == 0 else None
        self.engine.step()
        if boundary:
            norm_value = self.engine.get_global_grad_norm()
            metrics["learner/grad_norm"] = float(norm_value) if norm_value is not None else stage0_norm
        metrics["learner/loss"] = loss.item()
        metrics["learner/trained_tokens"] = float(rows.attention_mask.sum())  # summed (not averaged) by step()
        return metrics

    @torch.no_grad()
    def _changed_refined_lp(self, samples: list[Sample]) -> float:
        """Σ log π_θ over the refined tokens of the a' that differ from a (fallbacks carry no CE), from a no-grad
        forward of those rows alone. Every rank runs exactly one forward here per micro-batch, a row of its own
        batch when none of its a' changed: under ZeRO-3 a forward gathers parameters, a collective of all ranks."""
        changed = [s for s in samples if not _copied(s)]
        rows = build_rows(changed or samples[:1], self.pad_id, with_refined=bool(changed), refined_only=True)
        logprobs, _ = self._forward(self.engine, rows.to(self.engine.device), groups=1)
        return (logprobs.cpu() * rows.ce_mask).sum().item() if changed else 0.0

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)).item() if grads else 0.0

    @torch.no_grad()
    def _old_logprobs(self, samples: list[Sample]) -> torch.Tensor:
        rows = build_rows(samples, self.pad_id, with_refined=False).to(self.engine.device)
        return self._forward(self.engine, rows)[0]

    def _normalisers(self, updates: list[list[Sample]]) -> list[algo.Normaliser]:
        """Each update's denominators, counted over every rank's share of it (one all-reduce of a few floats)."""
        counts = torch.tensor([local_counts(update) for update in updates], device=self.engine.device)
        if self.world_size > 1:
            dist.all_reduce(counts)
        max_tokens = self.config.generator.sampling.max_new_tokens
        return [algo.Normaliser(*row, max_tokens=max_tokens) for row in counts.tolist()]

    def _kl_metric_step(self) -> bool:
        """Whether this step logs the KL to π0 outside `static_kl`: the first, every `algo.kl_metric_every`, and
        the last step."""
        step, every = self.policy_version + 1, self.config.algo.kl_metric_every
        return step == 1 or step % every == 0 or step == self.config.trainer.steps

    def step(self, batch: Batch) -> dict[str, float]:
        """Train on this rank's share of one batch (a collective: every rank is called with the same batch).
        Returns the step's metrics over all ranks (shares of the update's means summed, then averaged over the
        step's updates), and the new policy version."""
        started = time.perf_counter()
        self.engine.train()
        lr = self.engine.get_lr()[0]  # this step's first update's (the schedule moves on at each update)
        updates = self.config.learner.updates_per_step
        samples = rank_share(list(batch.samples), updates, self.rank, self.world_size)
        per_update = len(samples) // updates
        norms = self._normalisers([samples[u * per_update : (u + 1) * per_update] for u in range(updates)])
        micro_batches = [samples[i : i + self.micro_batch_size] for i in range(0, len(samples), self.micro_batch_size)]
        micro_per_update = len(micro_batches) // updates
        # With several updates per step, later ones must see the ratio against the weights before the first.
        old = [None] * len(micro_batches)
        if updates > 1:
            old = [self._old_logprobs(micro) for micro in micro_batches]
        kl_metric = self._kl_metric_step()
        sums: dict[str, float] = {}
        grad_norms = []  # one per optimizer update, not per micro-batch
        for i, (micro, old_logprobs) in enumerate(zip(micro_batches, old, strict=True)):
            micro_metrics = self._micro_step(micro, old_logprobs, norms[i // micro_per_update], kl_metric)
            if "learner/grad_norm" in micro_metrics:
                grad_norms.append(micro_metrics.pop("learner/grad_norm"))
            for key, value in micro_metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        self.policy_version += 1
        tokens = sums.pop("learner/trained_tokens")
        metrics = {key: value / updates for key, value in sums.items()}  # shares: the mean over updates
        if grad_norms:
            metrics["learner/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["learner/lr"] = lr
        metrics["learner/policy_version"] = self.policy_version
        metrics["learner/samples"] = len(samples)
        metrics["learner/staleness"] = batch.policy_version - min(s.policy_version for s in batch.samples)
        if self.config.algo.tis_cap is None:  # stale samples trained with a ratio of 1 to the learner's own policy
            stale = sum(s.policy_version < batch.policy_version for s in batch.samples)
            metrics["learner/uncorrected_stale_frac"] = stale / len(batch.samples)
        seconds = time.perf_counter() - started
        metrics["time/learner_compute"] = seconds
        metrics["learner/tokens_per_s"] = tokens / seconds
        if self.config.learner.peak_tflops is not None:
            devices = max(1.0, self.config.learner.num_gpus)
            metrics["learner/mfu"] = (
                algo.model_flops(self.num_params, tokens) / seconds / (self.config.learner.peak_tflops * 1e12 * devices)
            )
        per_rank: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(per_rank, metrics)  # a few dozen floats; every rank returns the same combination
        if self.config.placement.layout == "colocated" and self.engine.device.type == "cuda":
            # The generator wakes on this GPU for the sync next: hand back the allocator's cached blocks (the
            # step's activations and logits), keeping only weights, gradients' buffers and optimizer state.
            torch.cuda.empty_cache()
        return combine_rank_metrics(per_rank)

    # ---- weights out ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _full_params(self, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The full (un-partitioned) parameters `names` by HF name; under ZeRO-3 just those are all-gathered, for
        the duration of the block."""
        all_params = dict(self.engine.module.named_parameters())
        named = {name: all_params[name] for name in names}
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
                yield {k: v.data for k, v in named.items()}
        else:
            yield {k: v.data for k, v in named.items()}

    def weight_metas(self) -> list[ParamMeta]:
        """Full shapes without gathering (ZeRO-3 keeps them as `ds_shape`)."""
        named = self.engine.module.named_parameters()
        return [
            ParamMeta(name, str(p.dtype).removeprefix("torch."), tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in named
        ]

    def init_weight_sync(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        """Rank 0 joins (as sync rank 0) the group the vLLM workers join concurrently; other ranks only take part
        in the ZeRO-3 gathers of each broadcast."""
        backend = self.config.sync.backend
        if self.sync_group is not None:  # re-formed after an engine died: abort the old group, never reuse it
            self.sync_group.close()
        self.sync_group = SyncGroup(host, port, 0, world_size, timeout_s, who="learner", backend=backend)

    def broadcast_weights(self, bucket_bytes: int) -> dict:
        """Send the current weights to every vLLM worker, bucket by bucket (rank 0); returns checksums, bytes and
        seconds. Every rank is called: under ZeRO-3 each bucket's gather is a collective of all ranks."""
        started = time.perf_counter()
        buckets = plan_buckets(self.weight_metas(), bucket_bytes)
        gathered = self._gathered_buckets(buckets)
        if self.rank != 0:
            for _ in gathered:  # take part in rank 0's gathers
                pass
            return {}
        assert self.sync_group is not None, "init_weight_sync was not called on learner rank 0"
        sums, nbytes = send_weights(self.sync_group, buckets, gathered, verify=self.config.sync.verify)
        return {"checksums": sums, "bytes": nbytes, "seconds": time.perf_counter() - started, "buckets": len(buckets)}

    def _gathered_buckets(self, buckets: list[list[ParamMeta]]) -> Iterator[dict[str, torch.Tensor]]:
        """Each bucket's full tensors in turn (gathered under ZeRO-3), in the order rank 0 sends them."""
        for bucket in buckets:
            with self._full_params([m.name for m in bucket]) as tensors:
                yield tensors

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        """Weights, optimizer, RNG and policy version, as a DeepSpeed checkpoint in `directory` (the driver commits
        the checkpoint atomically once every part is written). Every rank writes its ZeRO partition and its RNG."""
        self.engine.save_checkpoint(directory, tag="state", client_state={"policy_version": self.policy_version})
        torch.save(rng_state(), os.path.join(directory, f"torch_rng_rank{self.rank}.pt"))

    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored policy version. The learning rate and weight
        decay are this config's from the next update on: the checkpoint's optimizer and schedule hold the saved
        ones, which would silently undo a change that `trainer.allow_config_change` let through and recorded.
        (On a plain resume they are the same numbers, computed as the schedule computes them: bitwise.)"""
        path, client_state = self.engine.load_checkpoint(directory, tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag 'state') under {directory}")
        set_rng_state(torch.load(os.path.join(directory, f"torch_rng_rank{self.rank}.pt")))
        schedule, cfg = self.engine.lr_scheduler, self.config.learner
        schedule.base_lrs = [cfg.lr] * len(schedule.base_lrs)
        for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, strict=True):
            group["lr"] = cfg.lr * factor(schedule.last_epoch)
            group["weight_decay"] = cfg.weight_decay
        self.policy_version = client_state["policy_version"]
        return self.policy_version

    def save_pretrained(self, path: str, bucket_bytes: int = 256 * 2**20) -> str | None:
        """The policy in HF format (weights + config + tokenizer), written by rank 0 to a temp dir then renamed;
        returns the path there (None on other ranks). Under ZeRO-3 the parameters are gathered one bucket at a
        time and copied to host memory, so no device ever holds the whole model twice."""
        buckets = plan_buckets(self.weight_metas(), bucket_bytes)
        state = {}
        for tensors in self._gathered_buckets(buckets):
            if self.rank == 0:
                state.update({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()})
        if self.rank != 0:
            return None
        tmp = f"{path}.tmp"
        self.engine.module.save_pretrained(tmp, state_dict=state)
        self.tokenizer.save_pretrained(tmp)
        if os.path.exists(path):  # keep the previous copy until the new one is in place
            os.rename(path, f"{path}.old")
            os.rename(tmp, path)
            shutil.rmtree(f"{path}.old")
        else:
            os.rename(tmp, path)
        return path
