"""From U-Net probabilities to the binary masks that everything downstream uses (the U-Net's
post-processor; it sits in ``models`` because training and inference both need it).

One place decides how a lesion mask is made -- optional horizontal-flip test-time
augmentation, the threshold, optional largest-component clean-up -- so the
segmentation metrics, the classifier's masked inputs and ``busi predict`` can
never disagree about what "the predicted mask" of an image is.

A segmentation run stores the probabilities of every image in ``masks.npz``
together with these settings; :func:`load_masks` applies them on reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from busi.errors import BusiError
from busi.runs import SPLIT, check_kind


@dataclass(frozen=True)
class MaskRule:
    """How probabilities become a mask: threshold, then optional clean-up."""

    threshold: float = 0.5
    postprocess: str = "none"  # "none" | "largest_component"

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Binary uint8 masks (N, H, W) from probabilities (N, H, W)."""
        masks = (probs > self.threshold).astype(np.uint8)
        if self.postprocess == "largest_component":
            masks = np.stack([largest_component(m) for m in masks]) if len(masks) else masks
        return masks


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected region: BUSI images hold one lesion in ~98% of cases,
    and a U-Net's stray blobs (shadows, dark fat lobules) are its commonest error."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.astype(np.uint8)
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == keep).astype(np.uint8)


def as_stored(probs: np.ndarray) -> np.ndarray:
    """Probabilities rounded to the 1/255 steps that ``masks.npz`` keeps.

    Every consumer (test metrics, classifier inputs, ``predict``, external
    evaluation) thresholds these, so a pixel within 1/255 of the threshold can
    never fall on different sides in different places.
    """
    return np.round(probs * 255) / 255


def predict_probs(model, images: np.ndarray, *, flip_tta: bool = False,
                  batch_size: int = 32) -> np.ndarray:
    """Lesion probabilities (N, H, W) float32 for uint8 images (N, H, W).

    ``flip_tta`` averages the prediction of the image and of its mirror image
    (flipped back): a lesion looks the same mirrored, the U-Net's errors do not.
    ``model`` may be a list of U-Nets (a fold ensemble): their probabilities are
    averaged.
    """
    if isinstance(model, list | tuple):
        return np.mean([predict_probs(m, images, flip_tta=flip_tta, batch_size=batch_size)
                        for m in model], axis=0).astype(np.float32)
    if len(images) == 0:
        return np.zeros(images.shape, np.float32)
    x = images[..., None].astype("float32") / 255.0
    if flip_tta:  # one pass over image and mirror together
        both = _predict(model, np.concatenate([x, x[:, :, ::-1]]), batch_size)[..., 0]
        return ((both[:len(x)] + both[len(x):, :, ::-1]) / 2.0).astype(np.float32)
    return _predict(model, x, batch_size)[..., 0].astype(np.float32)


def _predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``predict_on_batch`` for one small batch (no data-adapter set-up: the latency of
    ``busi predict`` on one image), ``predict`` otherwise."""
    if len(x) <= batch_size:
        return np.asarray(model.predict_on_batch(x))
    return model.predict(x, batch_size=batch_size, verbose=0)


def save_masks(path: Path, files: list[str], probs: np.ndarray, source: np.ndarray,
               rule: MaskRule, flip_tta: bool, members: list[str] | None = None) -> None:
    """Write ``masks.npz`` atomically: probabilities (uint8, 1/255 steps), the rule, and
    the U-Net checkpoints (relative to the run) that new images are segmented with."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, files=np.array(files, dtype=str),
                        probs=np.round(probs * 255).astype(np.uint8),
                        source=np.array(source, dtype=str),
                        threshold=np.float32(rule.threshold),
                        postprocess=np.array(rule.postprocess), flip_tta=np.bool_(flip_tta),
                        members=np.array(members or ["best.keras"], dtype=str))
    os.replace(tmp, path)


def unet_members(seg_run: Path) -> list[Path]:
    """The checkpoints a segmentation run segments new images with: its ``best.keras``,
    plus its out-of-fold U-Nets when it was trained with ``fold_ensemble``."""
    z = _read_npz(seg_run, ("members",))
    names = z["members"].tolist() if "members" in z else ["best.keras"]
    paths = [seg_run / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BusiError("a U-Net checkpoint of this segmentation run is missing",
                        where=str(missing[0]), fix="use a complete run folder, or retrain it")
    return paths


def load_unets(seg_run: Path) -> list:
    """The run's U-Net(s), loaded: one model, or the members of its fold ensemble."""
    from busi.models.saving import load_model

    return [load_model(p, fix=f"restore the file, or pick another U-Net run than "
                              f"{seg_run}") for p in unet_members(seg_run)]


def read_rule(seg_run: Path) -> tuple[MaskRule, bool]:
    """The mask rule and TTA setting a segmentation run was evaluated with."""
    z = _read_npz(seg_run, ("threshold", "postprocess", "flip_tta"))
    post = str(z["postprocess"]) if "postprocess" in z else "none"
    tta = bool(z["flip_tta"]) if "flip_tta" in z else False
    return MaskRule(float(z["threshold"]), post), tta


def _read_npz(seg_run: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of a run's ``masks.npz`` that it holds, or a BusiError naming the file.

    Only ``threshold``, ``files`` and ``probs`` are required; the others came later.
    """
    import zipfile

    path = seg_run / "masks.npz"
    if not path.is_file():
        if (seg_run / SPLIT).is_file() or (seg_run / "cv.json").is_file():
            check_kind(seg_run, "seg", option="a U-Net run:")  # a classifier run, a CV run ...
        raise BusiError("segmentation run has no masks.npz (did it finish?)", where=str(seg_run),
                        fix=f"finish it with `busi train-seg --resume {seg_run}` or pick another "
                            "run with --seg-run")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k in ("threshold", "files", "probs")
                       and k not in z.files]
            if missing:
                raise BusiError(f"masks.npz lacks {', '.join(missing)}", where=str(path),
                                fix="retrain the segmentation run, or pick another with --seg-run")
            return {k: z[k] for k in keys if k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BusiError(f"masks.npz is unreadable ({type(exc).__name__}: {exc})",
                        where=str(path),
                        fix="retrain the segmentation run, or pick another with --seg-run",
                        ) from None


def load_masks(seg_run: Path) -> dict[str, np.ndarray]:
    """Binary predicted mask of every image of a segmentation run, by file id."""
    rule, _ = read_rule(seg_run)
    z = _read_npz(seg_run, ("files", "probs"))
    masks = rule.apply(z["probs"].astype(np.float32) / 255.0)
    return dict(zip(z["files"].tolist(), masks, strict=True))


def unet_max(seg_run: Path) -> dict[str, float]:
    """The highest stored lesion probability of every image of a segmentation run, by file
    id: the U-Net's own lesion-presence score (models/decision.py)."""
    z = _read_npz(seg_run, ("files", "probs"))
    peak = z["probs"].reshape(len(z["probs"]), -1).max(axis=1).astype(np.float32) / 255.0
    return dict(zip(z["files"].tolist(), peak.tolist(), strict=True))
