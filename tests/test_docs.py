"""The docs stay true: docs/configuration.md is the config tree's current rendering, every relative link in README.md
and docs/ resolves (to a file, and to a heading for `#anchor`), and every `configs/*.yaml` they name exists and
loads. Each check runs on the real pages, and on a small page that breaks it, so that it can fail."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_refiner import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200  # issue 24: a newcomer reads it in five minutes; the rest belongs in docs/

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
CONFIG_PATH = re.compile(r"configs/[\w./-]+?\.yaml\b")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans: a `[x](y)` or `# comment` there is not Markdown."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (code spans keep their content, links their text, emphasis
    markers `*` go) lowercased, every character but letters, digits, `-`, `_` and spaces dropped, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = text.replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> Iterator[str]:
    """Every heading's anchor, with GitHub's `-1`, `-2`, ... for repeats."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        yield base if count == 0 else f"{base}-{count}"


def broken_links(page: Path) -> list[str]:
    """`page: target (why)` for each relative link of `page` that does not resolve."""
    text = page.read_text()
    broken = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... are not checked here
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in set(anchors(resolved.read_text())):
            broken.append(f"{page.name}: {target} (no heading with anchor #{anchor} in {resolved.name})")
    return broken


def configs_named(page: Path) -> list[str]:
    return sorted(set(CONFIG_PATH.findall(page.read_text())))


def test_configuration_reference_is_current():
    page = ROOT / "docs" / "configuration.md"
    assert page.exists(), f"docs/configuration.md is missing: run `{config_lib.REFERENCE_COMMAND}`"
    assert page.read_text() == config_lib.reference_markdown(), (
        f"docs/configuration.md is stale (the config tree in rlhf_refiner/config.py changed): run "
        f"`{config_lib.REFERENCE_COMMAND}` and commit the result"
    )


def test_configuration_reference_lists_every_key_once_with_escaped_cells():
    text = config_lib.reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    assert len(keys) == len(set(keys)) > 100
    assert "| `algo.ce_coef` | `float, >=0` | `1.0` | λ, weight of the CE on refined tokens (`dynamic`). |" in rows
    assert "| `refiner.sampling.temperature` | `float, >=0` | `0.0` |" in text  # the instance default, not the class's
    # a `|` inside a cell is escaped, so every row has exactly the table's four cells
    assert "`float32\\|bfloat16\\|float16`" in text
    assert all(len(re.split(r"(?<!\\)\|", row)) == 6 for row in rows)
    assert "## `generator`" in text and "### `generator.sampling`" in text
    assert "#### `model.embedded.targets`" in text and "##### " not in text  # a heading level per depth


def test_every_relative_link_resolves():
    broken = [problem for page in PAGES for problem in broken_links(page)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The gated-copy refiner (`refiner.mode=gated`, new)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Results: A vs B (CPU)\n\nSee [ok](other.md#the-gated-copy-refiner-refinermodegated-new), "
        "[here](#results-a-vs-b-cpu), [web](https://example.com/x.md), `[code](nope.md)` and:\n\n"
        "```bash\n# not a heading\necho [x](nope.md)\n```\n\n"
        "[gone](missing.md), [bad anchor](other.md#no-such-heading), [local](#not-here), ![img](pic.png)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#no-such-heading (no heading with anchor #no-such-heading in other.md)",
        "page.md: #not-here (no heading with anchor #not-here in page.md)",
        "page.md: pic.png (no such file)",
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Results: Dynamic vs Static KL vs no constraint where RL degenerates (CPU)",
         "results-dynamic-vs-static-kl-vs-no-constraint-where-rl-degenerates-cpu"),
        ("The gated-copy refiner (`refiner.mode=gated`, beyond the paper)",
         "the-gated-copy-refiner-refinermodegated-beyond-the-paper"),
        ("`refiner/unchanged_frac`", "refinerunchanged_frac"),
        ("What λ does", "what-λ-does"),
        ("Held-out evaluation: `eval/*`", "held-out-evaluation-eval"),
        ("**Bold** and [a link](x.md)", "bold-and-a-link"),
    ],
)  # fmt: skip
def test_slug_follows_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors():
    assert list(anchors("# A\n## A\n```\n# A\n```\n### A\n")) == ["a", "a-1", "a-2"]


def missing_configs(named: set[str], root: Path) -> list[str]:
    return sorted(path for path in named if not (root / path).is_file())


def test_every_config_the_docs_name_exists_and_loads():
    named = {path for page in PAGES for path in configs_named(page)}
    assert "configs/quickstart.yaml" in named and any(path.startswith("configs/paper/") for path in named)
    missing = missing_configs(named, ROOT)
    assert not missing, f"configs named in README.md or docs/ that do not exist: {missing}"
    for path in sorted(named):
        config_lib.load(ROOT / path)  # raises ConfigError naming the file and the field


def test_the_config_check_catches_a_missing_or_invalid_config(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `configs/quickstart.yaml`, then configs/paper/apps_dynamic.yaml, not configs/*.yaml.\n")
    assert configs_named(page) == ["configs/paper/apps_dynamic.yaml", "configs/quickstart.yaml"]
    assert missing_configs({"configs/quickstart.yaml", "configs/paper/apps_dynamc.yaml"}, ROOT) == [
        "configs/paper/apps_dynamc.yaml"
    ]
    bad = tmp_path / "configs" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("algo:\n  kl_coeff: 0.1\n")
    with pytest.raises(config_lib.ConfigError, match=r"algo\.kl_coeff: unknown key"):
        config_lib.load(bad)


def test_readme_stays_a_five_minute_read():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
