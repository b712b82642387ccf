"""Every script in scripts/ runs on the configs as they are now.

docs/PERFORMANCE.md and docs/RESULTS.md quote these scripts' commands; a config change
that breaks one (``precision: auto`` in cpu.yaml once ended ``bench.py --config cpu`` in
``KeyError: 'auto'``) must fail here, not when someone next measures. The benchmarks run
on every config in configs/ as it is with ``--dry-run`` (config, precision, compute dtype:
where the KeyError was), and for real with ``pytest -m slow``, shrunk with ``--set`` to
32x32 images and batches of 4; what they measure is not checked, only that they finish.
"""

from __future__ import annotations

import csv
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from busi.config import find_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
# Every config fits these: 32 is a multiple of each U-Net's pooling (MobileNet encoder: 32).
# cpu.yaml's ImageNet encoder weights are a download; random weights time the same.
SMALL = ["--set", "data.image_size=[32,32]", "--set", "training.seg.batch_size=4",
         "--set", "model.unet.encoder_weights="]


def test_the_scripts_and_configs_tested_here_are_all_there_are() -> None:
    assert {p.stem for p in SCRIPTS} >= {"bench", "bench_load", "bench_train", "check_report",
                                         "patient_split", "seg_eval"}
    assert set(CONFIGS) >= {"cpu", "demo", "paper"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_script_imports_and_answers_help(script: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts add their folder
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run where data/cache may be written; bare config names then come from the package."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def test_bench_resolves_every_config_as_it_is(in_tmp: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The KeyError's path, on the configs unchanged: config -> precision -> compute dtype."""
    from busi import runtime

    bench = load_script("bench")
    assert bench.matmul_gflops("auto", n=32, repeats=1) > 0  # where 'auto' was a KeyError
    here = runtime.resolve_precision("auto")
    for name in CONFIGS:
        assert bench.main(["--config", name, "--dry-run"]) == 0, name
        out = capsys.readouterr().out
        assert "nothing measured" in out
        asked = load_config(find_config(name)).runtime.precision
        assert (f"{here} (auto))" if asked == "auto" else f"{asked})") in out, (name, out)


def test_bench_train_resolves_every_config_as_it_is(in_tmp: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from busi import runtime

    bench_train = load_script("bench_train")
    assert bench_train.main(["--configs", *CONFIGS, "--precisions", "auto", "float32",
                             "--dry-run"]) == 0
    planned = [r for r in capsys.readouterr().out.splitlines() if r.startswith("dry run:")]
    assert len(planned) == 2 * len(CONFIGS)
    assert sum(f", {runtime.resolve_precision('auto')}, " in r for r in planned) >= len(CONFIGS)
    assert not any("auto" in r for r in planned), planned


@pytest.mark.slow  # minutes: each config's U-Net is built and traced twice
def test_bench_runs_on_every_config(synth_root: Path, in_tmp: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("bench")
    for name in CONFIGS:
        assert bench.main(["--config", name, "--data", str(synth_root), *SMALL,
                           "--images", "8", "--epochs", "1", "--seconds", "0.05",
                           "--matmul-size", "32"]) == 0, name
        out = capsys.readouterr().out
        assert "| U-Net training GFLOP/s" in out, (name, out)
        # auto is measured as what it resolves to, and the table says which
        assert "auto" not in out.split("| measurement |")[1], (name, out)


@pytest.mark.slow  # minutes: each config's U-Net is built and traced
def test_bench_train_runs_on_every_config(synth_root: Path, in_tmp: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bench_train = load_script("bench_train")
    assert bench_train.main(["--configs", *CONFIGS, "--data", str(synth_root), *SMALL,
                             "--steps", "1", "--seconds", "0.05"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")][1:]
    assert {r.split(" | ")[0][2:] for r in rows} == set(CONFIGS)
    assert all(r.split(" | ")[2] in ("float32", "mixed_bfloat16") for r in rows), rows


def test_bench_load_runs_on_a_busi_layout_folder(synth_root: Path, in_tmp: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script("bench_load").main(["--data", str(synth_root), "--size", "32",
                                    "--repeats", "1"]) == 0
    assert "images: 36 at 32x32" in capsys.readouterr().out


def test_patient_split_keeps_each_patient_on_one_side(synth_root: Path, in_tmp: Path) -> None:
    manifest = in_tmp / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "label", "patient"])
        for c in ("benign", "malignant", "normal"):
            for i in range(1, 13):
                w.writerow([synth_root / c / f"{c} ({i}).png",
                            synth_root / c / f"{c} ({i})_mask.png", c, f"{c[0]}{i // 2}"])
    load_script("patient_split").main([str(manifest), "--out", str(in_tmp / "halves")])
    sides = []
    for part in ("train", "test"):
        with open(in_tmp / "halves" / f"{part}.csv", newline="") as fh:
            sides.append({r["patient"] for r in csv.DictReader(fh)})
    assert sides[0] and sides[1] and not sides[0] & sides[1]


def _run(outputs: Path, kind: str, name: str, *, finished: bool, stamp: str = "20261206-000000",
         model: str = "") -> Path:
    """A training run folder as busi leaves it: only state.json matters to the chain."""
    run = outputs / kind / model / f"{stamp}-{name}"
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"finished": finished}))
    return run


def _chain_inputs(tmp_path: Path) -> list[str]:
    (tmp_path / "busi").mkdir()
    (tmp_path / "mobilenet.weights.h5").touch()
    return ["--data", str(tmp_path / "busi"),
            "--mobilenet-weights", str(tmp_path / "mobilenet.weights.h5")]


def test_paper_end_to_end_resumes_a_stopped_stage_and_keeps_finished_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The chain outlives a working session: run again, it continues where it stopped."""
    chain = load_script("paper_end_to_end")
    out = tmp_path / "outputs"
    args = [*_chain_inputs(tmp_path), "--outputs", str(out), "--no-cpu", "--dry-run"]

    def planned() -> list[str]:
        assert chain.main(args) == 0
        return capsys.readouterr().out.splitlines()

    assert planned()[0].startswith("busi train-seg --config paper_bce_dice --data ")
    seg = _run(out, "seg", "paper_bce_dice", finished=False)
    _run(out, "seg", "paper", finished=True, stamp="20261206-010000")  # another config's chain
    assert planned()[0] == f"busi train-seg --resume {seg}"

    (seg / "state.json").write_text(json.dumps({"finished": True}))
    mobilenet = _run(out, "cls", "paper_bce_dice", finished=True, model="mobilenet")
    lines = planned()
    assert "--model cnn" in lines[0] and f"--seg-run {seg}" in lines[0]
    assert not any("--model mobilenet" in line for line in lines)
    evaluations = [line for line in lines if line.startswith("busi evaluate")]
    assert len(evaluations) == 2 and all(str(mobilenet) in e for e in evaluations)
    assert "--model vgg19" in lines[-2] and "model.classifier.weights=none" in lines[-2]

    args += ["--set", "augmentation.engine=layers"]  # e.g. a GPU machine without TensorFlow
    trainings = [line for line in planned() if line.startswith("busi train-cls --config")]
    assert len(trainings) == 2 and all("--set augmentation.engine=layers" in t for t in trainings)


def test_paper_end_to_end_compares_the_u_nets_before_the_classifiers_hours(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain = load_script("paper_end_to_end")
    (tmp_path / "effnet.npz").touch()
    (tmp_path / "site.csv").touch()
    assert chain.main([*_chain_inputs(tmp_path), "--outputs", str(tmp_path / "outputs"),
                       "--effnet-weights", str(tmp_path / "effnet.npz"),
                       "--site", str(tmp_path / "site.csv"), "--dry-run"]) == 0
    steps = []
    for line in capsys.readouterr().out.splitlines():
        cmd = line.split()
        what = cmd[cmd.index("--model") + 1] if "--model" in cmd else cmd[1]
        steps.append(what + ("@site" if "--data" in cmd and what == "evaluate" else ""))
        if what == "train-seg":
            steps[-1] = cmd[cmd.index("--name") + 1]
    assert steps == ["paper_bce_dice", "cpu", "evaluate@site", "evaluate", "mobilenet", "cnn",
                     "efficientnet_lite0", "evaluate", "vgg19", "evaluate"]


def test_paper_end_to_end_runs_each_stage_once_in_order_and_stops_at_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = load_script("paper_end_to_end")
    out = tmp_path / "outputs"
    ran: list[list[str]] = []
    fail = {"cnn"}

    def fake_busi(argv: list[str]) -> subprocess.CompletedProcess[str]:
        assert argv[:3] == [sys.executable, "-m", "busi.cli"]
        cmd = ["busi", *argv[3:]]
        ran.append(cmd)
        if cmd[1] != "evaluate":
            model = cmd[cmd.index("--model") + 1] if "--model" in cmd else ""
            if model in fail:
                return subprocess.CompletedProcess(cmd, 2)
            kind = "seg" if cmd[1] == "train-seg" else "cls"
            _run(out, kind, cmd[cmd.index("--name") + 1], finished=True, model=model,
                 stamp=f"20261206-{len(ran):06d}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(chain.subprocess, "run", fake_busi)
    args = [*_chain_inputs(tmp_path), "--outputs", str(out), "--no-cpu"]
    assert chain.main([*args, "--site", str(tmp_path / "site.csv")]) == 2  # not there
    assert ran == []  # refused before the first stage, not hours into the chain
    (tmp_path / "site.csv").touch()
    args += ["--site", str(tmp_path / "site.csv")]
    assert chain.main(args) == 2  # the CNN's exit code: the chain stops there
    assert [c[1] for c in ran] == ["train-seg", "evaluate", "evaluate", "train-cls", "train-cls"]
    seg = ran[0][ran[0].index("--name") + 1]
    assert ran[1][-2:] == ran[2][-2:] and ran[2][-2].startswith("--seg-run")  # the U-Net alone
    assert "--data" in ran[1] and len(ran[2]) == 6 and ran[2][-1].endswith(f"-{seg}")

    fail.clear()
    ran.clear()
    assert chain.main(args) == 0  # again: the U-Net and MobileNet are kept
    steps = [c[1] if c[1] != "train-cls" else c[c.index("--model") + 1] for c in ran]
    assert steps == ["cnn", "evaluate", "evaluate", "vgg19", "evaluate"]
    assert "--data" in ran[1] and "--data" not in ran[2] and "--data" not in ran[4]
    assert sum(str(a).endswith("-paper_bce_dice") for a in ran[4]) == 4  # 3 classifiers + U-Net
