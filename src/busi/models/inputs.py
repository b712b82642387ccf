"""How lesion masks are applied to the classifier's input (the classifier's preprocessor).

In ``models`` beside the networks, before training, because the classifier trainer (its
training inputs), evaluation on new data, ``busi predict`` and export all apply it the same way.
:func:`classifier_inputs` is the one place that knows the input's channel layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from busi.errors import BusiError
from busi.models.masks import load_masks

if TYPE_CHECKING:
    from busi.config import Config
    from busi.data.loading import Dataset


def grown(masks: np.ndarray, dilation: int) -> np.ndarray:
    """Each mask grown by a disc of radius ``dilation`` px (unchanged for 0)."""
    if dilation <= 0:
        return masks
    import cv2

    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1,) * 2)
    return np.stack([cv2.dilate((m > 0).astype(np.uint8), disc) for m in masks])


def masked_inputs(images: np.ndarray, masks: np.ndarray | None, mode: str,
                  margin: float = 0.15, dilation: int = 0) -> np.ndarray:
    """Apply (binary) lesion masks to uint8 images as the classifier config says.

    ``multiply`` is the paper's image x mask. ``crop`` cuts the mask's bounding
    box plus ``margin`` (a fraction of the box size) and resizes it back, which
    keeps the lesion's surroundings (margins, posterior shadow) that radiologists
    read; an empty mask keeps the whole image. ``none`` ignores the mask.
    ``dilation`` (pixels, 0 = the paper) first grows each mask by a disc of that
    radius, so that ``multiply`` keeps the lesion's margin, where benign and
    malignant differ most, even when the U-Net draws the boundary a little inside.
    """
    if masks is None or mode == "none":
        return images
    import cv2

    masks = grown(masks, dilation)
    if mode == "multiply":
        return (images * (masks > 0)).astype(np.uint8)

    out = np.empty_like(images)
    h, w = images.shape[1:]
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            out[k] = img
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        dy, dx = int((y1 - y0) * margin), int((x1 - x0) * margin)
        y0, y1, x0, x1 = max(0, y0 - dy), min(h, y1 + dy), max(0, x0 - dx), min(w, x1 + dx)
        out[k] = cv2.resize(img[y0:y1, x0:x1], (w, h), interpolation=cv2.INTER_LINEAR)
    return out


def empty_mask_warning(masks: np.ndarray | None, labels: np.ndarray,
                       classes: tuple[str, ...] | list[str], mode: str) -> str | None:
    """Say so when most lesion images' masks are empty and ``multiply`` blanks them.

    With ``multiply`` an empty mask is a black image. A U-Net that found no lesion in most
    lesion images (the paper's MSE U-Net can end so) then hands the classifier the same
    black input for every class, and its figures measure little more than the class
    frequencies: said before training starts, not discovered in the report afterwards.
    """
    if masks is None or mode != "multiply":
        return None
    lesion = np.array([classes[k] != "normal" for k in labels], dtype=bool)
    n_lesion = int(lesion.sum())
    n_empty = int((~masks[lesion].reshape(n_lesion, -1).any(axis=1)).sum()) if n_lesion else 0
    if not n_lesion or n_empty * 2 < n_lesion:
        return None
    return (f"the U-Net's masks are empty for {n_empty} of {n_lesion} lesion images: with "
            "mask_mode 'multiply' those are black images, the same for every class, so the "
            "classifier can learn little more than how often each class occurs. Check the "
            "U-Net (Dice and missed lesions in its report.html) before reading these figures; "
            "mask_mode 'channel' keeps the scan beside the mask")


def lesion_box(mask: np.ndarray, shape: tuple[int, int], scale: float,
               min_side: float = 0.25) -> tuple[int, int, int] | None:
    """The square crop around a lesion, in the original scan's pixels: (top, left, side).

    ``mask`` is on the models' grid (e.g. 128x128) and the scan ``shape`` (height, width)
    is larger and rarely square, so the mask's bounding box is mapped back to the scan
    first. The side is ``scale`` times the box's longer side (1.5: half the lesion's size
    again of surrounding tissue, where margins and posterior echoes are read), at least
    ``min_side`` of the scan's shorter side, so a few stray pixels are not blown up into
    a crop of speckle. None for an empty mask.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    gh, gw = mask.shape
    h, w = shape
    y0, y1 = ys.min() * h / gh, (ys.max() + 1) * h / gh
    x0, x1 = xs.min() * w / gw, (xs.max() + 1) * w / gw
    side = max(scale * max(y1 - y0, x1 - x0), min_side * min(h, w))
    side = int(round(min(side, 2 * max(h, w))))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    return int(round(cy - side / 2)), int(round(cx - side / 2)), max(side, 1)


def lesion_crops(originals: list[np.ndarray], masks: np.ndarray, size: tuple[int, int],
                 scale: float = 1.5) -> np.ndarray:
    """``mask_mode: lesion_crop``: each lesion cut from the scan at its own resolution.

    A square around the predicted lesion (:func:`lesion_box`), taken from the original
    scan rather than the 128x128 image (malignancy lives in margins, spiculation and
    posterior echoes, which the whole-scan resize blurs away), then resized to ``size``.
    Outside the scan the square is black, as an ultrasound frame's own border. An empty
    mask gives the whole scan, so a lesion the U-Net missed is still shown, not a blank.
    """
    import cv2

    from busi.data.loading import resize_image

    out = np.empty((len(originals), *size), np.uint8)
    for k, (img, m) in enumerate(zip(originals, masks, strict=True)):
        box = lesion_box(m, img.shape[:2], scale)
        if box is None:
            out[k] = resize_image(img, size)
            continue
        top, left, side = box
        h, w = img.shape[:2]
        pad = max(0, -top, -left, top + side - h, left + side - w)
        src = img if not pad else cv2.copyMakeBorder(img, pad, pad, pad, pad,
                                                     cv2.BORDER_CONSTANT, value=0)
        crop = src[top + pad:top + pad + side, left + pad:left + pad + side]
        out[k] = resize_image(crop, size)
    return out


def needs_originals(c) -> bool:
    """Whether a classifier config reads the scans at their own resolution (the caller
    then passes ``originals`` to :func:`classifier_inputs`)."""
    return c.mask_mode == "lesion_crop" and c.masks != "none"


def input_channels(c) -> int:
    """Channels of the classifier's input for a classifier config: 2 (scan, mask) for
    ``mask_mode: channel``, else 1 (the gray, possibly masked or cropped, image)."""
    return 2 if c.mask_mode == "channel" else 1


def classifier_inputs(images: np.ndarray, masks: np.ndarray | None, c,
                      originals: list[np.ndarray] | None = None) -> np.ndarray:
    """The classifier's whole input (N, H, W, C) uint8 as a classifier config
    (``model.classifier``) says: the one call train-cls, evaluate, predict, export and
    Grad-CAM share, so they cannot drift apart.

    One channel: :func:`masked_inputs`. ``mask_mode: channel``: channel 0 is the whole
    scan, untouched, and channel 1 the (grown) mask as 0/255. A lesion the U-Net missed
    is then an empty mask beside the scan, not a black image the classifier would learn
    to call normal, and where it drew something the lesion's surroundings stay in view.
    No masks (``masks: none``) give an empty mask channel, so the input keeps its shape.

    ``mask_mode: lesion_crop`` needs ``originals``, the gray scans at their own size
    (:func:`busi.data.loading.original_images`): :func:`lesion_crops`.
    """
    if c.mask_mode == "lesion_crop" and masks is not None:
        if originals is None:
            raise BusiError("mask_mode 'lesion_crop' needs the scans at their original size, "
                            "and this caller has only the resized images",
                            where="model.classifier.mask_mode",
                            fix="report this as a busi bug; meanwhile use mask_mode channel")
        return lesion_crops(originals, masks, images.shape[1:3], c.crop_scale)[..., None]
    if c.mask_mode == "lesion_crop":  # no masks: the whole scan, as for an empty mask
        return images[..., None]
    if input_channels(c) == 1:
        return masked_inputs(images, masks, c.mask_mode, c.crop_margin, c.mask_dilation)[..., None]
    mask = (np.zeros_like(images) if masks is None
            else np.where(grown(masks, c.mask_dilation) > 0, 255, 0).astype(np.uint8))
    return np.stack([images, mask], axis=-1)


def classifier_masks(cfg: Config, ds: Dataset, seg_run: Path | None) -> np.ndarray | None:
    """The mask of every image of ``ds`` that the classifier config asks for (none, ground
    truth, or the segmentation run's stored masks), so train-cls and export agree on them."""
    source = cfg.model.classifier.masks
    if source == "none" or cfg.model.classifier.mask_mode == "none":
        return None
    if source == "ground_truth":
        return ds.masks
    assert seg_run is not None
    masks = load_masks(seg_run)
    missing = [f for f in ds.files if f not in masks]
    if missing:
        raise BusiError(f"the segmentation run has no mask for {len(missing)} image(s), e.g. "
                        f"{missing[0]!r}", where=str(seg_run),
                        fix="use a segmentation run trained on the same data")
    return np.stack([masks[f] for f in ds.files])
