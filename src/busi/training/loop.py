"""The fit loop every trainer shares, with its run bookkeeping: a run folder started or resumed,
``model.fit`` with atomic checkpoints after each epoch, and the state a resume continues from.

Each run lives in its own folder (``outputs/seg/<run>/``, ``outputs/cls/<model>/<run>/``;
``busi.runs`` knows the layout) holding the resolved config, a pointer to the split
manifest, checkpoints, history, curves and metrics. ``model.fit`` does the training;
callbacks do the bookkeeping. Checkpoints are written atomically after every epoch, so a
killed or interrupted run can be continued with ``--resume RUN_DIR``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from busi import runtime
from busi.config import Config
from busi.data.loading import Dataset, dataset_from_config
from busi.data.split import Manifest, get_manifest
from busi.errors import BusiError
from busi.runs import (
    CLS_DIR,
    COMMAND,
    CONFIG,
    SEG_DIR,
    STATE,
    atomic_write,
    kind_command,
    new_run_dir,
    resume_target,
    saved_state,
    write_command,
    write_config,
    write_state,
)

keras = runtime.import_keras()

from busi.data.batches import Batches, fit  # noqa: E402  (after the quiet backend import)

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
    learning-rate schedule), restored from ``saved`` when training begins, and which
    ``stage`` the epochs belong to (with its ``record``, e.g. where fine-tuning began), so
    that a resume continues that stage and not an earlier one. It must come after the
    tracked callbacks, whose own ``on_train_begin`` resets them.
    """

    def __init__(self, run_dir: Path, monitor: str = "val_loss", best: float = math.inf,
                 best_epoch: int = -1, tracked: dict[str, Any] | None = None,
                 saved: dict[str, Any] | None = None, for_epochs: int = 0,
                 seconds_before: float = 0.0, stage: str = "train",
                 record: dict[str, Any] | None = None):
        super().__init__()
        self.run_dir, self.monitor = run_dir, monitor
        self.best, self.best_epoch = best, best_epoch
        self.tracked, self.saved, self.for_epochs = tracked or {}, saved or {}, for_epochs
        self.stage, self.record = stage, record or {}
        # Training time of the epochs committed before this fit (earlier sessions, an
        # earlier stage): a run resumed three times reports all of its time, not the last.
        self.seconds_before, self.t0 = seconds_before, time.perf_counter()

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        self.t0 = time.perf_counter()
        for name, callback in self.tracked.items():
            for key, value in self.saved.get(name, {}).items():
                setattr(callback, key, value)

    def _callback_state(self) -> dict[str, Any]:
        def plain(value):
            return None if value is None else float(value)

        state: dict[str, Any] = {"for_epochs": self.for_epochs, "for_stage": self.stage}
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
        write_state(self.run_dir,
                   {"epochs_done": epoch + 1, "best": self.best, "best_epoch": self.best_epoch,
                    "finished": False, "stage": self.stage, **self.record, "seed_states": seeds,
                    "callbacks": self._callback_state(),
                    "train_seconds": round(self.seconds_before + time.perf_counter() - self.t0,
                                           1)})


def optimizer(name: str, lr: float):
    """The config's optimizer by name, so both trainers build it the same way."""
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


def _callbacks(run_dir: Path, train_cfg, state: dict[str, Any], stage: str = "train",
               record: dict[str, Any] | None = None) -> list:
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
    # Saved callback state belongs to one fit (a classifier's fine-tuning stage starts afresh,
    # as does a run whose epochs a resume changed).
    saved = state.get("callbacks") or {}
    same_fit = (saved.get("for_epochs") == train_cfg.epochs
                and saved.get("for_stage", "train") == stage)
    cbs.append(RunCheckpoint(run_dir, best=state.get("best", math.inf),
                             best_epoch=state.get("best_epoch", -1), tracked=tracked,
                             saved=saved if same_fit else {}, for_epochs=train_cfg.epochs,
                             seconds_before=float(state.get("train_seconds", 0.0)),
                             stage=stage, record=record))
    return cbs


def start_run(cfg: Config, kind: str, resume: str | None, config_source: str | None,
               ) -> tuple[Config, Path, dict[str, Any]]:
    """New run folder (config saved), or an existing one to resume (its own config).

    Also sets up ``runtime.distribution``. In a multi-process run, process 0
    owns the run folder; the others write theirs under ``<root>/workers/`` so
    that no two processes write the same file.
    """
    pid, n = runtime.setup_distribution(cfg.runtime)
    if pid > 0 and not resume:
        from busi.config import with_overrides

        # a value, not --set text: an outputs root like "my runs #2" is not YAML to re-read
        cfg = with_overrides(cfg, [("outputs.root",
                                    str(Path(cfg.outputs.root) / "workers" / f"process{pid}"))])
    if resume:
        run_dir, cfg = resume_target(resume, kind)
        return cfg, run_dir, saved_state(run_dir)
    parent = Path(cfg.outputs.root) / kind
    run_dir = new_run_dir(parent, cfg.outputs.run_name)
    write_config(run_dir, cfg)
    write_command(run_dir, resume=kind_command(kind),
                  rerun_note=" (same config, seed, split and masks)")
    return cfg, run_dir, {}


# What ``--set`` may change when a run is continued: how long it trains and when it stops.
# Anything else (the model, the data, the split, the loss, the learning rate) would make the
# epochs before and after the resume two different experiments under one name: a new run.
RESUME_KEYS = {SEG_DIR: ("training.seg.epochs", "training.seg.early_stopping_patience",
                         "training.seg.reduce_lr_patience"),
               CLS_DIR: ("training.cls.epochs", "training.cls.early_stopping_patience",
                         "training.cls.reduce_lr_patience", "model.classifier.fine_tune_epochs")}


def _value(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def classifier_stage(state: dict[str, Any], epochs: int) -> tuple[str, int]:
    """Which stage a classifier run's committed epochs belong to ("train": the first, a
    frozen base's if any; "fine_tune": the second) and the epoch fine-tuning began at.

    A run made before state.json named its stage was fine-tuning once it had more than
    ``training.cls.epochs`` epochs, from that epoch on.
    """
    done = int(state.get("epochs_done", 0))
    stage = state.get("stage") or ("fine_tune" if done > epochs else "train")
    return stage, int(state.get("fine_tune_from", epochs))


def _check_resumed_epochs(old: Config, new: Config, run_dir: Path, kind: str,
                          given: dict[str, str]) -> None:
    """Refuse an epoch limit below the epochs a run has trained: they cannot be undone."""
    state = saved_state(run_dir)
    done = int(state.get("epochs_done", 0))

    def refuse(key: str, problem: str, fix: str) -> BusiError:
        return BusiError(problem, where=f"--set {given[key]}", fix=fix)

    if kind == SEG_DIR:
        # the out-of-fold U-Nets train to the same limit
        done = max([done] + [int(saved_state(d).get("epochs_done", 0))
                             for d in sorted((run_dir / "oof").glob("fold*"))])
        epochs = new.training.seg.epochs
        if epochs < done and "training.seg.epochs" in given:
            raise refuse("training.seg.epochs", f"{epochs} epochs is fewer than the {done} "
                         f"this run has trained", f"set it to {done} or more ({done}: end the "
                         "training now)")
        return
    stage, start = classifier_stage(state, old.training.cls.epochs)
    epochs, fine = new.training.cls.epochs, new.model.classifier.fine_tune_epochs
    if stage == "fine_tune":
        if epochs != old.training.cls.epochs:
            raise refuse("training.cls.epochs", f"this run's first stage ended at epoch {start} "
                         "and it is fine-tuning now, so training.cls.epochs no longer applies",
                         "drop it; model.classifier.fine_tune_epochs sets how long the "
                         "fine-tuning goes on")
        if start + fine < done and "model.classifier.fine_tune_epochs" in given:
            raise refuse("model.classifier.fine_tune_epochs",
                         f"{fine} fine-tuning epochs is fewer than the {done - start} this run "
                         "has trained", f"set it to {done - start} or more ({done - start}: "
                                        "end the training now)")
    elif epochs < done and "training.cls.epochs" in given:
        raise refuse("training.cls.epochs", f"{epochs} epochs is fewer than the {done} this run "
                     "has trained", f"set it to {done} or more ({done}: end the first stage "
                                    "now)")


def resumed_config(resume: str, kind: str, overrides: list[str] | tuple[str, ...] = (), *,
                   command: str = "") -> Config:
    """The config of the unfinished run ``resume`` names, for ``--resume``: its own, so that
    the resumed run is the same run, with ``--set`` overrides of :data:`RESUME_KEYS` applied.

    Those may extend a run (or end it now) and change its patience; any other key is refused,
    as is an epoch limit below the epochs already trained. What changed is written to the
    run's config.yaml (and noted in command.txt) before training goes on, so the run folder
    says what was run; ``resume_target`` then reads it back. Nothing is written when a
    check fails.
    """
    kind = SEG_DIR if kind == SEG_DIR else CLS_DIR
    allowed = RESUME_KEYS[kind]
    given: dict[str, str] = {}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key not in allowed:
            raise BusiError(f"'{key}' cannot change when a run is continued: the epochs before "
                            "and after the resume would be two different experiments",
                            where=f"--set {text}",
                            fix=f"drop it to continue {resume} as it was, or start a new run; "
                                "with --resume, --set may change only " + ", ".join(allowed))
        given[key] = text
    run_dir, cfg = resume_target(resume, kind)
    if not overrides:
        return cfg
    from busi.config import with_overrides

    new = with_overrides(cfg, list(overrides))
    _check_resumed_epochs(cfg, new, run_dir, kind, given)
    changes = [f"{key} {_value(cfg, key)} -> {_value(new, key)}" for key in allowed
               if _value(cfg, key) != _value(new, key)]
    if changes:
        import shlex

        write_config(run_dir, new)
        note = (f"# resumed with: busi {command or kind_command(kind)} --resume "
                f"{shlex.quote(str(run_dir))} "
                + " ".join(shlex.quote(f"--set={o}") for o in overrides) + "\n")
        path = run_dir / COMMAND
        atomic_write(path, (path.read_text() if path.is_file() else "") + note)
        print(f"busi: {run_dir}: {'; '.join(changes)} (recorded in its {CONFIG})")
    return new


def restart_fix(run_dir: Path) -> str:
    """What to do when a run's last checkpoint cannot be loaded: start it over, or anew."""
    return (f"delete {run_dir / STATE} and {run_dir / 'last.keras'} to train this run "
            "from the start, or start a new run")


def load_data(cfg: Config) -> tuple[Dataset, Manifest]:
    """The data set and its split manifest, loaded before a run folder exists, so that bad
    data or an impossible split leaves nothing behind."""
    ds = dataset_from_config(cfg)
    return ds, get_manifest(ds, cfg.split, cfg.runtime.seed)


def fit_stage(model, train: Batches, val: Batches, train_cfg, run_dir: Path,
              state: dict[str, Any], resume_hint: str,
              class_weight: dict[int, float] | None = None, extra: list | None = None,
              stage: str = "train", record: dict[str, Any] | None = None):
    """One ``model.fit`` stage, continued from ``state`` (a resume) and committed to state.json,
    so that an interrupt at any point continues the same run and not a different one.

    The stage runs up to epoch ``train_cfg.epochs`` of the run (epochs count across
    stages); ``stage`` names it in state.json, with ``record``, so that a resume knows
    which stage its epochs belong to. A stage that ended stays ended, with one exception:
    one that ran to its epoch limit goes on when a resume raised the limit
    (``--set training.*.epochs``); one that early stopping ended is never trained on.
    ``extra`` callbacks run before busi's own (which commit the epoch last).
    Returns the committed state and the run's training seconds so far: every committed
    epoch of every session and stage (``train_seconds`` in state.json), not this call's."""
    initial = int(state.get("epochs_done", 0))
    if (run_dir / "best.keras").is_file():
        ended_for = (state.get("fit_done_for") if state.get("stage", "train") == stage
                     else None)
        raised = ended_for is not None and initial >= ended_for and train_cfg.epochs > initial
        if ended_for is not None and not raised:
            # this stage ended (all epochs, or early stopping) before the interrupt
            return state, float(state.get("train_seconds", 0.0))
        if initial >= train_cfg.epochs:  # a resume set the limit to the epochs done: end here
            final = {**state, "stage": stage, **(record or {}),
                     "fit_done_for": train_cfg.epochs}
            write_state(run_dir, final)
            return final, float(final.get("train_seconds", 0.0))
    if initial and state.get("seed_states"):
        _restore_seed_states(model, state["seed_states"])
    try:
        fit(model, train, validation_data=val, epochs=train_cfg.epochs, initial_epoch=initial,
            callbacks=[*(extra or []),
                       *_callbacks(run_dir, train_cfg, state, stage=stage, record=record)],
            class_weight=class_weight,
            verbose=2)
    except KeyboardInterrupt:
        print(f"\nbusi: interrupted. Completed epochs are saved; continue with:\n  {resume_hint}",
              file=sys.stderr)
        raise
    final = json.loads((run_dir / STATE).read_text()) if (run_dir / STATE).is_file() \
        else {"epochs_done": initial, "best": math.inf, "best_epoch": -1}
    if not (run_dir / "best.keras").is_file():
        raise BusiError("training produced no finite val_loss, so there is no best checkpoint",
                        where=str(run_dir), fix="lower the learning rate or check the data")
    # Committed: a resume after a later interrupt (evaluation, out-of-fold U-Nets) must not
    # train an early-stopped model on to its epoch limit.
    final = {**final, "fit_done_for": train_cfg.epochs}
    write_state(run_dir, final)
    return final, float(final.get("train_seconds", 0.0))


def finish_state(run_dir: Path, state: dict[str, Any], **extra: Any) -> None:
    """Mark the run finished: from now on it is a default input of later commands."""
    write_state(run_dir, {**state, "finished": True, **extra})


def data_record(ds: Dataset, cfg: Config) -> dict[str, Any]:
    """What identifies the data a run used, for its split.json: every file's bytes
    (``Dataset.fingerprint``) and the image size the images were resized to."""
    return {"data_fingerprint": ds.fingerprint,
            "image_size": [int(v) for v in cfg.data.image_size]}


def check_same_data(record: dict[str, Any], ds: Dataset, image_size, *, where: str,
                    what: str = "this run",
                    fix: str = "restore the data it was trained on (data.root in its "
                               "config.yaml), or start a new run") -> None:
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
        raise BusiError(f"{what} used other data than {ds.location} holds now (data fingerprint "
                        f"{fp[:12]}, now {ds.fingerprint[:12]})", where=where, fix=fix)
