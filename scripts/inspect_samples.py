"""Show samples: python scripts/inspect_samples.py RUN_DIR [--step N] [--no-color]

Prints each logged sample of a step (default: the last) from RUN_DIR/samples.jsonl: query, response, reward,
and the refined output as an inline diff against the response (red: removed by the refiner, green: added).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

RED, GREEN, DIM, RESET = "\033[31m", "\033[32m", "\033[2m", "\033[0m"


def inline_diff(response: str, refined: str, color: bool) -> str:
    """The refined text as edits of the response: [-removed-]{+added+}, coloured when `color`."""
    out = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=response, b=refined, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(response[a0:a1])
            continue
        if a1 > a0:
            out.append(f"{RED}{response[a0:a1]}{RESET}" if color else f"[-{response[a0:a1]}-]")
        if b1 > b0:
            out.append(f"{GREEN}{refined[b0:b1]}{RESET}" if color else f"{{+{refined[b0:b1]}+}}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory (trainer.output_dir)")
    parser.add_argument("--step", type=int, help="step to show (default: the last one logged)")
    parser.add_argument("--no-color", action="store_true", help="mark edits as [-removed-]{+added+}")
    args = parser.parse_args(argv)
    path = args.run / "samples.jsonl"
    if not path.exists():
        print(f"error: {path} not found (is {args.run} a run directory?)", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = args.step if args.step is not None else max(r["step"] for r in rows)
    chosen = [r for r in rows if r["step"] == step]
    if not chosen:
        print(f"error: no samples logged at step {step} in {path}", file=sys.stderr)
        return 2
    color = not args.no_color and sys.stdout.isatty()
    for r in chosen:
        print(f"{DIM if color else ''}{r['sample_id']}  reward {r['reward']:.3f}{RESET if color else ''}")
        print(f"  query    {r['query']}")
        print(f"  response {r['response']!r}")
        if r.get("refined") is not None:
            same = r["refined"] == r["response"]
            print(f"  refined  {'(unchanged)' if same else inline_diff(r['response'], r['refined'], color)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
