"""Typed records that cross actor boundaries, in pipeline order: Prompt -> Rollout -> Refinement -> Reward
(-> Collected, a rollout round) -> Sample -> Batch.

Every record is a frozen dataclass that names its producer and consumer and carries `policy_version`, the
learner step whose weights produced the data, so staleness is always a visible number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple


def shard_slice(total: int, shard: int, num_shards: int) -> slice:
    """Contiguous, near-equal shard `shard` of `total` items; the shards tile [0, total) exactly, in order. How a
    fanned-out stage (engines, reward workers, learner ranks) splits a list of records."""
    return slice(total * shard // num_shards, total * (shard + 1) // num_shards)


@dataclass(frozen=True)
class CodeTests:
    """data -> RewardWorker: the unit tests of one code problem, in one of the three real formats."""

    kind: Literal["stdio", "call", "assert"]  # APPS stdin/stdout, APPS call-based (fn_name), HumanEval/MBPP asserts
    cases_json: str  # JSON list: stdio [{"input","output"}], call [{"input": args, "output"}], assert [{"code"}]
    fn_name: str | None = None  # call-based: the function (or `Solution` method) under test
    program_prefix: str = ""  # HumanEval: the prompt that the completion continues
    setup: str = ""  # MBPP test_setup_code, run before each test


@dataclass(frozen=True)
class Prompt:
    """data.PromptSource -> Generator: one query, already rendered with the policy's chat template."""

    prompt_id: int
    query: str  # the task text (user turn content), as the refiner template sees it
    prompt_token_ids: tuple[int, ...]  # chat-templated query, ending with the assistant header
    answer: str | None  # ground truth for `task/accuracy`, when the task has one
    policy_version: int
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns, for reward models' own chat templates
    tests: CodeTests | None = None  # unit tests, for the code reward


@dataclass(frozen=True)
class Rollout:
    """Generator -> Refiner, RewardWorker, Buffer: one sampled response to one prompt."""

    sample_id: str  # "<step>-<prompt_id>-<index in group>": unique across the run
    prompt: Prompt
    response: str
    response_token_ids: tuple[int, ...]
    # behaviour log-probs from the engine, one per response token; () unless generator.logprobs or algo.tis_cap
    response_logprobs: tuple[float, ...]
    finished: bool  # ended on a stop token rather than on max_new_tokens
    policy_version: int


@dataclass(frozen=True)
class Refinement:
    """Refiner -> Buffer (via loop): π0's minimally corrected response a' for one rollout."""

    sample_id: str
    refined: str
    refined_token_ids: tuple[int, ...]  # ends on a stop id where a did or π0 wrote the end; never past a's truncation
    unchanged: bool  # π0 kept a: a' == a token for token (never a fallback)
    edit_distance: int  # token-level Levenshtein distance between a and a' (end tokens aside)
    fallback: bool  # refiner output unusable (empty, truncated, unparsable): a' = a as a placeholder, given no CE
    policy_version: int  # version of the rollout it refines (π0 itself never changes)


@dataclass(frozen=True)
class Reward:
    """RewardWorker -> loop: the optimised reward of one response, and the true task score beside it."""

    sample_id: str
    reward: float
    accuracy: float | None  # exact task success (1/0) where the task has ground truth
    components: dict[str, float] = field(default_factory=dict)  # per-source parts, e.g. {"digits": .6}
    policy_version: int = 0
    infra_error: bool = False  # a source failed for infrastructure reasons: `reward` is not a score, never train on it
    isolation: str | None = None  # code reward: the sandbox's isolation level
    error: str | None = None  # with `infra_error`: what failed, "<source>: <message>" ("; " between sources)


class Collected(NamedTuple):
    """rollout stage -> loop (and, async, a checkpoint): the step's rollouts, their refinements (None without the
    refiner) and rewards, in the same order, and the round's metrics. A tuple, so the loop unpacks it; each
    rollout carries its own `policy_version`."""

    rollouts: list[Rollout]
    refinements: list[Refinement] | None
    rewards: list[Reward]
    metrics: dict[str, float]


@dataclass(frozen=True)
class Sample:
    """loop -> Buffer -> Learner: a scored (query, response, refined) triple with its group advantage."""

    rollout: Rollout
    refinement: Refinement | None  # None when the constraint does not use the refiner
    reward: Reward
    advantage: float
    policy_version: int

    @property
    def sample_id(self) -> str:
        return self.rollout.sample_id


@dataclass(frozen=True)
class Batch:
    """Buffer -> Learner: the samples of one training step and the learner version they are trained at."""

    samples: tuple[Sample, ...]
    policy_version: int  # learner version the batch is consumed at
    dropped_stale: int  # samples dropped by the staleness bound while forming this batch
