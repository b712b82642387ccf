"""The loader must read every PNG flavour BUSI ships, merge masks, cache, and fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi.data import loading as data_mod
from busi.data.loading import load_dataset, scan
from busi.errors import BusiError

SIZE = (32, 32)


def load(root: Path, tmp_path: Path, **kw):
    return load_dataset(root, size=SIZE, cache_dir=tmp_path / "cache", **kw)


def test_loads_the_busi_layout_with_spaces_and_parentheses(synth_root: Path,
                                                           tmp_path: Path) -> None:
    ds = load(synth_root, tmp_path)
    assert len(ds) == 36
    assert ds.images.shape == (36, *SIZE) and ds.images.dtype == np.uint8
    assert set(np.unique(ds.masks)) <= {0, 1}
    assert "benign/benign (1).png" in ds.files
    assert np.bincount(ds.labels).tolist() == [12, 12, 12]
    normal = ds.labels == ds.classes.index("normal")
    assert not ds.masks[normal].any() and ds.masks[~normal].reshape(24, -1).any(1).all()


def test_extra_masks_are_merged_by_or(data_copy: Path, tmp_path: Path) -> None:
    img = cv2.imread(str(data_copy / "benign/benign (1).png"), cv2.IMREAD_UNCHANGED)
    left = np.zeros(img.shape[:2], np.uint8)
    right = left.copy()
    left[:, : img.shape[1] // 4] = 255
    right[:, -img.shape[1] // 4:] = 255
    cv2.imwrite(str(data_copy / "benign/benign (1)_mask.png"), left)
    cv2.imwrite(str(data_copy / "benign/benign (1)_mask_1.png"), right)
    ds = load(data_copy, tmp_path)
    i = ds.files.index("benign/benign (1).png")
    assert ds.n_masks[i] == 2
    m = ds.masks[i]
    assert m[:, 0].all() and m[:, -1].all() and not m[:, SIZE[1] // 2].any()


@pytest.mark.parametrize("flavour", ["rgb", "rgba", "uint16"])
def test_gray_rgb_rgba_and_16_bit_decode_to_the_same_gray(data_copy: Path, tmp_path: Path,
                                                          flavour: str) -> None:
    path = data_copy / "malignant/malignant (2).png"
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    ds0 = load(data_copy, tmp_path / "a")
    i = ds0.files.index("malignant/malignant (2).png")
    before = ds0.images[i]
    variant = {"rgb": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
               "rgba": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA),
               "uint16": gray.astype(np.uint16) * 257}[flavour]
    cv2.imwrite(str(path), variant)
    after = load(data_copy, tmp_path / "b").images[i]
    assert np.abs(after.astype(int) - before.astype(int)).max() <= 1


def test_mask_resize_is_nearest_so_masks_stay_binary(data_copy: Path, tmp_path: Path) -> None:
    ds = load_dataset(data_copy, size=(50, 70), cache_dir=None)
    assert ds.images.shape[1:] == (50, 70)
    assert set(np.unique(ds.masks)) == {0, 1}


def test_second_load_comes_from_the_cache(synth_root: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(synth_root, tmp_path)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data_mod, "decode_case", no_decoding)
    second = load(synth_root, tmp_path)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.masks, second.masks) and first.files == second.files


def test_changed_file_content_invalidates_the_cache(data_copy: Path, tmp_path: Path) -> None:
    first = load(data_copy, tmp_path)
    path = data_copy / "normal/normal (3).png"
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(path), 255 - img)
    second = load(data_copy, tmp_path)
    assert second.fingerprint != first.fingerprint
    i = second.files.index("normal/normal (3).png")
    assert not np.array_equal(first.images[i], second.images[i])


def test_missing_folder_and_missing_class_folder(tmp_path: Path, data_copy: Path) -> None:
    with pytest.raises(BusiError, match="data folder not found"):
        scan(tmp_path / "nope", ["benign"])
    shutil.rmtree(data_copy / "normal")
    with pytest.raises(BusiError, match="'normal/' is missing") as err:
        scan(data_copy, ["benign", "malignant", "normal"])
    assert "fix:" in str(err.value)


def test_empty_class_folder(data_copy: Path) -> None:
    for p in (data_copy / "normal").iterdir():
        p.unlink()
    with pytest.raises(BusiError, match="has no images") as err:
        scan(data_copy, ["benign", "malignant", "normal"])
    assert "normal" in str(err.value)


def test_corrupt_png_names_the_file_or_is_skipped_when_configured(
        data_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = data_copy / "benign/benign (5).png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BusiError, match="cannot decode image") as err:
        load(data_copy, tmp_path)
    assert "benign (5).png" in str(err.value) and "on_bad_file: skip" in str(err.value)
    ds = load(data_copy, tmp_path, on_bad_file="skip")
    assert len(ds) == 35 and "benign/benign (5).png" not in ds.files
    assert "skipped" in capsys.readouterr().err
    # The cache (written by the failed run) must give the same answer.
    with pytest.raises(BusiError, match="cannot decode image"):
        load(data_copy, tmp_path)


def test_mask_of_another_size(data_copy: Path, tmp_path: Path) -> None:
    cv2.imwrite(str(data_copy / "malignant/malignant (3)_mask.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(BusiError, match="mask is 10x10 but its image is") as err:
        load(data_copy, tmp_path)
    assert "malignant (3)_mask.png" in str(err.value)


def test_mask_without_image_and_image_without_mask(data_copy: Path, tmp_path: Path) -> None:
    (data_copy / "benign/benign (2).png").unlink()
    with pytest.raises(BusiError, match="mask has no image"):
        load(data_copy, tmp_path)
    (data_copy / "benign/benign (2)_mask.png").unlink()
    (data_copy / "benign/benign (3)_mask.png").unlink()
    with pytest.raises(BusiError, match="image has no mask") as err:
        load(data_copy, tmp_path)
    assert "benign (3).png" in str(err.value)
    assert len(load(data_copy, tmp_path, on_bad_file="skip")) == 34


def _csv(root: Path, text: str) -> Path:
    path = root / "manifest.csv"
    path.write_text(text)
    return path


def test_csv_manifest_paths_relative_to_it_empty_mask_means_no_lesion(synth_root: Path) -> None:
    csv_path = _csv(synth_root.parent, (
        "image,mask,label\n"
        "busi/benign/benign (1).png,busi/benign/benign (1)_mask.png,benign\n"
        "busi/malignant/malignant (2).png,busi/malignant/malignant (2)_mask.png,malignant\n"
        "busi/normal/normal (3).png,,normal\n"))
    ds = load_dataset(csv_path, size=(32, 32), cache_dir=None)
    assert ds.files == ["busi/benign/benign (1).png", "busi/malignant/malignant (2).png",
                        "busi/normal/normal (3).png"]
    assert ds.labels.tolist() == [0, 1, 2]
    assert ds.masks[0].any() and not ds.masks[2].any()
    assert ds.n_masks.tolist() == [1, 1, 0]


def test_csv_manifest_without_normal_rows_is_fine(synth_root: Path) -> None:
    csv_path = _csv(synth_root.parent, "image,mask,label\n"
                    "busi/benign/benign (1).png,busi/benign/benign (1)_mask.png,benign\n")
    assert len(load_dataset(csv_path, size=(32, 32), cache_dir=None)) == 1


@pytest.mark.parametrize("text,message", [
    ("image,label\nx.png,benign\n", "lacks column(s) mask"),
    ("image,mask,label\nbusi/benign/benign (1).png,,cancer\n", "line 2: label 'cancer'"),
    ("image,mask,label\nbusi/benign/nope.png,,benign\n", "line 2: file not found"),
    ("image,mask,label\n", "has no rows"),
])
def test_csv_manifest_errors_name_the_line_and_the_fix(synth_root: Path, text: str,
                                                       message: str) -> None:
    csv_path = _csv(synth_root.parent, text)
    with pytest.raises(BusiError, match="fix:") as err:
        load_dataset(csv_path, size=(32, 32), cache_dir=None)
    assert message in str(err.value)


def test_zero_byte_image_is_a_bad_file_not_a_crash(data_copy: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # OpenCV raises on an empty buffer instead of returning None
    (data_copy / "benign/benign (5).png").write_bytes(b"")
    with pytest.raises(BusiError, match="cannot decode image") as err:
        load(data_copy, tmp_path)
    assert "benign (5).png" in str(err.value)
    ds = load(data_copy, tmp_path, on_bad_file="skip")
    assert "benign/benign (5).png" not in ds.files and len(ds) == 35
    (data_copy / "malignant/malignant (2)_mask.png").write_bytes(b"")
    ds = load(data_copy, tmp_path, collect=True)
    assert {Path(p.file).name for p in ds.problems} >= {"benign (5).png",
                                                        "malignant (2)_mask.png"}


def test_two_images_whose_names_differ_only_in_extension_are_refused(
        data_copy: Path, tmp_path: Path) -> None:
    # x.png and x.jpg: x_mask.png cannot say whose mask it is; neither may silently win
    src = data_copy / "benign/benign (3).png"
    cv2.imwrite(str(src.with_suffix(".jpg")), cv2.imread(str(src)))
    with pytest.raises(BusiError, match="same name before the extension") as err:
        load(data_copy, tmp_path)
    assert "benign (3)" in str(err.value) and "rename" in str(err.value)
    ds = load(data_copy, tmp_path, on_bad_file="skip")
    assert not any(f.startswith("benign/benign (3).") for f in ds.files)
    assert len(ds) == 35
    names = {Path(p.file).name for p in load(data_copy, tmp_path, collect=True).problems}
    assert {"benign (3).png", "benign (3).jpg"} <= names
