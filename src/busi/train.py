"""Trainers: ``train_segmentation`` (the U-Net) and ``train_classifier``.

Each run lives in its own folder (``outputs/seg/<run>/``, ``outputs/cls/<model>/<run>/``)
holding the resolved config, a pointer to the split manifest, checkpoints,
history, curves and metrics. ``model.fit`` does the training; callbacks do the
bookkeeping. Checkpoints are written atomically after every epoch, so a killed
or interrupted run can be continued with ``--resume RUN_DIR``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from busi import runtime
from busi.config import Config, dump_yaml, load_config
from busi.data import Dataset, dataset_from_config
from busi.errors import BusiError
from busi.runs import (
    KINDS,
    atomic_write,
    latest_run,
    new_run_dir,
    read_json,
    require_run,
    run_kind,
    write_json,
)
from busi.split import Manifest, get_manifest, read_manifest

keras = runtime.import_keras()

from busi import report  # noqa: E402  (after the quiet backend import)
from busi.augment import build_augment  # noqa: E402
from busi.losses import segmentation_loss, segmentation_metrics  # noqa: E402
from busi.masks import MaskRule, as_stored, load_masks, predict_probs, save_masks  # noqa: E402
from busi.metrics import per_image, summarise, tune_threshold  # noqa: E402
from busi.models import build_classifier, build_unet  # noqa: E402
from busi.pipeline import Batches, fit  # noqa: E402
from busi.run_report import report_after_run  # noqa: E402

SEG_DIR = "seg"
CLS_DIR = "cls"


# What a callback keeps between epochs; Keras resets it in on_train_begin, so a resumed
# fit would restart patience counters and forget the best val_loss so far.
_CALLBACK_STATE = {"early_stopping": ("wait", "best", "best_epoch", "stopped_epoch"),
                   "reduce_lr": ("wait", "best", "cooldown_counter")}


def _seed_states(model) -> list:
    """The model's random state that ``.keras`` files do not keep: its ``SeedGenerator``
    states (dropout masks), in layer order."""
    saved = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in saved]


def _restore_seed_states(model, values: list) -> None:
    """Continue the dropout masks where the interrupted run left them."""
    states = _seed_states(model)
    if len(states) != len(values):
        return  # another architecture: nothing to continue
    for var, value in zip(states, values, strict=True):
        var.assign(np.asarray(value, dtype=var.dtype))


class RunCheckpoint(keras.callbacks.Callback):
    """``best.keras`` (lowest val_loss), ``last.keras`` and ``state.json`` after each epoch.

    Keras' ModelCheckpoint writes in place, so a Ctrl-C during the write leaves a
    broken file; here every file goes to a temporary name and is renamed.
    ``state.json`` also keeps what a resume needs to continue the same run: the
    dropout seed states and the state of ``tracked`` callbacks (early stopping,
    learning-rate schedule), restored from ``saved`` when training begins. It must
    come after the tracked callbacks, whose own ``on_train_begin`` resets them.
    """

    def __init__(self, run_dir: Path, monitor: str = "val_loss", best: float = math.inf,
                 best_epoch: int = -1, tracked: dict[str, Any] | None = None,
                 saved: dict[str, Any] | None = None, stage: int = 0):
        super().__init__()
        self.run_dir, self.monitor = run_dir, monitor
        self.best, self.best_epoch = best, best_epoch
        self.tracked, self.saved, self.stage = tracked or {}, saved or {}, stage

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        for name, callback in self.tracked.items():
            for key, value in self.saved.get(name, {}).items():
                setattr(callback, key, value)

    def _callback_state(self) -> dict[str, Any]:
        def plain(value):
            return None if value is None else float(value)

        state: dict[str, Any] = {"for_epochs": self.stage}
        for name, callback in self.tracked.items():
            state[name] = {key: (plain(getattr(callback, key)) if key == "best"
                                 else int(getattr(callback, key)))
                           for key in _CALLBACK_STATE[name]}
        return state

    def _save(self, name: str) -> None:
        tmp = self.run_dir / f".{name}.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, self.run_dir / name)

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and value < self.best:
            self.best, self.best_epoch = float(value), epoch
            self._save("best.keras")
        self._save("last.keras")
        seeds = [keras.ops.convert_to_numpy(v).tolist() for v in _seed_states(self.model)]
        write_json(self.run_dir / "state.json",
                   {"epochs_done": epoch + 1, "best": self.best, "best_epoch": self.best_epoch,
                    "finished": False, "seed_states": seeds,
                    "callbacks": self._callback_state()})


def _optimizer(name: str, lr: float):
    return {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
            "sgd": keras.optimizers.SGD}[name](learning_rate=lr)


def _trim_history(path: Path, epochs_done: int) -> None:
    """Drop history rows of epochs that ``state.json`` never committed.

    An interrupt between the CSV row and the checkpoint of an epoch means that
    epoch is trained again on resume; its first row must not stay behind.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    keep = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) < epochs_done]
    if len(keep) != len(lines):
        atomic_write(path, "".join(keep))


def _callbacks(run_dir: Path, train_cfg, state: dict[str, Any]) -> list:
    # Order matters: RunCheckpoint writes state.json, the commit point of an
    # epoch, so it runs after everything else that records the epoch.
    _trim_history(run_dir / "history.csv", int(state.get("epochs_done", 0)))
    cbs = [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
           keras.callbacks.TerminateOnNaN()]
    tracked: dict[str, Any] = {}
    if train_cfg.early_stopping_patience:
        tracked["early_stopping"] = keras.callbacks.EarlyStopping(
            patience=train_cfg.early_stopping_patience, monitor="val_loss")
    if train_cfg.reduce_lr_patience:
        tracked["reduce_lr"] = keras.callbacks.ReduceLROnPlateau(
            factor=0.5, min_lr=1e-6, monitor="val_loss", patience=train_cfg.reduce_lr_patience)
    cbs += tracked.values()
    if train_cfg.tensorboard:
        cbs.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    # Saved callback state belongs to one fit (a classifier's fine-tuning stage starts afresh).
    saved = state.get("callbacks") or {}
    cbs.append(RunCheckpoint(run_dir, best=state.get("best", math.inf),
                             best_epoch=state.get("best_epoch", -1), tracked=tracked,
                             saved=saved if saved.get("for_epochs") == train_cfg.epochs else {},
                             stage=train_cfg.epochs))
    return cbs


def _start_run(cfg: Config, kind: str, resume: str | None, config_source: str | None,
               ) -> tuple[Config, Path, dict[str, Any]]:
    """New run folder (config saved), or an existing one to resume (its own config).

    Also sets up ``runtime.distribution``. In a multi-process run, process 0
    owns the run folder; the others write theirs under ``<root>/workers/`` so
    that no two processes write the same file.
    """
    pid, n = runtime.setup_distribution(cfg.runtime)
    if pid > 0 and not resume:
        from busi.config import with_overrides

        cfg = with_overrides(cfg, [f"outputs.root={Path(cfg.outputs.root) / 'workers'}"
                                   f"/process{pid}"])
    if resume:
        run_dir, cfg = _resume_target(resume, kind)
        return cfg, run_dir, _saved_state(run_dir)
    parent = Path(cfg.outputs.root) / kind
    run_dir = new_run_dir(parent, cfg.outputs.run_name)
    atomic_write(run_dir / "config.yaml", dump_yaml(cfg))
    argv = " ".join(shlex.quote(a) for a in ["busi", *sys.argv[1:]]) if sys.argv else ""
    atomic_write(run_dir / "command.txt",
                 f"{argv}\n# rerun exactly (same config, seed, split and masks): "
                 f"busi rerun {run_dir}\n# continue if interrupted: busi {kind_command(kind)} "
                 f"--resume {run_dir}\n")
    return cfg, run_dir, {}


def _resume_target(resume: str, kind: str) -> tuple[Path, Config]:
    """The run folder ``--resume`` names, checked to be an unfinished run of ``kind``, and
    its own config. Runs before anything is loaded or written."""
    run_dir = Path(resume)
    want = SEG_DIR if kind == SEG_DIR else CLS_DIR
    fix = f"pass --resume an unfinished run folder under {KINDS[want][1]}"
    if not (run_dir / "config.yaml").is_file():
        raise BusiError("not a run folder (no config.yaml)", where=str(run_dir), fix=fix)
    if (run_dir / "split.json").is_file() or (run_dir / "cv.json").is_file():
        actual = run_kind(run_dir)
    else:  # killed before split.json: the folder it lives in tells
        actual = CLS_DIR if run_dir.parent.parent.name == CLS_DIR else SEG_DIR
    if actual != want:
        raise BusiError(f"this is {KINDS[actual][0]}, not {KINDS[want][0]}",
                        where=str(run_dir),
                        fix=f"busi {'cv' if actual == 'cv' else kind_command(actual)} "
                            f"--resume {run_dir}")
    if _saved_state(run_dir).get("finished"):
        raise BusiError("this run has already finished", where=str(run_dir),
                        fix="start a new run instead of --resume")
    return run_dir, load_config(run_dir / "config.yaml")


def _saved_state(run_dir: Path) -> dict[str, Any]:
    """What a (possibly interrupted) training in ``run_dir`` committed; {} if nothing usable."""
    state_file = run_dir / "state.json"
    if not state_file.is_file():
        return {}
    state = read_json(state_file, fix=f"delete {state_file} to train this run from the start")
    if not (run_dir / "last.keras").is_file() and not state.get("finished"):
        return {}
    return state


def _restart_fix(run_dir: Path) -> str:
    return (f"delete {run_dir / 'state.json'} and {run_dir / 'last.keras'} to train this run "
            "from the start, or start a new run")


def kind_command(kind: str) -> str:
    return "train-seg" if kind == SEG_DIR else "train-cls"


def _load_data(cfg: Config) -> tuple[Dataset, Manifest]:
    ds = dataset_from_config(cfg)
    return ds, get_manifest(ds, cfg.split, cfg.runtime.seed)


def _fit(model, train: Batches, val: Batches, train_cfg, run_dir: Path, state: dict[str, Any],
         resume_hint: str, class_weight: dict[int, float] | None = None):
    initial = int(state.get("epochs_done", 0))
    if state.get("fit_done_for") == train_cfg.epochs and (run_dir / "best.keras").is_file():
        return state, 0.0  # this stage ended (all epochs, or early stopping) before the interrupt
    if initial and state.get("seed_states"):
        _restore_seed_states(model, state["seed_states"])
    t0 = time.perf_counter()
    try:
        fit(model, train, validation_data=val, epochs=train_cfg.epochs, initial_epoch=initial,
            callbacks=_callbacks(run_dir, train_cfg, state), class_weight=class_weight,
            verbose=2)
    except KeyboardInterrupt:
        print(f"\nbusi: interrupted. Completed epochs are saved; continue with:\n  {resume_hint}",
              file=sys.stderr)
        raise
    wall = time.perf_counter() - t0
    final = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").is_file() \
        else {"epochs_done": initial, "best": math.inf, "best_epoch": -1}
    if not (run_dir / "best.keras").is_file():
        raise BusiError("training produced no finite val_loss, so there is no best checkpoint",
                        where=str(run_dir), fix="lower the learning rate or check the data")
    # Committed: a resume after a later interrupt (evaluation, out-of-fold U-Nets) must not
    # train an early-stopped model on to its epoch limit.
    final = {**final, "fit_done_for": train_cfg.epochs}
    write_json(run_dir / "state.json", final)
    return final, wall


def _finish_state(run_dir: Path, state: dict[str, Any], **extra: Any) -> None:
    write_json(run_dir / "state.json", {**state, "finished": True, **extra})


# --------------------------------------------------------------------------- segmentation


def _unet(cfg: Config):
    u = cfg.model.unet
    h, w = cfg.data.image_size
    return build_unet((h, w, 1), u.base_filters, u.depth, u.encoder_dropout, u.decoder_dropout)


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
            model = runtime.load_model(run_dir / "last.keras", fix=_restart_fix(run_dir))
        else:
            model = _unet(cfg)
            model.compile(optimizer=_optimizer(t.optimizer, t.learning_rate),
                          loss=segmentation_loss(t.loss),
                          metrics=segmentation_metrics(t.threshold))
    train = _seg_batches(cfg, ds, train_idx, training=True, seed=cfg.runtime.seed)
    val = _seg_batches(cfg, ds, val_idx, training=False, seed=0)
    final, wall = _fit(model, train, val, t, run_dir, state, resume_hint)
    runtime.end_distribution()
    return runtime.load_model(run_dir / "best.keras"), final, wall


def oof_partitions(pool: np.ndarray, groups: np.ndarray, k: int, val_size: float,
                   seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, held-out) image indices of each out-of-fold U-Net.

    Duplicate groups (``groups``, one id per image of the data set) never straddle
    any of the three: a near-duplicate in a fold's validation part would flatter
    the val_loss that picks its checkpoint, and one in its training part would leak
    into the held-out masks that stand in for test-time masks.
    """
    from sklearn.model_selection import GroupKFold

    from busi.split import _take_groups

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
                 probs: np.ndarray, source: np.ndarray, resume_hint: str) -> list:
    """Replace the masks of ``pool`` images by those of k U-Nets that never saw them.

    A classifier trained on masks the U-Net drew for its own training images sees
    cleaner masks than it will at test time; out-of-fold masks are as imperfect
    as test masks. Folds, and each fold's validation part, keep duplicate groups
    together, as the split does. Returns the k U-Nets (a fold ensemble reuses them).
    On ``--resume``, finished folds are loaded and an interrupted one continues.
    """
    from busi.split import duplicate_groups

    groups = (duplicate_groups(ds, cfg.split.near_duplicate_distance)
              if cfg.split.group_duplicates else np.arange(len(ds)))
    models = []
    for fold, (train, val, held) in enumerate(
            oof_partitions(pool, groups, k, cfg.split.val_size, cfg.runtime.seed)):
        sub = run_dir / "oof" / f"fold{fold}"
        sub.mkdir(parents=True, exist_ok=True)
        print(f"out-of-fold masks: fold {fold + 1}/{k} ({len(held)} images held out)")
        model, _, _ = fit_unet(cfg, ds, train, val, sub, _saved_state(sub), resume_hint)
        probs[held] = as_stored(predict_probs(model, ds.images[held],
                                              flip_tta=cfg.training.seg.flip_tta))
        source[held] = f"oof{fold}"
        models.append(model)
    return models


def train_segmentation(cfg: Config, *, resume: str | None = None,
                       config_source: str | None = None, fold: int | None = None) -> Path:
    """Train the U-Net on the manifest's train part, evaluate on its test part.

    Writes to a new ``outputs/seg/<run>/``: config.yaml, split.json, best.keras,
    last.keras, history.csv, loss_curve.png, metrics.json/.md, overlays/, and
    masks.npz (the predicted mask of every image, which ``train-cls`` reads).
    """
    if resume:  # the run's own config decides the data; nothing is written before the checks
        cfg, run_dir, state = _start_run(cfg, SEG_DIR, resume, config_source)
        ds, manifest = _load_data(cfg)
        saved = read_json(run_dir / "split.json") if (run_dir / "split.json").is_file() else {}
        if saved:  # keep the run's fold, on the same data
            check_same_data(saved, ds, cfg.data.image_size, where=str(run_dir),
                            what="this run", fix="restore the data it was trained on (data.root "
                                                 "in its config.yaml), or start a new run")
            fold = saved.get("fold") if fold is None else fold
    else:  # bad data or an impossible split stops here, before a run folder exists
        ds, manifest = _load_data(cfg)
    parts = manifest.partition(fold)
    idx = {k: ds.index(v) for k, v in parts.items()}
    if not len(idx["val"]):
        raise BusiError("the split has no validation images", where="split.val_size",
                        fix="set split.val_size > 0 (e.g. 0.1)")
    if not resume:
        cfg, run_dir, state = _start_run(cfg, SEG_DIR, resume, config_source)
    runtime.setup(cfg.runtime.seed, cfg.runtime.precision, cfg.runtime.deterministic)
    write_json(run_dir / "split.json", {"manifest": str(manifest.path), "fold": fold,
                                        **{k: len(v) for k, v in idx.items()},
                                        **data_record(ds, cfg)})
    print(f"busi train-seg: run {run_dir}\n  data {cfg.data.root}: train {len(idx['train'])}, "
          f"val {len(idx['val'])}, test {len(idx['test'])} (manifest {manifest.path})")

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
    if t.out_of_fold_masks > 1:
        pool = idx["train"] if t.fold_ensemble else np.concatenate([idx["train"], idx["val"]])
        folds = _out_of_fold(cfg, ds, pool, run_dir, t.out_of_fold_masks, probs, source, hint)
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
    summary.update({"threshold": threshold, "postprocess": t.postprocess,
                    "flip_tta": t.flip_tta, "best_epoch": final.get("best_epoch", -1) + 1,
                    "epochs_done": final.get("epochs_done"), "train_seconds": round(wall, 1),
                    "n_test": int(len(idx["test"])), "unets": len(members)})
    write_json(run_dir / "metrics.json", summary)
    atomic_write(run_dir / "metrics.md", report.segmentation_markdown(summary))
    per_file = {f: {m: float(scores[m][i]) for m in ("dice", "iou", "hd95")}
                for i, f in enumerate(parts["test"])}
    write_json(run_dir / "test_scores.json", per_file)
    save_masks(run_dir / "masks.npz", ds.files, probs, source, rule, t.flip_tta, members)
    report.plot_history(run_dir / "history.csv", run_dir / "loss_curve.png",
                        title="U-Net: training and validation loss")
    report.save_overlays(run_dir / "overlays", ds, idx["test"], rule.apply(probs), 0.5)
    _finish_state(run_dir, final, environment=runtime.environment(),
                  precision=cfg.runtime.precision)
    print(report.segmentation_text(summary))
    report_after_run(run_dir)
    print(f"outputs: {run_dir}")
    return run_dir


def resolve_seg_run(seg_run: str | None, outputs_root: str, option: str = "--seg-run") -> Path:
    """The named segmentation run (checked: kind, finished, complete), or the newest finished."""
    if seg_run:
        return require_run(seg_run, SEG_DIR, option=option, needs=("masks.npz", "best.keras"))
    latest = latest_run(Path(outputs_root) / SEG_DIR, require="masks.npz", finished=True)
    if latest is None:
        raise BusiError(f"no finished segmentation run under {Path(outputs_root) / SEG_DIR}",
                        fix="train one first: busi train-seg --config <same config>")
    return latest


def resolve_cls_run(cls_run: str | None, outputs_root: str, option: str = "--cls-run") -> Path:
    """The named classifier run (checked), or the newest finished one of any model.

    "Finished" matters: a classifier still training has a best.keras already.
    """
    if cls_run:
        return require_run(cls_run, CLS_DIR, option=option, needs=("best.keras",))
    runs = [r for m in sorted((Path(outputs_root) / CLS_DIR).glob("*"))
            if (r := latest_run(m, require="best.keras", finished=True))]
    if not runs:
        raise BusiError(f"no finished classifier run under {Path(outputs_root) / CLS_DIR}",
                        fix="pass --cls-run, or train one: busi train-cls --model cnn")
    return max(runs, key=lambda r: r.name)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def paired_seg_run(cls: Path, seg_run: str | None, outputs_root: str,
                   command: str) -> tuple[Path, str]:
    """The U-Net run to use with classifier run ``cls``, and why (for the command's output).

    By default the classifier's own U-Net (``seg_run`` in its split.json): a
    later U-Net draws other masks than the ones the classifier learnt from. An
    explicit ``--seg-run`` that differs is allowed, with a warning. A classifier
    without a U-Net of its own (ground-truth or no masks) gets the newest one.
    """
    own = read_json(cls / "split.json").get("seg_run")
    if seg_run:
        seg = resolve_seg_run(seg_run, outputs_root)
        if own and not _same_path(own, seg):
            print(f"busi: warning: {command}: --seg-run {seg} is not the U-Net run classifier "
                  f"{cls} was trained with ({own}); its masks can differ from the ones the "
                  "classifier learnt from", file=sys.stderr)
            return seg, "--seg-run, not the classifier's own"
        return seg, "--seg-run"
    if own:
        if not Path(own).is_dir():
            raise BusiError(f"the classifier's segmentation run {own} is gone", where=str(cls),
                            fix="restore that folder, or name another U-Net run with --seg-run "
                                "(its masks differ from those the classifier learnt from)")
        return resolve_seg_run(own, outputs_root), "the classifier's own"
    return resolve_seg_run(None, outputs_root), "the latest; the classifier has none of its own"


def data_record(ds: Dataset, cfg: Config) -> dict[str, Any]:
    """What identifies the data a run used, for its split.json: every file's bytes
    (``Dataset.fingerprint``) and the image size the images were resized to."""
    return {"data_fingerprint": ds.fingerprint,
            "image_size": [int(v) for v in cfg.data.image_size]}


def seg_record(seg_path: Path) -> dict[str, Any]:
    """A segmentation run's split.json, with its image size (from config.yaml in old runs)."""
    record = read_json(seg_path / "split.json")
    if "manifest" not in record:
        raise BusiError("split.json names no split manifest", where=str(seg_path / "split.json"),
                        fix="use a complete segmentation run, or retrain it")
    if "image_size" not in record:
        import yaml

        try:
            size = yaml.safe_load((seg_path / "config.yaml").read_text())["data"]["image_size"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            size = None
        record["image_size"] = size
    return record


def check_same_data(record: dict[str, Any], ds: Dataset, image_size, *, where: str, what: str,
                    fix: str) -> None:
    """Stop when a run's recorded data (fingerprint, image size) is not the data at hand.

    Runs made by an older busi record no fingerprint: warned about, not refused.
    """
    size = record.get("image_size")
    if size is not None and [int(v) for v in size] != [int(v) for v in image_size]:
        raise BusiError(f"{what} used {size[0]}x{size[1]} images, not "
                        f"{image_size[0]}x{image_size[1]} (data.image_size)", where=where, fix=fix)
    fp = record.get("data_fingerprint")
    if fp is None:
        print(f"busi: warning: {where} records no data fingerprint (an older busi made it); "
              "cannot check that it used the same data", file=sys.stderr)
    elif fp != ds.fingerprint:
        raise BusiError(f"{what} used other data than {ds.root} holds now (data fingerprint "
                        f"{fp[:12]}, now {ds.fingerprint[:12]})", where=where, fix=fix)


# --------------------------------------------------------------------------- classification


def masked_inputs(images: np.ndarray, masks: np.ndarray | None, mode: str,
                  margin: float = 0.15, dilation: int = 0) -> np.ndarray:
    """Apply (binary) lesion masks to uint8 images as the classifier config says.

    ``multiply`` is the paper's image x mask. ``crop`` cuts the mask's bounding
    box plus ``margin`` (a fraction of the box size) and resizes it back, which
    keeps the lesion's surroundings (margins, posterior shadow) that radiologists
    read; an empty mask keeps the whole image. ``none`` ignores the mask.
    ``dilation`` (pixels, 0 = the paper) first grows each mask by a disc of that
    radius, so that ``multiply`` keeps the lesion's margin, where benign and
    malignant differ most, even when the U-Net draws the boundary a little inside.
    """
    if masks is None or mode == "none":
        return images
    import cv2

    if dilation > 0:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1,) * 2)
        masks = np.stack([cv2.dilate((m > 0).astype(np.uint8), disc) for m in masks])
    if mode == "multiply":
        return (images * (masks > 0)).astype(np.uint8)

    out = np.empty_like(images)
    h, w = images.shape[1:]
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            out[k] = img
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        dy, dx = int((y1 - y0) * margin), int((x1 - x0) * margin)
        y0, y1, x0, x1 = max(0, y0 - dy), min(h, y1 + dy), max(0, x0 - dx), min(w, x1 + dx)
        out[k] = cv2.resize(img[y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_LINEAR)
    return out


def classifier_inputs(images: np.ndarray, masks: np.ndarray | None, c) -> np.ndarray:
    """:func:`masked_inputs` as a classifier config (``model.classifier``) says: the one
    call train-cls, evaluate, predict and export share, so they cannot drift apart."""
    return masked_inputs(images, masks, c.mask_mode, c.crop_margin, c.mask_dilation)


def _classifier_masks(cfg: Config, ds: Dataset, seg_run: Path | None) -> np.ndarray | None:
    source = cfg.model.classifier.masks
    if source == "none" or cfg.model.classifier.mask_mode == "none":
        return None
    if source == "ground_truth":
        return ds.masks
    assert seg_run is not None
    masks = load_masks(seg_run)
    missing = [f for f in ds.files if f not in masks]
    if missing:
        raise BusiError(f"the segmentation run has no mask for {len(missing)} image(s), e.g. "
                        f"{missing[0]!r}", where=str(seg_run),
                        fix="use a segmentation run trained on the same data")
    return np.stack([masks[f] for f in ds.files])


def _block_of(name: str) -> str:
    """Block id of a Keras application layer: 'block5' (VGG), '13' (MobileNet), '' (stem)."""
    import re

    if name.startswith("block"):
        return name.split("_")[0]
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
        layer.trainable = _block_of(layer.name) in top


def _save_gradcam(out_dir: Path, model, ds: Dataset, test_idx: np.ndarray, x: np.ndarray,
                  probs: np.ndarray) -> None:
    """Grad-CAM panels for a fixed sample of test images, right and wrong predictions."""
    from busi.explain import gradcam, sample, save_panels

    y_true, y_pred = ds.labels[test_idx], probs.argmax(axis=1)
    pick = sample(y_true, y_pred)
    if not pick:
        return
    sel = test_idx[pick]
    heat, _ = gradcam(model, x[sel], y_pred[pick])
    names = list(ds.classes)
    save_panels(out_dir, [ds.files[i] for i in sel], ds.images[sel], x[sel], heat,
                [names[k] for k in y_true[pick]], [names[k] for k in y_pred[pick]],
                probs[pick].max(axis=1))


def train_classifier(cfg: Config, *, seg_run: str | None = None, resume: str | None = None,
                     config_source: str | None = None) -> Path:
    """Train one classifier on images masked by a segmentation run's predicted masks.

    The split manifest is the segmentation run's, so the classifier's test images
    are exactly the U-Net's test images (and never its training images).
    """
    # Everything that can be wrong with the input (the U-Net run, the data, the masks) is
    # checked before the run folder is made, so a refused run leaves nothing behind.
    own: dict[str, Any] = {}
    if resume:
        resume_dir, cfg = _resume_target(resume, CLS_DIR)
        if (resume_dir / "split.json").is_file():
            own = read_json(resume_dir / "split.json")
            saved = own.get("seg_run")
            if seg_run and (not saved or not _same_path(seg_run, saved)):
                print(f"busi: warning: --seg-run {seg_run} ignored: a resumed run keeps the "
                      f"segmentation run it started with ({saved or 'none'})", file=sys.stderr)
            seg_run = saved
    c = cfg.model.classifier
    seg_path = None
    if c.masks == "predicted" and c.mask_mode != "none" or seg_run:
        seg_path = resolve_seg_run(seg_run, cfg.outputs.root)
    ds = dataset_from_config(cfg)
    if own:
        check_same_data(own, ds, cfg.data.image_size, where=str(resume_dir), what="this run",
                        fix="restore the data it was trained on (data.root in its config.yaml), "
                            "or start a new run")
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
    masks = _classifier_masks(cfg, ds, seg_path)
    x = classifier_inputs(ds.images, masks, c)
    cfg, run_dir, state = _start_run(cfg, f"{CLS_DIR}/{c.name}", resume, config_source)
    runtime.setup(cfg.runtime.seed, cfg.runtime.precision, cfg.runtime.deterministic)
    write_json(run_dir / "split.json", {"manifest": str(manifest.path), "fold": fold,
                                        "seg_run": str(seg_path.resolve()) if seg_path else None,
                                        **{k: len(v) for k, v in idx.items()},
                                        **data_record(ds, cfg)})
    y = keras.utils.to_categorical(ds.labels, len(ds.classes)).astype("float32")
    print(f"busi train-cls: {c.name} run {run_dir}\n  masks: {c.masks} ({c.mask_mode})"
          f"{f' from {seg_path}' if seg_path else ''}; train {len(idx['train'])}, "
          f"val {len(idx['val'])}, test {len(idx['test'])}")

    t = cfg.training.cls
    total_epochs = t.epochs + (c.fine_tune_epochs if c.freeze_base else 0)
    with runtime.model_scope():
        if state.get("epochs_done"):
            model = runtime.load_model(run_dir / "last.keras", fix=_restart_fix(run_dir))
        else:
            try:
                model = build_classifier(c.name, tuple(cfg.data.image_size), len(ds.classes),
                                         c.weights)
            except BusiError:  # e.g. a bad model.classifier.weights file: nothing trained yet
                if not resume:
                    shutil.rmtree(run_dir, ignore_errors=True)
                raise
            if c.freeze_base:
                _set_trainable_top_blocks(model, 0)
            model.compile(optimizer=_optimizer(t.optimizer, t.learning_rate), loss=t.loss,
                          metrics=["accuracy"])
    augment = build_augment(cfg.augmentation, tuple(cfg.data.image_size))
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
    stage1 = t
    if int(state.get("epochs_done", 0)) < t.epochs:
        state, wall = _fit(model, train, val, stage1, run_dir, state, hint, class_weight)
    else:
        wall = 0.0
    if c.freeze_base and c.fine_tune_epochs and int(state.get("epochs_done", 0)) < total_epochs:
        with runtime.model_scope():
            model = runtime.load_model(run_dir / "last.keras", fix=_restart_fix(run_dir))
            _set_trainable_top_blocks(model, c.fine_tune_blocks)
            model.compile(optimizer=_optimizer(t.optimizer, c.fine_tune_learning_rate),
                          loss=t.loss, metrics=["accuracy"])
        state, wall2 = _fit(model, train, val, replace(t, epochs=total_epochs), run_dir, state,
                            hint, class_weight)
        wall += wall2
    runtime.end_distribution()
    best = runtime.load_model(run_dir / "best.keras")
    probs = best.predict(x[idx["test"]][..., None].astype("float32"), batch_size=64, verbose=0)
    from busi.evaluate import evaluate_run, write_predictions

    write_predictions(run_dir / "predictions.csv", parts["test"], ds.labels[idx["test"]],
                      probs, ds.classes)
    report.plot_history(run_dir / "history.csv", run_dir / "loss_curve.png",
                        title=f"{c.name}: training and validation loss")
    _save_gradcam(run_dir / "gradcam", best, ds, idx["test"], x, probs)
    _finish_state(run_dir, state, train_seconds=round(wall, 1),
                  environment=runtime.environment())
    result = evaluate_run(run_dir)
    print(result["text"])
    report_after_run(run_dir)
    print(f"outputs: {run_dir}")
    return run_dir
