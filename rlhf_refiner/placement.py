"""Resources -> one placement group and the Ray actor options of every stage; the only GPU arithmetic.

Each stage class is wrapped with `ray.remote` once, here. Actors are named (`learner-<rank>`, `generator-<i>`,
`refiner-<i>`, `reward-<i>`, `reward-model-<i>`, `buffer`) in the run's namespace (`ray.namespace`, default: the
run name), so operators (and tests) can find them, and two runs on one cluster do not collide. Every stage may
fan out: learner ranks (`learner.num_ranks`), generator and refiner engines (`*.engine.num_engines`), reward
workers and reward models (`reward.num_workers`, `reward.model.num_workers`).

Before the group is created, `check_fits` compares its bundles with the cluster, so a cluster too small fails at
once, naming the fields to change, instead of waiting out `ray.startup_timeout_s`. Colocated start-up follows
OpenRLHF: the generator engines start and go to sleep before any learner rank allocates on their GPUs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import reduce
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_refiner.buffer import Buffer
from rlhf_refiner.config import Config
from rlhf_refiner.generator import Generator
from rlhf_refiner.learner import Learner
from rlhf_refiner.metrics import ACTOR_LOG_DIR, actor_log_dir
from rlhf_refiner.refiner import Refiner
from rlhf_refiner.remote import wait
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
    # one per π0 engine (or client of `refiner.base_url`); empty when the refiner is not used; `generators` itself
    # with placement.shared_engine (recreating a generator recreates the refiner)
    refiners: list[Any]
    rewards: list[Any]  # RewardWorker actors (rule, code, http sources); empty when only `model` is weighted
    reward_models: list[Any]  # RewardModel actors; empty unless `model` is weighted
    buffer: Any
    placement_group: PlacementGroup
    generator_options: list[dict[str, Any]]  # to recreate generator-<i> in its bundle after it dies

    def named(self) -> dict[str, Any]:
        """Every actor by its name."""
        named = {f"learner-{i}": a for i, a in enumerate(self.learners)}
        named.update({f"generator-{i}": a for i, a in enumerate(self.generators)})
        if self.refiners is not self.generators:  # placement.shared_engine: the generators are the refiners
            named.update({f"refiner-{i}": a for i, a in enumerate(self.refiners)})
        named.update({f"reward-{i}": a for i, a in enumerate(self.rewards)})
        named.update({f"reward-model-{i}": a for i, a in enumerate(self.reward_models)})
        named["buffer"] = self.buffer
        return named

    def scorer_groups(self) -> list[list[Any]]:
        """The scorers whose rewards `reward.merge` sums per sample: reward workers, reward models (each if any)."""
        return [group for group in (self.rewards, self.reward_models) if group]


def uses_refiner(config: Config) -> bool:
    return config.uses_refiner


def refiner_engines(config: Config) -> int:
    """The refiner's own engine actors: none when it is not used, or when the generators serve it (shared)."""
    if not uses_refiner(config) or config.placement.shared_engine:
        return 0
    return config.refiner.engine.num_engines


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
    for i in range(refiner_engines(config)):
        add(f"refiner-{i}", "refiner", refiner.num_cpus, refiner.num_gpus)
    for i in range(reward_worker_count(config)):
        add(f"reward-{i}", "reward", config.reward.num_cpus, 0)
    rm = config.reward.model
    for i in range(reward_model_count(config)):
        add(f"reward-model-{i}", "reward_model", rm.num_cpus, rm.num_gpus)
    add("buffer", "buffer", BUFFER_CPUS, 0)
    return Plan(bundles, actors)


# The config fields that size each stage's bundles: (CPUs per actor, GPUs per actor, actor count).
STAGE_FIELDS = {
    "learner": ("learner.num_cpus", "learner.num_gpus", "learner.num_ranks"),
    "generator": ("generator.engine.num_cpus", "generator.engine.num_gpus", "generator.engine.num_engines"),
    "refiner": ("refiner.engine.num_cpus", "refiner.engine.num_gpus", "refiner.engine.num_engines"),
    "reward": ("reward.num_cpus", None, "reward.num_workers"),
    "reward-model": ("reward.model.num_cpus", "reward.model.num_gpus", "reward.model.num_workers"),
}
RESOURCE_SLACK = 1e-6  # Ray counts resources in units of 1e-4; sums of fractions must not fail on rounding


def _text(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def _fields(config: Config, layout: Plan, resource: str) -> str:
    """The config fields behind `resource` (CPU or GPU) in this plan's bundles, with their values."""

    def value(field: str) -> float:
        return reduce(getattr, field.split("."), config)

    stages = [s for s in dict.fromkeys(name.rsplit("-", 1)[0] for name in layout.actors) if s in STAGE_FIELDS]
    parts = []
    if resource == "GPU" and config.placement.layout == "colocated":  # a pair's bundle holds one whole GPU
        parts.append(f"learner.num_ranks={value('learner.num_ranks'):g} (one GPU per learner rank + generator pair)")
        stages = [s for s in stages if s not in ("learner", "generator")]
    for stage in stages:
        field, count = STAGE_FIELDS[stage][resource == "GPU"], STAGE_FIELDS[stage][2]
        if field is not None and value(field) > 0:
            parts.append(f"{field}={value(field):g} (x {count}={value(count):g})")
    return ", ".join(parts)


def check_fits(config: Config, layout: Plan, nodes: list[dict[str, float]]) -> None:
    """Fail at once if the cluster can never hold the plan's group, rather than wait out `ray.startup_timeout_s`.

    `nodes`: each alive node's total resources (`ray.nodes()`; not what is free now, which other jobs give back).
    Only necessary conditions, so a placeable group is never refused: every bundle fits some node; STRICT_PACK:
    all fit one node; the sums fit the cluster's (custom `placement.node_resources` included); STRICT_SPREAD: a
    node per bundle. A group that passes may still wait (bin packing, busy nodes) until the deadline. It assumes
    a fixed cluster: `start_actors` skips it where an autoscaler may add nodes, and a launcher must let its fixed
    nodes join before it submits."""
    strategy, bundles = config.placement.strategy, layout.bundles
    names = ["+".join(n for n, (index, _, _) in layout.actors.items() if index == i) for i in range(len(bundles))]
    keys = list(dict.fromkeys(k for b in bundles for k in b))
    demand = {k: sum(b.get(k, 0.0) for b in bundles) for k in keys}
    supply = {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in keys}

    def fits(need: dict[str, float], node: dict[str, float]) -> bool:
        return all(node.get(k, 0.0) + RESOURCE_SLACK >= v for k, v in need.items())

    def lacking(need: dict[str, float]) -> set[str]:  # what no node has enough of (else the combination)
        return {k for k, v in need.items() if v > largest[k] + RESOURCE_SLACK} or set(need)

    problems, short = [], set()
    for name, bundle in zip(names, bundles):
        if not any(fits(bundle, node) for node in nodes):
            problems.append(f"bundle {name} {_text(bundle)} is larger than every node")
            short |= lacking(bundle)
    if strategy == "STRICT_PACK" and not any(fits(demand, node) for node in nodes):
        problems.append(f"STRICT_PACK puts every bundle on one node, and no node holds {_text(demand)}")
        short |= lacking(demand)
    for k in keys:
        if demand[k] > supply[k] + RESOURCE_SLACK:
            problems.append(f"{k}: the bundles ask for {demand[k]:g} in all, the cluster has {supply[k]:g}")
            short.add(k)
    if strategy == "STRICT_SPREAD" and len(nodes) < len(bundles):
        problems.append(f"STRICT_SPREAD puts each bundle on its own node: {len(bundles)} bundles, {len(nodes)} nodes")
    if not problems:
        return
    pins = {resource: role for role, resource in config.placement.node_resources.items()}
    fixes = []
    for k in (k for k in keys if k in short):
        if k == "CPU":
            cpus = math.ceil(demand["CPU"] - RESOURCE_SLACK)
            fixes.append(
                f"CPU: lower {_fields(config, layout, 'CPU')}; or give Ray more (logical) CPUs: a head you start "
                f"advertises only its cores unless told, `ray start --head --num-cpus {cpus}`; a local cluster "
                f"that the run starts itself (no ray.address, no RAY_ADDRESS) takes ray.num_cpus={cpus}"
            )
        elif k == "GPU":
            fixes.append(f"GPU: lower {_fields(config, layout, 'GPU')}; or add GPU nodes (`ray start --num-gpus N`)")
        elif k in pins:
            fixes.append(
                f"placement.node_resources pins {pins[k]} to nodes that advertise '{k}': start them with "
                f"`ray start --resources='{{\"{k}\": 1}}'`, or drop the pin"
            )
    if strategy.startswith("STRICT"):
        fixes.append(f"or relax placement.strategy={strategy} (PACK and SPREAD may split the group over nodes)")
    listed = ", ".join(f"{name} {_text(b)}" for name, b in zip(names, bundles))
    per_node = ", ".join(_text({k: n.get(k, 0.0) for k in keys}) for n in nodes[:8])
    raise PlacementError(
        f"placement: this cluster can never hold the run's placement group ({len(bundles)} bundles, {strategy}), so "
        f"start-up would only wait out ray.startup_timeout_s:\n  - " + "\n  - ".join(problems) + "\n"
        f"demand: {_text(demand)}: {listed}\n"
        f"supply: {_text(supply)} on {len(nodes)} node(s): {per_node}{' ...' if len(nodes) > 8 else ''}\n"
        "to fix:\n  - " + "\n  - ".join(fixes)
    )


def autoscaler_may_add_nodes() -> bool:
    """Whether an autoscaler may still add nodes (then what does not fit now may fit later, and only the startup
    deadline applies). From what Ray's autoscalers publish in the GCS (internal APIs of the pinned Ray): v2
    (KubeRay, `ray up` with v2) its node groups' min/max counts; v1 (`ray up`, KubeRay's in-tree autoscaler) a
    status whose node types come from its config, where a cluster without one (`ray start`, `ray.init`) gets
    the read-only provider's anonymous `node_<node id>`. No report at all: no autoscaler runs."""
    try:
        return _autoscaler_may_add_nodes()
    except Exception:  # an internal API moved (a newer Ray): cannot tell, so keep the deadline behaviour
        return True


def _autoscaler_may_add_nodes() -> bool:
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    cluster_config = state.get_cluster_config()
    if cluster_config is not None:
        return any(g.max_count < 0 or g.max_count > g.min_count for g in cluster_config.node_group_configs)
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    node_types = (report.get("node_type_mapping") or {}).items()
    return any(node_type != f"node_{node_id}" for node_id, node_type in node_types)


def start_actors(config: Config, model_path: str, timeout_s: float) -> Actors:
    """Reserve resources for every stage and start its actor; returns once the learner ranks have formed their
    process group and built their DeepSpeed engines (disaggregated: the engines may still be starting).

    Colocated, the order is OpenRLHF's (`create_vllm_engines` ends with every engine's `sleep`, and only then do
    the actors build their DeepSpeed engines): vLLM sizes its weights + KV cache (`gpu_memory_utilization`)
    against the memory free on the GPU when it starts, so each engine starts on an empty GPU and sleeps before
    any learner rank allocates there; from then on the two take turns (the learner frees its cached blocks after
    each step, `Learner.step`, before the engine wakes for the sync)."""
    layout = plan(config)
    if not autoscaler_may_add_nodes():  # with an autoscaler, what is missing now may come: the deadline applies
        check_fits(config, layout, [node["Resources"] for node in ray.nodes() if node["Alive"]])
    pg = placement_group(layout.bundles, strategy=config.placement.strategy, name=f"{config.run_name}-stages")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"placement: bundles {layout.bundles} ({config.placement.strategy}) were not available within "
            f"{timeout_s:.0f}s (cluster has {ray.cluster_resources()}); lower the *.num_cpus / *.num_gpus "
            "settings, or start nodes with the resources named in placement.node_resources"
        ) from None

    log_dir = actor_log_dir(config)
    env = {**ACTOR_ENV, **({ACTOR_LOG_DIR: log_dir} if log_dir else {})}

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
            "runtime_env": {"env_vars": env},
            "max_restarts": restarts,
            "max_task_retries": restarts,
        }

    ranks = config.learner.num_ranks
    learner_cls = ray.remote(Learner)
    learners = [
        learner_cls.options(**options(f"learner-{rank}")).remote(model_path, config, rank, ranks)
        for rank in range(ranks)
    ]  # constructing a Learner is cheap and allocates nothing on a device; `setup` builds the DeepSpeed engine
    generator_options = [options(f"generator-{i}") for i in range(config.generator.engine.num_engines)]
    generators: list[Any] = []
    if config.placement.layout == "colocated":  # engines up and asleep first (see the docstring)
        generators = [ray.remote(Generator).options(**o).remote(model_path, config) for o in generator_options]
        asleep = [g.sleep.remote() for g in generators]
        wait(asleep, "generator-* start-up and sleep", timeout_s)
    # The ranks' rendezvous: rank 0 hosts the store on its node (rank 0 answers before any rank blocks in
    # `setup`); disaggregated, the setups run while the other stages start below.
    host, port = node_ip(learners[0], timeout_s), wait([learners[0].free_port.remote()], "learner-0 port", timeout_s)[0]
    setups = [learner.setup.remote(host, port) for learner in learners]
    if not generators:
        generators = [ray.remote(Generator).options(**o).remote(model_path, config) for o in generator_options]
    refiner_cls = ray.remote(Refiner)
    refiners = [
        refiner_cls.options(**options(f"refiner-{i}", restartable=True)).remote(
            model_path, config.refiner, config.model.dtype, config.trainer.seed
        )
        for i in range(refiner_engines(config))
    ]
    if config.placement.shared_engine and uses_refiner(config):
        refiners = generators  # the same list: a recreated generator is the refiner too
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
    wait(setups, f"learner setup (learner-0..{ranks - 1})", timeout_s)
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
    return dict(zip(named, wait(calls, "node ids (every actor)", timeout_s)))


def node_ip(actor: Any, timeout_s: float) -> str:
    """IP address of the node an actor runs on (the learner hosts the weight-sync store there)."""
    return wait([actor.__ray_call__.remote(lambda _self: ray.util.get_node_ip_address())], "node ip", timeout_s)[0]
