"""The classifier trainer: ``train_classifier`` fits one classifier on images masked by a
U-Net run's masks (with optional frozen-base fine-tuning), then evaluates it on the test split.

Fine-tuning is two stages. With ``model.classifier.freeze_base: true`` a pretrained base
(vgg19, mobilenet) is frozen for stage 1, up to ``training.cls.epochs`` epochs (fewer if
early stopping ends it); stage 2 then unfreezes its top ``fine_tune_blocks`` blocks and
trains exactly ``fine_tune_epochs`` more epochs at ``fine_tune_learning_rate``, from the
epoch stage 1 actually stopped at. state.json records the stage, so a resume continues the
stage it interrupted.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from busi import runtime
from busi.config import ClassifierConfig, Config
from busi.data.augment import Augment, build_augment, require_engine
from busi.data.batches import Batches
from busi.data.loading import dataset_from_config, original_images
from busi.data.split import get_manifest, read_manifest
from busi.errors import BusiError
from busi.evaluation.classification import evaluate_run
from busi.models.classifiers import build_classifier
from busi.models.inputs import (
    classifier_inputs,
    classifier_masks,
    empty_mask_warning,
    input_channels,
    needs_originals,
)
from busi.models.saving import load_model
from busi.models.weights import copy_encoder_weights, unet_encoder
from busi.reporting import plots
from busi.reporting.gradcam import save_gradcam
from busi.reporting.report import report_after_run
from busi.runs import (
    CLS_DIR,
    OPERATING_POINT,
    PREDICTIONS,
    SPLIT,
    VAL_PREDICTIONS,
    read_split,
    resolve_seg_run,
    resume_target,
    same_path,
    seg_record,
    write_json,
    write_predictions,
    write_split,
)
from busi.training.loop import (
    check_same_data,
    classifier_stage,
    data_record,
    finish_state,
    fit_stage,
    optimizer,
    restart_fix,
    start_run,
)

keras = runtime.import_keras()


def _block_of(name: str) -> str:
    """Block id of a base's layer: 'block5' (VGG), '13' (MobileNet), 'block6' (all of
    EfficientNet-Lite0's stage 6, block6a_... to block6d_...), 'top' (its top_conv/top_bn),
    '' (a stem, never opened for fine-tuning)."""
    if name.startswith("block"):
        m = re.match(r"block\d+", name)
        return m.group(0) if m else name.split("_")[0]
    if name.startswith("top_"):
        return "top"
    m = re.search(r"_(\d+)", name)
    return m.group(1) if m else ""


def _set_trainable_top_blocks(model, n_blocks: int) -> None:
    base = next((layer for layer in model.layers if isinstance(layer, keras.Model)), None)
    if base is None:
        return
    blocks = list(dict.fromkeys(_block_of(layer.name) for layer in base.layers
                                if layer.weights and _block_of(layer.name)))
    top = set(blocks[-n_blocks:]) if n_blocks else set()
    base.trainable = True
    for layer in base.layers:
        # batch norms stay frozen (inference mode) in every stage: see freeze_batch_norm
        layer.trainable = (_block_of(layer.name) in top
                           and not isinstance(layer, keras.layers.BatchNormalization))


def fine_tune_epochs(c: ClassifierConfig) -> int:
    """The number of stage-2 (fine-tuning) epochs ``c`` asks for: ``fine_tune_epochs`` when a
    base is frozen for stage 1, else none, with a one-line warning naming the setting that
    does not apply, rather than dropping it without a word.

    A warning, not a refusal: one config serves several classifiers (``busi cv --models
    cnn,mobilenet``, configs/cpu.yaml), and ``freeze_base`` there is meant for the ones with
    a pretrained base.
    """
    if c.freeze_base and c.name == "cnn":
        print("busi: warning: model.classifier.freeze_base does nothing for the cnn classifier "
              "(it has no pretrained base to freeze): it trains all its layers for "
              "training.cls.epochs" + (", and fine_tune_epochs is not used"
                                       if c.fine_tune_epochs else ""), file=sys.stderr)
        return 0
    if c.fine_tune_epochs and not c.freeze_base:
        print("busi: warning: model.classifier.fine_tune_epochs is the stage after training "
              "with a frozen base, and freeze_base is false: it is not used (set "
              "freeze_base: true for the two stages)", file=sys.stderr)
        return 0
    return c.fine_tune_epochs if c.freeze_base else 0


def classifier_augment(augment: Augment | None) -> Augment | None:
    """``augment`` for classifier inputs: (B, H, W, C) in 0..255, channel 1 a mask if any.

    The engines take images in [0, 1] (the site changes clip to it) and a separate mask,
    which the geometric transforms move with the image and keep binary, and which gain,
    contrast, gamma, blur and speckle never touch. So the scan is scaled to [0, 1] and
    back, and a mask channel (``mask_mode: channel``) goes through as that mask: it stays
    0/255 and on the lesion the scan's transform moved.
    """
    if augment is None:
        return None

    def apply(x: np.ndarray, _labels: None, seed: int) -> tuple[np.ndarray, None]:
        scan = x[..., :1] / 255.0
        mask = (x[..., 1:] > 127).astype("float32") if x.shape[-1] > 1 else None
        scan, mask = augment(scan, mask, seed)
        parts = [scan * 255.0] + ([] if mask is None else [(mask > 0.5) * 255.0])
        return np.concatenate(parts, axis=-1).astype("float32"), None

    return apply


def write_operating_point(run_dir: Path, cfg: Config, val_probs: np.ndarray,
                          val_true: list[str], classes: tuple[str, ...] | list[str],
                          val_unet_max: np.ndarray | None) -> None:
    """Choose the run's operating point (models/decision.py) on its validation images, as
    ``cfg.decision`` asks, and record it in ``operating_point.json``. A presence score that
    needs the U-Net, on a run without one, falls back to argmax with a warning."""
    from busi.models.decision import choose

    d = cfg.decision
    presence = d.presence
    from busi.models.decision import has_scores

    if not has_scores(presence, val_unet_max):
        print(f"busi: warning: decision.presence {presence!r} needs a U-Net run, and this "
              "classifier has none: the presence decision is the classifier's argmax",
              file=sys.stderr)
        presence = "argmax"
    op = choose(val_probs, val_true, classes, val_unet_max,
                malignant_sensitivity=d.malignant_sensitivity, presence=presence,
                max_missed_lesions=d.max_missed_lesions)
    write_json(run_dir / OPERATING_POINT, op.as_dict())


def train_classifier(cfg: Config, *, seg_run: str | None = None, resume: str | None = None,
                     config_source: str | None = None, name: str | None = None) -> Path:
    """Train one classifier on images masked by a segmentation run's predicted masks.

    The split manifest is the segmentation run's, so the classifier's test images
    are exactly the U-Net's test images (and never its training images). The run goes to
    ``<outputs.root>/cls/<name>/`` (``name``: a CV arm's; default the classifier's name).
    """
    # Everything that can be wrong with the input (the U-Net run, the data, the masks) is
    # checked before the run folder is made, so a refused run leaves nothing behind.
    own: dict[str, Any] = {}
    if resume:
        resume_dir, cfg = resume_target(resume, CLS_DIR)
        if (resume_dir / SPLIT).is_file():
            own = read_split(resume_dir)
            saved = own.get("seg_run")
            if seg_run and (not saved or not same_path(seg_run, saved)):
                print(f"busi: warning: --seg-run {seg_run} ignored: a resumed run keeps the "
                      f"segmentation run it started with ({saved or 'none'})", file=sys.stderr)
            seg_run = saved
    require_engine(cfg.augmentation)
    c = cfg.model.classifier
    fine_epochs = fine_tune_epochs(c)
    frozen = c.freeze_base and c.name != "cnn"
    seg_path = None
    # The CNN has no pretrained base: `weights` does not apply to it (as with imagenet), so
    # configs/cpu.yaml's `weights: unet` still trains `--model cnn` (README).
    from_unet = c.weights == "unet" and c.name != "cnn"
    if c.masks == "predicted" and c.mask_mode != "none" or seg_run or from_unet:
        seg_path = resolve_seg_run(seg_run, cfg.outputs.root)
    encoder = None
    if from_unet:
        if c.name not in ("mobilenet", "efficientnet_lite0"):
            raise BusiError(f"'model.classifier.weights: unet' is for the mobilenet classifier "
                            f"or efficientnet_lite0 (the family of the U-Net's encoder), not "
                            f"{c.name}",
                            where="model.classifier.weights",
                            fix="train-cls --model mobilenet (or efficientnet_lite0, as the "
                                "U-Net's encoder), or another weights value, e.g. "
                                "--set model.classifier.weights=none")
        encoder = unet_encoder(load_model(seg_path / "best.keras"), str(seg_path), c.name)
    ds = dataset_from_config(cfg)
    if own:
        check_same_data(own, ds, cfg.data.image_size, where=str(resume_dir))
    fold = None
    if seg_path is not None:
        seg_split = seg_record(seg_path)
        check_same_data(seg_split, ds, cfg.data.image_size, where=str(seg_path),
                        what="this segmentation run",
                        fix=f"train the classifier with the data and data.image_size of the "
                            f"segmentation run, or train a U-Net on {cfg.data.root} first")
        manifest = read_manifest(seg_split["manifest"], cfg.split.val_size, cfg.runtime.seed)
        fold = seg_split.get("fold")
    else:
        manifest = get_manifest(ds, cfg.split, cfg.runtime.seed)
    parts = manifest.partition(fold)
    idx = {k: ds.index(v) for k, v in parts.items()}
    masks = classifier_masks(cfg, ds, seg_path)
    originals = original_images(ds) if needs_originals(c) and masks is not None else None
    x = classifier_inputs(ds.images, masks, c, originals)
    del originals
    blank = empty_mask_warning(None if masks is None else masks[idx["train"]],
                               ds.labels[idx["train"]], ds.classes, c.mask_mode)
    if blank:
        print(f"busi: warning: {blank}", file=sys.stderr)
    cfg, run_dir, state = start_run(cfg, f"{CLS_DIR}/{name or c.name}", resume,
                                      config_source)
    precision = runtime.setup(cfg.runtime.seed, cfg.runtime.precision, cfg.runtime.deterministic)
    write_split(run_dir, {"manifest": str(manifest.path), "fold": fold,
                          "seg_run": str(seg_path.resolve()) if seg_path else None,
                          **{k: len(v) for k, v in idx.items()}, **data_record(ds, cfg)})
    y = keras.utils.to_categorical(ds.labels, len(ds.classes)).astype("float32")
    print(f"busi train-cls: {c.name} run {run_dir}\n  masks: {c.masks} ({c.mask_mode})"
          f"{f' from {seg_path}' if seg_path else ''}; train {len(idx['train'])}, "
          f"val {len(idx['val'])}, test {len(idx['test'])}; precision {precision}"
          f"{'' if resume else runtime.precision_hint(precision)}")

    t = cfg.training.cls
    with runtime.model_scope():
        if state.get("epochs_done"):
            model = load_model(run_dir / "last.keras", fix=restart_fix(run_dir))
        else:
            try:
                model = build_classifier(c.name, tuple(cfg.data.image_size), len(ds.classes),
                                         c.weights,
                                         channels=input_channels(c))
                if encoder is not None:
                    n = copy_encoder_weights(encoder, model)
                    print(f"  base: {n} layers from the U-Net's encoder ({seg_path})")
            except BusiError:  # e.g. a bad model.classifier.weights file: nothing trained yet
                if not resume:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            if frozen:
                _set_trainable_top_blocks(model, 0)
            model.compile(optimizer=optimizer(t.optimizer, t.learning_rate), loss=t.loss,
                          metrics=["accuracy"])
    augment = classifier_augment(build_augment(cfg.augmentation, tuple(cfg.data.image_size)))
    train = Batches(x[idx["train"]], y[idx["train"]], t.batch_size, augment=augment,
                    shuffle=True, seed=cfg.runtime.seed, x_scale=1.0, steps=t.steps_per_epoch,
                    workers=2 if augment is not None else 1, shard=runtime.process(),
                    multiple=runtime.batch_multiple())
    val = Batches(x[idx["val"]], y[idx["val"]], t.batch_size, x_scale=1.0,
                  shard=runtime.process(), multiple=runtime.batch_multiple())
    class_weight = None
    if c.class_weights:
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(ds.labels[idx["train"]])
        weights = compute_class_weight("balanced", classes=present, y=ds.labels[idx["train"]])
        class_weight = dict(zip(present.tolist(), weights.tolist(), strict=True))
    hint = f"busi train-cls --resume {run_dir}"
    # A resume continues the stage state.json names: an interrupted fine-tuning goes on with
    # the model last.keras holds (unfrozen blocks, fine-tuning optimizer), never back in stage 1.
    stage, start = classifier_stage(state, t.epochs)
    if stage == "train":
        state, wall = fit_stage(model, train, val, t, run_dir, state, hint, class_weight)
        # stage 2 counts from where stage 1 stopped (early stopping: before its limit)
        start = int(state.get("epochs_done", 0))
        if fine_epochs:
            with runtime.model_scope():
                model = load_model(run_dir / "last.keras", fix=restart_fix(run_dir))
                _set_trainable_top_blocks(model, c.fine_tune_blocks)
                model.compile(optimizer=optimizer(t.optimizer, c.fine_tune_learning_rate),
                              loss=t.loss, metrics=["accuracy"])
    else:
        wall = float(state.get("train_seconds", 0.0))
    if fine_epochs:
        # fit_stage counts every committed epoch, both stages and any earlier session
        state, wall = fit_stage(model, train, val, replace(t, epochs=start + fine_epochs),
                                run_dir, state, hint, class_weight, stage="fine_tune",
                                record={"fine_tune_from": start})
    runtime.end_distribution()
    best = load_model(run_dir / "best.keras")
    probs = best.predict(x[idx["test"]].astype("float32"), batch_size=64, verbose=0)
    val_probs = best.predict(x[idx["val"]].astype("float32"), batch_size=64, verbose=0)
    peaks = None
    if seg_path is not None:  # the U-Net's own lesion-presence score (models/decision.py)
        from busi.models.masks import unet_max
        from busi.models.presence import head_scores

        stored_max, stored_head = unet_max(seg_path), head_scores(seg_path)
        peaks = {k: {"max": np.array([stored_max[f] for f in parts[k]]),
                     "head": (None if stored_head is None
                              else np.array([stored_head[f] for f in parts[k]]))}
                 for k in ("val", "test")}
    write_predictions(run_dir / PREDICTIONS, parts["test"], ds.labels[idx["test"]],
                      probs, ds.classes, None if peaks is None else peaks["test"])
    write_predictions(run_dir / VAL_PREDICTIONS, parts["val"], ds.labels[idx["val"]],
                      val_probs, ds.classes, None if peaks is None else peaks["val"])
    write_operating_point(run_dir, cfg, val_probs, [ds.classes[k] for k in ds.labels[idx["val"]]],
                          ds.classes, None if peaks is None else peaks["val"])
    unet = None
    if seg_path is not None:  # the U-Net's masks, whatever the classifier was shown
        from busi.evaluation.classification import PER_IMAGE, write_per_image
        from busi.models.masks import load_masks

        stored = load_masks(seg_path)
        unet = np.stack([stored[f] for f in ds.files])
        test_true = [ds.classes[k] for k in ds.labels[idx["test"]]]
        write_per_image(run_dir / PER_IMAGE, parts["test"], test_true,
                        [ds.classes[k] for k in probs.argmax(axis=1)], probs.max(axis=1),
                        ds.masks[idx["test"]], unet[idx["test"]])
    plots.plot_history(run_dir / "history.csv", run_dir / "loss_curve.png",
                        title=f"{c.name}: training and validation loss")
    save_gradcam(run_dir / "gradcam", best, ds, idx["test"], x, probs, unet,
                 crop_view=needs_originals(c) and masks is not None)
    finish_state(run_dir, state, train_seconds=round(wall, 1),
                  environment=runtime.environment(), precision=precision)
    result = evaluate_run(run_dir)
    print(result["text"])
    report_after_run(run_dir)
    print(f"outputs: {run_dir}")
    return run_dir
