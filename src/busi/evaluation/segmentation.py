"""Segmentation metrics per image on the test split (Dice, IoU, HD95), their summary, and the
threshold tuned on validation images.

Conventions (stated because papers differ): a prediction is binarised at the
threshold; for lesion images Dice/IoU are 0 when the prediction is empty; HD95
is the 95th percentile of the symmetric surface distances, in pixels of the
model's input grid, and undefined (NaN, counted separately) when either mask is
empty. Normal images have no lesion, so for them the one honest number is the
fraction predicted empty.

A missed lesion (empty prediction) has no HD95; a mean over the detected lesions
alone would *improve* when a model misses its hardest lesions. So the summary
gives, next to that mean and the count of misses, ``hd95_all``: every lesion
image, a miss scored at the image diagonal sqrt(H^2 + W^2) px -- more than any
distance inside the grid, so missing a lesion never lowers it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from busi.models.masks import MaskRule

# Resamples of every 95% bootstrap interval, segmentation's and classification's alike.
N_BOOTSTRAP = 2000


def dice(t: np.ndarray, p: np.ndarray) -> float:
    total = t.sum() + p.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(t, p).sum() / total)


def iou(t: np.ndarray, p: np.ndarray) -> float:
    union = np.logical_or(t, p).sum()
    return 1.0 if union == 0 else float(np.logical_and(t, p).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(t: np.ndarray, p: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels); NaN if a mask is empty."""
    t, p = t.astype(bool), p.astype(bool)
    if not t.any() or not p.any():
        return float("nan")
    st, sp = _surface(t), _surface(p)
    to_t = ndimage.distance_transform_edt(~st)
    to_p = ndimage.distance_transform_edt(~sp)
    distances = np.concatenate([to_p[st], to_t[sp]])
    return float(np.percentile(distances, 95))


def miss_distance(shape: tuple[int, ...]) -> float:
    """The HD95 a missed lesion is scored at: the diagonal of the (H, W) grid, in pixels."""
    return float(np.hypot(shape[-2], shape[-1]))


def per_image(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Dice, IoU, HD95 and "predicted empty" for each image of (N, H, W) arrays.

    ``hd95_all`` is HD95 with a missed lesion scored at :func:`miss_distance`
    (NaN only for images without a lesion); ``miss_px`` is that distance.
    """
    pred = prob > threshold
    truth = truth > 0
    out = {"dice": [], "iou": [], "hd95": [], "hd95_all": [], "pred_empty": [], "true_empty": [],
           "miss_px": miss_distance(truth.shape)}
    for t, p in zip(truth, pred, strict=True):
        out["dice"].append(dice(t, p))
        out["iou"].append(iou(t, p))
        out["hd95"].append(hd95(t, p))
        out["hd95_all"].append(out["miss_px"] if t.any() and not p.any() else out["hd95"][-1])
        out["pred_empty"].append(not p.any())
        out["true_empty"].append(not t.any())
    return {k: np.array(v) for k, v in out.items()}


def _stats(values: np.ndarray) -> dict[str, float | int]:
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std()) if finite.size else float("nan"),
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "n": int(finite.size)}


def summarise(scores: dict[str, np.ndarray], labels: np.ndarray,
              classes: tuple[str, ...] | list[str]) -> dict:
    """Mean ± std per class and over all lesion images; empty-rate for lesion-free images."""
    lesion = ~scores["true_empty"]
    metrics = ("dice", "iou", "hd95", "hd95_all")
    result: dict = {"lesion_images": {m: _stats(scores[m][lesion]) for m in metrics}}
    # hd95: detected lesions only; hd95_undefined: the misses it leaves out; hd95_all: both.
    result["lesion_images"]["hd95_undefined"] = int(np.isnan(scores["hd95"][lesion]).sum())
    result["lesion_images"]["hd95_miss_px"] = round(float(scores["miss_px"]), 2)
    result["per_class"] = {}
    for k, name in enumerate(classes):
        sel = labels == k
        if not sel.any():
            continue
        entry: dict = {"n": int(sel.sum())}
        if (sel & lesion).any():
            entry.update({m: _stats(scores[m][sel & lesion]) for m in metrics})
            entry["hd95_undefined"] = int(np.isnan(scores["hd95"][sel & lesion]).sum())
        if (sel & ~lesion).any():
            entry["fraction_predicted_empty"] = float(scores["pred_empty"][sel & ~lesion].mean())
        result["per_class"][name] = entry
    empty = ~lesion
    result["lesion_free_images"] = {
        "n": int(empty.sum()),
        "fraction_predicted_empty": float(scores["pred_empty"][empty].mean()) if empty.any()
        else float("nan")}
    return result


def group_mean_ci(values: np.ndarray, groups: np.ndarray, seed: int = 0,
                  n: int = N_BOOTSTRAP) -> list[float] | None:
    """95% percentile interval of the mean over images, resampling ``groups`` (patients).

    A resample draws the groups with replacement and pools their images, so a patient
    scanned twenty times is one draw, not twenty: the interval is as wide as the
    number of patients warrants. Non-finite values (HD95 of a missed lesion) are left
    out of a resample's mean, as :func:`summarise` leaves them out; a resample with
    none left has no mean and is skipped. None when no value is finite.
    """
    values, groups = np.asarray(values, np.float64), np.asarray(groups)
    finite = np.isfinite(values)
    if not finite.any():
        return None
    units, unit = np.unique(groups, return_inverse=True)
    unit = unit.ravel()
    sums = np.bincount(unit, weights=np.where(finite, values, 0.0), minlength=len(units))
    counts = np.bincount(unit, weights=finite.astype(np.float64), minlength=len(units))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(units), np.full(len(units), 1 / len(units)),
                            size=n)
    total = draws @ counts
    means = (draws @ sums)[total > 0] / total[total > 0]
    return np.percentile(means, [2.5, 97.5]).round(4).tolist()


def patient_intervals(scores: dict[str, np.ndarray], groups: np.ndarray,
                      unit_name: str = "patients", seed: int = 0) -> dict:
    """Intervals of the summary's means, resampling ``groups``: lesion Dice, IoU and HD95
    over the lesion images, and the fraction of lesion-free images predicted empty.

    Each figure resamples the groups that have images of its kind (the patients with
    lesion images for Dice; those with normal scans for the empty fraction), and the
    result says how many there were, so a table can state what varied.
    """
    groups = np.asarray(groups)
    lesion = ~scores["true_empty"]
    ci: dict = {m: group_mean_ci(scores[m][lesion], groups[lesion], seed)
                for m in ("dice", "iou", "hd95", "hd95_all")}
    ci["fraction_predicted_empty"] = group_mean_ci(
        scores["pred_empty"][~lesion].astype(np.float64), groups[~lesion], seed)
    return {"ci95": ci, "unit_name": unit_name, "n_units": len(np.unique(groups)),
            "n_units_lesion": len(np.unique(groups[lesion])),
            "n_units_lesion_free": len(np.unique(groups[~lesion])),
            "n_lesion_images": int(lesion.sum()), "n_lesion_free_images": int((~lesion).sum()),
            "ci95_method": f"percentile bootstrap, {N_BOOTSTRAP} resamples: the {unit_name} "
                           "drawn with replacement and their images pooled; a figure over "
                           f"lesion images draws from the {unit_name} with lesion images, the "
                           f"empty fraction from the {unit_name} with lesion-free images"}


def tune_threshold(truth: np.ndarray, prob: np.ndarray, candidates: np.ndarray | None = None,
                   postprocess: str = "none") -> float:
    """Threshold that maximises pooled Dice on (validation) images, clean-up included."""
    candidates = np.linspace(0.1, 0.9, 17) if candidates is None else candidates
    t = truth > 0
    best = max(candidates, key=lambda c: dice(t, MaskRule(float(c), postprocess).apply(prob)))
    return float(best)


def fmt_stat(stat: dict) -> str:
    """'0.812 ± 0.104': a summary statistic as every table prints it, so they all read alike."""
    mean = stat.get("mean")
    # None (strict JSON's null) or NaN (in memory): no image had the figure, e.g. HD95 over
    # detected lesions when the U-Net detected none
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {stat['std']:.3f}"


def unets_side_by_side(names: list[str], metrics: list[dict], scores: list[dict[str, dict]],
                       lesion: dict[str, bool], groups: dict[str, object] | None = None,
                       unit_name: str = "duplicate groups", images: str = "test images"
                       ) -> list[str]:
    """U-Net runs side by side on their test splits (Markdown lines): lesion Dice and IoU with
    95% intervals, HD95 both ways, missed lesions, normal scans predicted empty, training
    time; then the paired difference in lesion Dice of the first run against each other
    one, over the lesion images both scored.

    ``metrics`` are the runs' metrics.json, ``scores`` their test_scores.json (per file:
    dice, iou, hd95); ``lesion`` says which files have a lesion. ``groups`` maps a file to
    its duplicate group so an interval resamples groups, not images (None: images; a file
    it lacks is a unit of its own); ``unit_name`` names those groups (at another site:
    "patients"), ``images`` the images column ("test images" on the runs' own split).
    Paired, because two models on the same images differ far less in their difference than
    two separate intervals suggest: the hard images are hard for both. Runs tested on
    partly different images (another seed, another fold) are paired on the images they
    share, and the lines say how many those are; runs that share none get no paired
    figure, and a line says so.
    """

    def values(s: dict[str, dict], key: str, files: list[str]) -> np.ndarray:
        return np.array([np.nan if s[f].get(key) is None else s[f][key] for f in files])

    def unit_of(files: list[str]) -> np.ndarray:
        # One kind of key for every file (a group id is an int, a file name a str): the
        # resampling sorts the keys, and a mix of both cannot be sorted.
        return np.array([f"group {groups[f]}" if groups and f in groups else f"image {f}"
                         for f in files], dtype=object)

    def with_ci(mean: float | None, ci: list[float] | None) -> str:
        if mean is None or not np.isfinite(mean):
            return "n/a"
        return f"{mean:.3f}" + ("" if ci is None else f" ({ci[0]:.3f}-{ci[1]:.3f})")

    lines = [f"| U-Net run | {images} | lesion Dice (95% CI) | IoU (95% CI) | HD95, misses "
             "counted (px) | HD95, detected (px) | missed lesions | normal scans predicted "
             "empty | training time |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m, s in zip(names, metrics, scores, strict=True):
        found = [f for f in s if lesion.get(f)]
        units = unit_of(found)
        le = m["lesion_images"]
        cells = [with_ci(le["dice"]["mean"], group_mean_ci(values(s, "dice", found), units)),
                 with_ci(le["iou"]["mean"], group_mean_ci(values(s, "iou", found), units)),
                 _fmt_px(le.get("hd95_all", {}).get("mean")), _fmt_px(le["hd95"].get("mean")),
                 f"{le['hd95_undefined']} of {le['dice']['n']}"]
        empty = m["lesion_free_images"].get("fraction_predicted_empty")
        n_free = m["lesion_free_images"]["n"]
        cells.append("n/a" if empty is None else f"{round(empty * n_free)} of {n_free}")
        seconds = m.get("train_seconds")
        cells.append("n/a" if seconds is None else f"{seconds / 60:.0f} min")
        lines.append(f"| {name} | {m.get('n_test', len(s))} | " + " | ".join(cells) + " |")
    first = names[0]
    for name, s in zip(names[1:], scores[1:], strict=True):
        both = [f for f in scores[0] if f in s]
        shared = [f for f in both if lesion.get(f)]
        partly = len(both) != len(scores[0]) or len(both) != len(s)
        a, b = first.split(" (")[0], name.split(" (")[0]  # the run folders' names
        said = (f"{a} and {b} were tested on partly different images: they share "
                f"{len(both)} test images ({a} has {len(scores[0])}, {b} {len(s)}); "
                "their rows above are not a paired comparison. " if partly else "")
        if not shared:
            lines += ["", said + f"No lesion image was tested by both {a} and {b}: "
                                 "no paired difference."]
            continue
        diff = values(scores[0], "dice", shared) - values(s, "dice", shared)
        ci = group_mean_ci(diff, unit_of(shared))
        on = (f"the {len(shared)} lesion images both were tested on" if partly
              else f"the same {len(shared)} lesion images")
        lines += ["", said + f"Paired, on {on}: lesion Dice of {first} "
                             f"minus {name} = {float(np.mean(diff)):+.3f}"
                  + ("" if ci is None else f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f})")
                  + f"; 95% intervals resample {unit_name if groups else 'images'}."]
    return lines


def _fmt_px(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f}"
