"""Checkpoint layout without Ray: atomic commit, retention, corrupt/truncated detection, log truncation."""

import json

import pytest

from rlhf_refiner import checkpoint
from rlhf_refiner.metrics import truncate_after


def _save(out, step, keep=2):
    tmp = checkpoint.staging_dir(out, step)
    (tmp / "learner" / "state").mkdir(parents=True)
    (tmp / "learner" / "state" / "model.pt").write_bytes(bytes(range(256)) * (step + 1))  # stands in for DeepSpeed
    state = {"step": step, "policy_version": step, "data": {"position": 4 * step}, "wandb_id": None}
    return checkpoint.commit(tmp, state, {"samples": [step]}, keep)


def test_commit_is_atomic_and_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    names = [p.name for p in checkpoint.complete_checkpoints(checkpoint.root(tmp_path))]
    assert names == ["step-00000004", "step-00000006"]  # keep=2
    assert not list(checkpoint.root(tmp_path).glob("*.tmp"))
    directory, state = checkpoint.find_resume(tmp_path, "auto")
    assert directory.name == "step-00000006" and state["data"] == {"position": 24}
    assert checkpoint.load_buffer(directory) == {"samples": [6]}
    assert checkpoint.find_resume(tmp_path, "none") is None
    assert checkpoint.find_resume(tmp_path, str(directory))[1]["step"] == 6


def test_an_unfinished_save_is_ignored(tmp_path):
    _save(tmp_path, 2)
    tmp = checkpoint.staging_dir(tmp_path, 4)  # a crash mid-save: staged, never committed
    (tmp / "state.json").write_text("{}")
    assert checkpoint.find_resume(tmp_path, "auto")[1]["step"] == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "learner/state/model.pt").write_bytes(b"short"), "truncated"),
        (lambda d: (d / "buffer.pkl").write_bytes(b"x" * (d / "buffer.pkl").stat().st_size), "checksum"),
        (lambda d: (d / "MANIFEST.json").unlink(), "did not finish"),
        (lambda d: (d / "state.json").unlink(), "missing"),
    ],
)
def test_corrupt_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, damage, message):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    damage(newest)
    with pytest.warns(UserWarning, match=rf"step-00000004.*{message}"):
        directory, state = checkpoint.find_resume(tmp_path, "auto")
    assert state["step"] == 2
    with pytest.raises(checkpoint.CorruptCheckpointError, match=message):
        checkpoint.find_resume(tmp_path, str(newest))  # an explicit path must verify


def test_truncate_after_keeps_steps_up_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"ste')
    (tmp_path / "samples.jsonl").write_text(json.dumps({"step": 3, "q": 1}) + "\n")
    truncate_after(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert (tmp_path / "samples.jsonl").read_text() == ""


def test_output_dir_is_refused_when_not_empty_and_reset_or_truncated(tmp_path):
    from rlhf_refiner.config import ConfigError, load

    out = tmp_path / "run"
    config = load(None, [f"trainer.output_dir={out}"])
    assert checkpoint.check_output_dir(config) == out  # absent: fine, and nothing is created
    assert not out.exists()
    _save(out, 2)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    with pytest.raises(ConfigError, match="trainer.overwrite=true"):
        checkpoint.check_output_dir(config)
    checkpoint.check_output_dir(load(None, [f"trainer.output_dir={out}", "trainer.overwrite=true"]))
    checkpoint.prepare_output_dir(out, resume_step=2)  # resumed: logs kept up to the checkpoint, which stays
    assert (out / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    assert checkpoint.find_resume(out, "auto")[1]["step"] == 2
    checkpoint.prepare_output_dir(out, resume_step=None)  # fresh (overwrite): no logs, no checkpoint to resume
    assert not (out / "metrics.jsonl").exists() and checkpoint.find_resume(out, "auto") is None


def test_checkpoint_layout_imports_no_ray_or_torch():
    import subprocess
    import sys

    code = "import sys, rlhf_refiner.checkpoint; print(sorted({'ray', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def _saved(config, step=3):
    return {"step": step, "config": config.model_dump(mode="json")}


def test_a_resume_with_a_different_experiment_is_refused_with_the_fields(tmp_path):
    """Resuming a `dynamic` run as `static_kl` would splice two experiments into one run: refused, naming each
    differing field; length, cadence and logging may change."""
    from rlhf_refiner.config import ConfigError, load

    base = [f"trainer.output_dir={tmp_path}"]
    saved = _saved(load(None, [*base, "algo.constraint=dynamic"]))
    longer = load(None, [*base, "algo.constraint=dynamic", "trainer.steps=200", "trainer.save_every=5"])
    assert checkpoint.check_resume_config(tmp_path / "ck", saved, longer) == {}
    other = load(None, [*base, "algo.constraint=static_kl", "learner.lr=0.5", "trainer.steps=200"])
    with pytest.raises(ConfigError) as refused:
        checkpoint.check_resume_config(tmp_path / "ck", saved, other)
    message = str(refused.value)
    assert "algo.constraint: 'dynamic' -> 'static_kl'" in message and "learner.lr: 0.0001 -> 0.5" in message
    assert "trainer.steps" not in message and "trainer.allow_config_change=true" in message
    assert not (tmp_path / "config_changes.jsonl").exists()


def test_a_resume_with_another_lora_adapter_is_refused_even_when_changes_are_allowed(tmp_path):
    """A LoRA checkpoint holds one adapter's trained parameters: resumed with other layers, rank or scaling (or
    as a full fine-tune), DeepSpeed's non-strict load would start a fresh adapter beside the old optimizer state."""
    from rlhf_refiner.config import ConfigError, load

    base = [f"trainer.output_dir={tmp_path}", "trainer.allow_config_change=true"]
    saved = _saved(load(None, [*base, "model.lora.rank=4"]))
    for change in ("model.lora.rank=0", "model.lora.target_modules=[o_proj]", "model.lora.alpha=32"):
        with pytest.raises(ConfigError, match=r"another adapter: model\.lora\."):
            checkpoint.check_resume_config(tmp_path / "ck", saved, load(None, [*base, "model.lora.rank=4", change]))
    dropout = load(None, [*base, "model.lora.rank=4", "model.lora.dropout=0.1"])  # the same parameters: allowed
    assert checkpoint.check_resume_config(tmp_path / "ck", saved, dropout) == {"model.lora.dropout": (0.0, 0.1)}


def test_an_allowed_config_change_is_recorded_in_the_runs_history(tmp_path):
    from rlhf_refiner.config import load

    saved = _saved(load(None, [f"trainer.output_dir={tmp_path}"]), step=7)
    allowed = load(None, [f"trainer.output_dir={tmp_path}", "learner.lr=0.5", "trainer.allow_config_change=true"])
    assert checkpoint.check_resume_config(tmp_path / "ck", saved, allowed) == {"learner.lr": (1e-4, 0.5)}
    record = json.loads((tmp_path / "config_changes.jsonl").read_text())
    assert record["step"] == 7 and record["changes"] == {"learner.lr": [1e-4, 0.5]}


def test_a_finished_run_is_reported_complete_and_left_untouched(tmp_path, capsys):
    from rlhf_refiner.config import load

    (tmp_path / "summary.json").write_text(json.dumps({"policy_version": 3, "seconds": 12.5}))
    before = (tmp_path / "summary.json").read_text()
    config = load(None, [f"trainer.output_dir={tmp_path}", "trainer.steps=3"])
    assert checkpoint.finished_run(tmp_path, 3, config) == {"policy_version": 3, "seconds": 12.5, "complete": True}
    err = capsys.readouterr().err
    assert "complete at step 3" in err and "trainer.steps greater than 3" in err
    assert (tmp_path / "summary.json").read_text() == before
    assert checkpoint.finished_run(tmp_path, 2, config) is None  # steps left: a resume


def test_a_start_that_failed_before_its_first_step_can_be_retried(tmp_path):
    """A run that failed during start-up (say, W&B online without a login) left empty logs, its config and
    W&B's files: the retry may start there. A user's own file, a metrics row or a checkpoint still refuse it."""
    from rlhf_refiner.config import ConfigError, load

    config = load(None, [f"trainer.output_dir={tmp_path}"])
    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).write_text("")
    (tmp_path / "config.yaml").write_text("trainer: {}\n")
    (tmp_path / "wandb").mkdir()
    assert checkpoint.check_output_dir(config) == tmp_path
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds a run"):
        checkpoint.check_output_dir(config)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError):
        checkpoint.check_output_dir(config)


def test_wandb_online_without_a_login_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from rlhf_refiner.config import ConfigError, load
    from rlhf_refiner.metrics import check_wandb_login

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    online = load(None, ["metrics.wandb_mode=online"])
    with pytest.raises(ConfigError, match="wandb login"):
        check_wandb_login(online)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    (tmp_path / ".netrc").chmod(0o600)
    check_wandb_login(online)  # `wandb login` wrote this
    check_wandb_login(load(None, ["metrics.wandb_mode=offline"]))


def test_an_output_dir_inside_rays_job_package_dir_is_refused(tmp_path, monkeypatch):
    package = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)  # where `ray job submit --working-dir .` runs the entrypoint
    with pytest.raises(checkpoint.ConfigError, match=r"trainer.output_dir 'runs/q' resolves into Ray's temporary"):
        checkpoint.check_output_location("runs/q")
    checkpoint.check_output_location(str(tmp_path / "shared" / "q"))  # absolute, elsewhere: outlives the job
    monkeypatch.chdir(tmp_path)
    checkpoint.check_output_location("runs/q")  # a relative dir anywhere else (a plain run, or `cd /nfs && ...`)


def test_a_checkpoint_from_before_a_field_existed_resumes_as_if_it_held_its_default(tmp_path):
    from rlhf_refiner.config import load

    config = load(None, [f"trainer.output_dir={tmp_path}"])
    old = checkpoint.saved_config(config)
    del old["eval"], old["trainer"]["eval_every"], old["reward"]["function_sha256"]  # an older dump
    assert checkpoint.check_resume_config(tmp_path, {"step": 2, "config": old}, config) == {}
    changed = load(None, [f"trainer.output_dir={tmp_path}", "trainer.eval_every=5"])
    with pytest.raises(checkpoint.ConfigError, match=r"trainer.eval_every: 0 -> 5"):
        checkpoint.check_resume_config(tmp_path, {"step": 2, "config": old}, changed)


def test_a_checkpoint_that_was_never_saved_is_named_with_the_ones_that_were(tmp_path):
    _save(tmp_path, 2)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"step-00000040: no such checkpoint; saved here: "
                       r"step-00000002 \(a run saves at its end, every trainer.save_every steps"):  # fmt: skip
        checkpoint.verify(checkpoint.root(tmp_path) / "step-00000040")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="holds none"):
        checkpoint.verify(tmp_path / "elsewhere" / "checkpoints" / "step-00000040")


def test_the_docs_export_examples_name_a_checkpoint_their_run_saves():
    import re
    from pathlib import Path

    from rlhf_refiner.config import load

    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    lines = [(page.name, x) for page in pages for x in page.read_text().splitlines()]
    examples = [(name, x) for name, x in lines if x.startswith("python scripts/export_hf.py")]
    assert examples, "no `python scripts/export_hf.py` example in README.md or docs/"
    for name, line in examples:
        run, step = re.search(r"export_hf\.py (runs/\w+)/checkpoints/step-(\d{8}) ", line).groups()
        trainer = load(root / "configs" / f"{Path(run).name}.yaml").trainer
        assert trainer.output_dir == run
        saved = int(step) == trainer.steps or (trainer.save_every and int(step) % trainer.save_every == 0)
        assert saved, f"{name} exports step {int(step)} of {run}, which saves only at step {trainer.steps}"


def test_a_resume_after_the_reward_functions_file_changed_is_refused(tmp_path, monkeypatch):
    from rlhf_refiner.config import load

    monkeypatch.chdir(tmp_path)
    (tmp_path / "score.py").write_text("def fn(query, response, answer, sample_id):\n    return 1.0\n")
    overrides = [f"trainer.output_dir={tmp_path}", "reward.function=score.py:fn", "reward.weights={function: 1.0}"]
    saved = checkpoint.saved_config(load(None, overrides))
    assert checkpoint.check_resume_config(tmp_path, {"step": 2, "config": saved}, load(None, overrides)) == {}
    (tmp_path / "score.py").write_text("def fn(query, response, answer, sample_id):\n    return 2.0\n")
    with pytest.raises(checkpoint.ConfigError, match=r"reward.function_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        checkpoint.check_resume_config(tmp_path, {"step": 2, "config": saved}, load(None, overrides))


def test_a_failed_first_step_after_the_held_out_baseline_can_be_retried(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/reward": 0.5}) + "\n")
    (tmp_path / "logs").mkdir()
    assert checkpoint.trained_nothing(tmp_path)  # only π0's baseline row: nothing trained
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    assert not checkpoint.trained_nothing(tmp_path)


def test_an_extended_run_keeps_its_decaying_schedules_span_and_records_it(tmp_path):
    """Raising trainer.steps on resume keeps a linear/cosine decay over the updates it started with (the learner
    then stays at the final learning rate), and says so in config_changes.jsonl; setting
    learner.lr_schedule_updates re-plans it, also recorded; a plain resume or a constant schedule records nothing."""
    from rlhf_refiner.config import load

    base = [f"trainer.output_dir={tmp_path}", "learner.lr_schedule=cosine", "learner.updates_per_step=2"]
    base.append("learner.min_lr_ratio=0.1")  # a decay to 0 could not be extended at all: see the next test
    saved = _saved(load(None, [*base, "trainer.steps=50"]), step=50)
    same = checkpoint.keep_lr_schedule(tmp_path / "ck", saved, load(None, [*base, "trainer.steps=50"]))
    assert same.learner.lr_schedule_updates == 100 and not (tmp_path / "config_changes.jsonl").exists()
    longer = load(None, [*base, "trainer.steps=80"])
    assert checkpoint.check_resume_config(tmp_path / "ck", saved, longer) == {}  # an extension is allowed
    kept = checkpoint.keep_lr_schedule(tmp_path / "ck", saved, longer)
    assert kept.learner.lr_schedule_updates == 100 and kept.trainer.steps == 80
    record = json.loads((tmp_path / "config_changes.jsonl").read_text().splitlines()[-1])
    assert (
        record["step"] == 50 and record["lr_schedule"]["updates"] == 100 and record["lr_schedule"]["run_updates"] == 160
    )
    # the next resume of the extended run: its checkpoint holds the pinned span, and keeps it
    again = checkpoint.keep_lr_schedule(tmp_path / "ck", _saved(kept, step=60), load(None, [*base, "trainer.steps=80"]))
    assert again.learner.lr_schedule_updates == 100
    replan = load(None, [*base, "trainer.steps=80", "learner.lr_schedule_updates=160"])
    assert checkpoint.keep_lr_schedule(tmp_path / "ck", saved, replan).learner.lr_schedule_updates == 160
    record = json.loads((tmp_path / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["lr_schedule"]["updates"] == 160 and record["lr_schedule"]["was"] == 100
    lines = len((tmp_path / "config_changes.jsonl").read_text().splitlines())
    constant = [f"trainer.output_dir={tmp_path}", "trainer.steps=80"]
    checkpoint.keep_lr_schedule(
        tmp_path / "ck", _saved(load(None, [f"trainer.output_dir={tmp_path}"])), load(None, constant)
    )
    assert len((tmp_path / "config_changes.jsonl").read_text().splitlines()) == lines


def test_async_without_tis_is_warned_about_before_anything_starts(tmp_path):
    from rlhf_refiner import loop
    from rlhf_refiner.config import load

    run = [f"trainer.output_dir={tmp_path / 'run'}", "model.path=/nonexistent"]
    config = load(None, [*run, "trainer.async_steps=1", "buffer.max_staleness=1"])
    with pytest.warns(UserWarning, match="without algo.tis_cap"), pytest.raises((OSError, ValueError)):
        loop.run(config)  # the missing model stops it right after the warning


def test_an_extension_past_a_decay_to_zero_is_refused_with_the_ways_out(tmp_path):
    """Going on at the final learning rate of a decay to 0 would train nothing, silently: refused, naming both fixes."""
    from rlhf_refiner.config import ConfigError, load

    base = [f"trainer.output_dir={tmp_path}", "learner.lr_schedule=linear"]
    saved = _saved(load(None, [*base, "trainer.steps=50"]), step=50)
    with pytest.raises(ConfigError) as refused:
        checkpoint.keep_lr_schedule(tmp_path / "ck", saved, load(None, [*base, "trainer.steps=80"]))
    message = str(refused.value)
    assert "learning rate 0" in message and "learner.lr_schedule_updates=80" in message and "min_lr_ratio" in message
    replanned = load(None, [*base, "trainer.steps=80", "learner.lr_schedule_updates=80"])
    assert checkpoint.keep_lr_schedule(tmp_path / "ck", saved, replanned).learner.lr_schedule_updates == 80
    finished = checkpoint.keep_lr_schedule(tmp_path / "ck", saved, load(None, [*base, "trainer.steps=50"]))
    assert finished.learner.lr_schedule_updates == 50  # a plain resume is never refused


def test_rollouts_ahead_pickled_before_collected_moved_to_records_still_load():
    """Async checkpoints keep the next step's `Collected` pickled; before it moved to records.py its pickle named
    `rlhf_refiner.rollout.Collected`. Such bytes must still load (rollout.py keeps the name importable)."""
    import pickle

    from rlhf_refiner.records import Collected

    current = pickle.dumps(Collected([], None, [], {"time/rollout_phase": 1.5}))
    assert b"rlhf_refiner.records" in current
    written_before = current.replace(b"rlhf_refiner.records", b"rlhf_refiner.rollout")  # same length: valid
    loaded = pickle.loads(written_before)
    assert isinstance(loaded, Collected) and loaded.metrics == {"time/rollout_phase": 1.5}
