"""Cross-validation, run reports, Grad-CAM, and exact reruns -- on tiny synthetic data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from test_pipeline import TINY as PIPELINE_TINY

from busi.cli import main

TINY = PIPELINE_TINY + "runtime: {{deterministic: true}}\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    work = tmp_path_factory.mktemp("cv")
    (work / "tiny.yaml").write_text(TINY.format(data=synth_root, work=work))
    return work


@pytest.fixture(scope="module")
def cv_run(work: Path) -> Path:
    """A 3-fold CV killed during fold 1's classifier, then resumed."""
    from busi.training import classification as train

    real = train.train_classifier
    calls = {"n": 0}

    def killed_in_fold_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "train_classifier", killed_in_fold_1)
    assert main(["cv", "--config", str(work / "tiny.yaml"), "--folds", "3"]) == 130
    mp.undo()
    (cv_dir,) = list((work / "outputs" / "cv").iterdir())
    assert not (cv_dir / "cv_results.json").exists()  # unfinished: no aggregate tables yet
    fold0 = sorted((cv_dir / "fold0").rglob("best.keras"))
    stamps = {p: p.stat().st_mtime_ns for p in fold0}
    assert main(["cv", "--resume", str(cv_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in fold0} == stamps  # fold 0 was not trained again
    return cv_dir


def test_cv_tests_every_image_once_and_pools_the_predictions(cv_run: Path,
                                                              synth_root: Path) -> None:
    import csv

    with open(cv_run / "pooled" / "cnn" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_images = sum(1 for p in synth_root.rglob("*.png") if "_mask" not in p.name)
    assert len(rows) == n_images == len({r["file"] for r in rows})
    result = json.loads((cv_run / "cv_results.json").read_text())
    pooled = result["classification"]["cnn"]["pooled"]
    t, p = [r["true"] for r in rows], [r["pred"] for r in rows]
    assert pooled["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert pooled["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    folds = result["classification"]["cnn"]["per_fold"]
    assert len(folds) == 3
    assert result["classification"]["cnn"]["accuracy"]["mean"] == pytest.approx(
        np.mean([f["accuracy"] for f in folds]))
    assert len(result["segmentation"]["per_fold"]) == 3
    assert (cv_run / "pooled" / "cnn" / "confusion_matrix.png").is_file()
    md = (cv_run / "cv_results.md").read_text()
    assert "mean ± std" in md and "pooled" in md
    # every class's pooled recall beside the headline, equal to the pooled predictions'
    summary = md[md.index("| arm | accuracy (mean ± std)"):]  # not the validation table
    row = next(line for line in summary.splitlines() if line.startswith("| cnn |"))
    recall_malignant = np.mean([pr == "malignant"
                                for tr, pr in zip(t, p, strict=True) if tr == "malignant"])
    assert "recall malignant" in md and row.split("|")[-3].strip() == f"{recall_malignant:.2f}"
    assert result["arms"] == {"cnn": ["model.classifier.name=cnn"]}


def test_cv_folds_are_disjoint_and_stratified(cv_run: Path) -> None:
    tests = []
    unets = json.loads((cv_run / "cv.json").read_text())["unets"]
    for k in range(3):
        (seg,) = list((cv_run / f"fold{k}" / "seg").iterdir())
        assert unets[f"fold{k}"] == f"fold{k}/seg/{seg.name}"  # the fold's U-Net, recorded
        split = json.loads((seg / "split.json").read_text())
        assert split["fold"] == k
        scores = json.loads((seg / "test_scores.json").read_text())
        tests.append(set(scores))
    assert not (tests[0] & tests[1] or tests[0] & tests[2] or tests[1] & tests[2])
    for s in tests:  # 12 images per class over 3 folds: 4 of each class per fold
        assert sorted(sum(f.startswith(c) for f in s) for c in ("benign", "malignant",
                                                                 "normal")) == [4, 4, 4]


def test_report_is_self_contained_and_has_every_section(cv_run: Path) -> None:
    html = (cv_run / "report.html").read_text()
    assert 'src="' in html and html.count('src="data:image/png;base64,') == html.count('src="')
    for section in ("Config", "Data and split", "Loss curves", "Segmentation",
                    "pooled out-of-fold", "Environment and provenance", "git_commit"):
        assert section in html, section
    md = (cv_run / "report.md").read_text()
    links = [unquote(part.split(")")[0]) for part in md.split("](")[1:]]
    assert links and all((cv_run / link).is_file() for link in links)


def test_a_cvs_list_of_arms_is_a_list_in_the_html_report() -> None:
    """cv_results.md lists each arm's overrides one per line; report.html ran them together
    into one paragraph (seen in Chromium on the real BUSI CV)."""
    from busi.reporting.report import _md_to_html

    html = _md_to_html("Arms:\n\n- `cnn`: `model.classifier.name=cnn`\n"
                       "- `mnet`: `model.classifier.name=mobilenet`\n\nAfter.")
    assert ("<ul><li><code>cnn</code>: <code>model.classifier.name=cnn</code></li>"
            "<li><code>mnet</code>: <code>model.classifier.name=mobilenet</code></li></ul>") in html
    assert html.endswith("<p>After.</p>")


def test_a_wide_failure_gallery_gets_the_pages_full_width(tmp_path: Path) -> None:
    """A 12-scan gallery squeezed to 520 px (seen in Chromium on BUS-UCLM) cannot be read;
    narrow figures (curves, panels) still sit two to a row."""
    import cv2

    from busi.reporting.report import render_html

    for name, width in (("gallery.png", 1400), ("curve.png", 600)):
        cv2.imwrite(str(tmp_path / name), np.zeros((50, width, 3), np.uint8))
    page = render_html("t", [("img", tmp_path / "gallery.png", "gallery"),
                             ("img", tmp_path / "curve.png", "curve")])
    assert page.count('<figure class="wide">') == 1
    assert page.index('<figure class="wide">') < page.index("gallery") < page.index("<figure>")


def test_cv_results_and_report_lead_with_each_arms_clinical_summary(cv_run: Path) -> None:
    """Pooled cancer sensitivity / specificity and the U-Net's misses come before every
    table; the pooled per-image table joins all folds; config and environment come last."""
    import csv

    md = (cv_run / "cv_results.md").read_text()
    assert md.index("## Summary") < md.index("Sensitivity: malignant called malignant") \
        < md.index("## Segmentation") < md.index("## Classification")
    assert "Lesion images the U-Net missed" in md
    with open(cv_run / "pooled" / "cnn" / "predictions.csv", newline="") as fh:
        pooled = {r["file"]: r["pred"] for r in csv.DictReader(fh)}
    with open(cv_run / "pooled" / "cnn" / "per_image.csv", newline="") as fh:
        joined = {r["file"]: r["pred"] for r in csv.DictReader(fh)}
    assert joined == pooled
    report = (cv_run / "report.md").read_text()
    sections = [ln for ln in report.splitlines() if ln.startswith("## ")]
    assert sections[-2:] == ["## Config", "## Environment and provenance"], sections
    assert report.index("Sensitivity: malignant") < report.index("## Config")
    assert "## cnn: worst cases, all folds" in report
    assert report.count("Sensitivity: malignant called malignant") == 1  # not repeated
    assert report.count("Per class:") == 1  # the pooled table once


def test_classifier_run_report_shows_gradcam_of_right_and_wrong(cv_run: Path) -> None:
    (run,) = list((cv_run / "fold0" / "cls" / "cnn").iterdir())
    cams = list((run / "gradcam").glob("*_gradcam.png"))
    assert cams
    html = (run / "report.html").read_text()
    assert "Grad-CAM" in html and "ROC" in html and "confusion matrix" in html


@pytest.mark.skipif(not (os.environ.get("CI") or __import__("shutil").which("chromium")),
                    reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_a_real_browser(cv_run: Path, tmp_path: Path) -> None:
    from browser import render

    seen = render(cv_run / "report.html", tmp_path / "shot.png")
    assert seen["images"] >= 5 and seen["loaded"] == seen["images"]
    assert seen["tables"] >= 5
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_gradcam_highlights_part_of_the_image(cv_run: Path) -> None:
    from busi import runtime
    from busi.reporting.gradcam import gradcam

    keras = runtime.import_keras()
    (run,) = list((cv_run / "fold0" / "cls" / "cnn").iterdir())
    model = keras.models.load_model(run / "best.keras")
    x = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 1), dtype=np.uint8)
    heat, probs = gradcam(model, x)
    assert heat.shape == (3, 32, 32) and probs.shape == (3, 3)
    assert heat.min() >= 0 and heat.max() <= 1
    assert np.allclose(probs, model.predict(x.astype("float32"), verbose=0),
                       atol=1e-4)


def test_rerun_reproduces_the_metrics(work: Path) -> None:
    """Same config + seed + machine (determinism on) => the same metrics to 3 decimals."""
    assert main(["train-seg", "--config", str(work / "tiny.yaml"),
                 "--set", "outputs.run_name=orig"]) == 0
    (orig,) = list((work / "outputs" / "seg").glob("*-orig"))
    assert "busi rerun" in (orig / "command.txt").read_text()
    assert main(["rerun", str(orig)]) == 0
    (again,) = [r for r in (work / "outputs" / "seg").glob("*-orig*") if r != orig]
    a = json.loads((orig / "metrics.json").read_text())["lesion_images"]
    b = json.loads((again / "metrics.json").read_text())["lesion_images"]
    for m in ("dice", "iou"):
        assert round(a[m]["mean"], 3) == round(b[m]["mean"], 3)
    assert json.loads((again / "split.json").read_text())["manifest"] == \
        json.loads((orig / "split.json").read_text())["manifest"]


def test_rerun_of_a_non_run_folder_is_a_clear_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["rerun", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_pooled_report_follows_a_changed_fold_and_its_interval_resamples_folds(
        cv_run: Path, tmp_path: Path) -> None:
    """The pooled files are derived: a second aggregate after a fold's predictions changed
    rewrites them (it used to keep the first ones)."""
    import csv
    import shutil

    from busi.evaluation.crossval import aggregate

    cv = tmp_path / "cv"
    shutil.copytree(cv_run, cv, ignore=shutil.ignore_patterns("*.keras", "*.png", "report.*"))
    (fold0,) = list((cv / "fold0" / "cls" / "cnn").iterdir())
    with open(fold0 / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    classes = [c[2:] for c in header if c.startswith("p_")]
    for r in rows:  # every fold-0 prediction made wrong
        r["pred"] = classes[(classes.index(r["true"]) + 1) % len(classes)]
        r.update({f"p_{c}": "0.900000" if c == r["pred"] else "0.050000" for c in classes})
    with open(fold0 / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    aggregate(cv)
    with open(cv / "pooled" / "cnn" / "predictions.csv", newline="") as fh:
        pooled = list(csv.DictReader(fh))
    correct = sum(r["true"] == r["pred"] for r in pooled)
    assert all(r["true"] != r["pred"] for r in pooled if r["file"] in
               {row["file"] for row in rows})
    report = json.loads((cv / "pooled" / "cnn" / "classification_report.json").read_text())
    assert report["accuracy"] == pytest.approx(correct / len(pooled))
    assert f"| Accuracy | | | {correct / len(pooled):.2f} | {len(pooled)} |" in (
        cv / "pooled" / "cnn" / "classification_report.md").read_text()
    result = json.loads((cv / "cv_results.json").read_text())["classification"]["cnn"]
    assert result["per_fold"][0]["accuracy"] == 0.0
    assert result["pooled"]["accuracy"] == pytest.approx(correct / len(pooled))
    assert "two-level" in result["pooled"]["ci95_method"]
    assert "duplicate groups" in result["pooled"]["ci95_method"]
    assert "Pooled 95% intervals (every arm: two-level" in (cv / "cv_results.md").read_text()


def test_arms_of_one_cv_say_their_operating_point_and_intervals_once(cv_run: Path,
                                                                     tmp_path: Path) -> None:
    """Four arms repeated the same operating point and interval paragraph four times each
    (seen in Chromium on the real BUSI CV): said once for all arms, each arm its summary."""
    import shutil

    from busi.evaluation.crossval import aggregate

    cv = tmp_path / cv_run.name
    shutil.copytree(cv_run, cv)
    for fold in cv.glob("fold*"):  # a second arm: the same classifier runs under another name
        shutil.copytree(fold / "cls" / "cnn", fold / "cls" / "twin")
    meta = json.loads((cv / "cv.json").read_text())
    meta["models"], meta["arms"] = ["cnn", "twin"], {"cnn": ["model.classifier.name=cnn"],
                                                     "twin": ["model.classifier.name=cnn"]}
    (cv / "cv.json").write_text(json.dumps(meta))
    aggregate(cv)
    md = (cv / "cv_results.md").read_text()
    assert md.count("pooled out-of-fold** (") == 2
    assert md.count("Operating point:") == 1 and md.count("Pooled 95% intervals (every arm:") == 2
    assert md.index("**twin, pooled out-of-fold**") < md.index("Operating point:") \
        < md.index("## Segmentation")


def test_an_arm_added_to_a_cv_trains_on_its_folds_and_unets(cv_run: Path, tmp_path: Path,
                                                             capsys) -> None:
    """`busi cv --resume CV --models mobilenet`: the new arm gets the CV's own U-Nets."""
    import shutil

    from busi.training import classification as train

    cv = tmp_path / cv_run.name
    shutil.copytree(cv_run, cv)
    unets = {p: p.stat().st_mtime_ns for p in cv.glob("fold*/seg/*/best.keras")}
    calls = []

    def first_call_interrupts(cfg, seg_run=None, resume=None, **kwargs):
        calls.append((cfg.model.classifier.name, seg_run))
        raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "train_classifier", first_call_interrupts)
    try:
        assert main(["cv", "--resume", str(cv), "--models", "mobilenet"]) == 130
    finally:
        mp.undo()
    assert "adding mobilenet" in capsys.readouterr().out
    assert json.loads((cv / "cv.json").read_text())["models"] == ["cnn", "mobilenet"]
    (seg0,) = list((cv / "fold0" / "seg").iterdir())
    assert calls == [("mobilenet", str(seg0))]
    assert {p: p.stat().st_mtime_ns for p in unets} == unets  # no U-Net trained again
    assert main(["cv", "--resume", str(cv), "--models", "resnet"]) == 2


def test_a_named_arm_trains_its_overrides_in_its_own_folder(cv_run: Path, tmp_path: Path,
                                                            capsys) -> None:
    """`--arm 'NAME: KEY=VALUE ...'`: the classifier gets the overrides, its runs go under
    cls/NAME, cv.json keeps them for --resume; a wrong arm is refused before any training."""
    import shutil

    from busi.training import classification as train

    cv = tmp_path / cv_run.name
    shutil.copytree(cv_run, cv)
    calls = []

    def first_call_interrupts(cfg, seg_run=None, resume=None, name=None, **kwargs):
        c = cfg.model.classifier
        calls.append((name, c.name, c.mask_mode, cfg.training.cls.learning_rate))
        raise KeyboardInterrupt

    arm = ("mnet_ch: model.classifier.name=mobilenet model.classifier.mask_mode=channel "
           "training.cls.learning_rate=1e-4")
    mp = pytest.MonkeyPatch()
    mp.setattr(train, "train_classifier", first_call_interrupts)
    try:
        assert main(["cv", "--resume", str(cv), "--arm", arm]) == 130
        meta = json.loads((cv / "cv.json").read_text())
        assert meta["models"] == ["cnn", "mnet_ch"]
        assert meta["arms"]["mnet_ch"][1] == "model.classifier.mask_mode=channel"
        assert calls == [("mnet_ch", "mobilenet", "channel", 1e-4)]
        # resumed without --arm: the same arm, from cv.json
        assert main(["cv", "--resume", str(cv)]) == 130
        assert calls[-1] == calls[0]
        capsys.readouterr()
        for bad, says in [("mnet_ch: model.classifier.name=vgg19", "other settings"),
                          ("x: data.image_size=[64,64]", "can only set the classifier"),
                          ("x: model.classifier.mask_mode=sideways", "arm 'x'"),
                          ("x y: model.classifier.name=cnn", "not a plain name")]:
            assert main(["cv", "--resume", str(cv), "--arm", bad]) == 2
            assert says in capsys.readouterr().err
        assert len(calls) == 2  # nothing trained for a refused arm
    finally:
        mp.undo()


def test_runs_lists_a_cv_and_a_cv_given_as_one_run_says_which_run_to_pass(
        cv_run: Path, work: Path, capsys: pytest.CaptureFixture) -> None:
    """busi issue 16: `busi runs` shows a CV with its arms and mean figures (its fold runs are
    inside it, not listed); a CV run where one U-Net or classifier run is expected is named
    as such, and the fix names one of its folds' runs."""
    import re

    results = json.loads((cv_run / "cv_results.json").read_text())
    assert main(["runs", "--outputs", str(work / "outputs"), "--kind", "cv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (row,) = [re.split(r"\s{2,}", x) for x in lines[2:] if x.startswith(f"cv/{cv_run.name}")]
    dice = results["segmentation"]["dice"]["mean"]
    acc = results["classification"]["cnn"]["accuracy"]["mean"]
    assert row[1:5] == ["cv", "U-Nets, cnn", "finished, 3 folds",
                        f"mean Dice {dice:.3f}; mean accuracy cnn {acc:.3f}"], row
    assert not [x for x in lines if "fold" in x.split()[0]], "fold runs are not listed"
    for argv, want in ((["export", str(cv_run), "--format", "keras"], "classifier run"),
                       (["train-cls", "--config", str(work / "tiny.yaml"), "--seg-run",
                         str(cv_run)], "segmentation (U-Net) run")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{cv_run}: this is a cross-validation run, not a {want}" in err, err
        assert re.search(rf"one of its folds' runs, e\.g\. {re.escape(str(cv_run))}/fold\d/", err)


def test_every_arm_at_another_site_fold_models_and_their_ensemble(
        cv_run: Path, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 26: scripts/cv_at_site.py evaluates each fold's classifier at a site the CV
    never saw and averages the folds into an ensemble whose probabilities are the mean of
    the fold models' own (each fed by its own U-Net)."""
    import csv

    from conftest import load_script

    from busi.data.synth import SynthSpec, write_dataset

    site = tmp_path / "site"
    write_dataset(site, SynthSpec(per_class=6, seed=5, height=96, width=128))
    script = load_script("cv_at_site")
    assert script.main([str(cv_run), "--data", str(site),
                        "--outputs", str(work / "outputs")]) == 0
    out = capsys.readouterr().out
    assert "| cnn | 3 fold models |" in out and "| cnn | ensemble |" in out
    (saved,) = list(cv_run.glob("cv_at_*.json"))
    (arm,) = json.loads(saved.read_text())
    assert len(arm["per_fold"]) == 3 and arm["n_images"] == 18
    probs = []
    for fold in arm["per_fold"]:
        with open(Path(fold["evaluation"]) / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        probs.append([[float(r[f"p_{c}"]) for c in ("benign", "malignant", "normal")]
                      for r in rows])
        truth = [r["true"] for r in rows]
    mean = np.mean(probs, axis=0)
    pred = np.array(["benign", "malignant", "normal"])[mean.argmax(axis=1)]
    assert arm["ensemble"]["accuracy"] == pytest.approx(float(np.mean(pred == np.array(truth))))
    # a second call reuses the evaluations and writes a new table beside the first; with
    # --presence each fold's point is chosen again on its BUSI validation images
    assert script.main([str(cv_run), "--data", str(site), "--outputs", str(work / "outputs"),
                        "--reuse", "--presence", "classifier"]) == 0
    assert len(list(cv_run.glob("cv_at_*.md"))) == 2
    (again,) = json.loads(sorted(cv_run.glob("cv_at_*-2.json"))[0].read_text())
    assert again["presence"] == "classifier"
    from busi.evaluation.classification import at_operating_point, operating_point
    from busi.runs import read_json, read_predictions

    for fold in again["per_fold"]:
        ev = Path(fold["evaluation"])
        op = operating_point(Path(read_json(ev / "evaluation.json")["cls_run"]),
                             presence="classifier")
        assert op.presence == "classifier" and op.presence_threshold is not None
        f, t, _, p, cl = read_predictions(ev / "predictions.csv")
        pf = at_operating_point(op, t, p, cl, None)["presence"]
        assert fold["lesion_missed"] == pf["lesion_missed_fraction"]
        assert fold["normal_empty"] == pf["normal_empty_fraction"]


def test_predict_with_a_cv_arms_fold_ensemble_averages_its_fold_models(
        cv_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 26: `busi predict --cv CV --arm A` averages the probabilities of the arm's
    fold classifiers, each on its own U-Net's masks, and says which runs it used."""
    import csv

    from busi.runs import cv_fold_classifier, cv_fold_unet

    image = str(synth_root / "malignant" / "malignant (2).png")
    singles = []
    for k in range(3):
        seg, _ = cv_fold_unet(cv_run, k)
        run, _, _ = cv_fold_classifier(cv_run, k, "cnn", seg)
        out = tmp_path / f"single{k}"
        assert main(["predict", image, "--cls-run", str(run), "--out", str(out)]) == 0
        with open(out / "predictions.csv", newline="") as fh:
            singles.append(next(csv.DictReader(fh)))
    out = tmp_path / "ensemble"
    capsys.readouterr()
    assert main(["predict", image, "--cv", str(cv_run), "--arm", "cnn", "--out", str(out)]) == 0
    assert "the fold ensemble of arm cnn" in capsys.readouterr().out
    with open(out / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    for c in ("benign", "malignant", "normal"):
        assert float(row[f"p_{c}"]) == pytest.approx(
            np.mean([float(r[f"p_{c}"]) for r in singles]), abs=2e-6)
    saved = json.loads((out / "predictions.json").read_text())
    assert len(saved["fold_ensemble"]["members"]) == 3
    assert main(["predict", image, "--cv", str(cv_run), "--arm", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no arm 'nope'" in capsys.readouterr().err


def test_predict_defaults_to_a_newer_one_arm_cvs_fold_ensemble(
        cv_run: Path, synth_root: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 26: with neither --cls-run nor --cv, `busi predict` uses the latest finished
    one-arm CV (the recipe's fold models averaged) when it is newer than the latest finished
    classifier run, and that run otherwise; a bare `--cv` is the latest finished CV."""
    import csv
    import shutil

    from busi.inference.predict import default_cv
    from busi.runs import cv_fold_classifier, cv_fold_unet

    root = tmp_path / "outputs"
    cv = root / "cv" / cv_run.name
    shutil.copytree(cv_run, cv)  # a copied CV keeps working: cv.json's paths are relative
    meta = json.loads((cv / "cv.json").read_text())
    meta["models"] = ["cnn"]  # one arm: no --arm needed to say which fold models
    (cv / "cv.json").write_text(json.dumps(meta))
    image = str(synth_root / "malignant" / "malignant (2).png")

    def probs(*args: str) -> list[float]:
        out = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        assert main(["predict", image, "--outputs", str(root), "--out", str(out), *args]) == 0
        with open(out / "predictions.csv", newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        return [float(row[f"p_{c}"]) for c in ("benign", "malignant", "normal")]

    capsys.readouterr()
    by_default = probs()
    assert f"the fold ensemble of CV {cv}" in capsys.readouterr().out
    assert probs("--cv") == by_default
    assert f"CV {cv} (the latest finished)" in capsys.readouterr().out
    assert probs("--cv", str(cv), "--arm", "cnn") == by_default
    # a classifier run newer than the CV is the default again
    seg, _ = cv_fold_unet(cv, 0)
    run, _, _ = cv_fold_classifier(cv, 0, "cnn", seg)
    assert default_cv(str(root)) == str(cv)
    shutil.copytree(run, root / "cls" / "cnn" / "29991231-000000")
    assert default_cv(str(root)) is None
    # an unfinished CV is never a default
    shutil.rmtree(root / "cls")
    (cv / "fold1" / "cls").rename(cv / "fold1" / "gone")
    assert default_cv(str(root)) is None
    assert main(["predict", image, "--outputs", str(root), "--cv",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no finished CV" in capsys.readouterr().err


def test_the_presence_probe_fits_its_heads_on_each_folds_training_images_only(
        cv_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """busi issue 26: scripts/presence_probe.py compares presence scores from the U-Net (its
    maximum, a head on its encoder) with the classifiers'; the heads learn from the fold's
    training images only, never from the validation images that choose the threshold or the
    test images that score it."""
    from conftest import load_script

    from busi.runs import cv_fold_unet, read_json

    script = load_script("presence_probe")
    fitted: list[int] = []
    real = script.fit_head

    def spy(features, is_lesion, seed=0):
        fitted.append(len(features))
        return real(features, is_lesion, seed)

    monkeypatch.setattr(script, "fit_head", spy)
    assert script.main([str(cv_run), "--arms", "cnn"]) == 0
    train_sizes = [read_json(cv_fold_unet(cv_run, k)[0] / "split.json")["train"]
                   for k in range(3)]
    assert fitted == [n for n in train_sizes for _ in range(2)]  # map LR and encoder head
    out = capsys.readouterr().out
    for score in ("unet max", "prob-map LR", "encoder head LR", "cnn 1-p(normal)",
                  "head + cnn"):
        assert f"| {score} |" in out
    assert "nan" not in out.lower()
    saved = json.loads((cv_run / "presence_probe.json").read_text(),  # strict JSON: no NaN
                       parse_constant=lambda c: pytest.fail(f"{c} in presence_probe.json"))
    assert saved["folds"] == [0, 1, 2] and len(saved["rows"]) == 5
    for row in saved["rows"]:
        assert 0.0 <= row["test_auc_pooled"] <= 1.0
        # every image is in exactly one fold's test part: 12 of each class
        assert (row["normal_scans"], row["lesion_scans"]) == (12, 24)


def test_the_presence_probe_leaves_out_a_fold_without_both_kinds_of_validation_scan() -> None:
    """A small CV's validation part may hold lesion scans only: that fold has no validation
    AUC; the row averages the others and says how many, instead of printing nan."""
    from conftest import load_script

    script = load_script("presence_probe")
    rng = np.random.default_rng(0)
    y = np.arange(12) < 6

    def fold(val: np.ndarray) -> dict:
        return {"scores": {"s": (rng.random(len(val)), rng.random(12))}, "val": val, "test": y}

    rows, records = script.table([fold(y), fold(np.ones(8, bool))], 0.03)
    first = records[0]["val_auc_per_fold"][0]
    assert rows[0].startswith(f"| s | {first:.3f} ({first:.3f}-{first:.3f}), 1 of 2 folds |")
    assert np.isnan(records[0]["val_auc_per_fold"][1])


def test_the_cv_states_how_long_each_recipe_trained(cv_run: Path) -> None:
    """busi issue 26: the time of a recipe's whole CV (its U-Nets plus its arm's classifiers)
    is read from the runs' own records of their training seconds, folds summed."""
    from busi.evaluation.crossval import aggregate
    from busi.runs import cv_fold_classifier, cv_fold_unet, read_json

    result = aggregate(cv_run)
    unets, cnns = [], []
    for k in range(3):
        seg, _ = cv_fold_unet(cv_run, k)
        unets.append(read_json(seg / "metrics.json")["train_seconds"])
        run, _, _ = cv_fold_classifier(cv_run, k, "cnn", seg)
        cnns.append(read_json(run / "state.json")["train_seconds"])
    assert result["train_seconds"] == {"U-Nets": unets, "cnn": cnns}
    assert all(s > 0 for s in unets + cnns)
    table = (cv_run / "cv_results.md").read_text().split("## Training time")[1]
    row = next(line for line in table.splitlines() if line.startswith("| cnn |"))
    assert row.endswith(f"| {sum(cnns) / 60:.0f} min | {(sum(unets) + sum(cnns)) / 60:.0f} min |")


def test_the_cv_gives_each_arms_validation_figures_to_choose_by(cv_run: Path) -> None:
    """busi issue 26: an arm is chosen on validation images only; the CV pools each fold's
    val_predictions.csv (never its test predictions) into the table placed first."""
    from sklearn.metrics import roc_auc_score

    from busi.evaluation.crossval import aggregate
    from busi.runs import cv_fold_classifier, cv_fold_unet, read_json, read_predictions

    result = aggregate(cv_run)
    truth, probs, losses = [], [], []
    for k in range(3):
        seg, _ = cv_fold_unet(cv_run, k)
        run, _, _ = cv_fold_classifier(cv_run, k, "cnn", seg)
        _, t, _, p, classes = read_predictions(run / "val_predictions.csv")
        truth += t
        probs.append(p)
        losses.append(read_json(run / "state.json")["best"])
    probs = np.concatenate(probs)
    truth = np.array(truth)
    got = result["validation"]["cnn"]
    assert got["n"] == len(truth)
    assert got["accuracy"] == pytest.approx(np.mean(
        np.array(classes)[probs.argmax(1)] == truth))
    assert got["normal_lesion_auc"] == pytest.approx(
        roc_auc_score(truth != "normal", 1 - probs[:, classes.index("normal")]))
    assert got["val_loss"] == pytest.approx(np.mean(losses))
    text = (cv_run / "cv_results.md").read_text()
    assert text.index("## Validation figures, to choose an arm by") < text.index("## Summary")
