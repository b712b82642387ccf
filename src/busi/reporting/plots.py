"""Figures and text a person reads: loss curves, overlay panels, ROC curves, and the
segmentation summary as text and Markdown."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from busi.evaluation.segmentation import dice, fmt_stat  # noqa: E402
from busi.runs import atomic_write, read_predictions, save_figure  # noqa: E402


def read_history(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def plot_history(history_csv: Path, out: Path, title: str) -> Path | None:
    """Training and validation loss per epoch, like the paper's Figs. 7 and 10-12."""
    if not Path(history_csv).is_file():
        return None
    h = read_history(history_csv)
    if not h.get("loss"):
        return None
    epochs = [int(e) + 1 for e in h["epoch"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, h["loss"], label="training loss")
    if "val_loss" in h:
        ax.plot(epochs, h["val_loss"], label="validation loss")
        best = int(np.argmin(h["val_loss"]))
        ax.axvline(epochs[best], color="gray", ls=":", lw=1,
                   label=f"best val_loss (epoch {epochs[best]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, out)


def caption(width: int, text: str, height: int = 22) -> np.ndarray:
    """A white strip with black text, the width of one panel: every panel busi saves (overlays,
    Grad-CAM) says under the image what it shows."""
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    return strip


def _panel(image: np.ndarray, truth: np.ndarray, prob: np.ndarray, threshold: float,
           min_side: int = 256) -> np.ndarray:
    """image | ground truth (green) | prediction (red), captioned, as the paper's Figs. 4-6.

    Panels are enlarged (nearest, so pixels stay visible) to at least
    ``min_side``; the prediction's caption carries its Dice, or for a
    lesion-free image whether the prediction is empty.
    """
    scale = max(1, -(-min_side // max(image.shape)))

    def up(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a, (a.shape[1] * scale, a.shape[0] * scale),
                          interpolation=cv2.INTER_NEAREST)

    pred = prob > threshold
    if truth.any():
        verdict = f"prediction, Dice {dice(truth > 0, pred):.2f}"
    else:
        verdict = "prediction: empty (correct)" if not pred.any() else \
            f"prediction: {int(pred.sum())} px (no lesion)"
    gray = cv2.cvtColor(up(image), cv2.COLOR_GRAY2BGR)
    panels = [gray.copy()]
    for mask, colour in ((truth > 0, (0, 200, 0)), (pred, (0, 0, 255))):
        view = gray.copy()
        m = up(mask.astype(np.uint8))
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        overlay = view.copy()
        overlay[m > 0] = colour
        view = cv2.addWeighted(overlay, 0.3, view, 0.7, 0)
        cv2.drawContours(view, contours, -1, colour, 1)
        panels.append(view)
    w = gray.shape[1]
    panels = [np.vstack([caption(w, text), p])
              for text, p in zip(("image", "ground truth", verdict), panels, strict=True)]
    sep = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([panels[0], sep, panels[1], sep, panels[2]])


def overlay_sample(files: list[str], labels: np.ndarray, per_class: int = 3) -> list[int]:
    """A fixed sample: the first ``per_class`` test images of each class, by name."""
    chosen: list[int] = []
    for k in np.unique(labels):
        members = sorted(np.flatnonzero(labels == k), key=lambda i: files[i])
        chosen += members[:per_class]
    return chosen


def save_overlays(out_dir: Path, ds, test_idx: np.ndarray, probs: np.ndarray,
                  threshold: float, per_class: int = 3) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [ds.files[i] for i in test_idx]
    paths = []
    for j in overlay_sample(files, ds.labels[test_idx], per_class):
        i = test_idx[j]
        name = ds.files[i].replace("/", "__").replace(" ", "_")
        path = out_dir / name
        ok, buf = cv2.imencode(".png", _panel(ds.images[i], ds.masks[i], probs[i], threshold))
        if ok:
            atomic_write(path, buf.tobytes())
            paths.append(path)
    return paths


def _mask_rule(s: dict) -> str:
    """'threshold 0.35, largest component, flip TTA': how the scored masks were made."""
    parts = [f"threshold {s['threshold']:.2f}"]
    if s.get("postprocess", "none") != "none":
        parts.append(s["postprocess"].replace("_", " "))
    if s.get("flip_tta"):
        parts.append("flip TTA")
    if s.get("unets", 1) > 1:
        parts.append(f"average of {s['unets']} U-Nets (fold ensemble)")
    return ", ".join(parts)


def _hd95_cells(e: dict) -> str:
    """'HD95 with misses | HD95 of detected | missed' cells (n/a in summaries older than that)."""
    missed = e.get("hd95_undefined", "n/a")
    every = fmt_stat(e["hd95_all"]) if "hd95_all" in e else "n/a"
    return f"{every} | {fmt_stat(e['hd95'])} | {missed}"


def _hd95_note(le: dict) -> str:
    miss = le.get("hd95_miss_px")
    return ("HD95 in pixels of the model's input grid. A missed lesion (empty prediction) has no "
            "HD95: \"HD95, detected\" leaves the missed ones out (so missing a hard lesion would "
            "lower it); \"HD95, misses counted\" scores each miss at the image diagonal"
            + (f" ({miss:.1f} px)" if miss is not None else "")
            + ", so a miss never improves it.")


def segmentation_markdown(s: dict) -> str:
    le = s["lesion_images"]
    if "data" in s:  # busi evaluate --data: another site's images, no training epochs
        head = [f"# Segmentation on {s['data']}", "",
                f"Masks: {_mask_rule(s)}; {s['n_test']} scored images (with a mask file, or "
                f"labelled normal). {_hd95_note(le)}", ""]
    else:
        head = ["# Segmentation on the test split", "",
                f"Masks: {_mask_rule(s)}; best epoch {s['best_epoch']} of "
                f"{s['epochs_done']}; {s['n_test']} test images. {_hd95_note(le)}", ""]
    lines = [*head,
             "| images | n | Dice | IoU | HD95, misses counted (px) | HD95, detected (px) | "
             "missed |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| all lesion images | {le['dice']['n']} | {fmt_stat(le['dice'])} | "
                 f"{fmt_stat(le['iou'])} | {_hd95_cells(le)} |")
    for name, e in s["per_class"].items():
        if "dice" in e:
            lines.append(f"| {name} | {e['n']} | {fmt_stat(e['dice'])} | {fmt_stat(e['iou'])} | "
                         f"{_hd95_cells(e)} |")
    lines += ["", f"Lesions missed (empty prediction): {le['hd95_undefined']} of "
                  f"{le['dice']['n']}."]
    lf = s["lesion_free_images"]
    if lf["n"]:
        lines.append(f"Lesion-free (normal) images predicted empty: {_empty_count(lf)}.")
    if "intervals" in s:
        lines += ["", *_interval_table(s)]
    return "\n".join(lines) + "\n"


def _ci(ci: list[float] | None, digits: int = 3) -> str:
    return "n/a" if ci is None else f"{ci[0]:.{digits}f}-{ci[1]:.{digits}f}"


def _interval_rows(s: dict) -> list[tuple[str, str, str, str]]:
    """(figure, images and units, value, 95% CI) for each figure that has data."""
    iv, le, lf = s["intervals"], s["lesion_images"], s["lesion_free_images"]
    unit, ci = iv["unit_name"], iv["ci95"]
    rows = []
    if iv["n_lesion_images"]:
        over = f"{iv['n_lesion_images']} lesion images, {iv['n_units_lesion']} {unit}"
        for key, name, digits in (("dice", "Lesion Dice", 3), ("iou", "Lesion IoU", 3),
                                  ("hd95_all", "HD95, misses counted (px)", 1),
                                  ("hd95", "HD95, detected (px)", 1)):
            mean = le[key]["mean"]
            rows.append((name, over, "n/a" if not np.isfinite(mean) else f"{mean:.{digits}f}",
                         _ci(ci[key], digits)))
    if lf["n"]:
        rows.append(("Normal scans predicted empty",
                     f"{lf['n']} lesion-free images, {iv['n_units_lesion_free']} {unit}",
                     f"{lf['fraction_predicted_empty']:.3f}",
                     _ci(ci["fraction_predicted_empty"])))
    return rows


def _interval_table(s: dict) -> list[str]:
    """The figures a second site is quoted by, with intervals over patients (Markdown)."""
    iv = s["intervals"]
    lines = [f"95% intervals resample the {iv['n_units']} {iv['unit_name']}, not images: "
             f"{iv['ci95_method']}.", "",
             f"| figure | over | value | 95% CI ({iv['unit_name']} resampled) |",
             "|---|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _interval_rows(s)]
    return lines


def _empty_count(lf: dict) -> str:
    """'9 of 14 (0.643)': a count reads better than a bare fraction of a small number."""
    frac = lf["fraction_predicted_empty"]
    return f"{round(frac * lf['n'])} of {lf['n']} ({frac:.3f})"


def segmentation_text(s: dict) -> str:
    le = s["lesion_images"]
    every = f"{fmt_stat(le['hd95_all'])} px (misses at the diagonal), " if "hd95_all" in le else ""
    where = "" if "data" in s else "test "  # busi evaluate --data: not a test split
    out = [f"{where}Dice {fmt_stat(le['dice'])}, IoU {fmt_stat(le['iou'])}, HD95 {every}"
           f"{fmt_stat(le['hd95'])} px on detected lesions, {le['hd95_undefined']} missed, "
           f"on {le['dice']['n']} lesion images ({_mask_rule(s)})"]
    for name, e in s["per_class"].items():
        if "dice" in e:
            out.append(f"  {name:10} Dice {fmt_stat(e['dice'])}  IoU {fmt_stat(e['iou'])}")
    lf = s["lesion_free_images"]
    if lf["n"]:
        out.append(f"  normal     predicted empty: {_empty_count(lf)}")
    if "intervals" in s:
        iv = s["intervals"]
        out.append(f"95% intervals, the {iv['n_units']} {iv['unit_name']} resampled:")
        out += [f"  {a:30} {c:>7}  ({d})  over {b}" for a, b, c, d in _interval_rows(s)]
    return "\n".join(out)


def plot_roc(predictions_csv: Path, out: Path, title: str) -> Path | None:
    """One-vs-rest ROC curve per class from a run's ``predictions.csv``."""
    from sklearn.metrics import RocCurveDisplay

    _, y_true, _, probs, classes = read_predictions(Path(predictions_csv))
    truth = np.array(y_true)
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    drawn = 0
    for k, c in enumerate(classes):
        positive = truth == c
        if 0 < positive.sum() < len(truth):
            RocCurveDisplay.from_predictions(positive, probs[:, k], name=c, ax=ax,
                                             plot_chance_level=drawn == 0)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    return save_figure(fig, out)


# --------------------------------------------------------------------------- external sites


def plot_benign_malignant_roc(y_true: list[str], probs: np.ndarray, classes: list[str],
                              out: Path, title: str, auc: dict | None = None) -> Path | None:
    """One site's benign-vs-malignant ROC curve (``busi evaluate --data``): the clinical
    question on another hospital's lesions, scored as ``benign_malignant_auc`` scores it
    (the malignant share of the two lesion probabilities), with its AUC and patient
    interval in the legend. None when the site lacks benign or malignant scans."""
    from sklearn.metrics import RocCurveDisplay

    if "benign" not in classes or "malignant" not in classes:
        return None
    t = np.asarray(y_true)
    sel = (t == "benign") | (t == "malignant")
    y = t[sel] == "malignant"
    if not 0 < y.sum() < len(y):
        return None
    pb = probs[sel, classes.index("benign")].astype(np.float64)
    pm = probs[sel, classes.index("malignant")].astype(np.float64)
    score = np.divide(pm, pb + pm, out=np.full_like(pm, 0.5), where=(pb + pm) > 0)
    label = f"{int(y.sum())} malignant vs {int((~y).sum())} benign"
    if auc and auc.get("ci95"):
        title += (f"\nAUC 95% CI {auc['ci95'][0]:.2f}-{auc['ci95'][1]:.2f} "
                  f"({auc['n_units']} {auc.get('unit_name', 'images')} resampled)")
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    RocCurveDisplay.from_predictions(y, score, name=label, ax=ax, plot_chance_level=True)
    ax.set_xlabel("1 - specificity (benign called malignant)")
    ax.set_ylabel("sensitivity (malignant found)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return save_figure(fig, out)


def save_failure_gallery(out: Path, images: np.ndarray, truths: np.ndarray,
                         predicted: np.ndarray | None, captions: list[str], title: str,
                         cols: int = 4) -> Path:
    """A grid of scans with the true lesion outlined in green and the U-Net's mask in red
    (when there is one), each captioned with what went wrong: a site's failures are seen,
    not only counted. Each tile keeps the image's aspect ratio."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.9 * rows), dpi=100,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255, aspect="equal")
        for mask, colour in ((truths[k], "lime"),
                             (None if predicted is None else predicted[k], "red")):
            if mask is not None and np.any(mask):
                ax.contour(np.asarray(mask) > 0, levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(captions[k], fontsize=6.5, wrap=True)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)
