"""The command line: discoverable, and bad input is one message with exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from busi.cli import build_parser, main

SUBCOMMANDS = ["train-seg", "train-cls", "evaluate", "predict", "data", "demo", "runs"]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", [[c] for c in SUBCOMMANDS]
                         + [["data", "check"], ["data", "split"], ["data", "synth"]])
def test_every_subcommand_has_help_with_examples(argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    assert "examples:" in capsys.readouterr().out


def run_busi(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "busi.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("config, expected", [
    ("data:\n  rot: x\n", "unknown key 'data.rot'"),
    ("training:\n  seg:\n    batch_size: big\n", "'training.seg.batch_size' must be an integer"),
    ("training: [\n", "YAML syntax error"),
])
def test_bad_config_exits_2_without_traceback(tmp_path: Path, config: str,
                                              expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(config)
    proc = run_busi("data", "split", "--config", "bad.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr and "bad.yaml" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_folder_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = run_busi("data", "check", "--data", "no/such/folder", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no/such/folder" in proc.stderr and "fix:" in proc.stderr


@pytest.mark.parametrize("command", [["cv", "--models", "none"], ["cv", "--model", "cnn"],
                                     ["train-seg"]])
def test_training_on_a_missing_data_folder_leaves_no_run_folder(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`busi cv` made outputs/cv/<run> (config, cv.json) before it looked at the data."""
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--data", "no/such/folder"]) == 2
    assert "no/such/folder" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists() or not any(
        p.is_file() for p in (tmp_path / "outputs").rglob("*") if "cache" not in p.parts)


def test_synth_writes_a_dataset_and_refuses_to_overwrite(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--per-class", "2"]) == 0
    assert (out / "malignant" / "malignant (2)_mask.png").is_file()
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["data", "synth", "--out", str(out), "--per-class", "3"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_split_command_prints_the_manifest_and_counts(synth_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "split", "--data", str(synth_root), "--set", f"data.cache_dir={tmp_path}/c",
            "--set", f"split.manifest_dir={tmp_path}/m"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Split manifest:" in out and "test" in out
    assert len(list((tmp_path / "m").glob("*.csv"))) == 1


def test_a_zero_byte_image_in_the_data_exits_2_naming_it(synth_root: Path,
                                                         tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    (data / "normal/normal (2).png").write_bytes(b"")
    proc = run_busi("data", "split", "--data", str(data), "--set",
                    f"split.manifest_dir={tmp_path}/splits", "--set",
                    f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "normal (2).png" in proc.stderr and "fix:" in proc.stderr
    proc = run_busi("data", "check", "--data", str(data), "--set",
                    f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert proc.returncode == 0 and "normal (2).png" in proc.stdout


def test_an_unwritable_output_place_is_one_line_not_a_traceback(synth_root: Path,
                                                                tmp_path: Path) -> None:
    blocker = tmp_path / "splits"
    blocker.write_text("a file where a folder is needed")
    proc = run_busi("data", "split", "--data", str(synth_root), "--set",
                    f"split.manifest_dir={blocker}/sub", "--set",
                    f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(blocker) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, expected", [
    (["data", "split", "--set", "split.test_size=0.99"], "split.test_size"),
    (["data", "split", "--set", "split.val_size=0.95", "--set", "split.test_size=0.9"],
     "split.test_size, split.val_size"),
    (["cv", "--models", ",", "--set", "training.seg.epochs=1"], "--models"),
    (["data", "synth", "--out", "x", "--per-class", "-1"], "--per-class"),
    (["demo", "--per-class", "0"], "--per-class"),
])
def test_impossible_sizes_and_counts_are_one_line_before_any_work(
        synth_root: Path, tmp_path: Path, argv: list[str], expected: str) -> None:
    extra = [] if argv[0] in ("demo",) or argv[:2] == ["data", "synth"] else [
        "--data", str(synth_root), "--set", f"split.manifest_dir={tmp_path}/splits",
        "--set", f"data.cache_dir={tmp_path}/cache", "--set", f"outputs.root={tmp_path}/out"]
    proc = run_busi(*argv, *extra, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert expected in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


def test_cv_with_models_none_trains_the_unets_only(synth_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import busi.workflows.cv
    import busi.workflows.demo

    seen = {}
    monkeypatch.setattr(busi.workflows.cv, "run_cv",
                        lambda cfg, **kw: seen.update(kw))
    assert main(["cv", "--models", "none", "--data", str(synth_root)]) == 0
    assert seen["models"] == ()


def test_cv_without_models_cross_validates_the_configs_own_classifier(
        synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """busi issue 26: `busi cv --config configs/cpu.yaml` is the CV of cpu.yaml's recipe (one
    arm, its classifier and settings), the fold ensemble `busi predict` then defaults to."""
    import busi.workflows.cv

    seen = {}
    monkeypatch.setattr(busi.workflows.cv, "run_cv", lambda cfg, **kw: seen.update(kw, cfg=cfg))
    assert main(["cv", "--config", "cpu", "--data", str(synth_root)]) == 0
    assert seen["models"] == (seen["cfg"].model.classifier.name,) != ("cnn",)
    assert main(["cv", "--config", "paper", "--data", str(synth_root)]) == 0
    assert seen["models"] == ("cnn",)


# --------------------------------------------------------------------------- issue 16: flags


def test_outputs_and_name_flags_mean_the_config_keys_on_every_training_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One way to say where runs go (--outputs = --set outputs.root) and what a run is called
    (--name = --set outputs.run_name), the same on train-seg, train-cls and cv."""
    import busi.training.classification
    import busi.training.segmentation
    import busi.workflows.cv
    import busi.workflows.demo

    seen = {}
    monkeypatch.setattr(busi.training.segmentation, "train_segmentation",
                        lambda cfg, **kw: seen.update(cfg=cfg))
    monkeypatch.setattr(busi.training.classification, "train_classifier",
                        lambda cfg, **kw: seen.update(cfg=cfg))
    monkeypatch.setattr(busi.workflows.cv, "run_cv", lambda cfg, **kw: seen.update(cfg=cfg))
    out = str(tmp_path / "my outputs")
    for command in ("train-seg", "train-cls", "cv"):
        assert main([command, "--outputs", out, "--name", "try-1.b"]) == 0, command
        assert (seen["cfg"].outputs.root, seen["cfg"].outputs.run_name) == (out, "try-1.b")
        # the flag is the most specific: it wins over --set, as --data does
        assert main([command, "--set", "outputs.root=elsewhere", "--outputs", out]) == 0
        assert seen["cfg"].outputs.root == out and seen["cfg"].outputs.run_name == ""


@pytest.mark.parametrize("argv, expected", [
    (["train-seg", "--name", "my run"], "not a plain name"),
    (["cv", "--name", "../x"], "not a plain name"),
    (["train-cls", "--resume", "outputs/cls/cnn/x", "--name", "a"], "--name: is for a new run"),
    (["train-seg", "--resume", "outputs/seg/x", "--outputs", "o"], "--outputs: is for a new run"),
])
def test_a_bad_run_name_or_a_name_for_a_resumed_run_is_exit_2(
        tmp_path: Path, argv: list[str], expected: str) -> None:
    proc = run_busi(*argv, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert expected in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


def test_old_spellings_of_the_outputs_flag_still_work_with_a_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import busi.inference.predict
    import busi.workflows.cv
    import busi.workflows.demo

    seen = {}
    monkeypatch.setattr(busi.workflows.demo, "run_demo",
                        lambda workdir, **kw: seen.update(w=workdir))
    monkeypatch.setattr(busi.inference.predict, "predict_command",
                        lambda inputs, **kw: seen.update(kw))
    assert main(["demo", "--workdir", str(tmp_path / "d")]) == 0
    assert seen["w"] == tmp_path / "d"
    assert "busi: note: --workdir is deprecated; use --outputs" in capsys.readouterr().err
    assert main(["demo", "--outputs", str(tmp_path / "e")]) == 0
    assert seen["w"] == tmp_path / "e" and not capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    assert "--workdir" not in capsys.readouterr().out
    assert main(["predict", "x.png", "--outputs", str(tmp_path / "o")]) == 0
    assert seen["outputs_root"] == str(tmp_path / "o")


def test_a_confidence_threshold_outside_0_1_is_exit_2_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "x.png", "--min-confidence", "1.5", "--outputs",
                 str(tmp_path / "o")]) == 2
    assert "--min-confidence: must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- paths are not YAML

PATHS = ["scans #2/BUSI", "2024-01-01", "on", "null"]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The config each training command would start with (nothing is trained)."""
    import busi.training.classification
    import busi.training.segmentation
    import busi.workflows.cv

    seen: dict = {}
    monkeypatch.setattr(busi.training.segmentation, "train_segmentation",
                        lambda cfg, **kw: seen.update(cfg=cfg))
    monkeypatch.setattr(busi.training.classification, "train_classifier",
                        lambda cfg, **kw: seen.update(cfg=cfg))
    monkeypatch.setattr(busi.workflows.cv, "run_cv", lambda cfg, **kw: seen.update(cfg=cfg))
    return seen


@pytest.mark.parametrize("path", PATHS)
def test_a_data_path_reaches_the_config_as_typed(captured: dict, path: str) -> None:
    """--data "scans #2/BUSI" is not `scans`, --data 2024-01-01 not a date, --data on not true:
    one --data or several, on every command that reads data."""
    for command in ("train-seg", "train-cls", "cv", "data check", "data split"):
        argv = command.split()
        if command.startswith("data"):  # these do the work themselves: read the config only
            from busi.cli import build_parser, load_cli_config

            args = build_parser().parse_args([*argv, "--data", path])
            assert load_cli_config(args).data.root == path, command
            args = build_parser().parse_args([*argv, "--data", path, "--data", "b #3"])
            assert load_cli_config(args).data.root == [path, "b #3"], command
            continue
        assert main([*argv, "--data", path]) == 0, command
        assert captured["cfg"].data.root == path, command
        assert main([*argv, "--data", path, "--data", "b #3"]) == 0, command
        assert captured["cfg"].data.root == [path, "b #3"], command


@pytest.mark.parametrize("path", PATHS)
def test_an_outputs_folder_and_a_run_name_reach_the_config_as_typed(
        captured: dict, path: str) -> None:
    for command in ("train-seg", "train-cls", "cv"):
        assert main([command, "--outputs", f"my runs #2/{path}"]) == 0, command
        assert captured["cfg"].outputs.root == f"my runs #2/{path}", command
    for name in ("2024-01-01", "on", "123", "1e5"):  # plain names, but YAML reads them as others
        assert main(["train-seg", "--name", name]) == 0, name
        assert captured["cfg"].outputs.run_name == name


@pytest.mark.parametrize("root", ["my runs #2", "site: A", "on"])
def test_a_cv_folds_runs_go_to_the_fold_folder_whatever_the_cv_root_is_called(
        tmp_path: Path, root: str) -> None:
    """busi cv --outputs "my runs #2" put every fold's runs under `my runs/` (YAML's comment)
    and then could not find them."""
    from busi.config import load_config
    from busi.workflows.cv import _fold_config

    cfg = load_config(None, [("outputs.root", root), ("outputs.run_name", "cv1")])
    for fold_dir in (tmp_path / root / "cv" / "20260101-000000" / "fold0",
                     Path(root) / "cv" / "x" / "fold1"):
        fold = _fold_config(cfg, fold_dir, ["model.classifier.name=vgg19"])
        assert fold.outputs.root == str(fold_dir)
        assert fold.outputs.run_name == "" and fold.model.classifier.name == "vgg19"


def test_the_demo_keeps_an_outputs_folder_with_a_hash_in_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import busi.data.check
    import busi.data.synth
    import busi.training.segmentation

    class Stop(Exception):
        pass

    seen = {}

    def first_step(cfg, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(busi.data.synth, "write_dataset", lambda *a, **kw: None)
    monkeypatch.setattr(busi.data.check, "check_dataset", lambda *a, **kw: None)
    monkeypatch.setattr(busi.data.check, "format_report", lambda *a, **kw: "")
    monkeypatch.setattr(busi.training.segmentation, "train_segmentation", first_step)
    work = tmp_path / "my runs #2"
    with pytest.raises(Stop):
        main(["demo", "--outputs", str(work)])
    cfg = seen["cfg"]
    assert (cfg.data.root, cfg.outputs.root) == (str(work / "data"), str(work))
    assert (cfg.data.cache_dir, cfg.split.manifest_dir) == (str(work / "cache"),
                                                            str(work / "splits"))


@pytest.mark.parametrize("argv, flag", [
    (["evaluate", "--data", "site.csv", "--cls-run", "A", "--cls-run", "B"], "--cls-run"),
    (["predict", "x.png", "--cls-run", "A", "--cls-run", "B"], "--cls-run"),
    (["predict", "x.png", "--seg-run", "A", "--seg-run", "B"], "--seg-run")])
def test_a_run_flag_that_names_one_run_refuses_a_second(
        argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Beside evaluate's repeatable --seg-run and --data, `--cls-run A --cls-run B` used to
    evaluate B alone, silently (found running issue 27's three classifiers at BUS-UCLM):
    now it is exit 2 naming both runs and the fix, before any work."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} names one run; it was given twice (A, B)" in err and "Fix: " in err
    again = [a if a != "B" else "A" for a in argv]  # the same run twice is harmless
    assert getattr(build_parser().parse_args(again), flag[2:].replace("-", "_")) == "A"
