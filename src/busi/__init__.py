"""busi: breast-ultrasound tumour segmentation and classification on BUSI.

The package is split by concern: ``config`` (typed YAML configs), ``data``
(BUSI layout, decoding, cache), ``check`` (data audit), ``split`` (manifests),
``synth`` (synthetic data), ``augment``, ``models``, ``train``, ``evaluate``,
``report`` and ``cli`` (a thin command-line layer over the others).
"""

import os
from importlib.util import find_spec

__version__ = "0.1.0"


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
