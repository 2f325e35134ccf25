"""Rewards: RewardWorker scores responses from rule, code (sandboxed unit tests), remote-HTTP and user-function
(function.py) sources; RewardModel (model.py) scores them with a reward model in its own actors; `merge` sums the
two per sample.

The reward is the weighted sum of the sources in `reward.weights`. A worker scores a shard of a step's rollouts
(`shard` of `num_shards`), so several workers split one ObjectRef without the driver touching the data. An
infrastructure failure (a sandbox that would not start, an endpoint that never answered) marks the `Reward`
`infra_error`, with the failure's message in `error`: it is counted, and the learner gives the sample no policy
gradient; it is never scored as 0. A user function that raises or returns a non-number is a bug, not an
infrastructure failure: the worker raises, naming the function and the sample.
Workers never log; they return `Reward` records that the loop aggregates.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rlhf_refiner.config import RewardConfig, TaskConfig
from rlhf_refiner.metrics import redirect_actor_output
from rlhf_refiner.records import Refinement, Reward, Rollout, shard_slice
from rlhf_refiner.reward import rules
from rlhf_refiner.reward.code_eval import CodeResult, evaluate, reward_of
from rlhf_refiner.reward.function import RewardFunction
from rlhf_refiner.reward.sandbox import STATUSES, Sandbox

WORKER_SOURCES = ("arithmetic", "code", "http", "format", "function")  # `model` runs in RewardModel actors


def shard_inputs(
    rollouts: list[Rollout], refinements: list[Refinement] | None, shard: int, num_shards: int
) -> tuple[list[Rollout], list[str], list[str]]:
    """One scorer's shard: its rollouts, the texts to score (the responses, or the refined a' when `refinements`
    is given), and their sample ids."""
    part = shard_slice(len(rollouts), shard, num_shards)
    mine = rollouts[part]
    if refinements is None:
        return mine, [r.response for r in mine], [r.sample_id for r in mine]
    refined = refinements[part]
    return mine, [f.refined for f in refined], [f.sample_id for f in refined]


def merge(parts: list[list[Reward]]) -> list[Reward]:
    """Per-sample sum of the rewards that different scorers returned for the same samples, in the same order."""
    merged = []
    for same_sample in zip(*parts):
        ids = {r.sample_id for r in same_sample}
        if len(ids) != 1:
            raise ValueError(f"reward parts out of step: {sorted(ids)}")
        accuracies = [r.accuracy for r in same_sample if r.accuracy is not None]
        isolations = [r.isolation for r in same_sample if r.isolation is not None]
        errors = [r.error for r in same_sample if r.error is not None]
        merged.append(
            Reward(
                sample_id=same_sample[0].sample_id,
                reward=sum(r.reward for r in same_sample),
                accuracy=accuracies[0] if accuracies else None,
                components={k: v for r in same_sample for k, v in r.components.items()},
                policy_version=same_sample[0].policy_version,
                infra_error=any(r.infra_error for r in same_sample),
                isolation=isolations[0] if isolations else None,
                error="; ".join(errors) if errors else None,
            )
        )
    return merged


class RewardWorker:
    def __init__(self, config: RewardConfig, task_config: TaskConfig) -> None:
        redirect_actor_output()  # metrics.actor_output=file: into the run's logs/
        self.config = config
        self.task = task_config
        self.weights = {k: w for k, w in config.weights.items() if k in WORKER_SOURCES}
        self.sandbox = None
        self.http = None
        self.function = None
        if "code" in self.weights:
            # fails closed here, at startup, without bubblewrap; as many sandboxes at once as this worker has CPUs
            self.sandbox = Sandbox(config.code, concurrency=max(1, int(config.num_cpus)))
        if "http" in self.weights:
            from rlhf_refiner.reward.model import HttpReward

            self.http = HttpReward(config.http)
        if "function" in self.weights:
            self.function = RewardFunction(config.function, config.function_source)

    def _code(self, rollouts: list[Rollout], responses: list[str]) -> list[CodeResult]:
        def one(item: tuple[Rollout, str]) -> CodeResult:
            rollout, response = item
            if rollout.prompt.tests is None:
                raise ValueError(f"sample {rollout.sample_id}: the code reward needs unit tests (a code data.source)")
            return evaluate(self.sandbox, rollout.prompt.tests, response)

        with ThreadPoolExecutor(self.sandbox.concurrency) as pool:
            return list(pool.map(one, zip(rollouts, responses)))

    def _http(self, rollouts: list[Rollout], responses: list[str]) -> list[float | str]:
        """Per sample: the endpoint's score, or the error of its batch (the last retry's) when the batch failed."""
        values: list[float | str] = []
        size = self.config.http.batch_size
        for start in range(0, len(rollouts), size):
            chunk = rollouts[start : start + size]
            scores, error = self.http.scores(
                [r.prompt.query for r in chunk], responses[start : start + size], [r.prompt.answer or "" for r in chunk]
            )
            values += scores if scores is not None else [error] * len(chunk)
        return values

    def _rewards(self, rollouts: list[Rollout], responses: list[str], ids: list[str]) -> list[Reward]:
        code = self._code(rollouts, responses) if "code" in self.weights else None
        http = self._http(rollouts, responses) if "http" in self.weights else None
        rewards = []
        for i, (rollout, response) in enumerate(zip(rollouts, responses)):
            total, accuracy, components, isolation = 0.0, None, {}, None
            function_accuracy = None  # the user's "accuracy", when it returns one, wins over a rule's
            errors: list[str] = []  # "<source>: <message>" of each source that failed for infrastructure reasons
            for source, weight in self.weights.items():
                if source == "arithmetic":
                    value, accuracy, parts = rules.arithmetic(response, rollout.prompt.answer, self.task, ids[i])
                    components.update(parts)
                elif source == "format":
                    value = rules.well_formed(response, rollout.finished)
                    components["format"] = value
                elif source == "code":
                    result = code[i]
                    failed = result.status == "infra_error"
                    if failed:
                        errors.append(f"code: {result.detail or 'infra_error'}")
                    value = 0.0 if failed else reward_of(result, self.config.code.mode)
                    accuracy, isolation = float(result.passed), result.isolation
                    components["code"] = value
                    components.update({f"code_status/{s}": float(result.status == s) for s in STATUSES})
                elif source == "function":
                    prompt = rollout.prompt
                    value, function_accuracy, parts = self.function(prompt.query, response, prompt.answer, ids[i])
                    components.update(parts)
                else:  # http
                    if isinstance(http[i], str):
                        errors.append(f"http: {http[i]}")
                    value = 0.0 if isinstance(http[i], str) else http[i]
                    components["http"] = value
                total += weight * value
            accuracy = accuracy if function_accuracy is None else function_accuracy
            error = "; ".join(errors) if errors else None
            rewards.append(
                Reward(ids[i], total, accuracy, components, rollout.policy_version, bool(errors), isolation, error)
            )
        return rewards

    def score(self, rollouts: list[Rollout], shard: int = 0, num_shards: int = 1) -> list[Reward]:
        """Rewards of this worker's shard of `rollouts`, in order."""
        return self._rewards(*shard_inputs(rollouts, None, shard, num_shards))

    def score_refined(
        self, rollouts: list[Rollout], refinements: list[Refinement], shard: int = 0, num_shards: int = 1
    ) -> list[Reward]:
        """Rewards of the refined responses a' (for `refiner/improved_frac`), this worker's shard."""
        return self._rewards(*shard_inputs(rollouts, refinements, shard, num_shards))
