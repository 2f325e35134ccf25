"""Streaming buffer between scoring and learning: FIFO of scored samples with a staleness bound.

Invariant: a sample taken at learner version v has `v - sample.policy_version <= max_staleness`; older ones
are dropped and counted, never silently used. `state_dict` holds everything needed to resume exactly.
"""

from __future__ import annotations

from collections import deque

from rlhf_refiner.metrics import redirect_actor_output
from rlhf_refiner.records import Batch, Sample


class Buffer:
    def __init__(self, max_staleness: int, capacity: int) -> None:
        redirect_actor_output()  # metrics.actor_output=file: into the run's logs/
        self.max_staleness = max_staleness
        self.capacity = capacity
        self.samples: deque[Sample] = deque()
        self.dropped_stale = 0
        self.dropped_capacity = 0

    def add(self, samples: list[Sample]) -> int:
        """Append samples (oldest evicted beyond capacity); returns the buffer size."""
        self.samples.extend(samples)
        while len(self.samples) > self.capacity:
            self.samples.popleft()
            self.dropped_capacity += 1
        return len(self.samples)

    def take(self, n: int, learner_version: int) -> Batch:
        """The `n` oldest fresh-enough samples for the learner at `learner_version`."""
        dropped = 0
        taken: list[Sample] = []
        while self.samples and len(taken) < n:
            sample = self.samples.popleft()
            if learner_version - sample.policy_version > self.max_staleness:
                dropped += 1
                continue
            taken.append(sample)
        # Stale samples stay dropped (and counted) even when the take fails: the learner's version only grows, so
        # they could never be taken again. The usable ones go back, in order.
        self.dropped_stale += dropped
        if len(taken) < n:
            self.samples.extendleft(reversed(taken))
            raise ValueError(f"buffer holds {len(taken)} usable samples, {n} requested (dropped {dropped} stale)")
        return Batch(samples=tuple(taken), policy_version=learner_version, dropped_stale=dropped)

    def metrics(self) -> dict[str, float]:
        return {
            "buffer/size": len(self.samples),
            "buffer/dropped_stale_total": self.dropped_stale,
            "buffer/dropped_capacity_total": self.dropped_capacity,
        }

    def state_dict(self) -> dict:
        return {
            "samples": list(self.samples),
            "dropped_stale": self.dropped_stale,
            "dropped_capacity": self.dropped_capacity,
        }

    def load_state_dict(self, state: dict) -> None:
        self.samples = deque(state["samples"])
        self.dropped_stale = state["dropped_stale"]
        self.dropped_capacity = state["dropped_capacity"]
