"""The embedded π0: its SFT mix (how often it is taught to show its work, and that the refiner is taught to strip
it), and its build to quality bands (where it stops, what it reports, how it fails, what its cache key holds)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_refiner import pi0, task
from rlhf_refiner.config import EmbeddedModelConfig, TaskConfig

TEMPLATE = "{query}{response}>"
ROOT = Path(__file__).resolve().parents[1]


def _examples(tmp_path, n: int, **build) -> list[tuple[str, str]]:
    """(user, assistant) texts of n SFT examples drawn as the builder draws them."""
    tokenizer = pi0.build_tokenizer(tmp_path)
    chat = pi0.ChatEncoder(tokenizer)
    rng = random.Random(0)
    config = EmbeddedModelConfig(**build)
    out = []
    for _ in range(n):
        ids, start = pi0._sft_example(rng, chat, TaskConfig(), TEMPLATE, config)
        assert ids[-1] == tokenizer.eos_token_id
        user = tokenizer.decode(ids[:start], skip_special_tokens=True)
        out.append((user, tokenizer.decode(ids[start:-1])))
    return out


def _shows_work(refine_user: str) -> bool:
    """Whether a refiner example's candidate ends with the query's working (`47+85=231=47+85>`)."""
    query, candidate = refine_user.split("=", 1)
    return candidate.removesuffix(">").endswith("=" + query)


def test_verbose_build_shows_work_at_its_fraction_and_refines_it_away(tmp_path):
    examples = _examples(tmp_path, 4000, refine_fraction=0.5, verbose_fraction=0.1)
    solving = [(u, a) for u, a in examples if ">" not in u]
    refining = [(u, a) for u, a in examples if ">" in u]
    shown = [a for _, a in solving if "=" in a]
    # ~2000 solving examples, a tenth with work shown: binomial sd ~13, so 150..250 is > 3.5 sd either side
    assert 150 < len(shown) < 250
    for user, answer in solving:
        problem = task.Problem(user, answer.split("=")[0])
        assert answer in (problem.answer, problem.answer + task.working(problem))
    # the refiner's target is always the clean answer, also for candidates that show their work
    verbose_candidates = [u for u, _ in refining if _shows_work(u)]
    assert 250 < len(verbose_candidates) < 420  # a third of the corrupted half of ~2000: ~333, sd ~17
    assert all("=" not in a for _, a in refining)


@pytest.mark.parametrize("refine_fraction", [0.0, 0.5])
def test_default_build_never_shows_work(tmp_path, refine_fraction):
    examples = _examples(tmp_path, 1000, refine_fraction=refine_fraction)
    assert all("=" not in answer for _, answer in examples)
    assert not any(_shows_work(u) for u, _ in examples if ">" in u)


def _build(tmp_path, *overrides: str):
    """Build π0 through `ensure_built` into a fresh cache under `tmp_path`; (path, quality.json)."""
    from rlhf_refiner.config import load

    config = load(None, [f"model.embedded.cache_dir={tmp_path / 'cache'}", *overrides])
    path = pi0.ensure_built(config.model.embedded, config.task, config.refiner.template)
    return path, json.loads((path / "quality.json").read_text())


def test_a_build_stops_at_the_first_check_inside_every_band_and_reports_that_checks_values(tmp_path):
    # bands that hold from the first check on: the build stops there, at step 5 of its 40
    path, quality = _build(
        tmp_path,
        "model.embedded.targets.solve_accuracy=[0.0, 1.0]",
        "model.embedded.targets.copy_when_correct=[0.0, 1.0]",
        "model.embedded.eval_every=5",
        "model.embedded.sft_steps=40",
    )
    assert quality["stopped_at_step"] == 5 and [c["step"] for c in quality["checks"]] == [5]
    assert quality["targets"] == {"solve_accuracy": [0.0, 1.0], "copy_when_correct": [0.0, 1.0]}
    # the held-out problems are fixed: the reported value is the stopping check's, to the digit
    assert quality["solve_accuracy"] == quality["checks"][0]["solve_accuracy"]
    assert quality["copy_when_correct"] == quality["checks"][0]["copy_when_correct"]
    assert quality["cpu"] == pi0.cpu_model() and quality["threads"] == 2 and quality["cpu_capability"]
    assert (path / "model.safetensors").exists()


def test_a_build_outside_its_band_at_the_cap_fails_naming_the_band_and_caches_nothing(tmp_path):
    with pytest.raises(pi0.Pi0BuildError) as error:
        _build(
            tmp_path,
            "model.embedded.targets.solve_accuracy=[0.9, 1.0]",
            "model.embedded.eval_every=10",
            "model.embedded.sft_steps=20",
        )
    message = str(error.value)
    assert "model.embedded.targets.solve_accuracy = [0.9, 1.0]" in message
    assert "model.embedded.sft_steps = 20" in message and pi0.cpu_model() in message
    assert "closest check, at step 20 (2 checks, every 10 steps): inside no band" in message
    assert "model.embedded.targets=null" in message  # what to change is part of the error
    # no π0 cached and no half-built temp dir left; what the checks measured is kept, and the error names it
    (missed,) = (tmp_path / "cache").iterdir()
    assert missed.name.endswith(".missed.json") and str(missed) in message
    report = json.loads(missed.read_text())
    assert [check["step"] for check in report["checks"]] == [10, 20] and "solve_accuracy" in report["at_cap"]


def test_without_targets_a_build_trains_its_step_count_and_checks_nothing(tmp_path):
    _, quality = _build(tmp_path, "model.embedded.targets=null", "model.embedded.sft_steps=12")
    assert quality["stopped_at_step"] == 12 and quality["checks"] == [] and quality["targets"] == {}
    assert set(pi0.QUALITY_METRICS) <= set(quality)


def test_the_cache_key_follows_the_targets_and_the_thread_count():
    from rlhf_refiner.config import load

    def key(*overrides: str) -> str:
        config = load(None, list(overrides))
        return pi0.cache_key(config.model.embedded, config.task, config.refiner.template)

    base = key()
    assert base == key("model.embedded.cache_dir=/elsewhere")  # where it is cached is not what is built
    assert base != key("model.embedded.targets.solve_accuracy=[0.5, 0.6]")
    assert base != key("model.embedded.targets.degenerate_rate=[0.04, 0.08]")
    assert base != key("model.embedded.targets=null")
    assert base != key("model.embedded.threads=1")


def test_a_check_stops_measuring_at_the_first_metric_outside_its_band(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = pi0.build_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    ).eval()
    held_out = pi0.HeldOut(TaskConfig(), random.Random(1), n=16)
    every = pi0.measure(model, tokenizer, TEMPLATE, held_out, pi0.QUALITY_METRICS)
    assert list(every) == [*pi0.QUALITY_METRICS[:3], "changed_when_corrupted", *pi0.QUALITY_METRICS[3:]]
    # an untrained model solves nothing: the solve band [0.5, 1] fails first, and nothing after it is measured
    bands = {"solve_accuracy": (0.5, 1.0), "degenerate_rate": (0.0, 1.0)}
    checked = pi0.measure(model, tokenizer, TEMPLATE, held_out, bands, stop_outside=bands)
    assert checked == {"solve_accuracy": every["solve_accuracy"]} and every["solve_accuracy"] < 0.5
    # measuring again gives the same values (greedy, and T=1 under the held-out seed), whatever ran in between
    torch.rand(3)
    assert pi0.measure(model, tokenizer, TEMPLATE, held_out, pi0.QUALITY_METRICS) == every


BUILD = """
import json, sys
from rlhf_refiner import pi0
from rlhf_refiner.config import load
config = load("configs/quickstart.yaml", sys.argv[1:])
path = pi0.ensure_built(config.model.embedded, config.task, config.refiner.template)
print("QUALITY " + (path / "quality.json").read_text().replace(chr(10), " "))
"""


@pytest.mark.ray  # for its cost (three builds, ~2.5 min), not for Ray
def test_the_quickstart_pi0_lands_in_its_bands_under_other_float_reduction_orders(tmp_path):
    """What another CPU changes is the float reduction order of the build's kernels. Here it changes two ways:
    1 or 2 torch threads, and other kernels: ATen's for another instruction set (ATEN_CPU_CAPABILITY, what a CPU
    without this one's widest vector unit runs: softmax, norms, elementwise ops) together with MKL's
    conditional-numerical-reproducibility code path (MKL_CBWR=COMPATIBLE: other GEMM kernels, as MKL picks on
    another CPU). Each build must stop inside the quickstart's bands, and the variations must change the build
    (its check history), or the test showed nothing; on the Intel Xeon it was written on all three differ."""
    from rlhf_refiner.config import load

    bands = load("configs/quickstart.yaml").model.embedded.targets.bands()
    native = torch.backends.cpu.get_cpu_capability()
    other = "AVX2" if native == "AVX512" else "DEFAULT"

    def start(threads: int, kernels: str) -> subprocess.Popen:
        env = dict(os.environ)
        if kernels == "other":
            env.update(ATEN_CPU_CAPABILITY=other.lower(), MKL_CBWR="COMPATIBLE")
        cache = tmp_path / f"{threads}-{kernels}"
        overrides = [f"model.embedded.threads={threads}", f"model.embedded.cache_dir={cache}"]
        command = [sys.executable, "-c", BUILD, *overrides]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(process: subprocess.Popen) -> dict:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        return json.loads(next(line for line in stdout.splitlines() if line.startswith("QUALITY "))[8:])

    # one core each for the single-threaded builds, side by side; then the two-threaded one alone
    pending = {(1, "native"): start(1, "native"), (1, "other"): start(1, "other")}
    builds = {key: result(process) for key, process in pending.items()}
    builds[(2, "native")] = result(start(2, "native"))
    for (threads, kernels), quality in builds.items():
        for name, (low, high) in bands.items():
            assert low <= quality[name] <= high, (threads, kernels, name, quality[name])
        assert quality["threads"] == threads and quality["cpu_capability"] == (other if kernels == "other" else native)
        assert quality["stopped_at_step"] < quality["sft_steps"]
    histories = {json.dumps(quality["checks"]) for quality in builds.values()}
    assert len(histories) >= 2, "neither variation changed the build: no portability was shown"
