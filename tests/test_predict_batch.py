"""busi issue 10: ``busi predict`` on a batch keeps the readable images (fast: no models).

The models are replaced by a stand-in, so these tests pin the skipping, the listing and
the exit codes; test_pipeline.py runs the same on real trained runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import busi.inference.predict as predict
from busi.cli import main


class FakePredictor:
    """The attributes and call of :class:`busi.inference.predict.Predictor`, no model."""

    before_first_image = None  # a hook: what happens between the check and the predictions

    def __init__(self, seg_run, cls_run, outputs_root, sensitivity=None, **fold_ensemble):
        self.seg, self.cls = Path(seg_run or "seg"), Path(cls_run or "cls")
        self.op, self.last_unet_max = None, 1.0  # a run from before operating points
        self.last_unet_head = None  # and before the presence head
        self.size, self.classes, self.min_confidence = (32, 32), ["benign", "normal"], 0.6
        self.rule, self.flip_tta = SimpleNamespace(threshold=0.5, postprocess="none"), False
        if FakePredictor.before_first_image:
            FakePredictor.before_first_image()

    def __call__(self, gray):
        mask = np.zeros(self.size, np.uint8)
        mask[8:16, 8:16] = 1
        return mask, None, np.array([0.9, 0.1])


@pytest.fixture
def scans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(predict, "Predictor", FakePredictor)
    monkeypatch.setattr(FakePredictor, "before_first_image", None)
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(folder / name), np.full((40, 50), 120, np.uint8))
    (folder / "b.png").write_bytes(b"\x89PNG truncated")
    return folder


def test_a_batch_predicts_the_readable_images_and_exits_3_listing_the_others(
        scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(scans), "--out", str(out)]) == predict.EXIT_SKIPPED == 3
    err = capsys.readouterr().err
    assert f"busi: warning: skipped {scans / 'b.png'}: cannot decode image" in err
    assert "1 of 3 image(s) skipped as unreadable" in err and "exit code 3" in err
    with open(out / "predictions.csv", newline="") as fh:
        assert [Path(r["file"]).name for r in csv.DictReader(fh)] == ["a.png", "c.png"]
    with open(out / "skipped.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [
            ["file", "reason"],
            [str(scans / "b.png"), "cannot decode image (corrupt file, or not an image)"]]
    assert json.loads((out / "predictions.json").read_text())["skipped"] == [
        {"file": str(scans / "b.png"),
         "reason": "cannot decode image (corrupt file, or not an image)"}]
    assert (out / "a_mask.png").is_file() and not list(out.glob("b_*"))


def test_a_file_that_breaks_after_the_check_is_skipped_too(
        scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Once outputs are being written a bad file no longer stops the batch half-written."""
    FakePredictor.before_first_image = lambda: (scans / "c.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["predict", str(scans), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert f"skipped {scans / 'c.png'}: empty file (0 bytes) (the file changed while" in err
    assert "2 of 3 image(s) skipped" in err
    done = json.loads((out / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in done["predictions"]] == ["a.png"]
    assert [Path(r["file"]).name for r in done["skipped"]] == ["b.png", "c.png"]
    with open(out / "skipped.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_no_readable_image_is_exit_2_before_any_model_or_output(
        scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_model(*args):
        raise AssertionError("no model is loaded when nothing can be read")

    monkeypatch.setattr(predict, "Predictor", no_model)
    for name in ("a.png", "c.png"):
        (scans / name).write_bytes(b"")
    out = tmp_path / "out"
    for argv, n in (([str(scans)], 3), ([str(scans / "b.png")], 1)):
        assert main(["predict", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"nothing predicted ({n} of {n} image(s) cannot be read)" in err, err
        assert len(err.strip().splitlines()) == 1 and "fix:" in err
        assert not out.exists()


def test_all_read_is_exit_0_with_no_skipped_csv(
        scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (scans / "b.png").unlink()
    out = tmp_path / "out"
    assert main(["predict", str(scans), "--out", str(out)]) == 0
    assert not (out / "skipped.csv").exists()
    assert json.loads((out / "predictions.json").read_text())["skipped"] == []
    assert "skipped" not in capsys.readouterr().err


def test_predict_help_states_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "skipped.csv" in text and "3 some skipped, the rest predicted" in text
    assert "2 nothing predicted" in text
