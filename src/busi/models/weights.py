"""Loading a Keras weights file into a network, or saying clearly why it does not fit.

Shared by the U-Net's MobileNet encoder (``model.unet.encoder_weights``) and the
classifiers' ImageNet bases (``model.classifier.weights``), so both refuse a misfit
file the same way.
"""

from __future__ import annotations

from busi.errors import BusiError
from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)


def load_weights_file(model: keras.Model, path: str, what: str, where: str,
                      fix: str | None = None) -> None:
    """Load a Keras weights file into ``model``, or say clearly why it does not fit.

    Keras raises for some misfits (another architecture, another width) but only warns
    ("Skipping ...") for others, which would leave those layers at random weights and
    train on silently: both are one BusiError naming the file.
    """
    from pathlib import Path

    if not Path(path).is_file():
        raise BusiError(f"{what} weights file not found", where=f"{where}: {path}",
                        fix="give the path of a .weights.h5 file (e.g. "
                            "../shared/weights/mobilenet_v1_imagenet/"
                            "mobilenet_1_0_notop.weights.h5), or '' to start from random "
                            "weights")
    import warnings

    try:
        # Keras only warns when a file lacks some of the layers ("Skipping ..."), which
        # would leave them at random weights: that is a misfit too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(path)
        skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()
                   or "could not be loaded" in str(w.message).lower()]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as exc:  # Keras raises ValueError/KeyError/OSError for a misfit file
        detail = " ".join(str(exc).split())[:240]
        raise BusiError(f"the file does not fit the {what} ({type(exc).__name__}: {detail})",
                        where=f"{where}: {path}",
                        fix=fix or f"use a weights file saved from the same {what} "
                                   "architecture (include_top=False, alpha 1.0)") from None


def unet_encoder(unet: keras.Model, where: str) -> keras.Model:
    """The pretrained-encoder U-Net's encoder (``model.unet.encoder: mobilenet``).

    ``model.classifier.weights: unet`` starts the MobileNet classifier from it: an
    encoder trained on the same scans with dense labels (where the lesion is, pixel by
    pixel), which knows ultrasound better than ImageNet does.
    """
    try:
        return unet.get_layer("mobilenet_encoder")
    except ValueError:
        raise BusiError("'model.classifier.weights: unet' needs a U-Net with a MobileNet "
                        "encoder, and this run's U-Net has the paper's plain encoder",
                        where=where, fix="use a U-Net trained with model.unet.encoder: "
                                         "mobilenet (configs/cpu.yaml), or weights: imagenet "
                                         "/ a weights file / none") from None


def copy_encoder_weights(encoder: keras.Model, classifier: keras.Model) -> int:
    """Copy ``encoder``'s layer weights into the classifier's base, matched by layer name.

    Returns how many layers were copied; every weight-bearing layer of the base must
    find its twin (the same Keras MobileNet v1), or nothing would be pretrained.
    """
    base = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    copied = 0
    for layer in base.layers:
        if not layer.weights:
            continue
        layer.set_weights(encoder.get_layer(layer.name).get_weights())
        copied += 1
    return copied
