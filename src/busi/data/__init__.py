"""Data: loading BUSI (``loading``), auditing it (``check``), splitting it (``split``),
augmenting (``augment``) and batching it for ``model.fit`` (``batches``), and synthetic
BUSI-like data for tests and the demo (``synth``).
"""
