"""Learner -> generator weight sync: bucketed broadcasts over a process group formed for the purpose.

Rank 0 is the learner; ranks 1.. are the vLLM workers, which join through `WeightReceiver`, a vLLM
`worker_extension_cls`. Both sides plan the same buckets (whole decoder layers) from the same parameter metadata, so
only raw bytes travel, and a worker loads each bucket before it receives the next: its extra memory is one bucket.
Every collective has a deadline and its error says who waited for whom; a group that missed one is closed, never
reused. The only module that knows about process groups: gloo on CPU, NCCL between GPUs (`sync.backend`)."""

from __future__ import annotations

import datetime
import hashlib
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend, ProcessGroupGloo


@dataclass(frozen=True)
class ParamMeta:
    """One parameter's name (HF checkpoint naming), dtype and shape; both sides plan buckets from these."""

    name: str
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


class SyncTimeoutError(TimeoutError):
    """A weight-sync collective missed its deadline, or was asked of a group that had."""


def decoder_layer(name: str) -> str:
    """The decoder layer a parameter belongs to, by its first numeric name part ("model.layers.3" for
    "model.layers.3.mlp.up_proj.weight"); outside the layer stack (embeddings, final norm, LM head), the
    parameter itself."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def plan_buckets(metas: list[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Consecutive parameters grouped into buckets of one dtype and about `bucket_bytes` each (never empty), cut
    only between decoder layers. vLLM fuses a layer's projections (q/k/v into qkv_proj, gate/up into gate_up_proj)
    and processes each fused module once all of its parts have arrived, holding the parts until then: a layer cut
    in two would keep the whole first bucket alive while the second is received. A layer larger than
    `bucket_bytes` is a bucket of its own."""
    units: list[list[ParamMeta]] = []  # runs of one decoder layer and one dtype: never split
    for meta in metas:
        last = units[-1][-1] if units else None
        if last is not None and decoder_layer(last.name) == decoder_layer(meta.name) and last.dtype == meta.dtype:
            units[-1].append(meta)
        else:
            units.append([meta])
    buckets: list[list[ParamMeta]] = []
    size = 0
    for unit in units:
        unit_bytes = sum(m.nbytes for m in unit)
        if not buckets or size + unit_bytes > bucket_bytes or buckets[-1][0].dtype != unit[0].dtype:
            buckets.append([])
            size = 0
        buckets[-1].extend(unit)
        size += unit_bytes
    return buckets


def checksum(buffer: torch.Tensor) -> str:
    """SHA-256 of a flat tensor's bytes: the transport check compares the sender's and receivers' values."""
    return hashlib.sha256(buffer.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _process_group(backend: str, store, rank: int, world_size: int, timeout: datetime.timedelta) -> Backend:
    if backend == "gloo":
        return ProcessGroupGloo(store, rank, world_size, timeout)
    from torch._C._distributed_c10d import ProcessGroupNCCL  # CUDA builds of torch only

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ProcessGroupNCCL(store, rank, world_size, options)


class SyncGroup:
    """A process group of the learner (rank 0) and the vLLM workers, over its own TCPStore (not the default
    group, which DeepSpeed and vLLM own). NCCL buffers live on this process's current CUDA device.

    A broadcast that misses its deadline closes the group: later broadcasts raise at once, naming the failure,
    rather than pair with whatever a peer sends next, and peers still in that broadcast fail now (gloo) rather
    than at their own deadline. The loop's Recovery re-forms the group on a new port (`init_weight_sync` on every
    member, each closing the group it had). On gloo, the CPU tests' backend, that is the whole story. On NCCL the
    timed-out `wait` also aborts the collective's communicator and raises here, but torch's NCCL watchdog sees the
    failed collective too and, under torch's default `TORCH_NCCL_ASYNC_ERROR_HANDLING=3`, ends the process after
    its debug-dump grace period (about a minute); `close()` does not stop it. So on NCCL a sync timeout kills the
    vLLM worker (its engine dies and Recovery recreates it) or the learner (the run ends; resume from the newest
    checkpoint). With `TORCH_NCCL_ASYNC_ERROR_HANDLING=2` the watchdog only aborts the communicators, and the
    processes live on to re-form the group as on gloo. This is read from torch's ProcessGroupNCCL source; the NCCL
    path has never run (no multi-GPU machine so far).
    """

    def __init__(
        self, host: str, port: int, rank: int, world_size: int, timeout_s: float, who: str, backend: str = "gloo"
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.who = who
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.failure: str | None = None  # why this group may no longer be used
        try:
            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=self.timeout)
            self.group: Backend | None = _process_group(backend, store, rank, world_size, self.timeout)
        except RuntimeError as e:
            raise SyncTimeoutError(
                f"weight sync: {who} (rank {rank}/{world_size}) could not form the group at {host}:{port} "
                f"within {timeout_s:.0f}s; waiting for {self._peer()}: {e}"
            ) from e

    def _peer(self) -> str:
        return "the vLLM workers" if self.rank == 0 else "the learner (rank 0)"

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        if self.failure is not None or self.group is None:
            raise SyncTimeoutError(
                f"weight sync: {self.who} cannot broadcast {what}: this group {self.failure or 'was closed'}; "
                "form a new one (init_weight_sync) first"
            )
        work = self.group.broadcast(tensor, 0, self.timeout)
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            self.failure = f"timed out on {what} and was closed"
            self.close()  # peers still waiting in this broadcast fail now, not at their own deadline (gloo)
            raise SyncTimeoutError(
                f"weight sync: {self.who} waited more than {self.timeout.total_seconds():.0f}s "
                f"for {self._peer()} on {what}: {e}"
            ) from e

    def close(self) -> None:
        """Abort the process group: its connections (gloo) or communicators (NCCL) are torn down without waiting
        for collectives in flight, which a failed or abandoned group may have. Idempotent; later broadcasts raise."""
        group, self.group = self.group, None
        if group is not None:
            group.abort()


def send_weights(
    group: SyncGroup,
    buckets: list[list[ParamMeta]],
    gathered: Iterator[dict[str, torch.Tensor]],
    verify: bool = False,
) -> tuple[list[str], int]:
    """Broadcast every bucket from rank 0; `gathered` yields each bucket's full tensors by name in turn (under
    ZeRO-3 a gather of just those parameters, a collective of every learner rank, so at most one bucket is ever
    un-partitioned). Returns the buckets' checksums (only if `verify`: each is a device -> host copy and a hash of
    the bucket) and the bytes sent. If a broadcast fails, `gathered` is still run to its end before the error is
    raised, so the other learner ranks' gathers complete instead of waiting for rank 0 until their own deadline."""
    sums, sent = [], 0
    try:
        for i, (bucket, tensors) in enumerate(zip(buckets, gathered, strict=True)):
            parts = [tensors[m.name].detach().reshape(-1).to(group.device, getattr(torch, m.dtype)) for m in bucket]
            flat = torch.cat(parts)
            group.broadcast(flat, f"bucket {i + 1}/{len(buckets)}")
            if verify:
                sums.append(checksum(flat))
            sent += flat.numel() * flat.element_size()
    except SyncTimeoutError:
        for _ in gathered:
            pass
        raise
    return sums, sent


def receive_weights(
    group: SyncGroup,
    buckets: list[list[ParamMeta]],
    verify: bool,
    load: Callable[[list[tuple[str, torch.Tensor]]], object],
) -> dict:
    """Receive the buckets in turn, handing each to `load` as (name, tensor) pairs and dropping it before the next
    arrives, so a loader that keeps nothing holds one bucket. Returns the checksums (only if `verify`), the seconds
    spent receiving and loading, and `peak_buffered_bytes`: the most received bytes still alive (held by anyone,
    the loader included) when a bucket arrived, measured through weak references to the buckets' storages rather
    than assumed. If `load` fails, the remaining buckets are still received (and dropped) before its error is
    raised, so the learner and the other workers finish the broadcasts instead of waiting out their deadline, and
    the group stays usable."""
    sums: list[str] = []
    received: list[tuple[weakref.ref, int]] = []  # each bucket's storage and bytes: freed once the ref is dead
    peak = 0
    receive_seconds = load_seconds = 0.0
    load_error: Exception | None = None
    for i, bucket in enumerate(buckets):
        started = time.perf_counter()
        flat = torch.empty(sum(m.numel for m in bucket), dtype=getattr(torch, bucket[0].dtype), device=group.device)
        group.broadcast(flat, f"bucket {i + 1}/{len(buckets)}")
        received.append((weakref.ref(flat.untyped_storage()), flat.numel() * flat.element_size()))
        peak = max(peak, sum(nbytes for storage, nbytes in received if storage() is not None))
        if verify:
            sums.append(checksum(flat))
        pairs = [(m.name, part.view(m.shape)) for m, part in zip(bucket, flat.split([m.numel for m in bucket]))]
        del flat  # from here on only `pairs`, and whatever the loader keeps of them, hold this bucket
        loading = time.perf_counter()
        receive_seconds += loading - started
        if load_error is None:
            try:
                load(pairs)
            except Exception as e:  # keep up with the broadcasts; raised once they are done
                load_error = e
        del pairs
        load_seconds += time.perf_counter() - loading
    if load_error is not None:
        raise load_error
    return {
        "checksums": sums,
        "receive_seconds": receive_seconds,
        "load_seconds": load_seconds,
        "peak_buffered_bytes": peak,
        "largest_bucket_bytes": max(sum(m.nbytes for m in bucket) for bucket in buckets),
    }


def refresh_tied_head(model: torch.nn.Module) -> None:
    """Process a tied LM head again after a reload. It shares the input embedding's parameter, which the reload
    filled, but receives no weights of its own (the checkpoint and the learner name the tensor once), so vLLM's
    layerwise reload never processes it; on CPU that processing is where the head's weight is packed for the GEMM
    kernels (`cpu_linear`), which would go on computing logits from the old weights. On GPU it is a no-op: the head
    reads the shared parameter itself. (This is what `scripts/prepare_smollm2.py` used to untie a copy for.)"""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or not any(m is not head and getattr(m, "weight", None) is weight for m in model.modules()):
        return
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


class WeightReceiver:
    """vLLM worker extension (`worker_extension_cls`): joins the sync group and loads received weights.

    Method names carry an `rlhf_` prefix because they are mixed into vLLM's worker class and must not clash
    with its own (`update_weights` is taken). Weights are loaded through vLLM's layerwise reload, the API its own
    weight-transfer engines use (`vllm/distributed/weight_transfer`): start it, hand the model's `load_weights`
    one bucket at a time, finish it. It is what `reload_weights` does around a single `load_weights` call: it
    restores each layer from its checkpoint format and reprocesses it (vLLM on CPU repacks linear weights) once
    all of its parts have arrived, which a plain `model.load_weights` would not, failing on the second load. One
    call per bucket rather than one `reload_weights` over a lazy iterator: vLLM's loader consumes that lazily too,
    but each generator in its chain, like any `for` loop, still references the previous tensor while it asks for
    the next, so two buckets would be alive at each arrival.
    """

    def rlhf_init_sync(
        self,
        host: str,
        port: int,
        first_rank: int,
        world_size: int,
        timeout_s: float,
        metas: list[tuple[str, str, list[int]]],  # plain values: collective_rpc turns dataclasses into dicts
        bucket_bytes: int,
        backend: str = "gloo",
    ) -> None:
        """Join a new group as rank `first_rank` + this worker's TP rank; a group this worker joined before (the
        loop re-forms the group after an engine died) is aborted first, not left to time out on its own."""
        old: SyncGroup | None = getattr(self, "rlhf_sync_group", None)
        if old is not None:
            old.close()
        rank = first_rank + getattr(self, "rank", 0)  # vLLM's worker rank: its place in the engine's TP group
        self.rlhf_sync_group = SyncGroup(
            host, port, rank, world_size, timeout_s, who=f"vLLM worker rank {rank}", backend=backend
        )
        self.rlhf_buckets = plan_buckets(
            [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in metas], bucket_bytes
        )

    def rlhf_receive_weights(self, verify: bool) -> dict:
        """Receive and load every bucket (see `receive_weights`). The reload is finished even when a bucket fails,
        so that no layer stays on the meta device; but vLLM materialises a partly loaded module with uninitialised
        memory, so after a failed sync the engine's weights are unusable until a complete one: the failure raises,
        and the loop re-syncs the engine (Recovery) or ends the run. On GPU the allocator's cached blocks are
        returned afterwards (the layerwise reload builds each module anew), so a colocated learner gets them."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        runner = self.model_runner
        model = runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
            try:
                result = receive_weights(self.rlhf_sync_group, self.rlhf_buckets, verify, model.load_weights)
            finally:
                finalize_layerwise_reload(model, runner.model_config)
                refresh_tied_head(model)
        # what `reload_weights` resets after new weights: state derived from the old ones
        runner.reset_lora_state()
        runner.reset_encoder_cache()
        runner.reset_mm_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result

    # ---- LoRA: the adapter alone (`model.lora.sync: adapter`) -----------------------------------------------------
    def rlhf_lora_modules(self) -> list[str]:
        """The linear layers (HF names' last component) this engine can hold an adapter on: vLLM's LoRA-capable
        modules, each fused one (qkv_proj, gate_up_proj) as the parts a peft adapter names (q_proj, ...)."""
        manager = self.model_runner.lora_manager._adapter_manager
        packed = manager.packed_modules_mapping
        return sorted({part for module in manager.supported_lora_modules for part in packed.get(module, [module])})

    def rlhf_receive_adapter(self, verify: bool, adapter_id: int, peft_config: dict) -> dict:
        """Receive the adapter's tensors (see `receive_weights`) and make them this worker's only adapter, as id
        `adapter_id`. They become the LoRA model vLLM's own loader builds from a peft directory
        (`LoRAModel.from_lora_tensors`, under the model's name mapping), added to the worker's adapter manager
        directly: no file, and each TP worker slices its share when the adapter is activated. The adapter it held
        is dropped only once the new one is built and added beside it (the engine has two registered slots, one
        active), so a failed sync leaves the old version whole (the generator keeps reporting it) and never a
        half-loaded one; only a re-sync of the same version replaces it in place. The base is never touched."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        tensors: dict[str, torch.Tensor] = {}
        result = receive_weights(self.rlhf_sync_group, self.rlhf_buckets, verify, tensors.update)
        workers = self.model_runner.lora_manager  # vLLM's WorkerLoRAManager; its `_adapter_manager` holds the slots
        manager = workers._adapter_manager
        helper = PEFTHelper.from_dict({**peft_config, "vllm_max_position_embeddings": workers.max_position_embeddings})
        helper.validate_legal(workers.lora_config)  # the rank against the engine's max_lora_rank
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        adapter = LoRAModel.from_lora_tensors(
            adapter_id,
            tensors,
            helper,
            device="cpu",  # as vLLM's loader: the manager copies it into the slot on the device when it activates
            dtype=workers.lora_config.lora_dtype,
            model_vocab_size=workers.vocab_size,
            weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
            skip_prefixes=getattr(manager.model, "lora_skip_prefixes", None),
        )
        held = set(manager.list_adapters())
        if adapter_id in held:  # the same version again (a re-sync after an engine was recreated): in place
            manager.remove_adapter(adapter_id)
        manager.add_adapter(adapter)
        for old in held - {adapter_id}:
            manager.remove_adapter(old)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
