"""A flag is honoured or refused, never parsed and dropped: --resume, --folds, fine-tuning.

A resumed run is the run it was (its own config.yaml); the --set keys that only say how long
it goes on are honoured and written to that config.yaml, every other flag that would change
it is exit 2. ``fine_tune_epochs`` is the number of fine-tuning epochs, and a resume during
fine-tuning goes on fine-tuning.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from busi.cli import main
from busi.config import load_config
from busi.runs import read_config, write_config


def fake_run(root: Path, kind: str, state: dict, overrides: tuple = ()) -> Path:
    """An unfinished run folder as train-seg / train-cls leave one: config.yaml, state.json,
    command.txt, last.keras (a stand-in: the commands under test stop before loading it)."""
    run_dir = root / "outputs" / ("seg" if kind == "seg" else "cls/cnn") / "20260101-000000"
    run_dir.mkdir(parents=True)
    write_config(run_dir, load_config(None, [("outputs.root", str(root / "outputs")),
                                             *overrides]))
    (run_dir / "state.json").write_text(json.dumps({"finished": False, **state}))
    (run_dir / "command.txt").write_text("busi train-seg\n")
    (run_dir / "last.keras").write_bytes(b"")  # a state.json counts only beside a checkpoint
    return run_dir


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trainers(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The train functions the CLI calls, replaced by ones that note what they were given
    (and the run's config.yaml at that moment, which a real resume reads back)."""
    import busi.training.classification
    import busi.training.segmentation

    seen: dict = {}

    def note(cfg, resume=None, **kw):
        seen.update(cfg=cfg, resume=resume, on_disk=read_config(Path(resume)) if resume else None)

    monkeypatch.setattr(busi.training.segmentation, "train_segmentation", note)
    monkeypatch.setattr(busi.training.classification, "train_classifier", note)
    return seen


# --------------------------------------------------------------------------- refused flags


@pytest.mark.parametrize("argv, expected", [
    (["train-seg", "--config", "cpu"], "--config: cannot change a resumed run"),
    (["train-seg", "--config", "paper"], "--config: cannot change a resumed run"),  # the default
    (["train-seg", "--data", "elsewhere"], "--data: cannot change a resumed run"),
    (["train-cls", "--model", "vgg19"], "--model: cannot change a resumed run"),
    (["train-cls", "--data", "a", "--data", "b"], "--data: cannot change a resumed run"),
    (["cv", "--config", "cpu"], "--config: cannot change a resumed run"),
    (["cv", "--data", "elsewhere"], "--data: cannot change a resumed run"),
    (["cv", "--set", "training.seg.epochs=5"], "--set training.seg.epochs=5: cannot change a "
                                               "resumed CV"),
    (["train-seg", "--set", "model.unet.depth=3"],
     "--set model.unet.depth=3: 'model.unet.depth' cannot change when a run is continued"),
    (["train-seg", "--set", "training.seg.learning_rate=1e-3"], "cannot change when a run is"),
    (["train-cls", "--set", "training.seg.epochs=3"], "'training.seg.epochs' cannot change"),
    (["train-cls", "--set", "model.classifier.freeze_base=true"], "cannot change when a run"),
])
def test_a_flag_that_would_change_a_resumed_run_is_exit_2_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        trainers: dict, argv: list[str], expected: str) -> None:
    """train-seg --resume R --config X (or --data, --model, --set KEY=... of a key that is not
    about how long the run goes on) was parsed and ignored: now it is one line, exit 2."""
    kind = "seg" if argv[0] == "train-seg" else "cls"
    run_dir = fake_run(tmp_path, kind, {"epochs_done": 3})
    if argv[0] == "cv":
        (run_dir / "cv.json").write_text(json.dumps({"folds": 3, "models": ["cnn"]}))
    before = listing(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([argv[0], "--resume", str(run_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert expected in err and "fix:" in err and len(err.strip().splitlines()) == 1
    assert listing(tmp_path) == before, "nothing written"
    assert not trainers, "nothing trained"


def test_a_resumed_cv_refuses_another_number_of_folds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi cv --resume R --folds K trained R's own folds and said nothing of K."""
    import busi.training.segmentation
    from busi.errors import BusiError

    cv_dir = tmp_path / "outputs" / "cv" / "20260101-000000"
    cv_dir.mkdir(parents=True)
    write_config(cv_dir, load_config(None, [("outputs.root", str(tmp_path / "outputs"))]))
    (cv_dir / "cv.json").write_text(json.dumps({"folds": 3, "models": ["cnn"],
                                                "arms": {"cnn": ["model.classifier.name=cnn"]}}))
    before = listing(tmp_path)
    assert main(["cv", "--resume", str(cv_dir), "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "--folds: this CV has 3 folds" in err and "drop --folds" in err
    assert listing(tmp_path) == before, "nothing written"

    def reached(cfg, **kw):  # the first fold's U-Net: the CV goes on
        raise BusiError("reached the first fold's U-Net")

    monkeypatch.setattr(busi.training.segmentation, "train_segmentation", reached)
    for same in (["--folds", "3"], []):  # its own number, or none: continued
        assert main(["cv", "--resume", str(cv_dir), *same]) == 2
        assert "reached the first fold's U-Net" in capsys.readouterr().err


# --------------------------------------------------------------------------- honoured --set


def test_set_epochs_on_resume_extends_the_run_and_the_run_records_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], trainers: dict) -> None:
    """train-seg --resume R --set training.seg.epochs=150 was parsed and ignored (R's own
    config.yaml kept epochs 100). Now it is what the resumed run trains to, and the run's
    config.yaml and command.txt say so."""
    run_dir = fake_run(tmp_path, "seg", {"epochs_done": 40})
    assert main(["train-seg", "--resume", str(run_dir), "--set", "training.seg.epochs=150",
                 "--set", "training.seg.early_stopping_patience=7"]) == 0
    assert trainers["resume"] == str(run_dir)
    for cfg in (trainers["cfg"], trainers["on_disk"], read_config(run_dir)):
        assert cfg.training.seg.epochs == 150 and cfg.training.seg.early_stopping_patience == 7
        assert cfg.outputs.root == str(tmp_path / "outputs"), "the rest is the run's own"
    assert "training.seg.epochs 100 -> 150" in capsys.readouterr().out
    command = (run_dir / "command.txt").read_text()
    assert "--resume" in command and "--set=training.seg.epochs=150" in command

    cls_dir = fake_run(tmp_path / "c", "cls", {"epochs_done": 2},
                       (("model.classifier.freeze_base", True),
                        ("model.classifier.name", "mobilenet")))
    assert main(["train-cls", "--resume", str(cls_dir), "--set", "training.cls.epochs=20",
                 "--set", "model.classifier.fine_tune_epochs=4"]) == 0
    cfg = read_config(cls_dir)
    assert (cfg.training.cls.epochs, cfg.model.classifier.fine_tune_epochs) == (20, 4)


@pytest.mark.parametrize("kind, state, setting, expected", [
    ("seg", {"epochs_done": 40}, "training.seg.epochs=30",
     "30 epochs is fewer than the 40 this run has trained"),
    ("cls", {"epochs_done": 12}, "training.cls.epochs=10", "10 epochs is fewer than the 12"),
    ("cls", {"epochs_done": 12, "stage": "fine_tune", "fine_tune_from": 9},
     "training.cls.epochs=50", "this run's first stage ended at epoch 9 and it is fine-tuning"),
    ("cls", {"epochs_done": 12, "stage": "fine_tune", "fine_tune_from": 9},
     "model.classifier.fine_tune_epochs=2", "2 fine-tuning epochs is fewer than the 3"),
])
def test_an_epoch_limit_a_resumed_run_has_passed_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], trainers: dict, kind: str,
        state: dict, setting: str, expected: str) -> None:
    run_dir = fake_run(tmp_path, kind, state, (("model.classifier.freeze_base", True),
                                               ("model.classifier.name", "mobilenet"),
                                               ("model.classifier.fine_tune_epochs", 5)))
    before = listing(tmp_path)
    assert main([f"train-{kind}", "--resume", str(run_dir), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert f"--set {setting}: {expected}" in err and "fix:" in err
    assert listing(tmp_path) == before and not trainers


def test_a_stage_that_ran_to_its_limit_goes_on_when_raised_an_early_stopped_one_does_not(
        tmp_path: Path) -> None:
    """What the honoured --set training.*.epochs does in the fit loop: a stage that trained all
    its epochs goes on to the new limit; one that early stopping ended stays ended; a limit
    equal to the epochs done ends the stage there."""
    import keras

    from busi.config import TrainConfig
    from busi.data.batches import Batches
    from busi.runs import saved_state
    from busi.training.loop import fit_stage

    rng = np.random.default_rng(0)
    x, y = rng.random((8, 4, 4), dtype=np.float32), rng.random((8, 4, 4), dtype=np.float32)
    model = keras.Sequential([keras.Input((4, 4)), keras.layers.Dense(4)])
    model.compile("adam", "mse")
    train, val = Batches(x, y, 4, x_scale=1.0), Batches(x, y, 4, x_scale=1.0)

    def rows() -> int:
        with open(tmp_path / "history.csv") as fh:
            return len(list(csv.DictReader(fh)))

    state, _ = fit_stage(model, train, val, TrainConfig(epochs=2), tmp_path, {}, "hint")
    assert (state["epochs_done"], state["fit_done_for"], rows()) == (2, 2, 2)
    state, _ = fit_stage(model, train, val, TrainConfig(epochs=3), tmp_path,
                         saved_state(tmp_path), "hint")
    assert (state["epochs_done"], state["fit_done_for"], rows()) == (3, 3, 3), "raised: goes on"
    early = {**saved_state(tmp_path), "fit_done_for": 5}  # early stopping ended it at 3 of 5
    (tmp_path / "state.json").write_text(json.dumps(early))
    state, _ = fit_stage(model, train, val, TrainConfig(epochs=8), tmp_path, early, "hint")
    assert (state["epochs_done"], rows()) == (3, 3), "an early-stopped stage was trained on"
    cut = {k: v for k, v in early.items() if k != "fit_done_for"}  # interrupted at 3 of 5
    state, _ = fit_stage(model, train, val, TrainConfig(epochs=3), tmp_path, cut, "hint")
    assert (state["epochs_done"], state["fit_done_for"], rows()) == (3, 3, 3)


# --------------------------------------------------------------------------- fine-tuning


TINY_CLS = [("training.cls.batch_size", 8), ("training.cls.steps_per_epoch", 1),
            ("training.cls.learning_rate", 1e-3), ("model.classifier.weights", "none"),
            ("model.classifier.masks", "none"), ("augmentation.engine", "none"),
            ("data.image_size", [32, 32]), ("split.test_size", 0.25)]


def tiny_cls_config(synth_root: Path, work: Path, *extra: tuple) -> object:
    return load_config(None, [("data.root", str(synth_root)),
                              ("data.cache_dir", str(work / "cache")),
                              ("split.manifest_dir", str(work / "splits")),
                              ("outputs.root", str(work / "outputs")), *TINY_CLS, *extra])


@pytest.fixture
def no_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip what a classifier run does after training (Grad-CAM, evaluation, reports): these
    tests are about its epochs."""
    import busi.training.classification as cls

    monkeypatch.setattr(cls, "save_gradcam", lambda *a, **kw: None)
    monkeypatch.setattr(cls, "evaluate_run", lambda *a, **kw: {"text": ""})
    monkeypatch.setattr(cls, "report_after_run", lambda *a, **kw: None)


def epochs_of(run_dir: Path) -> list[int]:
    with open(run_dir / "history.csv") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_fine_tune_epochs_is_the_number_of_fine_tuning_epochs_also_across_a_resume(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        no_reports: None) -> None:
    """Stage 1 (frozen base) stops early after 1 of 4 epochs; fine_tune_epochs: 2 is then 2
    epochs (it was 5: stage 2 ran to epochs + fine_tune_epochs = 6). A Ctrl-C after the first
    fine-tuning epoch resumes fine-tuning with its unfrozen blocks, not stage 1 again."""
    import busi.training.classification as cls
    from busi.training import loop

    cfg = tiny_cls_config(synth_root, tmp_path, ("model.classifier.name", "mobilenet"),
                          ("training.cls.epochs", 4), ("model.classifier.freeze_base", True),
                          ("model.classifier.fine_tune_blocks", 1),
                          ("model.classifier.fine_tune_epochs", 2))
    real_end, real_fit = loop.RunCheckpoint.on_epoch_end, cls.fit_stage
    calls: list[tuple] = []

    def early_stop_then_ctrl_c(self, epoch, logs=None):
        real_end(self, epoch, logs)
        if epoch == 0:
            self.model.stop_training = True  # as EarlyStopping does
        elif epoch == 1:
            raise KeyboardInterrupt  # after the first fine-tuning epoch is committed

    def noted_fit(model, train, val, train_cfg, run_dir, state, *args, **kw):
        calls.append((kw.get("stage", "train"), int(state.get("epochs_done", 0)),
                      train_cfg.epochs, len(model.trainable_weights)))
        return real_fit(model, train, val, train_cfg, run_dir, state, *args, **kw)

    monkeypatch.setattr(cls, "fit_stage", noted_fit)
    monkeypatch.setattr(loop.RunCheckpoint, "on_epoch_end", early_stop_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        cls.train_classifier(cfg)
    (run_dir,) = (tmp_path / "outputs" / "cls" / "mobilenet").iterdir()
    cut = json.loads((run_dir / "state.json").read_text())
    assert (cut["epochs_done"], cut["stage"], cut["fine_tune_from"]) == (2, "fine_tune", 1)
    (_, _, _, frozen), (stage2, start, end, unfrozen) = calls
    assert (stage2, start, end) == ("fine_tune", 1, 3) and unfrozen > frozen

    monkeypatch.setattr(loop.RunCheckpoint, "on_epoch_end", real_end)
    calls.clear()
    assert cls.train_classifier(cfg, resume=str(run_dir)) == run_dir
    assert calls == [("fine_tune", 2, 3, unfrozen)], "the resume went back to stage 1"
    assert epochs_of(run_dir) == [0, 1, 2]  # 1 frozen-base epoch, then exactly 2 fine-tuning
    done = json.loads((run_dir / "state.json").read_text())
    assert (done["epochs_done"], done["stage"], done["finished"]) == (3, "fine_tune", True)


def test_freeze_base_with_the_cnn_is_said_and_trains_one_stage(
        synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        no_reports: None) -> None:
    """The CNN has no pretrained base: freeze_base did nothing without a word (and a second
    stage of fine_tune_epochs trained it on at the fine-tuning rate). Now: a one-line warning,
    and one stage of training.cls.epochs."""
    from busi.config import ClassifierConfig
    from busi.training.classification import fine_tune_epochs, train_classifier

    assert fine_tune_epochs(ClassifierConfig(name="mobilenet", freeze_base=True,
                                             fine_tune_epochs=3)) == 3
    assert fine_tune_epochs(ClassifierConfig(name="vgg19", freeze_base=True)) == 0
    assert not capsys.readouterr().err
    assert fine_tune_epochs(ClassifierConfig(name="vgg19", fine_tune_epochs=3)) == 0
    assert "fine_tune_epochs is the stage after training with a frozen base, and freeze_base " \
           "is false" in capsys.readouterr().err

    cfg = tiny_cls_config(synth_root, tmp_path, ("model.classifier.name", "cnn"),
                          ("training.cls.epochs", 1), ("model.classifier.freeze_base", True),
                          ("model.classifier.fine_tune_epochs", 2))
    run_dir = train_classifier(cfg)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "freeze_base" in line]
    assert len(warnings) == 1 and "does nothing for the cnn classifier" in warnings[0]
    assert epochs_of(run_dir) == [0]
