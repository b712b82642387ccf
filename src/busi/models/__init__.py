"""Model builders: each file builds a Keras model and nothing else."""

from busi.models.classifiers import build_classifier
from busi.models.unet import build_unet

__all__ = ["build_classifier", "build_unet"]
