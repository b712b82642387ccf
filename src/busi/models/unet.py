"""The paper's U-Net (section 3.2), with width, depth and input size as parameters.

At ``base_filters=64, depth=4`` and 128x128x1 input this is the paper's network:
two 3x3 ReLU convs per level (64/128/256/512) each followed by 2x2 max-pool and
dropout 0.2; a 1024-filter bottleneck; 2x2 stride-2 transposed convs (ReLU),
concatenation with the matching encoder level, two 3x3 convs and dropout 0.1;
a 1x1 sigmoid output. About 31.0 M parameters.
"""

from __future__ import annotations

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)
from keras import layers  # noqa: E402


def _double_conv(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
    return x


def build_unet(input_shape: tuple[int, int, int] = (128, 128, 1), base_filters: int = 64,
               depth: int = 4, encoder_dropout: float = 0.2, decoder_dropout: float = 0.1,
               name: str = "unet") -> keras.Model:
    """Return the U-Net; the output is a per-pixel lesion probability in float32."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
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
