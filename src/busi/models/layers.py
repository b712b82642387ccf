"""Small serialisable layers shared by the models."""

from __future__ import annotations

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)


@keras.saving.register_keras_serializable(package="busi")
class ImagenetPreprocess(keras.layers.Layer):
    """Apply a Keras application family's own ``preprocess_input`` inside the model.

    ``efficientnet_lite0`` has no Keras application: its ImageNet weights expect RGB
    0..255 as ``(x - 127.5) / 128``, the Lite models' own preprocessing.

    A Lambda would do the same but makes saved models unloadable without
    ``safe_mode=False``; this layer stores only the family name.
    """

    def __init__(self, family: str, **kwargs):
        super().__init__(**kwargs)
        self.family = family

    def call(self, x):
        if self.family == "efficientnet_lite0":
            return (x - 127.5) / 128.0
        module = {"vgg19": keras.applications.vgg19,
                  "mobilenet": keras.applications.mobilenet}[self.family]
        return module.preprocess_input(x)

    def get_config(self):
        return {**super().get_config(), "family": self.family}


@keras.saving.register_keras_serializable(package="busi")
class InputNorm(keras.layers.Layer):
    """Map the raw [0, 1] gray image to what the network expects, inside the model.

    ``fixed``: ``x * scale + offset`` (the identity for the paper's U-Net; [-1, 1] for an
    ImageNet MobileNet, whose ``preprocess_input`` maps 0..255 to [-1, 1]).
    ``per_image``: each image to zero mean and unit variance over its own pixels, so a
    scanner's gain and offset (which differ from hospital to hospital) do not reach the
    network: a linear change of intensities gives the same input.

    Being a layer, it is saved with the model, so a saved model takes the same raw
    images whatever the normalisation.
    """

    def __init__(self, mode: str = "fixed", scale: float = 1.0, offset: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.mode, self.scale, self.offset = mode, float(scale), float(offset)

    def call(self, x):
        ops = keras.ops
        if self.mode == "per_image":
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            std = ops.std(x, axis=(1, 2, 3), keepdims=True)
            return (x - mean) / ops.maximum(std, 1e-3)
        return x * self.scale + self.offset

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "scale": self.scale,
                "offset": self.offset}


@keras.saving.register_keras_serializable(package="busi")
class ScanMaskToRGB(keras.layers.Layer):
    """(scan, mask) channels in 0..255 -> three channels for an ImageNet base, in the model.

    The three are the whole scan, the lesion alone (scan x mask / 255) and where the lesion
    is (the mask): an ImageNet network expects three channels, and this way it still sees
    the whole scan where the U-Net drew nothing. Stores no settings; ``keras.ops`` only, so a
    saved model loads in safe mode on any backend.
    """

    def call(self, x):
        ops = keras.ops
        scan, mask = x[..., :1], x[..., 1:2]
        return ops.concatenate([scan, scan * mask / 255.0, mask], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)
