"""`busi data check` must surface every problem and duplicate a user needs to know about."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest

from busi.cli import main
from busi.data.check import check_dataset, format_markdown, format_report


def test_clean_synthetic_set(synth_root: Path, tmp_path: Path) -> None:
    r = check_dataset(synth_root, cache_dir=tmp_path)
    assert r.images_per_class == {"benign": 12, "malignant": 12, "normal": 12}
    assert r.n_problems == 0 and not r.exact_groups and not r.near_groups
    assert sum(r.masks_per_image.values()) == 36


def test_lists_problems_and_duplicates_with_file_names(data_copy: Path, tmp_path: Path) -> None:
    (data_copy / "benign/benign (3)_mask.png").unlink()                  # image without mask
    shutil.copy(data_copy / "normal/normal (1)_mask.png",
                data_copy / "normal/normal (77)_mask.png")               # mask without image
    (data_copy / "normal/normal (2).png").write_bytes(b"garbage")       # unreadable
    shutil.copy(data_copy / "benign/benign (4).png", data_copy / "malignant/malignant (50).png")
    shutil.copy(data_copy / "benign/benign (4)_mask.png",
                data_copy / "malignant/malignant (50)_mask.png")         # exact, cross-class
    img = cv2.imread(str(data_copy / "benign/benign (6).png"), cv2.IMREAD_GRAYSCALE)
    cv2.line(img, (5, 5), (20, 5), 255, 1)                              # a caliper mark
    cv2.imwrite(str(data_copy / "benign/benign (60).png"), img)
    shutil.copy(data_copy / "benign/benign (6)_mask.png", data_copy / "benign/benign (60)_mask.png")

    r = check_dataset(data_copy, cache_dir=tmp_path)
    assert r.images_without_mask == ["benign/benign (3).png"]
    assert r.masks_without_image == ["normal/normal (77)_mask.png"]
    assert [f for f, _ in r.unreadable] == ["normal/normal (2).png"]
    assert ["benign/benign (4).png", "malignant/malignant (50).png"] in r.exact_groups
    assert ["benign/benign (6).png", "benign/benign (60).png"] in r.near_groups
    assert len(r.cross_class_groups) == 1 and r.n_problems == 3
    text = format_report(r)
    for name in ("benign (3).png", "normal (77)_mask.png", "normal (2).png", "benign (60).png"):
        assert name in text
    assert "| benign |" in format_markdown(r)


def test_strict_makes_problems_fatal(data_copy: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "check", "--data", str(data_copy), "--set", f"data.cache_dir={tmp_path}"]
    assert main(argv + ["--strict"]) == 0
    (data_copy / "benign/benign (3)_mask.png").unlink()
    assert main(argv) == 0
    assert main(argv + ["--strict"]) == 2
    assert "--strict" in capsys.readouterr().err
