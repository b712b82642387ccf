"""Data augmentation with two engines behind one config key.

``image_data_generator`` is the paper's (Keras ``ImageDataGenerator``, which
Keras 3 keeps only as ``tf.keras.preprocessing.image``): one random transform
per image is drawn with ``get_random_transform`` and applied to the image with
bilinear and to the mask with nearest-neighbour interpolation, so the mask stays
binary and follows the lesion exactly.

``layers`` uses Keras 3 preprocessing layers on ``{"images", "segmentation_masks"}``,
which transform both alike; it is faster and does not need ``tf.keras``.

Both take float32 batches (B, H, W, 1) and return the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from busi.config import AugmentationConfig
from busi.errors import BusiError

Augment = Callable[[np.ndarray, np.ndarray | None, int], tuple[np.ndarray, np.ndarray | None]]


def _shift(value: float) -> float | int:
    # ImageDataGenerator reads an int >= 1 as pixels: keep the paper's [-10, 10] px.
    return int(value) if float(value).is_integer() and value >= 1 else value


def image_data_generator(cfg: AugmentationConfig) -> Augment:
    try:
        from tensorflow.keras.preprocessing.image import ImageDataGenerator
    except ImportError:
        raise BusiError("augmentation engine 'image_data_generator' needs TensorFlow",
                        where="augmentation.engine",
                        fix="pip install tensorflow, or set augmentation.engine: layers") from None
    common = dict(rotation_range=cfg.rotation_range,
                  width_shift_range=_shift(cfg.width_shift_range),
                  height_shift_range=_shift(cfg.height_shift_range), zoom_range=cfg.zoom_range,
                  horizontal_flip=cfg.horizontal_flip, fill_mode=cfg.fill_mode, cval=0.0)
    for_images = ImageDataGenerator(**common, interpolation_order=1)
    for_masks = ImageDataGenerator(**common, interpolation_order=0)

    def apply(images: np.ndarray, masks: np.ndarray | None, seed: int):
        rng = np.random.default_rng(seed)
        out_i = np.empty_like(images)
        out_m = None if masks is None else np.empty_like(masks)
        for k in range(len(images)):
            params = for_images.get_random_transform(images.shape[1:],
                                                     seed=int(rng.integers(2**31 - 1)))
            out_i[k] = for_images.apply_transform(images[k], params)
            if masks is not None:
                out_m[k] = for_masks.apply_transform(masks[k], params)
        return out_i, out_m

    return apply


def keras_layers(cfg: AugmentationConfig, image_size: tuple[int, int]) -> Augment:
    import keras
    from keras import layers

    h, w = image_size
    zlo, zhi = cfg.zoom_range
    # ImageDataGenerator's zoom z < 1 magnifies; RandomZoom's factor f < 0 does: f = z - 1.
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
        steps.append(layers.RandomZoom((zlo - 1, zhi - 1), (zlo - 1, zhi - 1),
                                       fill_mode=cfg.fill_mode))
    pipeline = keras.Sequential(steps)

    def apply(images: np.ndarray, masks: np.ndarray | None, seed: int):
        if masks is None:
            return keras.ops.convert_to_numpy(pipeline(images, training=True)), None
        out = pipeline({"images": images, "segmentation_masks": masks}, training=True)
        return (keras.ops.convert_to_numpy(out["images"]),
                keras.ops.convert_to_numpy(out["segmentation_masks"]))

    return apply


def build_augment(cfg: AugmentationConfig, image_size: tuple[int, int]) -> Augment | None:
    if cfg.engine == "none":
        return None
    if cfg.engine == "image_data_generator":
        return image_data_generator(cfg)
    return keras_layers(cfg, image_size)
