"""One copy of each config: ``--config cpu`` reads the file a reader edits.

``src/busi/configs`` (what a wheel packages and a bare name falls back to) is a link to
the top-level ``configs/``; .ci/run also checks that a built wheel carries those files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import busi.config
from busi.config import find_config

ROOT = Path(__file__).resolve().parents[1]
TOP = ROOT / "configs"
PACKAGED = ROOT / "src" / "busi" / "configs"


def test_the_packaged_configs_are_the_top_level_files() -> None:
    names = sorted(p.name for p in TOP.glob("*.yaml"))
    assert names and names == sorted(p.name for p in PACKAGED.glob("*.yaml"))
    for name in names:  # the same file, not an equal copy that the next edit splits
        assert os.path.samefile(PACKAGED / name, TOP / name), name
    assert Path(busi.config.__file__).parent / "configs" == PACKAGED


def test_a_bare_name_says_which_file_it_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(busi.config, "_NAMES_SAID", set(), raising=False)
    monkeypatch.chdir(tmp_path)  # no ./configs here: the packaged file, nothing to tell
    assert find_config("cpu").resolve() == (TOP / "cpu.yaml").resolve()
    assert capsys.readouterr().err == ""
    # ./configs/<name>.yaml comes first, and is said to differ from the packaged one
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "paper.yaml").write_text("training: {seg: {epochs: 1}}\n")
    assert find_config("paper") == Path("configs/paper.yaml")
    err = capsys.readouterr().err
    assert str((tmp_path / "configs" / "paper.yaml").resolve()) in err
    assert "not the same as busi's packaged" in err and "paper.yaml" in err
    find_config("paper")
    assert capsys.readouterr().err == ""  # once per name
    # a path is what it says: nothing to tell
    assert find_config(str(TOP / "demo.yaml")) == TOP / "demo.yaml"
    assert capsys.readouterr().err == ""


def test_paper_bce_dice_is_the_paper_with_one_change() -> None:
    """busi issue 27: every setting of paper_bce_dice.yaml is paper.yaml's except the U-Net's
    loss, so a figure measured with it isolates that change."""
    from dataclasses import asdict

    paper = asdict(busi.config.load_config(TOP / "paper.yaml"))
    changed = asdict(busi.config.load_config(TOP / "paper_bce_dice.yaml"))
    assert changed["training"]["seg"].pop("loss") == "bce_dice"
    assert paper["training"]["seg"].pop("loss") == "mse"
    assert changed == paper

    def lines(name: str) -> list[str]:  # the settings, without comments
        text = (TOP / name).read_text().splitlines()
        return [ln.split("#")[0].rstrip() for ln in text if ln.split("#")[0].strip()]

    diff = [(a, b) for a, b in zip(lines("paper.yaml"), lines("paper_bce_dice.yaml"),
                                   strict=True) if a != b]
    assert diff == [("    loss: mse", "    loss: bce_dice")]
