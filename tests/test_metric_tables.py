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


def test_a_prediction_of_an_absent_class_is_an_error_of_the_true_class() -> None:
    truth = ["benign"] * 5 + ["malignant"] * 5
    pred = ["normal"] + ["benign"] * 4 + ["malignant"] * 5
    r = _report(truth, pred)
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["report"]["benign"]["recall"] == pytest.approx(0.8)
    assert r["report"]["benign"]["precision"] == 1.0
    f1_benign = 2 * 4 / (5 + 4)  # 2 TP / (true benign + predicted benign)
    assert r["macro_f1"] == pytest.approx((f1_benign + 1.0) / 2)
    assert r["confusion_matrix"][0] == [4, 1, 0]  # rows/columns: benign, normal, malignant


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
