"""Segmentation metrics on shapes whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from busi.evaluation.segmentation import dice, hd95, iou, per_image, summarise


def square(y: int, x: int, size: int = 10, shape: int = 40) -> np.ndarray:
    m = np.zeros((shape, shape), bool)
    m[y:y + size, x:x + size] = True
    return m


def test_identical_masks() -> None:
    m = square(5, 5)
    assert dice(m, m) == 1 and iou(m, m) == 1 and hd95(m, m) == 0


def test_shifted_square() -> None:
    a, b = square(5, 5), square(5, 8)  # 3 px to the right
    assert np.isclose(dice(a, b), 2 * 70 / 200)
    assert np.isclose(iou(a, b), 70 / 130)
    assert np.isclose(hd95(a, b), 3.0)


def test_empty_cases_are_explicit() -> None:
    empty = np.zeros((40, 40), bool)
    assert dice(empty, empty) == 1 and np.isnan(hd95(square(1, 1), empty))
    assert dice(square(1, 1), empty) == 0


def test_summary_separates_lesion_and_normal_images() -> None:
    truth = np.stack([square(5, 5), square(20, 20), np.zeros((40, 40), bool)])
    prob = np.stack([square(5, 5), np.zeros((40, 40)), square(0, 0, 3)]).astype(float)
    s = summarise(per_image(truth, prob), np.array([0, 1, 2]), ["benign", "malignant", "normal"])
    assert s["lesion_images"]["dice"]["n"] == 2
    assert np.isclose(s["lesion_images"]["dice"]["mean"], 0.5)
    assert s["lesion_images"]["hd95_undefined"] == 1
    assert s["per_class"]["normal"]["fraction_predicted_empty"] == 0.0


def _headline_hd95(truth: np.ndarray, prob: np.ndarray) -> float:
    """The HD95 a report leads with: the one its first table row and summary line show."""
    from busi.reporting.plots import segmentation_markdown

    s = summarise(per_image(truth, prob), np.zeros(len(truth), int), ["benign"])
    s.update({"threshold": 0.5, "best_epoch": 1, "epochs_done": 1, "n_test": len(truth)})
    row = next(ln for ln in segmentation_markdown(s).splitlines()
               if ln.startswith("| all lesion images"))
    headline = s["lesion_images"]["hd95_all"]
    assert row.split(" | ")[4] == f"{headline['mean']:.3f} ± {headline['std']:.3f}"
    return headline["mean"]


def test_missing_a_lesion_never_improves_the_headline_hd95() -> None:
    corners = [(2, 2), (2, 20), (20, 2), (20, 20), (12, 12), (5, 25)]
    truth = np.stack([square(y, x) for y, x in corners])
    # detections shifted by 0-3 px, and the last one far off (HD95 ~ 27 px)
    prob = np.stack([square(y + d, x) for (y, x), d in zip(corners[:5], [0, 1, 2, 3, 0],
                                                            strict=True)]
                    + [square(28, 0, 4)]).astype(float)
    base = _headline_hd95(truth, prob)
    # one more lesion, missed
    more = _headline_hd95(np.concatenate([truth, square(5, 5)[None]]),
                          np.concatenate([prob, np.zeros((1, 40, 40))]))
    assert more > base
    # each detection in turn turned into a miss, the far-off one included
    for i in range(len(truth)):
        missed = prob.copy()
        missed[i] = 0
        assert _headline_hd95(truth, missed) > base, i
    # ... which the mean over detected lesions alone would have rewarded
    missed = prob.copy()
    missed[-1] = 0
    detected = [summarise(per_image(truth, p), np.zeros(6, int), ["benign"])["lesion_images"]
                for p in (prob, missed)]
    assert detected[1]["hd95"]["mean"] < detected[0]["hd95"]["mean"]
    assert detected[1]["hd95_undefined"] == 1
    every_missed = summarise(per_image(truth, prob * 0), np.zeros(6, int), ["benign"])
    assert every_missed["lesion_images"]["hd95_undefined"] == 6
    assert every_missed["lesion_images"]["hd95_all"]["mean"] == pytest.approx(np.hypot(40, 40))
