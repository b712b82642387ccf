"""The clinician's operating point (models/decision.py) and the full-resolution lesion crop
(models/inputs.py): thresholds chosen on validation images, calls made with them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from busi.errors import BusiError
from busi.models.decision import (
    OperatingPoint,
    choose,
    decide,
    malignancy,
    presence_figures,
    threshold_for_sensitivity,
)
from busi.models.inputs import classifier_inputs, lesion_box, lesion_crops

CLASSES = ("benign", "malignant", "normal")


def test_the_threshold_is_the_split_conformal_rank_of_the_positives() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1, 0.95])
    positive = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    # n = 5 positives, ascending 0.5 .. 0.9: the floor((n + 1)(1 - target))-th lowest
    assert threshold_for_sensitivity(scores, positive, 0.8) == 0.5   # j = 1
    assert threshold_for_sensitivity(scores, positive, 0.66) == 0.6  # j = 2
    assert threshold_for_sensitivity(scores, positive, 0.5) == 0.7   # j = 3
    assert threshold_for_sensitivity(scores, positive, 0.2) == 0.8   # j = 4
    assert threshold_for_sensitivity(scores, positive, 1.0) == 0.5   # j = 0: the lowest
    assert threshold_for_sensitivity(scores, ~positive & False, 0.9) is None
    # a positive already lost (-inf) counts against the target; unreachable: everything left
    lost = np.array([0.9, -np.inf, -np.inf])
    assert threshold_for_sensitivity(lost, np.ones(3, bool), 0.9) == 0.0
    for target in np.linspace(0.05, 1, 20):  # never fewer than the target on validation
        t = threshold_for_sensitivity(scores, positive, target)
        assert (scores[positive] >= t).mean() >= target - 1e-12


def test_new_positives_are_called_at_the_target_rate_from_a_few_validation_ones() -> None:
    """The reason for the conformal rank: from 13 validation cancers (a BUSI fold's), the
    plain order statistic calls fewer than 90% of new cancers; this rank at least 90%."""
    rng = np.random.default_rng(1)
    called = []
    for _ in range(4000):
        val, new = rng.normal(size=13), rng.normal(size=200)
        t = threshold_for_sensitivity(val, np.ones(13, bool), 0.9)
        called.append((new >= t).mean())
    assert np.mean(called) >= 0.9


def _probs(rows: list[tuple[float, float, float]]) -> np.ndarray:
    return np.array(rows, dtype=float)


def test_chosen_point_meets_its_targets_on_the_validation_images() -> None:
    rng = np.random.default_rng(0)
    n = 300
    truth = rng.choice(CLASSES, n, p=[0.55, 0.27, 0.18])
    probs = rng.dirichlet([1, 1, 1], n)
    probs[truth == "malignant", 1] += 0.6
    probs[truth == "normal", 2] += 0.8
    probs /= probs.sum(axis=1, keepdims=True)
    peak = np.where(truth == "normal", rng.uniform(0.1, 0.9, n), rng.uniform(0.5, 1.0, n))
    for presence in ("argmax", "classifier", "unet", "both"):
        op = choose(probs, list(truth), CLASSES, peak, malignant_sensitivity=0.9,
                    presence=presence, max_missed_lesions=0.03)
        calls = np.array(decide(op, probs, CLASSES, peak))
        found = (truth == "malignant") & (calls != "normal")
        assert (calls[found] == "malignant").mean() >= 0.9
        if presence != "argmax":
            assert (calls[truth != "normal"] == "normal").mean() <= 0.03
        assert op.n_val_malignant == int(found.sum())
        back = OperatingPoint.from_dict(op.as_dict())
        assert back == op and "validation" in op.words()


def test_a_scan_without_a_lesion_is_normal_whatever_its_malignancy() -> None:
    op = OperatingPoint(0.9, 0.3, presence="classifier", presence_threshold=0.5)
    probs = _probs([(0.1, 0.3, 0.6), (0.1, 0.5, 0.4), (0.6, 0.35, 0.05)])
    assert decide(op, probs, CLASSES) == ["normal", "malignant", "malignant"]
    assert malignancy(probs, CLASSES)[2] == pytest.approx(0.35 / 0.95)
    # argmax presence: normal only when normal is the most probable class
    op = OperatingPoint(0.9, 0.9, presence="argmax")
    assert decide(op, probs, CLASSES) == ["normal", "benign", "benign"]
    f = presence_figures(["normal", "benign", "malignant"], np.array([False, False, True]))
    assert (f["normal_called_empty"], f["lesion_missed"], f["lesion_scans"]) == (1, 1, 2)


def test_the_lesion_crop_comes_from_the_original_scan_centred_on_the_lesion() -> None:
    h, w = 400, 600
    scan = np.full((h, w), 40, np.uint8)
    scan[180:220, 390:450] = 250           # the lesion: 40 x 60 px of the original
    scan[190:210, 410:430] = 0             # a detail 128x128 would blur away
    mask = np.zeros((128, 128), np.uint8)  # the U-Net's mask on the 128 grid
    mask[int(180 * 128 / h):int(220 * 128 / h), int(390 * 128 / w):int(450 * 128 / w)] = 1
    top, left, side = lesion_box(mask, (h, w), 1.5)
    assert 85 <= side <= 110                            # 1.5 x the longer side (60 px)
    assert abs(top + side / 2 - 200) <= 4 and abs(left + side / 2 - 420) <= 4
    crop = lesion_crops([scan], mask[None], (128, 128), 1.5)[0]
    assert crop.shape == (128, 128)
    assert crop[64, 64] == 0 and crop[64, 30] == 250     # the dark detail, kept sharp
    assert crop[2, 2] == 40                              # surrounding tissue in the margin
    # no lesion found: the whole scan, not a blank
    whole = lesion_crops([scan], np.zeros((1, 128, 128), np.uint8), (128, 128))[0]
    assert np.median(whole) == 40 and whole.max() > 200  # the scan, lesion included
    # a lesion at the scan's edge: the square reaches past it and is black there
    edge = np.zeros((128, 128), np.uint8)
    edge[0:10, 0:10] = 1
    crop = lesion_crops([scan], edge[None], (128, 128), 1.5)[0]
    assert crop[0, 0] == 0 and crop[-1, -1] == 40


def test_the_lesion_crop_needs_the_originals() -> None:
    c = SimpleNamespace(mask_mode="lesion_crop", masks="predicted", crop_scale=1.5,
                        crop_margin=0.15, mask_dilation=0)
    images = np.zeros((1, 32, 32), np.uint8)
    masks = np.zeros((1, 32, 32), np.uint8)
    with pytest.raises(BusiError, match="original size"):
        classifier_inputs(images, masks, c)
    x = classifier_inputs(images, masks, c, [np.full((64, 80), 7, np.uint8)])
    assert x.shape == (1, 32, 32, 1) and (x == 7).all()


def test_a_validation_cancer_called_normal_does_not_make_every_lesion_malignant() -> None:
    """Fold 1 of the CV: 1 of 18 validation cancers was called normal by the presence
    decision; counted as a cancer to reach, it put the malignant threshold at 0 and the
    specificity at 0.14. The threshold is chosen on the cancers that were found."""
    probs = _probs([(0.05, 0.05, 0.9)]          # a cancer the classifier calls normal
                   + [(0.1, 0.9, 0.0)] * 9     # cancers, clearly
                   + [(0.9, 0.1, 0.0)] * 10)   # benign lesions
    truth = ["malignant"] * 10 + ["benign"] * 10
    op = choose(probs, truth, CLASSES, None, malignant_sensitivity=0.9)
    assert op.malignant_threshold == pytest.approx(0.9) and op.n_val_malignant == 9
    calls = decide(op, probs, CLASSES)
    assert calls[0] == "normal" and calls[1:10] == ["malignant"] * 9
    assert calls[10:] == ["benign"] * 10
