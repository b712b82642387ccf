"""Segmentation metrics on shapes whose answer is known."""

from __future__ import annotations

import numpy as np

from busi.metrics import dice, hd95, iou, per_image, summarise


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
