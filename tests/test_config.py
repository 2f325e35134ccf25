import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_refiner import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_opens_with_its_command(path):
    config = config_lib.load(path)
    assert isinstance(config, config_lib.Config)
    first_line = path.read_text().splitlines()[0]
    own = path.relative_to(ROOT).as_posix()
    # the command that runs it: plain for CPU configs, `ray job submit` for the GPU experiments
    gpu = own.startswith(("configs/paper/", "configs/bench/"))
    launcher = "# ray job submit " if gpu else "# python "
    assert (config.learner.num_gpus > 0) == gpu and (config.sync.backend == "nccl") == gpu
    if own.startswith("configs/repro/"):  # a reproduction regime: the comparison over arms and seeds runs it
        assert first_line.startswith(f"# bash scripts/reproduce_cpu.sh {own} "), first_line
        return
    assert first_line.startswith(launcher), first_line
    assert first_line.endswith(f"python scripts/train.py --config {own}"), first_line


def test_unknown_key_fails_and_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: 3\n  stepz: 4\n")
    with pytest.raises(config_lib.ConfigError, match=r"trainer\.stepz: unknown key"):
        config_lib.load(bad)


def test_unknown_override_fails_and_names_it():
    with pytest.raises(config_lib.ConfigError, match=r"algo\.lambda: unknown key"):
        config_lib.load(None, ["algo.lambda=2"])


def test_overrides_are_typed_and_applied():
    config = config_lib.load(None, ["trainer.steps=7", "algo.constraint=static_kl", "generator.sampling.stop=[x]"])
    assert config.trainer.steps == 7
    assert config.algo.constraint == "static_kl"
    assert config.generator.sampling.stop == ["x"]


def test_bad_literal_names_field():
    with pytest.raises(config_lib.ConfigError, match=r"algo\.constraint"):
        config_lib.load(None, ["algo.constraint=kl"])


def test_batch_not_divisible_by_updates_names_fields():
    with pytest.raises(config_lib.ConfigError, match=r"learner\.updates_per_step"):
        config_lib.load(None, ["data.prompts_per_step=3", "generator.group_size=3", "learner.updates_per_step=2"])


def test_template_must_hold_query_and_response():
    with pytest.raises(config_lib.ConfigError, match=r"\{response\}"):
        config_lib.load(None, ["refiner.template={query} fix it"])


def test_override_without_equals_is_rejected():
    with pytest.raises(config_lib.ConfigError, match="key.sub=value"):
        config_lib.load(None, ["trainer.steps"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="nope.yaml"):
        config_lib.load(tmp_path / "nope.yaml")


def test_config_imports_no_torch_ray_or_vllm():
    code = "import sys, rlhf_refiner.config; print(sorted(m for m in ('torch','ray','vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_dump_round_trips(tmp_path):
    config = config_lib.load(None, ["trainer.steps=5", "learner.deepspeed.zero_optimization.stage=2"])
    path = tmp_path / "c.yaml"
    path.write_text(config_lib.dump(config))
    assert config_lib.load(path) == config


def test_micro_batch_must_divide_update_names_fields():
    with pytest.raises(config_lib.ConfigError, match=r"learner\.micro_batch_size \(24\)"):
        config_lib.load(None, ["data.prompts_per_step=8", "generator.group_size=8", "learner.micro_batch_size=24"])


def test_generator_top_p_below_one_is_refused_and_named():
    # the learner cannot reproduce the nucleus-truncated distribution vLLM samples from (see GeneratorConfig)
    with pytest.raises(config_lib.ConfigError, match=r"generator\.sampling\.top_p"):
        config_lib.load(None, ["generator.sampling.top_p=0.9"])
    # temperature is supported on both sides, and the refiner's top_p feeds no policy gradient
    config = config_lib.load(None, ["generator.sampling.temperature=0.7", "refiner.sampling.top_p=0.9"])
    assert config.generator.sampling.temperature == 0.7


def test_generator_temperature_below_vllms_floor_is_refused_and_named():
    with pytest.raises(config_lib.ConfigError, match=r"generator\.sampling\.temperature \(0\.005\)"):
        config_lib.load(None, ["generator.sampling.temperature=0.005"])
    assert config_lib.load(None, ["generator.sampling.temperature=0"]).generator.sampling.temperature == 0


@pytest.mark.parametrize("key", ["gradient_accumulation_steps", "gradient_clipping", "gradient_predivide_factor"])
def test_deepspeed_keys_the_learner_owns_are_refused(key):
    """A passed-through accumulation count would break the update's normaliser and boundary, and a predivide
    factor would scale gradients twice under ZeRO-3: refused, naming the key and the fields to set instead."""
    with pytest.raises(config_lib.ConfigError, match=f"learner.deepspeed sets {key}.*learner.micro_batch_size"):
        config_lib.load(None, [f"learner.deepspeed={{{key}: 2}}"])
