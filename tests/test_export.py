"""``busi export``: deployable files whose predictions match the trained Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import TINY

from busi.cli import main


@pytest.fixture(scope="module")
def mobilenet_run(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    work = tmp_path_factory.mktemp("export")
    (work / "tiny.yaml").write_text(TINY.format(data=synth_root, work=work))
    assert main(["train-seg", "--config", str(work / "tiny.yaml")]) == 0
    assert main(["train-cls", "--model", "mobilenet", "--config", str(work / "tiny.yaml")]) == 0
    (run,) = list((work / "outputs" / "cls" / "mobilenet").iterdir())
    return run


@pytest.mark.parametrize("fmt,quantize", [("tflite", "none"), ("tflite", "int8"),
                                          ("savedmodel", "none"), ("keras", "none")])
def test_export_matches_the_keras_model(mobilenet_run: Path, tmp_path: Path, fmt: str,
                                        quantize: str) -> None:
    out = tmp_path / "export"
    assert main(["export", str(mobilenet_run), "--format", fmt, "--quantize", quantize,
                 "--out", str(out)]) == 0
    r = json.loads((out / "export.json").read_text())
    assert Path(r["path"]).exists() and r["n_test"] > 0
    if quantize == "int8":  # recorded, not promised: int8 changes the numbers
        assert r["size_bytes"] < 0.5 * r["keras_size_bytes"]
        assert 0 <= r["top1_agreement"] <= 1
    else:
        assert r["top1_agreement"] >= 0.99


def test_export_options_that_do_not_fit_are_clear_errors(
        mobilenet_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(mobilenet_run), "--format", "keras", "--quantize", "int8"]) == 2
    assert "tflite only" in capsys.readouterr().err
    assert main(["export", str(mobilenet_run.parent)]) == 2
    assert "no best.keras" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.keras").write_text("the user's own file")
    assert main(["export", str(mobilenet_run), "--format", "keras", "--out", str(full)]) == 2
    assert "--out exists and is not an empty folder" in capsys.readouterr().err
    assert (full / "model.keras").read_text() == "the user's own file"
