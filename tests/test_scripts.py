"""scripts/compare.py on synthetic run directories in the real output format; the sandbox benchmark's smoke run."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run_dir(
    tmp_path: Path,
    name: str,
    constraint: str,
    rewards: list[float],
    kl_coef: float = 0.05,
    ce_coef: float = 1.0,
    trainer_steps: int | None = None,
    lora: tuple[int, float] | None = None,
    merged: bool = False,
    refiner: dict | None = None,
) -> Path:
    run = tmp_path / name
    run.mkdir(parents=True)
    algo = {"constraint": constraint, "advantage": "grpo", "kl_coef": kl_coef, "ce_coef": ce_coef}
    config = {"algo": algo} if trainer_steps is None else {"algo": algo, "trainer": {"steps": trainer_steps}}
    if lora is not None:  # (rank, learning rate)
        sync = {"sync": "merged"} if merged else {}
        config.update(model={"lora": {"rank": lora[0], **sync}}, learner={"lr": lora[1]})
    if refiner is not None:
        config["refiner"] = refiner
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": i + 1, "reward/mean": r, "learner/kl_to_ref": 0.1 * i} for i, r in enumerate(rewards)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_groups_seeds_into_arms_and_tabulates_final_values(tmp_path):
    runs = [
        _run_dir(tmp_path, "dyn-s0", "dynamic", [0.1, 0.5, 0.7]),
        _run_dir(tmp_path, "dyn-s1", "dynamic", [0.1, 0.3, 0.5]),
        _run_dir(tmp_path, "none-s0", "none", [0.2, 0.2, 0.2]),
        _run_dir(tmp_path, "kl-a", "static_kl", [0.0, 0.3, 0.3], kl_coef=0.3),
        _run_dir(tmp_path, "kl-b", "static_kl", [0.0, 0.9, 0.9], kl_coef=1.0),
        _run_dir(tmp_path, "dyn-half", "dynamic", [0.0, 0.4, 0.4], ce_coef=0.5),
        _run_dir(tmp_path, "dyn-r8", "dynamic", [0.0, 0.6, 0.6], lora=(8, 1e-3)),
        _run_dir(tmp_path, "dyn-r32", "dynamic", [0.0, 0.8, 0.8], lora=(32, 1e-3)),
        _run_dir(tmp_path, "dyn-r32-merged", "dynamic", [0.0, 0.2, 0.2], lora=(32, 1e-3), merged=True),
        _run_dir(tmp_path, "dyn-gated", "dynamic", [0.0, 0.1, 0.1], refiner={"mode": "gated", "template": "{query}"}),
        _run_dir(tmp_path, "dyn-ref", "dynamic", [0.0, 0.7, 0.7], refiner={"template": "{query} {reference}"}),
        _run_dir(tmp_path, "dyn-rank", "dynamic", [0.0, 0.3, 0.3], refiner={"mode": "gated", "gate_rank": 3}),
        _run_dir(tmp_path, "dyn-cut", "dynamic", [0.0, 0.4, 0.4], refiner={"extract_pattern": "(.*)"}),
        _run_dir(
            tmp_path,
            "dyn-ref-tau",
            "dynamic",
            [0.0, 0.9, 0.9],
            refiner={"mode": "gated", "gate_tau": 0.1, "template": "{reference}"},
        ),
    ]
    out = tmp_path / "fig.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/compare.py"), *map(str, runs), "--out", str(out), "--last", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # dynamic: last-2 means 0.6 and 0.4 -> 0.500 ± 0.141; none: 0.200
    assert "| dynamic | 2 | 0.500 ± 0.141 |" in result.stdout
    assert "| none | 1 | 0.200 |" in result.stdout
    # static_kl at two β: two arms, not one arm of two seeds
    assert "| static_kl β=0.3 | 1 | 0.300 |" in result.stdout and "| static_kl β=1 | 1 | 0.900 |" in result.stdout
    assert "| dynamic λ=0.5 | 1 | 0.400 |" in result.stdout  # and dynamic at another λ is its own arm
    assert "| dynamic LoRA r=8 lr=0.001 | 1 | 0.600 |" in result.stdout  # and each LoRA rank
    assert "| dynamic LoRA r=32 lr=0.001 | 1 | 0.800 |" in result.stdout  # and a merged sync: not one arm's seed
    assert "| dynamic LoRA r=32 lr=0.001 merged | 1 | 0.200 |" in result.stdout
    # and another kind of refiner: the gated copy (at its τ), a template that shows π0 the reference
    assert "| dynamic gated | 1 | 0.100 |" in result.stdout and "| dynamic +reference | 1 | 0.700 |" in result.stdout
    assert "| dynamic +reference gated τ=0.1 | 1 | 0.900 |" in result.stdout
    assert (
        "| dynamic gated rank≤3 | 1 | 0.300 |" in result.stdout and "| dynamic +extract | 1 | 0.400 |" in result.stdout
    )
    # an escaped {{reference}} is literal text, not the field: that run is plain dynamic
    braces = _run_dir(tmp_path / "more", "dyn-braces", "dynamic", [0.5], refiner={"template": "{query} {{reference}}"})
    assert _compare_module().load_run(braces)[0] == "dynamic"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_tabulates_first_to_last_on_the_keys_asked(tmp_path):
    runs = [
        _run_dir(tmp_path, "dyn-s0", "dynamic", [0.1, 0.5, 0.7]),
        _run_dir(tmp_path, "dyn-s1", "dynamic", [0.3, 0.3, 0.5]),
    ]
    args = [*map(str, runs), "--out", str(tmp_path / "f.png"), "--last", "2", "--first", "1", "--keys", "reward/mean"]
    result = _compare(*args)
    assert result.returncode == 0, result.stderr
    # first step: 0.1 and 0.3 -> 0.200; last 2: 0.6 and 0.4 -> 0.500 ± 0.141; only the asked column
    assert "| arm | seeds | reward/mean |" in result.stdout
    assert "| dynamic | 2 | 0.200 → 0.500 ± 0.141 |" in result.stdout


def test_compare_prints_quarter_means_over_seeds(tmp_path):
    runs = [
        _run_dir(tmp_path, "dyn-s0", "dynamic", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.2, 0.2]),
        _run_dir(tmp_path, "dyn-s1", "dynamic", [0.2, 0.2, 0.6, 0.6, 0.6, 0.6, 0.0, 0.4]),
    ]
    result = _compare(*map(str, runs), "--out", str(tmp_path / "f.png"), "--keys", "reward/mean", "--quarters")
    assert result.returncode == 0, result.stderr
    # quarters of 8 steps are pairs: seed 0 0.1, 0.5, 0.9, 0.2; seed 1 0.2, 0.6, 0.6, 0.2; then the mean over seeds
    assert "| arm | seeds | reward/mean (quarters) |" in result.stdout
    assert "| dynamic | 2 | 0.150 → 0.550 → 0.750 → 0.200 |" in result.stdout


def test_compare_cuts_quarters_and_smooths_by_step_for_a_metric_logged_every_few_steps(tmp_path):
    compare = _compare_module()
    # learner/kl_to_ref logged at steps 1, 10 and 20 of 20 (as under dynamic): quarters by step, not by point
    rows = [
        {"step": s, **({"learner/kl_to_ref": {1: 0.0, 10: 1.0, 20: 2.0}[s]} if s in (1, 10, 20) else {})}
        for s in range(1, 21)
    ]
    table = compare.quarter_table({"dynamic": [rows]}, keys=["learner/kl_to_ref"])
    assert "| dynamic | 1 | 0.000 → 1.000 → – → 2.000 |" in table
    # and the final-value table's last 5 steps hold step 20's point alone; its first 5, step 1's
    assert "| dynamic | 1 | 0.000 → 2.000 |" in compare.final_table({"dynamic": [rows]}, 5, 5, ["learner/kl_to_ref"])
    # a 5-step window at step 20 holds only step 20's point, not the last three points
    assert compare.smooth([1, 10, 20], [0.0, 1.0, 2.0], 5) == [0.0, 1.0, 2.0]
    assert compare.smooth([1, 2, 3], [0.0, 1.0, 2.0], 2) == [0.0, 0.5, 1.5]
    # the figure dots a sparse series at its measured steps (a bare line reads as a measured rise), not a dense one,
    # also beside a step-0 held-out evaluation row and a shorter seed sorted first
    for row in rows:
        row["reward/mean"] = 0.5
    shorter = [{"step": 0, "eval/accuracy": 0.3}] + [dict(row) for row in rows[:12]]
    fig = compare.figure({"dynamic": [shorter, [{"step": 0, "eval/accuracy": 0.3}, *rows]]}, window=1)
    markers = {ax.get_ylabel(): ax.lines[0].get_marker() for ax in fig.axes if ax.lines}
    assert markers == {"reward/mean": "None", "learner/kl_to_ref": "o"}


def test_compare_names_a_bad_metrics_line(tmp_path):
    run = _run_dir(tmp_path, "bad", "none", [0.1])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/compare.py"), str(run), "--out", str(tmp_path / "f.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "metrics.jsonl:2" in result.stderr


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts/compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/compare.py"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def test_compare_figure_labels_every_panel_and_says_the_smoothing(tmp_path):
    compare = _compare_module()
    # the runs log only reward/mean and learner/kl_to_ref: the other four panels have no data, and still get labels
    arms = {}
    for name, rewards in [("a", [0.1, 0.5, 0.7]), ("b", [0.1, 0.3, 0.5])]:
        arm, rows, _ = compare.load_run(_run_dir(tmp_path, name, "dynamic", rewards))
        arms.setdefault(arm, []).append(rows)
    fig = compare.figure(arms, window=3)
    panels = fig.axes[: len(compare.PANELS)]
    assert [ax.get_ylabel() for ax in panels] == [key for key, _ in compare.PANELS]
    assert [ax.get_xlabel() for ax in panels] == ["step"] * len(compare.PANELS)
    assert "moving average over 3 steps" in fig._suptitle.get_text()
    raw = compare.figure(arms, window=1)._suptitle.get_text()
    assert "no smoothing" in raw and "over 1 steps" not in raw


def test_compare_refuses_a_smoothing_window_below_one(tmp_path):
    run = _run_dir(tmp_path, "a", "none", [0.1, 0.2])
    result = _compare(str(run), "--out", str(tmp_path / "f.png"), "--smooth", "0")
    assert result.returncode == 2 and "--smooth" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "f.png").exists()


def test_compare_writes_next_to_the_runs_by_default_and_never_over_an_earlier_figure(tmp_path):
    runs = [_run_dir(tmp_path / "sweep", name, "none", [0.1, 0.2]) for name in ("s0", "s1")]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    first = _compare(*map(str, runs), cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    figure = tmp_path / "sweep" / "compare.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figure: {figure}" in first.stdout
    assert not list(elsewhere.iterdir())
    before = figure.read_bytes()
    second = _compare(*map(str, runs), cwd=elsewhere)
    assert second.returncode == 0, second.stderr
    assert f"figure: {tmp_path / 'sweep' / 'compare-2.png'}" in second.stdout
    assert (tmp_path / "sweep" / "compare-2.png").exists() and figure.read_bytes() == before


def test_compare_warns_when_the_runs_have_different_horizons(tmp_path):
    short = _run_dir(tmp_path, "short", "dynamic", [0.1] * 5, trainer_steps=8)  # stopped after 5 of 8 steps
    long = _run_dir(tmp_path, "long", "none", [0.2] * 8, trainer_steps=8)
    result = _compare(str(short), str(long), "--out", str(tmp_path / "f.png"), "--last", "2")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "different horizons" in result.stderr
    assert f"{short}: 5 steps logged (trainer.steps=8)" in result.stderr
    assert f"{long}: 8 steps logged (trainer.steps=8)" in result.stderr
    assert "| dynamic | 1 | 0.100 |" in result.stdout and "| none | 1 | 0.200 |" in result.stdout  # still tabulated
    planned = _run_dir(tmp_path, "planned-10", "none", [0.2] * 8, trainer_steps=10)  # same length logged, not planned
    result = _compare(str(long), str(planned), "--out", str(tmp_path / "g.png"))
    assert "different horizons" in result.stderr and "trainer.steps=10" in result.stderr
    same = _run_dir(tmp_path, "same", "dynamic", [0.3] * 8, trainer_steps=8)
    result = _compare(str(long), str(same), "--out", str(tmp_path / "h.png"))
    assert result.returncode == 0 and "warning" not in result.stderr
    (same / "config_changes.jsonl").write_text('{"step": 4, "changes": {"algo.constraint": ["none", "dynamic"]}}\n')
    result = _compare(str(long), str(same), "--out", str(tmp_path / "i.png"))
    assert f"warning: {same} changed its config on a resume" in result.stderr  # one run, two experiments


@pytest.mark.parametrize("script", ["compare.py", "train.py"])
def test_scripts_show_help(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "usage" in result.stdout


def test_inspect_samples_shows_the_refiners_edit(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 1, "sample_id": "1-0-0", "query": "12+34=", "response": "65+=", "refined": "64", "reward": 0.5},
        {"step": 2, "sample_id": "2-0-0", "query": "12+34=", "response": "64", "refined": "64", "reward": 1.0},
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(ROOT / "scripts/inspect_samples.py"), str(run), "--no-color"]
    first = subprocess.run([*cmd, "--step", "1"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "refined  6[-5+=-]{+4+}" in first
    last = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "2-0-0" in last and "(unchanged)" in last


@pytest.mark.ray
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_benchmarks_quick_runs_every_figure(tmp_path):
    """`python -m benchmarks --quick`: every figure of the suite comes out as a JSON line (and nothing else on
    stdout), with a numeric value where one was measurable, and a dated row with machine info in the results."""
    results = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--results", str(results)],
        capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = {f["name"]: f for f in map(json.loads, done.stdout.splitlines())}
    expected = {"refine_copy", "refine_mixed", "refine_gate", "refine_editor", "dynamic_overhead", "orchestration",
                "sync", "vs_trl", "vs_trl_dynamic", "sandbox"}  # fmt: skip
    assert set(figures) == expected
    assert all(f["value"] is None or f["value"] > -1 for f in figures.values())
    assert figures["vs_trl"]["value"] > 0 and figures["sandbox"]["value"] > 0
    assert "copy-when-correct" in figures["refine_editor"]["measured"]
    table = results.read_text()
    assert all(f"| {name} |" in table for name in expected) and "cores" in table


def test_editor_rates_count_each_kind_of_edit_over_its_own_samples():
    """Hand-counted: four samples, two correct a (one copied, one broken by an edit that adds the degenerate
    pattern), two wrong a, both degenerate (one fixed, one left wrong; both a' are free of the pattern)."""
    from benchmarks.editor import editor_stats

    def edit(unchanged, correct, distance, degenerate=False, fallback=False):
        return {"unchanged": unchanged, "correct": correct, "degenerate": degenerate, "edit_distance": distance,
                "fallback": fallback}  # fmt: skip

    refined = [edit(True, True, 0), edit(False, False, 4, degenerate=True), edit(False, True, 2), edit(False, False, 6)]
    s = editor_stats([True, True, False, False], [False, False, True, True], refined)
    assert (s["copy"], s["broken"], s["fixed"], s["repaired"]) == (0.5, 0.5, 0.5, 1.0)
    assert (s["edits"], s["edits_changed"], s["fallback"]) == (3.0, 4.0, 0.0)
    assert editor_stats([False], [False], [edit(True, False, 0)])["copy"] is None  # no correct a: unmeasured


def test_gpu_smoke_runs_the_learner_without_ray_or_vllm(tmp_path):
    """scripts/gpu_smoke.py, as the GPU machine runs it (no Ray, no vLLM importable), on CPU with a tiny model:
    ZeRO-1 and ZeRO-3 steps, full fine-tuning and a LoRA adapter, whose log-probs and first CE agree with a plain
    HF forward, and its results file."""
    out = tmp_path / "smoke.json"
    blocker = tmp_path / "site"  # every process of the run, the per-stage children too, cannot import them
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules.update(ray=None, vllm=None)\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    argv = [sys.executable, "scripts/gpu_smoke.py", "--cpu", "--tiny", "--samples", "16", "--micro-batch-size", "8",
            "--prompt-len", "16", "--max-response", "32", "--steps", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["zero_stage"], r["lora_rank"]) for r in results] == [(1, 0), (1, 16), (3, 0), (3, 16)]
    assert [r["policy_one_pass"] for r in results] == [False, False, True, True]  # ZeRO-3's single pass is wired
    for r in results:
        assert r["logprob_max_abs_error"] < 1e-4
        assert r["ce_first_step"] == pytest.approx(r["ce_hf_reference"], rel=1e-4)
        assert r["loss_first_step"] == pytest.approx(r["loss_hf_reference"], rel=1e-4)
        assert r["tokens_per_s"] > 0
        if r["lora_rank"]:  # against the full fine-tune before it (peak memory is CUDA's: none on CPU)
            assert r["tokens_per_s_vs_full"] > 0 and r["peak_memory_vs_full"] is None
            assert r["params"] == results[0]["params"]  # the same base model
        else:
            assert r["grad_norm_split"] == pytest.approx(r["grad_norm_first_step"], rel=1e-4)  # 8 vs 2 a micro-batch
    assert "| cpu | 3 | – | float32 |" in done.stdout and "| cpu | 3 | 16 | float32 |" in done.stdout


def test_reproduce_cpu_ends_its_table_with_the_cpu_and_the_pi0_the_runs_trained_from(tmp_path):
    """Runs already trained to STEPS are skipped (how a stopped reproduction resumes), so the script's tail runs
    here on synthetic runs: the comparison's table, then the CPU and each π0 quality line, also in machine.md."""
    from rlhf_refiner import pi0

    quality = {
        "solve_accuracy": 0.6, "copy_when_correct": 0.95, "fix_rate": 0.55, "degenerate_rate": 0.05,
        "fixes_degenerate": 1.0, "stopped_at_step": 560, "sft_steps": 3000, "cpu": "Some CPU",
        "cpu_capability": "AVX2", "threads": 2, "targets": {"solve_accuracy": [0.55, 0.65]},
    }  # fmt: skip
    out = tmp_path / "repro"
    arms = [("dynamic", "dynamic", 0.05), ("none", "none", 0.05), ("static_kl-b1", "static_kl", 1.0)]
    # a run finished before π0 was built to bands (a resumed reproduction) reports the old fields only
    old = {"solve_accuracy": 0.598, "copy_when_correct": 0.977, "fix_rate": 0.391, "degenerate_rate": 0.06,
           "fixes_degenerate": 1.0}  # fmt: skip
    for name, constraint, kl_coef in arms:
        run = _run_dir(out, f"{name}-s0", constraint, [0.1, 0.2], kl_coef=kl_coef, trainer_steps=2)
        report = old if name == "none" else quality
        (run / "summary.json").write_text(json.dumps({"policy_version": 2, "pi0_quality": report}))
    result = subprocess.run(
        ["bash", str(ROOT / "scripts/reproduce_cpu.sh"), "configs/repro/reward_hacking.yaml", str(out), "2", "0"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "BETAS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.log"))  # nothing was trained: every run was found complete
    table = (out / "table.md").read_text()
    assert "| dynamic | 1 |" in table and "| static_kl β=1 | 1 |" in table
    assert f"CPU: {pi0.cpu_model()}, {os.cpu_count()} cores" in table
    assert "π0 of 1 run: solve accuracy 59.8%, copy-when-correct 97.7%, fix rate 39.1%, degenerate" in table
    line = "π0 of 2 runs: " + pi0.format_quality(quality)
    assert line in table and "stopped at SFT step 560 of 3000" in line
    assert "built on Some CPU (AVX2, torch threads 2)" in line
    assert line in (out / "machine.md").read_text()
    assert table.rstrip().splitlines()[-1].startswith("total: ")
