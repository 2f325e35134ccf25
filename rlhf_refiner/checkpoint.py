"""Checkpoints (driver side): layout, atomic commit, retention, and discovery of the latest complete one.

A checkpoint is `<output_dir>/checkpoints/step-<8 digits>/`: `learner/` (the DeepSpeed checkpoint: weights and
optimizer, written by the learner actor), `buffer.pkl` (the buffer's samples, and in async mode the rollouts
already made for the next step), and `state.json` (step,
policy_version, data position, sampling seeds, W&B run id). Everything is written into `step-….tmp/` first;
`MANIFEST.json` (every file's size, and the SHA-256 of the small ones) is written last, then the directory is
renamed into place, so a crash leaves either a complete checkpoint or a `.tmp` that is ignored. A checkpoint
whose files do not match its manifest is skipped with a warning that names it. On a multi-node cluster,
`trainer.output_dir` must be on storage that the driver and the learner share. The output dir's life cycle
(refused when not empty, reset for a fresh run, truncated to the checkpoint for a resumed one) is here too; the
actors' part of a save or restore is `run_state.py`'s. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from rlhf_refiner.config import Config, ConfigError
from rlhf_refiner.metrics import truncate_after

# Config fields a resume may change (prefixes): how long the run is and how often it saves, logs and times out,
# and where it runs. Any other difference would make the resumed run a different experiment than its checkpoint.
RESUMABLE_CHANGES = (
    "trainer.steps",
    "learner.lr_schedule_updates",  # what an extension means for a decaying schedule: `keep_lr_schedule` records it
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.save_final",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.allow_config_change",
    "trainer.output_dir",
    "trainer.run_name",
    "metrics.",
    "ray.",
    "sync.timeout_s",
    "sync.verify",
    "eval.temperature",  # how held-out responses are drawn; never which prompts training sees
    "eval.samples_per_prompt",
    "eval.max_new_tokens",
)

# Fields no resume may change, even with `trainer.allow_config_change`: the checkpoint's trained parameters are an
# adapter of these layers and rank (or the full weights), and its scaling is part of the model they make.
NEVER_RESUMABLE = ("model.lora.rank", "model.lora.target_modules", "model.lora.alpha")

STEP_DIR = re.compile(r"^step-(\d{8})$")
HASH_LIMIT = 64 * 2**20  # files smaller than this are hashed; larger ones (weights, optimizer) are size-checked
MANIFEST = "MANIFEST.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint directory that is incomplete or does not match its manifest."""


def root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


START_FILES = {
    "metrics.jsonl",
    "samples.jsonl",
    "config.yaml",
    "summary.json",
    "wandb",
    "checkpoints",
    "logs",
    "reward_function.py",
}


def _trained_row(line: str) -> bool:
    """A metrics row of a training step (step 0 is the held-out baseline, before any training)."""
    try:
        return json.loads(line).get("step", 0) >= 1
    except ValueError:
        return False


def trained_nothing(out: Path) -> bool:
    """Whether a run dir holds only a start that failed before its first step: nothing but the run's own files
    (`START_FILES`), no metrics row and no checkpoint. Such a dir may be started in again."""
    metrics = out / "metrics.jsonl"
    has_rows = metrics.exists() and any(_trained_row(line) for line in metrics.read_text().splitlines())
    has_checkpoint = root(out).exists() and any(root(out).iterdir())
    foreign = any(entry.name not in START_FILES for entry in out.iterdir())
    return not (has_rows or has_checkpoint or foreign)


RAY_PACKAGE_DIR = "working_dir_files"  # <session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/


def check_output_location(output_dir: str) -> None:
    """Refuse an output dir inside Ray's temporary copy of `ray job submit --working-dir`: Ray deletes it with the
    session and hands it, outputs and all, to the next identical submit (which would then "resume" the old run).
    Outputs must go to storage that outlives the job."""
    resolved = Path(output_dir).expanduser().resolve()
    if RAY_PACKAGE_DIR not in resolved.parts:
        return
    raise ConfigError(
        f"trainer.output_dir '{output_dir}' resolves into Ray's temporary copy of --working-dir ({resolved}), "
        "which Ray deletes and reuses for the next identical submit; give a path that outlives the job, e.g. "
        f"trainer.output_dir=/shared/runs/{resolved.name} (on a multi-node cluster, storage that the driver and "
        "the learner share)"
    )


def check_output_dir(config: Config) -> Path:
    """Refuse a non-empty output dir unless `trainer.overwrite`, or it holds only a failed start; nothing is
    written here."""
    out = Path(config.trainer.output_dir)
    if out.exists() and any(out.iterdir()) and not config.trainer.overwrite and not trained_nothing(out):
        raise ConfigError(
            f"trainer.output_dir '{out}' holds a run (metrics, checkpoints or a final policy); choose another "
            "dir, or set trainer.overwrite=true to replace it"
        )
    return out


def prepare_output_dir(out: Path, resume_step: int | None) -> Path:
    """A fresh run starts its logs afresh (overwrite=true); a resumed one keeps them up to its checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        truncate_after(out, resume_step)
        return out
    for name in ("metrics.jsonl", "samples.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)  # the actors' output of the run this one replaces
    if root(out).exists():  # never let a later `resume=auto` pick up the overwritten run's state
        shutil.rmtree(root(out))
    return out


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where the step's checkpoint is assembled before it is committed (removed first if a crash left one)."""
    tmp = root(output_dir) / f"step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def commit(tmp: Path, state: dict[str, Any], driver_state: dict[str, Any], keep: int) -> Path:
    """Write the driver's parts next to the learner's, the manifest last, rename into place, then prune to the
    newest `keep` checkpoints. Returns the committed directory."""
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    with (tmp / "buffer.pkl").open("wb") as f:
        pickle.dump(driver_state, f)  # the buffer's samples, and (async) rollouts already made for the next step
    manifest = {}
    for path in _files(tmp):
        size = path.stat().st_size
        manifest[str(path.relative_to(tmp))] = {"size": size, "sha256": _sha256(path) if size < HASH_LIMIT else None}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in [*_files(tmp), tmp / MANIFEST]:  # on disk before the rename makes the checkpoint visible
        with path.open("rb") as f:
            os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():  # a resumed run re-saving a step it already saved
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in complete_checkpoints(tmp.parent)[:-keep]:
        shutil.rmtree(old)
    return final


def verify(directory: Path) -> dict[str, Any]:
    """The checkpoint's state, after checking every file against the manifest."""
    if not directory.is_dir():
        saved = [p.name for p in complete_checkpoints(directory.parent)]
        raise CorruptCheckpointError(
            f"{directory}: no such checkpoint; "
            + (f"saved here: {', '.join(saved)}" if saved else f"{directory.parent} holds none")
            + " (a run saves at its end, every trainer.save_every steps, and on SIGTERM)"
        )
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise CorruptCheckpointError(f"{directory}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise CorruptCheckpointError(f"{directory}: {MANIFEST} is not valid JSON ({e})") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != expected["size"]:
            raise CorruptCheckpointError(f"{directory}: {name} is truncated ({path.stat().st_size} bytes)")
        if expected["sha256"] is not None and _sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(f"{directory}: {name} does not match its checksum")
    if "state.json" not in manifest or "buffer.pkl" not in manifest:
        raise CorruptCheckpointError(f"{directory}: state.json or buffer.pkl is not in the manifest")
    return json.loads((directory / "state.json").read_text())


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Committed checkpoint dirs (by name; not verified), oldest first."""
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def find_resume(output_dir: Path, resume: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: `none` -> None; `auto` -> the newest one that verifies (corrupt ones are
    skipped with a warning naming them), or None; a path -> that checkpoint, which must verify."""
    if resume == "none":
        return None
    if resume != "auto":
        directory = Path(resume)
        return directory, verify(directory)
    for directory in reversed(complete_checkpoints(root(output_dir))):
        try:
            return directory, verify(directory)
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}", stacklevel=2)
    return None


def load_buffer(directory: Path) -> dict[str, Any]:
    with (directory / "buffer.pkl").open("rb") as f:
        return pickle.load(f)  # our own file, verified against the manifest


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values by dotted key (`learner.deepspeed` and other free-form dicts are compared whole)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("deepspeed", "node_resources", "weights"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def saved_config(config: Config) -> dict[str, Any]:
    """The config as a checkpoint keeps it: its dump, and the hash of `reward.function`'s text (the dump holds only
    its path), so that a resume after the file changed is a different experiment."""
    tree = config.model_dump(mode="json")
    source = config.reward.function_source
    tree["reward"]["function_sha256"] = hashlib.sha256(source.encode()).hexdigest() if source is not None else None
    return tree


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted field whose value differs between two dumped configs: {field: (old, new)}. A field the old
    dump lacks (a checkpoint from before the field existed) counts as its default."""
    defaults = _flat(saved_config(Config()))
    before, after = {**defaults, **_flat(old)}, _flat(new)
    keys = sorted(before.keys() | after.keys())
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def check_resume_config(directory: Path, state: dict[str, Any], config: Config) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume from `directory` with a config that differs from the one it was saved with, outside
    `RESUMABLE_CHANGES`, unless `trainer.allow_config_change`; then the changes are appended to the run's
    `config_changes.jsonl`. Returns the changes outside the allowed fields. A checkpoint from before configs were
    saved in it is resumed unchecked (with a warning)."""
    if "config" not in state:
        warnings.warn(f"{directory} holds no config to compare with (an older checkpoint): not checked", stacklevel=2)
        return {}
    changes = config_changes(state["config"], saved_config(config))
    refused = {k: v for k, v in changes.items() if not k.startswith(RESUMABLE_CHANGES)}
    described = {key: f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items()}
    fixed = [line for key, line in described.items() if key.startswith(NEVER_RESUMABLE)]
    if fixed:
        raise ConfigError(
            f"resuming {directory} with another adapter: " + "; ".join(fixed) + ". Its checkpoint holds the trained "
            "parameters of the saved one (no trainer.allow_config_change can turn them into these): resume with the "
            "saved model.lora, or start afresh elsewhere"
        )
    if refused and not config.trainer.allow_config_change:
        lines = "\n".join(f"  {line}" for line in described.values())
        raise ConfigError(
            f"resuming {directory} with a different config:\n{lines}\nRun with the checkpoint's values, start "
            "afresh elsewhere (another trainer.output_dir, or trainer.resume=none with trainer.overwrite=true), "
            "or set trainer.allow_config_change=true to resume anyway and record the change"
        )
    if refused:
        record = {"step": state["step"], "checkpoint": str(directory), "changes": refused}
        with (Path(config.trainer.output_dir) / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(f"resuming with a changed config (recorded in config_changes.jsonl): {', '.join(refused)}", flush=True)
    return refused


def keep_lr_schedule(directory: Path, state: dict[str, Any], config: Config) -> Config:
    """The config a resume trains with: a decaying learning-rate schedule keeps the span of optimizer updates it
    started with (`learner.lr_schedule_updates`, else the saved run's steps × updates), so a run extended by raising
    `trainer.steps` continues at its final learning rate instead of jumping back up the decay; one that sets
    `learner.lr_schedule_updates` re-plans it. Either way, when the span differs from the run's new length, the
    decision goes into `config_changes.jsonl`."""
    learner = config.learner
    saved = state.get("config")
    if learner.lr_schedule == "constant" or saved is None:
        return config
    saved_learner = saved["learner"]
    started = saved_learner.get("lr_schedule_updates") or saved["trainer"]["steps"] * saved_learner["updates_per_step"]
    span = learner.lr_schedule_updates or started
    updates = config.trainer.steps * learner.updates_per_step  # the new run's (its own span, were it not pinned)
    if updates > span and learner.min_lr_ratio == 0:
        raise ConfigError(
            f"{directory}: learner.lr_schedule={learner.lr_schedule} decays to learner.min_lr_ratio=0 at update "
            f"{span}, so extending the run to {updates} updates would train at learning rate 0; resume with "
            f"learner.lr_schedule_updates={updates} to re-plan the decay over the new length (the learning rate "
            "jumps back up), or with learner.min_lr_ratio > 0 and trainer.allow_config_change=true to go on at that"
        )
    if span != updates or span != started:
        record = {
            "step": state["step"],
            "checkpoint": str(directory),
            "lr_schedule": {
                "schedule": learner.lr_schedule,
                "updates": span,
                "was": started,
                "run_updates": updates,
                "after_span": f"lr x {learner.min_lr_ratio} (its final value)",
            },
        }
        with (Path(config.trainer.output_dir) / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        how = "re-planned" if span != started else "kept; past it the learning rate stays at its final value"
        print(f"learner.lr_schedule={learner.lr_schedule} spans {span} updates ({how}), the run {updates}", flush=True)
    return config.model_copy(update={"learner": learner.model_copy(update={"lr_schedule_updates": span})})


def finished_run(output_dir: Path, step: int, config: Config) -> dict[str, Any] | None:
    """The summary of a run whose newest checkpoint is already at (or past) `trainer.steps`, and the one line that
    says so on stderr; None when there is training left. A finished run is left untouched."""
    if step < config.trainer.steps:
        return None
    import sys

    print(
        f"{output_dir}: complete at step {step} (trainer.steps={config.trainer.steps}); nothing to do. To train "
        f"further, run the same command with trainer.steps greater than {step} (a decaying learning rate then "
        "continues at its final value; learner.lr_schedule_updates re-plans it).",
        file=sys.stderr,
    )
    summary_file = output_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return {**summary, "complete": True}
