"""A lesion-presence head on the U-Net's encoder (the U-Net's second post-processor, beside
``masks``): is there a lesion in this scan at all?

The U-Net's highest lesion probability is a weak answer: trained on scans that almost all
hold a lesion, it draws a blob on most normal scans (normal-vs-lesion AUC 0.82 on BUSI's
pooled CV test folds). Its deepest encoder features know more: a logistic regression on
their global mean and maximum, fitted on the U-Net's own training images after the U-Net
has trained (the U-Net is not changed), reached 0.93, and 0.94-0.95 averaged with a
classifier's 1 - p(normal) (``scripts/presence_probe.py``, folds 0-2 of the issue-26 CV).

The head is a handful of numbers (scaler, weights, bias) kept in ``presence_head.npz`` of
the U-Net run, so ``predict`` and ``evaluate --data`` score new scans with the same U-Net
pass that segments them. scikit-learn fits it; applying it is NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from busi.errors import BusiError

HEAD_FILE = "presence_head.npz"
# The regularisation strengths LogisticRegressionCV tries (5-fold CV on the training images).
CS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def bottleneck_model(unet):
    """The U-Net cut at its deepest encoder output: the input of its first ``dec<k>_up``
    layer, the name every busi U-Net (plain, MobileNet or EfficientNet-Lite0 encoder) gives
    its decoder's first up-sampling."""
    import keras

    first_up = next((layer for layer in unet.layers
                     if layer.name.startswith("dec") and layer.name.endswith("_up")), None)
    if first_up is None:
        raise BusiError("this U-Net has no decoder layer named dec<k>_up",
                        where=getattr(unet, "name", "U-Net"),
                        fix="use a U-Net built by busi")
    return keras.Model(unet.inputs, first_up.input)


def pooled_features(unet, images: np.ndarray, batch_size: int = 32,
                    encoder=None) -> np.ndarray:
    """Global mean and maximum of the deepest encoder features (N, 2C), for uint8 images
    (N, H, W) scaled as the U-Net's training scaled them. ``encoder``: the U-Net's
    :func:`bottleneck_model`, built once by a caller that scores image after image."""
    if len(images) == 0:
        return np.zeros((0, 0), np.float32)
    x = images[..., None].astype("float32") / 255.0
    encoder = encoder or bottleneck_model(unet)
    b = np.asarray(encoder.predict_on_batch(x) if len(x) <= batch_size
                   else encoder.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
    return np.concatenate([b.mean(axis=(1, 2)), b.max(axis=(1, 2))], axis=1)


@dataclass(frozen=True)
class PresenceHead:
    """Standardise, then a logistic regression: p(lesion) = sigmoid(((x - mean) / scale) w + b)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    c: float  # the regularisation strength the CV chose

    @classmethod
    def fit(cls, features: np.ndarray, is_lesion: np.ndarray, seed: int = 0) -> PresenceHead:
        """Fit on the U-Net's training images: C by 5-fold CV (ROC AUC) among :data:`CS`."""
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.preprocessing import StandardScaler

        y = np.asarray(is_lesion, dtype=bool)
        if y.all() or not y.any():
            raise BusiError("the presence head needs lesion and normal training images, and "
                            f"these {len(y)} are all {'lesion' if y.all() else 'normal'} scans",
                            where="data", fix="train on data with normal scans")
        scaler = StandardScaler().fit(features)
        folds = int(min(5, y.sum(), (~y).sum()))
        # scikit-learn 1.8+ warns (twice, on every train-seg) unless the L2 penalty and the
        # new fitted attributes are asked for by name; older releases know neither keyword.
        modern = ({"l1_ratios": (0.0,), "use_legacy_attributes": False}
                  if "use_legacy_attributes" in LogisticRegressionCV().get_params() else {})
        lr = LogisticRegressionCV(Cs=list(CS), cv=max(2, folds), scoring="roc_auc",
                                  max_iter=5000, random_state=seed, **modern)
        lr.fit(scaler.transform(features), y)
        return cls(scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64),
                   lr.coef_[0].astype(np.float64), float(lr.intercept_[0]),
                   float(np.ravel(lr.C_)[0]))

    def score(self, features: np.ndarray) -> np.ndarray:
        """p(lesion) per image."""
        if features.shape[1:] != self.mean.shape:
            raise BusiError(f"the presence head expects {self.mean.shape[0]} features, got "
                            f"{features.shape[1] if features.ndim == 2 else features.shape}",
                            where=HEAD_FILE, fix="use the head of the U-Net run that made them")
        z = ((features - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: Path, files: list[str] | None = None,
             scores: np.ndarray | None = None) -> Path:
        """Atomically (a reader never sees half a head), with the scores of the run's own
        images by file id when given, as ``masks.npz`` keeps their masks."""
        import os

        path = Path(path)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        extra = {} if files is None else {"files": np.array(files, dtype=str),
                                          "scores": np.asarray(scores, dtype=np.float32)}
        np.savez(tmp, mean=self.mean, scale=self.scale, weights=self.weights,
                 bias=np.float64(self.bias), c=np.float64(self.c), **extra)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> PresenceHead:
        try:
            with np.load(path) as z:
                return cls(z["mean"], z["scale"], z["weights"], float(z["bias"]), float(z["c"]))
        except (OSError, KeyError, ValueError) as exc:
            raise BusiError(f"cannot read the presence head: {exc}", where=str(path),
                            fix="delete it so that it is fitted again") from None


def fit_for_run(unet, images: np.ndarray, is_lesion: np.ndarray, train_idx: np.ndarray,
                seed: int = 0) -> tuple[PresenceHead, np.ndarray]:
    """A U-Net run's head, fitted on its training images only, and every image's score."""
    features = pooled_features(unet, images)
    head = PresenceHead.fit(features[train_idx], np.asarray(is_lesion)[train_idx], seed)
    return head, head.score(features)


def head_scores(seg_run: Path) -> dict[str, float] | None:
    """The presence head's score of every image of a U-Net run, by file id; None for a run
    without a head (made before busi fitted one, or trained without normal scans)."""
    path = Path(seg_run) / HEAD_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return dict(zip(z["files"].tolist(), z["scores"].astype(float).tolist(),
                            strict=True))
    except (OSError, KeyError, ValueError) as exc:
        raise BusiError(f"cannot read the presence head: {exc}", where=str(path),
                        fix="delete it so that it is fitted again") from None


def run_head(seg_run: Path) -> PresenceHead | None:
    """A U-Net run's presence head, or None for a run without one."""
    path = Path(seg_run) / HEAD_FILE
    return PresenceHead.load(path) if path.is_file() else None
