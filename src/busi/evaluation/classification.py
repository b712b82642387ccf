"""Classifier evaluation: the paper's per-class tables, bootstrap intervals, and the figures
it left out, computed from a run's ``predictions.csv``.

Everything is computed by scikit-learn from a run's saved ``predictions.csv``
(file, true class, predicted class, one probability per class), so the numbers
in the files can always be recomputed from the predictions -- a test checks it.
On a 78-image test set accuracy moves 1.3 points per image, so each run also
gets 95% bootstrap intervals for accuracy and macro-F1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from busi.errors import BusiError
from busi.evaluation.segmentation import N_BOOTSTRAP, dice
from busi.runs import (
    CONFIG,
    PREDICTIONS,
    atomic_write,
    read_predictions,
    read_split,
    save_figure,
    write_json,
)

# The paper's Tables 1-3 whole: (precision, recall, F1, support) of each row, as printed.
PAPER_TABLES = {
    "cnn": ("Table 1", {
        "benign": (0.87, 0.79, 0.82, 42), "malignant": (0.83, 0.75, 0.79, 20),
        "normal": (0.73, 1.0, 0.84, 16), "accuracy": (None, None, 0.82, 78),
        "macro avg": (0.81, 0.85, 0.82, 78), "weighted avg": (0.83, 0.82, 0.82, 78)}),
    "vgg19": ("Table 2", {
        "benign": (0.91, 0.93, 0.92, 42), "malignant": (1.0, 0.8, 0.89, 20),
        "normal": (0.84, 1.0, 0.91, 16), "accuracy": (None, None, 0.91, 78),
        "macro avg": (0.92, 0.91, 0.91, 78), "weighted avg": (0.92, 0.91, 0.91, 78)}),
    "mobilenet": ("Table 3", {
        "benign": (0.88, 0.9, 0.89, 42), "malignant": (0.94, 0.75, 0.83, 20),
        "normal": (0.84, 1.0, 0.91, 16), "accuracy": (None, None, 0.88, 78),
        "macro avg": (0.89, 0.88, 0.88, 78), "weighted avg": (0.89, 0.88, 0.88, 78)}),
}


# Accuracy and macro-F1 of each model on its 78 test images, read from the tables above.
PAPER = {m: {"accuracy": t["accuracy"][2], "macro_f1": t["macro avg"][2]}
         for m, (_, t) in PAPER_TABLES.items()}


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray | None = None,
                 folds: np.ndarray | None = None, seed: int = 0,
                 n: int = N_BOOTSTRAP) -> dict[str, list[float]]:
    """95% percentile intervals for accuracy and macro-F1, resampling what varies together.

    An interval is only as honest as its resampling unit (:func:`resampled_units` says
    which in words): images; or duplicate groups (``groups``: near-duplicates of one
    lesion are one draw, not several independent ones); or, for pooled cross-validation
    predictions (``folds``), a two-level bootstrap -- the folds with replacement, then
    each drawn fold's groups with replacement. Each fold has its own models, so
    resampling the pooled images as if one model had made them leaves out the
    fold-to-fold spread and gives an interval narrower than the folds' own range.

    Counting is done on per-unit confusion matrices (a resample is a weighted sum of
    them), so 2000 resamples cost milliseconds. Macro-F1 of a resample averages over
    the classes with true labels in it, as :func:`compute` does over the data.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    names = sorted(set(t.tolist()) | set(p.tolist()))
    k = len(names)
    code = {c: i for i, c in enumerate(names)}
    cell = np.array([code[a] * k + code[b] for a, b in zip(t, p, strict=True)], dtype=np.int64)
    fold = np.zeros(len(t), np.int64) if folds is None else np.asarray(folds)
    group = np.arange(len(t)) if groups is None else np.asarray(groups)
    pairs = np.stack([np.unique(fold, return_inverse=True)[1],
                      np.unique(group, return_inverse=True)[1]], axis=1)
    units, unit = np.unique(pairs, axis=0, return_inverse=True)
    unit = unit.ravel()
    counts = np.bincount(unit * k * k + cell, minlength=len(units) * k * k).reshape(
        len(units), k * k).astype(np.float64)
    rng = np.random.default_rng(seed)
    if folds is None:
        weights = np.zeros((n, len(units)))
        draws = rng.integers(0, len(units), (n, len(units)))
        np.add.at(weights, (np.repeat(np.arange(n), len(units)), draws.ravel()), 1)
    else:
        weights = two_level_draws(units[:, 0], n, rng)
    cms = (weights @ counts).reshape(n, k, k)
    acc, f1 = accuracy_macro_f1(cms)
    # Each class in the data: a resample without that class (or, for precision, without a
    # call of it) has no value (NaN, left out).
    tp = cms[:, np.arange(k), np.arange(k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = {"recall": tp / cms.sum(-1), "precision": tp / cms.sum(-2),
                     "f1": 2 * tp / (cms.sum(-1) + cms.sum(-2))}
    present = [c for c in names if c in set(t.tolist())]
    out = {"accuracy": np.percentile(acc, [2.5, 97.5]).round(4).tolist(),
           "macro_f1": np.percentile(f1, [2.5, 97.5]).round(4).tolist()}
    for key, values in per_class.items():
        out[key] = {c: _nan_interval(values[:, code[c]]) for c in present}
    return out


def two_level_draws(unit_fold: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, units) draw counts of the two-level bootstrap of pooled CV predictions: the folds
    with replacement, then each drawn fold's units with replacement. ``unit_fold``: the fold
    (0 .. F-1) of each unit. Shared by every pooled interval (:func:`bootstrap_ci`,
    :func:`benign_malignant_auc`), so they all resample the same way."""
    members = [np.flatnonzero(unit_fold == f) for f in range(unit_fold.max() + 1)]
    weights = np.zeros((n, len(unit_fold)))
    for b in range(n):
        for f in rng.integers(0, len(members), len(members)):
            drawn = members[f][rng.integers(0, len(members[f]), len(members[f]))]
            np.add.at(weights[b], drawn, 1)
    return weights


def _nan_interval(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of the finite values; None when there are none (a class
    never called has no precision in any resample)."""
    finite = values[np.isfinite(values)]
    return np.percentile(finite, [2.5, 97.5]).round(4).tolist() if len(finite) else None


def accuracy_macro_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of a stack of confusion matrices (..., true, predicted).

    F1 of a class is 2 TP / (true + predicted), averaged over the classes with true
    labels (the same numbers as scikit-learn's ``f1_score(labels=present)``; a test
    checks it).
    """
    k = cm.shape[-1]
    tp = cm[..., np.arange(k), np.arange(k)]
    true_n, pred_n = cm.sum(-1), cm.sum(-2)
    acc = tp.sum(-1) / true_n.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(true_n > 0, 2 * tp / (true_n + pred_n), np.nan)
    return acc, np.nanmean(f1, axis=-1)


def resampled_units(n_images: int, groups: np.ndarray | None = None,
                    folds: np.ndarray | None = None, n: int = N_BOOTSTRAP,
                    unit_name: str = "duplicate groups") -> str:
    """What :func:`bootstrap_ci` resampled, as the tables print it.

    ``unit_name`` names what ``groups`` are: near-duplicate groups (a split manifest's),
    or ``"patients"`` when the data says whose scan each image is.
    """
    n_groups = (len({(f, g) for f, g in zip(np.zeros(n_images) if folds is None else folds,
                                            groups, strict=True)})
                if groups is not None else None)
    together = {"duplicate groups": "near-duplicates are drawn together",
                "patients": "a patient's images are drawn together"}.get(
                    unit_name, "the images of each are drawn together")
    unit = (f"the {n_groups} {unit_name} ({n_images} images; {together})"
            if n_groups is not None else f"the {n_images} images")
    if folds is not None:
        return (f"two-level percentile bootstrap, {n} resamples: the {len(set(folds))} folds "
                f"with replacement, then within each drawn fold its share of {unit} with "
                "replacement (so the interval carries the fold-to-fold spread)")
    return f"percentile bootstrap, {n} resamples of {unit} with replacement"


def split_groups(run_dir: Path, files: list[str]) -> np.ndarray | None:
    """The duplicate group of each file, from the split manifest the run used.

    None when the manifest (path in the run's split.json) is gone or does not
    list every file; the interval is then over images, and its note says so.
    """
    from busi.data.split import read_manifest

    try:
        manifest = read_manifest(read_split(run_dir)["manifest"])
    except (OSError, KeyError, TypeError, ValueError, BusiError):
        return None
    group_of = dict(zip(manifest.files, manifest.groups.tolist(), strict=True))
    if not all(f in group_of for f in files):
        return None
    return np.array([group_of[f] for f in files])


CLASS_ORDER = ("benign", "malignant", "normal")


def _order(classes: list[str]) -> list[str]:
    """The one class order of every table, confusion matrix and plot: benign, malignant,
    normal (BUSI's folder order, the config's ``data.classes``), then any others as given.
    One order everywhere, so a reader never has to re-read a header to find a class."""
    known = [c for c in CLASS_ORDER if c in classes]
    return known + [c for c in classes if c not in known]


class_order = _order  # the public name the reporting layer uses


def compute(files: list[str], y_true: list[str], y_pred: list[str], probs: np.ndarray,
            classes: list[str], groups: np.ndarray | None = None,
            folds: np.ndarray | None = None, unit_name: str = "duplicate groups") -> dict:
    """Every figure of a classification report, from (true, predicted) class names.

    Per-class rows and the macro/weighted averages cover the classes *present* in
    the data (true labels), not all the model's classes: on external data without
    ``normal`` images a perfect classifier would otherwise score macro-F1 0.667
    (an F1 of 0 for a class that cannot be found). A prediction of an absent class
    still counts: it is a miss (lower recall) of the true class, and the
    confusion matrix keeps every class of the model. ``groups`` and ``folds`` say
    what the bootstrap intervals resample (:func:`bootstrap_ci`); ``unit_name`` what a
    group is (``"patients"`` for data that names them).
    """
    labels = _order(classes)
    t, p = np.array(y_true), np.array(y_pred)
    present = [c for c in labels if c in set(y_true)]
    rep = classification_report(t, p, labels=present, output_dict=True, zero_division=0)
    text = classification_report(t, p, labels=present, digits=2, zero_division=0)
    absent = [c for c in labels if c not in present]
    if absent:
        text += (f"macro/weighted avg over the classes in the data ({', '.join(present)}); "
                 f"not in the data: {', '.join(absent)}\n")
    cm = confusion_matrix(t, p, labels=labels)
    auc: dict[str, float | None] = {}
    for k, c in enumerate(classes):
        onehot = (t == c).astype(int)
        auc[c] = float(roc_auc_score(onehot, probs[:, k])) if 0 < onehot.sum() < len(t) else None
    macro_auc = (float(np.mean([v for v in auc.values() if v is not None]))
                 if any(v is not None for v in auc.values()) else None)
    return {"n": len(files), "labels": labels, "present": present, "report": rep,
            "report_text": text, "accuracy": float(accuracy_score(t, p)),
            "macro_f1": float(f1_score(t, p, labels=present, average="macro", zero_division=0)),
            "confusion_matrix": cm.tolist(), "roc_auc_ovr": auc, "roc_auc_macro": macro_auc,
            "ci95": bootstrap_ci(t, p, groups, folds),
            "ci95_method": resampled_units(len(t), groups, folds, unit_name=unit_name),
            "sensitivity_specificity": sensitivity_specificity(t, p, groups, folds),
            "benign_malignant_auc": benign_malignant_auc(t, probs, list(classes), groups,
                                                         folds=folds, unit_name=unit_name)}


OPERATING_POINT = ("the classifier's most probable class (argmax of its probabilities); among "
                   "the benign and malignant images, a 'malignant' call is positive and a "
                   "'benign' or 'normal' call negative")


def sensitivity_specificity(y_true: np.ndarray, y_pred: np.ndarray,
                            groups: np.ndarray | None = None,
                            folds: np.ndarray | None = None) -> dict | None:
    """Benign-vs-malignant sensitivity and specificity at the classifier's own operating
    point (:data:`OPERATING_POINT`), malignant positive, with 95% intervals.

    The clinical question is "is this lesion cancer?", so only the benign and malignant
    images count, and a cancer called normal is as missed as one called benign. The
    intervals come from :func:`bootstrap_ci` on the two-class calls (sensitivity is the
    malignant images' recall, specificity the benign images'), so they resample the same
    units -- duplicate groups, patients, folds -- as every other interval of the report.
    None when the data holds neither class.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    sel = (t == "benign") | (t == "malignant")
    if not sel.any():
        return None
    truth = t[sel]
    call = np.where(p[sel] == "malignant", "malignant", "benign")
    mal, ben = truth == "malignant", truth == "benign"
    ci = bootstrap_ci(truth, call, None if groups is None else np.asarray(groups)[sel],
                      None if folds is None else np.asarray(folds)[sel])["recall"]
    tp, tn = int((call[mal] == "malignant").sum()), int((call[ben] == "benign").sum())
    return {"positive": "malignant", "operating_point": OPERATING_POINT,
            "n_malignant": int(mal.sum()), "n_benign": int(ben.sum()),
            "true_positives": tp, "false_negatives": int(mal.sum()) - tp,
            "true_negatives": tn, "false_positives": int(ben.sum()) - tn,
            "sensitivity": tp / int(mal.sum()) if mal.any() else None,
            "specificity": tn / int(ben.sum()) if ben.any() else None,
            "ci95": {"sensitivity": ci.get("malignant"), "specificity": ci.get("benign")}}


def unet_columns(path: Path, seg_run: str | Path | None = None,
                 ) -> dict[str, np.ndarray | None]:
    """The U-Net's presence scores a predictions file holds: ``unet_max`` and ``unet_head``
    (models/decision.py, :data:`~busi.models.decision.UNET_SCORE`).

    A file written before its U-Net had a presence head (``scripts/add_presence_head.py``
    fitted one since) takes the head's scores from ``seg_run``'s ``presence_head.npz`` when
    that scored every image of the file: the U-Net's own data, never another site's."""
    from busi.models.presence import head_scores
    from busi.runs import read_column

    cols = {"max": read_column(path, "unet_max"), "head": read_column(path, "unet_head")}
    if cols["head"] is None and seg_run is not None and Path(seg_run).is_dir():
        head = head_scores(Path(seg_run))
        files = read_predictions(path)[0] if head else []
        if head and all(f in head for f in files):
            cols["head"] = np.array([head[f] for f in files])
    return cols


def own_unet(run_dir: Path) -> Path | None:
    """The U-Net run a classifier run learnt from (its split.json), or None."""
    from busi.runs import read_split

    seg = read_split(run_dir).get("seg_run")
    return Path(seg) if isinstance(seg, str) else None


def operating_point(run_dir: Path, sensitivity: float | None = None,
                    presence: str | None = None):
    """A classifier run's operating point (:class:`busi.models.decision.OperatingPoint`):
    the one it chose on its validation images when it was trained, or, for another
    ``sensitivity`` (``--sensitivity``) or ``presence`` score, one chosen now from the same
    validation images (``val_predictions.csv``); so is a stored point chosen by an earlier
    rule (:data:`busi.models.decision.RULE`). None for a run from before busi chose
    operating points."""
    from busi.models.decision import RULE, OperatingPoint, choose, has_scores
    from busi.runs import OPERATING_POINT as OP_FILE
    from busi.runs import VAL_PREDICTIONS, read_json

    stored = (OperatingPoint.from_dict(read_json(run_dir / OP_FILE))
              if (run_dir / OP_FILE).is_file() else None)
    if (stored is not None and stored.rule == RULE and sensitivity is None
            and presence is None):
        return stored
    val = run_dir / VAL_PREDICTIONS
    if not val.is_file():
        return None
    _, y_true, _, probs, classes = read_predictions(val)
    peak = unet_columns(val, own_unet(run_dir))
    kind = presence or (stored.presence if stored else "argmax")
    if not has_scores(kind, peak):
        if presence is not None:  # asked for by name: not silently another decision
            raise BusiError(f"presence {presence!r} needs the U-Net's scores of the run's "
                            "validation images, and this run has none (it learnt without "
                            "a U-Net, or predates them)", where=str(val),
                            fix="use --presence classifier or argmax")
        kind = "argmax"
    return choose(probs, y_true, classes, peak,
                  malignant_sensitivity=sensitivity or (stored.malignant_sensitivity
                                                        if stored else 0.9),
                  presence=kind,
                  max_missed_lesions=stored.max_missed_lesions if stored else 0.03)


def clinical_figures(y_true: list[str], calls: list[str], words: str,
                     groups: np.ndarray | None = None, folds: np.ndarray | None = None) -> dict:
    """The figures at a chosen operating point, from its calls (:func:`decide`): malignant
    sensitivity and specificity with the report's intervals, 3-class accuracy, and the
    presence decision's normal scans called empty and lesions missed."""
    from busi.models.decision import presence_figures

    t, c = np.asarray(y_true), np.asarray(calls)
    ss = sensitivity_specificity(t, c, groups, folds)
    if ss:
        ss["operating_point"] = words
    return {"words": words, "accuracy": float(accuracy_score(t, c)),
            "sensitivity_specificity": ss, "presence": presence_figures(t, c != "normal"),
            "confusion_matrix": confusion_matrix(t, c, labels=_order(sorted(set(t) | set(c))))
            .tolist(), "labels": _order(sorted(set(t) | set(c)))}


def at_operating_point(op, y_true: list[str], probs: np.ndarray, classes: list[str],
                       unet_max: np.ndarray | None, groups: np.ndarray | None = None,
                       folds: np.ndarray | None = None) -> dict:
    """:func:`clinical_figures` of one model's calls at ``op``."""
    from busi.models.decision import decide, has_scores

    if not has_scores(op.presence, unet_max):
        raise BusiError(f"the operating point's presence decision ({op.presence}) needs the "
                        "U-Net's probabilities, and these predictions have none",
                        fix="evaluate with the run's U-Net (--seg-run)")
    calls = decide(op, probs, classes, unet_max)
    return {**clinical_figures(y_true, calls, op.words(), groups, folds),
            "operating_point_values": op.as_dict(), "calls": calls}


def _ci_text(ci: list[float] | None, digits: int = 2) -> str:
    return "n/a" if ci is None else f"{ci[0]:.{digits}f}-{ci[1]:.{digits}f}"


def summary_markdown(r: dict, notes: bool = True) -> str:
    """The lead of every classification report, what a clinician reads first: the cancer
    figures (sensitivity, specificity, benign-vs-malignant ROC AUC) with intervals, each
    class's recall, and how many lesions the U-Net missed -- the tables follow.

    ``notes=False`` leaves out the operating point and interval method under the table,
    for the second and later summaries of one page that share them (a CV's arms)."""
    lines = [f"**Summary** ({r['n']} images). Malignant is the positive class.", "",
             "| figure | value | 95% CI |", "|---|---:|---:|"]
    ss = r.get("sensitivity_specificity")
    if ss:
        for key, name, k, n in (
                ("sensitivity", "Sensitivity: malignant called malignant",
                 ss["true_positives"], ss["n_malignant"]),
                ("specificity", "Specificity: benign not called malignant",
                 ss["true_negatives"], ss["n_benign"])):
            v = ss[key]
            lines.append(f"| {name} | {'n/a' if v is None else f'{v:.2f}'} ({k} of {n}) | "
                         f"{_ci_text(ss['ci95'][key])} |")
    bm = r.get("benign_malignant_auc")
    if bm:
        lines.append(f"| ROC AUC, benign vs malignant | "
                     f"{'n/a' if bm['auc'] is None else format(bm['auc'], '.3f')} | "
                     f"{_ci_text(bm['ci95'], 3)} |")
    if r.get("roc_auc_macro") is not None:
        lines.append(f"| ROC AUC, each class vs the rest (macro) | {r['roc_auc_macro']:.3f} | |")
    recall_ci = r["ci95"].get("recall", {})
    cm = np.array(r["confusion_matrix"])
    for i, c in enumerate(r["labels"]):
        if c in r["present"]:
            lines.append(f"| Recall {c} | {r['report'][c]['recall']:.2f} ({cm[i, i]} of "
                         f"{cm[i].sum()}) | {_ci_text(recall_ci.get(c))} |")
    cl = r.get("clinical")
    if cl:
        cs = cl["sensitivity_specificity"]
        op = cl.get("operating_point_values", {})
        target = f" (target {op['malignant_sensitivity']:g})" if op else ""
        if cs:
            for key, name, k, n in (
                    ("sensitivity", f"At the chosen point{target}: sensitivity",
                     cs["true_positives"], cs["n_malignant"]),
                    ("specificity", "At the chosen point: specificity (benign not called "
                                    "malignant)", cs["true_negatives"], cs["n_benign"])):
                v = cs[key]
                lines.append(f"| {name} | {'n/a' if v is None else f'{v:.2f}'} ({k} of {n}) | "
                             f"{_ci_text(cs['ci95'][key])} |")
        pf = cl["presence"]
        if pf["normal_scans"]:
            lines.append(f"| Normal scans called lesion-free | {pf['normal_empty_fraction']:.2f} "
                         f"({pf['normal_called_empty']} of {pf['normal_scans']}) | |")
        if pf["lesion_scans"]:
            lines.append(f"| Lesion scans called normal | {pf['lesion_missed_fraction']:.2f} "
                         f"({pf['lesion_missed']} of {pf['lesion_scans']}) | |")
        lines.append(f"| 3-class accuracy at the chosen point | {cl['accuracy']:.3f} | |")
    miss = r.get("unet_missed")
    if miss:
        lines.append(f"| Lesion images the U-Net missed (empty predicted mask) | "
                     f"{miss['missed']} of {miss['lesion_images']} | |")
    if notes:
        lines += ["", "Operating point: " + OPERATING_POINT + "." if ss else "",
                  "The chosen point: " + cl["words"] + "." if cl else "",
                  f"95% intervals: {r.get('ci95_method', 'bootstrap')}.", ""]
    return "\n".join(ln for ln in lines if ln is not None) + "\n"


BM_SCORE = "p(malignant) / (p(benign) + p(malignant))"


def benign_malignant_auc(y_true: list[str] | np.ndarray, probs: np.ndarray, classes: list[str],
                         groups: np.ndarray | None = None, seed: int = 0,
                         n: int = N_BOOTSTRAP, unit_name: str = "patients",
                         folds: np.ndarray | None = None) -> dict | None:
    """ROC AUC of benign vs malignant over the images that are one of the two, with a 95%
    percentile bootstrap interval that resamples ``groups`` (patients), not images.

    The clinical question on another site's scans is "is this lesion malignant?", so
    the score is the model's malignant share of the two lesion classes, BM_SCORE:
    a normal probability, which says nothing about benign vs malignant, drops out.
    A resample weighs each image by how often its unit was drawn (:func:`weighted_aucs`,
    scikit-learn's ``sample_weight`` AUC), so it equals the AUC of the duplicated
    images; resamples holding one class only have no AUC and are left out
    (``resamples`` counts the rest). Pooled cross-validation predictions (``folds``) get
    the two-level bootstrap of every other pooled interval (:func:`two_level_draws`): the
    folds, then each drawn fold's groups. None when the model lacks one of the two classes.
    """
    if "benign" not in classes or "malignant" not in classes:
        return None
    t = np.asarray(y_true)
    sel = (t == "benign") | (t == "malignant")
    pb = probs[sel, classes.index("benign")].astype(np.float64)
    pm = probs[sel, classes.index("malignant")].astype(np.float64)
    score = np.divide(pm, pb + pm, out=np.full_like(pm, 0.5), where=(pb + pm) > 0)
    y = (t[sel] == "malignant").astype(int)
    g = np.arange(len(y)) if groups is None else np.asarray(groups)[sel]
    if folds is not None:  # a fold's images are drawn within it: (fold, group) is the unit
        g = np.stack([np.unique(np.asarray(folds)[sel], return_inverse=True)[1].ravel(),
                      np.unique(g, return_inverse=True)[1].ravel()], axis=1)
    units, unit = np.unique(g, axis=0 if folds is not None else None, return_inverse=True)
    out: dict = {"score": BM_SCORE, "n_images": int(sel.sum()), "n_benign": int((y == 0).sum()),
                 "n_malignant": int(y.sum()), "n_units": len(units),
                 "unit_name": "images" if groups is None else unit_name, "auc": None,
                 "ci95": None, "resamples": 0}
    if folds is not None:
        out["n_folds"] = int(units[:, 0].max()) + 1
    if not 0 < y.sum() < len(y):
        return out
    out["auc"] = float(roc_auc_score(y, score))
    rng = np.random.default_rng(seed)
    draws = (rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=n)
             if folds is None else two_level_draws(units[:, 0], n, rng))
    aucs = weighted_aucs(y, score, draws[:, unit.ravel()].astype(np.float64))
    aucs = aucs[np.isfinite(aucs)]
    if aucs.size:
        out["ci95"] = np.percentile(aucs, [2.5, 97.5]).round(4).tolist()
    out["resamples"] = int(aucs.size)
    return out


def weighted_aucs(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of image weights (n, N): what ``roc_auc_score(y, score,
    sample_weight=row)`` gives (a test checks), for all rows in one matrix product.

    scikit-learn takes milliseconds per call, seconds for 2000 resamples; this is the
    Mann-Whitney form of the same area (a positive above a negative counts 1, a tie
    1/2), summed per distinct score. NaN where a row holds one class only.
    """
    _, level = np.unique(score, return_inverse=True)
    onehot = np.zeros((len(score), int(level.max()) + 1))
    onehot[np.arange(len(score)), level.ravel()] = 1.0
    pos = (weights * (y == 1)) @ onehot  # (n, levels): weighted positives at each score
    neg = (weights * (y == 0)) @ onehot
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (pos * (below + 0.5 * neg)).sum(1) / den, np.nan)


def _averaged_over(r: dict) -> str:
    """The sentence that says which classes the macro averages cover."""
    absent = [c for c in r["labels"] if c not in r["present"]]
    line = (f"Macro and weighted averages are over the {len(r['present'])} classes in the data "
            f"({', '.join(r['present'])})")
    if absent:
        line += (f"; {', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not in the data, "
                 "and a prediction of it counts as an error of the true class")
    return line + "."


def markdown_table(r: dict, title: str, summary: bool = True) -> str:
    """A classifier's report in Markdown: the clinician's summary first
    (:func:`summary_markdown`; ``summary=False`` where the page already shows it), then
    the per-class table, the averages and the confusion matrix."""
    rep = r["report"]
    recall_ci = r["ci95"].get("recall", {})  # absent in reports written before it was added
    lines = [f"### {title}", "", *([summary_markdown(r)] if summary else []),
             "Per class:", "", "| | Precision | Recall"
             + (" (95% CI)" if recall_ci else "") + " | F1-score | Support |",
             "|---|---:|---:|---:|---:|"]
    for c in r["labels"]:
        if c not in r["present"]:
            lines.append(f"| {c.capitalize()} | not in data | | | 0 |")
            continue
        e = rep[c]
        ci = (f" ({recall_ci[c][0]:.2f}-{recall_ci[c][1]:.2f})" if c in recall_ci else "")
        lines.append(f"| {c.capitalize()} | {e['precision']:.2f} | {e['recall']:.2f}{ci} | "
                     f"{e['f1-score']:.2f} | {int(e['support'])} |")
    lines.append(f"| Accuracy | | | {r['accuracy']:.2f} | {r['n']} |")
    for key, name in (("macro avg", "Macro avg."), ("weighted avg", "Weighted avg.")):
        e = rep[key]
        lines.append(f"| {name} | {e['precision']:.2f} | {e['recall']:.2f} | "
                     f"{e['f1-score']:.2f} | {int(e['support'])} |")
    ci = r["ci95"]
    auc = "n/a" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.3f}"
    lines += ["", _averaged_over(r), "",
              f"Accuracy {r['accuracy']:.3f} (95% CI {ci['accuracy'][0]:.3f}-"
              f"{ci['accuracy'][1]:.3f}); macro-F1 {r['macro_f1']:.3f} (95% CI "
              f"{ci['macro_f1'][0]:.3f}-{ci['macro_f1'][1]:.3f}); one-vs-rest ROC AUC "
              f"(macro) {auc}. 95% intervals: {r.get('ci95_method', 'bootstrap')}.", ""]
    if r.get("benign_malignant_auc"):
        lines += [benign_malignant_line(r["benign_malignant_auc"]), ""]
    lines += ["Confusion matrix (rows: true, columns: predicted):", "",
              "| true \\ pred | " + " | ".join(r["labels"]) + " |",
              "|---|" + "---:|" * len(r["labels"])]
    for c, row in zip(r["labels"], r["confusion_matrix"], strict=True):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def benign_malignant_line(a: dict) -> str:
    """The benign-vs-malignant AUC sentence: figure, interval, what was resampled, the score."""
    counts = (f"{a['n_images']} benign or malignant images ({a['n_benign']} benign, "
              f"{a['n_malignant']} malignant) of {a['n_units']} {a.get('unit_name', 'images')}")
    if a["auc"] is None:
        return f"Benign vs malignant ROC AUC: n/a (needs both classes; {counts})."
    ci = ("no interval (no resample held both classes)" if a["ci95"] is None else
          f"95% CI {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f}")
    drawn = (f"percentile bootstrap of those {a['n_units']} {a.get('unit_name', 'images')} "
             "with replacement" if not a.get("n_folds") else
             f"two-level percentile bootstrap: the {a['n_folds']} folds with replacement, "
             f"then within each drawn fold its share of those {a['n_units']} "
             f"{a.get('unit_name', 'images')} with replacement")
    return (f"Benign vs malignant ROC AUC {a['auc']:.3f} ({ci}) on {counts}; score "
            f"{a['score']}. Interval: {drawn} ({a['resamples']} resamples held both classes "
            "and were scored).")


def _csv_table(r: dict) -> str:
    rows = ["class,precision,recall,f1,support"]
    for c in [*r["present"], "macro avg", "weighted avg"]:  # averages over these classes
        e = r["report"][c]
        rows.append(f"{c},{e['precision']:.4f},{e['recall']:.4f},{e['f1-score']:.4f},"
                    f"{int(e['support'])}")
    rows.append(f"accuracy,,,{r['accuracy']:.4f},{r['n']}")
    return "\n".join(rows) + "\n"


def plot_confusion(r: dict, out: Path, title: str) -> None:
    """The confusion matrix as a figure: which class is taken for which, at a glance."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    cm = np.array(r["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(r["labels"])), r["labels"])
    ax.set_yticks(range(len(r["labels"])), r["labels"])
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium", wrap=True)
    save_figure(fig, out)


def _classifier_settings(run_dir: Path) -> dict | None:
    """The ``model.classifier`` section of a run's saved config.yaml; None without one."""
    cfg = run_dir / CONFIG
    if not cfg.is_file():
        return None
    import yaml

    return yaml.safe_load(cfg.read_text())["model"]["classifier"]


def inputs_of(run_dir: Path) -> str:
    """What the classifier was shown, e.g. 'predicted masks, multiply' or 'whole image'."""
    c = _classifier_settings(run_dir)
    if c is None:
        return "?"
    if c["masks"] == "none" or c["mask_mode"] == "none":
        return "whole image"
    grown = f" (+{c['mask_dilation']} px)" if c.get("mask_dilation") else ""
    return f"{c['masks'].replace('_', ' ')} masks{grown}, {c['mask_mode']}"


def _run_title(run_dir: Path) -> str:
    return f"{model_of(run_dir)} ({inputs_of(run_dir)}) -- {run_dir.name}"


def evaluate_run(run_dir: str | Path, sensitivity: float | None = None,
                 presence: str | None = None) -> dict:
    """Compute one classifier run's report; write its report files if it has none yet.

    A finished run writes its own reports once; a later ``busi evaluate`` only
    reads it (its tables go to ``outputs/eval/<run>/``), so evaluating never
    modifies an earlier run's folder. ``sensitivity``: the operating point for that
    malignant sensitivity, chosen on the run's validation images, instead of its own;
    ``presence``: likewise, with that lesion-presence score (models/decision.py).
    """

    run_dir = Path(run_dir)
    files, y_true, y_pred, probs, classes = read_predictions(run_dir / PREDICTIONS)
    groups = split_groups(run_dir, files)
    r = compute(files, y_true, y_pred, probs, classes, groups=groups)
    r["unet_missed"] = missed_lesions(read_per_image(run_dir / PER_IMAGE))
    op = operating_point(run_dir, sensitivity, presence)
    if op is not None:
        r["clinical"] = at_operating_point(op, y_true, probs, classes,
                                           unet_columns(run_dir / PREDICTIONS,
                                                        own_unet(run_dir)),
                                           groups=groups)
    title = _run_title(run_dir)
    r["title"] = title
    r["text"] = f"{title}\n{r['report_text']}" + (
        f"accuracy {r['accuracy']:.3f} (95% CI {r['ci95']['accuracy'][0]:.3f}-"
        f"{r['ci95']['accuracy'][1]:.3f}), macro-F1 {r['macro_f1']:.3f} (95% CI "
        f"{r['ci95']['macro_f1'][0]:.3f}-{r['ci95']['macro_f1'][1]:.3f}; "
        f"{r['ci95_method']})") + clinical_text(r)
    if (sensitivity is None and presence is None
            and not (run_dir / "classification_report.json").is_file()):
        write_run_reports(run_dir, r, title)
    return r


def clinical_text(r: dict) -> str:
    """The chosen operating point's figures as the lines printed under a report."""
    cl = r.get("clinical")
    if not cl:
        return ""
    cs, pf = cl["sensitivity_specificity"], cl["presence"]
    out = f"\nat the chosen point ({cl['words']}):"
    if cs and cs["sensitivity"] is not None:
        ci = cs["ci95"]
        out += (f"\n  malignant sensitivity {cs['sensitivity']:.2f} (95% CI "
                f"{_ci_text(ci['sensitivity'])}), specificity "
                + ("n/a" if cs["specificity"] is None else f"{cs['specificity']:.2f}")
                + f" (95% CI {_ci_text(ci['specificity'])})")
    if pf["normal_scans"]:
        out += (f"\n  normal scans called lesion-free {pf['normal_called_empty']} of "
                f"{pf['normal_scans']}")
    if pf["lesion_scans"]:
        out += f"; lesion scans called normal {pf['lesion_missed']} of {pf['lesion_scans']}"
    return out + f"; 3-class accuracy {cl['accuracy']:.3f}"


def write_run_reports(run_dir: Path, r: dict, title: str) -> None:
    """A report's tables (text, Markdown, CSV), confusion matrix and JSON, into ``run_dir``;
    the JSON last, so its presence means the others are complete."""
    atomic_write(run_dir / "classification_report.txt", r["text"] + "\n")
    atomic_write(run_dir / "classification_report.md", markdown_table(r, title))
    atomic_write(run_dir / "classification_report.csv", _csv_table(r))
    cm_rows = ["true\\pred," + ",".join(r["labels"])]
    cm_rows += [f"{c}," + ",".join(map(str, row))
                for c, row in zip(r["labels"], r["confusion_matrix"], strict=True)]
    atomic_write(run_dir / "confusion_matrix.csv", "\n".join(cm_rows) + "\n")
    plot_confusion(r, run_dir / "confusion_matrix.png", title.split(" -- ")[0])
    # Last: its presence means every report file above is complete.
    write_json(run_dir / "classification_report.json",
               {k: v for k, v in r.items() if k not in ("text", "report_text")})


def model_of(run_dir: Path) -> str:
    """The classifier a run trained (``model.classifier.name`` of its config.yaml). Not its
    folder's name: ``--name`` puts a run under ``outputs/cls/<name>/``, so a VGG19 named
    "ablation" is no model "ablation" and has the paper's Table 2 to stand beside. Only a
    folder without a config.yaml (an old or partial copy) falls back to the folder."""
    c = _classifier_settings(run_dir)
    name = c.get("name") if isinstance(c, dict) else None
    return str(name) if name else run_dir.parent.name


def comparison_markdown(results: list[dict], runs: list[Path]) -> str:
    """Runs side by side with their intervals and, for runs on BUSI (:func:`on_paper_data`),
    the paper's figure, so a difference between models can be read against the width of the
    intervals. The paper's column is there only when a run is on BUSI, and filled only for
    those runs: the paper's accuracy beside a run on synthetic scans or a user's own data
    would read as a comparison that it is not."""
    beside = [on_paper_data(run) for run in runs]
    head = ["model", "inputs", "run", "n", "accuracy (95% CI)", "macro-F1 (95% CI)", "ROC AUC",
            "recall benign", "recall malignant", "recall normal"]
    lines = ["| " + " | ".join(head + ["paper accuracy"] * any(beside)) + " |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|" + "---:|" * any(beside)]
    for r, run, busi in zip(results, runs, beside, strict=True):
        m = model_of(run)
        ci = r["ci95"]
        rec = {c: r["report"].get(c, {}).get("recall") for c in ("benign", "malignant", "normal")}
        rec_s = [("n/a" if v is None else f"{v:.2f}") for v in rec.values()]
        auc = "n/a" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.3f}"
        paper = PAPER.get(m, {}).get("accuracy") if busi else None
        lines.append(f"| {m} | {inputs_of(run)} | {run.name} | {r['n']} | {r['accuracy']:.3f} "
                     f"({ci['accuracy'][0]:.2f}-{ci['accuracy'][1]:.2f}) | {r['macro_f1']:.3f} "
                     f"({ci['macro_f1'][0]:.2f}-{ci['macro_f1'][1]:.2f}) | {auc} | "
                     + " | ".join(rec_s)
                     + (f" | {paper if paper is not None else ''}" if any(beside) else "") + " |")
    methods = sorted({r.get("ci95_method", "bootstrap") for r in results})
    lines += ["", "macro-F1: averaged over the classes present in each run's test data "
                  "(n/a: a class not in the data). 95% CI: " + "; ".join(methods) + "."]
    if any(beside):
        lines.append("Paper accuracy: the paper's figure for the model, on its own 78 test "
                     f"images; given for runs on BUSI's {PAPER_DATA_IMAGES} images only.")
    return "\n".join(lines) + "\n"


def weights_of(run_dir: Path) -> str:
    """Where a classifier's base started, in words, e.g. 'from scratch' for VGG19 here
    (no ImageNet weights reachable): a paper comparison must say so."""
    c = _classifier_settings(run_dir)
    if c is None:
        return "?"
    w = str(c.get("weights") or "none")
    if c["name"] == "cnn":
        return "from scratch (no pretrained base)"
    if w in ("none", ""):
        return "from scratch (no pretrained weights)"
    if w == "unet":
        return "the U-Net's MobileNet encoder"
    if w == "imagenet":
        return "ImageNet (Keras download)"
    return f"ImageNet ({Path(w).name})" if "imagenet" in w.lower() else f"file {Path(w).name}"


PAPER_DATA_IMAGES = 780  # BUSI: 437 benign, 210 malignant, 133 normal


def on_paper_data(run_dir: Path) -> bool:
    """Whether a run's split covers the paper's data -- all 780 BUSI images -- so that its
    figures may stand beside the paper's (not the demo's synthetic scans or a user's own)."""
    try:
        split = read_split(run_dir)
        return sum(int(split[k]) for k in ("train", "val", "test")) == PAPER_DATA_IMAGES
    except (BusiError, KeyError, TypeError, ValueError):
        return False


def paper_table_markdown(r: dict, run_dir: Path) -> str | None:
    """One run beside the paper's table for its model (Tables 1-3), row for row: each of
    our figures with its 95% interval and the paper's next to it. None for a model the
    paper did not train, or a run on other data than BUSI's 780 images. The paper lists
    benign, normal, malignant; this table keeps busi's one class order (benign, malignant,
    normal) -- the rows are the same."""
    m = model_of(run_dir)
    if m not in PAPER_TABLES or not on_paper_data(run_dir):
        return None
    table, paper = PAPER_TABLES[m]
    ci = r["ci95"]

    def cell(value: float | None, interval: list[float] | None = None) -> str:
        if value is None:
            return ""
        return f"{value:.2f}" + ("" if interval is None else f" ({_ci_text(interval)})")

    def ref(value: float | None) -> str:
        return "" if value is None else f"{value:g}"

    lines = [f"#### {m} beside the paper's {table} -- {run_dir.name}", "",
             f"Inputs: {inputs_of(run_dir)}; base weights: {weights_of(run_dir)}. "
             "Ours, with 95% intervals (" + r.get("ci95_method", "bootstrap") + "), then the "
             "paper's figure.", "",
             "| | precision | paper | recall | paper | F1-score | paper | support | paper |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    called = np.asarray(r["confusion_matrix"]).sum(axis=0)  # predictions of each class
    never = [c for k, c in enumerate(r["labels"]) if c in r["present"] and not called[k]]
    for c in r["labels"]:
        if c not in r["present"]:
            continue
        row, theirs = r["report"][c], paper.get(c, (None,) * 4)
        precision = ("never predicted" if c in never
                     else cell(row["precision"], ci.get("precision", {}).get(c)))
        lines.append(
            f"| {c.capitalize()} | {precision} | "
            f"{ref(theirs[0])} | {cell(row['recall'], ci.get('recall', {}).get(c))} | "
            f"{ref(theirs[1])} | {cell(row['f1-score'], ci.get('f1', {}).get(c))} | "
            f"{ref(theirs[2])} | {int(row['support'])} | {ref(theirs[3])} |")
    lines.append(f"| Accuracy | | | | | {cell(r['accuracy'], ci['accuracy'])} | "
                 f"{ref(paper['accuracy'][2])} | {r['n']} | {ref(paper['accuracy'][3])} |")
    for key, label in (("macro avg", "Macro avg."), ("weighted avg", "Weighted avg.")):
        row, theirs = r["report"][key], paper[key]
        f1 = cell(row["f1-score"], ci["macro_f1"] if key == "macro avg" else None)
        lines.append(f"| {label} | {cell(row['precision'])} | {ref(theirs[0])} | "
                     f"{cell(row['recall'])} | {ref(theirs[1])} | {f1} | {ref(theirs[2])} | "
                     f"{int(row['support'])} | {ref(theirs[3])} |")
    if never:
        lines += ["", f"Never predicted: {', '.join(never)}. A class the model never calls has "
                      "no precision; the averages count it as 0 (scikit-learn's "
                      "zero_division=0)."]
    return "\n".join(lines) + "\n"


PER_IMAGE = "per_image.csv"
PER_IMAGE_COLUMNS = ("file", "true", "pred", "confidence", "correct", "lesion_dice",
                     "true_lesion_px", "pred_lesion_px", "unet_missed", "grid")


def write_per_image(path: Path, files: list[str], y_true: list[str], y_pred: list[str],
                    confidence: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> Path:
    """``per_image.csv``: each test image's classification joined to its U-Net mask, so a
    wrong class can be traced to a failed mask.

    ``truth`` and ``predicted`` are the (N, H, W) ground-truth and U-Net masks on the
    model's input grid (``grid``, e.g. 128x128: the pixel counts are of that grid, not of
    the original scan). ``lesion_dice`` is empty for an image without a lesion;
    ``unet_missed`` is 1 for a lesion image whose predicted mask is empty. Written beside
    predictions.csv, which keeps its columns for every reader of it.
    """
    truth, predicted = np.asarray(truth) > 0, np.asarray(predicted) > 0
    grid = f"{truth.shape[2]}x{truth.shape[1]}"
    rows = []
    for i, f in enumerate(files):
        t_px, p_px = int(truth[i].sum()), int(predicted[i].sum())
        rows.append({"file": f, "true": y_true[i], "pred": y_pred[i],
                     "confidence": float(confidence[i]), "correct": y_true[i] == y_pred[i],
                     "lesion_dice": dice(truth[i], predicted[i]) if t_px else None,
                     "true_lesion_px": t_px, "pred_lesion_px": p_px,
                     "unet_missed": t_px > 0 and p_px == 0, "grid": grid})
    return write_per_image_rows(path, rows)


def write_per_image_rows(path: Path, rows: list[dict]) -> Path:
    """``per_image.csv`` from rows as :func:`read_per_image` returns them (a CV pools its
    folds' rows): the one place that says how each column is written."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_IMAGE_COLUMNS)
    for r in rows:
        writer.writerow([r["file"], r["true"], r["pred"], f"{float(r['confidence']):.4f}",
                         int(r["correct"]),
                         "" if r["lesion_dice"] is None else f"{r['lesion_dice']:.4f}",
                         r["true_lesion_px"], r["pred_lesion_px"], int(r["unet_missed"]),
                         r["grid"]])
    return atomic_write(path, buf.getvalue())


def read_per_image(path: Path) -> list[dict] | None:
    """The rows of a ``per_image.csv`` with numbers as numbers (``lesion_dice`` None for an
    image without a lesion); None when the run has none (no U-Net, or an older run)."""
    import csv

    if not Path(path).is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return [{**r, "confidence": float(r["confidence"]), "correct": r["correct"] == "1",
                 "lesion_dice": float(r["lesion_dice"]) if r["lesion_dice"] else None,
                 "true_lesion_px": int(r["true_lesion_px"]),
                 "pred_lesion_px": int(r["pred_lesion_px"]),
                 "unet_missed": r["unet_missed"] == "1"} for r in rows]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as exc:
        raise BusiError(f"cannot read per-image table ({type(exc).__name__})", where=str(path),
                        fix="restore the file, or rerun the run it belongs to") from None


def missed_lesions(rows: list[dict] | None) -> dict | None:
    """How many lesion images the U-Net left empty, from :func:`read_per_image` rows."""
    if not rows:
        return None
    lesion = [r for r in rows if r["true_lesion_px"] > 0]
    return {"missed": sum(r["unet_missed"] for r in lesion), "lesion_images": len(lesion),
            "grid": rows[0]["grid"]}


def worst_cases_markdown(rows: list[dict], n_dice: int = 10, n_wrong: int = 20) -> str:
    """The failures a reader should look at: every wrong classification with its mask's
    Dice, then the lowest-Dice lesion images (from ``per_image.csv``)."""
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["confidence"])

    def cells(r: dict) -> str:
        d = "no lesion" if r["lesion_dice"] is None else f"{r['lesion_dice']:.2f}"
        miss = " (missed)" if r["unet_missed"] else ""
        return (f"| `{r['file']}` | {r['true']} | {r['pred']} | {r['confidence']:.2f} | {d}{miss} "
                f"| {r['true_lesion_px']} | {r['pred_lesion_px']} |")

    head = ["| image | true | predicted | confidence | lesion Dice | true lesion px | "
            "U-Net lesion px |", "|---|---|---|---:|---:|---:|---:|"]
    grid = rows[0]["grid"] if rows else "?"
    lines = [f"Pixels are of the model's {grid} input grid. Full table: `{PER_IMAGE}`.", "",
             f"Wrong classifications ({len(wrong)} of {len(rows)}), most confident first:", ""]
    lines += [*head, *map(cells, wrong[:n_wrong])] if wrong else ["None."]
    if len(wrong) > n_wrong:
        lines += ["", f"... and {len(wrong) - n_wrong} more (less confident) in `{PER_IMAGE}`."]
    scored = sorted((r for r in rows if r["lesion_dice"] is not None),
                    key=lambda r: r["lesion_dice"])[:n_dice]
    if scored:
        lines += ["", f"Lowest-Dice lesion images ({len(scored)}):", "", *head,
                  *map(cells, scored)]
    return "\n".join(lines) + "\n"


def present_classes_view(r: dict) -> dict:
    """A report of another site's data (``busi evaluate --data``) without rows for the
    model's classes the data lacks: on benign/malignant-only data a ``normal`` row of
    support 0 and an all-zero confusion row say nothing and read as a result.

    The full matrix stays in ``confusion_matrix_all`` (over ``labels_all``); a scan called
    an absent class (a benign lesion called normal) is an error of its true class, which
    ``absent_note`` states in words since the matrix has no column for it.
    """
    absent = [c for c in r["labels"] if c not in r["present"]]
    if not absent:
        return r
    keep = [r["labels"].index(c) for c in r["present"]]
    cm = np.array(r["confusion_matrix"])
    called = {c: {t: int(cm[r["labels"].index(t), r["labels"].index(c)]) for t in r["present"]
                  if cm[r["labels"].index(t), r["labels"].index(c)]} for c in absent}
    several = len(absent) > 1
    note = (f"The model's class{'es' if several else ''} {', '.join(absent)} "
            f"{'are' if several else 'is'} not in this data and get{'' if several else 's'} "
            "no row.")
    calls = [f"{n} {t} called {c}" for c, by in called.items() for t, n in by.items()]
    if calls:
        note += f" Scans called an absent class (errors of their true class): {', '.join(calls)}."
    return {**r, "labels": list(r["present"]),
            "confusion_matrix": cm[np.ix_(keep, keep)].tolist(),
            "labels_all": r["labels"], "confusion_matrix_all": r["confusion_matrix"],
            "predicted_absent": called, "absent_note": note}
