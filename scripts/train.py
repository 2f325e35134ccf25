"""Train: python scripts/train.py --config configs/quickstart.yaml [key.sub=value ...]"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from rlhf_refiner import config as config_lib  # pydantic and yaml only: --help stays fast

    parser = argparse.ArgumentParser(
        description="RL fine-tuning with an online refiner (dynamic constraints).",
        epilog="Config keys (defaults); `--help-config SECTION` shows one section with full docs:\n\n"
        + config_lib.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file, e.g. configs/quickstart.yaml (required to train)")
    parser.add_argument(
        "--help-config",
        nargs="?",
        const="",
        metavar="SECTION",
        help="print the config keys with defaults and full docs, only SECTION's if given (e.g. algo, "
        "generator.sampling), and exit",
    )
    parser.add_argument(
        "--config-reference",
        action="store_true",
        help=f"print the whole config tree as the Markdown of docs/configuration.md ({config_lib.REFERENCE_COMMAND}) "
        "and exit",
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.steps=5")
    args = parser.parse_args(argv)
    if args.config_reference:
        sys.stdout.write(config_lib.reference_markdown())
        return 0
    if args.help_config is not None:
        try:
            print(config_lib.describe(args.help_config, full=True))
        except config_lib.ConfigError as e:
            parser.error(str(e))
        return 0
    if args.config is None:
        parser.error("the following arguments are required: --config")

    try:
        config = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rlhf_refiner import loop  # heavy imports (ray, torch) only after the config is known to be valid

    try:
        summary = loop.run(config)
    except config_lib.ConfigError as e:  # found once the run's state is read (a resume with another config)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    sys.exit(main())
