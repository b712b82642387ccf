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
