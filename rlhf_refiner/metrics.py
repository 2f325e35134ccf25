"""Metrics sink of the driver: metrics.jsonl + samples.jsonl (atomic per line), W&B, console, progress bar.

Actors never log; the loop hands every step's namespaced metrics here. W&B runs offline unless configured
otherwise, so a run needs no account; `wandb sync <output_dir>/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rlhf_refiner.config import Config, ConfigError, dump

CONSOLE_KEYS = [
    ("reward/mean", "reward"),
    ("task/accuracy", "acc"),
    ("refiner/unchanged_frac", "unchanged"),
    ("learner/ce_refined", "ce"),
    ("learner/kl_to_ref", "kl"),
    ("time/step", "s"),
]


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

            self.wandb = wandb.init(
                project=config.metrics.wandb_project,
                name=config.run_name,
                dir=str(output_dir),
                mode=config.metrics.wandb_mode,
                config=config.model_dump(mode="json"),
                id=wandb_id,  # a resumed run continues its W&B run
                resume="allow",
            )
        self.wandb_id = self.wandb.id if self.wandb is not None else None
        self.progress = None
        if config.metrics.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(
                total=total_steps, initial=start_step, desc=config.run_name, unit="step", dynamic_ncols=True
            )
        (output_dir / "config.yaml").write_text(dump(config))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        line = f"step {step}: " + " ".join(
            f"{short} {metrics[key]:.3f}" for key, short in CONSOLE_KEYS if key in metrics
        )
        if self.progress is not None:
            self.progress.write(line)
            self.progress.update(1)
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
        tmp = self.output_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        tmp.replace(self.output_dir / "summary.json")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
        if self.progress is not None:
            self.progress.close()
        self.metrics_file.close()
        self.samples_file.close()
