"""Splits: reproducible, shared by every command, and never leaking duplicates into test."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from busi.config import SplitConfig
from busi.data.loading import load_dataset
from busi.data.split import duplicate_groups, get_manifest


def dataset(root: Path, tmp_path: Path):
    return load_dataset(root, size=(32, 32), cache_dir=tmp_path / "cache")


def with_duplicates(root: Path) -> Path:
    """Copy two images under new names, one into another class (as in BUSI)."""
    for src, dst in [("benign/benign (1)", "benign/benign (99)"),
                     ("benign/benign (2)", "malignant/malignant (99)")]:
        shutil.copy(root / f"{src}.png", root / f"{dst}.png")
        shutil.copy(root / f"{src}_mask.png", root / f"{dst}_mask.png")
    return root


def test_holdout_is_90_10_and_byte_identical_for_the_same_seed(synth_root: Path,
                                                              tmp_path: Path) -> None:
    ds = dataset(synth_root, tmp_path)
    a = get_manifest(ds, SplitConfig(manifest_dir=str(tmp_path / "a")), seed=3)
    b = get_manifest(ds, SplitConfig(manifest_dir=str(tmp_path / "b")), seed=3)
    c = get_manifest(ds, SplitConfig(manifest_dir=str(tmp_path / "c")), seed=4)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    parts = a.partition()
    assert len(parts["test"]) == 4 and len(parts["train"]) + len(parts["val"]) == 32
    assert not set(parts["test"]) & (set(parts["train"]) | set(parts["val"]))
    assert not set(parts["train"]) & set(parts["val"])


def test_manifest_is_written_once_and_reused(synth_root: Path, tmp_path: Path) -> None:
    ds = dataset(synth_root, tmp_path)
    cfg = SplitConfig(manifest_dir=str(tmp_path / "m"))
    first = get_manifest(ds, cfg, seed=0)
    first.path.write_text(first.path.read_text())  # same content, new mtime
    stamp = first.path.stat().st_mtime_ns
    again = get_manifest(ds, cfg, seed=0)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    other = get_manifest(ds, replace(cfg, test_size=0.25), seed=0)
    assert other.path != first.path


def test_a_run_finds_its_manifest_from_any_folder(synth_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run records its manifest as given (``outputs/splits/...``, relative to where busi
    ran); a classifier trained from another folder on that U-Net still reads it, and a
    manifest really gone is named with the fix, not 'delete it'."""
    from busi.data.split import read_manifest
    from busi.errors import BusiError
    from busi.runs import read_split, write_split

    project = tmp_path / "project"
    monkeypatch.chdir(project.parent)
    cfg = SplitConfig(manifest_dir="project/outputs/splits")
    manifest = get_manifest(dataset(synth_root, tmp_path), cfg, seed=0)
    run_dir = project / "outputs" / "seg" / "run1"
    run_dir.mkdir(parents=True)
    write_split(run_dir, {"manifest": f"outputs/splits/{manifest.path.name}", "fold": None})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found = read_split(run_dir)["manifest"]
    assert read_manifest(found).files == manifest.files
    Path(found).unlink()
    with pytest.raises(BusiError) as err:
        read_manifest(read_split(run_dir)["manifest"])
    assert "gone" in str(err.value) and "delete" not in str(err.value)


def test_duplicates_are_grouped_even_across_classes(data_copy: Path, tmp_path: Path) -> None:
    ds = dataset(with_duplicates(data_copy), tmp_path)
    groups = duplicate_groups(ds, max_distance=6)
    i, j = ds.files.index("benign/benign (1).png"), ds.files.index("benign/benign (99).png")
    k, m = ds.files.index("benign/benign (2).png"), ds.files.index("malignant/malignant (99).png")
    assert groups[i] == groups[j] and groups[k] == groups[m]
    assert len(np.unique(groups)) == len(ds) - 2  # synthetic images are otherwise distinct


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scheme", ["holdout", "kfold"])
def test_a_duplicate_group_never_straddles_train_and_test(data_copy: Path, tmp_path: Path,
                                                         seed: int, scheme: str) -> None:
    ds = dataset(with_duplicates(data_copy), tmp_path)
    cfg = SplitConfig(scheme=scheme, folds=4, test_size=0.3,
                      manifest_dir=str(tmp_path / "m"))
    m = get_manifest(ds, cfg, seed=seed)
    for fold in range(m.n_folds) if scheme == "kfold" else [None]:
        parts = m.partition(fold)
        test = set(parts["test"])
        for a, b in [("benign/benign (1).png", "benign/benign (99).png"),
                     ("benign/benign (2).png", "malignant/malignant (99).png")]:
            assert (a in test) == (b in test)


def test_kfold_puts_every_image_in_exactly_one_test_fold(synth_root: Path,
                                                        tmp_path: Path) -> None:
    ds = dataset(synth_root, tmp_path)
    m = get_manifest(ds, SplitConfig(scheme="kfold", folds=3, stratify=True,
                                     manifest_dir=str(tmp_path)), seed=0)
    tests = [set(m.partition(k)["test"]) for k in range(3)]
    assert sum(len(t) for t in tests) == len(ds) and set().union(*tests) == set(ds.files)
    for k, t in enumerate(tests):
        parts = m.partition(k)
        assert not t & set(parts["train"]) and not t & set(parts["val"])
        per_class = [sum(f.startswith(c) for f in t) for c in ("benign", "malignant", "normal")]
        assert per_class == [4, 4, 4]  # stratified: 12 per class over 3 folds


def test_more_folds_than_images_in_a_class_is_a_clear_error(synth_root: Path,
                                                              tmp_path: Path) -> None:
    from busi.errors import BusiError

    ds = dataset(synth_root, tmp_path)
    with pytest.raises(BusiError, match=r"class '\w+' has 12 images.*split.folds") as info:
        get_manifest(ds, SplitConfig(scheme="kfold", folds=20, manifest_dir=str(tmp_path)), 0)
    assert "at most 12" in str(info.value)


def test_stratified_holdout_on_a_tiny_set_falls_back_and_says_so(
        synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = dataset(synth_root, tmp_path)  # 12 per class: too few for a stratified 1-in-20 split
    m = get_manifest(ds, SplitConfig(stratify=True, test_size=0.05,
                                     manifest_dir=str(tmp_path)), seed=0)
    parts = m.partition()
    assert sum(map(len, parts.values())) == len(ds) and parts["test"]
    assert "without stratification" in capsys.readouterr().err


def test_out_of_fold_unets_keep_duplicate_groups_on_one_side_of_every_split() -> None:
    # Pairs of near-duplicates (the same lesion saved twice), as BUSI has ~140 of.
    from busi.training.segmentation import oof_partitions

    groups = np.repeat(np.arange(60), 2)          # 120 images, 60 pairs
    pool = np.arange(100)                         # the rest stands for the test split
    parts = oof_partitions(pool, groups, 5, 0.1, seed=42)
    held_all = np.concatenate([held for _, _, held in parts])
    assert sorted(held_all.tolist()) == pool.tolist()   # every pool image held out once
    for train, val, held in parts:
        assert len(val) >= 2 and len(train) > len(val)
        assert sorted(np.concatenate([train, val, held]).tolist()) == pool.tolist()
        for a, b in ((train, val), (train, held), (val, held)):
            assert not set(groups[a]) & set(groups[b]), "a duplicate group straddles a split"


def grouped_dataset(seed: int = 0):
    """300 images in BUSI's class proportions with duplicate groups of 2-4 images, some
    across classes: exact duplicates share a pixel hash; pHashes are random, so far apart."""
    from busi.data.loading import Dataset

    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], [150, 90, 60])
    hashes = [f"h{i}" for i in range(len(labels))]
    for group in range(30):  # random images, so classes mix as in BUSI
        for i in rng.choice(len(labels), int(rng.integers(2, 5)), replace=False):
            hashes[i] = f"g{group}"
    n = len(labels)
    return Dataset(root=Path("."), classes=("benign", "malignant", "normal"),
                   files=[f"{i}.png" for i in range(n)], images=np.zeros((n, 1, 1), np.uint8),
                   masks=np.zeros((n, 1, 1), np.uint8), labels=labels,
                   shapes=np.ones((n, 2), int), n_masks=np.ones(n, int),
                   phashes=rng.integers(0, 256, (n, 8), dtype=np.uint8), pixel_hashes=hashes,
                   fingerprint="synthetic")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fraction", [0.3, 0.15, 0.25])
def test_stratified_holdout_takes_the_fraction_asked(fraction: float, seed: int) -> None:
    """test_size 0.3 is 30% of the images (not a third), within one duplicate group, each
    class close to its share, and no group split; 1-in-k sizes keep the k-fold's fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    from busi.data.split import build_manifest_rows

    ds = grouped_dataset(seed)
    rows = build_manifest_rows(ds, SplitConfig(stratify=True, test_size=fraction, val_size=0.1),
                               seed)
    groups = np.array([int(r["group"]) for r in rows])
    split = np.array([r["split"] for r in rows])
    largest = np.bincount(groups).max()
    assert largest >= 3
    test = split == "test"
    assert abs(test.sum() - round(fraction * len(ds))) <= largest
    val, rest = split == "val", (~test).sum()
    assert abs(val.sum() - round(0.1 * rest)) <= largest
    for part in (test, val):
        assert all(len(set(part[groups == g])) == 1 for g in np.unique(groups)), "split group"
    for c in range(3):
        assert abs((test & (ds.labels == c)).sum() - fraction * (ds.labels == c).sum()) <= largest
    if fraction == 0.25:  # 1/fraction folds: the split is the StratifiedGroupKFold fold it was
        _, fold = next(StratifiedGroupKFold(4, shuffle=True, random_state=seed).split(
            groups, ds.labels, groups))
        assert set(np.flatnonzero(test)) == set(fold)


def test_a_manifest_written_with_a_third_for_0_3_is_not_reused() -> None:
    """Manifests are written once and reused by name: a stratified 0.3 split gets a new
    name (the old file held a third), 1-in-k and unstratified splits keep theirs."""
    from busi.data.split import manifest_name

    ds = grouped_dataset()
    names = {(strat, size): manifest_name(ds, SplitConfig(stratify=strat, test_size=size), 0)
             for strat in (True, False) for size in (0.2, 0.3)}
    assert names[True, 0.3] != "synthetic-holdout-seed0-f6a70eca.csv"
    assert names[True, 0.2] == "synthetic-holdout-seed0-b3c5ae2f.csv"
    assert names[False, 0.3] == "synthetic-holdout-seed0-d5aa5a30.csv"
