"""The whole pipeline on tiny synthetic data: train-seg, resume, train-cls, evaluate, predict.

Models are tiny (32x32 input, a handful of steps): these tests pin behaviour --
files, resumability, shared splits, report numbers -- not accuracy.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from busi.cli import main
from busi.data.split import read_manifest

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


@pytest.fixture(scope="module")
def other_seg_run(work: Path) -> Path:
    """A second U-Net: another seed, so another split whose test set shares some of
    seg_run's test images, not all; and one epoch, so other figures."""
    out_root = work / "seed4"
    assert run(work, "train-seg", "--set", f"outputs.root={out_root}",
               "--set", "runtime.seed=4", "--set", "training.seg.epochs=1") == 0
    (run_dir,) = list((out_root / "seg").iterdir())
    return run_dir


@pytest.fixture(scope="module")
def unseen_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic scans the runs never saw (another seed): what `evaluate --data` tests use as
    another site. No image is a pHash near-duplicate of the training set's."""
    from busi.data.synth import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("unseen") / "site"
    write_dataset(root, SynthSpec(per_class=12, seed=1, height=96, width=128))
    return root


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


def ctrl_c_after_first_epoch(monkeypatch: pytest.MonkeyPatch):
    """Make every run stop as a Ctrl-C would, right after its first epoch is committed;
    returns the real callback, to put back before resuming."""
    from busi.training.loop import RunCheckpoint

    real = RunCheckpoint.on_epoch_end

    def interrupt(self, epoch, logs=None):
        real(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", interrupt)
    return real


def test_interrupted_training_resumes_as_the_same_run(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Same shuffle, augmentation, dropout masks, optimizer and callback state after --resume:
    with runtime.deterministic the history is that of a run never interrupted."""
    from busi.training import loop as train

    settings = [f"--set={key}" for key in (
        "training.seg.epochs=3", "runtime.deterministic=true", "training.seg.reduce_lr_patience=1",
        "training.seg.early_stopping_patience=2", "augmentation.engine=image_data_generator",
        "training.seg.flip_tta=false", "training.seg.tune_threshold=false")]
    assert run(work, "train-seg", f"--set=outputs.root={work / 'whole'}", *settings) == 0
    real = ctrl_c_after_first_epoch(monkeypatch)
    out_root = work / "resume"
    assert run(work, "train-seg", f"--set=outputs.root={out_root}", *settings) == 130
    (run_dir,) = list((out_root / "seg").iterdir())
    assert "--resume" in capsys.readouterr().err
    cut = json.loads((run_dir / "state.json").read_text())
    assert cut["epochs_done"] == 1 and cut["train_seconds"] > 0
    assert not list(run_dir.glob(".*tmp*")), "no half-written files"
    monkeypatch.setattr(train.RunCheckpoint, "on_epoch_end", real)
    assert main(["train-seg", "--resume", str(run_dir)]) == 0
    # the training time of a resumed run counts its first session's epoch too
    done = json.loads((run_dir / "state.json").read_text())
    resumed = json.loads((run_dir / "metrics.json").read_text())["train_seconds"]
    assert done["train_seconds"] == resumed > cut["train_seconds"]
    (whole,) = list((work / "whole" / "seg").iterdir())
    assert [r["epoch"] for r in history(run_dir)] == [0, 1, 2]
    for want, row in zip(history(whole), history(run_dir), strict=True):
        assert row == pytest.approx(want, rel=0, abs=1e-6), f"epoch {row['epoch']:.0f}"
    assert main(["train-seg", "--resume", str(run_dir)]) == 2  # finished: nothing to resume


def test_an_interrupted_classifier_resumes_as_the_same_run(
        work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train-cls --resume RUN uses the run's config (here ground-truth masks, so no
    segmentation run anywhere) and continues it as if never interrupted."""
    from busi.training import loop as train

    settings = [f"--set={key}" for key in (
        "training.cls.epochs=2", "runtime.deterministic=true",
        "model.classifier.masks=ground_truth", "augmentation.engine=image_data_generator")]
    assert run(work, "train-cls", f"--set=outputs.root={work / 'cls-whole'}", *settings) == 0
    real = ctrl_c_after_first_epoch(monkeypatch)
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

    from busi.config import TrainConfig
    from busi.training import loop as train

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


def test_weights_unet_is_refused_for_vgg19_before_any_run_folder(
        work: Path, seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cpu.yaml's `weights: unet` fits only MobileNet: VGG19 is one clear error (exit 2, the
    fix says weights=none) and leaves no run folder; the CNN ignores `weights` (cls_run)."""
    assert run(work, "train-cls", "--model", "vgg19", "--seg-run", str(seg_run),
               "--set", f"outputs.root={tmp_path}", "--set", "model.classifier.weights=unet") == 2
    err = capsys.readouterr().err
    assert "is for the mobilenet classifier" in err and "weights=none" in err
    assert not (tmp_path / "cls").exists()


@pytest.fixture(scope="module")
def cls_run(work: Path, seg_run: Path) -> Path:
    # weights: unet, as configs/cpu.yaml sets it: the CNN has no base, so it does not apply
    assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
               "--set", "model.classifier.weights=unet") == 0
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


def test_report_files_equal_counts_of_the_predictions(cls_run: Path) -> None:
    """Every figure recomputed from predictions.csv by plain counting, not by scikit-learn."""
    with open(cls_run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    t, p = np.array([r["true"] for r in rows]), np.array([r["pred"] for r in rows])
    labels = ["benign", "malignant", "normal"]  # the one class order of every table
    present = [c for c in labels if (t == c).any()]
    saved = json.loads((cls_run / "classification_report.json").read_text())
    assert saved["labels"] == labels and saved["present"] == present
    assert saved["accuracy"] == pytest.approx(np.mean(t == p))
    f1s = []
    for c in present:
        hits, n_true, n_pred = np.sum((t == c) & (p == c)), np.sum(t == c), np.sum(p == c)
        e = saved["report"][c]
        assert e["precision"] == pytest.approx(hits / n_pred if n_pred else 0.0), c
        assert e["recall"] == pytest.approx(hits / n_true), c
        f1s.append(2 * hits / (n_true + n_pred))
        assert e["f1-score"] == pytest.approx(f1s[-1]), c
        assert e["support"] == n_true
    assert saved["macro_f1"] == pytest.approx(np.mean(f1s))
    assert saved["report"]["macro avg"]["f1-score"] == pytest.approx(np.mean(f1s))
    assert saved["confusion_matrix"] == [[int(np.sum((t == a) & (p == b))) for b in labels]
                                         for a in labels]
    lo, hi = saved["ci95"]["accuracy"]
    assert lo <= saved["accuracy"] <= hi
    assert "duplicate groups" in saved["ci95_method"], "the run's manifest groups are resampled"
    with open(cls_run / "classification_report.csv") as fh:
        table = {r["class"]: r for r in csv.DictReader(fh)}
    for c in present:
        assert float(table[c]["recall"]) == pytest.approx(saved["report"][c]["recall"], abs=1e-4)
    for name in ("classification_report.txt", "classification_report.md", "confusion_matrix.png",
                 "confusion_matrix.csv", "loss_curve.png"):
        assert (cls_run / name).is_file()


def _strict_json(path: Path):
    """``path`` parsed as strict JSON: NaN or Infinity (Python's extensions) fail."""
    def refuse(name: str):
        raise ValueError(f"{path.name}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _sections(md: str) -> list[str]:
    return [ln for ln in md.splitlines() if ln.startswith("## ")]


def test_classifier_report_leads_with_the_clinicians_summary(cls_run: Path) -> None:
    """Cancer sensitivity / specificity at the argmax operating point, counted here from
    predictions.csv, come first; config and environment come last; U-Net rows are gone."""
    with open(cls_run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    mal = [r for r in rows if r["true"] == "malignant"]
    ben = [r for r in rows if r["true"] == "benign"]
    tp = sum(r["pred"] == "malignant" for r in mal)
    tn = sum(r["pred"] != "malignant" for r in ben)
    md = (cls_run / "report.md").read_text()
    sens = f"| Sensitivity: malignant called malignant | {tp / len(mal):.2f} ({tp} of {len(mal)})"
    spec = f"| Specificity: benign not called malignant | {tn / len(ben):.2f} ({tn} of {len(ben)})"
    assert sens in md and spec in md
    assert "argmax" in md and "ROC AUC, benign vs malignant" in md
    assert "Lesion images the U-Net missed (empty predicted mask)" in md
    saved = json.loads((cls_run / "classification_report.json").read_text())
    lo, hi = saved["sensitivity_specificity"]["ci95"]["sensitivity"]
    assert lo <= tp / len(mal) <= hi
    first_result = md.index(sens)
    sections = _sections(md)
    assert sections[-2:] == ["## Config", "## Environment and provenance"], sections
    assert first_result < md.index("## Classification") < md.index("## Config")
    assert md.index("## Loss curves") < md.index("## Config")
    config = md[md.index("## Config"):]
    assert "| classifier |" in config and "| U-Net |" not in config
    assert (cls_run / "classification_report.md").read_text().index("Sensitivity") < \
        (cls_run / "classification_report.md").read_text().index("Per class")


def test_one_class_order_in_every_table_and_figure(cls_run: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from busi.reporting import plots

    order = ["benign", "malignant", "normal"]
    md = (cls_run / "classification_report.md").read_text()
    assert "| true \\ pred | benign | malignant | normal |" in md
    rows = [ln.split("|")[1].strip().lower() for ln in md.splitlines()
            if ln.startswith("| ") and ln.split("|")[1].strip().lower() in order]
    assert rows == order * (len(rows) // 3), rows  # summary recalls, table, confusion matrix
    with open(cls_run / "confusion_matrix.csv") as fh:
        assert next(fh).strip() == "true\\pred," + ",".join(order)
    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: figs.append(fig) or out)
    plots.plot_roc(cls_run / "predictions.csv", cls_run / "unused.png", "ROC")
    (ax,) = figs[0].axes
    assert "Positive label" not in ax.get_xlabel() + ax.get_ylabel()
    assert "specificity" in ax.get_xlabel() and "sensitivity" in ax.get_ylabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    drawn = [t.split(" vs rest")[0] for t in legend if " vs rest" in t]
    assert drawn == [c for c in order if c in drawn] and len(drawn) >= 2
    assert any(t.startswith("benign vs malignant (AUC") for t in legend)


def test_history_plot_shows_validation_dice_not_only_loss(
        seg_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from busi.reporting import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: figs.append(fig) or out)
    plots.plot_history(seg_run / "history.csv", seg_run / "unused.png", "U-Net")
    labels = [line.get_label() for ax in figs[0].axes for line in ax.get_lines()]
    assert "validation Dice" in labels and "validation loss" in labels
    # a first validation loss of 65 (the real cpu.yaml U-Net) must not flatten the rest
    spiked = tmp_path / "history.csv"
    spiked.write_text("epoch,loss,val_loss\n" + "".join(
        f"{e},{0.6 - e / 100},{v}\n" for e, v in enumerate([65.4, 6.1, 1.2, 0.9, 0.8, 0.7])))
    plots.plot_history(spiked, tmp_path / "unused.png", "U-Net")
    assert figs[1].axes[0].get_yscale() == "log" and "log" in figs[1].axes[0].get_ylabel()
    assert figs[0].axes[0].get_yscale() == "linear"


def test_an_mse_u_nets_loss_curve_shows_the_loss_of_predicting_background_everywhere(
        seg_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validation MSE that settles on the all-background line (the paper's U-Net on BUSI)
    has learned nothing else: the curve draws that line at the mean of the 0/1 masks."""
    from busi.reporting import plots
    from busi.training.segmentation import background_loss

    masks = np.zeros((4, 8, 8), np.uint8)
    masks[0, :2, :] = 1  # 16 of 256 pixels
    value, label = background_loss("mse", masks)
    assert value == pytest.approx(16 / 256) and "all-background" in label
    assert background_loss("bce_dice", masks) is None  # the line is an MSE's
    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: figs.append(fig) or out)
    plots.plot_history(seg_run / "history.csv", seg_run / "unused.png", "U-Net",
                       baseline=(value, label))
    (line,) = [ln for ln in figs[0].axes[0].get_lines() if ln.get_label() == label]
    assert list(line.get_ydata()) == [value, value]


def test_a_u_net_stuck_on_background_is_said_during_training_once(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Five epochs of validation Dice 0 in a row give one warning (the paper's U-Net ran six
    hours so); a Dice above 0 restarts the count, and a run that finds lesions hears nothing."""
    from busi.training.segmentation import NoLesionWatch

    watch = NoLesionWatch(patience=5, background=0.0726)
    for epoch, dice in enumerate([0.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0]):
        watch.on_epoch_end(epoch, {"val_dice": dice, "val_loss": 0.0726})
    assert capsys.readouterr().err == ""  # only four in a row since the 0.01
    for epoch in (7, 8, 9):
        watch.on_epoch_end(epoch, {"val_dice": 0.0, "val_loss": 0.0726})
    said = capsys.readouterr().err
    assert said.count("warning") == 1 and "0 for 5 epochs (to epoch 8)" in said
    assert "0.0726 against 0.0726 for an all-background mask" in said
    learning = NoLesionWatch(patience=5)
    for epoch in range(10):
        learning.on_epoch_end(epoch, {"val_dice": 0.3, "val_loss": 0.2})
    assert capsys.readouterr().err == ""
    bce = NoLesionWatch(patience=2)  # not an MSE run: no MSE explanation
    for epoch in range(2):
        bce.on_epoch_end(epoch, {"val_dice": 0.0, "val_loss": 0.3})
    said = capsys.readouterr().err
    assert "predicts no lesion anywhere" in said and "MSE" not in said


def test_failure_gallery_tiles_keep_each_scans_aspect_and_captions_do_not_collide(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from busi.reporting import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: figs.append(fig) or out)
    grid = np.zeros((2, 32, 32), np.uint8)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[:, 10:20, 10:20] = 1
    plots.save_failure_gallery(tmp_path / "g.png", grid, masks, masks,
                               ["a.png: malignant called normal 0.99", "b.png: benign, Dice 0.10"],
                               "site", shapes=np.array([[100, 300], [400, 200]]))
    tiles = [ax for ax in figs[0].axes if ax.images]
    assert [ax.images[0].get_extent() for ax in tiles] == [[0, 300, 100, 0], [0, 200, 400, 0]]
    assert tiles[0].get_title() == "a.png\nmalignant called normal 0.99"


def test_per_image_csv_joins_the_unets_dice_to_each_prediction(cls_run: Path,
                                                               seg_run: Path) -> None:
    with open(cls_run / "predictions.csv") as fh:
        preds = {r["file"]: r for r in csv.DictReader(fh)}
    with open(cls_run / "per_image.csv") as fh:
        joined = {r["file"]: r for r in csv.DictReader(fh)}
    assert set(joined) == set(preds)
    scores = _strict_json(seg_run / "test_scores.json")
    for f, r in joined.items():
        assert (r["true"], r["pred"]) == (preds[f]["true"], preds[f]["pred"])
        if int(r["true_lesion_px"]):
            assert float(r["lesion_dice"]) == pytest.approx(scores[f]["dice"], abs=1e-3), f
            assert r["unet_missed"] == str(int(int(r["pred_lesion_px"]) == 0))
        else:
            assert r["lesion_dice"] == "" and scores[f]["hd95"] is None  # null, not NaN
        assert r["grid"] == "32x32"


def test_reports_show_the_worst_cases_first(cls_run: Path, seg_run: Path) -> None:
    """The seg run's first overlay is its lowest-Dice test image; the classifier report
    lists every wrong prediction with its mask's Dice and shows their Grad-CAM panels."""
    from busi.reporting.gradcam import panel_name

    scores = _strict_json(seg_run / "test_scores.json")
    with open(cls_run / "per_image.csv") as fh:
        masks = {r["file"]: int(r["true_lesion_px"]) for r in csv.DictReader(fh)}
    lesion = sorted((v["dice"], f) for f, v in scores.items() if masks[f])
    first = sorted((seg_run / "overlays").glob("*.png"))[0].name
    assert first.startswith("01_") and lesion[0][1].replace("/", "__").replace(" ", "_") in first
    with open(cls_run / "predictions.csv") as fh:
        wrong = [r["file"] for r in csv.DictReader(fh) if r["true"] != r["pred"]]
    md = (cls_run / "report.md").read_text()
    assert "## Worst cases" in md and f"Wrong classifications ({len(wrong)} of" in md
    for f in wrong:
        assert f"| `{f}` |" in md
    cams = {p.name for p in (cls_run / "gradcam").glob("*.png")}
    assert {panel_name(f) for f in wrong[:8]} <= cams
    assert md.index("## Worst cases") < md.index("## Config")
    seg_md = (seg_run / "report.md").read_text()
    table = seg_md[seg_md.index("### Worst test images"):seg_md.index("## Loss curves")]
    assert f"| `{lesion[0][1]}` | {lesion[0][0]:.3f} |" in table
    assert not any(f"`{f}`" in table.split("Panels:")[1]
                   for f, v in scores.items() if v["lesion_px"] == 0), "normal scans are no lesion"


def test_a_unet_report_leaves_out_classifier_settings(seg_run: Path) -> None:
    md = (seg_run / "report.md").read_text()
    config = md[md.index("## Config"):]
    assert "| U-Net |" in config and "| classifier |" not in config
    assert md.index("## Segmentation") < md.index("## Config")
    assert _sections(md)[-2:] == ["## Config", "## Environment and provenance"]
    assert "### Worst test images" in md


def test_evaluate_prints_the_per_class_table(work: Path, cls_run: Path, seg_run: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from busi.evaluation import classification

    # the tiny synthetic set stands in for BUSI's 780 images, which alone go beside the paper
    split = json.loads((cls_run / "split.json").read_text())
    monkeypatch.setattr(classification, "PAPER_DATA_IMAGES",
                        split["train"] + split["val"] + split["test"])
    before = {p: p.stat().st_mtime_ns for p in cls_run.rglob("*")}
    assert main(["evaluate", "--outputs", str(work / "outputs"), "--seg-run", str(seg_run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in cls_run.rglob("*")} == before, \
        "evaluating a run must not modify its folder"
    out = capsys.readouterr().out
    for word in ("precision", "recall", "f1-score", "benign", "malignant", "normal",
                 "macro avg", "Side by side", "Dice"):
        assert word in out
    (evaluation,) = list((work / "outputs" / "eval").glob("*/evaluation.md"))
    md = evaluation.read_text()
    assert md.index("Sensitivity: malignant") < md.index("## Segmentation") \
        < md.index("Per class")
    # busi issue 15: the paper's CNN row for row beside its Table 1, our figures with intervals
    beside = md[md.index("#### cnn beside the paper's Table 1"):]
    report = json.loads((cls_run / "classification_report.json").read_text())
    acc, (lo, hi) = report["accuracy"], report["ci95"]["accuracy"]
    assert f"| Accuracy | | | | | {acc:.2f} ({lo:.2f}-{hi:.2f}) | 0.82 | {report['n']} | 78 |" \
        in beside
    benign = report["report"]["benign"]
    called_benign = np.asarray(report["confusion_matrix"])[:, 0].sum()
    assert (f"| Benign | {benign['precision']:.2f}" if called_benign
            else "| Benign | never predicted |") in beside and "| 0.87 |" in beside
    assert "base weights: from scratch (no pretrained base)" in beside
    # a model that calls everything benign (the paper's CNN on black inputs) has no precision
    # for the classes it never calls: said, not printed as a measured 0.00
    k = len(report["labels"])
    totals = np.asarray(report["confusion_matrix"]).sum(axis=1)
    everything_benign = {**report, "confusion_matrix": [[int(n)] + [0] * (k - 1) for n in totals]}
    table = classification.paper_table_markdown(everything_benign, cls_run)
    assert "| Malignant | never predicted |" in table and "| Normal | never predicted |" in table
    assert "Never predicted: malignant, normal." in table
    # other data (the demo's synthetic scans, a user's own) is not put beside the paper
    monkeypatch.setattr(classification, "PAPER_DATA_IMAGES", 780)
    assert classification.paper_table_markdown(report, cls_run) is None


def test_evaluate_puts_two_unets_side_by_side_with_a_paired_difference(
        work: Path, seg_run: Path, other_seg_run: Path, cls_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 15: the paper's U-Net next to cpu.yaml's. Two different U-Net runs whose
    test sets partly overlap (another seed): each row its own run's figures, the paired
    difference over the lesion images both were tested on, and how many those are -- once
    a TypeError (a group id beside a file name) ended it in "internal error"."""
    metrics = [json.loads((s / "metrics.json").read_text()) for s in (seg_run, other_seg_run)]
    scores = [json.loads((s / "test_scores.json").read_text()) for s in (seg_run, other_seg_run)]
    both = [f for f in scores[0] if f in scores[1]]
    shared = [f for f in both if scores[0][f]["lesion_px"] > 0]
    assert shared and len(both) < len(scores[0]), "the fixtures' test sets overlap in part"
    assert main(["evaluate", str(cls_run), "--seg-run", str(seg_run),
                 "--seg-run", str(other_seg_run), "--outputs", str(tmp_path)]) == 0
    (md,) = (tmp_path / "eval").glob("*/evaluation.md")
    text = md.read_text()
    for s, m in zip((seg_run, other_seg_run), metrics, strict=True):
        (row,) = [ln for ln in text.splitlines() if ln.startswith(f"| {s.name} (")]
        n = m["lesion_images"]["dice"]["n"]
        assert f"| {m['lesion_images']['dice']['mean']:.3f} (" in row
        assert f"{m['lesion_images']['hd95_undefined']} of {n}" in row
        free = m["lesion_free_images"]  # normal scans predicted empty: a count, not a rate
        assert f"| {round(free['fraction_predicted_empty'] * free['n'])} of {free['n']} |" in row
        assert "plain encoder, base" in row
    assert (f"{seg_run.name} and {other_seg_run.name} were tested on partly different images: "
            f"they share {len(both)} test images ({seg_run.name} has {len(scores[0])}, "
            f"{other_seg_run.name} {len(scores[1])})" in text
            and "their rows above are not a paired comparison" in text)
    diff = np.mean([scores[0][f]["dice"] - scores[1][f]["dice"] for f in shared])
    assert (f"Paired, on the {len(shared)} lesion images both were tested on: lesion Dice of "
            f"{seg_run.name} (" in text and f"minus {other_seg_run.name} (" in text)
    assert f"= {diff:+.3f} (95% CI " in text


def test_evaluate_puts_two_unets_side_by_side_at_another_site(
        seg_run: Path, other_seg_run: Path, cls_run: Path, unseen_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 27: the paper's from-scratch U-Net beside cpu.yaml's at a second hospital.
    Each U-Net measured alone in its own folder, each image's figures written, then one
    table with the paired Dice difference over the same lesion images, every interval
    resampling the site's patients."""
    manifest = _site_manifest(unseen_root, tmp_path / "site.csv", patients=4)
    assert main(["evaluate", "--data", str(manifest), "--seg-run", str(seg_run),
                 "--seg-run", str(other_seg_run), "--outputs", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    (out,) = (tmp_path / "o" / "eval").iterdir()
    scores, dice = [], []
    for s in (seg_run, other_seg_run):
        summary = json.loads((out / s.name / "segmentation.json").read_text())
        sc = json.loads((out / s.name / "segmentation_scores.json").read_text())
        assert len(sc) == 18 and sum(v["lesion_px"] > 0 for v in sc.values()) == 12
        lesion = [v["dice"] for v in sc.values() if v["lesion_px"] > 0]
        assert summary["lesion_images"]["dice"]["mean"] == pytest.approx(np.mean(lesion))
        assert summary["intervals"]["unit_name"] == "patients"
        scores.append(sc)
        dice.append(summary["lesion_images"]["dice"]["mean"])
    report = (out / "evaluation.md").read_text()
    for s, d in zip((seg_run, other_seg_run), dice, strict=True):
        (row,) = [ln for ln in report.splitlines() if ln.startswith(f"| {s.name} (")]
        assert f"| 18 | {d:.3f} (" in row, row
        assert f"## site.csv: U-Net {s.name}" in report.replace(f"{tmp_path.name}/", "")
    shared = [f for f in scores[0] if scores[0][f]["lesion_px"] > 0]
    diff = np.mean([scores[0][f]["dice"] - scores[1][f]["dice"] for f in shared])
    said = (f"Paired, on the same 12 lesion images: lesion Dice of {seg_run.name} (")
    assert said in report and said in printed
    assert f"= {diff:+.3f} (95% CI " in report and "95% intervals resample patients." in report
    record = json.loads((out / "evaluation.json").read_text())
    assert record["seg_runs"] == [str(seg_run), str(other_seg_run)]
    assert [r["seg_run"] for r in record["sites"][0]["unets"]] == record["seg_runs"]
    assert (out / "report.html").is_file()
    # a classifier with two U-Nets at a site is one clear error, as is one U-Net named twice
    for argv, words in ((["--cls-run", str(cls_run), "--seg-run", str(other_seg_run)],
                         "one --seg-run segments the images"),
                        (["--seg-run", str(seg_run)], "named twice")):
        assert main(["evaluate", "--data", str(manifest), "--seg-run", str(seg_run), *argv,
                     "--outputs", str(tmp_path / "bad")]) == 2
        assert words in capsys.readouterr().err
    # U-Nets of two image sizes: no paired Dice, one clear error, no folder
    other = _copy_run(other_seg_run, tmp_path / "runs" / "seg" / "64px")
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace(
        "- 32\n- 32", "- 64\n- 64").replace("[32, 32]", "[64, 64]"))
    assert main(["evaluate", "--data", str(manifest), "--seg-run", str(seg_run),
                 "--seg-run", str(other), "--outputs", str(tmp_path / "bad")]) == 2
    assert "read images differently" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_evaluate_compares_unets_before_any_classifier_exists(
        seg_run: Path, other_seg_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The README's `busi evaluate --seg-run A --seg-run B` on an outputs folder with U-Nets
    only (the paper's U-Net before its classifiers): the U-Nets, not 'train one first'."""
    assert main(["evaluate", "--seg-run", str(seg_run), "--seg-run", str(other_seg_run),
                 "--outputs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"busi evaluate: U-Net run(s) {seg_run}, {other_seg_run}\n")
    assert "classifier" not in out.splitlines()[0]
    (md,) = (tmp_path / "eval").glob("*/evaluation.md")
    text = md.read_text()
    assert "## U-Nets side by side" in text and "lesion Dice of" in text
    assert "## Side by side" not in text
    # one U-Net alone: its Dice with the interval a reader quotes (RESULTS cites it)
    assert main(["evaluate", "--seg-run", str(seg_run), "--outputs", str(tmp_path)]) == 0
    assert "U-Net, with 95% intervals:" in capsys.readouterr().out
    (one,) = set((tmp_path / "eval").glob("*/evaluation.md")) - {md}
    assert re.search(r"\| 0\.\d{3} \(0\.\d\d\d-[01]\.\d\d\d\) \|", one.read_text())


def test_ground_truth_and_no_mask_ablations_run(work: Path, seg_run: Path) -> None:
    for masks in ("ground_truth", "none"):
        assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
                   "--set", f"model.classifier.masks={masks}",
                   "--set", "training.cls.epochs=1") == 0


def test_predict_skips_unreadable_images_names_them_and_exits_3(
        seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 10: a batch keeps going. The readable scans are predicted; every unreadable
    one is named on stderr (one line each) and in skipped.csv / predictions.json of the output
    folder; the exit code is 3 -- not 0, so a script sees the result set lacks scans."""
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for name in ("benign (1).png", "malignant (1).png"):
        cls = name.split()[0]
        shutil.copy(synth_root / cls / name, inputs / name)
    (inputs / "broken.png").write_bytes(b"not a png")
    (inputs / "empty.jpg").write_bytes(b"")
    (inputs / "notes.txt").write_text("not an image, and not an image's name: ignored")
    common = ["--seg-run", str(seg_run), "--cls-run", str(cls_run)]
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), *common, "--out", str(out)]) == 3
    captured = capsys.readouterr()
    err = captured.err
    assert f"busi: warning: skipped {inputs / 'broken.png'}: cannot decode image" in err, err
    assert f"busi: warning: skipped {inputs / 'empty.jpg'}: empty file (0 bytes)" in err, err
    assert "notes.txt" not in err
    assert f"2 of 4 image(s) skipped as unreadable, each named above and in {out / 'skipped.csv'}" \
        f"; exit code 3 -- fix:" in err
    assert "2 image(s) predicted" in captured.out and "skipped.csv" in captured.out
    with open(out / "skipped.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    assert [(r["file"], r["reason"].split(" (")[0]) for r in listed] == [
        (str(inputs / "broken.png"), "cannot decode image"),
        (str(inputs / "empty.jpg"), "empty file")]
    result = json.loads((out / "predictions.json").read_text())
    assert [r["file"] for r in result["skipped"]] == [r["file"] for r in listed]
    assert [Path(p["file"]).name for p in result["predictions"]] == ["benign (1).png",
                                                                     "malignant (1).png"]
    p = result["predictions"][0]
    assert p["pred"] in ("benign", "malignant", "normal")
    assert sum(p[f"p_{c}"] for c in ("benign", "malignant", "normal")) == pytest.approx(1, abs=1e-3)
    assert (out / "benign_(1)_mask.png").is_file() and (out / "benign_(1)_overlay.png").is_file()
    assert not list(out.glob("broken*")) and not list(out.glob("empty*"))
    with open(out / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2
    # Explicit files are a batch too (a shell glob): the readable one is predicted.
    out2 = tmp_path / "pred2"
    assert main(["predict", str(inputs / "benign (1).png"), str(inputs / "broken.png"),
                 *common, "--out", str(out2)]) == 3
    assert json.loads((out2 / "predictions.json").read_text())["skipped"][0]["file"] == \
        str(inputs / "broken.png")
    capsys.readouterr()
    # All read: exit 0, no skipped.csv, an empty list in the JSON.
    (inputs / "broken.png").unlink()
    (inputs / "empty.jpg").unlink()
    out3 = tmp_path / "pred3"
    assert main(["predict", str(inputs), *common, "--out", str(out3)]) == 0
    assert not (out3 / "skipped.csv").exists()
    assert json.loads((out3 / "predictions.json").read_text())["skipped"] == []
    assert "skipped" not in capsys.readouterr().err


def test_predict_with_no_readable_input_exits_2_naming_them_and_writes_nothing(
        seg_run: Path, cls_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 16 / 10: one unreadable file alone, or a folder of only unreadable ones,
    is exit 2 and one message naming them, before any model is loaded or output written;
    so is a path that does not exist."""
    inputs = tmp_path / "scans"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"not a png")
    (inputs / "empty.png").write_bytes(b"")
    common = ["--seg-run", str(seg_run), "--cls-run", str(cls_run)]
    out = tmp_path / "pred"
    for argv, n in (([str(inputs)], 2), ([str(inputs / "broken.png")], 1)):
        assert main(["predict", *argv, *common, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{inputs / 'broken.png'}: cannot decode image" in err, err
        assert f"nothing predicted ({n} of {n} image(s) cannot be read)" in err
        assert "fix:" in err and len(err.strip().splitlines()) == 1
        assert not out.exists(), "nothing written"
    assert main(["predict", str(inputs / "gone.png"), *common, "--out", str(out)]) == 2
    assert "gone.png: not found" in capsys.readouterr().err
    assert not out.exists()


def test_predict_flags_unsure_calls_names_its_runs_and_states_units(
        seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 16: per image, "no lesion found by the segmenter" and calls under the
    threshold of the config (predict.min_confidence) are flagged in the CSV, the JSON and the
    summary; the runs used are named; units stated; research tool, not a diagnostic device."""
    import yaml

    import busi.models.masks

    image = str(synth_root / "benign" / "benign (1).png")
    common = ["--seg-run", str(seg_run), "--cls-run", str(cls_run)]
    assert main(["predict", image, *common, "--min-confidence", "0",
                 "--out", str(tmp_path / "p0")]) == 0
    out = capsys.readouterr().out
    assert "research tool, not a diagnostic device" in out
    assert f"runs: classifier {cls_run}; U-Net {seg_run}" in out
    with open(tmp_path / "p0" / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["cls_run"] == str(cls_run) and row["seg_run"] == str(seg_run)
    assert row["lesion_pixels_grid"] == "32x32"
    assert float(row["lesion_fraction"]) == pytest.approx(int(row["lesion_pixels"]) / 32 ** 2)
    assert "low_confidence" not in row["flags"]
    assert row["flags"] == ("no_lesion_found" if int(row["unet_lesion_pixels"]) == 0 else "")
    # the mask written is the U-Net's, emptied where the chosen point calls the scan normal
    assert int(row["lesion_pixels"]) == (0 if row["call"] == "normal"
                                         else int(row["unet_lesion_pixels"]))
    saved = json.loads((tmp_path / "p0" / "predictions.json").read_text())
    assert "not a diagnostic device" in saved["note"] and "32x32" in saved["units"]["lesion_pixels"]
    # A U-Net that finds nothing, and a classifier run whose config asks for certainty.
    monkeypatch.setattr(busi.models.masks, "predict_probs",
                        lambda unets, x, flip_tta=False: np.zeros(x.shape[:3], np.float32))
    strict = _copy_run(cls_run, tmp_path / "strict")
    cfg = yaml.safe_load((strict / "config.yaml").read_text())
    cfg["predict"] = {"min_confidence": 1.0}
    (strict / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", image, "--seg-run", str(seg_run), "--cls-run", str(strict),
                 "--out", str(tmp_path / "p1")]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "p1" / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["flags"] == "no_lesion_found;low_confidence" and row["lesion_pixels"] == "0"
    assert "1 image(s) predicted, 1 flagged (no lesion found by the segmenter: 1; " \
        "low confidence, top probability < 1: 1)" in out
    assert json.loads((tmp_path / "p1" / "predictions.json").read_text())["min_confidence"] == 1


def test_predict_gives_the_mask_the_segmentation_run_scored(
        work: Path, seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path) -> None:
    """Same preprocessing and mask rule as training: predict == what evaluate measured."""
    import cv2

    from busi.models.masks import load_masks

    stored = load_masks(seg_run)
    scored = sorted(json.loads((seg_run / "test_scores.json").read_text()))[:3]
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for f in scored:
        shutil.copy(synth_root / f, inputs / Path(f).name)
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), "--seg-run", str(seg_run), "--cls-run", str(cls_run),
                 "--out", str(out)]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(fh)}
    for f in scored:
        row = rows[Path(f).name]
        # what the U-Net drew is what evaluate scored, pixel for pixel
        assert int(row["unet_lesion_pixels"]) == int(stored[f].sum())
        full = cv2.imread(str(out / (Path(f).stem.replace(" ", "_") + "_mask.png")), 0)
        small = cv2.resize(full, stored[f].shape[::-1], interpolation=cv2.INTER_NEAREST)
        # the mask written: that one, or empty where the chosen point calls the scan normal
        np.testing.assert_array_equal(small > 0, (stored[f] > 0) & (row["call"] != "normal"))


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

    from busi.data.loading import resize_image
    from busi.models.masks import load_masks, load_unets, predict_probs

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
    # the validation images are outside the out-of-fold pool: no member trained on them, so
    # they get the ensemble's average too, and the threshold is tuned on exactly those
    # averaged probabilities -- the kind it is then applied to
    split = json.loads((run_dir / "split.json").read_text())
    val = read_manifest(split["manifest"]).partition(split["fold"])["val"]
    assert {source[f] for f in val} == {"ensemble"}
    assert {s for f, s in source.items() if f not in test and f not in val} == {"oof0", "oof1"}
    from busi.data.loading import load_dataset
    from busi.evaluation.segmentation import tune_threshold

    ds = load_dataset(synth_root, size=(32, 32), cache_dir=work / "cache")
    vi = ds.index(val)
    val_probs = z["probs"][[files.index(f) for f in val]].astype(np.float32) / 255
    assert float(z["threshold"]) == pytest.approx(
        tune_threshold(ds.masks[vi], val_probs, postprocess="largest_component"))
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
    with open(out / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    # the ensemble's mask, emptied only where the chosen point calls the scan normal
    np.testing.assert_array_equal(
        small > 0, (load_masks(run_dir)[test[0]] > 0) & (row["call"] != "normal"))
    assert int(row["unet_lesion_pixels"]) == int(load_masks(run_dir)[test[0]].sum())


def test_a_run_killed_among_its_out_of_fold_unets_resumes_without_retraining(
        work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final U-Net stopped early; Ctrl-C in the second fold's first epoch. The resume
    must keep the final U-Net and fold 0 as they are and finish fold 1 once."""
    from busi.training import loop as train

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
        work: Path, seg_run: Path, cls_run: Path, unseen_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another site's images, as a CSV manifest with no normal images and one unmasked image:
    scans the runs never saw (their own training set is refused as another site)."""
    rows = ["image,mask,label"]
    for k in range(1, 5):
        for c in ("benign", "malignant"):
            mask = f"{c}/{c} ({k})_mask.png" if k > 1 else ""
            rows.append(f"{c}/{c} ({k}).png,{mask},{c}")
    manifest = unseen_root / "other_site.csv"
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
    assert report["present"] == ["benign", "malignant"], "macro averages: classes in the data"
    assert report["report"]["macro avg"]["support"] == 8
    assert "Dice" in capsys.readouterr().out
    # busi issue 16: no row for the class the data lacks, no training epochs, the site named
    # with its folder, its own ROC curve and failure gallery
    assert report["labels"] == ["benign", "malignant"] and len(report["confusion_matrix"]) == 2
    assert "Normal" not in (out / "classification_report.md").read_text()
    assert "best_epoch" not in seg
    md = (out / "evaluation.md").read_text()
    assert f"## {unseen_root.name}/other_site.csv" in md and "best epoch" not in md
    overlap = json.loads((out / "evaluation.json").read_text())["training_overlap"]
    assert overlap["checked"] and overlap["images"] == 0 and overlap["shared_patients"] == 0
    assert "Unseen by the runs: none of its 8 images" in md
    assert "| internal test split (the runs' own) |" in md
    assert list(out.glob("roc_*other_site.csv.png"))
    assert list(out.glob("failures_*.png"))
    # each call joined to its mask, and the summary's count of lesions the U-Net missed
    with open(out / "per_image.csv") as fh:
        joined = list(csv.DictReader(fh))
    assert len(joined) == 8 and sum(r["true_lesion_px"] != "0" for r in joined) == 6
    missed = sum(r["unet_missed"] == "1" for r in joined)
    assert f"| Lesion images the U-Net missed (empty predicted mask) | {missed} of 6 |" in md


def test_evaluate_on_data_with_an_unknown_class_folder_is_a_clear_error(
        work: Path, cls_run: Path, seg_run: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    (other / "cancer").mkdir(parents=True)
    assert main(["evaluate", "--data", str(other), "--cls-run", str(cls_run),
                 "--seg-run", str(seg_run), "--outputs", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cancer" in err and "fix:" in err


def _site_manifest(root: Path, out: Path, per_class: int = 6, normal: bool = True,
                   patients: int | None = None) -> Path:
    """A second site's CSV manifest (absolute paths) over the synthetic images; image i of
    each class belongs to patient P<i mod patients> when ``patients`` is given."""
    rows = ["image,mask,label" + (",patient" if patients else "")]
    for c in ("benign", "malignant", *(("normal",) if normal else ())):
        for i in range(1, per_class + 1):
            masks = ";".join(str(m) for m in sorted((root / c).glob(f"{c} ({i})_mask*.png")))
            rows.append(f"{root / c / f'{c} ({i}).png'},{masks if c != 'normal' else ''},{c}"
                        + (f",P{i % patients}" if patients else ""))
    out.write_text("\n".join(rows) + "\n")
    return out


def test_evaluate_on_a_second_site_resamples_its_patients(
        cls_run: Path, unseen_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 13: lesion Dice, normal scans predicted empty, benign/malignant AUC and
    per-class recall of another hospital's scans, each with an interval over its patients."""
    from sklearn.metrics import roc_auc_score

    manifest = _site_manifest(unseen_root, tmp_path / "site.csv", patients=4)
    assert main(["evaluate", "--data", str(manifest), "--cls-run", str(cls_run),
                 "--outputs", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    (out,) = (tmp_path / "o" / "eval").iterdir()
    record = json.loads((out / "evaluation.json").read_text())
    assert record["resampled"]["unit"] == "patients" and record["resampled"]["n"] == 4
    seg = record["segmentation"]
    assert seg == json.loads((out / "segmentation.json").read_text())
    iv = seg["intervals"]
    assert (iv["n_units"], iv["n_lesion_images"], iv["n_lesion_free_images"]) == (4, 12, 6)
    for key in ("dice", "iou", "hd95_all", "fraction_predicted_empty"):
        assert len(iv["ci95"][key]) == 2, key
    lo, hi = iv["ci95"]["dice"]
    assert lo <= seg["lesion_images"]["dice"]["mean"] <= hi
    cls = record["classification"]
    assert "the 4 patients (18 images" in cls["ci95_method"]
    assert set(cls["ci95"]["recall"]) == {"benign", "malignant", "normal"}
    with open(out / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["true"] != "normal"]
    pb, pm = (np.array([float(r[f"p_{c}"]) for r in rows]) for c in ("benign", "malignant"))
    auc = cls["benign_malignant_auc"]
    assert auc["auc"] == pytest.approx(roc_auc_score([r["true"] == "malignant" for r in rows],
                                                     pm / (pb + pm)))
    assert auc["n_images"] == 12 and auc["n_units"] == 4 and len(auc["ci95"]) == 2
    report = (out / "evaluation.md").read_text()
    for text in ("of 4 patients", "Normal scans predicted empty", "Lesion Dice",
                 "Benign vs malignant ROC AUC", "Recall (95% CI)", "4 patients"):
        assert text in report and text in printed, text


def test_evaluate_on_data_with_only_a_seg_run_measures_the_unet_alone(
        seg_run: Path, unseen_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A user who trained only a U-Net measures it on another site; the data here has no
    normal images and no patient column (near-duplicate groups stand in, and it says so)."""
    manifest = _site_manifest(unseen_root, tmp_path / "site.csv", normal=False)
    assert main(["evaluate", "--data", str(manifest), "--seg-run", str(seg_run),
                 "--outputs", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    (out,) = (tmp_path / "o" / "eval").iterdir()
    assert not (out / "predictions.csv").exists()
    assert not (out / "classification_report.json").exists()
    record = json.loads((out / "evaluation.json").read_text())
    assert record["classification"] is None and record["cls_run"] is None
    assert record["resampled"]["unit"] == "duplicate groups"
    iv = record["segmentation"]["intervals"]
    assert iv["n_lesion_images"] == 12 and iv["ci95"]["fraction_predicted_empty"] is None
    report = (out / "evaluation.md").read_text()
    assert "Classifier run: none (segmentation only)" in report
    assert "site.csv has no patient column" in report and "Lesion Dice" in report
    assert "predicted empty" not in report and "Precision" not in report
    assert "segmentation only" in printed and "Lesion Dice" in printed
    # a blank patient cell is a clear error, and no evaluation folder is left behind
    lines = _site_manifest(unseen_root, tmp_path / "p.csv", patients=3).read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    assert main(["evaluate", "--data", str(tmp_path / "p.csv"), "--seg-run", str(seg_run),
                 "--outputs", str(tmp_path / "o2")]) == 2
    assert "p.csv, line 4: empty patient cell" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_evaluate_on_several_sites_puts_them_side_by_side(
        cls_run: Path, seg_run: Path, unseen_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 16: repeated --data writes one folder and one table, the sites next to the
    classifier run's own test figures, each site with its ROC curve and failure gallery."""
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-b").mkdir()
    a = _site_manifest(unseen_root, tmp_path / "site-a" / "manifest.csv", patients=4)
    b = _site_manifest(unseen_root, tmp_path / "site-b" / "manifest.csv", normal=False,
                       patients=3)
    assert main(["evaluate", "--data", str(a), "--data", str(b), "--cls-run", str(cls_run),
                 "--outputs", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    (out,) = (tmp_path / "o" / "eval").iterdir()
    record = json.loads((out / "evaluation.json").read_text())
    assert [s["site"] for s in record["sites"]] == ["site-a/manifest.csv", "site-b/manifest.csv"]
    own = json.loads((cls_run / "classification_report.json").read_text())
    assert record["internal"]["classification"]["accuracy"] == pytest.approx(own["accuracy"])
    assert [s["classification"]["n"] for s in record["sites"]] == [18, 12]
    md = (out / "evaluation.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    internal = next(line for line in table if line.startswith("| internal test split"))
    assert f"{own['accuracy']:.3f}" in internal and f"{own['n']} / " in internal
    rows = {line.split(" | ")[0][2:]: line for line in table}
    assert "18 / 4 patients" in rows["site-a/manifest.csv"]
    assert "12 / 3 patients" in rows["site-b/manifest.csv"]
    assert "not in data" in rows["site-b/manifest.csv"], "no normal scans at site b"
    for name in ("site-a/manifest.csv", "site-b/manifest.csv"):
        assert f"## {name}" in md and name in printed
    assert "best epoch" not in md
    site_b = out / "site-b__manifest.csv"
    with open(site_b / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 12
    assert "Normal" not in (site_b / "classification_report.md").read_text()
    for site in ("site-a__manifest.csv", "site-b__manifest.csv"):
        assert (out / site / f"roc_{site}.png").is_file(), site
        assert (out / site / f"failures_{site}.png").is_file(), site
        assert "best_epoch" not in json.loads((out / site / "segmentation.json").read_text())
    assert (out / "report.html").is_file()
    # the U-Net alone on several sites; a missing site fails before anything is written
    assert main(["evaluate", "--data", str(a), "--data", str(b), "--seg-run", str(seg_run),
                 "--outputs", str(tmp_path / "s")]) == 0
    (out,) = (tmp_path / "s" / "eval").iterdir()
    record = json.loads((out / "evaluation.json").read_text())
    assert [s["segmentation"]["intervals"]["n_lesion_images"] for s in record["sites"]] == [12, 12]
    assert record["internal"]["dice"] == pytest.approx(
        json.loads((seg_run / "metrics.json").read_text())["lesion_images"]["dice"]["mean"])
    assert list((out / "site-b__manifest.csv").glob("failures_*.png"))
    assert main(["evaluate", "--data", str(a), "--data", str(tmp_path / "nope.csv"),
                 "--seg-run", str(seg_run), "--outputs", str(tmp_path / "bad")]) == 2
    assert "nope.csv" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_evaluate_refuses_the_runs_own_training_images_as_another_site(
        seg_run: Path, cls_run: Path, synth_root: Path, unseen_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue: `evaluate --data` never compared a site with the runs' training and
    validation images, so the training data itself came out as a new hospital. The same
    pixels and a pHash near duplicate (a re-exported scan) are both caught: exit 2 with the
    counts, nothing written; --allow-overlap evaluates, loudly, the counts in the report."""
    import cv2

    split = json.loads((cls_run / "split.json").read_text())
    fitted, n = split["train"] + split["val"], split["train"] + split["val"] + split["test"]
    assert main(["evaluate", "--data", str(synth_root), "--cls-run", str(cls_run),
                 "--outputs", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not another site's data" in err and "Traceback" not in err
    assert (f"{fitted} of its {n} images are training or validation images of the runs "
            f"({fitted} with the same pixels, 0 near duplicates within pHash distance 6)") in err
    assert "--allow-overlap" in err and not (tmp_path / "o").exists()
    # another site's scans with one training scan as it is and one re-exported brighter
    train = [f for f in read_manifest(split["manifest"]).partition(split["fold"])["train"]
             if not f.startswith("normal/")][:2]
    site = _site_manifest(unseen_root, tmp_path / "mixed.csv", per_class=3, normal=False)
    image = cv2.imread(str(synth_root / train[1]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "resaved.png"), np.clip(image.astype(int) + 4, 0, 255
                                                        ).astype(np.uint8))
    rows = []
    for f, image_path in ((train[0], synth_root / train[0]), (train[1], tmp_path / "resaved.png")):
        masks = sorted((synth_root / f).parent.glob(f"{Path(f).stem}_mask*.png"))
        rows.append(f"{image_path},{';'.join(map(str, masks))},{f.split('/')[0]}")
    site.write_text(site.read_text() + "\n".join(rows) + "\n")
    argv = ["evaluate", "--data", str(site), "--seg-run", str(seg_run)]
    assert main([*argv, "--outputs", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert ("2 of its 8 images are training or validation images of the runs (1 with the same "
            "pixels, 1 near duplicates within pHash distance 6)") in err
    assert f"is the training image {train[0]}" in err and not (tmp_path / "m").exists()
    assert main([*argv, "--outputs", str(tmp_path / "m"), "--allow-overlap"]) == 0
    assert "mixed.csv is NOT unseen data: 2 of its 8 images" in capsys.readouterr().err
    (out,) = (tmp_path / "m" / "eval").iterdir()
    overlap = json.loads((out / "evaluation.json").read_text())["training_overlap"]
    assert (overlap["images"], overlap["exact_duplicates"], overlap["near_duplicates"]) == (2, 1, 1)
    assert sorted(twin for _, twin in overlap["examples"]) == sorted(train)
    md = (out / "evaluation.md").read_text()
    assert "**Not unseen data: 2 of its 8 images" in md and "is not unseen data**" in md


def test_seg_eval_measures_a_run_under_other_mask_rules_and_members(
        seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command behind docs/RESULTS.md's validation gains and single-member figures."""
    seg_eval = load_script("seg_eval")
    metrics = json.loads((seg_run / "metrics.json").read_text())
    out = tmp_path / "rows.json"
    # the run's own rule and U-Net on its test images: the run's own test figures
    assert seg_eval.main([str(seg_run), "--part", "test", "--member", "best.keras",
                          "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["dice"] == pytest.approx(metrics["lesion_images"]["dice"]["mean"], abs=0.01)
    assert row["missed"] == metrics["lesion_images"]["hd95_undefined"]
    assert row["threshold"] == pytest.approx(metrics["threshold"])
    # every rule on the validation images, threshold tuned there as train-seg tunes it
    assert seg_eval.main([str(seg_run), "--part", "val", "--variants", "--tune",
                          "--json", str(out)]) == 0
    rows = {(r["flip_tta"], r["postprocess"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(False, "none"), (True, "none"), (False, "largest_component"),
                         (True, "largest_component")}
    assert rows[(True, "largest_component")]["threshold"] == pytest.approx(
        metrics["threshold"]), "the run's rule, tuned on val as train-seg did"
    printed = capsys.readouterr().out
    assert "Dice vs first row" in printed and "command: python scripts/seg_eval.py" in printed
    assert seg_eval.main([str(seg_run), "--member", "nope.keras"]) == 2
    assert "best.keras" in capsys.readouterr().err


# --------------------------------------------------------------------------- issue 11: runs


def _copy_run(src: Path, dst: Path, **state: object) -> Path:
    shutil.copytree(src, dst)
    if state:
        saved = json.loads((dst / "state.json").read_text())
        (dst / "state.json").write_text(json.dumps({**saved, **state}))
    return dst


def test_predict_and_evaluate_pair_a_classifier_with_its_own_unet(
        seg_run: Path, cls_run: Path, synth_root: Path, unseen_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A later U-Net run must not change a classifier's inputs; a run still training is no
    'latest run'; every command says which runs it used."""
    outputs = tmp_path / "outputs"
    newer_unet = _copy_run(seg_run, outputs / "seg" / "99990101-000000")
    mine = _copy_run(cls_run, outputs / "cls" / "cnn" / "20000101-000000")  # names seg_run
    _copy_run(cls_run, outputs / "cls" / "mobilenet" / "99990101-000000", finished=False)
    monkeypatch.chdir(tmp_path)
    image = str(synth_root / "benign" / "benign (1).png")
    assert main(["predict", image, "--out", str(tmp_path / "p1")]) == 0
    used = json.loads((tmp_path / "p1" / "predictions.json").read_text())
    assert Path(used["cls_run"]).resolve() == mine.resolve(), "not the latest finished run"
    assert Path(used["seg_run"]).resolve() == seg_run.resolve(), "not the classifier's U-Net"
    captured = capsys.readouterr()
    assert f"U-Net run {seg_run} (the classifier's own)" in captured.out
    assert "warning" not in captured.err
    # naming another U-Net is allowed, with a warning
    assert main(["predict", image, "--seg-run", str(newer_unet), "--out",
                 str(tmp_path / "p2")]) == 0
    err = capsys.readouterr().err
    assert "busi: warning:" in err and "not the U-Net run classifier" in err
    # busi evaluate --data: the same default
    assert main(["evaluate", "--data", str(unseen_root), "--cls-run", str(mine),
                 "--outputs", str(outputs)]) == 0
    (report,) = (outputs / "eval").glob("*/evaluation.md")
    assert f"segmentation run: {seg_run};" in report.read_text()
    assert "a BUSI-layout folder names no patients, so near-duplicate groups" in \
        report.read_text()


def _change_one_image(root: Path) -> None:
    import cv2

    path = root / "benign" / "benign (1).png"
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    img[0, :] = 255 - img[0, :]
    cv2.imwrite(str(path), img)


def test_train_cls_refuses_a_unet_of_other_data_or_image_size(
        work: Path, seg_run: Path, data_copy: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out_root = tmp_path / "o"
    _change_one_image(data_copy)  # same file names, other bytes
    assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
               "--data", str(data_copy), "--set", f"outputs.root={out_root}") == 2
    err = capsys.readouterr().err
    assert f"{seg_run}: this segmentation run used other data than {data_copy}" in err
    assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
               "--set", "data.image_size=[48, 48]", "--set", f"outputs.root={out_root}") == 2
    assert "used 32x32 images, not 48x48" in capsys.readouterr().err
    assert not (out_root / "cls").exists(), "no run folder for a refused run"


def test_rerun_of_a_classifier_on_changed_data_is_refused(
        cls_run: Path, data_copy: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    copy = _copy_run(cls_run, tmp_path / "runs" / "cls" / "cnn" / cls_run.name)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["root"], cfg["outputs"]["root"] = str(data_copy), str(tmp_path / "new")
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    _change_one_image(data_copy)
    assert main(["rerun", str(copy)]) == 2
    assert "this run used other data" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_wrong_or_incomplete_run_folder_is_one_clear_error(
        work: Path, seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each command that takes a run folder: exit 2, one line naming the folder, what it is
    instead of what was expected, and no half-made output."""
    no_split = _copy_run(seg_run, tmp_path / "no-split")
    (no_split / "split.json").unlink()
    corrupt = _copy_run(seg_run, tmp_path / "corrupt")
    (corrupt / "split.json").write_text('{"manifest": ')
    out_root = tmp_path / "o"
    image = str(synth_root / "benign" / "benign (1).png")
    cases = [
        (["train-cls", "--config", str(work / "tiny.yaml"), "--seg-run", str(no_split),
          "--set", f"outputs.root={out_root}"], no_split,
         "not a segmentation (U-Net) run (split.json missing)"),
        (["train-cls", "--config", str(work / "tiny.yaml"), "--seg-run", str(cls_run),
          "--set", f"outputs.root={out_root}"], cls_run,
         "this is a classifier run, not a segmentation (U-Net) run"),
        (["train-seg", "--resume", str(cls_run)], cls_run, "this is a classifier run"),
        (["train-cls", "--resume", str(seg_run)], seg_run, "this is a segmentation (U-Net) run"),
        (["predict", image, "--cls-run", str(seg_run), "--out", str(tmp_path / "p")], seg_run,
         "not a classifier run"),
        (["evaluate", str(seg_run), "--outputs", str(out_root)], seg_run,
         "this is a segmentation (U-Net) run, not a classifier run"),
        (["evaluate", "--seg-run", str(cls_run), "--outputs", str(out_root)], cls_run,
         "this is a classifier run"),
        (["export", str(corrupt), "--out", str(tmp_path / "e")], corrupt, "not valid JSON"),
        (["rerun", str(corrupt)], corrupt, "not valid JSON"),
        (["report", str(corrupt)], corrupt, "not valid JSON"),
        # busi issue 16: what the folder is, not "did it finish?" or "not a CV run folder"
        (["cv", "--resume", str(seg_run)], seg_run,
         "this is a segmentation (U-Net) run, not a cross-validation run"),
        (["train-cls", "--config", str(work / "tiny.yaml"), "--seg-run", str(seg_run.parent),
          "--set", f"outputs.root={out_root}"], seg_run.parent,
         "this is a folder of runs, not a segmentation (U-Net) run"),
        (["export", str(cls_run.parent), "--out", str(tmp_path / "e")], cls_run.parent,
         "this is a folder of runs, not a run"),
    ]
    for argv, folder, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and str(folder) in err and "fix:" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
    assert not out_root.exists() and not (tmp_path / "p").exists()
    assert not (tmp_path / "e").exists()
    from busi.errors import BusiError
    from busi.models.masks import read_rule

    with pytest.raises(BusiError, match="this is a classifier run, not a segmentation"):
        read_rule(cls_run)  # scripts/seg_eval.py CLS_RUN said "no masks.npz (did it finish?)"


def test_runs_lists_each_run_with_its_status_and_headline_figures(
        seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 16: `busi runs` -- kind, model, finished or not, data, headline figures and
    the folder of every run under an outputs root, oldest first."""
    outputs = tmp_path / "outputs"
    _copy_run(seg_run, outputs / "seg" / seg_run.name)
    _copy_run(cls_run, outputs / "cls" / "cnn" / cls_run.name)
    _copy_run(cls_run, outputs / "cls" / "cnn" / "99990101-000000-cut", finished=False)
    assert main(["runs", "--outputs", str(outputs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["run", "kind", "model", "status", "headline", "figures", "data"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", x) for x in lines[2:])}
    assert list(rows) == [f"seg/{seg_run.name}", f"cls/cnn/{cls_run.name}",
                          "cls/cnn/99990101-000000-cut"], lines
    dice = json.loads((seg_run / "metrics.json").read_text())["lesion_images"]["dice"]["mean"]
    assert rows[f"seg/{seg_run.name}"] == ["seg", "unet", "finished, 2 epochs",
                                           f"test lesion Dice {dice:.3f}", str(synth_root)]
    rep = json.loads((cls_run / "classification_report.json").read_text())
    assert rows[f"cls/cnn/{cls_run.name}"] == [
        "cls", "cnn", "finished, 2 epochs",
        f"accuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}, malignant recall "
        f"{rep['report']['malignant']['recall']:.2f}", str(synth_root)]
    assert rows["cls/cnn/99990101-000000-cut"][2:4] == ["not finished (2 epochs done)", "-"]
    assert main(["runs", "--outputs", str(outputs), "--kind", "seg"]) == 0
    assert "cls/cnn" not in capsys.readouterr().out
    assert main(["runs", "--outputs", str(tmp_path / "nothing")]) == 2
    assert "outputs folder not found" in capsys.readouterr().err


def test_an_old_unet_run_is_not_refused_and_a_bad_weights_file_leaves_no_run_folder(
        work: Path, seg_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A U-Net run of an older busi has no data fingerprint: not refused, a warning. (Stopped
    by a bad model.classifier.weights file after that check, so nothing is trained.)"""
    old = _copy_run(seg_run, tmp_path / "old-seg")
    split = json.loads((old / "split.json").read_text())
    for key in ("data_fingerprint", "image_size"):
        split.pop(key)
    (old / "split.json").write_text(json.dumps(split))
    weights = tmp_path / "mobilenet.h5"
    weights.write_bytes(b"not an HDF5 file")
    out_root = tmp_path / "o"
    assert run(work, "train-cls", "--model", "mobilenet", "--seg-run", str(old),
               "--set", f"model.classifier.weights={weights}",
               "--set", f"outputs.root={out_root}") == 2
    err = capsys.readouterr().err
    assert f"busi: warning: {old} records no data fingerprint" in err
    assert (f"busi: error: model.classifier.weights: {weights}: the file does not fit the "
            "MobileNet base") in err
    assert not list((out_root / "cls" / "mobilenet").iterdir()), "no half-made run folder"


def test_a_model_file_keras_refuses_or_cannot_read_is_one_clear_error(
        seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import keras

    lam = _copy_run(cls_run, tmp_path / "lambda")
    inp = keras.Input((32, 32, 1))
    keras.Model(inp, keras.layers.Lambda(lambda x: x * 2)(inp)).save(lam / "best.keras")
    cut = _copy_run(cls_run, tmp_path / "truncated")
    blob = (cut / "best.keras").read_bytes()
    (cut / "best.keras").write_bytes(blob[:len(blob) // 2])
    image = str(synth_root / "benign" / "benign (1).png")
    for bad, words in ((lam, "Keras' safe mode does not run"),
                       (cut, "not a .keras model file (not a zip archive")):
        out = tmp_path / f"pred-{bad.name}"
        assert main(["predict", image, "--cls-run", str(bad), "--seg-run", str(seg_run),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{bad / 'best.keras'}: " in err and words in err, err
        assert "Traceback" not in err and not out.exists()
        assert main(["evaluate", "--data", str(synth_root), "--cls-run", str(bad),
                     "--seg-run", str(seg_run), "--outputs", str(tmp_path / "ev")]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "ev" / "eval").exists(), "no half-made evaluation folder"
    assert main(["export", str(cut), "--format", "keras", "--out", str(tmp_path / "e")]) == 2
    assert "not a .keras model file" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_an_evaluation_that_fails_part_way_leaves_no_folder(
        cls_run: Path, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A site that fails after the evaluation folder was made (here: its classification)
    is one clear error, and the half-written folder is gone: outputs/eval/ holds only
    finished evaluations."""
    from busi.errors import BusiError
    from busi.workflows import sites

    def broken(*args: object, **kwargs: object) -> None:
        raise BusiError("this site cannot be evaluated", where="site.csv", fix="none")

    monkeypatch.setattr(sites, "_evaluate_site", broken)
    out = tmp_path / "ev"
    assert main(["evaluate", "--data", str(synth_root), "--cls-run", str(cls_run),
                 "--outputs", str(out), "--allow-overlap"]) == 2
    assert "this site cannot be evaluated" in capsys.readouterr().err
    assert list((out / "eval").iterdir()) == [], "a half-written evaluation folder is left"


# --------------------------------------------------------------------------- issue 11: outputs


def test_predictions_csv_keeps_any_file_name(tmp_path: Path) -> None:
    from busi.errors import BusiError
    from busi.runs import read_predictions, write_predictions

    files = ['benign/a, "b".png', "normal/plain.png", 'malignant/"quoted".png']
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    write_predictions(tmp_path / "p.csv", files, np.array([0, 1, 2]), probs,
                      ("benign", "normal", "malignant"))
    names, true, pred, got, classes = read_predictions(tmp_path / "p.csv")
    assert names == files and true == pred == ["benign", "normal", "malignant"]
    np.testing.assert_allclose(got, probs)
    (tmp_path / "bad.csv").write_text("file,true,pred,p_benign\nx.png,benign,benign,oops\n")
    with pytest.raises(BusiError, match="line 2: a probability is missing or not a number"):
        read_predictions(tmp_path / "bad.csv")


def test_predict_never_overwrites_its_own_outputs_or_a_folder(
        seg_run: Path, cls_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    odd = 'scan, "left".png'
    shutil.copy(synth_root / "benign" / "benign (1).png", a / "x.png")
    shutil.copy(synth_root / "malignant" / "malignant (1).png", b / "x.png")
    shutil.copy(synth_root / "benign" / "benign (2).png", b / odd)
    out = tmp_path / "pred"
    argv = ["predict", str(a), str(b), "--seg-run", str(seg_run), "--cls-run", str(cls_run),
            "--out", str(out)]
    assert main(argv) == 0
    assert f"{b / 'x.png'} has the same name as {a / 'x.png'}; its outputs are named x-2_*" \
        in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*_mask.png")) == \
        ['scan,_"left"_mask.png', "x-2_mask.png", "x_mask.png"]
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["file"], r["output_stem"]) for r in rows] == \
        [(str(a / "x.png"), "x"), (str(b / odd), 'scan,_"left"'), (str(b / "x.png"), "x-2")]
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv) == 2
    assert "--out exists and is not an empty folder" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_train_seg_on_bad_data_stops_before_making_a_run_folder(
        work: Path, data_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (data_copy / "benign" / "benign (2).png").write_bytes(b"")
    out_root = tmp_path / "o"
    assert run(work, "train-seg", "--data", str(data_copy),
               "--set", f"outputs.root={out_root}") == 2
    assert "benign (2).png" in capsys.readouterr().err
    assert not (out_root / "seg").exists(), "no half-made run folder"


def test_lesion_crop_and_the_chosen_operating_point_from_training_to_predict(
        work: Path, seg_run: Path, unseen_root: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 26: a classifier fed the lesion cut from the original scan chooses its
    operating point (lesion presence, malignant threshold for a target sensitivity) on its
    validation images; evaluate reports it beside argmax, --sensitivity picks another, another
    site gets the same thresholds, and predict makes the call with them."""
    out_root = work / "crop"
    assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
               "--set", f"outputs.root={out_root}",
               "--set", "model.classifier.mask_mode=lesion_crop",
               "--set", "decision.presence=both", "--set", "decision.malignant_sensitivity=0.8"
               ) == 0
    out = capsys.readouterr().out
    (cls,) = list((out_root / "cls" / "cnn").iterdir())
    op = json.loads((cls / "operating_point.json").read_text())
    assert op["presence"] == "both" and op["malignant_sensitivity"] == 0.8
    assert op["presence_threshold"] is not None
    with open(cls / "val_predictions.csv", newline="") as fh:
        val = list(csv.DictReader(fh))
    assert val and all(0 <= float(r["unet_max"]) <= 1 for r in val)
    # the threshold is the one that calls >= 80% of the validation cancers malignant
    from busi.models.decision import choose
    probs = np.array([[float(r[f"p_{c}"]) for c in ("benign", "malignant", "normal")]
                      for r in val])
    again = choose(probs, [r["true"] for r in val], ("benign", "malignant", "normal"),
                   np.array([float(r["unet_max"]) for r in val]), malignant_sensitivity=0.8,
                   presence="both", max_missed_lesions=0.03)
    assert again.malignant_threshold == pytest.approx(op["malignant_threshold"])
    assert "at the chosen point" in out and "malignant sensitivity" in out
    report = json.loads((cls / "classification_report.json").read_text())
    assert report["clinical"]["operating_point_values"]["presence"] == "both"
    assert "At the chosen point (target 0.8): sensitivity" in (
        cls / "classification_report.md").read_text()
    # Grad-CAM is drawn over the crop the classifier saw
    assert list((cls / "gradcam").glob("*.png"))
    # --sensitivity: another point, chosen on the same validation images
    assert main(["evaluate", str(cls), "--sensitivity", "1", "--outputs", str(out_root)]) == 0
    out = capsys.readouterr().out
    (ev,) = json.loads((Path(out.split("reports: ")[1].split("/evaluation.md")[0])
                        / "evaluation.json").read_text())
    assert ev["clinical"]["operating_point_values"]["malignant_sensitivity"] == 1
    # --presence: the lesion-presence decision by another score, its threshold chosen on the
    # same validation images (the run's own decision.presence is `both`)
    assert main(["evaluate", str(cls), "--presence", "classifier", "--outputs",
                 str(out_root)]) == 0
    out = capsys.readouterr().out
    (ev,) = json.loads((Path(out.split("reports: ")[1].split("/evaluation.md")[0])
                        / "evaluation.json").read_text())
    point = ev["clinical"]["operating_point_values"]
    lesion = np.array([r["true"] != "normal" for r in val])
    from busi.models.decision import threshold_for_sensitivity
    assert point["presence"] == "classifier"
    assert point["presence_threshold"] == pytest.approx(
        threshold_for_sensitivity(1 - probs[:, 2], lesion, 0.97))
    assert "a lesion when the 1 - p(normal) is >=" in out
    # another site: the run's thresholds, unchanged
    assert main(["evaluate", "--data", str(unseen_root), "--cls-run", str(cls),
                 "--outputs", str(out_root)]) == 0
    out = capsys.readouterr().out
    assert f"malignant when p(malignant) / (p(benign) + p(malignant)) >= " \
        f"{op['malignant_threshold']:.3f}" in out
    with pytest.raises(SystemExit) as bad:  # argparse: one line naming the flag, exit 2
        main(["evaluate", "--data", str(unseen_root), "--cls-run", str(cls),
              "--sensitivity", "0", "--outputs", str(out_root)])
    assert bad.value.code == 2 and "--sensitivity: must be in (0, 1]" in capsys.readouterr().err
    # predict: the call at the chosen point beside the argmax class
    image = str(synth_root / "malignant" / "malignant (1).png")
    assert main(["predict", image, "--cls-run", str(cls), "--out", str(tmp_path / "p"),
                 "--sensitivity", "0.9"]) == 0
    with open(tmp_path / "p" / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["call"] in ("benign", "malignant", "normal")
    saved = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert saved["operating_point"]["malignant_sensitivity"] == 0.9
    assert main(["predict", image, "--cls-run", str(cls), "--out", str(tmp_path / "q"),
                 "--presence", "argmax"]) == 0
    saved = json.loads((tmp_path / "q" / "predictions.json").read_text())
    assert saved["operating_point"]["presence"] == "argmax"
    assert saved["operating_point"]["presence_threshold"] is None


def test_a_unet_run_keeps_a_presence_head_fitted_on_its_training_images(
        seg_run: Path, synth_root: Path) -> None:
    """busi issue 26: train-seg fits the lesion-presence head on the U-Net's training images
    only and keeps it, with every image's score, beside masks.npz."""
    from busi.config import load_config
    from busi.data.loading import dataset_from_config
    from busi.data.split import read_manifest
    from busi.models.presence import HEAD_FILE, PresenceHead, head_scores, pooled_features
    from busi.models.saving import load_model
    from busi.runs import read_split

    scores = head_scores(seg_run)
    cfg = load_config(seg_run / "config.yaml")
    ds = dataset_from_config(cfg)
    assert scores is not None and sorted(scores) == sorted(ds.files)
    split = read_split(seg_run)
    parts = read_manifest(split["manifest"], cfg.split.val_size,
                          cfg.runtime.seed).partition(split["fold"])
    train = ds.index(parts["train"])
    features = pooled_features(load_model(seg_run / "best.keras"), ds.images)
    lesion = np.array([ds.classes[k] != "normal" for k in ds.labels])
    refit = PresenceHead.fit(features[train], lesion[train], cfg.runtime.seed)
    saved = PresenceHead.load(seg_run / HEAD_FILE)
    assert saved.c == refit.c and np.allclose(saved.weights, refit.weights, atol=1e-6)
    assert np.allclose([scores[f] for f in ds.files], refit.score(features), atol=1e-5)


def test_an_older_unet_run_gets_its_presence_head_added(seg_run: Path) -> None:
    """scripts/add_presence_head.py: a U-Net run from before the head gets the same head as
    train-seg would have fitted, as a new file; nothing else in the run changes."""
    import shutil

    from conftest import load_script

    from busi.models.presence import HEAD_FILE, head_scores

    old = seg_run.parent / f"{seg_run.name}-older"
    shutil.copytree(seg_run, old)
    (old / HEAD_FILE).unlink()
    before = {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()}
    assert load_script("add_presence_head").main([str(old)]) == 0
    assert head_scores(old) == pytest.approx(head_scores(seg_run), abs=1e-6)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    shutil.rmtree(old)


def test_lesion_presence_by_the_unets_encoder_head(work: Path, seg_run: Path, synth_root: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 26: a classifier on a U-Net with a presence head records the head's score
    of its validation and test images (unet_head) and can decide presence by it, alone or
    averaged with 1 - p(normal), its threshold chosen on the validation images."""
    from busi.models.decision import threshold_for_sensitivity
    from busi.models.presence import head_scores

    out_root = work / "head"
    assert run(work, "train-cls", "--model", "cnn", "--seg-run", str(seg_run),
               "--set", f"outputs.root={out_root}",
               "--set", "decision.presence=head_classifier") == 0
    capsys.readouterr()
    (cls,) = list((out_root / "cls" / "cnn").iterdir())
    with open(cls / "val_predictions.csv", newline="") as fh:
        val = list(csv.DictReader(fh))
    head = head_scores(seg_run)
    assert all(float(r["unet_head"]) == pytest.approx(head[r["file"]], abs=1e-6) for r in val)
    op = json.loads((cls / "operating_point.json").read_text())
    score = np.array([(1 - float(r["p_normal"]) + float(r["unet_head"])) / 2 for r in val])
    lesion = np.array([r["true"] != "normal" for r in val])
    assert op["presence"] == "head_classifier"
    assert op["presence_threshold"] == pytest.approx(threshold_for_sensitivity(score, lesion,
                                                                               0.97))
    assert main(["evaluate", str(cls), "--presence", "head", "--outputs", str(out_root)]) == 0
    assert "a lesion when the U-Net encoder's presence head is >=" in capsys.readouterr().out
    # at another site: the site's images and the run's own test split (the table's first
    # row) both decided by the head's score
    assert main(["evaluate", "--data", str(synth_root), "--cls-run", str(cls), "--presence",
                 "head_classifier", "--outputs", str(out_root), "--allow-overlap"]) == 0
    assert "presence head" in capsys.readouterr().out
    # new images: the same U-Net pass gives the head's score, and the call uses it
    image = sorted((synth_root / "normal").glob("*.png"))[0]
    out = work / "head-predict"
    assert main(["predict", str(image), "--cls-run", str(cls), "--out", str(out)]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert 0 <= float(row["unet_head"]) <= 1
    lesion = (1 - float(row["p_normal"]) + float(row["unet_head"])) / 2 >= op["presence_threshold"]
    assert (row["call"] != "normal") == lesion
    assert row["call"] != "normal" or int(row["lesion_pixels"]) == 0
    # a classifier run made before its U-Net had the head (no unet_head column) reads the
    # head's scores of its images from the U-Net run, as a CV's tables do
    import shutil

    from busi.evaluation.classification import operating_point

    older = out_root / "cls" / "cnn" / f"{cls.name}-older"
    shutil.copytree(cls, older)
    for name in ("val_predictions.csv", "predictions.csv"):
        with open(older / name, newline="") as fh:
            rows = list(csv.DictReader(fh))
        with open(older / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, [k for k in rows[0] if k != "unet_head"],
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    again = operating_point(older, presence="head_classifier")
    assert again.presence_threshold == pytest.approx(op["presence_threshold"], abs=1e-6)
    assert main(["evaluate", str(older), "--presence", "head", "--outputs", str(out_root)]) == 0
    shutil.rmtree(older)
