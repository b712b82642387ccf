"""The paper's U-Net (section 3.2), with width, depth and input size as parameters.

At ``base_filters=64, depth=4`` and 128x128x1 input this is the paper's network:
two 3x3 ReLU convs per level (64/128/256/512) each followed by 2x2 max-pool and
dropout 0.2; a 1024-filter bottleneck; 2x2 stride-2 transposed convs (ReLU),
concatenation with the matching encoder level, two 3x3 convs and dropout 0.1;
a 1x1 sigmoid output. About 31.0 M parameters.

:func:`build_mobilenet_unet` is the same U shape on a pretrained encoder, as segmentation
model zoos build it: the ImageNet MobileNet v1's feature maps at strides 2, 4, 8 and 16
feed the decoder's skip connections and its stride-32 output is the bottleneck. It learns
from BUSI's few hundred images what a from-scratch encoder cannot: edges and textures
seen on a million photographs, which transfer to scanners it never saw.
:func:`build_efficientnet_unet` is the same on EfficientNet-Lite0 (ImageNet weights from
its ``.npz``), with its expansion activations at strides 2 to 16 and ``top_activation``.
"""

from __future__ import annotations

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)
from keras import layers  # noqa: E402

from busi.models.layers import InputNorm  # noqa: E402
from busi.models.weights import (  # noqa: E402
    load_efficientnet_lite0_weights,
    load_weights_file,
)

# MobileNet v1 layers whose outputs are the encoder's scales (strides 2, 4, 8, 16, 32).
MOBILENET_SKIPS = ("conv_pw_1_relu", "conv_pw_3_relu", "conv_pw_5_relu", "conv_pw_11_relu",
                   "conv_pw_13_relu")


def _double_conv(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
    return x


def build_unet(input_shape: tuple[int, int, int] = (128, 128, 1), base_filters: int = 64,
               depth: int = 4, encoder_dropout: float = 0.2, decoder_dropout: float = 0.1,
               name: str = "unet", input_norm: str = "fixed") -> keras.Model:
    """Return the U-Net; the output is a per-pixel lesion probability in float32.

    ``input_norm="per_image"`` standardises each image first (see :class:`InputNorm`);
    ``"fixed"`` feeds the [0, 1] image as the paper does, with no extra layer.
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs if input_norm == "fixed" else InputNorm(input_norm, name="input_norm")(inputs)
    skips = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = _double_conv(x, filters, f"enc{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
        x = layers.Dropout(encoder_dropout, name=f"enc{level + 1}_dropout")(x)
    x = _double_conv(x, base_filters * 2**depth, "bottleneck")
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="valid", activation="relu",
                                   name=f"dec{level + 1}_up")(x)
        x = layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level]])
        x = _double_conv(x, filters, f"dec{level + 1}")
        x = layers.Dropout(decoder_dropout, name=f"dec{level + 1}_dropout")(x)
    # float32 output under mixed precision: sigmoid/loss in bfloat16 lose small probabilities.
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=name)


def _conv_bn(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_mobilenet_unet(input_shape: tuple[int, int, int] = (128, 128, 1),
                         base_filters: int = 16, decoder_dropout: float = 0.1,
                         weights: str = "", input_norm: str = "fixed",
                         name: str = "mobilenet_unet") -> keras.Model:
    """A U-Net whose encoder is Keras' MobileNet v1 (alpha 1.0), ImageNet weights from a file.

    The gray [0, 1] image becomes the encoder's input inside the model: scaled to
    [-1, 1] (MobileNet's ``preprocess_input``; ``input_norm="per_image"``
    standardises it instead) and repeated to three channels. The encoder's batch
    norms are trainable and, during ``fit``, re-estimate their statistics from each
    batch (moving averages, momentum 0.99): the ImageNet means and variances of
    photographs are replaced by those of ultrasound scans. That is the design every
    figure in docs/RESULTS.md was measured with. (An earlier version called the encoder
    with ``training=False`` and said the statistics stayed frozen; Keras 3's functional
    ``fit`` overrides that flag for a nested model, so they never were. Freezing them,
    as :func:`busi.models.classifiers.freeze_batch_norm` does for the classifiers, would
    change every measured U-Net figure and needs its own cross-validation first.)
    The decoder (conv-BN-ReLU twice per scale, widths
    ``base_filters * 2**level``) upsamples bilinearly and joins each encoder scale.
    Both sides must be multiples of 32.
    """
    inputs = keras.Input(input_shape, name="image")
    if input_norm == "fixed":
        x = InputNorm("fixed", scale=2.0, offset=-1.0, name="input_norm")(inputs)
    else:
        x = InputNorm(input_norm, name="input_norm")(inputs)
    x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    base = keras.applications.MobileNet(input_shape=(*input_shape[:2], 3), include_top=False,
                                        weights=None, alpha=1.0)
    if weights:
        load_weights_file(base, weights, "MobileNet encoder", "model.unet.encoder_weights")
    encoder = keras.Model(base.input, [base.get_layer(n).output for n in MOBILENET_SKIPS],
                          name="mobilenet_encoder")
    return _decode(inputs, encoder(x), base_filters, decoder_dropout, name)


def _decode(inputs, features, base_filters: int, decoder_dropout: float, name: str):
    """The pretrained encoders' decoder: from the stride-32 map up, joining each scale."""
    *skips, x = features
    for level in reversed(range(5)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level + 1}_up")(x)
        if level:
            x = layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level - 1]])
        x = _conv_bn(x, base_filters * 2**level, f"dec{level + 1}")
        if decoder_dropout:
            x = layers.Dropout(decoder_dropout, name=f"dec{level + 1}_dropout")(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="mask")(x)
    return keras.Model(inputs, outputs, name=name)


def build_efficientnet_unet(input_shape: tuple[int, int, int] = (128, 128, 1),
                            base_filters: int = 16, decoder_dropout: float = 0.1,
                            weights: str = "", input_norm: str = "fixed",
                            name: str = "efficientnet_lite0_unet") -> keras.Model:
    """A U-Net whose encoder is EfficientNet-Lite0, ImageNet weights from its ``.npz`` file.

    As :func:`build_mobilenet_unet`, with the encoder ``efficientnet_lite0_encoder``: the
    gray [0, 1] image is mapped inside the model to what the Lite weights expect,
    ``(255 x - 127.5) / 128`` (``input_norm="per_image"`` standardises it instead),
    repeated to three channels; the skips are
    :data:`busi.models.efficientnet_lite.FEATURES` (strides 2, 4, 8, 16) and
    ``top_activation`` (stride 32) is the bottleneck; the decoder is the same. The batch
    norms re-estimate their statistics in ``fit``, as the MobileNet encoder's do.
    ``weights``: the ``.npz`` path, '' for random. Both sides must be multiples of 32.
    """
    from busi.models.efficientnet_lite import FEATURES, efficientnet_lite0

    inputs = keras.Input(input_shape, name="image")
    if input_norm == "fixed":
        x = InputNorm("fixed", scale=255.0 / 128.0, offset=-127.5 / 128.0,
                      name="input_norm")(inputs)
    else:
        x = InputNorm(input_norm, name="input_norm")(inputs)
    x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    base = efficientnet_lite0((*input_shape[:2], 3))
    if weights:
        load_efficientnet_lite0_weights(base, weights, "model.unet.encoder_weights")
    encoder = keras.Model(base.input, [base.get_layer(n).output for n in FEATURES],
                          name="efficientnet_lite0_encoder")
    return _decode(inputs, encoder(x), base_filters, decoder_dropout, name)


def unet_from_config(u, image_size: tuple[int, int] | list[int]) -> keras.Model:
    """The U-Net a :class:`busi.config.UNetConfig` describes, for gray images of ``image_size``."""
    h, w = image_size
    if u.encoder == "mobilenet":
        return build_mobilenet_unet((h, w, 1), u.base_filters, u.decoder_dropout,
                                    weights=u.encoder_weights, input_norm=u.input_norm)
    if u.encoder == "efficientnet_lite0":
        return build_efficientnet_unet((h, w, 1), u.base_filters, u.decoder_dropout,
                                       weights=u.encoder_weights, input_norm=u.input_norm)
    return build_unet((h, w, 1), u.base_filters, u.depth, u.encoder_dropout, u.decoder_dropout,
                      input_norm=u.input_norm)
