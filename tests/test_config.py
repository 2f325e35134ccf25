import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

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
    if gpu:  # a job runs in Ray's temporary copy of --working-dir: its outputs go to an absolute path
        first_line, _, output_dir = first_line.rpartition(" trainer.output_dir=")
        assert output_dir.startswith("/"), output_dir
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


def test_template_fields_are_checked_by_name():
    with pytest.raises(config_lib.ConfigError, match=r"'\{answer\}'.*\{reference\}"):  # a typo, not a KeyError later
        config_lib.load(None, ["refiner.template={query}{response} {answer}"])
    with pytest.raises(config_lib.ConfigError, match=r"refiner\.template: Single '\}'.*\{\{"):
        config_lib.load(None, ["refiner.template={query}{response} }"])
    assert config_lib.load(None, ["refiner.template={query}{response} {{x}} {reference}"]).refiner.template
    for shaped in ("{query}{response!r}", "{query}{response:.10}", "{query:>{reference}}{response}"):
        with pytest.raises(config_lib.ConfigError, match="conversion or format spec"):
            config_lib.load(None, [f"refiner.template={shaped}"])
    with pytest.raises(config_lib.ConfigError, match=r"\{reference\}.*data\.source=mbpp"):
        config_lib.load(None, ["refiner.template={query}{response}{reference}", "data.source=mbpp", "data.path=x"])


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


def test_unknown_key_is_answered_with_the_closest_key(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"algo\.kl_coeff: unknown key \(did you mean algo\.kl_coef\?\)"):
        config_lib.load(None, ["algo.kl_coeff=1"])
    nested = tmp_path / "nested.yaml"  # the loc is walked through nested sections, also from a file
    nested.write_text("generator:\n  sampling:\n    tempreature: 0.5\n")
    with pytest.raises(config_lib.ConfigError, match=r"\(did you mean generator\.sampling\.temperature\?\)"):
        config_lib.load(nested)


def test_unknown_section_is_answered_with_the_closest_section():
    with pytest.raises(config_lib.ConfigError, match=r"\n  algoo: unknown key \(did you mean algo\?\)"):
        config_lib.load(None, ["algoo.kl_coef=1"])


def test_unknown_key_without_a_close_one_lists_the_sections_keys():
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(None, ["buffer.zzz=1"])
    assert "buffer.zzz: unknown key (valid keys of buffer: max_staleness, capacity)" in str(info.value)


def _leaf_keys(section, prefix=""):
    for name, value in section:
        if isinstance(value, BaseModel):
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_describe_lists_every_key_with_its_default():
    lines = [line.strip() for line in config_lib.describe().splitlines()]
    defaults = config_lib.Config().model_dump(mode="json")
    keys = list(_leaf_keys(config_lib.Config()))
    assert len(keys) > 100
    for key in keys:
        shown = [line for line in lines if line.startswith(f"{key}: ")]
        assert len(shown) == 1, key
        rendered = shown[0].removeprefix(f"{key}: ").rsplit("  (", 1)[0]
        default = defaults
        for part in key.split("."):
            default = default[part]
        # the shown default is what one would write in YAML or an override: it parses back to the default
        assert yaml.safe_load(rendered) == default, (key, rendered)
    # the instance default of a nested section, not its class's: the refiner decodes greedily
    assert "refiner.sampling.temperature: 0.0  (float, >=0)" in lines
    assert "generator.sampling.temperature: 1.0  (float, >=0)" in lines
    assert "learner.deepspeed: {zero_optimization: {stage: 0}}  (dict[str, Any])" in lines


def test_describe_shows_docstrings_first_sentence_or_in_full():
    brief, full = config_lib.describe("algo"), config_lib.describe("algo", full=True)
    assert "Estimator of KL(π_θ‖π0) in the `static_kl` loss. …" in brief
    assert "k1's expected gradient" not in brief and "k1's expected gradient" in full
    assert "      β, weight of the KL to π0 (`static_kl`)." in brief.splitlines()
    with pytest.raises(config_lib.ConfigError, match=r"unknown config section 'algo\.kl_coeff' \(did you mean"):
        config_lib.describe("algo.kl_coeff")


def _train(*args, python_flags=()):
    cmd = [sys.executable, *python_flags, str(ROOT / "scripts/train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_train_help_lists_the_config_tree_without_config_or_torch():
    result = _train("--help", python_flags=("-X", "importtime"))  # stderr: one line per imported module
    assert result.returncode == 0, result.stderr
    assert "usage: train.py" in result.stdout and "--help-config" in result.stdout
    assert "\nConfig keys (defaults)" in result.stdout
    assert "  algo.kl_coef: 0.05  (float, >=0)\n" in result.stdout
    assert "  generator.sampling.max_new_tokens: 16  (int, >=1)\n" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert "yaml" in imported and not imported & {"torch", "ray", "vllm"}


def test_train_help_config_prints_one_section():
    result = _train("--help-config", "algo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[algo]\n") and "  algo.kl_coef: 0.05  (float, >=0)\n" in result.stdout
    assert "k1's expected gradient" in result.stdout  # full docstrings
    keys = [line.split(":")[0].strip() for line in result.stdout.splitlines() if re.match(r"  \S", line)]
    assert "algo.tis_cap" in keys and not [key for key in keys if key.startswith("trainer.")]
    assert "usage" not in result.stdout


def test_train_help_config_refuses_an_unknown_section_and_train_needs_config():
    result = _train("--help-config", "algoo")
    assert result.returncode == 2 and result.stdout == ""
    assert "error: unknown config section 'algoo' (did you mean algo?)" in result.stderr
    result = _train()
    assert result.returncode == 2 and "the following arguments are required: --config" in result.stderr


def test_a_partial_refiner_sampling_keeps_the_refiner_greedy():
    """`refiner.sampling.max_new_tokens=5` alone (an override, or a YAML naming only that) used to build a fresh
    SamplingConfig at T = 1, silently turning the greedy refiner (exact copies, dedupe) into a sampling one."""
    config = config_lib.load(None, ["refiner.sampling.max_new_tokens=25"])
    assert config.refiner.sampling.temperature == 0.0 and config.refiner.sampling.max_new_tokens == 25
    sampling = ["refiner.sampling.temperature=0.7", "refiner.speculative.method=none"]  # CPU: no ngram when sampling
    assert config_lib.load(None, sampling).refiner.sampling.temperature == 0.7
    assert config_lib.load(None, ["generator.sampling.max_new_tokens=5"]).generator.sampling.temperature == 1.0


def test_the_refiners_budget_follows_the_generators_and_is_never_smaller():
    """A config that raises the generator's budget and says nothing of the refiner's used to keep the refiner at 16
    tokens: every longer a' was a fallback, and the CE silently zero."""
    raised = config_lib.load(None, ["generator.sampling.max_new_tokens=64"])
    assert raised.refiner.sampling.max_new_tokens == 80  # 64 and a quarter
    assert raised.refiner.sampling.temperature == 0.0
    assert config_lib.load(None, ["generator.sampling.max_new_tokens=8"]).refiner.sampling.max_new_tokens == 12
    with pytest.raises(config_lib.ConfigError) as refused:
        config_lib.load(None, ["generator.sampling.max_new_tokens=64", "refiner.sampling.max_new_tokens=16"])
    assert "refiner.sampling.max_new_tokens (16) is below generator.sampling.max_new_tokens (64)" in str(refused.value)
    assert config_lib.load("configs/smollm2.yaml", []).refiner.sampling.max_new_tokens == 96  # said: kept


@pytest.mark.parametrize(
    ("dtype", "deepspeed", "refused"),
    [
        ("bfloat16", "{}", None),  # no section: the learner turns on bf16 (fp32 masters)
        ("bfloat16", "{bf16: {enabled: false}}", "without fp32 master copies"),
        ("bfloat16", "{fp16: {enabled: true}}", "without fp32 master copies"),
        ("bfloat16", "{bf16: {enabled: false}, zero_optimization: {stage: 2}}", None),  # ZeRO keeps fp32 partitions
        ("float16", "{fp16: {enabled: false}, zero_optimization: {stage: 2}}", "without loss scaling"),
        ("float16", "{fp16: {enabled: true}}", None),
        ("float32", "{bf16: {enabled: false}}", None),
    ],
)
def test_low_precision_weights_without_master_copies_are_refused(dtype, deepspeed, refused):
    overrides = [f"model.dtype={dtype}", f"learner.deepspeed={deepspeed}"]
    if refused is None:
        config_lib.load(None, overrides)
        return
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load(None, overrides)
    message = str(error.value)
    assert refused in message and f"model.dtype={dtype}" in message and "learner.deepspeed" in message


def test_a_code_test_that_cannot_fit_the_candidates_limit_is_refused():
    """test_timeout_s 15 under max_seconds 10 used to make every sample an infrastructure error (the judge could not
    give a test its CPU limit)."""
    with pytest.raises(config_lib.ConfigError, match=r"reward.code.test_timeout_s \(15\) x wall_factor"):
        config_lib.load(None, ["reward.code.test_timeout_s=15", "reward.code.max_seconds=10"])
    config_lib.load(None, ["reward.code.test_timeout_s=15", "reward.code.max_seconds=60"])


def test_a_decay_that_ends_before_a_fresh_run_does_at_zero_is_refused():
    schedule = ["learner.lr_schedule=linear", "trainer.steps=10", "learner.lr_schedule_updates=5"]
    with pytest.raises(config_lib.ConfigError, match="learning rate would be 0 from update 5"):
        config_lib.load(None, schedule)
    assert config_lib.load(None, [*schedule, "learner.min_lr_ratio=0.1"]).learner.lr_schedule_updates == 5
