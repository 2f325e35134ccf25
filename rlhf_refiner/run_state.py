"""The actors' part of a checkpoint (driver side), in `checkpoint.py`'s layout: each learner rank's ZeRO partition,
the buffer, the data position, the sampling seeds and (async) the rollouts already made for the next step, saved
into one atomically committed checkpoint; and the same loaded back on resume. The loop saves only after a step's
sync, so a checkpoint never splits a rollout from its weights, and gives the generator the restored weights itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_refiner import checkpoint
from rlhf_refiner.config import Config
from rlhf_refiner.records import Collected
from rlhf_refiner.remote import wait

if TYPE_CHECKING:
    from rlhf_refiner.data import PromptSource
    from rlhf_refiner.placement import Actors


def save(
    actors: Actors,
    source: PromptSource,
    step: int,
    version: int,
    wandb_id: str | None,
    ahead: Collected | None,
    config: Config,
) -> Path:
    """Learner state (DeepSpeed), buffer, data position, seeds, and (async) the next step's finished rollouts
    into one atomically committed checkpoint."""
    output_dir = Path(config.trainer.output_dir)
    tmp = checkpoint.staging_dir(output_dir, step)
    deadline = config.ray.call_timeout_s
    learner_dir = str((tmp / "learner").resolve())
    saves = [learner.save_checkpoint.remote(learner_dir) for learner in actors.learners]  # each its ZeRO partition
    *_, buffer_state = wait(
        [*saves, actors.buffer.state_dict.remote()],
        "checkpoint (learner-*, buffer)",
        deadline,
    )
    state = {
        "step": step,
        "policy_version": version,
        "learner_ranks": len(actors.learners),  # ZeRO partitions: a resume needs the same learner.num_ranks
        "data": source.state_dict(),
        # Sampling is seeded per request from (seed, step, index), and the driver's draws from the step, so
        # these seeds and the step are the RNG state of every actor that samples.
        "seeds": {
            "trainer": config.trainer.seed,
            "generator": config.generator.sampling.seed,
            "data": config.data.seed,
        },
        "wandb_id": wandb_id,
        "config": checkpoint.saved_config(config),  # what a resume compares its own config with
    }
    driver_state = {"buffer": buffer_state, "rollouts_ahead": ahead}
    return checkpoint.commit(tmp, state, driver_state, config.trainer.keep_checkpoints)


def restore(
    actors: Actors, source: PromptSource, directory: Path, state: dict[str, Any], config: Config
) -> tuple[int, Collected | None]:
    """Load the learner, buffer and data position. Returns the policy version (the generator does not hold it
    yet: the caller syncs) and (async) the rollouts made ahead for the next step."""
    deadline = config.ray.call_timeout_s
    ranks = state.get("learner_ranks", 1)
    if ranks != len(actors.learners):
        raise ValueError(
            f"{directory} was written by {ranks} learner ranks and its ZeRO partitions need as many: resume with "
            f"learner.num_ranks={ranks} (not {len(actors.learners)}), or trainer.resume=none"
        )
    driver_state = checkpoint.load_buffer(directory)
    learner_dir = str((directory / "learner").resolve())
    *versions, _ = wait(
        [
            *(learner.load_checkpoint.remote(learner_dir) for learner in actors.learners),
            actors.buffer.load_state_dict.remote(driver_state["buffer"]),
        ],
        f"restore {directory.name} (learner-*, buffer)",
        deadline,
    )
    if set(versions) != {state["policy_version"]}:
        raise checkpoint.CorruptCheckpointError(
            f"{directory}: learner versions {versions} != {state['policy_version']}"
        )
    source.load_state_dict(state["data"])
    return versions[0], driver_state["rollouts_ahead"]
