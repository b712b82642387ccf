"""From class probabilities to the call a clinician acts on (the classifier's post-processor,
beside ``masks``, because training, evaluation and ``busi predict`` must make the same call).

Two decisions, each with its own score and a threshold chosen on validation images, never
on the test images or on another site's:

1. **Is there a lesion at all?** ``presence``: ``argmax`` (the classifier's own call: a
   lesion unless "normal" is its most probable class), or a score with a threshold that
   lets at most ``max_missed_lesions`` of the validation lesion images through:
   ``classifier`` = 1 - p(normal); ``unet`` = the U-Net's highest lesion probability in the
   scan; ``both`` = the mean of the two; ``head`` = the U-Net's presence head
   (models/presence.py); ``head_classifier`` = its mean with 1 - p(normal). "Whatever
   survives the mask threshold and the largest-component rule" is not a decision: the U-Net
   draws a blob on most normal scans.
2. **Is the lesion malignant?** ``malignancy`` = p(malignant) / (p(benign) + p(malignant)),
   the score of the benign-vs-malignant ROC curve, against the threshold that calls
   ``malignant_sensitivity`` of new cancers malignant among those the presence decision
   finds (chosen on the validation cancers it finds; its own misses are reported apart, as
   lesion scans called normal). A clinician picks the sensitivity; the specificity is what
   the model gives for it.

At another hospital the thresholds chosen on BUSI's validation images are applied unchanged,
as a user would: that is what ``busi evaluate --data`` reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PRESENCE_SCORES = ("argmax", "classifier", "unet", "both", "head", "head_classifier")
# Which of the U-Net's scores a presence kind reads: its highest lesion probability ("max",
# the ``unet_max`` column) or its encoder's presence head ("head", ``unet_head``;
# models/presence.py).
UNET_SCORE = {"unet": "max", "both": "max", "head": "head", "head_classifier": "head"}
# How the thresholds are chosen (threshold_for_sensitivity). A stored operating point of
# another rule is chosen again from the run's validation predictions when it is read.
RULE = "split-conformal rank of the cancers found"


@dataclass(frozen=True)
class OperatingPoint:
    """The two thresholds of a classifier run, and what they were chosen for."""

    malignant_sensitivity: float        # the target, on the validation cancers
    malignant_threshold: float          # on malignancy(); >= is malignant
    presence: str = "argmax"            # one of PRESENCE_SCORES
    max_missed_lesions: float = 0.03    # the target, on the validation lesion images
    presence_threshold: float | None = None  # on presence_score(); >= is a lesion
    n_val_malignant: int = 0
    n_val_lesion: int = 0
    rule: str = ""                      # how the thresholds were chosen (RULE)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def words(self) -> str:
        """One line for reports: what was chosen, on what."""
        lesion = ("a lesion unless 'normal' is the most probable class" if self.presence == "argmax"
                  else f"a lesion when the {PRESENCE_WORDS[self.presence]} is >= "
                       f"{self.presence_threshold:.3f} (chosen on the {self.n_val_lesion} "
                       f"validation lesion images to miss at most "
                       f"{100 * self.max_missed_lesions:g}%)")
        chosen = (f"chosen on the {self.n_val_malignant} validation cancers found "
                  f"({self.rule or 'their order statistic'}) for sensitivity >= "
                  f"{self.malignant_sensitivity:g}" if self.n_val_malignant else
                  "no validation cancer to choose on: the default")
        return f"{lesion}; malignant when {MALIGNANCY} >= {self.malignant_threshold:.3f} ({chosen})"


MALIGNANCY = "p(malignant) / (p(benign) + p(malignant))"
PRESENCE_WORDS = {"classifier": "1 - p(normal)",
                  "unet": "U-Net's highest lesion probability",
                  "both": "mean of 1 - p(normal) and the U-Net's highest lesion probability",
                  "head": "U-Net encoder's presence head",
                  "head_classifier": "mean of 1 - p(normal) and the U-Net encoder's presence "
                                     "head"}


def _column(probs: np.ndarray, classes: list[str] | tuple[str, ...], name: str) -> np.ndarray:
    return probs[:, list(classes).index(name)] if name in classes else np.zeros(len(probs))


def malignancy(probs: np.ndarray, classes: list[str] | tuple[str, ...]) -> np.ndarray:
    """p(malignant) / (p(benign) + p(malignant)), 0.5 where both are 0."""
    m, b = _column(probs, classes, "malignant"), _column(probs, classes, "benign")
    total = m + b
    return np.where(total > 0, m / np.where(total > 0, total, 1.0), 0.5)


def unet_score(kind: str, unet) -> np.ndarray | None:
    """The U-Net score a presence ``kind`` reads (:data:`UNET_SCORE`) from ``unet``: a dict
    ``{"max": ..., "head": ...}``, or one array (the highest lesion probabilities, as runs
    before the head stored them); None when it is not there."""
    key = UNET_SCORE.get(kind)
    if key is None or unet is None:
        return None
    got = unet.get(key) if isinstance(unet, dict) else (unet if key == "max" else None)
    return None if got is None else np.asarray(got, dtype=float)


def has_scores(kind: str, unet) -> bool:
    """Whether ``unet`` holds what presence ``kind`` needs."""
    return kind not in UNET_SCORE or unet_score(kind, unet) is not None


def presence_score(kind: str, probs: np.ndarray, classes: list[str] | tuple[str, ...],
                   unet_max) -> np.ndarray:
    """The lesion-presence score of each image for ``kind`` (not ``argmax``). ``unet_max``:
    the U-Net's scores (:func:`unet_score`)."""
    clf = 1.0 - _column(probs, classes, "normal")
    if kind == "classifier":
        return clf
    unet = unet_score(kind, unet_max)
    if unet is None:
        raise ValueError(f"presence {kind!r} needs the U-Net's {UNET_SCORE[kind]} scores")
    return unet if kind in ("unet", "head") else (clf + unet) / 2.0


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray,
                              target: float) -> float | None:
    """The threshold that calls at least ``target`` of *new* positives positive, from the
    positives' validation scores: the split-conformal rank.

    With n validation positives whose scores sorted ascending are s(1) <= ... <= s(n), the
    threshold is s(j) with j = floor((n + 1) (1 - target)): a new positive exchangeable with
    them scores >= s(j) with probability at least ``target``. The plain order statistic
    (the threshold that calls exactly ``target`` of the validation positives) is too high on
    the 10-20 validation cancers a BUSI fold has: on the first CV fold it gave 0.916 and
    called 0.60 of the test cancers malignant, for a target of 0.90. Where n is too small
    for the guarantee (j = 0) the lowest positive score is used. A positive whose score is
    -inf (already lost to the presence decision) can never be reached: if the rank lands
    on one, 0 (everything left is called positive). None without positives.
    """
    pos = np.sort(np.asarray(scores, dtype=float)[np.asarray(positive, dtype=bool)])
    if len(pos) == 0:
        return None
    j = math.floor(round((len(pos) + 1) * (1.0 - target), 9))
    t = pos[max(j, 1) - 1]
    return float(t) if np.isfinite(t) else 0.0


def is_lesion(op: OperatingPoint, probs: np.ndarray, classes: list[str] | tuple[str, ...],
              unet_max: np.ndarray | None) -> np.ndarray:
    """The presence decision for each image."""
    if op.presence == "argmax" or op.presence_threshold is None:
        names = np.array(classes)[probs.argmax(axis=1)]
        return names != "normal"
    return presence_score(op.presence, probs, classes, unet_max) >= op.presence_threshold


def decide(op: OperatingPoint, probs: np.ndarray, classes: list[str] | tuple[str, ...],
           unet_max: np.ndarray | None = None) -> list[str]:
    """Each image's call at the operating point: normal, benign or malignant."""
    lesion = is_lesion(op, probs, classes, unet_max)
    bad = malignancy(probs, classes) >= op.malignant_threshold
    return ["normal" if not le else ("malignant" if b else "benign")
            for le, b in zip(lesion, bad, strict=True)]


def choose(probs: np.ndarray, y_true: list[str], classes: list[str] | tuple[str, ...],
           unet_max: np.ndarray | None, *, malignant_sensitivity: float,
           presence: str = "argmax", max_missed_lesions: float = 0.03) -> OperatingPoint:
    """Both thresholds from validation images (probabilities, true class names)."""
    t = np.asarray(y_true)
    lesion_true = t != "normal"
    presence_t = None
    if presence != "argmax" and lesion_true.any():
        score = presence_score(presence, probs, classes, unet_max)
        presence_t = threshold_for_sensitivity(score, lesion_true, 1.0 - max_missed_lesions)
    partial = OperatingPoint(malignant_sensitivity, 0.0, presence, max_missed_lesions,
                             presence_t)
    # On the cancers the presence decision keeps: one it calls normal no malignant threshold
    # can recover, and counting it would drag the threshold to 0 (every lesion malignant:
    # fold 1 of the CV, where 1 of 18 validation cancers was called normal, specificity 0.14).
    # The presence decision's misses are reported on their own (lesion scans called normal).
    kept = is_lesion(partial, probs, classes, unet_max)
    mal_t = threshold_for_sensitivity(malignancy(probs, classes), (t == "malignant") & kept,
                                      malignant_sensitivity)
    return OperatingPoint(malignant_sensitivity, 0.5 if mal_t is None else mal_t, presence,
                          max_missed_lesions, presence_t, int(((t == "malignant") & kept).sum()),
                          int(lesion_true.sum()), RULE)


def presence_figures(y_true: list[str], lesion_called: np.ndarray) -> dict:
    """Normal scans called lesion-free, and lesion scans missed, at a presence decision."""
    t = np.asarray(y_true)
    normal, lesion = t == "normal", t != "normal"
    called = np.asarray(lesion_called, dtype=bool)
    return {"normal_scans": int(normal.sum()),
            "normal_called_empty": int((~called[normal]).sum()),
            "normal_empty_fraction": float((~called[normal]).mean()) if normal.any() else None,
            "lesion_scans": int(lesion.sum()),
            "lesion_missed": int((~called[lesion]).sum()),
            "lesion_missed_fraction": float((~called[lesion]).mean()) if lesion.any() else None}


def mean_operating_point(ops: list[OperatingPoint]) -> OperatingPoint:
    """One point for an ensemble of fold models (their probabilities averaged): each threshold
    the mean of the members' own, each chosen on that member's validation images."""
    pres = [o.presence_threshold for o in ops]
    return OperatingPoint(
        ops[0].malignant_sensitivity, float(np.mean([o.malignant_threshold for o in ops])),
        ops[0].presence, ops[0].max_missed_lesions,
        None if any(x is None for x in pres) else float(np.mean(pres)),
        sum(o.n_val_malignant for o in ops), sum(o.n_val_lesion for o in ops),
        f"mean of {len(ops)} fold models' points ({ops[0].rule})")
