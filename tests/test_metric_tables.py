"""Classification figures that mean what they say, on predictions whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from busi.evaluation.classification import (
    _csv_table,
    bootstrap_ci,
    comparison_markdown,
    compute,
)
from busi.evaluation.classification import markdown_table as _markdown_table

CLASSES = ["benign", "malignant", "normal"]


def _report(y_true: list[str], y_pred: list[str]) -> dict:
    probs = np.eye(3)[[CLASSES.index(c) for c in y_pred]]
    return compute([f"img{i}.png" for i in range(len(y_true))], y_true, y_pred, probs, CLASSES)


def test_a_perfect_classifier_on_data_without_normal_images_scores_macro_f1_one(
        tmp_path: Path) -> None:
    truth = ["benign"] * 6 + ["malignant"] * 4
    r = _report(truth, truth)
    assert r["present"] == ["benign", "malignant"]
    assert r["macro_f1"] == 1.0
    for key in ("precision", "recall", "f1-score"):
        assert r["report"]["macro avg"][key] == 1.0
        assert r["report"]["weighted avg"][key] == 1.0
    assert r["ci95"]["macro_f1"] == [1.0, 1.0]
    md = _markdown_table(r, "external site")
    assert "| Macro avg. | 1.00 | 1.00 | 1.00 | 10 |" in md
    assert "| Normal | not in data |" in md
    assert "over the 2 classes in the data (benign, malignant)" in md
    assert "macro avg,1.0000,1.0000,1.0000,10" in _csv_table(r)
    run = tmp_path / "cnn" / "20260101-000000"
    assert "| 1.000 (1.00-1.00) |" in comparison_markdown([r], [run])


def _run_folder(path: Path, model: str | None, images: int) -> Path:
    """A classifier run folder as far as the tables read it: its config (when ``model``) and
    split counts (``images`` in all)."""
    import json

    from busi.config import load_config
    from busi.runs import write_config

    path.mkdir(parents=True)
    if model:
        write_config(path, load_config(None, [f"model.classifier.name={model}"]))
    test = images // 10
    (path / "split.json").write_text(json.dumps({"train": images - 2 * test, "val": test,
                                                 "test": test}))
    return path


def test_the_papers_accuracy_stands_only_beside_runs_on_busi(tmp_path: Path) -> None:
    """busi issue: the side-by-side table printed the paper's accuracy beside runs on the
    demo's synthetic scans or a user's own data, as if they were comparable."""
    r = _report(["benign", "malignant", "normal"] * 4, ["benign", "malignant", "normal"] * 4)
    synthetic = _run_folder(tmp_path / "cls" / "cnn" / "20260101-000000", "cnn", 36)
    busi = _run_folder(tmp_path / "cls" / "cnn" / "20260101-000001", "cnn", 780)
    alone = comparison_markdown([r], [synthetic])
    assert "paper accuracy" not in alone and "0.82" not in alone
    both = comparison_markdown([r, r], [synthetic, busi]).splitlines()
    assert both[0].endswith("| paper accuracy |")
    (row_synthetic,) = [ln for ln in both if f"| {synthetic.name} |" in ln]
    (row_busi,) = [ln for ln in both if f"| {busi.name} |" in ln]
    assert row_busi.endswith("| 0.82 |") and row_synthetic.endswith("|  |")
    assert len(row_synthetic.split("|")) == len(both[0].split("|"))


def test_a_runs_model_is_read_from_its_config_not_its_folder(tmp_path: Path) -> None:
    """busi issue: ``--name ablation`` puts a VGG19 run under outputs/cls/ablation/; its
    model is the config's, so the paper's Table 2 stands beside it (on BUSI)."""
    from busi.evaluation.classification import model_of, paper_table_markdown

    named = _run_folder(tmp_path / "cls" / "ablation" / "20260101-000000", "vgg19", 780)
    assert model_of(named) == "vgg19"
    r = _report(["benign", "malignant", "normal"] * 4, ["benign", "malignant", "normal"] * 4)
    assert "#### vgg19 beside the paper's Table 2" in paper_table_markdown(r, named)
    assert "| vgg19 |" in comparison_markdown([r], [named]) and "| 0.91 |" in \
        comparison_markdown([r], [named])
    old = _run_folder(tmp_path / "cls" / "mobilenet" / "20250101-000000", None, 780)
    assert model_of(old) == "mobilenet", "a folder without config.yaml: its folder's name"


def _unet_files(files: list[str], dice: np.ndarray) -> tuple[dict, dict]:
    """A U-Net run's metrics.json and test_scores.json, as far as the side-by-side reads them."""
    scores = {f: {"dice": float(d), "iou": float(d) / 2, "hd95": 3.0, "lesion_px": 10}
              for f, d in zip(files, dice, strict=True)}
    stat = {"mean": float(np.mean(dice)), "n": len(files)}
    metrics = {"lesion_images": {"dice": stat, "iou": stat, "hd95": {"mean": 3.0},
                                 "hd95_all": {"mean": 3.0}, "hd95_undefined": 0},
               "lesion_free_images": {"n": 0, "fraction_predicted_empty": None},
               "n_test": len(files)}
    return metrics, scores


def test_unets_tested_on_partly_shared_images_are_paired_on_the_shared_ones() -> None:
    """busi issue: `busi evaluate --seg-run A --seg-run B` on two runs whose test sets partly
    overlap ended in "internal error": the second run's files outside the first run's
    duplicate groups were resampled by name, beside int group ids, and numpy cannot sort the
    mix. Now: paired on the shared images, with their count; none shared is said."""
    from busi.evaluation.segmentation import unets_side_by_side

    rng = np.random.default_rng(0)
    a_files, b_files = [f"a{i}.png" for i in range(20)], [f"a{i}.png" for i in range(10, 30)]
    a_dice, b_dice = rng.uniform(0.5, 0.9, 20), rng.uniform(0.3, 0.8, 20)
    (ma, sa), (mb, sb) = _unet_files(a_files, a_dice), _unet_files(b_files, b_dice)
    lesion = {f: True for f in a_files + b_files}
    groups = {f: i // 2 for i, f in enumerate(a_files)}  # the first run's groups: ints
    text = "\n".join(unets_side_by_side(["A", "B"], [ma, mb], [sa, sb], lesion, groups))
    assert "they share 10 test images (A has 20, B 20)" in text
    diff = float(np.mean(a_dice[10:] - b_dice[:10]))
    assert f"Paired, on the 10 lesion images both were tested on: lesion Dice of A minus B = " \
           f"{diff:+.3f} (95% CI " in text
    mc, sc = _unet_files([f"c{i}.png" for i in range(5)], rng.uniform(0.3, 0.8, 5))
    text = "\n".join(unets_side_by_side(["A", "C"], [ma, mc], [sa, sc],
                                         {**lesion, **dict.fromkeys(sc, True)}, groups))
    assert "they share 0 test images" in text
    assert "No lesion image was tested by both A and C: no paired difference." in text


def test_a_prediction_of_an_absent_class_is_an_error_of_the_true_class() -> None:
    truth = ["benign"] * 5 + ["malignant"] * 5
    pred = ["normal"] + ["benign"] * 4 + ["malignant"] * 5
    r = _report(truth, pred)
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["report"]["benign"]["recall"] == pytest.approx(0.8)
    assert r["report"]["benign"]["precision"] == 1.0
    f1_benign = 2 * 4 / (5 + 4)  # 2 TP / (true benign + predicted benign)
    assert r["macro_f1"] == pytest.approx((f1_benign + 1.0) / 2)
    assert r["confusion_matrix"][0] == [4, 0, 1]  # rows/columns: benign, malignant, normal


def _fold(accuracy: float, n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n predictions, classes in turn, a random ``1 - accuracy`` of them wrong."""
    rng = np.random.default_rng(seed)
    truth = np.array(CLASSES)[np.arange(n) % 3]
    pred = truth.copy()
    wrong = rng.random(n) > accuracy
    pred[wrong] = np.array(CLASSES)[(np.arange(n)[wrong] % 3 + 1) % 3]
    return truth, pred


def _pool(folds: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Pooled out-of-fold predictions, fold of each, duplicate groups of two images."""
    t = np.concatenate([f[0] for f in folds])
    p = np.concatenate([f[1] for f in folds])
    fold = np.concatenate([np.full(len(f[0]), k) for k, f in enumerate(folds)])
    group = np.concatenate([1000 * k + np.arange(len(f[0])) // 2 for k, f in enumerate(folds)])
    return t, p, fold, group


def _width(ci: list[float]) -> float:
    return ci[1] - ci[0]


def test_cv_intervals_carry_the_fold_to_fold_spread() -> None:
    folds = [_fold(a, seed=k) for k, a in enumerate([0.45, 0.55, 0.65, 0.75, 0.85])]
    per_fold = [float(np.mean(t == p)) for t, p in folds]
    t, p, fold, group = _pool(folds)
    images = bootstrap_ci(t, p)
    two_level = bootstrap_ci(t, p, group, fold)
    for key in ("accuracy", "macro_f1"):
        assert _width(two_level[key]) > 2.5 * _width(images[key]), key
    # what the folds' own spread says about their mean: +-1.96 standard errors
    from_folds = 2 * 1.96 * np.std(per_fold, ddof=1) / np.sqrt(len(per_fold))
    assert _width(two_level["accuracy"]) > 0.75 * from_folds
    assert _width(images["accuracy"]) < 0.35 * from_folds
    assert two_level["accuracy"][0] < np.mean(per_fold) < two_level["accuracy"][1]
    r = compute([f"f{i}" for i in range(len(t))], t.tolist(), p.tolist(),
                np.eye(3)[[CLASSES.index(c) for c in p]], CLASSES, groups=group, folds=fold)
    assert r["ci95"] == two_level
    assert "two-level" in r["ci95_method"] and "5 folds" in r["ci95_method"]
    assert "two-level" in _markdown_table(r, "pooled")


def test_cv_intervals_of_identical_folds_are_those_of_an_image_bootstrap() -> None:
    one = _fold(0.65, seed=9)
    t, p, fold, group = _pool([one] * 5)
    images, two_level = bootstrap_ci(t, p), bootstrap_ci(t, p, group, fold)
    for key in ("accuracy", "macro_f1"):
        assert 0.7 < _width(two_level[key]) / _width(images[key]) < 1.4, key
        assert two_level[key][0] < np.mean(t == p) < two_level[key][1]


def test_duplicate_groups_are_resampled_together() -> None:
    """Each prediction saved four times (near-duplicates): the interval is that of the 60
    distinct images, not the too-narrow one of 240 'independent' ones."""
    t, p = _fold(0.7, n=60, seed=3)
    t4, p4, group = np.repeat(t, 4), np.repeat(p, 4), np.repeat(np.arange(60), 4)
    distinct = bootstrap_ci(t, p)
    grouped = bootstrap_ci(t4, p4, group)
    assert _width(bootstrap_ci(t4, p4)["accuracy"]) < 0.7 * _width(distinct["accuracy"])
    for key in ("accuracy", "macro_f1"):
        assert 0.8 < _width(grouped[key]) / _width(distinct[key]) < 1.25, key
    r = compute([f"f{i}" for i in range(240)], t4.tolist(), p4.tolist(),
                np.eye(3)[[CLASSES.index(c) for c in p4]], CLASSES, groups=group)
    assert "60 duplicate groups (240 images" in r["ci95_method"]


def test_resampled_figures_are_scikit_learns() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from busi.evaluation.classification import accuracy_macro_f1

    rng = np.random.default_rng(0)
    t = rng.choice(["benign", "malignant"], 50)
    p = rng.choice(CLASSES, 50)  # some predictions of a class not in the data
    acc, f1 = accuracy_macro_f1(confusion_matrix(t, p, labels=CLASSES).astype(float))
    assert acc == pytest.approx(accuracy_score(t, p))
    assert f1 == pytest.approx(f1_score(t, p, labels=["benign", "malignant"], average="macro"))


# ------------------------------------------------------------- issue 13: another site's patients


def test_recall_intervals_resample_groups_not_images() -> None:
    """Each prediction saved four times under one patient: the recall intervals are those of
    the 60 distinct images; as 240 independent images they would be narrower."""
    t, p = _fold(0.7, n=60, seed=3)
    t4, p4, group = np.repeat(t, 4), np.repeat(p, 4), np.repeat(np.arange(60), 4)
    distinct, grouped, as_images = bootstrap_ci(t, p), bootstrap_ci(t4, p4, group), \
        bootstrap_ci(t4, p4)
    assert set(grouped["recall"]) == set(CLASSES)
    for c in CLASSES:
        assert grouped["recall"][c] == pytest.approx(distinct["recall"][c]), c
        assert _width(as_images["recall"][c]) < 0.7 * _width(distinct["recall"][c]), c
        recall = np.mean(p[t == c] == c)
        assert grouped["recall"][c][0] <= recall <= grouped["recall"][c][1], c
    r = compute([f"f{i}" for i in range(240)], t4.tolist(), p4.tolist(),
                np.eye(3)[[CLASSES.index(c) for c in p4]], CLASSES, groups=group,
                unit_name="patients")
    assert "the 60 patients (240 images" in r["ci95_method"]
    lo, hi = r["ci95"]["recall"]["benign"]
    assert f"| {r['report']['benign']['recall']:.2f} ({lo:.2f}-{hi:.2f}) |" in \
        _markdown_table(r, "site B")


def _lesion_probs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True labels (benign, malignant, some normal) and softmax outputs that half know them."""
    rng = np.random.default_rng(seed)
    t = np.array(CLASSES)[rng.integers(0, 3, n)]
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[[CLASSES.index(c) for c in t]]
    return t, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_benign_malignant_auc_is_scikit_learns_with_a_patient_interval() -> None:
    from sklearn.metrics import roc_auc_score

    from busi.evaluation.classification import benign_malignant_auc

    t, probs = _lesion_probs(90, seed=1)
    patients = np.arange(90) // 3
    a = benign_malignant_auc(t, probs, CLASSES, patients)
    lesion = t != "normal"
    score = probs[lesion, 1] / (probs[lesion, 0] + probs[lesion, 1])
    assert a["auc"] == pytest.approx(roc_auc_score(t[lesion] == "malignant", score))
    assert a["n_images"] == lesion.sum() and a["n_units"] == len(set(patients[lesion]))
    assert a["ci95"][0] < a["auc"] < a["ci95"][1]
    # every image twice under its own patient: the same patients, the same interval
    twice = benign_malignant_auc(np.repeat(t, 2), np.repeat(probs, 2, axis=0), CLASSES,
                                 np.repeat(patients, 2))
    assert twice["auc"] == pytest.approx(a["auc"])
    assert twice["ci95"] == pytest.approx(a["ci95"], abs=1e-4)
    # ... but as independent images the interval would narrow
    as_images = benign_malignant_auc(np.repeat(t, 2), np.repeat(probs, 2, axis=0), CLASSES,
                                     np.arange(180))
    assert _width(as_images["ci95"]) < 0.85 * _width(a["ci95"])
    r = compute([f"f{i}" for i in range(90)], t.tolist(),
                [CLASSES[k] for k in probs.argmax(1)], probs, CLASSES, groups=patients,
                unit_name="patients")
    r["benign_malignant_auc"] = a
    md = _markdown_table(r, "site B")
    assert (f"Benign vs malignant ROC AUC {a['auc']:.3f} (95% CI {a['ci95'][0]:.3f}-"
            f"{a['ci95'][1]:.3f}) on {a['n_images']} benign or malignant images" in md)
    assert f"percentile bootstrap of those {a['n_units']} patients with replacement" in md


def test_benign_malignant_auc_without_both_classes_is_not_made_up() -> None:
    from busi.evaluation.classification import benign_malignant_auc

    t, probs = _lesion_probs(30, seed=2)
    t[t == "malignant"] = "benign"
    a = benign_malignant_auc(t, probs, CLASSES, np.arange(30))
    assert a["auc"] is None and a["ci95"] is None and a["n_malignant"] == 0
    assert benign_malignant_auc(t, probs[:, [0, 2]], ["benign", "normal"]) is None
    # one malignant patient: most resamples lack it, and those are left out, not scored
    t, probs = _lesion_probs(40, seed=3)
    t[t == "malignant"] = "benign"
    t[:2] = "malignant"
    a = benign_malignant_auc(t, probs, CLASSES, np.r_[0, 0, np.arange(1, 39)])
    assert a["auc"] is not None and 0 < a["resamples"] < 2000


def test_segmentation_means_resample_patients_and_pool_their_images() -> None:
    from busi.evaluation.segmentation import group_mean_ci, patient_intervals

    rng = np.random.default_rng(0)
    dice = rng.uniform(0.2, 0.95, 20)
    one = group_mean_ci(dice, np.arange(20))
    # each patient scanned five times, the same image each time: same interval as one copy
    assert group_mean_ci(np.repeat(dice, 5), np.repeat(np.arange(20), 5)) == pytest.approx(one)
    assert _width(group_mean_ci(np.repeat(dice, 5), np.arange(100))) < 0.6 * _width(one)
    # a patient with many images weighs by its images once drawn (pooled mean, not per patient)
    values, groups = np.r_[np.zeros(9), 1.0], np.r_[np.zeros(9), 1]
    lo, hi = group_mean_ci(values, groups)
    assert lo == 0.0 and hi == pytest.approx(1.0)
    assert group_mean_ci(np.array([np.nan, np.nan]), np.array([0, 1])) is None
    # a missed lesion has no HD95: left out of a resample's mean, never counted as 0
    ci = group_mean_ci(np.array([5.0, np.nan, 7.0, np.nan]), np.array([0, 0, 1, 1]))
    assert 5.0 <= ci[0] <= ci[1] <= 7.0
    scores = {"dice": np.r_[dice, 1.0, 1.0], "iou": np.r_[dice, 1.0, 1.0],
              "hd95": np.r_[dice * 10, np.nan, np.nan],
              "hd95_all": np.r_[dice * 10, np.nan, np.nan],
              "pred_empty": np.r_[np.zeros(20, bool), True, False],
              "true_empty": np.r_[np.zeros(20, bool), True, True]}
    iv = patient_intervals(scores, np.r_[np.arange(20), 3, 21])
    assert iv["n_units"] == 21 and iv["n_units_lesion"] == 20 and iv["n_units_lesion_free"] == 2
    assert iv["n_lesion_images"] == 20 and iv["n_lesion_free_images"] == 2
    assert iv["ci95"]["dice"] == pytest.approx(one)
    assert iv["ci95"]["fraction_predicted_empty"] == [0.0, 1.0]
    no_normal = {k: (v[:20] if isinstance(v, np.ndarray) else v) for k, v in scores.items()}
    assert patient_intervals(no_normal, np.arange(20))["ci95"]["fraction_predicted_empty"] is None


def test_resampled_aucs_are_scikit_learns_weighted_auc() -> None:
    from sklearn.metrics import roc_auc_score

    from busi.evaluation.classification import weighted_aucs

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60)
    score = rng.integers(0, 8, 60) / 8  # ties between and within the classes
    weights = rng.integers(0, 3, (20, 60)).astype(float)
    weights[0] = 1.0
    weights[1] = np.where(y == 1, 1.0, 0.0)  # one class only: no AUC
    aucs = weighted_aucs(y, score, weights)
    assert aucs[0] == pytest.approx(roc_auc_score(y, score))
    assert np.isnan(aucs[1])
    for w, auc in zip(weights[2:], aucs[2:], strict=True):
        assert auc == pytest.approx(roc_auc_score(y, score, sample_weight=w))


def test_sensitivity_and_specificity_count_malignant_as_positive_at_the_argmax() -> None:
    """A cancer called normal is missed like one called benign; normal images do not count;
    the intervals resample what every other interval of the report resamples."""
    from busi.evaluation.classification import summary_markdown

    truth = ["malignant"] * 10 + ["benign"] * 20 + ["normal"] * 5
    pred = (["malignant"] * 6 + ["benign"] * 2 + ["normal"] * 2
            + ["benign"] * 15 + ["normal"] * 2 + ["malignant"] * 3 + ["malignant"] * 5)
    r = _report(truth, pred)
    ss = r["sensitivity_specificity"]
    assert (ss["sensitivity"], ss["true_positives"], ss["n_malignant"]) == (0.6, 6, 10)
    assert (ss["specificity"], ss["true_negatives"], ss["n_benign"]) == (17 / 20, 17, 20)
    lo, hi = ss["ci95"]["sensitivity"]
    assert lo < 0.6 < hi and hi - lo > 0.2  # ten cancers: a wide interval
    groups = np.repeat(np.arange(7), 5)  # five images a patient: wider still
    grouped = compute([f"i{k}" for k in range(35)], truth, pred,
                      np.eye(3)[[CLASSES.index(c) for c in pred]], CLASSES, groups=groups)
    g_lo, g_hi = grouped["sensitivity_specificity"]["ci95"]["specificity"]
    assert g_hi - g_lo > ss["ci95"]["specificity"][1] - ss["ci95"]["specificity"][0]
    text = summary_markdown(r)
    assert "| Sensitivity: malignant called malignant | 0.60 (6 of 10) |" in text
    assert "| Specificity: benign not called malignant | 0.85 (17 of 20) |" in text
    assert "argmax" in text and "Recall normal" in text


def test_json_files_are_strict_json_with_null_for_undefined(tmp_path: Path) -> None:
    import json

    from busi.runs import write_json

    write_json(tmp_path / "s.json", {"hd95": float("nan"), "a": np.array([1.0, np.inf]),
                                     "n": np.float32(0.5)})

    def refuse(name: str):
        raise ValueError(name)

    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse) == {
        "hd95": None, "a": [1.0, None], "n": 0.5}


def test_a_figure_no_image_had_reads_n_a_in_tables_not_nan() -> None:
    """A U-Net that detected no lesion has no HD95 over detected lesions: its tables say
    n/a, in memory (NaN) as after a JSON round trip (null)."""
    from busi.evaluation.segmentation import fmt_stat

    assert fmt_stat({"mean": float("nan"), "std": float("nan")}) == "n/a"
    assert fmt_stat({"mean": None, "std": None}) == "n/a"
    assert fmt_stat({"mean": 0.8123, "std": 0.1}) == "0.812 ± 0.100"


def test_overlay_and_gradcam_panels_keep_the_scans_aspect_ratio(tmp_path: Path) -> None:
    """A 100x200 scan on the model's 32x32 grid is drawn twice as wide as high; Grad-CAM is
    drawn over the scan, not over the masked input, with a colour bar."""
    import cv2

    from busi.reporting.gradcam import save_panels
    from busi.reporting.plots import _panel

    scan = np.full((32, 32), 200, np.uint8)
    truth = np.zeros((32, 32), np.uint8)
    truth[10:20, 10:20] = 1
    panel = _panel(scan, truth, truth.astype(np.float32), 0.5, shape=(100, 200))
    sub = (panel.shape[1] - 8) // 3  # three panels, two 4-px gaps
    assert sub == 2 * (panel.shape[0] - 22)  # rows under a 22-px caption
    masked = np.zeros((1, 32, 32, 1), np.float32)  # what the classifier was shown: nothing
    (path,) = save_panels(tmp_path, ["benign/a b.png"], scan[None], masked,
                          np.zeros((1, 32, 32), np.float32), ["benign"], ["malignant"],
                          np.array([0.9]), shapes=np.array([[100, 200]]), truth=truth[None])
    img = cv2.imread(str(path))
    height = 64  # 32 rows at scale 2
    assert path.name == "a_b_gradcam.png"
    right = img[:height, 2 * 128 + 4:2 * 128 + 4 + 128]  # the heatmap half, 128 px wide
    assert right.mean() > 60  # the scan shows through the heatmap: not the black input
    bar = img[:height, -64:]
    assert bar[:, 4:20].std() > 20  # a colour ramp beside it
