"""Learner -> generator weight sync: bucketed broadcasts over a process group formed for the purpose.

Rank 0 is the learner; ranks 1.. are the vLLM workers, which join through `WeightReceiver`, a vLLM
`worker_extension_cls` mixed into the worker class. Both sides plan the same buckets from the same parameter
metadata, so only raw bytes travel; the receivers load them with vLLM's `reload_weights`. Every collective has a
deadline and its error says who waited for whom. This is the only module that knows about process groups: gloo
on CPU, NCCL between GPUs (`sync.backend`); the bucketing, checksums and version handling are the same for both.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo


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
    """A weight-sync collective missed its deadline."""


def plan_buckets(metas: list[ParamMeta], bucket_bytes: int) -> list[list[ParamMeta]]:
    """Consecutive parameters grouped into buckets of one dtype and about `bucket_bytes` each (never empty)."""
    buckets: list[list[ParamMeta]] = []
    size = 0
    for meta in metas:
        if not buckets or size + meta.nbytes > bucket_bytes or buckets[-1][0].dtype != meta.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(meta)
        size += meta.nbytes
    return buckets


def checksum(buffer: torch.Tensor) -> str:
    """SHA-256 of a flat tensor's bytes: the transport check compares the sender's and receivers' values."""
    return hashlib.sha256(buffer.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _process_group(backend: str, store, rank: int, world_size: int, timeout: datetime.timedelta):
    if backend == "gloo":
        return ProcessGroupGloo(store, rank, world_size, timeout)
    from torch._C._distributed_c10d import ProcessGroupNCCL  # CUDA builds of torch only

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ProcessGroupNCCL(store, rank, world_size, options)


class SyncGroup:
    """A process group of the learner (rank 0) and the vLLM workers, over its own TCPStore (not the default
    group, which DeepSpeed and vLLM own). NCCL buffers live on this process's current CUDA device."""

    def __init__(
        self, host: str, port: int, rank: int, world_size: int, timeout_s: float, who: str, backend: str = "gloo"
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.who = who
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        try:
            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=self.timeout)
            self.group = _process_group(backend, store, rank, world_size, self.timeout)
        except RuntimeError as e:
            raise SyncTimeoutError(
                f"weight sync: {who} (rank {rank}/{world_size}) could not form the group at {host}:{port} "
                f"within {timeout_s:.0f}s; waiting for {'the vLLM workers' if rank == 0 else 'the learner'}: {e}"
            ) from e

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        work = self.group.broadcast(tensor, 0, self.timeout)
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            peer = "the vLLM workers" if self.rank == 0 else "the learner (rank 0)"
            raise SyncTimeoutError(
                f"weight sync: {self.who} waited more than {self.timeout.total_seconds():.0f}s "
                f"for {peer} on {what}: {e}"
            ) from e


def send_weights(
    group: SyncGroup, buckets: list[list[ParamMeta]], gathered: Iterator[dict[str, torch.Tensor]]
) -> tuple[list[str], int]:
    """Broadcast every bucket from rank 0; `gathered` yields each bucket's full tensors by name in turn (under
    ZeRO-3 a gather of just those parameters, a collective of every learner rank, so at most one bucket is ever
    un-partitioned). Returns the buckets' checksums and the bytes sent. If a broadcast fails, `gathered` is still
    run to its end before the error is raised, so the other learner ranks' gathers complete instead of waiting
    for rank 0 until their own deadline."""
    sums, sent = [], 0
    try:
        for i, (bucket, tensors) in enumerate(zip(buckets, gathered, strict=True)):
            parts = [tensors[m.name].detach().reshape(-1).to(group.device, getattr(torch, m.dtype)) for m in bucket]
            flat = torch.cat(parts)
            group.broadcast(flat, f"bucket {i + 1}/{len(buckets)}")
            sums.append(checksum(flat))
            sent += flat.numel() * flat.element_size()
    except SyncTimeoutError:
        for _ in gathered:
            pass
        raise
    return sums, sent


def receive_weights(
    group: SyncGroup, buckets: list[list[ParamMeta]], verify: bool
) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Receive every bucket into fresh tensors; returns (name, tensor) pairs and, if `verify`, checksums."""
    weights: list[tuple[str, torch.Tensor]] = []
    sums = []
    for i, bucket in enumerate(buckets):
        flat = torch.empty(sum(m.numel for m in bucket), dtype=getattr(torch, bucket[0].dtype), device=group.device)
        group.broadcast(flat, f"bucket {i + 1}/{len(buckets)}")
        if verify:
            sums.append(checksum(flat))
        for meta, part in zip(bucket, flat.split([m.numel for m in bucket])):
            weights.append((meta.name, part.view(meta.shape)))
    return weights, sums


class WeightReceiver:
    """vLLM worker extension (`worker_extension_cls`): joins the sync group and loads received weights.

    Method names carry an `rlhf_` prefix because they are mixed into vLLM's worker class and must not clash
    with its own (`update_weights` is taken). Weights are loaded with `reload_weights`: vLLM on CPU repacks
    linear weights after loading, so a plain `model.load_weights` fails on the second load.
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
        rank = first_rank + getattr(self, "rank", 0)  # vLLM's worker rank: its place in the engine's TP group
        self.rlhf_sync_group = SyncGroup(
            host, port, rank, world_size, timeout_s, who=f"vLLM worker rank {rank}", backend=backend
        )
        self.rlhf_buckets = plan_buckets(
            [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in metas], bucket_bytes
        )

    def rlhf_receive_weights(self, verify: bool) -> dict:
        started = time.perf_counter()
        weights, sums = receive_weights(self.rlhf_sync_group, self.rlhf_buckets, verify)
        received = time.perf_counter()
        self.reload_weights(weights_iterator=iter(weights))
        return {
            "checksums": sums,
            "receive_seconds": received - started,
            "load_seconds": time.perf_counter() - received,
        }
