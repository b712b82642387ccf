"""Workflows that chain the stages, one module per command: ``cv`` (cross-validation),
``evaluate`` (runs on their own test split), ``sites`` (runs on another hospital's data),
``rerun`` and ``demo``.

They sit on top because they run whole trainings or trained models on data, so they use the
training, evaluation, reporting and inference stages below; nothing below imports them.
"""
