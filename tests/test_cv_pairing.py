"""A CV's tables pair each classifier with its own fold's U-Net; reruns stay out of a CV;
pooled intervals say (and do) what they resample; a U-Net run's time counts every U-Net.

Most of these build CV folders by hand (cv.json, fold runs with split.json, state.json,
metrics.json, predictions.csv): the pairing logic needs no trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import TINY

from busi.cli import main
from busi.errors import BusiError
from busi.runs import write_json, write_predictions

CLASSES = ["benign", "malignant", "normal"]


def _seg_run(fold_dir: Path, name: str, dice: float) -> Path:
    run = fold_dir / "seg" / name
    run.mkdir(parents=True)
    stat = {"mean": dice}
    write_json(run / "metrics.json", {
        "lesion_images": {"dice": stat, "iou": stat, "hd95": {"mean": 5.0},
                          "hd95_all": {"mean": 6.0}, "hd95_undefined": 0},
        "lesion_free_images": {"fraction_predicted_empty": 1.0}, "n_test": 6})
    write_json(run / "split.json", {"manifest": "gone.csv", "fold": int(fold_dir.name[4:])})
    write_json(run / "state.json", {"finished": True})
    return run


def _cls_run(fold_dir: Path, arm: str, name: str, seg: Path, right: bool) -> Path:
    """A finished classifier run on U-Net ``seg``: every call right, or every call wrong."""
    run = fold_dir / "cls" / arm / name
    run.mkdir(parents=True)
    k = int(fold_dir.name[4:])
    truth = np.array([0, 0, 1, 1, 2, 2])
    called = truth if right else (truth + 1) % 3
    probs = np.full((6, 3), 0.05)
    probs[np.arange(6), called] = 0.9
    write_predictions(run / "predictions.csv", [f"f{k}_{i}.png" for i in range(6)], truth,
                      probs, CLASSES)
    write_json(run / "split.json", {"manifest": "gone.csv", "fold": k,
                                    "seg_run": str(seg.resolve())})
    write_json(run / "state.json", {"finished": True})
    return run


def _cv(root: Path, unets: dict | None = None) -> Path:
    cv = root / "outputs" / "cv" / "20260101-000000"
    cv.mkdir(parents=True)
    meta = {"folds": 2, "models": ["cnn"], "arms": {"cnn": ["model.classifier.name=cnn"]}}
    write_json(cv / "cv.json", meta if unets is None else {**meta, "unets": unets})
    return cv


def _stray_unet_cv(root: Path, unets: dict | None = None) -> dict[str, Path]:
    """Fold 0: the CV's U-Net and its cnn (all right), then a newer U-Net made elsewhere (an
    old `busi rerun` wrote it there) and a newer cnn on it (all wrong). Fold 1: one of each."""
    cv = _cv(root, unets)
    own = _seg_run(cv / "fold0", "20260101-000100", 0.8)
    own_cls = _cls_run(cv / "fold0", "cnn", "20260101-000200", own, right=True)
    stray = _seg_run(cv / "fold0", "20260102-000000", 0.1)
    stray_cls = _cls_run(cv / "fold0", "cnn", "20260102-000100", stray, right=False)
    seg1 = _seg_run(cv / "fold1", "20260101-000300", 0.7)
    cls1 = _cls_run(cv / "fold1", "cnn", "20260101-000400", seg1, right=True)
    return {"cv": cv, "own": own, "own_cls": own_cls, "stray": stray, "stray_cls": stray_cls,
            "seg1": seg1, "cls1": cls1}


@pytest.mark.parametrize("recorded", [False, True])
def test_cv_tables_pair_each_classifier_with_its_folds_unet(tmp_path: Path,
                                                            recorded: bool) -> None:
    """The newest U-Net and the newest cnn of fold 0 are a stray pair; the tables use the
    CV's U-Net (recorded in cv.json, or for an old cv.json the oldest finished) and the cnn
    trained on it -- never the newest of each."""
    from busi.evaluation.crossval import aggregate

    unets = ({"fold0": "fold0/seg/20260101-000100", "fold1": "fold1/seg/20260101-000300"}
             if recorded else None)
    r = _stray_unet_cv(tmp_path, unets)
    result = aggregate(r["cv"])
    seg, cls = result["segmentation"]["per_fold"], result["classification"]["cnn"]
    assert [row["run"] for row in seg] == [str(r["own"]), str(r["seg1"])]
    assert [row["run"] for row in cls["per_fold"]] == [str(r["own_cls"]), str(r["cls1"])]
    assert cls["pooled"]["accuracy"] == 1.0 and seg[0]["dice"] == 0.8


def test_cv_tables_follow_the_unet_cv_json_records(tmp_path: Path) -> None:
    """cv.json names fold 0's second U-Net: its classifier is the one used."""
    from busi.evaluation.crossval import aggregate

    r = _stray_unet_cv(tmp_path, {"fold0": "fold0/seg/20260102-000000"})
    cls = aggregate(r["cv"])["classification"]["cnn"]["per_fold"]
    assert cls[0]["run"] == str(r["stray_cls"]) and cls[0]["accuracy"] == 0.0


def test_cv_tables_refuse_a_fold_whose_unet_has_no_classifier(tmp_path: Path) -> None:
    """Fold 0's cnn on the CV's U-Net is gone; the one on the stray U-Net is not used in its
    place: the fold is missing, and the message says why the other run does not count."""
    import shutil

    from busi.evaluation.crossval import aggregate

    r = _stray_unet_cv(tmp_path)
    shutil.rmtree(r["own_cls"])
    with pytest.raises(BusiError) as err:
        aggregate(r["cv"])
    assert "fold 0 has no finished cnn run on the fold's U-Net fold0/seg/20260101-000100" \
        in err.value.problem
    assert "1 cnn run(s) there did not learn from it" in err.value.problem
    assert "busi cv --resume" in err.value.fix
    assert not (r["cv"] / "cv_results.json").exists()


def test_a_copied_cv_keeps_its_pairs(tmp_path: Path) -> None:
    """A classifier's split.json names its U-Net by absolute path; a CV copied elsewhere
    (its classifiers still naming the original's U-Nets) pairs them by their place in it."""
    import shutil

    from busi.evaluation.crossval import aggregate

    r = _stray_unet_cv(tmp_path / "a")
    copy = tmp_path / "b" / "cv"
    shutil.copytree(r["cv"], copy)
    cls = aggregate(copy)["classification"]["cnn"]["per_fold"]
    assert cls[0]["run"] == str(copy / r["own_cls"].relative_to(r["cv"]))


def _write_cv_config(cv: Path, synth_root: Path, tmp_path: Path) -> None:
    from busi.config import load_config, with_overrides
    from busi.runs import write_config
    from busi.workflows.cv import cv_config

    (tmp_path / "tiny.yaml").write_text(TINY.format(data=synth_root, work=tmp_path))
    cfg = with_overrides(load_config(tmp_path / "tiny.yaml"),
                         [f"outputs.root={tmp_path / 'outputs'}"])
    write_config(cv, cv_config(cfg, 2))


def test_a_resumed_cv_trains_an_arm_on_the_folds_own_unet_and_records_it(
        tmp_path: Path, synth_root: Path) -> None:
    """Fold 0 holds only a cnn trained on a stray U-Net: `busi cv --resume` trains a cnn on
    the fold's own U-Net (the old code saw a finished newest run and trained nothing), and
    cv.json records each fold's U-Net from then on."""
    import shutil

    from busi.training import classification as train_cls
    from busi.training import segmentation as train_seg

    r = _stray_unet_cv(tmp_path)
    shutil.rmtree(r["own_cls"])
    _write_cv_config(r["cv"], synth_root, tmp_path)
    calls = []

    def record(cfg, seg_run=None, resume=None, name=None, **kwargs):
        calls.append((name, seg_run, resume, cfg.outputs.root))
        raise KeyboardInterrupt

    def no_unet(*args, **kwargs):
        raise AssertionError("the fold's U-Net is finished: nothing to train")

    mp = pytest.MonkeyPatch()
    mp.setattr(train_cls, "train_classifier", record)
    mp.setattr(train_seg, "train_segmentation", no_unet)
    try:
        assert main(["cv", "--resume", str(r["cv"])]) == 130
    finally:
        mp.undo()
    assert calls == [("cnn", str(r["own"]), None, str(r["cv"] / "fold0"))]
    meta = json.loads((r["cv"] / "cv.json").read_text())
    assert meta["unets"] == {"fold0": "fold0/seg/20260101-000100"}


def test_busi_runs_counts_a_fold_done_only_with_its_unets_classifier(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    r = _stray_unet_cv(tmp_path)
    shutil.rmtree(r["own_cls"])
    assert main(["runs", "--outputs", str(tmp_path / "outputs"), "--kind", "cv"]) == 0
    assert "not finished (1 of 2 folds done)" in capsys.readouterr().out


def _fold_run(cv: Path, synth_root: Path, tmp_path: Path, kind: str) -> Path:
    """A finished fold run as `busi cv` makes it: its config's outputs.root is the fold."""
    from busi.config import load_config, with_overrides
    from busi.data.loading import dataset_from_config
    from busi.runs import write_config
    from busi.workflows.cv import cv_config

    (tmp_path / "tiny.yaml").write_text(TINY.format(data=synth_root, work=tmp_path))
    fold = cv / "fold1"
    cfg = with_overrides(cv_config(load_config(tmp_path / "tiny.yaml"), 2),
                         [f"outputs.root={fold}", "model.classifier.name=vgg19"])
    seg = _seg_run(fold, "20260101-000300", 0.7)
    run = seg if kind == "seg" else _cls_run(fold, "arm1", "20260101-000400", seg, True)
    ds = dataset_from_config(cfg)
    record = json.loads((run / "split.json").read_text())
    write_json(run / "split.json", {**record, "data_fingerprint": ds.fingerprint,
                                    "image_size": [32, 32]})
    write_config(run, cfg)
    return run


@pytest.mark.parametrize("kind", ["seg", "cls"])
def test_rerun_of_a_cv_fold_run_writes_outside_the_cv(
        tmp_path: Path, synth_root: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    """`busi rerun` of a fold's U-Net or classifier wrote into the fold (its config's
    outputs.root), where the next `busi cv --resume` met it. It goes to the outputs root
    above the CV now, and says where."""
    from busi.training import classification as train_cls
    from busi.training import segmentation as train_seg

    cv = _cv(tmp_path)
    run = _fold_run(cv, synth_root, tmp_path, kind)
    seen = []

    def fake(cfg, **kwargs):
        seen.append((cfg.outputs.root, kwargs))
        return tmp_path

    mp = pytest.MonkeyPatch()
    mp.setattr(train_seg, "train_segmentation", fake)
    mp.setattr(train_cls, "train_classifier", fake)
    try:
        assert main(["rerun", str(run)]) == 0
    finally:
        mp.undo()
    ((root, kwargs),) = seen
    outputs = tmp_path / "outputs"
    assert Path(root) == outputs
    where = outputs / ("seg" if kind == "seg" else "cls/vgg19")
    out = capsys.readouterr().out
    assert f"is a fold run of cross-validation {cv}" in out and f"writes to {where}/" in out
    if kind == "seg":
        assert kwargs == {"fold": 1}
    else:
        assert kwargs == {"seg_run": str((cv / "fold1/seg/20260101-000300").resolve())}


def test_rerun_of_a_run_outside_a_cv_keeps_its_outputs_root(
        tmp_path: Path, synth_root: Path, capsys: pytest.CaptureFixture) -> None:
    from busi.training import segmentation as train_seg

    plain = tmp_path / "elsewhere" / "fold1"  # a fold-like layout, but no cv.json above it
    run = _fold_run(plain.parent, synth_root, tmp_path, "seg")
    seen = []
    mp = pytest.MonkeyPatch()
    mp.setattr(train_seg, "train_segmentation",
               lambda cfg, **kw: seen.append(cfg.outputs.root) or tmp_path)
    try:
        assert main(["rerun", str(run)]) == 0
    finally:
        mp.undo()
    assert seen == [str(plain)] and "cross-validation" not in capsys.readouterr().out


# --------------------------------------------------------------------------- intervals


def _pooled_scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five folds of benign/malignant predictions whose separation differs by fold, as the
    folds' own models do."""
    rng = np.random.default_rng(seed)
    t, probs, folds = [], [], []
    for k, sep in enumerate([0.2, 0.8, 1.6, 2.4, 3.2]):
        y = np.array(["benign", "malignant"] * 15)
        s = rng.normal(size=30) + sep * (y == "malignant")
        pm = 1 / (1 + np.exp(-s))
        t.append(y)
        probs.append(np.stack([1 - pm, pm, np.zeros(30)], axis=1))
        folds.append(np.full(30, k))
    return np.concatenate(t), np.concatenate(probs), np.concatenate(folds)


def test_pooled_benign_malignant_auc_interval_is_two_level() -> None:
    """The pooled AUC interval was a one-level bootstrap of (fold, group) units printed under
    'two-level (folds, then groups)': it resamples the folds now, like every other pooled
    interval, so it carries the fold-to-fold spread, and its sentence says so."""
    from busi.evaluation.classification import (
        benign_malignant_auc,
        benign_malignant_line,
        compute,
    )

    t, probs, folds = _pooled_scores()
    groups = np.arange(len(t)) // 2  # near-duplicate pairs
    pred = np.array(CLASSES)[probs.argmax(1)]
    r = compute([f"f{i}" for i in range(len(t))], t.tolist(), pred.tolist(), probs, CLASSES,
                groups=groups, folds=folds)
    two = r["benign_malignant_auc"]
    units = np.array([f"{f}/{g}" for f, g in zip(folds, groups, strict=True)])
    one = benign_malignant_auc(t, probs, CLASSES, units)  # what the CV printed before
    assert two["auc"] == one["auc"]
    assert two["n_folds"] == 5 and two["n_units"] == 75 and two["unit_name"] == "duplicate groups"
    width = two["ci95"][1] - two["ci95"][0]
    assert width > 1.5 * (one["ci95"][1] - one["ci95"][0])
    assert two["ci95"][0] < two["auc"] < two["ci95"][1]
    line = benign_malignant_line(two)
    assert "two-level percentile bootstrap: the 5 folds with replacement, then within each " \
           "drawn fold its share of those 75 duplicate groups" in line
    # the same draws as the other pooled intervals: seed and folds fix them
    again = benign_malignant_auc(t, probs, CLASSES, groups, folds=folds,
                                 unit_name="duplicate groups")
    assert again["ci95"] == two["ci95"]
    # one-level intervals (one run, patients) are as before
    assert "n_folds" not in benign_malignant_auc(t, probs, CLASSES, groups)


def test_cv_results_print_a_two_level_auc_interval(tmp_path: Path) -> None:
    from busi.evaluation.crossval import aggregate

    r = _stray_unet_cv(tmp_path)
    result = aggregate(r["cv"])
    bm = result["classification"]["cnn"]["pooled"]["benign_malignant_auc"]
    assert bm["n_folds"] == 2
    report = (r["cv"] / "pooled" / "cnn" / "classification_report.md").read_text()
    assert "Interval: two-level percentile bootstrap: the 2 folds" in report


# --------------------------------------------------------------------------- training time


def test_training_seconds_count_every_unet_of_the_run() -> None:
    from busi.training.segmentation import training_seconds

    assert training_seconds(100.04, [30.0, 40.06]) == {
        "train_seconds": 170.1, "train_seconds_final": 100.0,
        "train_seconds_out_of_fold": [30.0, 40.1]}
    assert training_seconds(12.0, []) == {"train_seconds": 12.0, "train_seconds_final": 12.0,
                                          "train_seconds_out_of_fold": []}


def test_an_out_of_fold_runs_training_time_counts_every_unet_across_a_resume(
        tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in the second out-of-fold U-Net, then resumed: train_seconds (metrics.json,
    state.json) is the final U-Net's plus each out-of-fold U-Net's, every session of each;
    it used to be the final U-Net's alone."""
    from busi.reporting.report import build_blocks
    from busi.training import loop as train

    (tmp_path / "tiny.yaml").write_text(TINY.format(data=synth_root, work=tmp_path))
    real = train.RunCheckpoint.on_epoch_end

    def ctrl_c_in_fold1(self, epoch, logs=None):
        real(self, epoch, logs)
        if self.run_dir.name == "fold1":
            raise KeyboardInterrupt  # after its first epoch: the second one is left to do
        self.model.stop_training = True  # one epoch of the others, as EarlyStopping does

    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", ctrl_c_in_fold1)
    assert main(["train-seg", "--config", str(tmp_path / "tiny.yaml"),
                 "--set", "training.seg.epochs=2",
                 "--set", "training.seg.out_of_fold_masks=2"]) == 130
    (run,) = list((tmp_path / "outputs" / "seg").iterdir())

    def seconds(folder: Path) -> float:
        return json.loads((folder / "state.json").read_text())["train_seconds"]

    final, cut = seconds(run), seconds(run / "oof" / "fold1")
    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", real)
    assert main(["train-seg", "--resume", str(run)]) == 0
    oof = [seconds(run / "oof" / f"fold{k}") for k in range(2)]
    assert oof[1] > cut > 0 and oof[0] > 0  # fold 1's first session counted too
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_seconds_final"] == final
    assert metrics["train_seconds_out_of_fold"] == oof
    assert metrics["train_seconds"] == pytest.approx(final + sum(oof), abs=0.11)
    assert metrics["train_seconds"] > final
    assert seconds(run) == metrics["train_seconds"]
    text = json.dumps(build_blocks(run)[1], default=str)
    assert "all 3 U-Nets (final" in text and "2 out-of-fold" in text


def test_a_cv_report_shows_the_runs_its_tables_use(tmp_path: Path) -> None:
    """report.html's curves and wall time of a CV come from each fold's own U-Net and the
    classifier trained on it, not from whatever run is newest in a fold folder."""
    from busi.config import dump_yaml, load_config
    from busi.reporting.report import _cv_blocks

    r = _stray_unet_cv(tmp_path)
    (r["cv"] / "config.yaml").write_text(dump_yaml(load_config()))
    for key, seconds in (("own", 60.0), ("own_cls", 60.0), ("seg1", 60.0), ("cls1", 60.0),
                         ("stray", 6000.0), ("stray_cls", 6000.0)):
        write_json(r[key] / "state.json", {"finished": True, "train_seconds": seconds})
        (r[key] / "loss_curve.png").write_bytes(b"\x89PNG")
    _, blocks = _cv_blocks(r["cv"], "now")
    text = json.dumps(blocks, default=str)
    assert "20260102" not in text, "a stray run lent the report something"
    assert str(r["own"] / "loss_curve.png") in text and str(r["cls1"] / "loss_curve.png") in text
    assert "4.0 min" in text  # 4 x 60 s, not the strays' 200 min
