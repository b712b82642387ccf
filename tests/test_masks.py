"""How U-Net probabilities become masks: one rule, applied the same everywhere."""

from __future__ import annotations

import numpy as np

from busi.models.masks import MaskRule, largest_component, predict_probs


def test_threshold_is_strict_and_output_binary() -> None:
    probs = np.array([[[0.2, 0.5, 0.51]]], dtype=np.float32)
    assert MaskRule(0.5).apply(probs).tolist() == [[[0, 0, 1]]]


def test_largest_component_keeps_the_lesion_and_drops_stray_blobs() -> None:
    m = np.zeros((32, 32), np.uint8)
    m[5:15, 5:15] = 1     # lesion, 100 px
    m[25:27, 25:27] = 1   # stray blob, 4 px
    m[0, 31] = 1          # stray pixel
    kept = largest_component(m)
    assert kept.sum() == 100 and kept[5:15, 5:15].all()
    assert largest_component(np.zeros((8, 8), np.uint8)).sum() == 0  # empty stays empty
    probs = m[None].astype(np.float32)
    assert MaskRule(0.5, "largest_component").apply(probs).sum() == 100
    assert MaskRule(0.5, "none").apply(probs).sum() == 105


class _LeftHalf:
    """A stand-in 'model' that sees a lesion in the left half of every image only."""

    def predict(self, x, batch_size=32, verbose=0):
        out = np.zeros_like(x)
        out[:, :, : x.shape[2] // 2] = 1.0
        return out

    def predict_on_batch(self, x):
        return self.predict(x)


def test_flip_tta_averages_with_the_mirrored_prediction() -> None:
    images = np.zeros((2, 4, 6), np.uint8)
    plain = predict_probs(_LeftHalf(), images)
    tta = predict_probs(_LeftHalf(), images, flip_tta=True)
    assert plain[0, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert tta[0, 0].tolist() == [0.5] * 6  # left-half bias cancels out when mirrored
    many = np.zeros((40, 4, 6), np.uint8)   # more than a batch: the model.predict path
    assert predict_probs(_LeftHalf(), many, flip_tta=True)[:, 0].tolist() == [[0.5] * 6] * 40
