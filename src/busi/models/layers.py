"""Small serialisable layers shared by the models."""

from __future__ import annotations

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)


@keras.saving.register_keras_serializable(package="busi")
class ImagenetPreprocess(keras.layers.Layer):
    """Apply a Keras application family's own ``preprocess_input`` inside the model.

    A Lambda would do the same but makes saved models unloadable without
    ``safe_mode=False``; this layer stores only the family name.
    """

    def __init__(self, family: str, **kwargs):
        super().__init__(**kwargs)
        self.family = family

    def call(self, x):
        module = {"vgg19": keras.applications.vgg19,
                  "mobilenet": keras.applications.mobilenet}[self.family]
        return module.preprocess_input(x)

    def get_config(self):
        return {**super().get_config(), "family": self.family}
