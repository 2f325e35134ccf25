"""Metrics sink of the driver: metrics.jsonl + samples.jsonl (atomic per line), W&B, console, progress bar.

Actors never log; the loop hands every step's namespaced metrics here. W&B runs offline unless configured
otherwise, so a run needs no account; `wandb sync <output_dir>/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rlhf_refiner.config import Config, ConfigError, dump

CONSOLE_KEYS = [
    ("reward/mean", "reward"),
    ("task/accuracy", "acc"),
    ("refiner/unchanged_frac", "unchanged"),
    ("learner/ce_refined", "ce"),
    ("learner/kl_to_ref", "kl"),
    ("eval/accuracy", "eval_acc"),
    ("time/step", "s"),
]


ACTOR_LOG_DIR = "RLHF_REFINER_ACTOR_LOG_DIR"  # set in an actor's env when `metrics.actor_output=file`


def actor_log_dir(config: Config) -> str | None:
    """Where the actors' output goes (`<output_dir>/logs`, absolute: actors may run elsewhere), or None when
    Ray streams it to the driver's console."""
    return str(Path(config.trainer.output_dir).resolve() / "logs") if config.metrics.actor_output == "file" else None


def redirect_actor_output() -> None:
    """First thing in an actor's `__init__`: point this process's stdout and stderr (file descriptors 1 and 2, so
    C extensions and child processes such as vLLM's engine core follow) at `<output_dir>/logs/<actor name>.log`,
    when the driver asked for it. Exceptions still reach the driver through Ray."""
    log_dir = os.environ.get(ACTOR_LOG_DIR)
    if not log_dir:
        return
    import sys

    import ray

    name = ray.get_runtime_context().get_actor_name() or f"worker-{os.getpid()}"
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(log_dir) / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:  # the output dir is not writable from this node: keep Ray's own log files
        print(f"{name}: cannot write {log_dir} ({e}); output stays in Ray's worker logs", file=sys.stderr)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


EVAL_SUMMARY_KEYS = ("eval/accuracy", "eval/reward", "eval/task/degenerate_rate")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def merge_calls(calls: list[tuple[str, int, dict[str, float]]], time_key: str) -> dict[str, float]:
    """One stage's metrics from its fanned-out calls, each (actor name, samples, metrics). Calls on one actor run
    one after another and different actors in parallel, so `time_key` becomes the busiest actor's total; every
    `*tokens_per_s` becomes all tokens over that time (a call's tokens: its rate x its `time_key`); the rest are
    sample-weighted means over the calls that report them. Calls with no samples carry no metrics."""
    calls = [call for call in calls if call[1] > 0]
    busy: dict[str, float] = {}
    for actor, _, metrics in calls:
        busy[actor] = busy.get(actor, 0.0) + metrics[time_key]
    seconds = max(busy.values())
    merged = {time_key: seconds}
    for key in dict.fromkeys(key for _, _, metrics in calls for key in metrics):  # their union, in order
        if key == time_key:
            continue
        if key.endswith("tokens_per_s"):
            merged[key] = sum(m[key] * m[time_key] for _, _, m in calls) / max(seconds, 1e-9)
        else:
            reported = [(n, m[key]) for _, n, m in calls if key in m]
            merged[key] = sum(n * value for n, value in reported) / sum(n for n, _ in reported)
    return merged


def spread_samples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` of a step's sample rows for samples.jsonl / the W&B table: the refiner's edits (a' != a) first, and
    each pick from the prompt shown least so far, so the table shows different queries rather than one prompt's G
    samples. Ties go to the earlier row."""
    edited = [r.get("refined") is not None and r["refined"] != r["response"] for r in rows]
    shown: dict[str, int] = {}
    left, picked = list(range(len(rows))), []
    for _ in range(min(n, len(rows))):
        best = min(left, key=lambda i: (not edited[i], shown.get(rows[i]["query"], 0), i))
        left.remove(best)
        shown[rows[best]["query"]] = shown.get(rows[best]["query"], 0) + 1
        picked.append(rows[best])
    return picked


def truncate_after(output_dir: Path, step: int) -> None:
    """Keep only the rows of steps <= `step` in metrics.jsonl and samples.jsonl (a resumed run re-logs the steps
    after its checkpoint); each file is rewritten atomically, and a torn last line is dropped."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = output_dir / name
        if not path.exists():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the line being written when the run died
            if row.get("step", 0) <= step:
                kept.append(line + "\n")
        tmp = path.with_name(name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def check_wandb_login(config: Config) -> None:
    """`metrics.wandb_mode=online` needs an API key (WANDB_API_KEY, or `wandb login`'s netrc entry): checked
    before the run writes anything, so that a missing login is one clear error, not a failure after start-up."""
    if config.metrics.wandb_mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc().authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        f"metrics.wandb_mode=online, but there is no W&B login for {host}: run `wandb login` or set "
        "WANDB_API_KEY, or use metrics.wandb_mode=offline (sync later with `wandb sync`) or disabled"
    )


class MetricsLogger:
    def __init__(
        self, config: Config, output_dir: Path, total_steps: int, start_step: int = 0, wandb_id: str | None = None
    ) -> None:
        self.output_dir = output_dir
        # Held open for the run and flushed per line, so a crash loses at most the line being written.
        self.metrics_file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self.samples_file = open(output_dir / "samples.jsonl", "a")  # noqa: SIM115
        self.wandb = None
        if config.metrics.wandb_mode != "disabled":
            import wandb

            online = config.metrics.wandb_mode == "online"
            self.wandb = wandb.init(
                project=config.metrics.wandb_project,
                name=config.run_name,
                dir=str(output_dir),
                mode=config.metrics.wandb_mode,
                config=config.model_dump(mode="json"),
                id=wandb_id,  # a resumed run continues its W&B run
                resume="allow",
                # online: W&B's own lines name the run's page; offline: one line of ours says where it is
                settings=wandb.Settings(quiet=True) if online else wandb.Settings(silent=True),
            )
            if not online:
                run_dir = Path(self.wandb.dir).parent
                print(f"W&B offline run: {run_dir} (`wandb sync {run_dir}` uploads it)", flush=True)
        self.wandb_id = self.wandb.id if self.wandb is not None else None
        self.progress = None
        self.bar = (total_steps, start_step, config.run_name) if config.metrics.progress_bar else None
        self.started = time.perf_counter()
        self.evals: dict[str, dict[str, float]] = {}  # a resumed run's earlier evaluations too
        for line in (output_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)  # already cut back to the checkpoint's step, torn lines dropped
            if "eval/reward" in row:
                self.evals[str(row["step"])] = {k: row[k] for k in EVAL_SUMMARY_KEYS if k in row}
        (output_dir / "config.yaml").write_text(dump(config))

    def phase(self, what: str) -> None:
        """A start-up phase, one console line each (before the progress bar, whose rates count training only)."""
        print(f"[{time.perf_counter() - self.started:6.1f}s] {what}", flush=True)

    def begin_training(self) -> None:
        """Start-up is over: from here the progress bar counts steps, its rate and ETA over training steps only."""
        self.phase("training")
        if self.bar is not None:
            from tqdm import tqdm

            total, initial, name = self.bar
            self.progress = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        """One metrics row; `advance` moves the progress bar (not for step 0's held-out baseline)."""
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        if "eval/reward" in metrics:  # summary.json keeps each held-out evaluation's headline
            self.evals[str(step)] = {k: metrics[k] for k in EVAL_SUMMARY_KEYS if k in metrics}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        line = f"step {step}: " + " ".join(
            f"{short} {metrics[key]:.3f}" for key, short in CONSOLE_KEYS if key in metrics
        )
        if self.progress is not None:
            self.progress.write(line)
            self.progress.update(int(advance))
        else:
            print(line, flush=True)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.samples_file.write(json.dumps({"step": step, **row}) + "\n")
        self.samples_file.flush()
        if self.wandb is not None and rows:
            import wandb

            columns = ["step", *rows[0].keys()]
            table = wandb.Table(columns=columns, data=[[step, *row.values()] for row in rows])
            self.wandb.log({"samples": table}, step=step)

    def close(self, summary: dict[str, Any]) -> None:
        if self.evals:
            summary["eval"] = self.evals
        tmp = self.output_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(self.output_dir / "summary.json")
        if self.progress is not None:  # before W&B's closing lines, which would land inside the bar
            self.progress.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
        self.metrics_file.close()
        self.samples_file.close()
