"""Several data sources in one training (BUSI plus a user's own labelled scans), and patients.

``data.root`` (``--data``, repeatable) lists BUSI-layout folders and CSV manifests; they
become one data set whose ids carry the source's name. A CSV's ``patient`` column keeps
all of a patient's images on one side of every split, as near-duplicates are.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi.cli import main
from busi.config import SplitConfig
from busi.data.loading import Dataset, load_dataset
from busi.data.split import duplicate_groups, get_manifest, manifest_name
from busi.errors import BusiError

CLASSES = ("benign", "malignant", "normal")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second site: 18 synthetic scans of 6 patients (3 each, of mixed classes), listed in
    ``site.csv`` with a ``patient`` column; normal images have no mask file (empty cell)."""
    from busi.data.synth import SynthSpec, write_dataset

    base = tmp_path_factory.mktemp("site")
    write_dataset(base / "scans", SynthSpec(per_class=6, seed=1, height=64, width=80))
    lines = ["image,mask,label,patient"]
    for c in CLASSES:
        for k in range(1, 7):
            mask = "" if c == "normal" else f"scans/{c}/{c} ({k})_mask.png"
            lines.append(f"scans/{c}/{c} ({k}).png,{mask},{c},P{k}")
    (base / "site.csv").write_text("\n".join(lines) + "\n")
    return base / "site.csv"


def load(roots, tmp_path: Path, **kw) -> Dataset:
    return load_dataset(roots, CLASSES, (32, 32), cache_dir=tmp_path / "cache", **kw)


def write_bmp_layout(root: Path) -> Path:
    """A tiny BUSI-layout folder whose bytes do not depend on an image encoder's version
    (uncompressed BMP of fixed arithmetic patterns), so fingerprints can be pinned."""
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for k in range(1, 5):
            img = ((np.arange(20 * 24).reshape(20, 24) * (3 + k + 5 * ci)) % 251).astype(np.uint8)
            mask = np.zeros((20, 24), np.uint8)
            if c != "normal":
                mask[4 + k:12, 3:10 + k] = 255
            (root / c / f"{c} ({k}).bmp").write_bytes(cv2.imencode(".bmp", img)[1].tobytes())
            (root / c / f"{c} ({k})_mask.bmp").write_bytes(cv2.imencode(".bmp", mask)[1].tobytes())
    return root


def test_one_source_keeps_the_ids_fingerprint_and_manifest_names_of_before(
        tmp_path: Path) -> None:
    """Values written by busi before several sources existed (main at ea00c12): existing split
    manifests, caches and runs' recorded fingerprints must keep matching, for a folder given
    as a path or as a list of one, and for a CSV without a patient column."""
    root = write_bmp_layout(tmp_path / "bmp")
    for given in (root, str(root), [str(root)]):
        ds = load_dataset(given, size=(16, 16), cache_dir=None)
        assert ds.files[:2] == ["benign/benign (1).bmp", "benign/benign (2).bmp"]
        assert ds.fingerprint == "da5c4e682f60513d783281a8"
        assert manifest_name(ds, SplitConfig(), 0) == "da5c4e682f60-holdout-seed0-05b8ea90.csv"
        assert manifest_name(ds, SplitConfig(scheme="kfold", folds=2, stratify=True), 0) == (
            "da5c4e682f60-kfold-seed0-990bdf93.csv")
    rows = [f"bmp/{c}/{c} ({k}).bmp,bmp/{c}/{c} ({k})_mask.bmp,{c}"
            for c in ("benign", "malignant") for k in range(1, 5)]
    plain = tmp_path / "site.csv"
    plain.write_text("image,mask,label\n" + "\n".join(rows) + "\n")
    ds = load_dataset(plain, size=(16, 16), cache_dir=None)
    assert ds.files[0] == "bmp/benign/benign (1).bmp" and not any(ds.patients)
    assert ds.fingerprint == "9aad0eb46b812cf7488f022a"
    assert manifest_name(ds, SplitConfig(), 0) == "9aad0eb46b81-holdout-seed0-05b8ea90.csv"
    # The same images with patients: another grouping, so another manifest (same pixels).
    with_patients = tmp_path / "site2.csv"
    with_patients.write_text("image,mask,label,patient\n" + "\n".join(
        f"{r},P{i % 3}" for i, r in enumerate(rows)) + "\n")
    ds2 = load_dataset(with_patients, size=(16, 16), cache_dir=None)
    assert ds2.fingerprint == ds.fingerprint
    assert manifest_name(ds2, SplitConfig(), 0) != manifest_name(ds, SplitConfig(), 0)
    ds2.patients[0] = "P9"
    assert manifest_name(ds2, SplitConfig(), 0) != manifest_name(ds, SplitConfig(), 0)


def test_a_busi_folder_and_a_csv_are_one_dataset(synth_root: Path, site: Path,
                                                 tmp_path: Path) -> None:
    busi, own = load(synth_root, tmp_path), load(site, tmp_path)
    ds = load([synth_root, site], tmp_path)
    assert len(ds) == len(busi) + len(own) == 54
    assert ds.files[:len(busi)] == [f"busi/{f}" for f in busi.files]
    assert ds.files[len(busi):] == [f"site/{f}" for f in own.files]
    assert np.array_equal(ds.images, np.concatenate([busi.images, own.images]))
    assert np.array_equal(ds.labels, np.concatenate([busi.labels, own.labels]))
    assert ds.patients[:len(busi)] == [""] * len(busi)
    assert ds.patients[len(busi)] == "site/P1"   # namespaced: another site's P1 is not this
    assert ds.fingerprint not in (busi.fingerprint, own.fingerprint)
    assert load([synth_root, site], tmp_path).fingerprint == ds.fingerprint
    assert load([site, synth_root], tmp_path).fingerprint != ds.fingerprint
    # One cache file per source, the very one a single-source load reads.
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert ds.location == f"{synth_root} + {site}"


def test_a_source_may_lack_a_class_but_not_add_one(synth_root: Path, data_copy: Path,
                                                   tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(data_copy / "normal")
    ds = load([synth_root, data_copy], tmp_path)
    assert len(ds) == 36 + 24
    (data_copy / "cancer").mkdir()
    with pytest.raises(BusiError, match="cancer.*not among data.classes") as err:
        load([synth_root, data_copy], tmp_path)
    assert err.value.where == str(data_copy)


@pytest.mark.parametrize("second, message", [
    ("image,mask,label\nscans/benign/nope.png,,benign\n", "line 2: file not found"),
    ("image,mask,label\nscans/benign/benign (1).png,,cancer\n", "line 2: label 'cancer'"),
    (None, "data folder not found"),
])
def test_a_bad_second_source_is_one_error_naming_it(synth_root: Path, site: Path,
                                                    tmp_path: Path, second: str | None,
                                                    message: str) -> None:
    bad = site.parent / "bad.csv" if second else tmp_path / "no_such_folder"
    if second:
        bad.write_text(second)
    with pytest.raises(BusiError, match="fix:") as err:
        load([synth_root, bad], tmp_path)
    assert message in str(err.value) and str(bad) in str(err.value)


def test_two_sources_of_one_name_are_refused(synth_root: Path, data_copy: Path,
                                             tmp_path: Path) -> None:
    twin = data_copy.rename(data_copy.parent / synth_root.name)  # another folder, same name
    with pytest.raises(BusiError, match="would both be called 'busi'") as err:
        load([synth_root, twin], tmp_path)
    assert str(twin) in str(err.value) and "different names" in str(err.value)
    with pytest.raises(BusiError, match="the same source twice"):
        load([synth_root, synth_root], tmp_path)


def patient_dataset(seed: int) -> Dataset:
    """150 images: 25 patients of 2-8 images (mixed classes), the rest of unknown patient,
    and a few exact duplicates across patients (the same scan filed under two patients)."""
    rng = np.random.default_rng(seed)
    n = 150
    labels = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    patients = [""] * n
    order = rng.permutation(n)
    start = 0
    for p in range(25):
        size = int(rng.integers(2, 9))
        for i in order[start:start + size]:
            patients[i] = f"site/P{p}"
        start += size
    hashes = [f"h{i}" for i in range(n)]
    for g, (i, j) in enumerate(rng.choice(n, (6, 2), replace=False)):
        hashes[i] = hashes[j] = f"dup{g}"
    return Dataset(root=Path("."), classes=CLASSES, files=[f"{i}.png" for i in range(n)],
                   images=np.zeros((n, 1, 1), np.uint8), masks=np.zeros((n, 1, 1), np.uint8),
                   labels=labels, shapes=np.ones((n, 2), int), n_masks=np.ones(n, int),
                   phashes=rng.integers(0, 256, (n, 8), dtype=np.uint8), pixel_hashes=hashes,
                   fingerprint=f"patients{seed}", patients=patients)


def one_side(ds: Dataset, parts: list[np.ndarray]) -> None:
    """Each patient's images (and each duplicate pair's) are in exactly one of ``parts``."""
    where = {}
    for k, part in enumerate(parts):
        for i in part:
            for key in (ds.patients[i], ds.pixel_hashes[i]):
                if key and not key.startswith("h"):
                    assert where.setdefault(key, k) == k, f"{key} straddles two parts"


@pytest.mark.parametrize("seed", range(3))
def test_a_patients_images_never_straddle_any_split(seed: int, tmp_path: Path) -> None:
    from busi.data.split import image_groups
    from busi.training.segmentation import oof_partitions

    ds = patient_dataset(seed)
    for cfg in (SplitConfig(test_size=0.2), SplitConfig(test_size=0.3, stratify=True),
                SplitConfig(test_size=0.2, group_duplicates=False)):
        m = get_manifest(ds, SplitConfig(**{**cfg.__dict__, "manifest_dir": str(tmp_path)}), seed)
        parts = m.partition()
        assert parts["train"] and parts["val"] and parts["test"]
        if cfg.group_duplicates:
            one_side(ds, [ds.index(v) for v in parts.values()])
        else:  # duplicates may straddle when asked, patients never
            one_side(Dataset(**{**ds.__dict__, "pixel_hashes": [f"h{i}" for i in range(150)]}),
                     [ds.index(v) for v in parts.values()])
    m = get_manifest(ds, SplitConfig(scheme="kfold", folds=4, stratify=True,
                                     manifest_dir=str(tmp_path)), seed)
    for fold in range(4):
        one_side(ds, [ds.index(v) for v in m.partition(fold).values()])
    groups = image_groups(ds, SplitConfig())
    for train, val, held in oof_partitions(np.arange(120), groups, 5, 0.1, seed):
        one_side(ds, [train, val, held])


def test_groups_join_duplicates_and_patients() -> None:
    from busi.data.split import image_groups

    ds = patient_dataset(0)
    n = len(ds)
    ds.patients = ["A", "A", "B", "C", ""] + [""] * (n - 5)
    ds.pixel_hashes = ["x", "y", "z", "z", "x"] + ds.pixel_hashes[5:]
    g = image_groups(ds, SplitConfig())
    assert g[0] == g[1] == g[4] and g[2] == g[3] and g[0] != g[2]  # A+dup, B~C by a duplicate
    g = image_groups(ds, SplitConfig(group_duplicates=False))
    assert g[0] == g[1] and len({g[0], g[2], g[3], g[4]}) == 4
    ds.patients = [""] * n
    assert np.array_equal(image_groups(ds, SplitConfig()), duplicate_groups(ds, 6))


def test_data_split_and_check_take_data_several_times(synth_root: Path, site: Path,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(synth_root), "--data", str(site),
              "--set", f"data.cache_dir={tmp_path}/cache"]
    assert main(["data", "split", *common, "--set", f"split.manifest_dir={tmp_path}/m"]) == 0
    (path,) = (tmp_path / "m").glob("*.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 54 and {r["file"].split("/")[0] for r in rows} == {"busi", "site"}
    sides: dict[str, set[str]] = {}
    for r in rows:
        if r["patient"]:
            sides.setdefault(r["patient"], set()).add(r["split"])
    assert len(sides) == 6 and all(len(s) == 1 for s in sides.values())
    assert main(["data", "check", *common]) == 0
    out = capsys.readouterr().out
    assert "Data sources: 2" in out and f"{site}: benign 6, malignant 6, normal 6" in out
    assert "Patients (CSV column 'patient'): 6" in out
    bad = site.parent / "unknown.csv"
    bad.write_text("image,mask,label\nscans/benign/benign (1).png,,cancer\n")
    assert main(["data", "split", "--data", str(synth_root), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "fix:" in err[0]


def test_a_run_folders_config_with_several_sources_loads_them_again(
        synth_root: Path, site: Path, tmp_path: Path) -> None:
    """What train-*, resume and rerun do with a run's config.yaml: the list survives the
    round trip and gives the same data set (fingerprint) as the run recorded."""
    from busi.config import dump_yaml, load_config
    from busi.data.loading import dataset_from_config

    cfg = load_config(None, [f"data.root={json.dumps([str(synth_root), str(site)])}",
                             f"data.cache_dir={tmp_path}/cache", "data.image_size=[32, 32]"])
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert again.data.root == [str(synth_root), str(site)]
    assert dataset_from_config(again).fingerprint == load([synth_root, site], tmp_path).fingerprint
    with pytest.raises(BusiError, match="'data.root' must be a string or a list of strings"):
        load_config(None, ["data.root=[1, 2]"])
    with pytest.raises(BusiError, match="names no data source"):
        load_config(None, ["data.root=[]"])
