"""Inference: trained runs applied to new images (``predict``) or exported to deployable
formats (``export``), with the same preprocessing and mask rule as training.
"""
