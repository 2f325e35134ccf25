"""weight_sync without a cluster: bucket planning, and a failed broadcast that must not strand the other learner
ranks in their ZeRO-3 gathers."""

from __future__ import annotations

import pytest
import torch

from rlhf_refiner.weight_sync import ParamMeta, SyncTimeoutError, plan_buckets, send_weights

METAS = [
    ParamMeta("a", "float32", (4,)),  # 16 bytes
    ParamMeta("b", "float32", (2, 2)),  # 16 bytes
    ParamMeta("c", "float32", (6,)),  # 24 bytes
    ParamMeta("d", "bfloat16", (4,)),  # 8 bytes, another dtype
]


def test_buckets_keep_order_dtype_and_size():
    # 32-byte buckets: a and b fill one (16 + 16 = 32); c (24) would overflow it and opens the next; d's dtype
    # differs from c's, so it opens its own
    names = [[m.name for m in bucket] for bucket in plan_buckets(METAS, bucket_bytes=32)]
    assert names == [["a", "b"], ["c"], ["d"]]
    assert [[m.name for m in b] for b in plan_buckets(METAS, bucket_bytes=1)] == [["a"], ["b"], ["c"], ["d"]]


class _Group:
    """A sync group whose second broadcast times out, as when an engine dies mid-sync."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.broadcasts = 0

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        self.broadcasts += 1
        if self.broadcasts == 2:
            raise SyncTimeoutError(f"learner waited too long on {what}")


def test_a_failed_broadcast_still_runs_every_gather_then_raises():
    buckets = plan_buckets(METAS, bucket_bytes=32)
    gathered_buckets = []

    def gathered():  # under ZeRO-3 each step is a collective the other ranks are waiting in
        for bucket in buckets:
            gathered_buckets.append([m.name for m in bucket])
            yield {m.name: torch.zeros(m.shape, dtype=getattr(torch, m.dtype)) for m in bucket}

    group = _Group()
    with pytest.raises(SyncTimeoutError, match="bucket 2/3"):
        send_weights(group, buckets, gathered())
    assert group.broadcasts == 2  # nothing is sent after the failure
    assert gathered_buckets == [["a", "b"], ["c"], ["d"]]  # but every gather ran


def test_send_weights_returns_checksums_and_bytes_of_every_bucket():
    buckets = plan_buckets(METAS, bucket_bytes=32)
    tensors = {m.name: torch.arange(m.numel, dtype=getattr(torch, m.dtype)).reshape(m.shape) for m in METAS}

    class Quiet(_Group):
        def broadcast(self, tensor, what):
            self.broadcasts += 1

    sums, sent = send_weights(Quiet(), buckets, iter([{m.name: tensors[m.name] for m in b} for b in buckets]))
    assert sent == 16 + 16 + 24 + 8 and len(sums) == 3 and len(set(sums)) == 3
