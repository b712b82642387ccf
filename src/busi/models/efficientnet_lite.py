"""EfficientNet-Lite0 without its top, with Keras' EfficientNet layer names.

The Lite variant of Tan & Le's EfficientNet-B0, made for mobile: no squeeze-excite, ReLU6,
and a stem (32 filters) and head (``top_conv``, 1280) that are never scaled. Keras 3 has no
Lite builder: its public ``EfficientNetB0`` fixes swish and squeeze-excite, and the general
builder behind it (private, ``keras.src``) always puts ``Rescaling(1/255)`` and a
``Normalization`` layer with weights of its own in front of the stem. So this is Keras'
builder written out again for the Lite network: the same layers in the same order with the
same names (``stem_conv``, ``stem_bn``, ``block1a_dwconv``, ..., ``top_conv``, ``top_bn``,
``top_activation``), the same asymmetric padding before each stride-2 convolution, batch norm
epsilon 1e-3, and the same drop-connect (``block2b_drop``, ...). An ImageNet file in the
layout of ``keras.applications`` (one array per ``layer.get_weights()`` entry) fits it
layer by layer: :func:`busi.models.weights.load_efficientnet_lite0_weights`.

The model takes RGB already normalised as ``(x - 127.5) / 128`` (the Lite models' own
preprocessing; :class:`busi.models.layers.ImagenetPreprocess` does it inside the
classifier). ``keras.layers`` only, so it builds on every backend.
"""

from __future__ import annotations

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)
from keras import layers  # noqa: E402

# EfficientNet-B0's stages: (kernel, repeats, filters in, filters out, expansion, stride).
# At width and depth coefficient 1.0 nothing is rounded, so the Lite stem (32) and head (1280)
# are the fixed ones the Lite models keep.
BLOCKS = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
          (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
          (3, 1, 192, 320, 6, 1))
STEM_FILTERS, TOP_FILTERS = 32, 1280
ACTIVATION = "relu6"
# Layers whose outputs are the encoder's scales for a U-Net (strides 2, 4, 8, 16, 32).
FEATURES = ("block2a_expand_activation", "block3a_expand_activation",
            "block4a_expand_activation", "block6a_expand_activation", "top_activation")
# Keras' EfficientNet convolution initialiser (used when no weights are loaded).
_INIT = {"class_name": "VarianceScaling",
         "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"}}


def _channels_last() -> bool:
    return keras.config.image_data_format() == "channels_last"


def _correct_pad(x, kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The zero padding Keras' applications put before a stride-2 'valid' convolution
    (``imagenet_utils.correct_pad``): one pixel less on the top/left of an even side."""
    size = tuple(x.shape[1:3] if _channels_last() else x.shape[2:4])
    adjust = (1, 1) if size[0] is None else (1 - size[0] % 2, 1 - size[1] % 2)
    half = kernel // 2
    return (half - adjust[0], half), (half - adjust[1], half)


def _block(x, name: str, kernel: int, filters_in: int, filters_out: int, expand: int,
           strides: int, drop_rate: float):
    """Keras' EfficientNet inverted-residual block with ``se_ratio`` 0 (no squeeze-excite)."""
    axis = -1 if _channels_last() else 1
    inputs = x
    if expand != 1:
        x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False,
                          kernel_initializer=_INIT, name=f"{name}expand_conv")(x)
        x = layers.BatchNormalization(axis=axis, name=f"{name}expand_bn")(x)
        x = layers.Activation(ACTIVATION, name=f"{name}expand_activation")(x)
    if strides == 2:
        x = layers.ZeroPadding2D(_correct_pad(x, kernel), name=f"{name}dwconv_pad")(x)
    x = layers.DepthwiseConv2D(kernel, strides=strides,
                               padding="valid" if strides == 2 else "same", use_bias=False,
                               depthwise_initializer=_INIT, name=f"{name}dwconv")(x)
    x = layers.BatchNormalization(axis=axis, name=f"{name}bn")(x)
    x = layers.Activation(ACTIVATION, name=f"{name}activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name=f"{name}project_conv")(x)
    x = layers.BatchNormalization(axis=axis, name=f"{name}project_bn")(x)
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1),
                               name=f"{name}drop")(x)
        x = layers.add([x, inputs], name=f"{name}add")
    return x


def efficientnet_lite0(input_shape: tuple[int, int, int] = (224, 224, 3),
                       name: str = "efficientnet_lite0",
                       drop_connect_rate: float = 0.2) -> keras.Model:
    """EfficientNet-Lite0 without its top: normalised RGB in, ``top_activation`` out.

    ``input_shape``: (H, W, 3) (channels first when Keras is set so); any size of 32 or
    more, a multiple of 32 for the U-Net's feature maps (:data:`FEATURES`) to halve
    evenly. ``drop_connect_rate``: Keras' stochastic depth, rising linearly over the
    blocks to this rate (0.2, as Keras' B0); 0 builds no dropout layers. Random weights:
    load ImageNet ones with :func:`busi.models.weights.load_efficientnet_lite0_weights`.
    """
    axis = -1 if _channels_last() else 1
    inputs = keras.Input(input_shape, name=f"{name}_input")
    x = layers.ZeroPadding2D(_correct_pad(inputs, 3), name="stem_conv_pad")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="valid", use_bias=False,
                      kernel_initializer=_INIT, name="stem_conv")(x)
    x = layers.BatchNormalization(axis=axis, name="stem_bn")(x)
    x = layers.Activation(ACTIVATION, name="stem_activation")(x)
    total = float(sum(repeats for _, repeats, *_ in BLOCKS))
    b = 0
    for i, (kernel, repeats, f_in, f_out, expand, strides) in enumerate(BLOCKS):
        for j in range(repeats):
            x = _block(x, f"block{i + 1}{chr(j + 97)}_", kernel,
                       f_in if j == 0 else f_out, f_out, expand, strides if j == 0 else 1,
                       drop_connect_rate * b / total)
            b += 1
    x = layers.Conv2D(TOP_FILTERS, 1, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name="top_conv")(x)
    x = layers.BatchNormalization(axis=axis, name="top_bn")(x)
    x = layers.Activation(ACTIVATION, name="top_activation")(x)
    return keras.Model(inputs, x, name=name)
