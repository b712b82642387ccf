"""docs/RESULTS.md cites only configs that are in the repository and load with today's busi.

Each figure of docs/RESULTS.md names the config that reproduces it: a frozen file in
configs/experiments/ (the config committed when the figure was measured, with the run's
``--set`` overrides folded in). A doc that cites a config which is gone, or a frozen config
that today's code refuses, cannot be reproduced; these tests say so without training anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from busi.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
# A path into configs/ as the doc writes it: `configs/cpu.yaml`, `git show X:configs/cpu.yaml`;
# not src/busi/configs/... (the packaged link to the same folder).
CITED = re.compile(r"(?<![\w/.-])configs/[\w./-]+?\.ya?ml\b")


def results_text() -> str:
    return RESULTS.read_text(encoding="utf-8")


def headings(text: str) -> list[str]:
    """Markdown ATX headings, outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6}\s", line):
            out.append(line)
    return out


def test_there_are_experiment_configs() -> None:
    assert EXPERIMENTS, "configs/experiments/ holds no *.yaml"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_config_loads_with_todays_code(path: Path) -> None:
    load_config(path)


def test_every_config_cited_in_results_exists() -> None:
    cited = set(CITED.findall(results_text()))
    assert cited, "docs/RESULTS.md cites no config at all"
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"docs/RESULTS.md cites configs that do not exist: {missing}"


def test_every_experiment_config_is_cited_in_results() -> None:
    cited = set(CITED.findall(results_text()))
    orphans = [p.name for p in EXPERIMENTS
               if p.relative_to(ROOT).as_posix() not in cited]
    assert not orphans, f"configs/experiments/ files no figure in docs/RESULTS.md cites: {orphans}"


def test_no_heading_of_results_names_an_issue() -> None:
    found = headings(results_text())
    assert found, "docs/RESULTS.md has no headings"
    bad = [h for h in found if re.search(r"\bissues?\b", h, re.IGNORECASE)]
    assert not bad, f"headings that name an issue: {bad}"


def test_the_checks_see_what_they_should() -> None:
    """The helpers themselves: a fenced '# comment' is no heading, 'tissue' is no issue, and a
    packaged path is not read as a top-level one."""
    text = "# Results\n```\n# issue 3\n```\n## Normal tissue\n"
    assert headings(text) == ["# Results", "## Normal tissue"]
    assert not re.search(r"\bissues?\b", "## Normal tissue", re.IGNORECASE)
    assert CITED.findall("`git show 06c52af:configs/cpu.yaml`, src/busi/configs/x.yaml") == [
        "configs/cpu.yaml"]
