"""Evaluation: segmentation metrics (``segmentation``), the classifier's per-class tables and
intervals (``classification``), and cross-validation tables (``crossval``).

Computed from files a run saved (masks, predictions.csv), never from training code, so every
number can be recomputed; the trainers call in here at the end of a run.
"""
