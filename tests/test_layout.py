"""The package's layout, as docs/architecture.md describes it: every module is a row of its data-flow table and
every row a module, imports go one way (no cycles), no catch-all or standard-library module names, and the
driver's stages (rollout round, evaluation, run state) meet only in `loop.py`, each waiting on its own remote calls
through `remote.py`."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_refiner"
DRIVER_STAGES = {"rollout", "evaluation", "run_state"}  # each sequenced by loop.run, none by another stage


def house() -> list[str]:
    """The modules in the table's order; `reward/` is one row group (its modules may import each other)."""
    order: list[str] = []
    for cell in re.findall(r"^\| (.+?) \|", (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE):
        for name in re.findall(r"`([\w/]+)\.py`", cell):
            module = "reward" if name.startswith("reward/") else name
            if module not in order:
                order.append(module)
    return order


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return "reward" if relative.parts[0] == "reward" else relative.stem


def imported_modules(path: Path) -> set[str]:
    """The package modules `path` imports, anywhere in it (type-checking and function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_refiner"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # `from rlhf_refiner import algo, checkpoint`
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("rlhf_refiner."))
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_is_in_the_architecture_table_and_every_row_exists():
    table, modules = house(), {module_name(p) for p in sources()}
    assert set(table) == modules, (
        f"missing from docs/architecture.md: {modules - set(table)}; stale rows: {set(table) - modules}"
    )


def test_imports_go_one_way():
    """No import cycle between modules (type-checking and deferred imports count): the layering stays readable."""
    graph = {}
    for path in sources():
        graph.setdefault(module_name(path), set()).update(imported_modules(path) - {module_name(path)})

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        for target in sorted(graph.get(module, ())):
            if target == path[0]:
                return [*path, target]
            if target not in path and (found := cycle_from(target, [*path, target])):
                return found
        return None

    cycles = [" -> ".join(c) for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert not cycles, cycles


def test_no_catch_all_or_standard_library_module_names():
    names = {path.stem for path in sources()}
    assert not names & {"utils", "common", "core", "base", "helpers", "misc"}
    assert not names & set(sys.stdlib_module_names) - {"__init__"}


def test_driver_stages_meet_only_in_the_loop():
    crossings = [
        f"{path.name} imports {target}"
        for path in sources()
        if module_name(path) in DRIVER_STAGES
        for target in imported_modules(path) & DRIVER_STAGES - {module_name(path)}
    ]
    assert not crossings, "\n".join(crossings)
