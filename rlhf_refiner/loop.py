"""The driver: build the actors, then per step rollout round (`rollout.py`) -> buffer -> learn -> sync -> log ->
checkpoint (`run_state.py`).

What overlaps with what, with policy versions. Synchronous (`trainer.async_steps=0`): at step k the generator
holds version k-1; refinement and scoring of the step's rollouts run concurrently (both read the rollouts'
ObjectRef; with `algo.dynamic_sampling` only the kept groups are refined, once scores have chosen them); the
learner then trains on them and becomes version k; the broadcast makes the generator version k before step k+1
generates. Nothing overlaps with learning. Async (`async_steps=1`): while the learner turns version k-1 into k on
step k's batch, a driver thread makes step k+1's rollouts with the generator still at k-1; they finish before
the broadcast makes it version k, and step k+1 trains on them at staleness 1 (TIS corrects, `algo.tis_cap`). A
generator engine recreated inside that thread gets the weights the learner holds by then (version k), stamped k.
A checkpoint follows the step's sync, so it never splits a rollout from its weights.

LoRA with adapter sync: the generator's base weights never change; a sync replaces its one adapter whole (the
old one is dropped only once the new one is built), and only then does the generator report the new version and
name that adapter in its requests. With `placement.shared_engine` the generator actors refine too, and what
orders a step's generation, refinement and sync on an engine is the actor: Ray runs its calls one at a time, so
no sync lands inside a generation or a refinement, and refinement requests carry no adapter (π0 is the base,
whichever version the engine holds). Above, step k's rollouts are generated at version k-1 and refined before the
sync (the rollout phase gathers the refinements; async: `pending.result()` waits for them), so a refinement never
waits behind a sync, and the sync never waits behind more than the step's own calls.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import ray

from rlhf_refiner import checkpoint, evaluation, placement, run_state
from rlhf_refiner.config import Config, ConfigError
from rlhf_refiner.data import PromptSource
from rlhf_refiner.metrics import MetricsLogger, check_wandb_login, spread_samples
from rlhf_refiner.records import Sample
from rlhf_refiner.remote import wait
from rlhf_refiner.rollout import assemble_samples, rollout_phase

SUMMARY_KEYS = ("reward/mean", "task/accuracy", "task/degenerate_rate", "learner/kl_to_ref", "learner/ce_refined")


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
        print(f"\n{self.requested}: stopping after this step, with a checkpoint (Ctrl-C again: at once)", flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resolve_model_path(config: Config) -> str:
    """`model.path` as a local dir or hub id; `embedded` builds (or reuses) the tiny CPU π0. A path that is not a
    directory, or a hub id the hub cannot provide (offline, gated, misspelt), is a ConfigError naming the field."""
    if config.model.path == "embedded":
        from rlhf_refiner import pi0

        return str(pi0.ensure_built(config.model.embedded, config.task, config.refiner.template))
    path = config.model.path
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1
    if looks_local:
        if not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"model.path '{path}' is not a directory (nor an HF hub id of the form org/name)")
        return os.path.expanduser(path)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)  # from the local HF cache when there is one, else the hub
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.path '{path}' is not a local directory, and the HF hub could not provide it ({reason}); "
            f"download it where the hub is reachable (`huggingface-cli download {path} --local-dir DIR`) and give "
            "model.path=DIR"
        ) from None
    return path


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
            "error": s.reward.error,  # a failed reward source's message (infra errors), else None
        }
        for s in samples
    ]
    return metrics, rows


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


DEATH_NOTICE_S = 15.0  # how long a failed sync waits for word of an engine's death before reporting the failure


def sync_weights(actors: placement.Actors, version: int, bucket_bytes: int, config: Config) -> dict[str, Any]:
    """Broadcast learner rank 0's weights (every rank joins: ZeRO-3 gathers) into every generator engine's vLLM
    workers, which become `version`."""
    receives = [g.receive_weights.remote(version, config.sync.verify, config.sync.timeout_s) for g in actors.generators]
    broadcasts = [learner.broadcast_weights.remote(bucket_bytes) for learner in actors.learners]
    try:
        results = wait([*receives, *broadcasts], "weight sync (learner-* -> generator-*)", config.sync.timeout_s + 30)
    except Exception as failure:
        # A dead engine (which Recovery handles) also makes rank 0's broadcast and the other engines' receives
        # fail, often before the driver hears of the death: give every receive a moment to resolve, and report
        # the death, whichever failure `ray.get` raised first.
        done, _ = ray.wait(receives, num_returns=len(receives), timeout=DEATH_NOTICE_S)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as dead:
                raise dead from failure
            except Exception:
                pass
        raise
    engines = len(actors.generators)
    received, sent = results[:engines], results[engines]  # ranks > 0 only gathered for rank 0
    for i, engine in enumerate(received):
        if config.sync.verify and engine["checksums"] != sent["checksums"]:
            raise RuntimeError(f"weight sync to generator-{i} corrupted bytes at version {version}")
    return {
        "sync/bytes": sent["bytes"],
        "sync/buckets": sent["buckets"],
        "sync/load_seconds": max(engine["load_seconds"] for engine in received),
        "sync/peak_buffered_mb": max(engine["peak_buffered_bytes"] for engine in received) / 2**20,
    }


class Recovery:
    """Runs a stage call again after a generator engine died: recreate it in its bundle, re-form the weight-sync
    group, and give the engines the weights learner rank 0 holds, stamped with its version, at most
    `ray.max_restarts` times. Reward workers, reward models and refiners are restarted by Ray itself (their calls
    are retried); a dead learner rank ends the run."""

    def __init__(self, actors: placement.Actors, model_path: str, config: Config) -> None:
        self.actors, self.model_path, self.config = actors, model_path, config
        self.generator_restarts = 0

    def learner_version(self) -> int:
        """Rank 0's policy version. Its calls run in submission order, so this answers after any step already
        submitted: in async mode, after the step that made version k while the failed rollout was made from k-1."""
        rank0 = self.actors.learners[0]
        call = rank0.__ray_call__.remote(lambda learner: learner.policy_version)
        return wait([call], "learner-0 policy version", self.config.ray.call_timeout_s)[0]

    def run(self, call: Any) -> Any:
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
                # The broadcast sends what rank 0 holds now, which in async mode is already one step past the
                # version the failed rollout was made from; stamp the weights with what they are.
                sync_weights(self.actors, self.learner_version(), bucket_bytes, self.config)


def init_ray(config: Config) -> bool:
    """Join `ray.address`, else RAY_ADDRESS (set by `ray job submit`), else start a local cluster.
    Returns whether this call started Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    # metrics.actor_output=file: the actors write to the run's logs/, and Ray's own start-up lines stay quiet
    quiet = {"log_to_driver": config.metrics.actor_output == "console", "logging_level": logging.WARNING}
    namespace = config.ray.namespace or config.run_name
    if address:
        ray.init(address=address, namespace=namespace, **quiet)
    else:  # "local": a new cluster, never an unrelated one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, namespace=namespace, **quiet)
    return True


def run(config: Config) -> dict[str, Any]:
    checkpoint.check_output_location(config.trainer.output_dir)  # not into a `ray job submit` package dir
    output_dir = Path(config.trainer.output_dir)
    resume = checkpoint.find_resume(output_dir, config.trainer.resume)  # the newest complete checkpoint, if any
    if resume is None:
        checkpoint.check_output_dir(config)
    else:
        finished = checkpoint.finished_run(output_dir, resume[1]["step"], config)
        if finished is not None:  # the same command again: nothing is started, nothing is written
            return finished
        checkpoint.check_resume_config(*resume, config)  # a resume is the same experiment, or says how it is not
        config = checkpoint.keep_lr_schedule(*resume, config)  # an extension does not rewind a decaying schedule
    if config.trainer.async_steps and config.algo.tis_cap is None:
        warnings.warn(
            f"trainer.async_steps={config.trainer.async_steps} without algo.tis_cap: each step trains on rollouts one "
            "policy version old with a PPO ratio of 1 to the learner's own policy, uncorrected "
            "(learner/uncorrected_stale_frac logs the share); set algo.tis_cap (e.g. 2.0) to weight them",
            stacklevel=2,
        )
    model_path = resolve_model_path(config)  # bad input fails here, before any actor starts or file is written
    if config.model.lora.rank:
        from rlhf_refiner import lora

        lora.check_model(model_path, config.model.lora)  # target modules the model lacks, too
    stages = ", ".join(placement.plan(config).actors)  # impossible GPU arithmetic fails here too
    check_wandb_login(config)  # and a missing W&B login
    from transformers import AutoTokenizer

    held_out = config.eval if config.trainer.eval_every else None  # the embedded task's are then never trained on
    source = PromptSource(config.data, config.task, AutoTokenizer.from_pretrained(model_path), held_out)
    checkpoint.prepare_output_dir(output_dir, resume[1]["step"] if resume else None)  # the first write
    if config.reward.function_source is not None:  # the text the workers run, beside the config naming its path
        (output_dir / "reward_function.py").write_text(config.reward.function_source)
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
        logger.phase(f"starting the actors: {stages}")
        actors = placement.start_actors(config, model_path, config.ray.startup_timeout_s)
        logger.phase("waiting for the vLLM engines; forming the weight-sync group")
        bucket_bytes = connect_weight_sync(actors, config)  # waits for every engine's start-up first
        summary["nodes"] = placement.actor_nodes(actors, config.ray.startup_timeout_s)  # where each stage runs
        version, samples_per_step = 0, config.data.prompts_per_step * config.generator.group_size
        restored_rollouts = None
        if resume:
            version, restored_rollouts = run_state.restore(actors, source, resume[0], resume[1], config)
            sync_weights(actors, version, bucket_bytes, config)  # the generator samples from the restored weights
            summary["resumed_from"] = str(resume[0])
            logger.phase(f"resumed from {resume[0]} (step {start_step})")
        recovery = Recovery(actors, model_path, config)
        logger.begin_training()
        if start_step == 0 and evaluation.due(0, config):  # the baseline: π0's own held-out score, as step 0
            logger.log(0, recovery.run(partial(evaluation.evaluate, actors, source.held_out, 0, config)), advance=False)
        run_started = time.perf_counter()
        pending = restored_rollouts  # async: the next step's rollouts, generated while this step learns
        with StopRequest() as stop:
            for step in range(start_step + 1, config.trainer.steps + 1):
                t0 = time.perf_counter()
                if pending is None:  # synchronous, or the first step
                    prompts = source.next_batch(version)
                    collected = recovery.run(partial(rollout_phase, actors, source, prompts, step, version, config))
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
                    pending = ahead.submit(recovery.run, rollout)
                # every rank returns the metrics of all ranks combined
                metrics.update(wait(learn_refs, "learn (learner-*)", deadline)[0])
                version += 1
                t2 = time.perf_counter()
                if isinstance(pending, Future):
                    pending.result()  # the generator must finish sampling before its weights change
                t_synced = time.perf_counter()
                metrics.update(recovery.run(partial(sync_weights, actors, version, bucket_bytes, config)))
                metrics["recovery/generator_restarts"] = recovery.generator_restarts
                t3 = time.perf_counter()
                if evaluation.due(step, config):  # held out, on the weights just synced (version `step`)
                    metrics.update(recovery.run(partial(evaluation.evaluate, actors, source.held_out, step, config)))
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
                logger.log_samples(step, spread_samples(rows, config.metrics.samples_per_step))
                summary.setdefault("first", {k: metrics[k] for k in SUMMARY_KEYS if k in metrics})
                summary["last"] = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
                every = config.trainer.save_every
                if stop.requested or step == config.trainer.steps or (every and step % every == 0):
                    ahead_state = pending.result() if isinstance(pending, Future) else None
                    summary["checkpoint"] = str(
                        run_state.save(actors, source, step, version, logger.wandb_id, ahead_state, config)
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
