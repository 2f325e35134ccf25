"""RewardWorker: scores responses. Here the embedded task's rule reward; rewards never leave as bare floats.

A worker scores a shard of a step's rollouts (`shard` of `num_shards`), so several workers split one ObjectRef
without the driver touching the data. It never logs; it returns `Reward` records the loop aggregates.
"""

from __future__ import annotations

from rlhf_refiner import task
from rlhf_refiner.config import TaskConfig
from rlhf_refiner.records import Refinement, Reward, Rollout


def shard_slice(total: int, shard: int, num_shards: int) -> slice:
    """Contiguous, near-equal shard `shard` of `total` items; the shards tile [0, total) exactly."""
    return slice(total * shard // num_shards, total * (shard + 1) // num_shards)


class RewardWorker:
    def __init__(self, task_config: TaskConfig) -> None:
        self.task = task_config

    def _score(self, sample_id: str, text: str, answer: str | None, policy_version: int) -> Reward:
        if answer is None:
            raise ValueError(f"sample {sample_id}: the arithmetic reward needs a ground-truth answer")
        s = task.score(text, answer, self.task.verbosity_bonus, self.task.verbosity_bonus_cap)
        return Reward(
            sample_id=sample_id,
            reward=s.reward,
            accuracy=s.accuracy,
            components={"digits": s.digit_credit, "verbosity": s.verbosity_bonus},
            policy_version=policy_version,
        )

    def score(self, rollouts: list[Rollout], shard: int = 0, num_shards: int = 1) -> list[Reward]:
        """Rewards of this worker's shard of `rollouts`, in order."""
        mine = rollouts[shard_slice(len(rollouts), shard, num_shards)]
        return [self._score(r.sample_id, r.response, r.prompt.answer, r.policy_version) for r in mine]

    def score_refined(
        self, rollouts: list[Rollout], refinements: list[Refinement], shard: int = 0, num_shards: int = 1
    ) -> list[Reward]:
        """Rewards of the refined responses a' (for `refiner/improved_frac`), this worker's shard."""
        part = shard_slice(len(rollouts), shard, num_shards)
        return [
            self._score(f.sample_id, f.refined, r.prompt.answer, r.policy_version)
            for r, f in zip(rollouts[part], refinements[part])
        ]
