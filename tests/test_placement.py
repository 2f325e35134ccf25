"""placement.plan: config resources -> bundles, without a cluster or GPUs; the GPU arithmetic and its errors."""

from __future__ import annotations

import pytest

from rlhf_refiner import placement
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
