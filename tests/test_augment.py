"""Augmentation must move the mask exactly with the lesion, for both engines."""

from __future__ import annotations

import numpy as np
import pytest

from busi.config import AugmentationConfig
from busi.data.synth import render_case
from busi.evaluation.segmentation import dice

pytest.importorskip("keras")
from busi.data.augment import build_augment  # noqa: E402


def lesion_batch(n: int = 8, size: int = 128):
    """Images whose lesion is known exactly: the synthetic mask painted bright.

    The lesion is cropped with a margin so it spans about half the frame: at that
    size the only disagreement left between the bilinear image and the nearest
    mask is the boundary pixel ring, not a misalignment.
    """
    import cv2

    images, masks = [], []
    for i in range(n):
        _, ms = render_case("malignant" if i % 2 else "benign", np.random.default_rng(i),
                            144, 192)
        ys, xs = np.nonzero(ms[0])
        half = int(max(np.ptp(ys), np.ptp(xs)))
        cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
        padded = np.pad(ms[0], half)
        crop = padded[cy:cy + 2 * half, cx:cx + 2 * half]
        m = cv2.resize(crop, (size, size), interpolation=cv2.INTER_NEAREST) > 0
        masks.append(m.astype("float32"))
        images.append(np.where(m, 1.0, 0.0).astype("float32"))
    return np.stack(images)[..., None], np.stack(masks)[..., None]


@pytest.mark.parametrize("engine", ["image_data_generator", "layers"])
def test_augmented_mask_covers_the_augmented_lesion(engine: str) -> None:
    cfg = AugmentationConfig(engine=engine, fill_mode="constant")
    augment = build_augment(cfg, (128, 128))
    x, m = lesion_batch()
    ax, am = augment(x, m, seed=1)
    assert ax.shape == x.shape and am.shape == m.shape
    assert set(np.unique(am)) <= {0.0, 1.0}, "the mask must stay binary (nearest resampling)"
    moved = 0
    for k in range(len(x)):
        from_image = ax[k, ..., 0] > 0.5
        assert dice(from_image, am[k, ..., 0] > 0.5) >= 0.99
        moved += dice(from_image, m[k, ..., 0] > 0.5) < 0.99
    assert moved >= len(x) // 2, "the augmentation should actually transform most images"


def test_image_data_generator_shift_is_in_pixels() -> None:
    cfg = AugmentationConfig(engine="image_data_generator", horizontal_flip=False,
                             rotation_range=0, zoom_range=[1.0, 1.0], width_shift_range=10,
                             height_shift_range=0, fill_mode="constant")
    augment = build_augment(cfg, (96, 96))
    x = np.zeros((16, 96, 96, 1), "float32")
    x[:, :, 48] = 1.0  # a vertical line in column 48
    ax, _ = augment(x, None, seed=3)
    columns = [int(np.argmax(ax[k, 48, :, 0])) for k in range(16)]
    shifts = np.abs(np.array(columns) - 48)
    assert shifts.max() <= 10 and shifts.max() >= 3


@pytest.mark.parametrize("engine", ["image_data_generator", "layers"])
def test_same_seed_same_transform_whatever_ran_before(engine: str) -> None:
    """A batch's transform depends on its seed only, so runs (and worker threads) agree."""
    augment = build_augment(AugmentationConfig(engine=engine), (128, 128))
    x, m = lesion_batch(4)
    first = augment(x, m, seed=7)
    augment(x, m, seed=8)  # advance any hidden state
    again = augment(x, m, seed=7)
    other = augment(x, m, seed=9)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_layers_engine_draws_height_and_width_shifts_independently() -> None:
    cfg = AugmentationConfig(engine="layers", horizontal_flip=False, rotation_range=0,
                             zoom_range=[1.0, 1.0], fill_mode="constant")
    augment = build_augment(cfg, (128, 128))
    x = np.zeros((32, 128, 128, 1), "float32")
    x[:, 60:68, 60:68] = 1.0
    ax, _ = augment(x, None, seed=0)
    rows, cols = [], []
    for k in range(len(x)):
        r, c = np.nonzero(ax[k, ..., 0] > 0.5)
        rows.append(r.mean() - 63.5)
        cols.append(c.mean() - 63.5)
    assert max(map(abs, rows)) <= 10.5 and max(map(abs, cols)) <= 10.5
    assert not np.allclose(rows, cols), "height and width shifts must not be the same draw"


def batches_seen_by_fit(batches, epochs: int, initial_epoch: int = 0) -> list[np.ndarray]:
    """The training inputs ``model.fit`` gets from ``batches``, in order, as ``_fit`` calls it.

    A pass-through layer records each batch; ``run_eagerly`` lets it see arrays. Python's
    ``random`` is re-seeded, as ``runtime.setup`` does when a run starts or resumes.
    """
    import random

    import keras

    from busi.data.batches import fit

    seen: list[np.ndarray] = []

    class Record(keras.layers.Layer):
        def compute_output_shape(self, shape):
            return shape

        def call(self, x):
            seen.append(keras.ops.convert_to_numpy(x).copy())
            return x

    inp = keras.Input(batches.x.shape[1:] + (1,))
    model = keras.Model(inp, keras.layers.Conv2D(1, 1)(Record()(inp)))
    model.compile("sgd", "mse", run_eagerly=True)
    random.seed(0)
    fit(model, batches, epochs=epochs, initial_epoch=initial_epoch, verbose=0)
    return seen


@pytest.mark.parametrize("engine", ["image_data_generator", "layers"])
def test_batches_are_the_same_with_one_or_two_worker_threads(engine: str) -> None:
    """Each batch's transform comes from (seed, epoch, batch) whatever the thread timing, and
    the batches of fit's epoch e are those of epoch e (prefetching threads included)."""
    from busi.data.batches import Batches

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 48, 48), dtype=np.uint8)
    y = (rng.random((48, 48, 48)) > 0.5).astype(np.uint8)
    augment = build_augment(AugmentationConfig(engine=engine), (48, 48))

    def batches(workers: int) -> Batches:
        return Batches(x, y, 8, augment=augment, shuffle=True, seed=5, workers=workers)

    epochs = 3
    direct = batches(1)
    expected = []
    for epoch in range(epochs):
        direct.set_epoch(epoch)
        expected += [direct[i][0] for i in range(len(direct))]
    one, two = batches_seen_by_fit(batches(1), epochs), batches_seen_by_fit(batches(2), epochs)
    assert len(one) == len(two) == len(expected) == epochs * 6
    differ = [k for k in range(len(expected))
              if not (np.array_equal(one[k], expected[k]) and np.array_equal(two[k], expected[k]))]
    assert not differ, f"batches {differ} differ from their (seed, epoch, batch) draw"
    # a run resumed at epoch 1 gets the batches of epochs 1 and 2 again
    resumed = batches_seen_by_fit(batches(2), epochs, initial_epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, expected[6:], strict=True))


def test_image_data_generator_engine_leaves_the_global_numpy_state_alone() -> None:
    """Worker threads share ``np.random``: an engine that seeds or draws from it gives a
    batch the transform of whichever thread seeded last."""
    augment = build_augment(AugmentationConfig(engine="image_data_generator"), (64, 64))
    x, m = lesion_batch(4, 64)
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    augment(x, m, seed=7)
    np.testing.assert_array_equal(np.random.random(3), expected)


def test_image_data_generator_draws_as_get_random_transform_does() -> None:
    """Same distributions as ``ImageDataGenerator.get_random_transform`` for our settings:
    integer pixel shifts in -9..9 (``np.random.choice(10)`` times a sign), rotation and both
    zoom factors uniform, a fair flip."""
    ImageDataGenerator = pytest.importorskip(
        "tensorflow.keras.preprocessing.image").ImageDataGenerator
    from scipy.stats import ks_2samp

    from busi.data.augment import _random_transform

    cfg = AugmentationConfig()
    generator = ImageDataGenerator(rotation_range=cfg.rotation_range, width_shift_range=10,
                                   height_shift_range=10, zoom_range=cfg.zoom_range,
                                   horizontal_flip=True)
    n, shape = 4000, (64, 64, 1)
    np.random.seed(0)
    theirs = [generator.get_random_transform(shape) for _ in range(n)]
    rng = np.random.default_rng(0)
    ours = [_random_transform(generator, shape, rng) for _ in range(n)]
    assert set(theirs[0]) == set(ours[0])
    for key in ("tx", "ty"):
        assert {t[key] for t in theirs} == {t[key] for t in ours} == set(range(-9, 10))
    for key, lo, hi in (("theta", -15, 15), ("zx", 0.8, 1.0), ("zy", 0.8, 1.0)):
        a, b = np.array([t[key] for t in theirs]), np.array([t[key] for t in ours])
        assert lo <= b.min() and b.max() <= hi
        assert ks_2samp(a, b).pvalue > 0.01, key
    assert abs(np.mean([t["flip_horizontal"] for t in ours]) - 0.5) < 0.05
    assert not any(t["shear"] or t["flip_vertical"] for t in ours)


SITE = dict(gain_range=[0.7, 1.4], contrast_range=[0.7, 1.3], gamma_range=[0.7, 1.5],
            blur_sigma=1.5, speckle=0.1)


def test_site_changes_alter_the_image_only_within_range_and_by_seed() -> None:
    images, masks = lesion_batch(6, 64)
    images = 0.2 + 0.6 * images
    site = build_augment(AugmentationConfig(engine="none", **SITE), (64, 64))
    out, out_masks = site(images, masks, 3)
    np.testing.assert_array_equal(out_masks, masks)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, images)
    np.testing.assert_array_equal(site(images, masks, 3)[0], out)
    assert not np.allclose(site(images, masks, 4)[0], out)


def test_gain_multiplies_and_site_changes_are_off_by_default() -> None:
    images, masks = lesion_batch(4, 64)
    images = 0.1 + 0.5 * images
    assert build_augment(AugmentationConfig(engine="none"), (64, 64)) is None
    half = build_augment(AugmentationConfig(engine="none", gain_range=[0.5, 0.5]), (64, 64))
    np.testing.assert_allclose(half(images, masks, 0)[0], 0.5 * images, atol=1e-6)
    # With the geometric engine: the same transform as without site changes, then the gain.
    geometric = build_augment(AugmentationConfig(), (64, 64))
    both = build_augment(AugmentationConfig(gain_range=[0.5, 0.5]), (64, 64))
    g_img, g_mask = geometric(images, masks, 7)
    b_img, b_mask = both(images, masks, 7)
    np.testing.assert_array_equal(b_mask, g_mask)
    np.testing.assert_allclose(b_img, 0.5 * np.clip(g_img, 0, 1), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2])
def test_classifier_inputs_keep_their_intensities_and_their_mask_channel(channels: int) -> None:
    """Classifier inputs are 0..255 (the model rescales itself): the site changes must not
    clip them to [0, 1], and a mask channel (mask_mode channel) must move with the scan
    and stay a 0/255 mask, never brightened, blurred or speckled like the scan."""
    from busi.training.classification import classifier_augment

    cfg = AugmentationConfig(engine="layers", fill_mode="constant", gain_range=[0.8, 1.2],
                             gamma_range=[0.8, 1.25], blur_sigma=1.0, speckle=0.05)
    x, m = lesion_batch()
    scan = 200 * x  # a bright lesion on black, as gain, gamma and speckle keep black
    inputs = np.concatenate([scan, 255 * m], axis=-1) if channels == 2 else scan
    out, labels = classifier_augment(build_augment(cfg, (128, 128)))(inputs, None, 3)
    assert out.shape == inputs.shape and labels is None
    assert out[..., 0].max() > 150 and out[..., 0].min() >= 0, "scan clipped to [0, 1]"
    if channels == 2:
        mask = out[..., 1]
        assert set(np.unique(mask)) <= {0.0, 255.0}, "the mask channel must stay a mask"
        moved = 0
        for k in range(len(x)):
            bright = out[k, ..., 0] > out[k, ..., 0].max() / 3
            assert dice(bright, mask[k] > 0) >= 0.95, "mask channel off the moved lesion"
            moved += dice(mask[k] > 0, m[k, ..., 0] > 0.5) < 0.99
        assert moved >= len(x) // 2
