"""The whole pipeline on tiny synthetic data: train-seg, resume, train-cls, evaluate, predict.

Models are tiny (32x32 input, a handful of steps): these tests pin behaviour --
files, resumability, shared splits, report numbers -- not accuracy.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from busi.cli import main

TINY = """
data: {{root: {data}, image_size: [32, 32], cache_dir: {work}/cache}}
split: {{manifest_dir: {work}/splits, test_size: 0.25}}
augmentation: {{engine: layers}}
model:
  unet: {{base_filters: 4, depth: 2}}
  classifier: {{weights: none}}
training:
  seg: {{loss: bce_dice, learning_rate: 0.003, batch_size: 8, epochs: 2, steps_per_epoch: 2,
        flip_tta: true, postprocess: largest_component, tune_threshold: true}}
  cls: {{learning_rate: 0.001, batch_size: 8, epochs: 2, steps_per_epoch: 2}}
outputs: {{root: {work}/outputs}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    work = tmp_path_factory.mktemp("pipeline")
    (work / "tiny.yaml").write_text(TINY.format(data=synth_root, work=work))
    return work


def run(work: Path, *argv: str) -> int:
    return main([*argv[:1], "--config", str(work / "tiny.yaml"), *argv[1:]])


@pytest.fixture(scope="module")
def seg_run(work: Path) -> Path:
    assert run(work, "train-seg") == 0
    (run_dir,) = list((work / "outputs" / "seg").iterdir())
    return run_dir


def test_train_seg_writes_every_output(seg_run: Path) -> None:
    for name in ("config.yaml", "command.txt", "split.json", "best.keras", "last.keras",
                 "history.csv", "loss_curve.png", "metrics.json", "metrics.md", "masks.npz",
                 "test_scores.json"):
        assert (seg_run / name).is_file(), name
    assert list((seg_run / "overlays").glob("*.png"))
    metrics = json.loads((seg_run / "metrics.json").read_text())
    assert {"dice", "iou", "hd95"} <= set(metrics["lesion_images"])
    assert "fraction_predicted_empty" in metrics["per_class"]["normal"]
    with open(seg_run / "history.csv") as fh:
        header = next(csv.reader(fh))
    assert {"loss", "val_loss", "dice", "val_dice", "iou", "val_iou"} <= set(header)
    z = np.load(seg_run / "masks.npz")
    assert len(z["files"]) == 36 and z["probs"].shape == (36, 32, 32)
    assert json.loads((seg_run / "state.json").read_text())["finished"] is True


def test_a_second_run_never_touches_the_first(work: Path, seg_run: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in seg_run.rglob("*")}
    assert run(work, "train-seg", "--set", "training.seg.epochs=1") == 0
    runs = sorted((work / "outputs" / "seg").iterdir())
    assert len(runs) == 2
    assert {p: p.stat().st_mtime_ns for p in seg_run.rglob("*")} == before
    shutil.rmtree(runs[-1] if runs[-1] != seg_run else runs[0])


def history(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "history.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def test_interrupted_training_resumes_as_the_same_run(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Same shuffle, augmentation, dropout masks, optimizer and callback state after --resume:
    with runtime.deterministic the history is that of a run never interrupted."""
    from busi import train

    settings = [f"--set={key}" for key in (
        "training.seg.epochs=3", "runtime.deterministic=true", "training.seg.reduce_lr_patience=1",
        "training.seg.early_stopping_patience=2", "augmentation.engine=image_data_generator",
        "training.seg.flip_tta=false", "training.seg.tune_threshold=false")]
    assert run(work, "train-seg", f"--set=outputs.root={work / 'whole'}", *settings) == 0
    real = train.RunCheckpoint.on_epoch_end

    def ctrl_c_after_first_epoch(self, epoch, logs=None):
        real(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", ctrl_c_after_first_epoch)
    out_root = work / "resume"
    assert run(work, "train-seg", f"--set=outputs.root={out_root}", *settings) == 130
    (run_dir,) = list((out_root / "seg").iterdir())
    assert "--resume" in capsys.readouterr().err
    assert json.loads((run_dir / "state.json").read_text())["epochs_done"] == 1
    assert not list(run_dir.glob(".*tmp*")), "no half-written files"
    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", real)
    assert main(["train-seg", "--resume", str(run_dir)]) == 0
    (whole,) = list((work / "whole" / "seg").iterdir())
    assert [r["epoch"] for r in history(run_dir)] == [0, 1, 2]
    for want, row in zip(history(whole), history(run_dir), strict=True):
        assert row == pytest.approx(want, rel=0, abs=1e-6), f"epoch {row['epoch']:.0f}"
    assert main(["train-seg", "--resume", str(run_dir)]) == 2  # finished: nothing to resume


def test_an_interrupted_classifier_resumes_as_the_same_run(
        work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train-cls --resume RUN uses the run's config (here ground-truth masks, so no
    segmentation run anywhere) and continues it as if never interrupted."""
    from busi import train

    settings = [f"--set={key}" for key in (
        "training.cls.epochs=2", "runtime.deterministic=true",
        "model.classifier.masks=ground_truth", "augmentation.engine=image_data_generator")]
    assert run(work, "train-cls", f"--set=outputs.root={work / 'cls-whole'}", *settings) == 0
    real = train.RunCheckpoint.on_epoch_end

    def ctrl_c_after_first_epoch(self, epoch, logs=None):
        real(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", ctrl_c_after_first_epoch)
    assert run(work, "train-cls", f"--set=outputs.root={work / 'cls-cut'}", *settings) == 130
    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", real)
    monkeypatch.chdir(tmp_path)  # no outputs/seg here: the resume must not look for one
    (cut,) = list((work / "cls-cut" / "cls" / "cnn").iterdir())
    assert main(["train-cls", "--resume", str(cut)]) == 0
    (whole,) = list((work / "cls-whole" / "cls" / "cnn").iterdir())
    assert [r["epoch"] for r in history(cut)] == [0, 1]
    for want, row in zip(history(whole), history(cut), strict=True):
        assert row == pytest.approx(want, rel=0, abs=1e-6), f"epoch {row['epoch']:.0f}"


def test_resume_keeps_early_stopping_and_lr_schedule_state(tmp_path: Path) -> None:
    """Patience counters and the best val_loss so far carry over a resume (Keras resets them
    in on_train_begin), but not into a classifier's fine-tuning stage, which starts afresh."""
    import keras

    from busi import train
    from busi.config import TrainConfig

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    cfg = TrainConfig(epochs=10, early_stopping_patience=3, reduce_lr_patience=3)

    def callbacks(state: dict, epochs: int = 10) -> dict:
        cbs = train._callbacks(tmp_path, replace(cfg, epochs=epochs), state)
        keras.callbacks.CallbackList(cbs, model=model).on_train_begin()
        return {type(c).__name__: c for c in cbs}

    first = callbacks({})
    calls = keras.callbacks.CallbackList(list(first.values()), model=model)
    for epoch, val_loss in enumerate([1.0, 0.5, 0.7, 0.8]):
        calls.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
    state = json.loads((tmp_path / "state.json").read_text())
    assert len(state["seed_states"]) == 1, "the dropout layer's seed state is kept"
    resumed = callbacks(state)
    for name, keys in (("EarlyStopping", ("wait", "best", "best_epoch")),
                       ("ReduceLROnPlateau", ("wait", "best", "cooldown_counter"))):
        assert first[name].wait == 2 and first[name].best == pytest.approx(0.5)
        for key in keys:
            assert getattr(resumed[name], key) == pytest.approx(getattr(first[name], key)), key
    fine_tuning = callbacks(state, epochs=12)
    assert fine_tuning["EarlyStopping"].wait == 0 and fine_tuning["EarlyStopping"].best is None


def test_train_cls_without_a_segmentation_run_says_which_command(
        work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(work, "train-cls", "--model", "cnn", "--set", f"outputs.root={tmp_path}") == 2
    assert "busi train-seg" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cls_run(work: Path, seg_run: Path) -> Path:
    assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run)) == 0
    (run_dir,) = list((work / "outputs" / "cls" / "cnn").iterdir())
    return run_dir


def test_classifier_uses_the_segmentation_runs_test_set(cls_run: Path, seg_run: Path) -> None:
    seg_split = json.loads((seg_run / "split.json").read_text())
    cls_split = json.loads((cls_run / "split.json").read_text())
    assert cls_split["manifest"] == seg_split["manifest"]
    assert cls_split["test"] == seg_split["test"] and cls_split["seg_run"] == str(seg_run)
    scores = json.loads((seg_run / "test_scores.json").read_text())
    with open(cls_run / "predictions.csv") as fh:
        files = [r["file"] for r in csv.DictReader(fh)]
    assert sorted(files) == sorted(scores)


def test_report_files_equal_what_sklearn_computes(cls_run: Path) -> None:
    with open(cls_run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    t, p = [r["true"] for r in rows], [r["pred"] for r in rows]
    labels = ["benign", "normal", "malignant"]
    expected = classification_report(t, p, labels=labels, output_dict=True, zero_division=0)
    saved = json.loads((cls_run / "classification_report.json").read_text())
    assert saved["accuracy"] == pytest.approx(accuracy_score(t, p))
    for c in labels:
        for k in ("precision", "recall", "f1-score", "support"):
            assert saved["report"][c][k] == pytest.approx(expected[c][k])
    assert saved["confusion_matrix"] == confusion_matrix(t, p, labels=labels).tolist()
    lo, hi = saved["ci95"]["accuracy"]
    assert lo <= saved["accuracy"] <= hi
    with open(cls_run / "classification_report.csv") as fh:
        table = {r["class"]: r for r in csv.DictReader(fh)}
    assert float(table["benign"]["recall"]) == pytest.approx(expected["benign"]["recall"], abs=1e-4)
    for name in ("classification_report.txt", "classification_report.md", "confusion_matrix.png",
                 "confusion_matrix.csv", "loss_curve.png"):
        assert (cls_run / name).is_file()


def test_evaluate_prints_the_per_class_table(work: Path, cls_run: Path, seg_run: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in cls_run.rglob("*")}
    assert main(["evaluate", "--outputs", str(work / "outputs"), "--seg-run", str(seg_run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in cls_run.rglob("*")} == before, \
        "evaluating a run must not modify its folder"
    out = capsys.readouterr().out
    for word in ("precision", "recall", "f1-score", "benign", "malignant", "normal",
                 "macro avg", "Side by side", "Dice"):
        assert word in out
    assert list((work / "outputs" / "eval").glob("*/evaluation.md"))


def test_ground_truth_and_no_mask_ablations_run(work: Path, seg_run: Path) -> None:
    for masks in ("ground_truth", "none"):
        assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
                   "--set", f"model.classifier.masks={masks}",
                   "--set", "training.cls.epochs=1") == 0


def test_predict_reports_bad_images_and_predicts_the_rest(
        work: Path, seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for name in ("benign (1).png", "malignant (1).png"):
        cls = name.split()[0]
        shutil.copy(synth_root / cls / name, inputs / name)
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), "--seg-run", str(seg_run), "--cls-run", str(cls_run),
                 "--out", str(out)]) == 0
    assert "broken.png" in capsys.readouterr().err
    result = json.loads((out / "predictions.json").read_text())
    assert len(result["predictions"]) == 2 and len(result["skipped"]) == 1
    p = result["predictions"][0]
    assert p["pred"] in ("benign", "malignant", "normal")
    assert sum(p[f"p_{c}"] for c in ("benign", "malignant", "normal")) == pytest.approx(1, abs=1e-3)
    assert (out / "benign_(1)_mask.png").is_file() and (out / "benign_(1)_overlay.png").is_file()


def test_predict_gives_the_mask_the_segmentation_run_scored(
        work: Path, seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path) -> None:
    """Same preprocessing and mask rule as training: predict == what evaluate measured."""
    import cv2

    from busi.masks import load_masks

    stored = load_masks(seg_run)
    scored = sorted(json.loads((seg_run / "test_scores.json").read_text()))[:3]
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for f in scored:
        shutil.copy(synth_root / f, inputs / Path(f).name)
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), "--seg-run", str(seg_run), "--cls-run", str(cls_run),
                 "--out", str(out)]) == 0
    for f in scored:
        full = cv2.imread(str(out / (Path(f).stem.replace(" ", "_") + "_mask.png")), 0)
        small = cv2.resize(full, stored[f].shape[::-1], interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(small > 0, stored[f] > 0)


def test_out_of_fold_masks_come_from_models_that_never_saw_the_image(work: Path) -> None:
    out_root = work / "oof"
    assert run(work, "train-seg", "--set", f"outputs.root={out_root}",
               "--set", "training.seg.epochs=1",
               "--set", "training.seg.out_of_fold_masks=2") == 0
    (run_dir,) = list((out_root / "seg").iterdir())
    z = np.load(run_dir / "masks.npz")
    source = dict(zip(z["files"].tolist(), z["source"].tolist(), strict=True))
    test = set(json.loads((run_dir / "test_scores.json").read_text()))
    assert {source[f] for f in test} == {"final"}, "test masks come from the final U-Net"
    assert {s for f, s in source.items() if f not in test} == {"oof0", "oof1"}
    assert (run_dir / "oof" / "fold0" / "best.keras").is_file()


def test_fold_ensemble_segments_test_and_new_images_with_every_fold_unet(
        work: Path, cls_run: Path, synth_root: Path, tmp_path: Path) -> None:
    import cv2

    from busi.data import resize_image
    from busi.masks import load_masks, load_unets, predict_probs

    out_root = work / "ensemble"
    assert run(work, "train-seg", "--set", f"outputs.root={out_root}",
               "--set", "training.seg.epochs=1", "--set", "training.seg.out_of_fold_masks=2",
               "--set", "training.seg.fold_ensemble=true") == 0
    (run_dir,) = list((out_root / "seg").iterdir())
    z = np.load(run_dir / "masks.npz")
    files, source = z["files"].tolist(), dict(zip(z["files"].tolist(), z["source"].tolist(),
                                                   strict=True))
    test = sorted(json.loads((run_dir / "test_scores.json").read_text()))
    assert {source[f] for f in test} == {"ensemble"}
    assert {s for f, s in source.items() if f not in test} == {"oof0", "oof1"}
    assert z["members"].tolist() == ["best.keras", "oof/fold0/best.keras", "oof/fold1/best.keras"]
    assert json.loads((run_dir / "metrics.json").read_text())["unets"] == 3
    # the stored test probabilities are the average of the three U-Nets (flip TTA on)
    unets = load_unets(run_dir)
    images = np.stack([resize_image(cv2.imread(str(synth_root / f), cv2.IMREAD_GRAYSCALE),
                                    (32, 32)) for f in test])
    single = [predict_probs(m, images, flip_tta=True) for m in unets]
    stored = z["probs"][[files.index(f) for f in test]].astype(np.float32) / 255
    np.testing.assert_allclose(stored, np.mean(single, axis=0), atol=1 / 255 + 1e-6)
    assert not np.allclose(single[0], single[1], atol=0.02), "the members differ"
    # busi predict segments a new image with the same ensemble
    inputs = tmp_path / "scans"
    inputs.mkdir()
    shutil.copy(synth_root / test[0], inputs / Path(test[0]).name)
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), "--seg-run", str(run_dir), "--cls-run", str(cls_run),
                 "--out", str(out)]) == 0
    full = cv2.imread(str(out / (Path(test[0]).stem.replace(" ", "_") + "_mask.png")), 0)
    small = cv2.resize(full, (32, 32), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(small > 0, load_masks(run_dir)[test[0]] > 0)


def test_a_run_killed_among_its_out_of_fold_unets_resumes_without_retraining(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final U-Net stopped early; Ctrl-C in the second fold's first epoch. The resume
    must keep the final U-Net and fold 0 as they are and finish fold 1 once."""
    from busi import train

    real = train.RunCheckpoint.on_epoch_end

    def early_stop_then_ctrl_c(self, epoch, logs=None):
        real(self, epoch, logs)
        if self.run_dir.name == "fold1":
            raise KeyboardInterrupt
        if self.run_dir.name != "fold0":
            self.model.stop_training = True  # as EarlyStopping does, after epoch 0

    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", early_stop_then_ctrl_c)
    out_root = work / "oof-resume"
    assert run(work, "train-seg", "--set", f"outputs.root={out_root}",
               "--set", "training.seg.epochs=2", "--set", "training.seg.out_of_fold_masks=2",
               "--set", "training.seg.fold_ensemble=true") == 130
    (run_dir,) = list((out_root / "seg").iterdir())
    kept = {p: p.stat().st_mtime_ns for p in [run_dir / "best.keras", run_dir / "last.keras",
                                              run_dir / "oof/fold0/best.keras"]}
    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", real)
    assert main(["train-seg", "--resume", str(run_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished models were retrained"

    def epochs(folder: Path) -> list[int]:
        with open(folder / "history.csv") as fh:
            return [int(r["epoch"]) for r in csv.DictReader(fh)]

    assert epochs(run_dir) == [0], "the early-stopped U-Net was trained on"
    assert epochs(run_dir / "oof/fold1") == [0, 1]
    assert np.load(run_dir / "masks.npz")["members"].size == 3


def test_fold_ensemble_without_out_of_fold_unets_is_a_config_error(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(work, "train-seg", "--set", f"outputs.root={work / 'noens'}",
               "--set", "training.seg.fold_ensemble=true") == 2
    assert "out_of_fold_masks" in capsys.readouterr().err
    assert not (work / "noens").exists(), "no half-made run folder"


def test_frozen_base_then_fine_tuning_with_class_weights(work: Path, seg_run: Path) -> None:
    out_root = work / "finetune"
    assert run(work, "train-cls", "--model", "mobilenet", "--seg-run", str(seg_run),
               "--set", f"outputs.root={out_root}", "--set", "training.cls.epochs=1",
               "--set", "model.classifier.freeze_base=true",
               "--set", "model.classifier.fine_tune_blocks=2",
               "--set", "model.classifier.fine_tune_epochs=1",
               "--set", "model.classifier.class_weights=true") == 0
    (run_dir,) = list((out_root / "cls" / "mobilenet").iterdir())
    with open(run_dir / "history.csv") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]  # stage 1, then 2
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True


def test_evaluate_trained_runs_on_other_data_without_retraining(
        work: Path, seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another site's images, as a CSV manifest with no normal images and one unmasked image."""
    rows = ["image,mask,label"]
    for k in range(1, 5):
        for c in ("benign", "malignant"):
            mask = f"{c}/{c} ({k})_mask.png" if k > 1 else ""
            rows.append(f"{c}/{c} ({k}).png,{mask},{c}")
    manifest = synth_root / "other_site.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out_root = tmp_path / "out"
    try:
        assert main(["evaluate", "--data", str(manifest), "--seg-run", str(seg_run),
                     "--cls-run", str(cls_run), "--outputs", str(out_root)]) == 0
    finally:
        manifest.unlink()
    (out,) = (out_root / "eval").iterdir()
    with open(out / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    seg = json.loads((out / "segmentation.json").read_text())
    assert seg["n_test"] == 6, "images without a mask file are not scored for segmentation"
    report = json.loads((out / "classification_report.json").read_text())
    assert report["report"]["normal"]["support"] == 0
    assert "Dice" in capsys.readouterr().out


def test_evaluate_on_data_with_an_unknown_class_folder_is_a_clear_error(
        work: Path, cls_run: Path, seg_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    (other / "cancer").mkdir(parents=True)
    assert main(["evaluate", "--data", str(other), "--cls-run", str(cls_run),
                 "--seg-run", str(seg_run), "--outputs", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cancer" in err and "fix:" in err
