"""Compare runs: python scripts/compare.py RUN_DIR... [--out fig.png]

Reads each run's metrics.jsonl and config.yaml, groups runs into arms (constraint, β for static_kl, λ, the
refiner's mode and reference template for dynamic, advantage estimator, LoRA rank, alpha, learning rate, sync and
shared engine; runs that differ only in seed are one arm), and draws the paper's panels -- optimised reward, true
task accuracy, degenerate rate, KL to π0, CE of refined responses, improved fraction -- one colour per arm, mean
with a min/max band over seeds. Prints a table of final values (mean over the last `--last` steps of each run,
then mean ± std over seeds; `--first N` puts the first N steps' mean before it, `--keys` picks the columns,
`--quarters` adds each arm's quarter means), and warns on stderr when the runs' horizons differ, since the last
steps of runs of different lengths are different points of training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import sys
from pathlib import Path

import yaml

PANELS = [
    ("reward/mean", "optimised reward (flaw included)"),
    ("task/accuracy", "true task accuracy"),
    ("task/degenerate_rate", "degenerate rate (the task's pattern)"),
    ("learner/kl_to_ref", "KL(π_θ ‖ π0)"),
    ("learner/ce_refined", "CE of refined responses"),
    ("refiner/improved_frac", "fraction improved by the refiner"),
]
TABLE_KEYS = [
    "reward/mean",
    "task/accuracy",
    "task/degenerate_rate",
    "learner/kl_to_ref",
    "learner/ce_refined",
    "refiner/improved_frac",
]


def load_run(run_dir: Path) -> tuple[str, list[dict], int | None]:
    """(arm, metric rows, trainer.steps or None where the config does not say)."""
    metrics = run_dir / "metrics.jsonl"
    config_file = run_dir / "config.yaml"
    if not metrics.exists() or not config_file.exists():
        raise FileNotFoundError(f"{run_dir}: needs metrics.jsonl and config.yaml (is it a run directory?)")
    rows = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{metrics}:{number}: not JSON ({e})") from None
    config = yaml.safe_load(config_file.read_text())
    algo = config["algo"]
    arm = algo["constraint"]
    if arm == "static_kl":  # runs at different β (or estimators) are different arms
        arm += f" β={algo.get('kl_coef', 0.05):g}"
        if algo.get("kl_estimator", "k2") != "k2":
            arm += f" {algo['kl_estimator']}"
    elif arm == "dynamic":  # and at different λ, or with another kind of refiner
        arm += f" λ={algo['ce_coef']:g}" if algo.get("ce_coef", 1.0) != 1.0 else ""
        refiner = config.get("refiner") or {}
        fields = {field for _, field, _, _ in string.Formatter().parse(refiner.get("template", "")) if field}
        arm += " +reference" if "reference" in fields else ""
        arm += " +extract" if refiner.get("extract_pattern") else ""
        if refiner.get("mode") == "gated":
            arm += " gated"
            arm += f" rank≤{refiner['gate_rank']}" if refiner.get("gate_rank", 1) > 1 else ""
            arm += f" τ={refiner['gate_tau']:g}" if refiner.get("gate_tau", 1.0) < 1 else ""
    if algo.get("advantage", "grpo") != "grpo":
        arm += f"+{algo['advantage']}"
    lora = (config.get("model") or {}).get("lora") or {}
    if lora.get("rank"):  # an adapter of another rank, alpha, learning rate, sync or engine layout: another arm
        arm += f" LoRA r={lora['rank']}" + (f" α={lora['alpha']:g}" if "alpha" in lora else "")
        arm += f" lr={(config.get('learner') or {}).get('lr', 1e-4):g}"
        arm += " merged" if lora.get("sync") == "merged" else ""
        arm += " shared engine" if (config.get("placement") or {}).get("shared_engine") else ""
    return arm, rows, (config.get("trainer") or {}).get("steps")


def horizon_warning(horizons: dict[Path, tuple[int, int | None]], last: int) -> str | None:
    """A warning naming every run's (steps logged, trainer.steps) when they differ, else None."""
    logged = {steps for steps, _ in horizons.values()}
    planned = {steps for _, steps in horizons.values() if steps is not None}
    if len(logged) <= 1 and len(planned) <= 1:
        return None
    lines = [
        f"warning: runs of different horizons: the final values (last {last} steps) compare different training "
        "lengths, and the curves stop at the shortest run of each arm"
    ]
    for run_dir, (steps, planned_steps) in horizons.items():
        said = "" if planned_steps is None else f" (trainer.steps={planned_steps})"
        lines.append(f"  {run_dir}: {steps} steps logged{said}")
    return "\n".join(lines)


def smoothing_said(window: int) -> str:
    return "raw values (no smoothing)" if window == 1 else f"trailing moving average over {window} steps"


def default_out(run_dirs: list[Path]) -> Path:
    """compare.png in the runs' common parent (the current directory when that is the filesystem root), or the
    first free compare-N.png there: a default never replaces an earlier figure."""
    parent = Path(os.path.commonpath([run_dir.absolute().parent for run_dir in run_dirs]))
    if parent == Path(parent.anchor):
        parent = Path.cwd()
    out, number = parent / "compare.png", 1
    while out.exists():
        number += 1
        out = parent / f"compare-{number}.png"
    return out


def smooth(steps: list[int], values: list[float], window: int) -> list[float]:
    """Trailing moving average over the last `window` steps (not points: a metric logged every 10 steps, such as
    `learner/kl_to_ref` where it is not in the loss, is averaged over the points inside the window only), so that
    noisy per-step curves can be compared by eye."""
    out, start = [], 0
    for i, step in enumerate(steps):  # steps ascend: the window's first point only moves forward
        while steps[start] <= step - window:
            start += 1
        out.append(statistics.fmean(values[start : i + 1]))
    return out


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def final_table(arms: dict[str, list[list[dict]]], last: int, first: int | None = None, keys=TABLE_KEYS) -> str:
    """Each arm's mean over the last `last` steps of each run (by step, not by logged point: a metric logged every
    10 steps is its value inside the window), then mean ± std over its runs; with `first`, the mean over the
    first `first` steps before it ("first → last", the std being the last value's)."""
    lines = ["| arm | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm, runs in sorted(arms.items()):
        cells = []
        for key in keys:
            finals, firsts = [], []
            for rows in runs:
                end = max((row["step"] for row in rows), default=0)
                steps, values = series(rows, key)
                tail = [v for s, v in zip(steps, values) if s > end - last]
                head = [v for s, v in zip(steps, values) if s <= (first or 0)]
                finals += [statistics.fmean(tail)] if tail else []
                firsts += [statistics.fmean(head)] if head else []
            if not finals:
                cells.append("–")
                continue
            cell = f"{statistics.fmean(finals):.3f}"
            if len(finals) > 1:
                cell += f" ± {statistics.stdev(finals):.3f}"
            if first is not None and firsts:
                cell = f"{statistics.fmean(firsts):.3f} → {cell}"
            cells.append(cell)
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quarter_table(arms: dict[str, list[list[dict]]], keys=TABLE_KEYS) -> str:
    """Each arm's quarter means, "Q1 → Q2 → Q3 → Q4": each run's steps 1..N (N its last logged step) cut into four
    (steps 1-5 … 16-20 of 20), the mean of a key's values in each, then the mean over the runs that logged it there
    ("–" where none did, e.g. a metric logged every 10 steps). Per-step values are noisy, and quarters show a trend
    that one final value hides. The seeds column counts the arm's runs; runs of unequal length get the horizon
    warning."""
    lines = [
        "| arm | seeds | " + " | ".join(f"{key} (quarters)" for key in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for arm, runs in sorted(arms.items()):
        cells = []
        for key in keys:
            quarters: list[list[float]] = [[], [], [], []]
            for rows in runs:
                last = max((row["step"] for row in rows), default=0)
                steps, values = series(rows, key)
                for q in range(4):
                    inside = [v for s, v in zip(steps, values) if s >= 1 and (s - 1) * 4 // last == q]
                    if inside:
                        quarters[q].append(statistics.fmean(inside))
            shown = [f"{statistics.fmean(q):.3f}" if q else "–" for q in quarters]
            cells.append(" → ".join(shown) if any(quarters) else "–")
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(arms: dict[str, list[list[dict]]], window: int):  # -> matplotlib Figure, imported lazily for --help
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns_per_row = 3
    rows_of_panels = -(-len(PANELS) // columns_per_row)
    fig, grid = plt.subplots(rows_of_panels, columns_per_row, figsize=(12.6, 3.2 * rows_of_panels), dpi=90)
    axes = list(grid.flat)
    for ax, (key, title) in zip(axes, PANELS):  # every panel, those no arm logged too
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(key, fontsize=8)
        if not any(series(rows, key)[1] for runs in arms.values() for rows in runs):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for colour, (arm, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], sorted(arms.items())):
        for ax, (key, _) in zip(axes, PANELS):
            curves = [smooth(*series(rows, key), window) for rows in runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = series(runs[0], key)[0][:length]
            columns = list(zip(*(c[:length] for c in curves)))
            sparse = any(b - a > 1 for a, b in zip(steps, steps[1:]))  # logged every few steps: dot each point
            mean = [statistics.fmean(col) for col in columns]
            ax.plot(steps, mean, color=colour, marker="o" if sparse else None, ms=4, label=f"{arm} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=colour, alpha=0.2)
            if key == "learner/kl_to_ref":  # a degenerating arm's KL dwarfs the tethered ones: linear below 0.1
                ax.set_yscale("symlog", linthresh=0.1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean over seeds, band = min-max over seeds; {smoothing_said(window)}", fontsize=9)
    fig.tight_layout()
    return fig


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def write_figure(fig, out: Path) -> None:
    tmp = out.with_suffix(".tmp" + out.suffix)  # a reader of `out` never sees half a PNG
    fig.savefig(tmp)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (trainer.output_dir of each run)")
    parser.add_argument(
        "--out",
        type=Path,
        help="figure to write (PNG; replaced if it exists). Default: compare.png in the runs' common parent "
        "directory, or compare-2.png, compare-3.png, ... there when that exists (never replaced)",
    )
    parser.add_argument(
        "--smooth", type=positive_int, default=5, help="trailing moving-average window in steps (1: raw values)"
    )
    parser.add_argument("--last", type=positive_int, default=10, help="steps averaged for the final-value table")
    parser.add_argument(
        "--first", type=positive_int, help="also average each run's first FIRST steps: the table reads first → last"
    )
    parser.add_argument(
        "--quarters", action="store_true", help="also print each arm's quarter means (Q1 → Q4) of the same keys"
    )
    parser.add_argument(
        "--keys",
        type=lambda text: text.split(","),
        default=TABLE_KEYS,
        help="comma-separated metric keys of the table (default: " + ",".join(TABLE_KEYS) + ")",
    )
    args = parser.parse_args(argv)
    arms: dict[str, list[list[dict]]] = {}
    horizons: dict[Path, tuple[int, int | None]] = {}
    for run_dir in args.runs:
        try:
            arm, rows, planned_steps = load_run(run_dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        arms.setdefault(arm, []).append(rows)
        if (run_dir / "config_changes.jsonl").exists():  # trainer.allow_config_change: more than one experiment
            print(f"warning: {run_dir} changed its config on a resume (config_changes.jsonl); it is drawn as its "
                  f"last config's arm, '{arm}', though earlier steps ran under another", file=sys.stderr)  # fmt: skip
        horizons[run_dir] = (len({row["step"] for row in rows if row["step"] >= 1}), planned_steps)  # 0: eval baseline
    warning = horizon_warning(horizons, args.last)
    if warning:
        print(warning, file=sys.stderr)
    out = args.out or default_out(args.runs)
    write_figure(figure(arms, args.smooth), out)
    print(final_table(arms, args.last, args.first, args.keys))
    if args.quarters:
        print("\n" + quarter_table(arms, args.keys))
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
