"""`busi evaluate --data`: a site is compared with the runs' own training data first.

The runs here are folders with a config.yaml and a split.json only (no model is trained):
what the overlap check reads. The end-to-end refusal, with trained models, is in
test_pipeline.py (test_evaluate_refuses_the_runs_own_training_images_as_another_site).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi.config import load_config
from busi.data.loading import load_dataset
from busi.data.split import get_manifest
from busi.errors import BusiError
from busi.runs import write_config, write_split
from busi.workflows.sites import (
    _check_overlap,
    _classes_in,
    _overlap_markdown,
    _Site,
    seen_images,
    training_overlap,
)

CLASSES = ("benign", "malignant", "normal")


def _patient_csv(scans: Path, out: Path, rows: list[tuple[str, int, str]]) -> Path:
    """A CSV manifest over ``scans`` (BUSI layout): (class, index, patient) per row."""
    lines = ["image,mask,label,patient"]
    for c, k, patient in rows:
        mask = "" if c == "normal" else str(scans / c / f"{c} ({k})_mask.png")
        lines.append(f"{scans / c / f'{c} ({k}).png'},{mask},{c},{patient}")
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def trained_on_patients(tmp_path_factory: pytest.TempPathFactory,
                        synth_root: Path) -> tuple[Path, Path, Path]:
    """A run made on two sources -- the synthetic BUSI folder and a hospital's CSV with
    patients H1..H6 (three scans each) -- split by patient; and that hospital's scans.
    Returns (run folder, the hospital's CSV, the hospital's scans folder)."""
    from busi.data.synth import SynthSpec, write_dataset

    base = tmp_path_factory.mktemp("sites")
    write_dataset(base / "scans", SynthSpec(per_class=6, seed=1, height=64, width=80))
    hospital = _patient_csv(base / "scans", base / "hospital.csv",
                            [(c, k, f"H{k}") for c in CLASSES for k in range(1, 7)])
    cfg = load_config(None, [f"data.root={json.dumps([str(synth_root), str(hospital)])}",
                             f"data.cache_dir={base}/cache", "data.image_size=[32, 32]",
                             f"split.manifest_dir={base}/splits", "split.test_size=0.25"])
    ds = load_dataset(cfg.data.root, CLASSES, (32, 32), cache_dir=cfg.data.cache_dir)
    manifest = get_manifest(ds, cfg.split, cfg.runtime.seed)
    run = base / "outputs" / "seg" / "20260101-000000"
    run.mkdir(parents=True)
    write_config(run, cfg)
    write_split(run, {"manifest": str(manifest.path), "fold": None,
                      "data_fingerprint": ds.fingerprint})
    return run, hospital, base / "scans"


def _site(data: Path, tmp_path: Path) -> _Site:
    ds = load_dataset(data, _classes_in(str(data), CLASSES), (32, 32),
                      cache_dir=tmp_path / "cache")
    return _Site(data, ds, np.arange(len(ds)), "patients", "test", CLASSES)


def test_the_runs_training_data_is_caught_by_pixels_phash_and_patient(
        trained_on_patients: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue: `evaluate --data` never compared a site with the run's training and
    validation images. Its train and val parts are what the runs saw (test images are not);
    a site holding them is refused; a site that only shares patient ids is warned about."""
    from busi.data.split import read_manifest

    run, hospital, scans = trained_on_patients
    split = json.loads((run / "split.json").read_text())
    parts = read_manifest(split["manifest"]).partition(None)
    fitted = parts["train"] + parts["val"]
    seen = seen_images([run])
    assert sorted(seen.files) == sorted(fitted)
    # the hospital's ids are "hospital/<image path as its CSV writes it>"
    row_of = {f"hospital/{scans / c / f'{c} ({k}).png'}": (c, k, f"H{k}")
              for c in CLASSES for k in range(1, 7)}
    fitted_patients = {row_of[f][2] for f in fitted if f in row_of}
    # patient ids of a source lose the source's tag ("hospital/H2" is the CSV's "H2")
    assert seen.patients == fitted_patients and fitted_patients
    assert "the train and validation parts of" in seen.against[0]

    # the whole hospital CSV again: its train/val scans are caught by their pixels
    whole = training_overlap(_site(hospital, tmp_path).ds, seen, 6)
    n_fitted = sum(f in row_of for f in fitted)
    assert (whole["images"], whole["exact_duplicates"], whole["near_duplicates"]) == (
        n_fitted, n_fitted, 0)
    assert whole["shared_patients"] == len(fitted_patients)

    # its test half (a patient split): no image and no patient the runs saw
    test_rows = [row_of[f] for f in parts["test"] if f in row_of]
    assert test_rows
    held_out = _patient_csv(scans, tmp_path / "test_half.csv", test_rows)
    clean = training_overlap(_site(held_out, tmp_path).ds, seen, 6)
    assert (clean["images"], clean["shared_patients"]) == (0, 0)
    assert "Unseen by the runs: none of its" in _overlap_markdown(clean, len(test_rows))

    # a training scan re-exported a little brighter: other pixels, the same pHash
    trained = next(f for f in parts["train"] if f in row_of and row_of[f][0] == "benign")
    image = cv2.imread(trained.split("/", 1)[1], cv2.IMREAD_GRAYSCALE)
    brighter = tmp_path / "brighter"
    (brighter / "benign").mkdir(parents=True)
    cv2.imwrite(str(brighter / "benign" / "benign (1).png"),
                np.clip(image.astype(int) + 4, 0, 255).astype(np.uint8))
    (brighter / "benign" / "benign (1)_mask.png").write_bytes(
        Path(trained.split("/", 1)[1].replace(".png", "_mask.png")).read_bytes())
    near = training_overlap(_site(brighter, tmp_path).ds, seen, 6)
    assert (near["images"], near["exact_duplicates"], near["near_duplicates"]) == (1, 0, 1)
    assert near["examples"] == [["benign/benign (1).png", trained]]

    # refused, before anything is written, unless --allow-overlap; then said loudly
    site = _site(hospital, tmp_path)
    with pytest.raises(BusiError) as caught:
        _check_overlap([site], [run], 6, allow=False)
    message = str(caught.value)
    assert f"{n_fitted} of its 18 images are training or validation images of the runs " \
           f"({n_fitted} with the same pixels, 0 near duplicates within pHash distance 6)" \
        in message
    assert "--allow-overlap" in message
    _check_overlap([site], [run], 6, allow=True)
    assert "is NOT unseen data" in capsys.readouterr().err
    assert site.overlap["images"] == n_fitted
    assert "**Not unseen data:" in _overlap_markdown(site.overlap, 18)

    # new scans under a training patient's id: warned about and recorded, not refused
    other = tmp_path / "other"
    from busi.data.synth import SynthSpec, write_dataset

    write_dataset(other, SynthSpec(per_class=2, seed=5, height=64, width=80))
    shared = sorted(fitted_patients)[0]
    renamed = _site(_patient_csv(other, tmp_path / "renamed.csv",
                                 [("benign", 1, shared), ("malignant", 1, "X9")]), tmp_path)
    _check_overlap([renamed], [run], 6, allow=False)
    err = capsys.readouterr().err
    assert f"1 of its patient ids ({shared}) are also patients of the runs'" in err
    assert renamed.overlap["images"] == 0 and renamed.overlap["patients"] == [shared]
    assert "are not of new patients" in _overlap_markdown(renamed.overlap, 2)


def test_a_run_whose_training_data_is_gone_is_said_not_checked(
        trained_on_patients: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without the training data nothing can be compared: a loud warning and "not checked"
    in the report, not a silent "unseen" nor a refusal of a colleague's run."""
    import shutil

    from busi.config import dump_yaml

    run, hospital, _ = trained_on_patients
    moved = shutil.copytree(run, tmp_path / "run")
    cfg = load_config(moved / "config.yaml", [f"data.root={tmp_path / 'gone'}"])
    (moved / "config.yaml").write_text(dump_yaml(cfg))
    site = _site(hospital, tmp_path)
    _check_overlap([site], [moved], 6, allow=False)
    assert "could not compare the site(s) with the runs' training images" in \
        capsys.readouterr().err
    assert site.overlap["checked"] is False
    assert "**Not checked against the runs' training images**" in \
        _overlap_markdown(site.overlap, len(site.ds))
