"""Networks and what surrounds them: U-Net, classifiers, losses, and the pre/post-processing
both training and inference share (``masks``: U-Net probabilities to masks; ``inputs``: masks
applied to the classifier's input), as keras-hub keeps a backbone's preprocessor beside it.

Submodules are imported on use, so ``from busi.models.masks import ...`` does not load Keras.
"""

from __future__ import annotations

__all__ = ["build_classifier", "build_unet"]


def __getattr__(name: str):
    if name == "build_classifier":
        from busi.models.classifiers import build_classifier

        return build_classifier
    if name == "build_unet":
        from busi.models.unet import build_unet

        return build_unet
    raise AttributeError(f"module 'busi.models' has no attribute {name!r}")
