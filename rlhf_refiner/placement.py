"""Resources -> one placement group and the Ray actor options of every stage; the only GPU arithmetic.

Each stage class is wrapped with `ray.remote` once, here. Actors are named (`learner-<rank>`, `generator-<i>`,
`refiner-<i>`, `reward-<i>`, `reward-model-<i>`, `buffer`) in the run's namespace (`ray.namespace`, default: the
run name), so operators (and tests) can find them, and two runs on one cluster do not collide. Every stage may
fan out: learner ranks (`learner.num_ranks`), generator and refiner engines (`*.engine.num_engines`), reward
workers and reward models (`reward.num_workers`, `reward.model.num_workers`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_refiner.buffer import Buffer
from rlhf_refiner.config import Config
from rlhf_refiner.generator import Generator
from rlhf_refiner.learner import Learner
from rlhf_refiner.refiner import Refiner
from rlhf_refiner.reward import WORKER_SOURCES, RewardWorker
from rlhf_refiner.reward.model import RewardModel

BUFFER_CPUS = 0.1
# Environment of every actor process: quiet engines (each sync logs a harmless "RotaryEmbedding: Failed to
# load weights" warning: its cos/sin cache is not a checkpoint tensor), and no tokenizer thread pools.
ACTOR_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR_QUIET": "1"}


@dataclass
class Actors:
    learners: list[Any]  # one per data-parallel rank; learners[0] is rank 0, the weight-sync sender
    generators: list[Any]  # one per policy engine; every one receives every weight sync
    refiners: list[Any]  # one per π0 engine (or client of `refiner.base_url`); empty when the refiner is not used
    rewards: list[Any]  # RewardWorker actors (rule, code, http sources); empty when only `model` is weighted
    reward_models: list[Any]  # RewardModel actors; empty unless `model` is weighted
    buffer: Any
    placement_group: PlacementGroup
    generator_options: list[dict[str, Any]]  # to recreate generator-<i> in its bundle after it dies

    def named(self) -> dict[str, Any]:
        """Every actor by its name."""
        named = {f"learner-{i}": a for i, a in enumerate(self.learners)}
        named.update({f"generator-{i}": a for i, a in enumerate(self.generators)})
        named.update({f"refiner-{i}": a for i, a in enumerate(self.refiners)})
        named.update({f"reward-{i}": a for i, a in enumerate(self.rewards)})
        named.update({f"reward-model-{i}": a for i, a in enumerate(self.reward_models)})
        named["buffer"] = self.buffer
        return named


def uses_refiner(config: Config) -> bool:
    return config.algo.constraint == "dynamic" or config.refiner.monitor


def reward_worker_count(config: Config) -> int:
    return config.reward.num_workers if any(k in WORKER_SOURCES for k in config.reward.weights) else 0


def reward_model_count(config: Config) -> int:
    return config.reward.model.num_workers if "model" in config.reward.weights else 0


NODE_SLIVER = 0.001  # of a node-pinning custom resource, per bundle


@dataclass(frozen=True)
class Plan:
    """The placement group's bundles, and for every actor its bundle and its own share of that bundle."""

    bundles: list[dict[str, float]]
    actors: dict[str, tuple[int, float, float]]  # actor name -> (bundle index, num_cpus, num_gpus)

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)


class PlacementError(ValueError):
    """Resources that cannot be placed; the message names the config fields."""


def _check_gpus(config: Config) -> None:
    """The GPU arithmetic that pydantic's per-section validators cannot see."""
    learner, engine = config.learner.num_gpus, config.generator.engine.num_gpus
    if learner > 1:
        raise PlacementError(
            f"learner.num_gpus = {learner:g}: a learner rank drives one GPU; for more GPUs set learner.num_ranks "
            "(DeepSpeed data parallelism, one rank per GPU) with learner.num_gpus=1"
        )
    if config.placement.layout == "colocated":
        ranks, engines = config.learner.num_ranks, config.generator.engine.num_engines
        if ranks != engines:
            raise PlacementError(
                f"placement.layout=colocated pairs learner rank i with generator engine i on one GPU: "
                f"learner.num_ranks ({ranks}) must equal generator.engine.num_engines ({engines})"
            )
        if not (learner > 0 and engine > 0 and learner + engine <= 1):
            raise PlacementError(
                f"placement.layout=colocated shares one GPU: learner.num_gpus ({learner:g}) and "
                f"generator.engine.num_gpus ({engine:g}) must both be > 0 and sum to <= 1 (e.g. 0.5 and 0.5)"
            )
        if config.sync.backend == "nccl":
            raise PlacementError(
                "placement.layout=colocated puts learner and generator on one GPU, and NCCL cannot form a group "
                "of two ranks on one device: use sync.backend=gloo (staged through host memory)"
            )
        if not config.generator.engine.enable_sleep_mode:
            raise PlacementError(
                "placement.layout=colocated needs generator.engine.enable_sleep_mode=true, or the engine's "
                "weights and KV cache hold the GPU memory the learner trains in"
            )
        return
    fractional = {
        "learner.num_gpus": learner,
        "generator.engine.num_gpus": engine,
        "refiner.engine.num_gpus": config.refiner.engine.num_gpus,
    }
    for field, value in fractional.items():
        if value != int(value):
            raise PlacementError(
                f"{field} = {value:g}: a fraction of a GPU shares it with another stage, which is "
                "placement.layout=colocated (learner + generator); disaggregated stages take whole GPUs"
            )


def plan(config: Config) -> Plan:
    """One bundle per actor (colocated: engine i's share of learner rank i's); validates the GPU arithmetic."""
    _check_gpus(config)
    pins = config.placement.node_resources
    bundles: list[dict[str, float]] = []
    actors: dict[str, tuple[int, float, float]] = {}

    def add(name: str, role: str, cpus: float, gpus: float) -> None:
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
        if role in pins:
            bundle[pins[role]] = NODE_SLIVER
        actors[name] = (len(bundles), cpus, gpus)
        bundles.append(bundle)

    learner, engine = config.learner, config.generator.engine
    if config.placement.layout == "colocated":  # one bundle holds a pair; each actor asks for its own share
        for i in range(learner.num_ranks):
            index = len(bundles)
            add(f"learner-{i}", "learner", learner.num_cpus + engine.num_cpus, 1)
            actors[f"learner-{i}"] = (index, learner.num_cpus, learner.num_gpus)
            actors[f"generator-{i}"] = (index, engine.num_cpus, engine.num_gpus)
    else:
        for i in range(learner.num_ranks):
            add(f"learner-{i}", "learner", learner.num_cpus, learner.num_gpus)
        for i in range(engine.num_engines):
            add(f"generator-{i}", "generator", engine.num_cpus, engine.num_gpus)
    refiner = config.refiner.engine
    for i in range(refiner.num_engines if uses_refiner(config) else 0):
        add(f"refiner-{i}", "refiner", refiner.num_cpus, refiner.num_gpus)
    for i in range(reward_worker_count(config)):
        add(f"reward-{i}", "reward", config.reward.num_cpus, 0)
    rm = config.reward.model
    for i in range(reward_model_count(config)):
        add(f"reward-model-{i}", "reward_model", rm.num_cpus, rm.num_gpus)
    add("buffer", "buffer", BUFFER_CPUS, 0)
    return Plan(bundles, actors)


def start_actors(config: Config, model_path: str, timeout_s: float) -> Actors:
    """Reserve resources for every stage and start its actor; returns once the learner ranks have formed their
    process group and built their DeepSpeed engines (the engines may still be starting)."""
    layout = plan(config)
    pg = placement_group(layout.bundles, strategy=config.placement.strategy, name=f"{config.run_name}-stages")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"placement: bundles {layout.bundles} ({config.placement.strategy}) were not available within "
            f"{timeout_s:.0f}s (cluster has {ray.cluster_resources()}); lower the *.num_cpus / *.num_gpus "
            "settings, or start nodes with the resources named in placement.node_resources"
        ) from None

    def options(name: str, restartable: bool = False) -> dict[str, Any]:
        """Stateless stages (reward, refiner: frozen π0) are restarted by Ray, which retries their pending calls;
        the generator (it holds synced weights) is recreated by the loop; the learner is never restarted."""
        index, cpus, gpus = layout.actors[name]
        restarts = config.ray.max_restarts if restartable else 0
        return {
            "name": name,
            "namespace": config.ray.namespace or config.run_name,
            "num_cpus": cpus,
            "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
            "runtime_env": {"env_vars": ACTOR_ENV},
            "max_restarts": restarts,
            "max_task_retries": restarts,
        }

    ranks = config.learner.num_ranks
    learner_cls = ray.remote(Learner)
    learners = [
        learner_cls.options(**options(f"learner-{rank}")).remote(model_path, config, rank, ranks)
        for rank in range(ranks)
    ]
    # The ranks' rendezvous: rank 0 hosts the store on its node (constructing a Learner is cheap, so rank 0
    # answers before any rank blocks in `setup`); the setups run while the other stages start below.
    master = node_ip(learners[0], timeout_s), ray.get(learners[0].free_port.remote(), timeout=timeout_s)
    setups = [learner.setup.remote(*master) for learner in learners]
    generator_options = [options(f"generator-{i}") for i in range(config.generator.engine.num_engines)]
    generators = [ray.remote(Generator).options(**o).remote(model_path, config) for o in generator_options]
    refiner_cls = ray.remote(Refiner)
    refiners = [
        refiner_cls.options(**options(f"refiner-{i}", restartable=True)).remote(
            model_path, config.refiner, config.model.dtype, config.trainer.seed
        )
        for i in range(config.refiner.engine.num_engines if uses_refiner(config) else 0)
    ]
    reward_cls = ray.remote(RewardWorker)
    rewards = [
        reward_cls.options(**options(f"reward-{i}", restartable=True)).remote(config.reward, config.task)
        for i in range(reward_worker_count(config))
    ]
    model_cls, weight = ray.remote(RewardModel), config.reward.weights.get("model", 0.0)
    reward_models = [
        model_cls.options(**options(f"reward-model-{i}", restartable=True)).remote(
            config.reward.model, weight, config.trainer.seed
        )
        for i in range(reward_model_count(config))
    ]
    buffer = ray.remote(Buffer).options(**options("buffer")).remote(config.buffer.max_staleness, config.buffer.capacity)
    try:
        ray.get(setups, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"learner setup (learner-0..{ranks - 1}) did not finish within {timeout_s:.0f}s") from None
    return Actors(learners, generators, refiners, rewards, reward_models, buffer, pg, generator_options)


def recreate_generator(actors: Actors, index: int, config: Config, model_path: str) -> None:
    """A fresh generator-<index> in the dead one's bundle, once Ray has released the name; the caller re-forms
    the weight-sync group and gives it the current weights."""
    ray.kill(actors.generators[index], no_restart=True)
    options = actors.generator_options[index]
    deadline = time.monotonic() + config.ray.startup_timeout_s
    while True:
        try:
            actors.generators[index] = ray.remote(Generator).options(**options).remote(model_path, config)
            return
        except ValueError:  # "already taken": the dead actor's name is released asynchronously
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def actor_nodes(actors: Actors, timeout_s: float) -> dict[str, str]:
    """Ray node id of every stage's actor, by actor name."""
    named = actors.named()
    calls = [a.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()) for a in named.values()]
    return dict(zip(named, ray.get(calls, timeout=timeout_s)))


def node_ip(actor: Any, timeout_s: float) -> str:
    """IP address of the node an actor runs on (the learner hosts the weight-sync store there)."""
    return ray.get(actor.__ray_call__.remote(lambda _self: ray.util.get_node_ip_address()), timeout=timeout_s)
