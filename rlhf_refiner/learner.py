"""Learner: the policy under DeepSpeed. step(batch) -> metrics; source of weight syncs; saves HF checkpoints.

`learner.num_ranks` data-parallel ranks, one `Learner` actor each. Every rank gets the whole batch and trains on
its shard of each update; DeepSpeed averages gradients over ranks, and ZeRO partitions the state. Methods that
touch the model (step, sync, checkpoints, save_pretrained) are collectives: the driver calls them on every rank.
One step = `learner.updates_per_step` optimizer updates over the batch, each accumulated over micro-batches.
Loss = GRPO's PPO-clip term + the constraint: λ·CE on refined responses (`dynamic`; refiner fallbacks carry
none), β·KL to π0 (`static_kl`), or nothing, all at the generator's sampling temperature. Refined rows identical
to the sampled response reuse the policy forward pass, so the dynamic constraint costs an extra forward only for
the responses the refiner changed. π0 (the reference) is loaded only when the KL is in the loss or
`algo.log_kl_to_ref` asks for the metric.
The only module that touches DeepSpeed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_refiner import algo
from rlhf_refiner.config import Config
from rlhf_refiner.records import Batch, Sample, shard_slice
from rlhf_refiner.weight_sync import ParamMeta, SyncGroup, free_port, plan_buckets, send_weights

SUMMED_METRICS = ("learner/tokens_per_s", "learner/samples")  # over ranks; the rest (MFU too) are means
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

    def to(self, device: torch.device) -> _Rows:
        return _Rows(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            self.policy_rows,
            self.refined_index,
            self.ce_mask.to(device),
        )


def build_rows(samples: list[Sample], pad_id: int, with_refined: bool) -> _Rows:
    sequences: list[tuple[tuple[int, ...], int]] = []  # (token ids, prompt length)
    for s in samples:
        sequences.append(
            (s.rollout.prompt.prompt_token_ids + s.rollout.response_token_ids, len(s.rollout.prompt.prompt_token_ids))
        )
    refined_index: list[int] = []
    if with_refined:
        for i, s in enumerate(samples):
            assert s.refinement is not None, f"sample {s.sample_id} has no refinement"
            if s.refinement.refined_token_ids == s.rollout.response_token_ids:
                refined_index.append(i)
            else:
                refined_index.append(len(sequences))
                prompt = s.rollout.prompt.prompt_token_ids
                sequences.append((prompt + s.refinement.refined_token_ids, len(prompt)))
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.zeros((len(sequences), width - 1))
    for row, (ids, prompt_len) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        target[row, prompt_len - 1 : len(ids) - 1] = 1.0  # logits at t predict token t+1
    # A fallback's a' = a is only a placeholder (π0's output was unusable): no constraint on that sample, so it
    # leaves the CE and its normaliser, while its policy row keeps its RL targets.
    ce_rows = [target[row] * (not s.refinement.fallback) for row, s in zip(refined_index, samples)]
    ce_mask = torch.stack(ce_rows) if ce_rows else target[:0]
    return _Rows(input_ids, attention, target, len(samples), refined_index, ce_mask)


def rank_share(samples: list[Sample], updates: int, rank: int, world_size: int) -> list[Sample]:
    """This rank's samples: its contiguous shard of each of the `updates` consecutive mini-batches, in order."""
    per_update = len(samples) // updates
    return [
        s
        for u in range(updates)
        for s in samples[u * per_update : (u + 1) * per_update][shard_slice(per_update, rank, world_size)]
    ]


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's: throughputs and counts add up, times take the slowest rank, and the
    rest (each rank's mean over the same number of micro-batches) average."""
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
        out[row, start : start + len(values)] = values
    return out


class Learner:
    """One data-parallel rank. Construction is cheap; `setup` joins the ranks' process group (rank 0 hosts its
    store at `master_addr:master_port`) and builds the DeepSpeed engine, so the driver can ask rank 0 for a port
    before any rank blocks in the rendezvous."""

    def __init__(self, model_path: str, config: Config, rank: int = 0, world_size: int = 1) -> None:
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
            **config.learner.deepspeed,
        }
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learner.lr, weight_decay=config.learner.weight_decay
        )
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.micro_batch_size = micro
        # π_θ is the distribution the generator samples from, softmax(logits / T), and vLLM reports its processed
        # log-probs likewise; greedy (T = 0) reports plain log-probs. (top_p < 1 is refused in config.)
        self.temperature = config.generator.sampling.temperature or 1.0
        self.zero_stage = self.engine.zero_optimization_stage()
        self.ref_model = None
        if config.algo.constraint == "static_kl" or config.algo.log_kl_to_ref:
            self.ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval().requires_grad_(False)
            self.ref_model.to(self.engine.device)

    # ---- training -------------------------------------------------------------------------------------------
    def _forward_logprobs(self, model, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs (N, T-1) of each next token and the logits (N, T-1, V), both at the sampling temperature: the
        PPO ratio, the CE on a', the entropy and the KL to π0 (π0 tempered alike) all see the sampled π_θ."""
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1]  # (N, T-1, V)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return algo.token_logprobs(logits, rows.input_ids[:, 1:]), logits

    def _micro_step(self, samples: list[Sample], old_logprobs: torch.Tensor | None) -> dict[str, float]:
        """Forward + backward of one micro-batch; `old_logprobs` (B, T-1) is None when the weights that sampled
        the PPO ratio's denominator are the current ones (the step's first update)."""
        cfg = self.config.algo
        with_refined = cfg.constraint == "dynamic" or samples[0].refinement is not None
        device = self.engine.device
        rows = build_rows(samples, self.tokenizer.pad_token_id, with_refined).to(device)
        logprobs, logits = self._forward_logprobs(self.engine, rows)  # (N, T-1)
        B = rows.policy_rows
        policy_lp, policy_mask = logprobs[:B], rows.target_mask[:B]
        advantages = torch.tensor([s.advantage for s in samples], device=device)
        if old_logprobs is None:
            old_lp = policy_lp.detach()
        else:  # refined rows can make this batch wider than the policy-only pre-pass; the extra columns are masked
            old_lp = torch.nn.functional.pad(old_logprobs, (0, policy_lp.shape[1] - old_logprobs.shape[1]))
        weights, metrics = None, {}
        if cfg.tis_cap is not None:  # the generator's policy (stale, or numerically different) drew the tokens
            behaviour = behaviour_logprobs(samples, policy_lp.shape[1]).to(device)
            weights, tis = algo.truncated_importance_weights(old_lp, behaviour, cfg.tis_cap, policy_mask)
            metrics = {f"learner/{k}": v for k, v in tis.items()}
        loss_rl, rl_metrics = algo.ppo_clip_loss(
            policy_lp, old_lp, advantages, policy_mask, cfg.clip_eps, cfg.clip_eps_high, cfg.loss_agg, weights
        )
        loss = loss_rl
        metrics.update({"learner/loss_rl": loss_rl.item(), "learner/clip_frac": rl_metrics["clip_frac"]})
        with torch.no_grad():
            metrics["learner/entropy"] = algo.masked_mean(algo.entropy_from_logits(logits[:B]), policy_mask).item()
        if with_refined:
            index = torch.tensor(rows.refined_index, device=device)
            ce, _ = algo.refined_ce(logprobs[index], rows.ce_mask)
            metrics["learner/ce_refined"] = ce.item()
            if cfg.constraint == "dynamic":
                loss = loss + cfg.ce_coef * ce
        if self.ref_model is not None:
            policy_only = _Rows(rows.input_ids[:B], rows.attention_mask[:B], policy_mask, B, [], rows.ce_mask[:0])
            with torch.no_grad():
                ref_lp, _ = self._forward_logprobs(self.ref_model, policy_only)
            kl, _ = algo.kl_penalty(policy_lp, ref_lp, policy_mask, cfg.kl_estimator)
            metrics["learner/kl_to_ref"] = kl.item()
            if cfg.constraint == "static_kl":
                loss = loss + cfg.kl_coef * kl
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        # ZeRO 1-3 report the (pre-clip) norm after the step; stage 0 does not, so take it from the grads first.
        stage0_norm = self._grad_norm() if boundary and self.zero_stage == 0 else None
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            metrics["learner/grad_norm"] = float(norm) if norm is not None else stage0_norm
        metrics["learner/loss"] = loss.item()
        metrics["learner/trained_tokens"] = float(rows.attention_mask.sum())  # summed (not averaged) by step()
        return metrics

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)).item() if grads else 0.0

    @torch.no_grad()
    def _old_logprobs(self, samples: list[Sample]) -> torch.Tensor:
        rows = build_rows(samples, self.tokenizer.pad_token_id, with_refined=False).to(self.engine.device)
        return self._forward_logprobs(self.engine, rows)[0]

    def step(self, batch: Batch) -> dict[str, float]:
        """Train on this rank's share of one batch (a collective: every rank is called with the same batch).
        Returns the step's metrics over all ranks (each rank's mean over its micro-batches, then combined), and
        the new policy version."""
        started = time.perf_counter()
        self.engine.train()
        updates = self.config.learner.updates_per_step
        samples = rank_share(list(batch.samples), updates, self.rank, self.world_size)
        micro_batches = [samples[i : i + self.micro_batch_size] for i in range(0, len(samples), self.micro_batch_size)]
        # With several updates per step, later ones must see the ratio against the weights before the first.
        old = [None] * len(micro_batches)
        if updates > 1:
            old = [self._old_logprobs(micro) for micro in micro_batches]
        sums: dict[str, float] = {}
        grad_norms = []  # one per optimizer update, not per micro-batch
        for micro, old_logprobs in zip(micro_batches, old, strict=True):
            micro_metrics = self._micro_step(micro, old_logprobs)
            if "learner/grad_norm" in micro_metrics:
                grad_norms.append(micro_metrics.pop("learner/grad_norm"))
            for key, value in micro_metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        count = len(micro_batches)
        self.policy_version += 1
        tokens = sums.pop("learner/trained_tokens")
        metrics = {key: value / count for key, value in sums.items()}
        if grad_norms:
            metrics["learner/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["learner/lr"] = self.engine.get_lr()[0]
        metrics["learner/policy_version"] = self.policy_version
        metrics["learner/samples"] = len(samples)
        metrics["learner/staleness"] = batch.policy_version - min(s.policy_version for s in batch.samples)
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
        sums, nbytes = send_weights(self.sync_group, buckets, gathered)
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
        torch.save(torch.get_rng_state(), os.path.join(directory, f"torch_rng_rank{self.rank}.pt"))

    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored policy version."""
        path, client_state = self.engine.load_checkpoint(directory, tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag 'state') under {directory}")
        torch.set_rng_state(torch.load(os.path.join(directory, f"torch_rng_rank{self.rank}.pt")))
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
