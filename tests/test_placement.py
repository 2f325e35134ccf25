"""placement.plan: config resources -> bundles, without a cluster or GPUs; the GPU arithmetic and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_refiner import placement, remote
from rlhf_refiner.config import ConfigError, load

GPU_RUN = [  # a disaggregated GPU layout: 2 learner ranks, generator TP 2, refiner 1 GPU
    "learner.num_ranks=2",
    "learner.num_gpus=1",
    "generator.engine.num_gpus=2",
    "generator.engine.tensor_parallel_size=2",
    "refiner.engine.num_gpus=1",
    "sync.backend=nccl",
]


def test_cpu_quickstart_has_one_bundle_per_actor():
    layout = placement.plan(load("configs/quickstart.yaml"))
    assert list(layout.actors) == ["learner-0", "generator-0", "refiner-0", "reward-0", "buffer"]
    assert [index for index, _, _ in layout.actors.values()] == [0, 1, 2, 3, 4]
    assert layout.gpus == 0 and all("GPU" not in b for b in layout.bundles)


def test_disaggregated_gpus_add_up_and_the_tp_engine_holds_its_whole_group():
    layout = placement.plan(load("configs/quickstart.yaml", GPU_RUN))
    assert layout.gpus == 5  # 2 learner ranks + 2 generator (TP) + 1 refiner
    index, _, gpus = layout.actors["generator-0"]
    assert gpus == 2 and layout.bundles[index]["GPU"] == 2
    assert [layout.actors[f"learner-{r}"][2] for r in (0, 1)] == [1, 1]


def test_every_rank_and_engine_gets_its_own_bundle():
    config = load(
        "configs/quickstart.yaml",
        [*GPU_RUN, "learner.num_ranks=4", "generator.engine.num_engines=2", "refiner.engine.num_engines=3",
         "reward.num_workers=2"],
    )  # fmt: skip
    layout = placement.plan(config)
    assert list(layout.actors) == [
        "learner-0", "learner-1", "learner-2", "learner-3", "generator-0", "generator-1",
        "refiner-0", "refiner-1", "refiner-2", "reward-0", "reward-1", "buffer",
    ]  # fmt: skip
    assert len({index for index, _, _ in layout.actors.values()}) == len(layout.bundles) == 12
    assert layout.gpus == 4 * 1 + 2 * 2 + 3 * 1


def test_colocated_pairs_learner_rank_i_with_generator_engine_i():
    config = load(
        "configs/quickstart.yaml",
        ["placement.layout=colocated", "learner.num_ranks=2", "generator.engine.num_engines=2",
         "learner.num_gpus=0.5", "generator.engine.num_gpus=0.5", "generator.engine.enable_sleep_mode=true"],
    )  # fmt: skip
    layout = placement.plan(config)
    for i in (0, 1):
        assert layout.actors[f"learner-{i}"][0] == layout.actors[f"generator-{i}"][0]
    assert layout.actors["learner-0"][0] != layout.actors["learner-1"][0]
    assert layout.gpus == 2


def test_colocated_learner_and_generator_share_one_gpu_bundle():
    config = load(
        "configs/quickstart.yaml",
        ["placement.layout=colocated", "learner.num_gpus=0.5", "generator.engine.num_gpus=0.5",
         "generator.engine.enable_sleep_mode=true", "refiner.engine.num_gpus=1"],
    )  # fmt: skip
    layout = placement.plan(config)
    (learner_bundle, _, learner_gpus), (generator_bundle, _, generator_gpus) = (
        layout.actors["learner-0"],
        layout.actors["generator-0"],
    )
    assert learner_bundle == generator_bundle and learner_gpus == generator_gpus == 0.5
    assert layout.bundles[learner_bundle]["GPU"] == 1
    assert layout.gpus == 2  # the shared GPU + the refiner's


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["placement.layout=colocated", "learner.num_gpus=0.75", "generator.engine.num_gpus=0.5",
          "generator.engine.enable_sleep_mode=true"], "learner.num_gpus (0.75)"),
        (["placement.layout=colocated", "learner.num_gpus=0.5", "generator.engine.num_gpus=0.5"],
         "generator.engine.enable_sleep_mode"),
        (["learner.num_gpus=0.5"], "learner.num_gpus = 0.5"),
        (["learner.num_gpus=2"], "learner.num_ranks"),
        (["placement.layout=colocated", "learner.num_ranks=2", "learner.num_gpus=0.5",
          "generator.engine.num_gpus=0.5", "generator.engine.enable_sleep_mode=true"],
         "learner.num_ranks (2) must equal generator.engine.num_engines (1)"),
    ],
)  # fmt: skip
def test_impossible_gpu_arithmetic_names_the_field(overrides, named):
    with pytest.raises(placement.PlacementError, match=named.replace("(", r"\(").replace(")", r"\)")):
        placement.plan(load("configs/quickstart.yaml", overrides))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["generator.engine.num_gpus=2"], "generator.engine"),  # TP 1 cannot hold 2 GPUs
        (["generator.engine.tensor_parallel_size=2"], "generator.engine"),  # TP without GPUs
        (["sync.backend=nccl"], "sync.backend=nccl"),
        (["learner.num_ranks=3"], "learner.num_ranks"),  # 32 x 8 samples do not split over 3 ranks
        (["learner.num_ranks=4", "learner.micro_batch_size=48"], "learner.micro_batch_size"),  # 64 per rank
        (["generator.engine.num_engines=33"], "generator.engine.num_engines"),  # 32 prompts per step
        (["refiner.engine.enable_sleep_mode=true", "refiner.engine.num_gpus=1"], "refiner.engine.enable_sleep_mode"),
        (["generator.engine.num_gpus=1", "generator.engine.enable_sleep_mode=true", "trainer.async_steps=1",
          "buffer.max_staleness=1"], "enable_sleep_mode"),
    ],
)  # fmt: skip
def test_engine_and_sync_gpu_settings_are_checked_at_load(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load("configs/quickstart.yaml", overrides)


def test_node_resources_pin_each_stage_to_its_nodes():
    config = load(
        "configs/quickstart.yaml",
        ["placement.node_resources={learner: train, generator: rollout, refiner: refine, reward: score}"],
    )
    layout = placement.plan(config)
    pins = {name: set(layout.bundles[index]) - {"CPU", "GPU"} for name, (index, _, _) in layout.actors.items()}
    assert pins == {"learner-0": {"train"}, "generator-0": {"rollout"}, "refiner-0": {"refine"},
                    "reward-0": {"score"}, "buffer": set()}  # fmt: skip
    assert layout.bundles[layout.actors["generator-0"][0]]["rollout"] == placement.NODE_SLIVER


# ---- does the cluster fit? (placement.check_fits: bundles vs fake `ray.nodes()` totals, no Ray) ----------------


def test_quickstart_on_a_two_cpu_head_fails_with_demand_supply_and_the_fields_to_change():
    config = load("configs/quickstart.yaml")
    with pytest.raises(placement.PlacementError) as failure:
        placement.check_fits(config, placement.plan(config), [{"CPU": 2.0, "memory": 8e9}])
    message = str(failure.value)
    # 1 (learner) + 1 (generator) + 1 (refiner) + 0.1 (reward) + 0.1 (buffer) = 3.2 CPUs against 2
    assert "CPU: the bundles ask for 3.2 in all, the cluster has 2" in message
    bundles = "learner-0 {CPU: 1}, generator-0 {CPU: 1}, refiner-0 {CPU: 1}, reward-0 {CPU: 0.1}, buffer {CPU: 0.1}"
    assert f"demand: {{CPU: 3.2}}: {bundles}" in message
    assert "supply: {CPU: 2} on 1 node" in message and "memory" not in message  # only what the bundles ask for
    for field in ("learner.num_cpus=1 (x learner.num_ranks=1)", "generator.engine.num_cpus=1",
                  "refiner.engine.num_cpus=1", "reward.num_cpus=0.1 (x reward.num_workers=1)"):  # fmt: skip
        assert field in message, field
    assert "ray start --head --num-cpus 4" in message and "ray.num_cpus=4" in message


def test_a_cluster_that_can_hold_the_group_passes():
    config = load("configs/quickstart.yaml")
    layout = placement.plan(config)
    assert placement.check_fits(config, layout, [{"CPU": 4.0}]) is None
    assert placement.check_fits(config, layout, [{"CPU": 2.0}, {"CPU": 2.0}]) is None  # PACK may split them


def test_strict_pack_needs_one_node_that_holds_every_bundle():
    config = load("configs/quickstart.yaml", ["placement.strategy=STRICT_PACK"])
    with pytest.raises(placement.PlacementError, match=r"STRICT_PACK puts every bundle on one node, and no node "
                       r"holds \{CPU: 3.2\}"):  # fmt: skip
        placement.check_fits(config, placement.plan(config), [{"CPU": 2.0}, {"CPU": 2.0}])


def test_strict_spread_needs_a_node_per_bundle():
    config = load("configs/quickstart.yaml", ["placement.strategy=STRICT_SPREAD"])
    with pytest.raises(placement.PlacementError, match="5 bundles, 2 nodes"):
        placement.check_fits(config, placement.plan(config), [{"CPU": 8.0}, {"CPU": 8.0}])


def test_a_bundle_larger_than_every_node_fails_even_when_the_totals_fit():
    config = load("configs/quickstart.yaml", ["learner.num_cpus=3"])  # 5.2 CPUs in all, on 3 nodes of 2
    with pytest.raises(placement.PlacementError) as failure:
        placement.check_fits(config, placement.plan(config), [{"CPU": 2.0}] * 3)
    message = str(failure.value)
    assert "bundle learner-0 {CPU: 3} is larger than every node" in message
    assert "in all" not in message  # the totals are not the problem


def test_missing_gpus_name_the_gpu_fields():
    config = load("configs/quickstart.yaml", GPU_RUN)  # 2 learner ranks + a TP-2 generator + the refiner: 5 GPUs
    with pytest.raises(placement.PlacementError) as failure:
        placement.check_fits(config, placement.plan(config), [{"CPU": 16.0, "GPU": 4.0}])
    message = str(failure.value)
    assert "GPU: the bundles ask for 5 in all, the cluster has 4" in message
    for field in ("learner.num_gpus=1 (x learner.num_ranks=2)", "generator.engine.num_gpus=2",
                  "refiner.engine.num_gpus=1"):  # fmt: skip
        assert field in message, field
    assert "CPU: the bundles" not in message and "CPU: lower" not in message  # 4.2 CPUs fit in 16


def test_a_pinned_stage_needs_nodes_that_advertise_its_resource():
    config = load("configs/quickstart.yaml", ["placement.node_resources={learner: train}"])
    with pytest.raises(placement.PlacementError) as failure:
        placement.check_fits(config, placement.plan(config), [{"CPU": 8.0}])
    message = str(failure.value)
    assert "bundle learner-0 {CPU: 1, train: 0.001} is larger than every node" in message
    assert "placement.node_resources pins learner to nodes that advertise 'train'" in message
    assert """ray start --resources='{"train": 1}'""" in message


def test_colocated_bundles_are_named_by_both_stages():
    config = load(
        "configs/quickstart.yaml",
        ["placement.layout=colocated", "learner.num_gpus=0.5", "generator.engine.num_gpus=0.5",
         "generator.engine.enable_sleep_mode=true"],
    )  # fmt: skip
    with pytest.raises(placement.PlacementError) as failure:
        placement.check_fits(config, placement.plan(config), [{"CPU": 8.0}])
    message = str(failure.value)
    assert "bundle learner-0+generator-0 {CPU: 2, GPU: 1}" in message
    assert "learner.num_ranks=1 (one GPU per learner rank + generator pair)" in message


# ---- start-up order (placement.start_actors against a fake Ray that records every call) ------------------------


class _FakeRef:
    def __init__(self, label: str, value=None):
        self.label, self.value = label, value


class _FakeActor:
    def __init__(self, fake, name: str):
        self._fake, self._name = fake, name

    def __getattr__(self, method: str):
        fake, name = self._fake, self._name

        class Method:
            @staticmethod
            def remote(*args):
                label = f"{name}.{args[0].__name__ if method == '__ray_call__' else method}"
                fake.log.append(("call", label))
                return _FakeRef(label, 29500 if method == "free_port" else "10.0.0.1")

        return Method


class _FakeRay:
    """What start_actors uses of `ray`: remote classes, `get` (logged per ref, in order) and `nodes`."""

    exceptions = type("exceptions", (), {"GetTimeoutError": TimeoutError})

    def __init__(self):
        self.log: list[tuple[str, str]] = []

    def remote(self, cls):
        fake = self

        class ActorClass:
            @staticmethod
            def options(name: str, **_options):
                class Handle:
                    @staticmethod
                    def remote(*_args):
                        fake.log.append(("start", name))
                        return _FakeActor(fake, name)

                return Handle

        return ActorClass

    def get(self, refs, timeout):
        assert timeout > 0
        for ref in refs if isinstance(refs, list) else [refs]:
            self.log.append(("get", ref.label))
        return [r.value for r in refs] if isinstance(refs, list) else refs.value

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}}]


def _start_with_fake_ray(monkeypatch, overrides: list[str]) -> list[tuple[str, str]]:
    fake = _FakeRay()
    monkeypatch.setattr(placement, "ray", fake)
    monkeypatch.setattr(remote, "ray", fake)  # placement's waits go through remote.wait
    group = type("PlacementGroup", (), {"ready": staticmethod(lambda: _FakeRef("pg.ready"))})
    monkeypatch.setattr(placement, "placement_group", lambda *_args, **_kwargs: group)
    monkeypatch.setattr(placement, "PlacementGroupSchedulingStrategy", lambda *_a, **_k: None)
    monkeypatch.setattr(placement, "autoscaler_may_add_nodes", lambda: False)
    placement.start_actors(load("configs/quickstart.yaml", overrides), "model", timeout_s=5)
    return fake.log


COLOCATED = [
    "placement.layout=colocated", "learner.num_ranks=2", "generator.engine.num_engines=2",
    "learner.num_gpus=0.5", "generator.engine.num_gpus=0.5", "generator.engine.enable_sleep_mode=true",
]  # fmt: skip


def test_colocated_engines_start_and_sleep_before_any_learner_rank_allocates(monkeypatch):
    """OpenRLHF's order (create_vllm_engines, which ends with every engine's `sleep`, then the actors' DeepSpeed
    init): vLLM sizes its memory against what is free on the GPU, so it starts first, then frees it."""
    log = _start_with_fake_ray(monkeypatch, COLOCATED)
    first_setup = log.index(("call", "learner-0.setup"))
    for i in (0, 1):
        started = log.index(("start", f"generator-{i}"))
        asleep = log.index(("get", f"generator-{i}.sleep"))  # waited on: the engine is up, then asleep
        assert started < log.index(("call", f"generator-{i}.sleep")) < asleep < first_setup
    # the ranks' rendezvous port is picked once the engines (and their own stores) are up
    assert log.index(("get", "generator-1.sleep")) < log.index(("call", "learner-0.free_port"))


def test_disaggregated_learner_setup_overlaps_the_engines_start_up(monkeypatch):
    log = _start_with_fake_ray(monkeypatch, [])
    assert not any(".sleep" in label for _, label in log)
    assert log.index(("call", "learner-0.setup")) < log.index(("start", "generator-0"))
    assert log[-1] == ("get", "learner-0.setup")  # start_actors returns once the ranks are set up


@pytest.mark.ray
def test_quickstart_on_a_two_cpu_cluster_fails_within_seconds():
    """The issue's report: the quickstart (3.2 CPUs of bundles) on a 2-CPU cluster, which used to sit with a
    pending group for the whole `ray.startup_timeout_s` (600 s). Its own cluster, in a subprocess: the session's
    shared cluster has other resources, and a process joins one Ray cluster only."""
    code = """
import json, time
import ray
from rlhf_refiner import placement, remote
from rlhf_refiner.config import load

ray.init(address="local", num_cpus=2, include_dashboard=False)
config = load("configs/quickstart.yaml")
assert config.ray.startup_timeout_s == 600
started = time.monotonic()
try:
    placement.start_actors(config, "unused: no actor starts", timeout_s=config.ray.startup_timeout_s)
    error = None
except placement.PlacementError as e:
    error = str(e)
seconds = time.monotonic() - started
groups = len(ray.util.placement_group_table())
may_grow = placement.autoscaler_may_add_nodes()
print(json.dumps({"seconds": seconds, "error": error, "groups": groups, "may_grow": may_grow}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["seconds"] < 10 and result["groups"] == 0  # failed before creating the group
    assert not result["may_grow"]  # ray.init's read-only autoscaler: a fixed cluster
    assert "CPU: the bundles ask for 3.2 in all, the cluster has 2" in result["error"]
    assert "ray start --head --num-cpus 4" in result["error"] and "learner.num_cpus=1" in result["error"]
