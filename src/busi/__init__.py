"""busi: breast-ultrasound tumour segmentation and classification on BUSI.

The package is split by concern: ``config`` (typed YAML configs), ``data``
(BUSI layout, decoding, cache), ``check`` (data audit), ``split`` (manifests),
``synth`` (synthetic data), ``augment``, ``models``, ``train``, ``evaluate``,
``report`` and ``cli`` (a thin command-line layer over the others).
"""

__version__ = "0.1.0"
