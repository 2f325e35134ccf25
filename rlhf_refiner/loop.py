"""The driver: build the actors, then per step generate -> refine -> score -> buffer -> learn -> sync -> log.

What overlaps with what, with policy versions. Synchronous (`trainer.async_steps=0`): at step k the generator
holds version k-1; refinement and scoring of the step's rollouts run concurrently (both read the rollouts'
ObjectRef); the learner then trains on them and becomes version k; the broadcast makes the generator version k
before step k+1 generates. Nothing overlaps with learning. Async (`async_steps=1`): while the learner turns
version k-1 into k on step k's batch, a driver thread makes step k+1's rollouts with the generator still at
k-1; they finish before the broadcast makes it version k, and step k+1 trains on them at staleness 1 (TIS
corrects, `algo.tis_cap`). A checkpoint follows the step's sync, so it never splits a rollout from its weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import ray

from rlhf_refiner import checkpoint, placement
from rlhf_refiner.config import Config
from rlhf_refiner.data import PromptSource
from rlhf_refiner.generator import check_reloadable
from rlhf_refiner.metrics import MetricsLogger, merge_calls, truncate_after
from rlhf_refiner.records import Prompt, Refinement, Reward, Rollout, Sample, shard_slice
from rlhf_refiner.reward import merge

SUMMARY_KEYS = ("reward/mean", "task/accuracy", "task/degenerate_rate", "learner/kl_to_ref", "learner/ce_refined")


class StageTimeoutError(TimeoutError):
    """A stage's remote call missed its deadline; the message names the stage and actor."""


def wait(refs: list[Any], stage: str, timeout_s: float) -> list[Any]:
    """`ray.get` with a deadline whose error names the stage."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise StageTimeoutError(f"stage '{stage}' did not answer within {timeout_s:.0f}s") from None


def check_output_dir(config: Config) -> Path:
    """Refuse a non-empty output dir unless `trainer.overwrite`; nothing is written here."""
    out = Path(config.trainer.output_dir)
    if out.exists() and any(out.iterdir()) and not config.trainer.overwrite:
        raise FileExistsError(
            f"trainer.output_dir '{out}' exists and is not empty; choose another or set trainer.overwrite=true"
        )
    return out


def prepare_output_dir(out: Path, resume_step: int | None) -> Path:
    """A fresh run starts its logs afresh (overwrite=true); a resumed one keeps them up to its checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        truncate_after(out, resume_step)
        return out
    for name in ("metrics.jsonl", "samples.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)
    if checkpoint.root(out).exists():  # never let a later `resume=auto` pick up the overwritten run's state
        shutil.rmtree(checkpoint.root(out))
    return out


class StopRequest:
    """SIGTERM (what `ray job stop` sends) or a first Ctrl-C asks the loop to finish its step, checkpoint and exit
    cleanly; a second Ctrl-C interrupts at once. Handlers are installed only in the main thread."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def save_checkpoint(
    actors: placement.Actors,
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
    }
    driver_state = {"buffer": buffer_state, "rollouts_ahead": ahead}
    return checkpoint.commit(tmp, state, driver_state, config.trainer.keep_checkpoints)


def restore_checkpoint(
    actors: placement.Actors,
    source: PromptSource,
    directory: Path,
    state: dict[str, Any],
    bucket_bytes: int,
    config: Config,
) -> tuple[int, Collected | None]:
    """Load the learner, buffer and data position, then give the generator the restored weights. Returns the
    policy version and (async) the rollouts made ahead for the next step."""
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
    version = versions[0]
    if set(versions) != {state["policy_version"]}:
        raise checkpoint.CorruptCheckpointError(
            f"{directory}: learner versions {versions} != {state['policy_version']}"
        )
    source.load_state_dict(state["data"])
    sync_weights(actors, version, bucket_bytes, config)
    return version, driver_state["rollouts_ahead"]


def resolve_model_path(config: Config) -> str:
    """`model.path` as a local dir or hub id; `embedded` builds (or reuses) the tiny CPU π0."""
    if config.model.path == "embedded":
        from rlhf_refiner import pi0

        return str(pi0.ensure_built(config.model.embedded, config.task, config.refiner.template))
    path = config.model.path
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"model.path '{path}' is not a directory (nor an HF hub id of the form org/name)")
    return os.path.expanduser(path) if looks_local else path


def assemble_samples(
    rollouts: list[Rollout], refinements: list[Refinement] | None, rewards: list[Reward], config: Config
) -> list[Sample]:
    """Pair each rollout with its refinement and reward, and attach its advantage (`algo.advantage`). DAPO's
    overlong penalty shapes the reward the advantages see; the logged `reward/*` stay the task's."""
    import torch

    from rlhf_refiner import algo

    cfg, group = config.algo, config.generator.group_size
    shaped = torch.tensor([r.reward for r in rewards], dtype=torch.float64)
    if cfg.overlong_buffer > 0:
        lengths = torch.tensor([len(r.response_token_ids) for r in rollouts])
        max_length = config.generator.sampling.max_new_tokens
        shaped = shaped + algo.overlong_penalty(lengths, max_length, cfg.overlong_buffer, cfg.overlong_penalty_factor)
    valid = torch.tensor([not r.infra_error for r in rewards])  # infrastructure errors get no policy gradient
    if cfg.advantage == "grpo":
        advantages = algo.group_advantages(shaped, group, cfg.normalize_adv_std, cfg.adv_eps, valid)
    else:
        baseline = cfg.advantage == "reinforce_pp_baseline"
        advantages = algo.reinforce_pp_advantages(shaped, group, baseline, cfg.adv_eps, valid)
    return [
        Sample(
            rollout, refinements[i] if refinements else None, rewards[i], advantages[i].item(), rollout.policy_version
        )
        for i, rollout in enumerate(rollouts)
    ]


def improvement_sample(refinements: list[Refinement], fraction: float, step: int) -> tuple[list[int], int]:
    """Indices of the changed refinements among a reproducible `fraction` of the step's samples, and how many
    samples were drawn. Unchanged a' = a have reward(a') = reward(a) by definition, and a fallback's a' is a copy
    of a (π0 improved nothing), so neither costs a reward call."""
    drawn = sorted(random.Random(step).sample(range(len(refinements)), round(fraction * len(refinements))))
    return [i for i in drawn if not (refinements[i].unchanged or refinements[i].fallback)], len(drawn)


def improvement_metrics(before: list[float], after: list[float], drawn: int) -> dict[str, float]:
    """`refiner/improved_frac` (paper, Fig. 5): share of drawn rollouts with reward(a') > reward(a), and its twins."""
    if drawn == 0:
        return {}
    return {
        "refiner/improved_frac": sum(a > b for b, a in zip(before, after)) / drawn,
        "refiner/worsened_frac": sum(a < b for b, a in zip(before, after)) / drawn,
        "refiner/reward_delta": sum(a - b for b, a in zip(before, after)) / drawn,
        "refiner/improved_eval_count": drawn,
    }


def step_metrics(samples: list[Sample]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Reward and task metrics over the samples with real rewards (infrastructure errors are only counted)."""
    scored = [s for s in samples if not s.reward.infra_error] or samples
    rewards = [s.reward.reward for s in scored]
    metrics = {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/infra_error_frac": sum(s.reward.infra_error for s in samples) / len(samples),
    }
    for key in scored[0].reward.components:  # a reward's parts; `task/` parts are task metrics, named as they are
        name = key if key.startswith("task/") else f"reward/{key}"
        metrics[name] = statistics.fmean(s.reward.components.get(key, 0.0) for s in scored)
    accuracies = [s.reward.accuracy for s in scored if s.reward.accuracy is not None]
    if accuracies:
        metrics["task/accuracy"] = statistics.fmean(accuracies)
    rows = [
        {
            "sample_id": s.sample_id,
            "query": s.rollout.prompt.query,
            "response": s.rollout.response,
            "refined": s.refinement.refined if s.refinement else None,
            "reward": s.reward.reward,
            "accuracy": s.reward.accuracy,
            "advantage": s.advantage,
        }
        for s in samples
    ]
    return metrics, rows


def flat(parts: list[list[Any]]) -> list[Any]:
    return [item for part in parts for item in part]


Collected = tuple[list[Rollout], list[Refinement] | None, list[Reward], dict[str, float]]


def gather_stage(
    calls: list[list[Any]], names: list[str], stage: str, time_key: str, deadline: float
) -> tuple[list[Any], dict[str, float]]:
    """Wait for a fanned-out stage's calls, each returning (records, metrics) as two ObjectRefs and made on the
    actor `names[i]`: the records of all calls in call order, and their metrics merged (`metrics.merge_calls`)."""
    parts = wait(flat(calls), stage, deadline)
    records, metrics = parts[0::2], parts[1::2]
    return flat(records), merge_calls([(n, len(r), m) for n, r, m in zip(names, records, metrics)], time_key)


def collect(actors: placement.Actors, prompts: list[Prompt], step: int, config: Config) -> Collected:
    """One rollout round: every generator engine makes G responses for its shard of the prompts; each engine's
    rollouts are refined and scored as soon as they exist (refiners and scorers each take a shard of every
    engine's rollouts ObjectRef, so results come back in rollout order); then the changed a' of a sample are
    scored for `refiner/improved_frac`."""
    deadline = config.ray.call_timeout_s
    engines = len(actors.generators)
    generated = [
        generator.generate.options(num_returns=2).remote(prompts[shard_slice(len(prompts), i, engines)], step)
        for i, generator in enumerate(actors.generators)
    ]
    rollout_refs = [rollouts_ref for rollouts_ref, _ in generated]
    scorers = [group for group in (actors.rewards, actors.reward_models) if group]
    reward_refs = [
        [scorer.score.remote(ref, i, len(group)) for ref in rollout_refs for i, scorer in enumerate(group)]
        for group in scorers
    ]
    refiners = actors.refiners
    refine_refs = [
        refiner.refine.options(num_returns=2).remote(ref, i, len(refiners))
        for ref in rollout_refs
        for i, refiner in enumerate(refiners)
    ]
    names = [f"generator-{i}" for i in range(engines)]
    rollouts, metrics = gather_stage(generated, names, "generate (generator-*)", "time/generate", deadline)
    rewards = merge([flat(wait(refs, "score (reward-*, reward-model-*)", deadline)) for refs in reward_refs])
    refinements = None
    if refine_refs:
        names = [f"refiner-{i}" for _ in rollout_refs for i in range(len(refiners))]
        refinements, refine_metrics = gather_stage(refine_refs, names, "refine (refiner-*)", "time/refine", deadline)
        metrics.update(refine_metrics)
        changed, drawn = improvement_sample(refinements, config.refiner.improved_eval_fraction, step)
        changed_rollouts, changed_refinements = [rollouts[i] for i in changed], [refinements[i] for i in changed]
        refined_refs = [group[0].score_refined.remote(changed_rollouts, changed_refinements) for group in scorers]
        refined_rewards = merge(wait(refined_refs, "score refined (reward-0, reward-model-0)", deadline))
        pairs = [(rewards[i], r) for i, r in zip(changed, refined_rewards)]
        pairs = [(a, b) for a, b in pairs if not (a.infra_error or b.infra_error)]  # no score to compare
        before, after = [a.reward for a, _ in pairs], [b.reward for _, b in pairs]
        metrics.update(improvement_metrics(before, after, drawn))
    return rollouts, refinements, rewards, metrics


def refill_groups(
    actors: placement.Actors,
    source: PromptSource,
    rollouts: list[Rollout],
    refinements: list[Refinement] | None,
    rewards: list[Reward],
    step: int,
    version: int,
    config: Config,
) -> Collected:
    """DAPO dynamic sampling: keep the groups whose rewards vary, over-sampling fresh prompts for at most
    `algo.max_sampling_rounds` extra rounds. A batch still short after that is filled with zero-variance groups
    (advantage 0: they carry only the constraint term), so the learner's batch size never changes."""
    import torch

    from rlhf_refiner import algo

    group = config.generator.group_size
    wanted = config.data.prompts_per_step
    kept: list[range] = []  # sample indices of each group with reward variance, in collection order
    spare: list[range] = []  # the other groups, used only to fill a batch still short after the last round
    rounds = 0
    while True:
        signal = algo.groups_with_signal(torch.tensor([r.reward for r in rewards], dtype=torch.float64), group)
        for g in range(len(kept) + len(spare), len(signal)):  # the groups this round added
            (kept if signal[g] else spare).append(range(g * group, (g + 1) * group))
        if len(kept) >= wanted or rounds >= config.algo.max_sampling_rounds:
            break
        rounds += 1
        more_rollouts, more_refinements, more_rewards, _ = collect(actors, source.next_batch(version), step, config)
        rollouts, rewards = rollouts + more_rollouts, rewards + more_rewards
        if refinements is not None:
            refinements = refinements + more_refinements
    fill_rate = min(len(kept), wanted) / wanted
    chosen = [i for indices in (kept + spare)[:wanted] for i in indices]
    return (
        [rollouts[i] for i in chosen],
        [refinements[i] for i in chosen] if refinements is not None else None,
        [rewards[i] for i in chosen],
        {"algo/fill_rate": fill_rate, "algo/sampling_rounds": rounds},
    )


def rollout_phase(
    actors: placement.Actors, source: PromptSource, prompts: list[Prompt], step: int, version: int, config: Config
) -> Collected:
    """The step's rollouts: one round, then DAPO's refill rounds when dynamic sampling is on."""
    started = time.perf_counter()
    rollouts, refinements, rewards, metrics = collect(actors, prompts, step, config)
    if config.algo.dynamic_sampling:  # replace groups without reward variance, bounded rounds
        rollouts, refinements, rewards, fill = refill_groups(
            actors, source, rollouts, refinements, rewards, step, version, config
        )
        metrics.update(fill)
    metrics["time/rollout_phase"] = time.perf_counter() - started  # its own duration, even when it ran ahead
    return rollouts, refinements, rewards, metrics


def connect_weight_sync(actors: placement.Actors, config: Config) -> int:
    """Form the sync group: learner rank 0 = sync rank 0; generator engine i's vLLM workers (one per TP rank) =
    sync ranks 1 + i·TP + tp_rank. Returns the bucket size."""
    startup = config.ray.startup_timeout_s
    learner = actors.learners[0]
    host = placement.node_ip(learner, startup)
    metas = wait([learner.weight_metas.remote()], "learner-0 startup", startup)[0]
    # The group forms within sync.timeout_s only if both sides are up: wait out the engines' start-up first. Only
    # then pick the port: one found free while any vLLM engine (the refiners' too) is still starting can be taken
    # by that engine's own store (EADDRINUSE).
    engines = [*actors.generators, *actors.refiners]
    wait([e.__ray_call__.remote(lambda _self: True) for e in engines], "generator-*, refiner-* startup", startup)
    port = wait([learner.free_port.remote()], "learner-0 free port", startup)[0]
    bucket_bytes = int(config.sync.bucket_mb * 2**20)
    timeout = config.sync.timeout_s
    tp = config.generator.engine.tensor_parallel_size
    world = 1 + len(actors.generators) * tp
    wait(
        [
            learner.init_weight_sync.remote(host, port, world, timeout),
            *(
                g.init_weight_sync.remote(host, port, 1 + i * tp, world, metas, bucket_bytes, timeout)
                for i, g in enumerate(actors.generators)
            ),
        ],
        "weight sync setup (learner-0, generator-*)",
        startup,
    )
    return bucket_bytes


def sync_weights(actors: placement.Actors, version: int, bucket_bytes: int, config: Config) -> dict[str, Any]:
    """Broadcast learner rank 0's weights (every rank joins: ZeRO-3 gathers) into every generator engine's vLLM
    workers, which become `version`."""
    # Engines first: `ray.get` raises the first failure in list order, and a dead engine (which Recovery handles)
    # also makes rank 0's broadcast fail.
    results = wait(
        [
            *(g.receive_weights.remote(version, config.sync.verify, config.sync.timeout_s) for g in actors.generators),
            *(learner.broadcast_weights.remote(bucket_bytes) for learner in actors.learners),
        ],
        "weight sync (learner-* -> generator-*)",
        config.sync.timeout_s + 30,
    )
    engines = len(actors.generators)
    received, sent = results[:engines], results[engines]  # ranks > 0 only gathered for rank 0
    for i, engine in enumerate(received):
        if config.sync.verify and engine["checksums"] != sent["checksums"]:
            raise RuntimeError(f"weight sync to generator-{i} corrupted bytes at version {version}")
    return {
        "sync/bytes": sent["bytes"],
        "sync/buckets": sent["buckets"],
        "sync/load_seconds": max(engine["load_seconds"] for engine in received),
    }


class Recovery:
    """Runs a stage call again after a generator engine died: recreate it in its bundle, re-form the weight-sync
    group, and give the engines the current weights first, at most `ray.max_restarts` times. Reward workers,
    reward models and refiners are restarted by Ray itself (their calls are retried); a dead learner rank ends
    the run."""

    def __init__(self, actors: placement.Actors, model_path: str, config: Config) -> None:
        self.actors, self.model_path, self.config = actors, model_path, config
        self.generator_restarts = 0

    def run(self, call: Any, version: int) -> Any:
        while True:
            try:
                return call()
            except ray.exceptions.RayActorError as e:
                learners = [learner._actor_id.hex() for learner in self.actors.learners]
                if e.actor_id in learners:
                    raise RuntimeError(
                        f"learner-{learners.index(e.actor_id)} died; the run cannot continue. Start it again with "
                        "trainer.resume=auto to continue from the newest checkpoint in "
                        f"{self.config.trainer.output_dir}/checkpoints"
                    ) from e
                generators = [generator._actor_id.hex() for generator in self.actors.generators]
                if e.actor_id not in generators or self.generator_restarts >= self.config.ray.max_restarts:
                    raise
                self.generator_restarts += 1
                placement.recreate_generator(self.actors, generators.index(e.actor_id), self.config, self.model_path)
                bucket_bytes = connect_weight_sync(self.actors, self.config)
                sync_weights(self.actors, version, bucket_bytes, self.config)


def init_ray(config: Config) -> bool:
    """Join `ray.address`, else RAY_ADDRESS (set by `ray job submit`), else start a local cluster.
    Returns whether this call started Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    namespace = config.ray.namespace or config.run_name
    if address:
        ray.init(address=address, namespace=namespace)
    else:  # "local": a new cluster, never an unrelated one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, namespace=namespace)
    return True


def run(config: Config) -> dict[str, Any]:
    output_dir = Path(config.trainer.output_dir)
    resume = checkpoint.find_resume(output_dir, config.trainer.resume)  # the newest complete checkpoint, if any
    if resume is None:
        check_output_dir(config)
    model_path = resolve_model_path(config)
    check_reloadable(model_path, config)  # bad input fails here, before any actor starts or file is written
    placement.plan(config)  # and so does impossible GPU arithmetic
    prepare_output_dir(output_dir, resume[1]["step"] if resume else None)
    from transformers import AutoTokenizer

    source = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(model_path))
    summary: dict[str, Any] = {"model_path": model_path, "run_name": config.run_name}
    if source.stats:  # a real dataset: what was loaded, and every row dropped, by reason
        summary["data"] = source.stats
    if (Path(model_path) / "quality.json").exists():  # the embedded π0 reports its quality
        summary["pi0_quality"] = json.loads((Path(model_path) / "quality.json").read_text())
    started_ray = init_ray(config)
    deadline = config.ray.call_timeout_s
    actors = None
    start_step = resume[1]["step"] if resume else 0
    ahead = ThreadPoolExecutor(1, thread_name_prefix="rollout")  # async: the next step's rollouts
    logger = MetricsLogger(
        config, output_dir, config.trainer.steps, start_step, resume[1]["wandb_id"] if resume else None
    )
    try:
        actors = placement.start_actors(config, model_path, config.ray.startup_timeout_s)
        bucket_bytes = connect_weight_sync(actors, config)  # waits for every engine's start-up first
        summary["nodes"] = placement.actor_nodes(actors, config.ray.startup_timeout_s)  # where each stage runs
        version, samples_per_step = 0, config.data.prompts_per_step * config.generator.group_size
        restored_rollouts = None
        if resume:
            version, restored_rollouts = restore_checkpoint(actors, source, resume[0], resume[1], bucket_bytes, config)
            summary["resumed_from"] = str(resume[0])
        recovery = Recovery(actors, model_path, config)
        run_started = time.perf_counter()
        pending = restored_rollouts  # async: the next step's rollouts, generated while this step learns
        with StopRequest() as stop:
            for step in range(start_step + 1, config.trainer.steps + 1):
                t0 = time.perf_counter()
                if pending is None:  # synchronous, or the first step
                    prompts = source.next_batch(version)
                    collected = recovery.run(
                        partial(rollout_phase, actors, source, prompts, step, version, config), version
                    )
                else:
                    collected = pending.result() if isinstance(pending, Future) else pending
                rollouts, refinements, rewards, metrics = collected
                pending = None
                t1 = time.perf_counter()
                samples = assemble_samples(rollouts, refinements, rewards, config)
                if len({s.sample_id for s in samples}) != len(samples):  # retries must never duplicate a sample
                    raise RuntimeError(f"step {step}: duplicate sample ids in the batch")
                actors.buffer.add.remote(samples)
                batch_ref = actors.buffer.take.remote(samples_per_step, version)
                learn_refs = [learner.step.remote(batch_ref) for learner in actors.learners]  # each trains its shard
                if config.trainer.async_steps and step < config.trainer.steps:
                    # Overlap: step+1's rollouts (generator still at `version`) while the learner makes version+1.
                    prompts = source.next_batch(version)
                    rollout = partial(rollout_phase, actors, source, prompts, step + 1, version, config)
                    pending = ahead.submit(recovery.run, rollout, version)
                # every rank returns the metrics of all ranks combined
                metrics.update(wait(learn_refs, "learn (learner-*)", deadline)[0])
                version += 1
                t2 = time.perf_counter()
                if isinstance(pending, Future):
                    pending.result()  # the generator must finish sampling before its weights change
                t_synced = time.perf_counter()
                metrics.update(recovery.run(partial(sync_weights, actors, version, bucket_bytes, config), version))
                metrics["recovery/generator_restarts"] = recovery.generator_restarts
                t3 = time.perf_counter()
                sample_metrics, rows = step_metrics(samples)
                metrics.update(sample_metrics)
                metrics.update(wait([actors.buffer.metrics.remote()], "buffer", deadline)[0])
                metrics.update(
                    {
                        "sync/seconds": t3 - t_synced,
                        "time/rollout": t1 - t0,  # async: only the wait for rollouts made during the last step
                        "time/learn": t2 - t1,
                        "time/rollout_overhang": t_synced - t2,  # async: rollouts still running after learning
                        "time/sync": t3 - t_synced,
                        "time/step": time.perf_counter() - t0,
                    }
                )
                logger.log(step, metrics)
                logger.log_samples(step, rows[: config.metrics.samples_per_step])
                summary.setdefault("first", {k: metrics[k] for k in SUMMARY_KEYS if k in metrics})
                summary["last"] = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
                every = config.trainer.save_every
                if stop.requested or step == config.trainer.steps or (every and step % every == 0):
                    ahead_state = pending.result() if isinstance(pending, Future) else None
                    summary["checkpoint"] = str(
                        save_checkpoint(actors, source, step, version, logger.wandb_id, ahead_state, config)
                    )
                if stop.requested:  # checkpointed above: `trainer.resume=auto` continues from here
                    summary["stopped"] = {"signal": stop.requested, "step": step}
                    break
        summary.update(steps=config.trainer.steps, policy_version=version, seconds=time.perf_counter() - run_started)
        if config.trainer.save_final and not stop.requested:
            final = str((output_dir / "final").resolve())
            saves = [learner.save_pretrained.remote(final) for learner in actors.learners]  # rank 0 writes
            summary["final"] = wait(saves, "save (learner-*)", deadline)[0]
    finally:
        logger.close(summary)
        if actors is not None:
            for actor in actors.named().values():
                ray.kill(actor)
            ray.util.remove_placement_group(actors.placement_group)
        ahead.shutdown(wait=False, cancel_futures=True)  # after the kills: a rollout still waiting fails fast
        if started_ray:
            ray.shutdown()
    return summary
