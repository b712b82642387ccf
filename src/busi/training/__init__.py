"""Training: the fit loop with its run bookkeeping (``loop``), the U-Net trainer
(``segmentation``) and the classifier trainer (``classification``).

Training sits above evaluation and reporting on purpose: a finished run scores its own
test split and writes its report, so the trainers import those stages, never the reverse.
"""
