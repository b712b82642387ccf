"""The README's main command, `busi demo`, runs the whole pipeline (made tiny here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from busi.cli import main

TINY = ["data.image_size=[32, 32]", "model.unet.base_filters=4", "model.unet.depth=2",
        "training.seg.epochs=1", "training.seg.steps_per_epoch=2",
        "training.cls.epochs=1", "training.cls.steps_per_epoch=2"]


def test_demo_runs_every_stage_and_prints_the_tables(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "demo"
    argv = ["demo", "--outputs", str(work), "--per-class", "8"]
    for item in TINY:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in ("precision", "recall", "Side by side", "cnn", "vgg19", "mobilenet"):
        assert word in out
    assert list((work / "seg").glob("*/masks.npz"))
    for model in ("cnn", "vgg19", "mobilenet"):
        assert list((work / "cls" / model).glob("*/predictions.csv")), model
    assert list((work / "eval").glob("*/evaluation.md"))
    assert str(work) in out, "the demo ends by saying where the outputs are"
