"""The U-Net trainer: ``train_segmentation`` fits the U-Net, draws every image's mask (out of
fold for the classifier's training images), tunes the threshold and scores the test split.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from busi import runtime
from busi.config import Config
from busi.data.augment import build_augment, require_engine
from busi.data.batches import Batches
from busi.data.loading import Dataset, dataset_from_config
from busi.data.split import _take_groups, image_groups
from busi.errors import BusiError
from busi.evaluation.segmentation import per_image, summarise, tune_threshold
from busi.models.losses import segmentation_loss, segmentation_metrics
from busi.models.masks import MaskRule, as_stored, predict_probs, save_masks
from busi.models.saving import load_model
from busi.models.unet import unet_from_config
from busi.reporting import plots
from busi.reporting.report import report_after_run
from busi.runs import SEG_DIR, SPLIT, atomic_write, read_split, saved_state, write_json, write_split
from busi.training.loop import (
    check_same_data,
    data_record,
    finish_state,
    fit_stage,
    load_data,
    optimizer,
    restart_fix,
    start_run,
)

keras = runtime.import_keras()


class NoLesionWatch(keras.callbacks.Callback):
    """Warn, once, when the validation Dice has been 0 for ``patience`` epochs in a row.

    A U-Net that calls every pixel background can run for hours looking busy: its loss
    still wiggles and its best checkpoint keeps moving. The paper's MSE U-Net did this on
    BUSI in every run busi made of it (docs/RESULTS.md). Training goes on (it is the
    user's experiment), but the user learns after a few epochs, not at the end.
    ``background`` is the validation MSE of an all-background mask (MSE runs only).
    """

    def __init__(self, patience: int = 5, background: float | None = None) -> None:
        super().__init__()
        self.patience, self.background = patience, background
        self.flat, self.said = 0, False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if "val_dice" not in logs:
            return
        self.flat = self.flat + 1 if float(logs["val_dice"]) <= 1e-6 else 0
        if self.said or self.flat < self.patience:
            return
        self.said = True
        why, cause = "", ""
        if self.background is not None:  # an MSE run
            if "val_loss" in logs:
                why = (f"; val_loss {float(logs['val_loss']):.4f} against "
                       f"{self.background:.4f} for an all-background mask")
            cause = (" An MSE loss through a saturated sigmoid has almost no gradient left: "
                     "busi's runs of the paper's settings on BUSI never left this state.")
        print(f"busi: warning: validation Dice has been 0 for {self.flat} epochs (to epoch "
              f"{epoch + 1}){why}: the U-Net predicts no lesion anywhere.{cause} Training "
              "goes on; Ctrl-C keeps every finished epoch. Settings that learn: "
              "configs/cpu.yaml (BCE+Dice, lr 5e-4, batch 16).", file=sys.stderr)


def _unet(cfg: Config):
    return unet_from_config(cfg.model.unet, cfg.data.image_size)


def _seg_batches(cfg: Config, ds: Dataset, idx: np.ndarray, *, training: bool, seed: int):
    t = cfg.training.seg
    augment = build_augment(cfg.augmentation, tuple(cfg.data.image_size)) if training else None
    return Batches(ds.images[idx], ds.masks[idx], t.batch_size, augment=augment,
                   shuffle=training, seed=seed, steps=t.steps_per_epoch if training else 0,
                   workers=2 if training and augment is not None else 1,
                   shard=runtime.process(), multiple=runtime.batch_multiple())


def fit_unet(cfg: Config, ds: Dataset, train_idx: np.ndarray, val_idx: np.ndarray,
             run_dir: Path, state: dict[str, Any], resume_hint: str):
    """Train (or continue) one U-Net; return the best model, the final state and the time."""
    t = cfg.training.seg
    with runtime.model_scope():
        if state.get("epochs_done"):
            model = load_model(run_dir / "last.keras", fix=restart_fix(run_dir))
        else:
            model = _unet(cfg)
            model.compile(optimizer=optimizer(t.optimizer, t.learning_rate),
                          loss=segmentation_loss(t.loss),
                          metrics=segmentation_metrics(t.threshold))
    train = _seg_batches(cfg, ds, train_idx, training=True, seed=cfg.runtime.seed)
    val = _seg_batches(cfg, ds, val_idx, training=False, seed=0)
    floor = background_loss(t.loss, ds.masks[val_idx])
    watch = NoLesionWatch(background=floor[0] if floor else None)
    final, wall = fit_stage(model, train, val, t, run_dir, state, resume_hint, extra=[watch])
    runtime.end_distribution()
    return load_model(run_dir / "best.keras"), final, wall


def oof_partitions(pool: np.ndarray, groups: np.ndarray, k: int, val_size: float,
                   seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, held-out) image indices of each out-of-fold U-Net.

    Duplicate groups (``groups``, one id per image of the data set) never straddle
    any of the three: a near-duplicate in a fold's validation part would flatter
    the val_loss that picks its checkpoint, and one in its training part would leak
    into the held-out masks that stand in for test-time masks.
    """
    from sklearn.model_selection import GroupKFold

    out = []
    for fold, (fit_part, held_part) in enumerate(
            GroupKFold(n_splits=k).split(pool, groups=groups[pool])):
        fit = pool[fit_part]
        train, val = _take_groups(fit, groups, np.zeros(len(groups), np.int64), val_size,
                                  seed + fold, False)
        if not len(val):  # every group larger than the share asked: take the smallest one
            sizes = {g: int((groups[fit] == g).sum()) for g in np.unique(groups[fit])}
            smallest = min(sizes, key=sizes.get)
            val, train = fit[groups[fit] == smallest], fit[groups[fit] != smallest]
        out.append((train, val, pool[held_part]))
    return out


def _out_of_fold(cfg: Config, ds: Dataset, pool: np.ndarray, run_dir: Path, k: int,
                 probs: np.ndarray, source: np.ndarray, resume_hint: str,
                 ) -> tuple[list, list[float]]:
    """Replace the masks of ``pool`` images by those of k U-Nets that never saw them.

    A classifier trained on masks the U-Net drew for its own training images sees
    cleaner masks than it will at test time; out-of-fold masks are as imperfect
    as test masks. Folds, and each fold's validation part, keep duplicate groups
    together, as the split does. Returns the k U-Nets (a fold ensemble reuses them) and
    the training seconds of each (every session of it: ``train_seconds`` in its own
    ``oof/fold<k>/state.json``). On ``--resume``, finished folds are loaded and an
    interrupted one continues.
    """
    groups = image_groups(ds, cfg.split)  # what the split keeps together
    models, seconds = [], []
    for fold, (train, val, held) in enumerate(
            oof_partitions(pool, groups, k, cfg.split.val_size, cfg.runtime.seed)):
        sub = run_dir / "oof" / f"fold{fold}"
        sub.mkdir(parents=True, exist_ok=True)
        print(f"out-of-fold masks: fold {fold + 1}/{k} ({len(held)} images held out)")
        model, _, wall = fit_unet(cfg, ds, train, val, sub, saved_state(sub), resume_hint)
        seconds.append(wall)
        probs[held] = as_stored(predict_probs(model, ds.images[held],
                                              flip_tta=cfg.training.seg.flip_tta))
        source[held] = f"oof{fold}"
        models.append(model)
    return models, seconds


def training_seconds(final: float, out_of_fold: list[float]) -> dict[str, Any]:
    """A U-Net run's training time, for metrics.json and state.json: every U-Net the run
    trained -- the final one and each out-of-fold one, each over all of its sessions --
    in ``train_seconds``, with the breakdown beside it (``train_seconds_final``,
    ``train_seconds_out_of_fold``: one entry per out-of-fold U-Net, empty without them)."""
    return {"train_seconds": round(final + sum(out_of_fold), 1),
            "train_seconds_final": round(final, 1),
            "train_seconds_out_of_fold": [round(s, 1) for s in out_of_fold]}


def write_presence_head(run_dir: Path, model, ds: Dataset, train_idx: np.ndarray,
                        seed: int) -> Path | None:
    """Fit the lesion-presence head on the U-Net's training images (models/presence.py) and
    keep it, with every image's score, in the run's presence_head.npz. Data without normal
    (or without lesion) training images gives no head, said, not a failed run."""
    from busi.models.presence import HEAD_FILE, fit_for_run

    lesion = np.array([ds.classes[k] != "normal" for k in ds.labels])
    try:
        head, scores = fit_for_run(model, ds.images, lesion, train_idx, seed)
    except BusiError as exc:
        print(f"busi: no lesion-presence head for this U-Net: {exc.args[0]}", file=sys.stderr)
        return None
    return head.save(run_dir / HEAD_FILE, ds.files, scores)


def add_presence_head(seg_run: str | Path) -> Path | None:
    """Fit the presence head of a finished U-Net run made before busi fitted one, from the
    run's own config, data, split and best checkpoint; a new file in the run, nothing else
    touched. A run that has one keeps it."""
    from busi.data.split import read_manifest
    from busi.models.presence import HEAD_FILE
    from busi.runs import read_config, require_run

    seg_run = require_run(str(seg_run), "seg", option="a U-Net run")
    if (seg_run / HEAD_FILE).is_file():
        return seg_run / HEAD_FILE
    cfg = read_config(seg_run)
    ds = dataset_from_config(cfg)
    split = read_split(seg_run)
    check_same_data(split, ds, cfg.data.image_size, where=str(seg_run))
    parts = read_manifest(split["manifest"], cfg.split.val_size,
                          cfg.runtime.seed).partition(split.get("fold"))
    model = load_model(seg_run / "best.keras")
    return write_presence_head(seg_run, model, ds, ds.index(parts["train"]), cfg.runtime.seed)


def background_loss(loss: str, val_masks: np.ndarray) -> tuple[float, str] | None:
    """The validation MSE of a U-Net that calls every pixel background (the mean of the 0/1
    masks), drawn on the loss curve: the paper's MSE U-Net can settle exactly there."""
    if loss != "mse" or not len(val_masks):
        return None
    return float((val_masks > 0).mean()), "val MSE of an all-background mask"


def train_segmentation(cfg: Config, *, resume: str | None = None,
                       config_source: str | None = None, fold: int | None = None) -> Path:
    """Train the U-Net on the manifest's train part, evaluate on its test part.

    Writes to a new ``outputs/seg/<run>/``: config.yaml, split.json, best.keras,
    last.keras, history.csv, loss_curve.png, metrics.json/.md, overlays/, and
    masks.npz (the predicted mask of every image, which ``train-cls`` reads).
    """
    require_engine(cfg.augmentation)  # a resumed run's config is the one passed in
    if resume:  # the run's own config decides the data; nothing is written before the checks
        cfg, run_dir, state = start_run(cfg, SEG_DIR, resume, config_source)
        ds, manifest = load_data(cfg)
        saved = read_split(run_dir) if (run_dir / SPLIT).is_file() else {}
        if saved:  # keep the run's fold, on the same data
            check_same_data(saved, ds, cfg.data.image_size, where=str(run_dir))
            fold = saved.get("fold") if fold is None else fold
    else:  # bad data or an impossible split stops here, before a run folder exists
        ds, manifest = load_data(cfg)
    parts = manifest.partition(fold)
    idx = {k: ds.index(v) for k, v in parts.items()}
    if not len(idx["val"]):
        raise BusiError("the split has no validation images", where="split.val_size",
                        fix="set split.val_size > 0 (e.g. 0.1)")
    if not resume:
        cfg, run_dir, state = start_run(cfg, SEG_DIR, resume, config_source)
    precision = runtime.setup(cfg.runtime.seed, cfg.runtime.precision, cfg.runtime.deterministic)
    write_split(run_dir, {"manifest": str(manifest.path), "fold": fold,
                          **{k: len(v) for k, v in idx.items()}, **data_record(ds, cfg)})
    print(f"busi train-seg: run {run_dir}\n  data {ds.location}: train {len(idx['train'])}, "
          f"val {len(idx['val'])}, test {len(idx['test'])} (manifest {manifest.path}); "
          f"precision {precision}{'' if resume else runtime.precision_hint(precision)}")

    t = cfg.training.seg
    hint = f"busi train-seg --resume {run_dir}"
    model, final, wall = fit_unet(cfg, ds, idx["train"], idx["val"], run_dir, state, hint)

    probs = as_stored(predict_probs(model, ds.images, flip_tta=t.flip_tta))
    source = np.array(["final"] * len(ds), dtype=object)
    # The threshold is tuned on probabilities of the kind it is applied to, from images
    # that no U-Net behind them trained on: the final U-Net's validation images. With a
    # fold ensemble the out-of-fold U-Nets train inside the train part only, so the
    # validation images are unseen by every member and get the ensemble's average, as
    # the test split and new images do.
    tune_idx = idx["val"]
    tune_probs = probs[tune_idx]  # a copy, taken before out-of-fold masks replace them
    members = ["best.keras"]
    oof_seconds: list[float] = []
    if t.out_of_fold_masks > 1:
        pool = idx["train"] if t.fold_ensemble else np.concatenate([idx["train"], idx["val"]])
        folds, oof_seconds = _out_of_fold(cfg, ds, pool, run_dir, t.out_of_fold_masks, probs,
                                          source, hint)
        if t.fold_ensemble:
            # nnU-Net's practice: images outside the pool (validation, test, new images)
            # get the average of the final U-Net and the fold U-Nets.
            rest = np.setdiff1d(np.arange(len(ds)), pool)
            probs[rest] = as_stored(predict_probs([model, *folds], ds.images[rest],
                                                  flip_tta=t.flip_tta))
            source[rest] = "ensemble"
            members += [f"oof/fold{k}/best.keras" for k in range(len(folds))]
            tune_probs = probs[tune_idx]
    threshold = (tune_threshold(ds.masks[tune_idx], tune_probs, postprocess=t.postprocess)
                 if t.tune_threshold else t.threshold)
    rule = MaskRule(threshold, t.postprocess)
    scores = per_image(ds.masks[idx["test"]], rule.apply(probs[idx["test"]]), 0.5)
    summary = summarise(scores, ds.labels[idx["test"]], ds.classes)
    seconds = training_seconds(wall, oof_seconds)  # every U-Net this run trained
    summary.update({"threshold": threshold, "postprocess": t.postprocess,
                    "flip_tta": t.flip_tta, "best_epoch": final.get("best_epoch", -1) + 1,
                    "epochs_done": final.get("epochs_done"), **seconds,
                    "n_test": int(len(idx["test"])), "unets": len(members)})
    write_json(run_dir / "metrics.json", summary)
    atomic_write(run_dir / "metrics.md", plots.segmentation_markdown(summary))
    # Pixel counts (on the model's grid) say which images have a lesion and which masks are
    # empty, so a reader of this file can tell a missed lesion from a normal scan.
    test_masks = rule.apply(probs[idx["test"]])
    per_file = {f: {**{m: float(scores[m][i]) for m in ("dice", "iou", "hd95")},
                    "lesion_px": int(ds.masks[idx["test"][i]].sum()),
                    "predicted_px": int((test_masks[i] > 0.5).sum())}
                for i, f in enumerate(parts["test"])}
    write_json(run_dir / "test_scores.json", per_file)
    save_masks(run_dir / "masks.npz", ds.files, probs, source, rule, t.flip_tta, members)
    write_presence_head(run_dir, model, ds, idx["train"], cfg.runtime.seed)
    plots.plot_history(run_dir / "history.csv", run_dir / "loss_curve.png",
                        title="U-Net: training and validation loss",
                        baseline=background_loss(t.loss, ds.masks[idx["val"]]))
    plots.save_overlays(run_dir / "overlays", ds, idx["test"], rule.apply(probs), 0.5)
    finish_state(run_dir, final, environment=runtime.environment(),
                  precision=precision, **seconds)
    print(plots.segmentation_text(summary))
    report_after_run(run_dir)
    print(f"outputs: {run_dir}")
    return run_dir
