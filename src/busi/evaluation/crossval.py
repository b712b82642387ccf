"""Cross-validation tables: per-fold figures, mean ± std over folds, and pooled out-of-fold
reports, from the finished runs of a ``busi cv`` folder (``busi.workflows.cv.run_cv`` trains them).

A 78-image test set moves 1.3 points of accuracy per image, so one split cannot
separate the paper's models; k folds give every image one out-of-fold prediction. The
folder layout of a CV run is described in ``busi.workflows.cv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from busi.errors import BusiError
from busi.evaluation.classification import (
    OPERATING_POINT,
    PER_IMAGE,
    class_order,
    clinical_figures,
    compute,
    markdown_table,
    missed_lesions,
    read_per_image,
    split_groups,
    summary_markdown,
    write_per_image_rows,
    write_run_reports,
)
from busi.evaluation.segmentation import fmt_stat
from busi.runs import (
    PREDICTIONS,
    VAL_PREDICTIONS,
    atomic_write,
    cv_arms,
    cv_fold_classifier,
    cv_fold_unet,
    read_json,
    read_predictions,
    saved_state,
    write_json,
    write_predictions,
)

PRESENCE_NOTE = (
    "Lesion present or not, each score's threshold chosen per fold on that fold's validation "
    "images to miss at most the config's decision.max_missed_lesions of its lesion images, "
    "then applied to the fold's test images and pooled. 'validation AUC' (normal vs lesion, "
    "over the folds' validation images pooled) is the figure to choose a score by: the test "
    "columns are for reading, not choosing.")


def _fold_decisions(run: Path, test: tuple) -> dict | None:
    """One fold's classifier at every presence score (models/decision.py), each threshold
    chosen on that fold's validation images: the test calls per score, the run's own
    operating point's calls, and the validation scores that the choice of score rests on.
    ``test``: the run's predictions.csv as :func:`read_predictions` gave it (read once, by
    :func:`aggregate`). None for a run from before busi wrote val_predictions.csv."""
    from busi.evaluation.classification import operating_point, own_unet, unet_columns
    from busi.models.decision import (
        PRESENCE_SCORES,
        choose,
        decide,
        has_scores,
        presence_score,
    )

    val = run / VAL_PREDICTIONS
    if not val.is_file():
        return None
    _, v_true, _, v_probs, classes = read_predictions(val)
    seg = own_unet(run)  # a run older than its U-Net's head reads the head's scores there
    v_peak, t_peak = unet_columns(val, seg), unet_columns(run / PREDICTIONS, seg)
    _, t_true, _, t_probs, _ = test
    own = operating_point(run)
    out: dict = {"own": decide(own, t_probs, classes, t_peak), "own_op": own, "kinds": {},
                 "val_true": v_true, "val_probs": v_probs, "classes": classes,
                 "val_loss": saved_state(run).get("best"), "val_scores": {}}
    for kind in PRESENCE_SCORES:
        if not (has_scores(kind, v_peak) and has_scores(kind, t_peak)):
            continue
        op = choose(v_probs, v_true, classes, v_peak,
                    malignant_sensitivity=own.malignant_sensitivity, presence=kind,
                    max_missed_lesions=own.max_missed_lesions)
        out["kinds"][kind] = decide(op, t_probs, classes, t_peak)
        out["val_scores"][kind] = (None if kind == "argmax"  # a call, not a score
                                   else presence_score(kind, v_probs, classes, v_peak))
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.array(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(a)}


def _num(value: float | None) -> float:
    """A figure read from strict JSON: null (undefined) as NaN."""
    return float("nan") if value is None else float(value)


VALIDATION_NOTE = (
    "The figures to choose an arm by: each fold's validation images (never its test images), "
    "pooled over the folds. Benign vs malignant AUC on p(malignant) / (p(benign) + "
    "p(malignant)); normal vs lesion AUC on 1 - p(normal); the lowest validation loss is the "
    "mean over the folds of each run's best epoch (its checkpoint). The test tables below are "
    "for reading, not choosing.")


def _validation_row(arm: str, folds: list[dict]) -> tuple[str, dict]:
    """One arm's pooled validation figures (:data:`VALIDATION_NOTE`) from its folds'
    :func:`_fold_decisions`: a Markdown row and its record."""
    from sklearn.metrics import f1_score, roc_auc_score

    from busi.models.decision import malignancy

    classes = folds[0]["classes"]
    t = np.array([c for f in folds for c in f["val_true"]])
    probs = np.concatenate([f["val_probs"] for f in folds])
    pred = np.array(classes)[probs.argmax(axis=1)]
    bm = np.isin(t, ["benign", "malignant"])
    lesion = t != "normal"

    def auc(y: np.ndarray, score: np.ndarray) -> float | None:
        return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None

    losses = [f["val_loss"] for f in folds if f["val_loss"] is not None]
    rec = {"n": len(t), "accuracy": float(np.mean(pred == t)),
           "macro_f1": float(f1_score(t, pred, average="macro")),
           "benign_malignant_auc": auc(t[bm] == "malignant", malignancy(probs[bm], classes)),
           "normal_lesion_auc": (auc(lesion, 1.0 - probs[:, classes.index("normal")])
                                 if "normal" in classes else None),
           "val_loss": float(np.mean(losses)) if len(losses) == len(folds) else None}

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return (f"| {arm} | {rec['n']} | {num(rec['accuracy'])} | {num(rec['macro_f1'])} | "
            f"{num(rec['benign_malignant_auc'])} | {num(rec['normal_lesion_auc'])} | "
            f"{num(rec['val_loss'])} |", rec)


def _presence_rows(folds: list[dict], y_true: list[str]) -> list[str]:
    """One Markdown row per presence score over the folds (:func:`_fold_decisions`)."""
    from sklearn.metrics import roc_auc_score

    from busi.models.decision import presence_figures

    rows = []
    for kind in folds[0]["kinds"]:
        if any(kind not in d["kinds"] for d in folds):
            continue
        calls = np.array([c for d in folds for c in d["kinds"][kind]])
        pf = presence_figures(y_true, calls != "normal")
        v_true = np.array([t for d in folds for t in d["val_true"]]) != "normal"
        v_score = [d["val_scores"][kind] for d in folds]
        auc = ("n/a" if any(v is None for v in v_score) or v_true.all() or not v_true.any()
               else f"{roc_auc_score(v_true, np.concatenate(v_score)):.3f}")
        acc = float(np.mean(calls == np.asarray(y_true)))
        rows.append(f"| {kind} | {auc} | {pf['normal_called_empty']} of {pf['normal_scans']} "
                    f"({(pf['normal_empty_fraction'] or 0):.2f}) | {pf['lesion_missed']} of "
                    f"{pf['lesion_scans']} ({(pf['lesion_missed_fraction'] or 0):.2f}) | "
                    f"{acc:.3f} |")
    return rows


UNETS = "U-Nets"


def _time_table(seconds: dict[str, list], models: list[str]) -> tuple[list[str], dict]:
    """How long the CV trained, per fold: the U-Nets, each arm's classifiers, and a recipe's
    whole CV (the U-Nets plus one arm's classifiers), from each run's own record of its
    training seconds (``train_seconds``: every epoch of every session it ran in). A run made
    before busi recorded it shows n/a and leaves the totals out."""
    def minutes(values: list) -> str:
        return "n/a" if any(v is None for v in values) else f"{sum(values) / 60:.0f} min"

    rows = ["## Training time", "",
            "Minutes of `model.fit` (every epoch of every session; each run's `train_seconds`"
            "), on the machine each run ran on (its `state.json` names it). Loading, mask "
            "prediction, evaluation and reports come on top. A recipe's whole CV is its "
            "U-Nets plus its arm's classifiers.", "",
            "| | " + " | ".join(f"fold {k}" for k in range(len(seconds[UNETS])))
            + " | all folds | with the U-Nets |",
            "|---|" + "---:|" * (len(seconds[UNETS]) + 2)]
    for name in [UNETS, *models]:
        per_fold = " | ".join(minutes([v]) for v in seconds[name])
        whole = ("" if name == UNETS
                 else minutes(seconds[UNETS] + seconds[name]))
        rows.append(f"| {name} | {per_fold} | {minutes(seconds[name])} | {whole} |")
    return rows + [""], seconds


def aggregate(cv_dir: str | Path) -> dict:
    """Per-fold table, mean ± std over folds, and the pooled out-of-fold report per model.

    Recomputed from the folds' own files every time, so the tables always describe the
    predictions the folds hold now (a resumed or repaired fold updates them). Each fold is
    its U-Net (:func:`busi.runs.cv_fold_unet`) and, for each arm, the classifier run trained
    on that U-Net's masks: a run trained on another U-Net is never mixed in, and a fold
    without one is refused (``busi cv --resume`` trains it), never filled from another.
    """
    cv_dir = Path(cv_dir)
    meta = read_json(cv_dir / "cv.json")
    folds, models = meta["folds"], meta["models"]
    seg_rows, cls_rows = [], {m: [] for m in models}
    pooled: dict[str, list[tuple]] = {m: [] for m in models}  # per fold: predictions.csv
    groups: dict[str, list[np.ndarray | None]] = {m: [] for m in models}  # per fold
    per_image: dict[str, list] = {m: [] for m in models}  # per fold: per_image.csv rows
    decisions: dict[str, list] = {m: [] for m in models}  # per fold: _fold_decisions
    seconds: dict[str, list] = {UNETS: [], **{m: [] for m in models}}  # per fold: train time
    for k in range(folds):
        seg, done = cv_fold_unet(cv_dir, k, meta)
        if not done:
            raise BusiError(f"fold {k} has no finished U-Net run", where=str(cv_dir),
                            fix=f"continue the CV: busi cv --resume {cv_dir}")
        s = read_json(seg / "metrics.json")
        seconds[UNETS].append(s.get("train_seconds"))
        le = s["lesion_images"]
        # Strict JSON holds null where a figure is undefined (no lesion detected, no normal
        # scan): NaN again here, which the means and tables print as nan.
        seg_rows.append({"fold": k, "run": str(seg), "dice": _num(le["dice"]["mean"]),
                         "iou": _num(le["iou"]["mean"]), "hd95": _num(le["hd95"]["mean"]),
                         "missed": le["hd95_undefined"],
                         "hd95_all": _num(le.get("hd95_all", {}).get("mean")),
                         "normal_empty": _num(
                             s["lesion_free_images"]["fraction_predicted_empty"]),
                         "n": s["n_test"]})
        for m in models:
            run, done, others = cv_fold_classifier(cv_dir, k, m, seg)
            if not done:
                left = (f"; {others} {m} run(s) there did not learn from it and are left out"
                        if others else "")
                raise BusiError(f"fold {k} has no finished {m} run on the fold's U-Net "
                                f"{seg.relative_to(cv_dir)}{left}", where=str(cv_dir),
                                fix=f"continue the CV, which trains it: busi cv --resume "
                                    f"{cv_dir}")
            # From the fold's predictions.csv, as the pooled report: these tables are derived
            # files and follow the predictions, whatever report the run wrote when it finished.
            fold_pred = read_predictions(run / PREDICTIONS)
            groups[m].append(split_groups(run, fold_pred[0]))
            r = compute(*fold_pred, groups=groups[m][-1])
            cls_rows[m].append({"fold": k, "run": str(run), "n": r["n"],
                                "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                                "roc_auc_macro": r["roc_auc_macro"],
                                "recall": {c: r["report"][c]["recall"] for c in r["present"]}})
            pooled[m].append(fold_pred)
            seconds[m].append(saved_state(run).get("train_seconds"))
            per_image[m].append(read_per_image(run / PER_IMAGE))
            decisions[m].append(_fold_decisions(run, fold_pred))
    result: dict = {"folds": folds, "models": models, "segmentation": {
        "per_fold": seg_rows,
        **{key: _mean_std([row[key] for row in seg_rows])
           for key in ("dice", "iou", "hd95_all", "hd95", "missed", "normal_empty")}}}
    lines = [f"# {folds}-fold cross-validation", "",
             f"Run: {cv_dir}. Every image is in exactly one test fold; a fold's U-Net and "
             "classifiers never saw its test images, and each classifier of a fold learnt "
             "from that fold's U-Net (`unets` in cv.json). Mean ± std over folds (sample std); "
             "pooled = one report over all out-of-fold predictions.", "",
             "## Segmentation (U-Net), test fold of each split", "",
             "HD95 in pixels of the model's input grid; \"misses counted\" scores a missed "
             "lesion (empty prediction) at the image diagonal, \"detected\" leaves it out.", "",
             "| fold | n | Dice (lesion images) | IoU | HD95, misses counted (px) | "
             "HD95, detected (px) | missed lesions | normal predicted empty |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in seg_rows:
        lines.append(f"| {row['fold']} | {row['n']} | {row['dice']:.3f} | {row['iou']:.3f} | "
                     f"{row['hd95_all']:.1f} | {row['hd95']:.1f} | {row['missed']} | "
                     f"{row['normal_empty']:.2f} |")
    sg = result["segmentation"]

    def px(stat: dict) -> str:
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}"

    lines += [f"| mean ± std | | {fmt_stat(sg['dice'])} | {fmt_stat(sg['iou'])} | "
              f"{px(sg['hd95_all'])} | {px(sg['hd95'])} | {px(sg['missed'])} | "
              f"{fmt_stat(sg['normal_empty'])} |", ""]
    # The pooled recall of every class beside the headline figures: a missed cancer is the
    # expensive error, and accuracy alone hides which class pays for it.
    classes_all = class_order(next((pooled[m][0][4] for m in models if pooled[m]), []))
    summary = ["| arm | accuracy (mean ± std) | macro-F1 (mean ± std) | pooled accuracy "
               "(95% CI) | pooled macro-F1 (95% CI) | pooled ROC AUC | "
               + " | ".join(f"recall {c}" for c in classes_all) + " |",
               "|---|---:|---:|---:|---:|---:|" + "---:|" * len(classes_all)]
    methods: list[tuple[str, str]] = []
    lead: list[str] = []  # the clinician's summary of each arm, placed first
    validation = ["## Validation figures, to choose an arm by", "", VALIDATION_NOTE, "",
                  "| arm | validation images | accuracy | macro-F1 | benign vs malignant AUC "
                  "| normal vs lesion AUC | lowest validation loss (mean) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
    result["validation"] = {}
    result["classification"] = {}
    detail = []
    for m in models:
        files = [f for fold in pooled[m] for f in fold[0]]
        t = [c for fold in pooled[m] for c in fold[1]]
        p = [c for fold in pooled[m] for c in fold[2]]
        probs = np.concatenate([fold[3] for fold in pooled[m]])
        classes = pooled[m][0][4]
        pdir = cv_dir / "pooled" / m
        write_predictions(pdir / PREDICTIONS, files,
                          np.array([classes.index(c) for c in t]), probs, classes)
        # Each fold has its own models: the intervals resample folds, then duplicate groups
        # (images where a fold's manifest is gone) within each drawn fold.
        fold_of = np.concatenate([np.full(len(fold[0]), k) for k, fold in enumerate(pooled[m])])
        group_of = (np.concatenate(groups[m]) if all(g is not None for g in groups[m])
                    else None)
        r = compute(files, t, p, probs, classes, groups=group_of, folds=fold_of)
        rows_all = ([row for fold in per_image[m] for row in fold]
                    if all(per_image[m]) else None)
        r["unet_missed"] = missed_lesions(rows_all)
        presence_rows = []
        if all(d is not None for d in decisions[m]):
            ops = [d["own_op"] for d in decisions[m]]
            words = (f"each fold's thresholds chosen on its own validation images ("
                     f"presence: {ops[0].presence}, target malignant sensitivity "
                     f"{ops[0].malignant_sensitivity:g}; malignant thresholds "
                     + ", ".join(f"{o.malignant_threshold:.3f}" for o in ops) + ")")
            r["clinical"] = clinical_figures(t, [c for d in decisions[m] for c in d["own"]],
                                             words, groups=group_of, folds=fold_of)
            presence_rows = _presence_rows(decisions[m], t)
            row, result["validation"][m] = _validation_row(m, decisions[m])
            validation.append(row)
        if rows_all:  # the folds' per-image tables, pooled like their predictions
            write_per_image_rows(pdir / PER_IMAGE, rows_all)
        # One operating point and one resampling for all arms (same folds): said once, below.
        lead.append(summary_markdown(r, notes=False).replace(
            "**Summary**", f"**{m}, pooled out-of-fold**"))
        methods.append((m, r["ci95_method"]))
        title = f"{m}: pooled out-of-fold predictions, {folds} folds"
        r["title"], r["text"] = title, f"{title}\n{r['report_text']}"
        # Derived from the folds' predictions: rewritten (file by file, atomically) on every
        # aggregate, so they can never describe predictions that have since changed.
        write_run_reports(pdir, r, title)
        rows = cls_rows[m]
        agg = {key: _mean_std([row[key] for row in rows]) for key in ("accuracy", "macro_f1")}
        result["classification"][m] = {"per_fold": rows, **agg, "pooled": {
            "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ci95": r["ci95"],
            "ci95_method": r["ci95_method"],
            "roc_auc_macro": r["roc_auc_macro"], "confusion_matrix": r["confusion_matrix"],
            "labels": r["labels"], "report": r["report"],
            "sensitivity_specificity": r["sensitivity_specificity"],
            "benign_malignant_auc": r["benign_malignant_auc"], "unet_missed": r["unet_missed"],
            "clinical": {k: v for k, v in (r.get("clinical") or {}).items()}}}
        ci, ca = r["ci95"]["macro_f1"], r["ci95"]["accuracy"]
        auc = "n/a" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.3f}"
        summary.append(f"| {m} | {fmt_stat(agg['accuracy'])} | {fmt_stat(agg['macro_f1'])} | "
                       f"{r['accuracy']:.3f} ({ca[0]:.3f}-{ca[1]:.3f}) | "
                       f"{r['macro_f1']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {auc} | "
                       + " | ".join(f"{r['report'][c]['recall']:.2f}" if c in r["report"]
                                    else "n/a" for c in classes_all) + " |")
        labels = r["labels"]
        detail += [f"### {m}, per fold", "",
                   "| fold | n | accuracy | macro-F1 | " + " | ".join(f"recall {c}"
                                                                   for c in labels) + " |",
                   "|---:|---:|---:|---:|" + "---:|" * len(labels)]
        for row in rows:
            detail.append(f"| {row['fold']} | {row['n']} | {row['accuracy']:.3f} | "
                          f"{row['macro_f1']:.3f} | "
                          + " | ".join(f"{row['recall'].get(c, float('nan')):.2f}"
                                       for c in labels) + " |")
        detail += ["", markdown_table(r, f"{m}: pooled out-of-fold report", summary=False), ""]
        if presence_rows:
            detail += [f"### {m}: lesion presence, each score", "", PRESENCE_NOTE, "",
                       "| presence score | validation AUC, normal vs lesion | normal scans "
                       "called lesion-free (test) | lesion scans called normal (test) | "
                       "3-class accuracy at the point (test) |", "|---|---:|---:|---:|---:|",
                       *presence_rows, ""]
            result["classification"][m]["presence"] = presence_rows
    result["arms"] = cv_arms(meta)
    legend = [f"- `{m}`: " + " ".join(f"`{o}`" for o in result["arms"][m]) for m in models]
    # The arms share folds and groups, so their interval methods read the same: said once.
    said = ("every arm: " + methods[0][1] if len({t for _, t in methods}) == 1
            else "; ".join(f"{m}: {t}" for m, t in methods)) if methods else ""
    if lead:
        lead += [f"Operating point: {OPERATING_POINT}. Pooled 95% intervals ({said}).", ""]
    if models:
        lines += ["## Classification", "", "Arms (overrides of the CV's config.yaml):", "",
                  *legend, "", *summary, "", f"Pooled 95% intervals ({said}).", "", *detail]
    else:
        lines += ["No classifier in this CV (`--models none`): segmentation only."]
    if lead:  # the clinician's figures first, before the segmentation and per-fold tables
        at = lines.index("## Segmentation (U-Net), test fold of each split")
        lines[at:at] = ["## Summary", "", *lead]
    if result["validation"]:  # what an arm is chosen by comes before what it is read by
        at = lines.index("## Summary") if lead else len(lines)
        lines[at:at] = [*validation, ""]
    time_lines, result["train_seconds"] = _time_table(seconds, models)
    lines += time_lines
    text = "\n".join(lines) + "\n"
    atomic_write(cv_dir / "cv_results.md", text)
    write_json(cv_dir / "cv_results.json", result)
    result["text"] = text
    return result
