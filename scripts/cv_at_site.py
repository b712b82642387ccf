"""Every arm of a cross-validation at another hospital: each fold's model, and the folds' ensemble.

    python scripts/cv_at_site.py outputs/cv/<run> --data ../shared/data/bus-uclm-dev/manifest.csv

For each arm of the CV and each fold, ``busi evaluate --data`` of that fold's classifier with
its own U-Net (trained on BUSI only; the site's images never seen), into
``<outputs>/eval/``; then one table per arm: the fold models' figures (mean and SD over the
folds) and the **fold ensemble** -- the five classifiers' probabilities averaged, each fed by
its own U-Net, with the U-Nets' highest lesion probabilities averaged for the presence
decision and each threshold the mean of the folds' validation-chosen ones -- with 95%
intervals over the site's patients. Whether the ensemble pays is read there: the same scans,
the same patients, one model against five. Nothing is chosen on the site's images.

Writes ``cv_at_<site>.md`` / ``.json`` into the CV folder (a new name if it exists) and prints
the table. ``--presence classifier`` (or another score) chooses each fold's operating point
again with that lesion-presence score, on the fold's own BUSI validation images, as a recipe
that decides presence that way would. ``--arms`` limits the arms; ``--reuse`` takes each
fold's newest finished evaluation of that classifier on that data instead of evaluating again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _evaluations(cv: Path, arm: str, k: int, data: str, outputs: str, reuse: bool,
                 presence: str | None = None) -> Path:
    """The evaluation folder of fold ``k``'s ``arm`` classifier on ``data``: with ``reuse``
    an earlier one that has the U-Net scores ``presence`` reads (one made before the U-Net
    had its presence head does not)."""
    from busi.evaluation.classification import unet_columns
    from busi.models.decision import has_scores
    from busi.runs import PREDICTIONS, cv_fold_classifier, cv_fold_unet, read_json
    from busi.workflows.sites import evaluate_on_data

    seg, done = cv_fold_unet(cv, k)
    run, finished, _ = cv_fold_classifier(cv, k, arm, seg) if done else (None, False, 0)
    if not finished:
        raise SystemExit(f"fold {k} has no finished {arm} run yet: finish the CV first "
                         f"(busi cv --resume {cv})")
    if reuse:
        for ev in sorted((Path(outputs) / "eval").glob("*"), reverse=True):
            f = ev / "evaluation.json"
            if f.is_file():
                j = read_json(f)
                if (j.get("cls_run") == str(run) and j.get("data") == str(data)
                        and has_scores(presence or "argmax", unet_columns(ev / PREDICTIONS))):
                    return ev
    return evaluate_on_data(data, cls_run=str(run), outputs_root=outputs)


def arm_at_site(cv: Path, arm: str, folds: list[int], data: str, outputs: str,
                reuse: bool, presence: str | None = None) -> dict:
    """The fold models' figures and the fold ensemble's, for one arm at one site.

    ``presence``: each fold's operating point chosen again on its own BUSI validation images
    with that lesion-presence score (as ``busi evaluate --data`` would with a run trained
    with it), instead of the one each run chose when it was trained."""
    from busi.data.loading import load_dataset
    from busi.evaluation.classification import (
        at_operating_point,
        compute,
        operating_point,
        unet_columns,
    )
    from busi.models.decision import mean_operating_point
    from busi.runs import PREDICTIONS, read_json, read_predictions
    from busi.workflows.sites import resampling_groups

    per_fold, probs, peaks, ops = [], [], [], []
    files = truth = classes = None
    for k in folds:
        ev = _evaluations(cv, arm, k, data, outputs, reuse, presence)
        rec = read_json(ev / "evaluation.json")
        c = rec["classification"]
        f, t, _, p, cl = read_predictions(ev / PREDICTIONS)
        if files is None:
            files, truth, classes = f, t, cl
        elif f != files:
            raise SystemExit(f"{ev}: the folds' evaluations list other images; rerun without "
                             "--reuse")
        probs.append(p)
        peaks.append(unet_columns(ev / PREDICTIONS))
        ops.append(operating_point(Path(rec["cls_run"]), presence=presence))
        seg = rec.get("segmentation") or {}
        clinical = c.get("clinical") or {}
        if presence is not None and ops[-1] is not None:  # the figures at the new point
            clinical = at_operating_point(ops[-1], t, p, cl, peaks[-1])
        cs = clinical.get("sensitivity_specificity") or {}
        pf = clinical.get("presence") or {}
        per_fold.append({
            "fold": k, "evaluation": str(ev), "accuracy": c["accuracy"],
            "bm_auc": (c.get("benign_malignant_auc") or {}).get("auc"),
            "sensitivity": cs.get("sensitivity"), "specificity": cs.get("specificity"),
            "normal_empty": pf.get("normal_empty_fraction"),
            "lesion_missed": pf.get("lesion_missed_fraction"),
            "dice": ((seg.get("lesion_images") or {}).get("dice") or {}).get("mean")})
    ds = load_dataset(data, cache_dir=None)
    groups, unit, _ = resampling_groups(str(data), ds, 6)
    where = {name: i for i, name in enumerate(ds.files)}
    groups = np.asarray(groups)[[where[f] for f in files]]
    mean_probs = np.mean(probs, axis=0)
    mean_peak = {key: (None if any(p[key] is None for p in peaks)
                       else np.mean([p[key] for p in peaks], axis=0)) for key in ("max", "head")}
    pred = [classes[i] for i in mean_probs.argmax(axis=1)]
    r = compute(files, truth, pred, mean_probs, classes, groups=groups, unit_name=unit)
    ensemble: dict = {"accuracy": r["accuracy"], "ci95": r["ci95"],
                      "benign_malignant_auc": r["benign_malignant_auc"]}
    if all(o is not None for o in ops):
        op = mean_operating_point(ops)
        cl = at_operating_point(op, truth, mean_probs, classes, mean_peak, groups=groups)
        cl.pop("calls")
        ensemble["clinical"] = cl
    return {"arm": arm, "presence": presence, "per_fold": per_fold, "ensemble": ensemble,
            "unit": unit,
            "n_units": int(len(np.unique(groups))), "n_images": len(files)}


def _stat(values: list) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _ci(value: float | None, ci: list | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def table(results: list[dict], site: str) -> str:
    """One Markdown table: per arm, the fold models (mean ± SD) and the fold ensemble."""
    folds = [f["fold"] for f in results[0]["per_fold"]]
    presence = results[0].get("presence")
    lines = [f"# Every arm at {site}", "",
             f"Folds: {', '.join(map(str, folds))}. Lesion presence: "
             + (f"`{presence}`, each fold's threshold chosen again on its BUSI validation "
                "images." if presence else "as each run chose it when trained."), "",
             "Fold models: mean ± SD over the folds' models. Ensemble: the folds' "
             "probabilities averaged; thresholds the mean of the folds' validation-chosen "
             f"ones; 95% intervals over the site's {results[0]['unit']} "
             f"({results[0]['n_units']}; {results[0]['n_images']} images).", "",
             "| arm | model | benign vs malignant AUC | malignant sensitivity at the chosen "
             "point | specificity | normal scans called lesion-free | lesion scans called "
             "normal | 3-class accuracy (argmax) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f = r["per_fold"]
        n = f"{len(f)} fold model" + ("s" if len(f) > 1 else "")
        lines.append(f"| {r['arm']} | {n} | {_stat([x['bm_auc'] for x in f])} | "
                     f"{_stat([x['sensitivity'] for x in f])} | "
                     f"{_stat([x['specificity'] for x in f])} | "
                     f"{_stat([x['normal_empty'] for x in f])} | "
                     f"{_stat([x['lesion_missed'] for x in f])} | "
                     f"{_stat([x['accuracy'] for x in f])} |")
        e = r["ensemble"]
        bm = e["benign_malignant_auc"] or {}
        cl = e.get("clinical") or {}
        cs = cl.get("sensitivity_specificity") or {}
        pf = cl.get("presence") or {}
        sens = _ci(cs.get("sensitivity"), (cs.get("ci95") or {}).get("sensitivity"))
        spec = _ci(cs.get("specificity"), (cs.get("ci95") or {}).get("specificity"))
        lines.append(f"| {r['arm']} | ensemble | {_ci(bm.get('auc'), bm.get('ci95'))} | {sens} | "
                     f"{spec} | {pf.get('normal_called_empty', 'n/a')} of "
                     f"{pf.get('normal_scans', 'n/a')} | {pf.get('lesion_missed', 'n/a')} of "
                     f"{pf.get('lesion_scans', 'n/a')} | "
                     f"{_ci(e['accuracy'], e['ci95']['accuracy'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cv", type=Path, help="a busi cv folder")
    p.add_argument("--data", required=True, help="the site: a BUSI-layout folder or CSV")
    p.add_argument("--arms", help="comma-separated arms (default: every arm of the CV)")
    p.add_argument("--outputs", help="outputs root for the evaluations (default: the one "
                                     "above the CV folder)")
    p.add_argument("--folds", help="comma-separated fold numbers (default: all; a CV still "
                                   "running: the folds it has finished, said in the table)")
    p.add_argument("--presence", choices=["argmax", "classifier", "unet", "both", "head",
                                           "head_classifier"],
                   help="choose each fold's operating point again with this lesion-presence "
                        "score, on its own BUSI validation images (default: each run's own)")
    p.add_argument("--reuse", action="store_true",
                   help="use each fold's newest evaluation of that classifier on that data")
    args = p.parse_args(argv)
    from busi.errors import BusiError
    from busi.runs import atomic_write, read_json, write_json
    from busi.workflows.sites import site_name

    try:
        meta = read_json(args.cv / "cv.json")
        arms = args.arms.split(",") if args.arms else list(meta["models"])
        outputs = args.outputs or str(args.cv.resolve().parents[1])
        folds = ([int(k) for k in args.folds.split(",")] if args.folds
                 else list(range(meta["folds"])))
        results = [arm_at_site(args.cv, a, folds, args.data, outputs, args.reuse,
                               args.presence) for a in arms]
    except BusiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    site = site_name(args.data)
    text = table(results, site)
    print(text)
    stem = "cv_at_" + "".join(ch if ch.isalnum() else "_" for ch in site)
    k, out = 1, args.cv / f"{stem}.md"
    while out.exists():
        k += 1
        out = args.cv / f"{stem}-{k}.md"
    atomic_write(out, text)
    write_json(out.with_suffix(".json"), json.loads(json.dumps(results, default=str)))
    print(f"written: {out}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
