"""``busi cv``: the whole pipeline once per fold of a stratified, duplicate-grouped k-fold split.

A 78-image test set moves 1.3 points of accuracy per image, so one split cannot
separate the paper's models; k folds give every image one out-of-fold
prediction. Layout of a CV run::

    outputs/cv/<run>/config.yaml, command.txt      what ran, and how to rerun it
    outputs/cv/<run>/fold<k>/seg/<run>/             that fold's U-Net run
    outputs/cv/<run>/fold<k>/cls/<model>/<run>/     that fold's classifier runs
    outputs/cv/<run>/pooled/<model>/                pooled out-of-fold report per model
    outputs/cv/<run>/cv_results.md, .json           per-fold and aggregated tables

Each fold's runs are ordinary runs (checkpoints, resume, reports), so a killed
CV resumes where it stopped: finished runs are kept, the interrupted one is
continued with its own ``--resume``, and later folds start afresh.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from busi.config import Config, dump_yaml, load_config, with_overrides
from busi.errors import BusiError
from busi.runs import atomic_write, is_finished, list_runs, new_run_dir, write_json

CV_DIR = "cv"
MODELS = ("cnn", "vgg19", "mobilenet")


def _run_in(parent: Path) -> tuple[Path | None, bool]:
    """The run under ``parent`` (newest), and whether it finished."""
    runs = list_runs(parent)
    if not runs:
        return None, False
    return runs[-1], is_finished(runs[-1])


def _fold_config(cfg: Config, fold_dir: Path, model: str | None = None) -> Config:
    overrides = [f"outputs.root={fold_dir}", "outputs.run_name="]
    if model:
        overrides.append(f"model.classifier.name={model}")
    return with_overrides(cfg, overrides)


def cv_config(cfg: Config, folds: int) -> Config:
    """The config with a stratified k-fold split (duplicate groups kept together)."""
    return with_overrides(cfg, ["split.scheme=kfold", f"split.folds={folds}",
                                "split.stratify=true"])


def run_cv(cfg: Config, *, folds: int = 5, models: tuple[str, ...] = ("cnn",),
           resume: str | None = None, config_source: str | None = None) -> Path:
    """Train and evaluate U-Net + classifiers on every fold; write the aggregated tables."""
    from busi.train import train_classifier, train_segmentation

    if resume:
        cv_dir = Path(resume)
        if not (cv_dir / "config.yaml").is_file() or not (cv_dir / "cv.json").is_file():
            raise BusiError("not a CV run folder (no config.yaml / cv.json)", where=str(cv_dir),
                            fix="pass a folder under outputs/cv/")
        meta = json.loads((cv_dir / "cv.json").read_text())
        cfg, folds, models = load_config(cv_dir / "config.yaml"), meta["folds"], \
            tuple(meta["models"])
    else:
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            raise BusiError(f"unknown model(s) {', '.join(unknown)}", where="--models",
                            fix=f"choose from {', '.join(MODELS)}")
        cfg = cv_config(cfg, folds)
        cv_dir = new_run_dir(Path(cfg.outputs.root) / CV_DIR, cfg.outputs.run_name)
        atomic_write(cv_dir / "config.yaml", dump_yaml(cfg))
        write_json(cv_dir / "cv.json", {"folds": folds, "models": list(models)})
        argv = " ".join(shlex.quote(a) for a in ["busi", *sys.argv[1:]])
        atomic_write(cv_dir / "command.txt",
                     f"{argv}\n# rerun exactly: busi rerun {cv_dir}\n"
                     f"# continue if interrupted: busi cv --resume {cv_dir}\n")
    t0 = time.perf_counter()
    for k in range(folds):
        fold_dir = cv_dir / f"fold{k}"
        seg, done = _run_in(fold_dir / "seg")
        if not done:
            print(f"busi cv: fold {k + 1}/{folds}: U-Net"
                  + (f" (continuing {seg})" if seg else ""))
            seg = train_segmentation(_fold_config(cfg, fold_dir), fold=k,
                                     resume=str(seg) if seg else None)
        for m in models:
            run, done = _run_in(fold_dir / "cls" / m)
            if done:
                continue
            print(f"busi cv: fold {k + 1}/{folds}: {m}" + (f" (continuing {run})" if run else ""))
            train_classifier(_fold_config(cfg, fold_dir, m), seg_run=str(seg),
                             resume=str(run) if run else None)
    result = aggregate(cv_dir)
    wall = time.perf_counter() - t0
    print(result["text"])
    print(f"busi cv: finished in {wall / 60:.1f} min (this invocation); tables: "
          f"{cv_dir / 'cv_results.md'}")
    from busi.run_report import report_after_run

    report_after_run(cv_dir)
    return cv_dir


def _mean_std(values: list[float]) -> dict[str, float]:
    a = np.array(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(a)}


def aggregate(cv_dir: str | Path) -> dict:
    """Per-fold table, mean ± std over folds, and the pooled out-of-fold report per model."""
    from busi.evaluate import (
        _markdown_table,
        _write_run_reports,
        compute,
        read_predictions,
        split_groups,
        write_predictions,
    )
    from busi.report import _fmt

    cv_dir = Path(cv_dir)
    meta = json.loads((cv_dir / "cv.json").read_text())
    folds, models = meta["folds"], meta["models"]
    seg_rows, cls_rows = [], {m: [] for m in models}
    pooled: dict[str, list[tuple]] = {m: [] for m in models}  # per fold: predictions.csv
    groups: dict[str, list[np.ndarray | None]] = {m: [] for m in models}  # per fold
    for k in range(folds):
        seg, done = _run_in(cv_dir / f"fold{k}" / "seg")
        if not done:
            raise BusiError(f"fold {k} has no finished U-Net run", where=str(cv_dir),
                            fix=f"continue the CV: busi cv --resume {cv_dir}")
        s = json.loads((seg / "metrics.json").read_text())
        le = s["lesion_images"]
        seg_rows.append({"fold": k, "run": str(seg), "dice": le["dice"]["mean"],
                         "iou": le["iou"]["mean"], "hd95": le["hd95"]["mean"],
                         "missed": le["hd95_undefined"],
                         "hd95_all": le.get("hd95_all", {}).get("mean", float("nan")),
                         "normal_empty": s["lesion_free_images"]["fraction_predicted_empty"],
                         "n": s["n_test"]})
        for m in models:
            run, done = _run_in(cv_dir / f"fold{k}" / "cls" / m)
            if not done:
                raise BusiError(f"fold {k} has no finished {m} run", where=str(cv_dir),
                                fix=f"continue the CV: busi cv --resume {cv_dir}")
            # From the fold's predictions.csv, as the pooled report: these tables are derived
            # files and follow the predictions, whatever report the run wrote when it finished.
            fold_pred = read_predictions(run / "predictions.csv")
            groups[m].append(split_groups(run, fold_pred[0]))
            r = compute(*fold_pred, groups=groups[m][-1])
            cls_rows[m].append({"fold": k, "run": str(run), "n": r["n"],
                                "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                                "roc_auc_macro": r["roc_auc_macro"],
                                "recall": {c: r["report"][c]["recall"] for c in r["present"]}})
            pooled[m].append(fold_pred)
    result: dict = {"folds": folds, "models": models, "segmentation": {
        "per_fold": seg_rows,
        **{key: _mean_std([row[key] for row in seg_rows])
           for key in ("dice", "iou", "hd95_all", "hd95", "missed", "normal_empty")}}}
    lines = [f"# {folds}-fold cross-validation", "",
             f"Run: {cv_dir}. Every image is in exactly one test fold; a fold's U-Net and "
             "classifiers never saw its test images. Mean ± std over folds (sample std); "
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

    lines += [f"| mean ± std | | {_fmt(sg['dice'])} | {_fmt(sg['iou'])} | "
              f"{px(sg['hd95_all'])} | {px(sg['hd95'])} | {px(sg['missed'])} | "
              f"{_fmt(sg['normal_empty'])} |", ""]
    summary = ["| model | accuracy (mean ± std) | macro-F1 (mean ± std) | pooled accuracy "
               "(95% CI) | pooled macro-F1 (95% CI) | pooled ROC AUC |",
               "|---|---:|---:|---:|---:|---:|"]
    methods = []
    result["classification"] = {}
    detail = []
    for m in models:
        files = [f for fold in pooled[m] for f in fold[0]]
        t = [c for fold in pooled[m] for c in fold[1]]
        p = [c for fold in pooled[m] for c in fold[2]]
        probs = np.concatenate([fold[3] for fold in pooled[m]])
        classes = pooled[m][0][4]
        pdir = cv_dir / "pooled" / m
        write_predictions(pdir / "predictions.csv", files,
                          np.array([classes.index(c) for c in t]), probs, classes)
        # Each fold has its own models: the intervals resample folds, then duplicate groups
        # (images where a fold's manifest is gone) within each drawn fold.
        fold_of = np.concatenate([np.full(len(fold[0]), k) for k, fold in enumerate(pooled[m])])
        group_of = (np.concatenate(groups[m]) if all(g is not None for g in groups[m])
                    else None)
        r = compute(files, t, p, probs, classes, groups=group_of, folds=fold_of)
        methods.append(f"{m}: {r['ci95_method']}")
        title = f"{m}: pooled out-of-fold predictions, {folds} folds"
        r["title"], r["text"] = title, f"{title}\n{r['report_text']}"
        # Derived from the folds' predictions: rewritten (file by file, atomically) on every
        # aggregate, so they can never describe predictions that have since changed.
        _write_run_reports(pdir, r, title)
        rows = cls_rows[m]
        agg = {key: _mean_std([row[key] for row in rows]) for key in ("accuracy", "macro_f1")}
        result["classification"][m] = {"per_fold": rows, **agg, "pooled": {
            "accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ci95": r["ci95"],
            "ci95_method": r["ci95_method"],
            "roc_auc_macro": r["roc_auc_macro"], "confusion_matrix": r["confusion_matrix"],
            "labels": r["labels"], "report": r["report"]}}
        ci, ca = r["ci95"]["macro_f1"], r["ci95"]["accuracy"]
        auc = "n/a" if r["roc_auc_macro"] is None else f"{r['roc_auc_macro']:.3f}"
        summary.append(f"| {m} | {_fmt(agg['accuracy'])} | {_fmt(agg['macro_f1'])} | "
                       f"{r['accuracy']:.3f} ({ca[0]:.3f}-{ca[1]:.3f}) | "
                       f"{r['macro_f1']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) | {auc} |")
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
        detail += ["", _markdown_table(r, f"{m}: pooled out-of-fold report"), ""]
    lines += ["## Classification", "", *summary, "",
              "Pooled 95% intervals: " + "; ".join(methods) + ".", "", *detail]
    text = "\n".join(lines) + "\n"
    atomic_write(cv_dir / "cv_results.md", text)
    write_json(cv_dir / "cv_results.json", result)
    result["text"] = text
    return result
