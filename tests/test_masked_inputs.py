"""How a lesion mask is applied to the classifier's input (multiply, crop, none)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")
from busi.models.inputs import masked_inputs  # noqa: E402


def _case():
    image = np.arange(64 * 64, dtype=np.uint32).reshape(1, 64, 64) % 251
    image = image.astype(np.uint8) + 1  # no zero pixel, so blanking is visible
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 20:30, 10:40] = 1
    return image, mask


def test_multiply_is_the_papers_image_times_mask() -> None:
    image, mask = _case()
    out = masked_inputs(image, mask, "multiply")
    assert (out[mask == 0] == 0).all() and (out[mask == 1] == image[mask == 1]).all()


def test_crop_keeps_the_lesion_box_with_its_margin_at_full_size() -> None:
    import cv2

    image, mask = _case()
    out = masked_inputs(image, mask, "crop", margin=0.1)
    # box rows 20..29, cols 10..39; margin 10% of 10 and 30 px -> 1 and 3 px
    expected = cv2.resize(image[0, 19:31, 7:43], (64, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out[0], expected)


def test_an_empty_mask_keeps_the_whole_image_when_cropping_and_none_ignores_masks() -> None:
    image, _ = _case()
    empty = np.zeros_like(image)
    np.testing.assert_array_equal(masked_inputs(image, empty, "crop"), image)
    np.testing.assert_array_equal(masked_inputs(image, empty, "none"), image)
    assert masked_inputs(image, empty, "multiply").max() == 0  # the paper's leak, for normals


def test_dilation_keeps_a_ring_of_that_width_around_the_lesion_and_nothing_else() -> None:
    image, mask = _case()
    out = masked_inputs(image, mask, "multiply", dilation=3)
    kept = out > 0
    # rows 20..29, cols 10..39 grown by a disc of radius 3: the straight edges move
    # out by exactly 3 px; the corners are rounded, so the box corner stays blank
    assert kept[0, 17, 25] and kept[0, 32, 25] and kept[0, 25, 7] and kept[0, 25, 42]
    assert not kept[0, 16, 25] and not kept[0, 33, 25] and not kept[0, 25, 6]
    assert not kept[0, 17, 7]
    assert (out[kept] == image[kept]).all()  # kept pixels are the image's own
    empty = np.zeros_like(image)
    assert masked_inputs(image, empty, "multiply", dilation=5).max() == 0  # nothing to grow


def test_channel_mode_gives_the_whole_scan_and_the_mask_as_a_second_channel() -> None:
    """mask_mode channel: a missed lesion (empty mask) leaves the scan as it is, not a
    black image; a found one adds its (grown) mask beside the untouched scan."""
    from busi.config import ClassifierConfig
    from busi.models.inputs import classifier_inputs, input_channels

    image, mask = _case()
    c = ClassifierConfig(mask_mode="channel")
    assert input_channels(c) == 2 and input_channels(ClassifierConfig()) == 1
    both = np.concatenate([image, image])
    x = classifier_inputs(both, np.concatenate([mask, np.zeros_like(mask)]), c)
    assert x.shape == (2, 64, 64, 2) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], both)  # the scan, everywhere, in both
    np.testing.assert_array_equal(x[0, ..., 1], 255 * mask[0])
    assert x[1, ..., 1].max() == 0
    grown = classifier_inputs(image, mask, ClassifierConfig(mask_mode="channel",
                                                            mask_dilation=3))
    np.testing.assert_array_equal(grown[..., 1] > 0,
                                  masked_inputs(image, mask, "multiply", dilation=3) > 0)
    np.testing.assert_array_equal(grown[..., 0], image)
    none = classifier_inputs(image, None, c)  # masks: none keeps the input's shape
    assert none.shape == (1, 64, 64, 2) and none[..., 1].max() == 0
    gray = classifier_inputs(image, mask, ClassifierConfig(mask_mode="multiply"))
    np.testing.assert_array_equal(gray, masked_inputs(image, mask, "multiply")[..., None])


def test_a_u_net_that_found_no_lesion_is_said_before_the_classifier_trains_on_black_images(
) -> None:
    """train-cls warns when most lesion images' masks are empty under ``multiply``: the
    classifier would see one black image for every class. Normal images (empty by right)
    do not count, and a U-Net that found most lesions is not warned about."""
    from busi.models.inputs import empty_mask_warning

    classes = ("benign", "malignant", "normal")
    labels = np.array([0, 0, 1, 1, 2, 2])
    masks = np.zeros((6, 8, 8), np.uint8)
    said = empty_mask_warning(masks, labels, classes, "multiply")
    assert said is not None and "empty for 4 of 4 lesion images" in said
    masks[0, 2, 2] = masks[2, 3, 3] = masks[3, 4, 4] = 1  # 3 of 4 lesions found
    assert empty_mask_warning(masks, labels, classes, "multiply") is None
    masks[:] = 0
    assert empty_mask_warning(masks, labels, classes, "channel") is None  # scan stays in view
    assert empty_mask_warning(None, labels, classes, "multiply") is None  # no masks used
