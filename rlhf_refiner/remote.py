"""Remote calls with deadlines, for every driver stage: `wait` is `ray.get` whose timeout names the stage that
missed it, and `gather_stage` collects a fanned-out stage's (records, metrics) pairs in call order.

It sits below everything that waits on actors (placement's start-up, the rollout round, evaluation, the run
state, the loop's learn and sync), so each waits on its own calls here instead of reaching into another stage's
module. Nothing here knows which actors exist.
"""

from __future__ import annotations

from typing import Any

import ray

from rlhf_refiner.metrics import merge_calls


class StageTimeoutError(TimeoutError):
    """A stage's remote call missed its deadline; the message names the stage and actor."""


def wait(refs: list[Any], stage: str, timeout_s: float) -> list[Any]:
    """`ray.get` with a deadline whose error names the stage."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise StageTimeoutError(f"stage '{stage}' did not answer within {timeout_s:.0f}s") from None


def flat(parts: list[list[Any]]) -> list[Any]:
    return [item for part in parts for item in part]


def gather_stage(
    calls: list[list[Any]], names: list[str], stage: str, time_key: str, deadline: float
) -> tuple[list[Any], dict[str, float]]:
    """Wait for a fanned-out stage's calls, each returning (records, metrics) as two ObjectRefs and made on the
    actor `names[i]`: the records of all calls in call order, and their metrics merged (`metrics.merge_calls`)."""
    parts = wait(flat(calls), stage, deadline)
    records, metrics = parts[0::2], parts[1::2]
    return flat(records), merge_calls([(n, len(r), m) for n, r, m in zip(names, records, metrics)], time_key)
