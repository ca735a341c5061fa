"""The README stays short, its quickstart runs, and no relative link in it or in docs/ is broken."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200
# [text](target) and ![alt](target); the target ends at whitespace or ")" (a title may follow)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a URL scheme (http:, mailto:, ...) or a link inside the same page
EXTERNAL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|#)")


def quickstart_code(markdown: str) -> str:
    """The first ```python block after the "## Quickstart" heading of ``markdown``.

    Raises:
        ValueError: there is no such heading, or no python block follows it.
    """
    heading = re.search(r"^## Quickstart\s*$", markdown, flags=re.MULTILINE)
    if heading is None:
        raise ValueError('README.md has no "## Quickstart" heading')
    block = re.search(r"^```python\n(.*?)^```", markdown[heading.end():], flags=re.MULTILINE | re.DOTALL)
    if block is None:
        raise ValueError('no ```python block follows the "## Quickstart" heading of README.md')
    return block.group(1)


def relative_links(markdown: str) -> list[str]:
    """Link targets of ``markdown`` that point into the repository, without their ``#fragment``."""
    targets = (match.group(1) for match in LINK.finditer(markdown))
    return [target.split("#", 1)[0] for target in targets if not EXTERNAL.match(target)]


def markdown_files() -> list[Path]:
    """README.md and every page under docs/ (the benchmark's own results pages included)."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_starts_with_the_two_setup_commands():
    # CI calls `make test`: the commands stay first, as written
    first_block = re.search(r"^```bash\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert first_block is not None
    commands = [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_relative_links_resolve():
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in markdown_files()
        for target in relative_links(page.read_text())
        if target and not (page.parent / target).exists()
    ]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_link_finder_sees_links_images_and_skips_urls():
    text = "[a](docs/a.md#part) ![plot](x/y.png) [web](https://e.org/z) [here](#top) [t](b.md \"title\")"
    assert relative_links(text) == ["docs/a.md", "x/y.png", "b.md"]


def test_quickstart_is_found_after_its_heading():
    text = "```python\nnot_this()\n```\n## Quickstart\n\ntext\n\n```python\nthis()\n```\n"
    assert quickstart_code(text) == "this()\n"
    with pytest.raises(ValueError, match="Quickstart"):
        quickstart_code("```python\nx = 1\n```\n")


def test_quickstart_runs_and_improves_the_policy(monkeypatch, capsys):
    # the quickstart's paths are relative to the repository root, as a user runs it from a checkout
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(quickstart_code(README.read_text()), "README.md:Quickstart", "exec"), namespace)
    rows, policy = namespace["rows"], namespace["policy"]
    assert [row["step"] for row in rows] == list(range(len(rows))) and len(rows) >= 2
    # the shipped lesser policy is recorded at 0% on its held-out goal (measured here: 0.0 -> 1.0)
    assert rows[-1]["success"] >= 0.5 and rows[-1]["success"] > rows[0]["success"]
    assert rows[-1]["mean_return"] > rows[0]["mean_return"]
    assert isinstance(policy, nn.Module)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(rows)
