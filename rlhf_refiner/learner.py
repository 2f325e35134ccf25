"""Learner: the policy under DeepSpeed. step(batch) -> metrics; source of weight syncs; checkpoints; HF export.
`learner.num_ranks` data-parallel ranks, one actor each, all given the whole batch: each trains on its shard of
every update, and the methods that touch the model are collectives the driver calls on every rank. A step is
`learner.updates_per_step` optimizer updates, each accumulated over micro-batches (their forward and loss: forward.py)
whose backward undoes DeepSpeed's averaging over accumulation steps and ranks, so an update's gradient is the same
however it is split. π0 is loaded only for a KL in the loss or its metric (with `model.lora`, it is the policy with
its adapter off, and what leaves the learner is merged: lora.py). The only module that touches DeepSpeed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from rlhf_refiner import algo, lora
from rlhf_refiner.config import DEEPSPEED_PRECISION, Config
from rlhf_refiner.forward import Forward
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
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapter only
    if offloads_optimizer(config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds its C++ op on first use (cached)

        return DeepSpeedCPUAdam(trained, lr=lr, weight_decay=decay, adamw_mode=True)
    return torch.optim.AdamW(trained, lr=lr, weight_decay=decay)


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


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """One rank's DeepSpeed config: its share of an update in micro-batches of at most `learner.micro_batch_size`,
    the gradient clip, `mixed_precision`, then `learner.deepspeed` (which config keeps off the keys set here)."""
    per_rank = config.data.prompts_per_step * config.generator.group_size // config.learner.updates_per_step
    per_rank //= world_size
    micro = min(config.learner.micro_batch_size, per_rank)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro,
        "gradient_clipping": config.learner.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        **mixed_precision(config),
        **config.learner.deepspeed,
    }


def reference_model(engine: Any, model_path: str, config: Config) -> torch.nn.Module | lora.AdapterOff | None:
    """π0 for the KL in the loss (`static_kl`) or its metric (`algo.log_kl_to_ref`), on every rank for its own rows:
    with LoRA the policy itself with the adapter off, else a frozen copy loaded from `model_path`; None if unused."""
    if not (config.algo.constraint == "static_kl" or config.algo.log_kl_to_ref):
        return None
    if config.model.lora.rank:
        return lora.AdapterOff(engine)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, config.model.dtype)).eval()
    return model.requires_grad_(False).to(engine.device)


@contextlib.contextmanager
def replacing_dir(path: str) -> Iterator[str]:
    """A temp dir to write into that then replaces `path`, keeping the previous copy until the new one is in place."""
    tmp = f"{path}.tmp"
    yield tmp
    if os.path.exists(path):
        os.rename(path, f"{path}.old")
        os.rename(tmp, path)
        shutil.rmtree(f"{path}.old")
    else:
        os.rename(tmp, path)


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
        hf_model = model
        self.lora = config.model.lora.rank > 0
        if self.lora:  # only the adapter trains; π0 is the base with the adapter off
            model = lora.with_lora(model, config.model.lora, model_path)
        ds_config = deepspeed_config(config, self.world_size)
        optimizer = make_optimizer(model, config)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_lr_schedule(optimizer, config), config=ds_config
        )  # DeepSpeed steps the schedule once per optimizer update and keeps its state in checkpoints
        self.micro_batch_size = ds_config["train_micro_batch_size_per_gpu"]
        self.zero_stage = self.engine.zero_optimization_stage()
        # ZeRO-3 releases a module's gathered parameters in the backward only after its last forward's use: several
        # forwards before one backward would hold the whole model gathered, so the policy runs one padded forward;
        # so does π0 when it is the partitioned policy (LoRA): its forwards are collectives, one per rank.
        zero3 = self.zero_stage == 3
        self.forward = Forward.for_model(
            hf_model, self.pad_id, config, self.engine.device, zero3, reference_one_pass=zero3 and self.lora
        )
        # HF name -> what it is made of (LoRA: merged): `final/`, and the sync unless it sends the adapter alone
        self.export_sources = lora.sync_sources(self.engine.module)
        adapter_sync = self.lora and config.model.lora.sync == "adapter"
        self.sync_sources = lora.adapter_sources(self.engine.module) if adapter_sync else self.export_sources
        self.ref_model = reference_model(self.engine, model_path, config)

    # ---- training -------------------------------------------------------------------------------------------
    def _micro_step(
        self, samples: list[Sample], old_logprobs: torch.Tensor | None, norm: algo.Normaliser, kl_metric: bool
    ) -> dict[str, float]:
        """Forward + backward of one micro-batch (`Forward.micro_batch_loss`), and the optimizer update at the last
        micro-batch of an update. Returns this micro-batch's shares (`SHARES`) of the update's means."""
        part = self.forward.micro_batch_loss(self.engine, self.ref_model, samples, old_logprobs, norm, kl_metric)
        # `part.loss` is this micro-batch's share of its update's loss. DeepSpeed would divide it by the accumulation
        # steps (not here: scale_wrt_gas=False) and average the gradients over ranks (undone by the factor), so
        # the update's gradient is that of Σ over micro-batches and ranks: the loss of the update taken whole.
        self.engine.backward(part.loss * self.world_size, scale_wrt_gas=False)
        metrics = part.metrics
        if part.copied_logprob is not None:  # out of the autograd graph, and after it is freed: the changed a' only
            changed_lp = self.forward.changed_refined_logprob(self.engine, samples)
            metrics["learner/ce_refined"] = -(part.copied_logprob + changed_lp) / max(norm.refined_tokens, 1.0)
        boundary = self.engine.is_gradient_accumulation_boundary()
        # ZeRO 1-3 report the (pre-clip) norm after the step; stage 0 does not, so take it from the grads first.
        stage0_norm = self._grad_norm() if boundary and self.zero_stage == 0 else None
        self.engine.step()
        if boundary:
            norm_value = self.engine.get_global_grad_norm()
            metrics["learner/grad_norm"] = float(norm_value) if norm_value is not None else stage0_norm
        metrics["learner/loss"] = part.loss.item()
        metrics["learner/trained_tokens"] = part.trained_tokens  # summed (not averaged) by step()
        return metrics

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)).item() if grads else 0.0

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
            old = [self.forward.response_logprobs(self.engine, micro) for micro in micro_batches]
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
    def _full_params(self, names: list[str], sources: dict[str, lora.SyncSource]) -> Iterator[dict[str, torch.Tensor]]:
        """The full (un-partitioned) tensors `names` of `sources` (with LoRA: each adapted weight merged with its
        adapter, or the adapter's own); under ZeRO-3 just the parameters they are made of are all-gathered, for the
        block."""
        params = dict(self.engine.module.named_parameters())
        sources = {name: sources[name] for name in names}
        with self._gathered([params[part] for source in sources.values() for part in source.parts]):
            yield {name: source.tensor(params) for name, source in sources.items()}

    def _gathered(self, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def weight_metas(self, sources: dict[str, lora.SyncSource] | None = None) -> list[ParamMeta]:
        """Full shapes of what the sync sends (default; `sources`: of those), without gathering (ZeRO-3 keeps them
        as `ds_shape`)."""
        params = dict(self.engine.module.named_parameters())
        bases = {name: params[source.base] for name, source in (sources or self.sync_sources).items()}
        return [
            ParamMeta(name, str(p.dtype).removeprefix("torch."), tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in bases.items()
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
        gathered = self._gathered_buckets(buckets, self.sync_sources)
        if self.rank != 0:
            for _ in gathered:  # take part in rank 0's gathers
                pass
            return {}
        assert self.sync_group is not None, "init_weight_sync was not called on learner rank 0"
        sums, nbytes = send_weights(self.sync_group, buckets, gathered, verify=self.config.sync.verify)
        return {"checksums": sums, "bytes": nbytes, "seconds": time.perf_counter() - started, "buckets": len(buckets)}

    def _gathered_buckets(
        self, buckets: list[list[ParamMeta]], sources: dict[str, lora.SyncSource]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Each bucket's full tensors in turn (gathered under ZeRO-3), in the order rank 0 sends them."""
        for bucket in buckets:
            with self._full_params([m.name for m in bucket], sources) as tensors:
                yield tensors

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        """Weights, optimizer, RNG and policy version, as a DeepSpeed checkpoint in `directory` (the driver commits
        the checkpoint atomically once every part is written). Every rank writes its ZeRO partition and its RNG."""
        # LoRA: the frozen base is the model's own files, so a checkpoint holds the adapter and its optimizer state
        state = {"policy_version": self.policy_version}
        self.engine.save_checkpoint(directory, tag="state", client_state=state, exclude_frozen_parameters=self.lora)
        torch.save(rng_state(), os.path.join(directory, f"torch_rng_rank{self.rank}.pt"))

    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored policy version. The learning rate and weight
        decay are this config's from the next update on: the checkpoint's optimizer and schedule hold the saved
        ones, which would silently undo a change that `trainer.allow_config_change` let through and recorded.
        (On a plain resume they are the same numbers, computed as the schedule computes them: bitwise.)"""
        path, client_state = self.engine.load_checkpoint(directory, tag="state", load_module_strict=not self.lora)
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
        buckets = plan_buckets(self.weight_metas(self.export_sources), bucket_bytes)
        state = {}
        for tensors in self._gathered_buckets(buckets, self.export_sources):
            if self.rank == 0:
                state.update({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()})
        adapter = {}
        if self.lora:  # small: gathered at once
            params = dict(self.engine.module.named_parameters())
            names = lora.adapter_names(self.engine.module)
            with self._gathered([params[name] for name in names]):
                adapter = {name: params[name].data.detach().to("cpu", copy=True) for name in names}
        if self.rank != 0:
            return None
        with replacing_dir(path) as tmp:
            model = self.engine.module.get_base_model() if self.lora else self.engine.module
            model.save_pretrained(tmp, state_dict=state)  # LoRA: merged, under the base model's names
            self.tokenizer.save_pretrained(tmp)
            if self.lora:
                self.engine.module.save_pretrained(os.path.join(tmp, "adapter"), state_dict=adapter)
        return path
