"""Profile the stages of a quickstart run with py-spy (installed with Ray): where does a step's time go?

    python -m benchmarks.profile_step [--seconds 10] [overrides...]

Starts a training run, waits for two steps (engines warm), records every stage actor (`ray::Learner`,
`ray::Generator`, `ray::Refiner`, the driver) for `--seconds`, and prints each process's top functions by own time
and by inclusive time. Used for the notes in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runs import ROOT

STAGES = ("ray::Learner", "ray::Generator", "ray::Refiner", "scripts/train.py")


def pids_by_stage() -> dict[str, int]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    found = {}
    for line in listing[1:]:
        pid, _, args = line.strip().partition(" ")
        for stage in STAGES:
            if args.startswith(stage) or (stage.endswith(".py") and stage in args and "python" in args):
                found.setdefault(stage, int(pid))
    return found


def summarise(raw: Path, top: int) -> str:
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
            for f in stack.split(";")
            if " (" in f
        ]
        n = int(count)
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"  samples {total}; own time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run = subprocess.Popen(
            [sys.executable, "scripts/train.py", "--config", "configs/quickstart.yaml", f"trainer.output_dir={out}",
             "trainer.steps=1000", "metrics.wandb_mode=disabled", "metrics.progress_bar=false", *args.overrides],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            metrics = out / "metrics.jsonl"
            deadline = time.monotonic() + 900
            while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
                if time.monotonic() > deadline:
                    sys.exit("the training run did not finish two steps within 900 s")
                if run.poll() is not None:
                    sys.exit("the training run ended before two steps")
                time.sleep(1)
            recorders = {}
            for stage, pid in pids_by_stage().items():
                raw = Path(tmp) / f"{pid}.txt"
                command = ["py-spy", "record", "-p", str(pid), "-d", str(args.seconds), "-r", "100"]
                recorders[stage] = (
                    raw,
                    subprocess.Popen(
                        [*command, "--format", "raw", "-o", str(raw)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            for stage, (raw, recorder) in recorders.items():
                recorder.wait(timeout=args.seconds + 120)
                print(f"{stage}:\n{summarise(raw, args.top) if raw.exists() else '  (no samples)'}")
        finally:
            run.terminate()
            run.wait()


if __name__ == "__main__":
    main()
