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


HISTORY_METRICS = (("dice", "Dice"), ("iou", "IoU"), ("accuracy", "accuracy"))


def loss_scale(values: list[float]) -> str:
    """'log' when a few epochs dwarf the rest (a first validation loss of 65 against 0.5
    after it flattens every later epoch into the axis), else 'linear'."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) < 3 or v.min() <= 0:
        return "linear"
    return "log" if v.max() / np.median(v) > 10 else "linear"


def plot_history(history_csv: Path, out: Path, title: str,
                 baseline: tuple[float, str] | None = None) -> Path | None:
    """Training and validation loss per epoch, like the paper's Figs. 7 and 10-12, and beside
    it every other figure the history holds (Dice, IoU, accuracy): a validation Dice that
    stalls while the loss still falls is only visible there.

    ``baseline`` (value, label) draws the loss a trivial model scores, e.g. the MSE of an
    all-background mask: a validation loss that settles on it has learned nothing else,
    which a falling curve alone does not show.
    """
    if not Path(history_csv).is_file():
        return None
    h = read_history(history_csv)
    if not h.get("loss"):
        return None
    epochs = [int(e) + 1 for e in h["epoch"]]
    others = [(k, name) for k, name in HISTORY_METRICS if k in h or f"val_{k}" in h]
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 5 * bool(others), 4), dpi=120,
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(epochs, h["loss"], label="training loss")
    best = None
    if "val_loss" in h:
        ax.plot(epochs, h["val_loss"], label="validation loss")
        best = int(np.argmin(h["val_loss"]))
        ax.axvline(epochs[best], color="gray", ls=":", lw=1,
                   label=f"best val_loss (epoch {epochs[best]})")
    if baseline is not None:
        ax.axhline(baseline[0], color="black", ls="--", lw=1, label=baseline[1])
    ax.set_xlabel("epoch")
    scale = loss_scale([*h["loss"], *h.get("val_loss", [])])
    ax.set_yscale(scale)
    ax.set_ylabel("loss" + (" (log scale)" if scale == "log" else ""))
    ax.set_title(title)
    ax.legend()
    if others:
        ax = axes[0, 1]
        for k, name in others:
            for key, part, style in ((k, "training", "--"), (f"val_{k}", "validation", "-")):
                if key in h:
                    ax.plot(epochs, h[key], style, label=f"{part} {name}")
        if best is not None:
            ax.axvline(epochs[best], color="gray", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(" / ".join(name for _, name in others))
        ax.set_title("other figures per epoch")
        ax.legend(fontsize="small")
    return save_figure(fig, out)


def caption(width: int, text: str, height: int = 22) -> np.ndarray:
    """A white strip with black text, the width of one panel: every panel busi saves (overlays,
    Grad-CAM) says under the image what it shows."""
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    return strip


def to_aspect(a: np.ndarray, shape: tuple[int, int] | np.ndarray | None, height: int,
              nearest: bool = False) -> np.ndarray:
    """``a`` resized to ``height`` rows and the width that the original scan's aspect ratio
    gives (``shape``: its (height, width)); square for None. The model sees a square grid,
    but a scan squashed to a square misleads about a lesion's shape."""
    h, w = a.shape[:2] if shape is None else (int(shape[0]), int(shape[1]))
    width = max(1, round(height * w / max(h, 1)))
    return cv2.resize(a, (width, height),
                      interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def outline(view: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
            fill: float = 0.3) -> np.ndarray:
    """``view`` (BGR) with ``mask`` (any size: stretched to the view) tinted and outlined."""
    m = cv2.resize((np.asarray(mask) > 0).astype(np.uint8), (view.shape[1], view.shape[0]),
                   interpolation=cv2.INTER_NEAREST)
    tinted = view.copy()
    tinted[m > 0] = colour
    out = cv2.addWeighted(tinted, fill, view, 1 - fill, 0) if fill else view.copy()
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def _panel(image: np.ndarray, truth: np.ndarray, prob: np.ndarray, threshold: float,
           min_side: int = 256, shape: tuple[int, int] | None = None) -> np.ndarray:
    """image | ground truth (green) | prediction (red), captioned, as the paper's Figs. 4-6.

    Panels are enlarged to at least ``min_side`` rows, at the original scan's aspect
    ratio (``shape``, its (height, width)); the prediction's caption carries its Dice,
    or for a lesion-free image whether the prediction is empty.
    """
    pred = prob > threshold
    if truth.any():
        verdict = f"prediction, Dice {dice(truth > 0, pred):.2f}"
    else:
        verdict = "prediction: empty (correct)" if not pred.any() else \
            f"prediction: {int(pred.sum())} px (no lesion)"
    gray = cv2.cvtColor(to_aspect(image, shape, max(min_side, image.shape[0])),
                        cv2.COLOR_GRAY2BGR)
    panels = [gray, outline(gray, truth, (0, 200, 0)), outline(gray, pred, (0, 0, 255))]
    w = gray.shape[1]
    panels = [np.vstack([caption(w, text), p])
              for text, p in zip(("image", "ground truth", verdict), panels, strict=True)]
    sep = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    return np.hstack([panels[0], sep, panels[1], sep, panels[2]])


def worst_sample(labels: np.ndarray, truth: np.ndarray, pred: np.ndarray, n_worst: int = 6,
                 n_normal: int = 3) -> list[tuple[int, float | None]]:
    """The images a reader should see: the ``n_worst`` lesion images of lowest Dice (worst
    first), then the lesion-free images with the largest false masks (a clean one if none
    has any). (index, Dice or None) pairs, in that order."""
    has = truth.reshape(len(truth), -1).any(axis=1)
    scores = [dice(t > 0, p) if h else None
              for t, p, h in zip(truth, pred, has, strict=True)]
    lesion = sorted(np.flatnonzero(has), key=lambda i: (scores[i], i))[:n_worst]
    false_px = pred.reshape(len(pred), -1).sum(axis=1)
    free = sorted(np.flatnonzero(~has), key=lambda i: (-false_px[i], i))
    free = [i for i in free if false_px[i] > 0][:n_normal] or free[:1]
    return [(int(i), scores[i]) for i in [*lesion, *free]]


def save_overlays(out_dir: Path, ds, test_idx: np.ndarray, probs: np.ndarray,
                  threshold: float, n_worst: int = 6) -> list[Path]:
    """Overlay panels of the test images that went worst (:func:`worst_sample`), numbered
    worst first so that a sorted listing is the reading order; old panels are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    test_idx = np.asarray(test_idx)
    pred = probs[test_idx] > threshold
    paths = []
    for rank, (j, _) in enumerate(worst_sample(ds.labels[test_idx], ds.masks[test_idx], pred,
                                               n_worst), start=1):
        i = test_idx[j]
        name = f"{rank:02d}_" + ds.files[i].replace("/", "__").replace(" ", "_")
        path = out_dir / name
        ok, buf = cv2.imencode(".png", _panel(ds.images[i], ds.masks[i], probs[i], threshold,
                                              shape=tuple(ds.shapes[i])))
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
            rows.append((name, over, "n/a" if mean is None or not np.isfinite(mean)
                         else f"{mean:.{digits}f}",
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
    """ROC curves from a run's ``predictions.csv``: each class against the rest, and benign
    against malignant (the malignant share of the two, as the report's AUC), in the one class
    order of every table; axes named as a clinician reads them."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from busi.evaluation.classification import BM_SCORE, class_order

    _, y_true, _, probs, classes = read_predictions(Path(predictions_csv))
    truth = np.array(y_true)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    drawn = 0
    for c in class_order(classes):
        positive = truth == c
        if 0 < positive.sum() < len(truth):
            score = probs[:, classes.index(c)]
            fpr, tpr, _ = roc_curve(positive, score)
            ax.plot(fpr, tpr, label=f"{c} vs rest (AUC {roc_auc_score(positive, score):.3f})")
            drawn += 1
    sel = np.isin(truth, ["benign", "malignant"])
    both = 0 < (truth[sel] == "malignant").sum() < sel.sum()
    if {"benign", "malignant"} <= set(classes) and both:
        pb, pm = probs[sel, classes.index("benign")], probs[sel, classes.index("malignant")]
        score = np.divide(pm, pb + pm, out=np.full_like(pm, 0.5), where=(pb + pm) > 0)
        y = truth[sel] == "malignant"
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, "k--", lw=1.5,
                label=f"benign vs malignant (AUC {roc_auc_score(y, score):.3f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")
    fig.text(0.01, 0.005, f"benign vs malignant score: {BM_SCORE}", fontsize=6, color="#555")
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
                         cols: int = 4, shapes: np.ndarray | None = None) -> Path:
    """A grid of scans with the true lesion outlined in green and the U-Net's mask in red
    (when there is one), each captioned with what went wrong: a site's failures are seen,
    not only counted. Each tile is drawn at its scan's own aspect ratio (``shapes``: the
    original (height, width) of each; the model's square grid otherwise). A caption is
    ``"file: what went wrong"``, set on two lines so neighbours' captions never run
    together."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=110,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, ax in enumerate(axes.flat[:n]):
        h, w = images[k].shape[:2] if shapes is None else (int(shapes[k][0]), int(shapes[k][1]))
        extent = (0, w, h, 0)  # the grid stretched back to the scan's own proportions
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255, extent=extent, aspect="equal")
        for mask, colour in ((truths[k], "lime"),
                             (None if predicted is None else predicted[k], "red")):
            if mask is not None and np.any(mask):
                ax.contour(np.asarray(mask) > 0, levels=[0.5], colors=colour, linewidths=1,
                           extent=extent, origin="upper")
        name, _, what = captions[k].partition(": ")
        ax.set_title(f"{name}\n{what}" if what else name, fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)
