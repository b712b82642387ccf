"""The paper's three classifiers (section 3.5): a small CNN, VGG19 and MobileNet; and
EfficientNet-Lite0, a second pretrained backbone beside MobileNet.

``cnn``: four conv blocks (32/64/128/256) with batch norm, LeakyReLU, max-pool and
dropout; flatten; dense 32 LeakyReLU; dense softmax. ``vgg19`` / ``mobilenet``:
the Keras application without its top at 128x128x3 (the gray image copied to
three channels), flatten, dense 256 ReLU, dense softmax. Each family's own
``preprocess_input`` is part of the model, so a saved model takes raw 0..255
gray images and nothing can be forgotten at prediction time. ``efficientnet_lite0`` is
the same head on EfficientNet-Lite0 without its top
(:mod:`busi.models.efficientnet_lite`), its ``(x - 127.5) / 128`` inside the model and
its ImageNet weights from the ``.npz`` file (there is no Keras download).

With ``channels=2`` (``mask_mode: channel``) the input is (scan, mask): the CNN's first
conv takes both; an ImageNet base gets (scan, scan x mask, mask) as its three channels
(:class:`~busi.models.layers.ScanMaskToRGB`).
"""

from __future__ import annotations

from pathlib import Path

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)
from keras import layers  # noqa: E402

from busi.errors import BusiError  # noqa: E402
from busi.models.layers import ImagenetPreprocess, ScanMaskToRGB  # noqa: E402
from busi.models.weights import (  # noqa: E402
    EFFICIENTNET_LITE0_FILE,
    load_efficientnet_lite0_weights,
    load_weights_file,
)

FAMILIES = ("cnn", "vgg19", "mobilenet", "efficientnet_lite0")


def _cnn_body(x, dropout: float = 0.25):
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    for i, filters in enumerate((32, 64, 128, 256), start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"block{i}_conv")(x)
        # momentum 0.9, not 0.99: BUSI gives ~20 steps an epoch, too few for 0.99
        # to settle the moving statistics, and inference-mode accuracy collapses.
        x = layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn")(x)
        x = layers.LeakyReLU(negative_slope=0.1, name=f"block{i}_act")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        x = layers.Dropout(dropout, name=f"block{i}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(32, name="fc")(x)
    x = layers.LeakyReLU(negative_slope=0.1, name="fc_act")(x)
    return layers.Dropout(0.5, name="fc_dropout")(x)


def freeze_batch_norm(base: keras.Model) -> None:
    """Keep a pretrained base's batch norms in inference mode while its convolutions train.

    Keras' transfer-learning advice: BUSI gives ~20 steps an epoch of 32 masked scans whose
    batch statistics are far from ImageNet's, so training-mode BN fitted the training
    batches (accuracy 0.89) while the moving statistics that validation uses drifted
    (accuracy 0.5, the first epoch's checkpoint kept; issue 14). A non-trainable Keras 3
    BatchNormalization normalises with its stored statistics and updates nothing; calling
    ``base(x, training=False)`` is not enough, because Keras 3.15's functional model
    overrides that recorded argument with the outer ``fit``'s ``training=True``.
    """
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def _base(family: str, input_shape: tuple[int, int, int], weights: str | None):
    if family == "efficientnet_lite0":
        from busi.models.efficientnet_lite import efficientnet_lite0

        base = efficientnet_lite0(input_shape)
        if weights is not None:
            load_efficientnet_lite0_weights(base, weights, "model.classifier.weights",
                                            scratch="'none'")
        return base
    app = {"vgg19": keras.applications.VGG19, "mobilenet": keras.applications.MobileNet}[family]
    kwargs = {"include_top": False, "input_shape": input_shape}
    if family == "mobilenet":
        kwargs["alpha"] = 1.0
    if weights not in (None, "imagenet"):
        # A file: built without weights, then loaded by the helper that refuses a file of
        # another network or width, or one that lacks layers (Keras only warns for some).
        base = app(weights=None, **kwargs)
        args = "include_top=False" + (", alpha=1.0" if family == "mobilenet" else "")
        load_weights_file(base, weights, f"{app.__name__} base ({args})",
                          "model.classifier.weights",
                          fix=f"pass a weights file saved from keras.applications."
                              f"{app.__name__}({args}), 'imagenet' to download Keras' own, "
                              "or 'none' to train from scratch")
        return base
    try:
        return app(weights=weights, **kwargs)
    except Exception as exc:  # network refused, truncated download
        raise BusiError(
            f"ImageNet weights for {family} could not be downloaded ({type(exc).__name__})",
            where="model.classifier.weights",
            fix=f"on a machine with internet run `python -c \"import keras; "
                f"keras.applications.{app.__name__}(include_top=False, weights='imagenet')\"`, "
                f"copy the file from ~/.keras/models/ and pass its path: "
                f"--set model.classifier.weights=/path/to/file.h5 "
                f"(or use weights: none to train from scratch)") from None


def build_classifier(family: str, input_size: tuple[int, int] = (128, 128), n_classes: int = 3,
                     weights: str = "imagenet", channels: int = 1) -> keras.Model:
    """Build one of the paper's classifiers; inputs are (H, W, channels) in 0..255.

    ``channels``: 1, the gray (masked) image; 2, the scan and its lesion mask (0/255), as
    :func:`busi.models.inputs.classifier_inputs` lays them out for ``mask_mode: channel``.
    """
    if family not in FAMILIES:
        raise BusiError(f"unknown classifier {family!r}", fix=f"use one of {', '.join(FAMILIES)}")
    if channels not in (1, 2):
        raise BusiError(f"a classifier takes 1 or 2 input channels, not {channels}")
    inputs = keras.Input((*input_size, channels), name="image")
    if family == "cnn":
        x = _cnn_body(inputs)
    else:
        # "unet": built bare here; the trainer copies its U-Net's encoder in afterwards.
        w = None if weights in ("none", "", None, "unet") else weights
        lite = family == "efficientnet_lite0"
        if lite and w == "imagenet":
            raise BusiError("EfficientNet-Lite0 has no Keras download of ImageNet weights "
                            "('imagenet')", where="model.classifier.weights",
                            fix=f"pass the file: --set model.classifier.weights="
                                f"data/weights/{EFFICIENTNET_LITE0_FILE} (README, 'Pretrained "
                                f"weights'), or 'none' to train from scratch")
        if w not in (None, "imagenet") and not Path(w).is_file():
            raise BusiError("weights file not found", where=str(w),
                            fix=f"pass an existing {EFFICIENTNET_LITE0_FILE} or 'none'" if lite
                            else "pass an existing .h5/.weights.h5 file, 'imagenet' or 'none'")
        rgb = (layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs]) if channels == 1
               else ScanMaskToRGB(name="scan_mask_to_rgb")(inputs))
        x = ImagenetPreprocess(family, name="preprocess")(rgb)
        base = _base(family, (*input_size, 3), w)
        if w is None:  # from scratch on a few hundred images: let BN statistics settle
            for layer in base.layers:
                if isinstance(layer, layers.BatchNormalization):
                    layer.momentum = 0.9
        if w is not None or weights == "unet":
            freeze_batch_norm(base)
        x = base(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(256, activation="relu", name="fc")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=family)
