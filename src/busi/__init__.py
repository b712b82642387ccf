"""busi: breast-ultrasound tumour segmentation and classification on BUSI.

Layout: the package reads as the pipeline, each layer importing only itself and the
layers above it in this list (``tests/test_layout.py`` checks it):

0. ``errors``, ``config``, ``runtime``, ``runs``: foundations (``runs`` is the one module
   that knows a run folder's layout: creating, finding, resuming, reading its files);
1. ``data``: loading, checking, splitting, augmenting, batching, synthetic data;
2. ``models``: U-Net, classifiers, losses, and what both training and inference apply
   around them (``masks``: probabilities to masks; ``inputs``: masks on the classifier input);
3. ``evaluation``: segmentation metrics, per-class tables, cross-validation tables;
4. ``reporting``: plots, report.html/.md, Grad-CAM;
5. ``training``: the fit loop with its run bookkeeping, the U-Net and classifier trainers;
6. ``inference``: predict on new images, export;
7. ``workflows``: cross-validation, evaluate, rerun, demo;
8. ``cli``: the thin command line.

Evaluation and reporting sit below training because a finished run scores its test
split and writes its report; nothing they do needs the trainers.

From a notebook::

    import busi
    cfg = busi.load_config("cpu")
    seg = busi.train_segmentation(cfg)
    cls = busi.train_classifier(cfg, seg_run=str(seg))
    busi.evaluate([str(cls)])
    mask, x, probs = busi.Predictor(str(seg), str(cls))(gray_image)

The names are imported on first use, so ``import busi`` stays cheap (no TensorFlow).
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__", "evaluate", "load_config", "train_classifier",
           "train_segmentation"]

_LAZY = {"train_segmentation": "busi.training.segmentation",
         "train_classifier": "busi.training.classification",
         "Predictor": "busi.inference.predict"}


def load_config(path: str | Path = "paper", overrides: list[str] | None = None) -> Any:
    """A validated config from a YAML path or a name in configs/ (``paper``, ``cpu``, ``demo``),
    with ``key=value`` overrides, as ``--config`` and ``--set`` give it on the command line."""
    from busi.config import find_config
    from busi.config import load_config as load

    return load(find_config(str(path)), overrides or ())


def evaluate(runs: list[str] | None = None, seg_run: str | list[str] | None = None,
             outputs_root: str = "outputs") -> Path:
    """``busi evaluate`` from Python: classifier runs side by side (the newest split's by
    default) in a new ``outputs/eval/<run>/``, with one U-Net's test figures or several
    U-Nets side by side (``seg_run``); returns that folder."""
    from busi.workflows.evaluate import evaluate_command

    segs = [seg_run] if isinstance(seg_run, str) else seg_run
    return evaluate_command(runs, seg_runs=segs, outputs_root=outputs_root)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'busi' has no attribute {name!r}")


def _choose_backend() -> None:
    """Use JAX when TensorFlow is absent and no backend was asked for.

    Keras defaults to TensorFlow; on a machine with only JAX (e.g. JAX + CUDA)
    that default would fail at import. An explicit KERAS_BACKEND always wins.
    """
    if "KERAS_BACKEND" not in os.environ and not _installed("tensorflow") \
            and _installed("jax"):
        os.environ["KERAS_BACKEND"] = "jax"


def _installed(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as absent
        return False


_choose_backend()
