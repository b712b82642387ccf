"""The lesion-presence head on the U-Net's encoder (models/presence.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from busi.errors import BusiError
from busi.models.presence import PresenceHead, bottleneck_model, pooled_features


def test_the_features_are_the_deepest_encoder_output_pooled() -> None:
    """The head reads the U-Net's bottleneck (1/2^depth of the input, the widest layer),
    pooled by mean and max: a fixed-length vector whatever the image size."""
    from busi.models.unet import build_unet

    unet = build_unet((32, 32, 1), base_filters=4, depth=2)
    assert tuple(bottleneck_model(unet).output.shape[1:]) == (8, 8, 16)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    features = pooled_features(unet, images)
    assert features.shape == (3, 32)
    assert np.all(features[:, 16:] >= features[:, :16] - 1e-6)  # max >= mean per channel


def test_the_head_scores_as_scikit_learn_fitted_it_and_survives_a_round_trip(
        tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(120) < 0.7
    x = rng.normal(size=(120, 6)) + np.outer(y, [1.5, 0, 0, 0.5, 0, 0])
    head = PresenceHead.fit(x, y)
    p = head.score(x)
    assert roc_auc_score(y, p) > 0.8
    # the NumPy scoring is scikit-learn's predict_proba of the same fit
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=head.c, max_iter=5000).fit((x - head.mean) / head.scale, y)
    assert np.allclose(p, ref.predict_proba((x - head.mean) / head.scale)[:, 1], atol=1e-3)
    again = PresenceHead.load(head.save(tmp_path / "presence_head.npz"))
    assert np.array_equal(again.score(x), p)
    assert not list(tmp_path.glob(".*.tmp.npz"))


def test_fitting_the_head_warns_nothing() -> None:
    """train-seg fits the head on every run: scikit-learn's deprecation warnings about its
    defaults would be printed to every user, so the fit asks for what it means by name."""
    import warnings

    rng = np.random.default_rng(2)
    y = rng.random(80) < 0.6
    x = rng.normal(size=(80, 4)) + np.outer(y, [1.0, 0, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = PresenceHead.fit(x, y)
    assert isinstance(head.c, float) and head.weights.shape == (4,)


def test_the_head_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    x = np.zeros((10, 4))
    with pytest.raises(BusiError, match="all lesion scans"):
        PresenceHead.fit(x, np.ones(10, bool))
    rng = np.random.default_rng(2)
    head = PresenceHead.fit(rng.normal(size=(20, 4)), np.arange(20) % 2 == 0)
    with pytest.raises(BusiError, match="expects 4 features, got 5"):
        head.score(np.zeros((2, 5)))
    bad = tmp_path / "presence_head.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(BusiError, match="cannot read the presence head"):
        PresenceHead.load(bad)
