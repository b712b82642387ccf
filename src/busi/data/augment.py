"""Data augmentation with two engines behind one config key.

``image_data_generator`` is the paper's (Keras ``ImageDataGenerator``, which
Keras 3 keeps only as ``tf.keras.preprocessing.image``): one random transform
per image, drawn from the distributions of ``get_random_transform``, is applied
to the image with bilinear and to the mask with nearest-neighbour interpolation,
so the mask stays binary and follows the lesion exactly.

``layers`` uses Keras 3 preprocessing layers (RandomFlip, RandomRotation,
RandomTranslation, RandomZoom): each layer draws one transform per image and
applies it to image and mask alike; it runs on any Keras backend and does not
need ``tf.keras``.

Both take float32 batches (B, H, W, 1) and return the same shapes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np

from busi.config import AugmentationConfig
from busi.errors import BusiError

Augment = Callable[[np.ndarray, np.ndarray | None, int], tuple[np.ndarray, np.ndarray | None]]


def _shift(value: float) -> float | int:
    # ImageDataGenerator reads an int >= 1 as pixels (10 draws -9..9: np.random.choice(10)
    # times a sign), a float < 1 as a fraction of the side: keep the paper's pixel setting.
    return int(value) if float(value).is_integer() and value >= 1 else value


def _generator_swaps_axes(generator_cls) -> bool:
    """True if this ``ImageDataGenerator`` moves rows for ``width_shift_range``.

    Keras 3's legacy port (and tf.keras since 2.x) swaps the two shift axes
    (tensorflow/tensorflow#82838, keras-team/keras#17398). A 1-pixel probe tells
    which behaviour is installed, so the workaround undoes itself once fixed.
    """
    probe = np.zeros((8, 8, 1), "float32")
    probe[4, 4] = 1.0
    moved = generator_cls(width_shift_range=0, fill_mode="constant").apply_transform(
        probe, {"ty": 2})
    row, _col = np.unravel_index(int(np.argmax(moved[..., 0])), (8, 8))
    return row != 4


def _draw_shift(shift_range, size: int, rng: np.random.Generator) -> float:
    """One shift as ``get_random_transform`` draws it, from ``rng``.

    An int ``n`` draws from ``0..n-1`` with a random sign (``np.random.choice(n)``),
    a float ``r`` uniformly from ``[-r, r]``; ranges below 1 are fractions of ``size``.
    """
    if not shift_range:
        return 0
    try:  # 1-D array-like or int
        shift = rng.choice(shift_range) * rng.choice([-1, 1])
    except ValueError:  # floating point
        shift = rng.uniform(-shift_range, shift_range)
    return shift * size if np.max(shift_range) < 1 else shift


def _random_transform(generator, img_shape: tuple[int, ...], rng: np.random.Generator) -> dict:
    """``generator.get_random_transform(img_shape)`` drawn from ``rng``, not from ``np.random``.

    ``get_random_transform(seed=...)`` calls ``np.random.seed`` and then draws from
    the global NumPy state, which the ``Batches`` worker threads share: a thread
    seeding between another's seed and draws gives that batch a transform from
    the wrong seed, so two runs of one seed differed in about half their batches.
    The same distributions (rotation, shifts, two zoom factors, flip; shear,
    vertical flip, channel shift and brightness stay off, as in our settings)
    drawn from the batch's own ``Generator`` depend on the seed alone.
    """
    g = generator
    theta = rng.uniform(-g.rotation_range, g.rotation_range) if g.rotation_range else 0
    tx = _draw_shift(g.height_shift_range, img_shape[g.row_axis - 1], rng)
    ty = _draw_shift(g.width_shift_range, img_shape[g.col_axis - 1], rng)
    if g.zoom_range[0] == 1 and g.zoom_range[1] == 1:
        zx, zy = 1, 1
    else:
        zx, zy = rng.uniform(g.zoom_range[0], g.zoom_range[1], 2)
    flip = (rng.random() < 0.5) * g.horizontal_flip
    return {"theta": theta, "tx": tx, "ty": ty, "shear": 0, "zx": zx, "zy": zy,
            "flip_horizontal": flip, "flip_vertical": False, "channel_shift_intensity": None,
            "brightness": None}


def _no_tensorflow() -> BusiError:
    return BusiError("augmentation engine 'image_data_generator' needs TensorFlow, which is "
                     "not installed", where="augmentation.engine",
                     fix="pip install 'busi[tensorflow]' (the Keras port of "
                         "ImageDataGenerator lives in tf.keras), or set "
                         "augmentation.engine: layers (runs on every backend)")


def require_engine(cfg: AugmentationConfig) -> None:
    """Refuse an engine this installation cannot run, before data is read or a run folder made.

    ImageDataGenerator exists only in tf.keras, so on a JAX-only install the paper's engine
    fails; found at the first training batch, that left an unusable run folder behind.
    """
    if cfg.engine != "image_data_generator":
        return
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except ImportError:  # a finder that refuses the module outright
        found = False
    if not found:
        raise _no_tensorflow()


def image_data_generator(cfg: AugmentationConfig) -> Augment:
    """The paper's engine: one affine per image, drawn once, applied to image and mask."""
    try:
        from tensorflow.keras.preprocessing.image import ImageDataGenerator
    except ImportError:
        raise _no_tensorflow() from None
    width, height = _shift(cfg.width_shift_range), _shift(cfg.height_shift_range)
    if _generator_swaps_axes(ImageDataGenerator):
        width, height = height, width
    common = dict(rotation_range=cfg.rotation_range, width_shift_range=width,
                  height_shift_range=height, zoom_range=cfg.zoom_range,
                  horizontal_flip=cfg.horizontal_flip, fill_mode=cfg.fill_mode, cval=0.0)
    for_images = ImageDataGenerator(**common, interpolation_order=1)
    for_masks = ImageDataGenerator(**common, interpolation_order=0)

    def apply(images: np.ndarray, masks: np.ndarray | None, seed: int):
        rng = np.random.default_rng(seed)
        out_i = np.empty_like(images)
        out_m = None if masks is None else np.empty_like(masks)
        for k in range(len(images)):
            params = _random_transform(for_images, images.shape[1:], rng)
            out_i[k] = for_images.apply_transform(images[k], params)
            if masks is not None:
                out_m[k] = for_masks.apply_transform(masks[k], params)
        return out_i, out_m

    return apply


def keras_layers(cfg: AugmentationConfig, image_size: tuple[int, int]) -> Augment:
    """Keras 3 preprocessing layers; each layer draws one transform and applies it to both.

    The layers are driven through their public per-call API
    (``get_random_transformation`` / ``transform_images``) with a ``SeedGenerator`` made from the
    batch seed, so a batch's transform depends on (seed, epoch, batch) only --
    not on which worker thread ran first -- and the height and width draws of
    one layer stay independent (an int seed would make them equal).

    The mask goes through the same bilinear chain as the image and is binarised
    once at the end. ``transform_segmentation_masks`` resamples nearest at each
    of the three or four layers, and those sub-pixel roundings add up: measured
    on synthetic lesions, Dice between the moved mask and the moved lesion fell
    to 0.96, a pixel of label noise around lesions that are ~20 px across at
    128x128. Thresholding the interpolated mask at 0.5 keeps it binary and on
    the lesion (Dice >= 0.99, pinned by tests/test_augment.py).
    """
    import keras
    from keras import layers

    h, w = image_size
    zlo, zhi = cfg.zoom_range
    steps = []
    if cfg.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal"))
    if cfg.rotation_range:
        steps.append(layers.RandomRotation(cfg.rotation_range / 360.0, fill_mode=cfg.fill_mode))
    if cfg.width_shift_range or cfg.height_shift_range:
        hs = cfg.height_shift_range if cfg.height_shift_range >= 1 else cfg.height_shift_range * h
        ws = cfg.width_shift_range if cfg.width_shift_range >= 1 else cfg.width_shift_range * w
        steps.append(layers.RandomTranslation(hs / h, ws / w, fill_mode=cfg.fill_mode))
    if (zlo, zhi) != (1.0, 1.0):
        # ImageDataGenerator's zoom z < 1 magnifies; RandomZoom's factor f < 0 does: f = z - 1.
        steps.append(layers.RandomZoom((zlo - 1, zhi - 1), (zlo - 1, zhi - 1),
                                       fill_mode=cfg.fill_mode))

    def apply(images: np.ndarray, masks: np.ndarray | None, seed: int):
        seeds = keras.random.SeedGenerator(seed)
        x = keras.ops.convert_to_tensor(images)
        m = None if masks is None else keras.ops.convert_to_tensor(masks)
        for layer in steps:
            t = layer.get_random_transformation(x, training=True, seed=seeds)
            x = layer.transform_images(x, t, training=True)
            if m is not None:
                m = layer.transform_images(m, t, training=True)
        if m is not None:
            m = (keras.ops.convert_to_numpy(m) > 0.5).astype(masks.dtype)
        return keras.ops.convert_to_numpy(x), m

    return apply


def has_site_changes(cfg: AugmentationConfig) -> bool:
    return (tuple(cfg.gain_range) != (1, 1) or tuple(cfg.contrast_range) != (1, 1)
            or tuple(cfg.gamma_range) != (1, 1) or cfg.blur_sigma > 0 or cfg.speckle > 0)


def site_changes(cfg: AugmentationConfig) -> Augment:
    """What differs between scanners and hospitals, on the image only (the mask stays).

    Per image, in this order: gain (multiply), contrast (about the image's mean),
    gamma (``x ** g``, ``log g`` uniform in the log range so 0.5 and 2 are equally
    likely), Gaussian blur on half the images (sigma up to ``blur_sigma``: softer
    transducers and lower resolution), multiplicative Gaussian noise (``speckle``:
    ultrasound's noise scales with the echo), clipped to [0, 1]. Drawn from the
    batch's own ``Generator``, like the geometric transforms.
    """
    import cv2

    log_gamma = np.log(cfg.gamma_range)

    def apply(images: np.ndarray, masks: np.ndarray | None, seed: int):
        rng = np.random.default_rng([seed, 1])
        out = np.empty_like(images)
        for k, x in enumerate(images):
            x = x * rng.uniform(*cfg.gain_range)
            mean = x.mean()
            x = (x - mean) * rng.uniform(*cfg.contrast_range) + mean
            x = np.clip(x, 0, 1) ** np.exp(rng.uniform(*log_gamma))
            if cfg.blur_sigma > 0 and rng.random() < 0.5:
                sigma = rng.uniform(0.3, cfg.blur_sigma)
                x = cv2.GaussianBlur(x, (0, 0), sigma).reshape(x.shape)
            if cfg.speckle > 0:
                x = x * (1 + rng.normal(0, cfg.speckle, x.shape))
            out[k] = np.clip(x, 0, 1)
        return out, masks

    return apply


def build_augment(cfg: AugmentationConfig, image_size: tuple[int, int]) -> Augment | None:
    """The geometric engine, then (if any is set) the site changes on the image."""
    engines = {"none": lambda: None, "image_data_generator": lambda: image_data_generator(cfg),
               "layers": lambda: keras_layers(cfg, image_size)}
    geometric = engines[cfg.engine]()
    if not has_site_changes(cfg):
        return geometric
    site = site_changes(cfg)
    if geometric is None:
        return site

    def apply(images: np.ndarray, masks: np.ndarray | None, seed: int):
        images, masks = geometric(images, masks, seed)
        return site(images, masks, seed)

    return apply
