"""Resources -> one placement group and the Ray actor options of every stage; the only GPU arithmetic.

Each stage class is wrapped with `ray.remote` once, here. Actors are named (`generator-0`, `refiner-0`,
`reward-<i>`, `reward-model-<i>`, `learner-0`, `buffer`) in the run's namespace (`ray.namespace`, default: the
run name), so operators (and tests) can find them, and two runs on one cluster do not collide.
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
    generator: Any
    refiner: Any | None  # None when the refiner is not used (or is an external server reached by the loop)
    rewards: list[Any]  # RewardWorker actors (rule, code, http sources); empty when only `model` is weighted
    reward_models: list[Any]  # RewardModel actors; empty unless `model` is weighted
    buffer: Any
    learner: Any
    placement_group: PlacementGroup
    generator_options: dict[str, Any]  # to recreate generator-0 in its bundle after it dies


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
    if config.placement.layout == "colocated":
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
    """One bundle per actor (colocated: the generator's share of the learner's); validates the GPU arithmetic."""
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
    if config.placement.layout == "colocated":  # one bundle holds both; each actor asks for its own share
        index = len(bundles)
        add("learner-0", "learner", learner.num_cpus + engine.num_cpus, 1)
        actors["learner-0"] = (index, learner.num_cpus, learner.num_gpus)
        actors["generator-0"] = (index, engine.num_cpus, engine.num_gpus)
    else:
        add("learner-0", "learner", learner.num_cpus, learner.num_gpus)
        add("generator-0", "generator", engine.num_cpus, engine.num_gpus)
    if uses_refiner(config):
        add("refiner-0", "refiner", config.refiner.engine.num_cpus, config.refiner.engine.num_gpus)
    for i in range(reward_worker_count(config)):
        add(f"reward-{i}", "reward", config.reward.num_cpus, 0)
    rm = config.reward.model
    for i in range(reward_model_count(config)):
        add(f"reward-model-{i}", "reward_model", rm.num_cpus, rm.num_gpus)
    add("buffer", "buffer", BUFFER_CPUS, 0)
    return Plan(bundles, actors)


def start_actors(config: Config, model_path: str, timeout_s: float) -> Actors:
    """Reserve resources for every stage and start its actor; returns once the placement group is ready."""
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

    learner = ray.remote(Learner).options(**options("learner-0")).remote(model_path, config)
    generator_options = options("generator-0")
    generator = ray.remote(Generator).options(**generator_options).remote(model_path, config)
    refiner = None
    if uses_refiner(config):
        refiner = (
            ray.remote(Refiner)
            .options(**options("refiner-0", restartable=True))
            .remote(model_path, config.refiner, config.model.dtype, config.trainer.seed)
        )
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
    return Actors(generator, refiner, rewards, reward_models, buffer, learner, pg, generator_options)


def recreate_generator(actors: Actors, config: Config, model_path: str) -> None:
    """A fresh generator-0 in the dead one's bundle, once Ray has released the name; the caller re-forms the
    weight-sync group and gives it the current weights."""
    ray.kill(actors.generator, no_restart=True)
    deadline = time.monotonic() + config.ray.startup_timeout_s
    while True:
        try:
            actors.generator = ray.remote(Generator).options(**actors.generator_options).remote(model_path, config)
            return
        except ValueError:  # "already taken": the dead actor's name is released asynchronously
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def actor_nodes(actors: Actors, timeout_s: float) -> dict[str, str]:
    """Ray node id of every stage's actor, by actor name."""
    named = {"learner-0": actors.learner, "generator-0": actors.generator, "buffer": actors.buffer}
    named.update({"refiner-0": actors.refiner} if actors.refiner is not None else {})
    named.update({f"reward-{i}": a for i, a in enumerate(actors.rewards)})
    named.update({f"reward-model-{i}": a for i, a in enumerate(actors.reward_models)})
    calls = [a.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()) for a in named.values()]
    return dict(zip(named, ray.get(calls, timeout=timeout_s)))


def node_ip(actor: Any, timeout_s: float) -> str:
    """IP address of the node an actor runs on (the learner hosts the weight-sync store there)."""
    return ray.get(actor.__ray_call__.remote(lambda _self: ray.util.get_node_ip_address()), timeout=timeout_s)
