"""Lesion presence from the U-Net itself: would a head on its encoder beat the classifier's
1 - p(normal)? A probe over a cross-validation's folds, before building one into busi.

    python scripts/presence_probe.py outputs/cv/<run> [--folds 0,1] [--arms mnet_crop]

For each fold, from the fold's own U-Net and classifiers, normal scans against lesion scans:

- ``unet max``: the U-Net's highest stored lesion probability (busi's ``presence: unet``);
- ``prob-map LR``: a logistic regression on six statistics of the U-Net's probability map
  (its maximum, the mean of its top 16 and top 1% pixels, the area above 0.5 and above 0.2,
  the mean);
- ``encoder head LR``: a logistic regression on the global mean and maximum of the U-Net's
  deepest encoder features (the input of its first decoder block): a head on the encoder,
  fitted after the U-Net, which stays as it is;
- each arm's ``1 - p(normal)`` (busi's ``presence: classifier``);
- ``head + <arm>``: the mean of the head's and the arm's log-odds.

The regressions are fitted on the fold's **training** images only (scikit-learn's
LogisticRegressionCV, C by 5-fold CV there, standardised features). Each score's threshold is
chosen on the fold's validation images as busi chooses it (``decision.max_missed_lesions``
of the validation lesion scans may fall below it; the split-conformal rank), then applied to
the fold's test images. The table gives the validation AUC (the only figure to choose by),
the pooled test AUC, and the test normal scans called empty and lesion scans missed, pooled
over the folds. Writes ``presence_probe.md`` / ``.json`` into the CV folder (a new name if
one exists) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def map_statistics(probs: np.ndarray) -> np.ndarray:
    """Six summaries of each probability map (N, H, W) -> (N, 6)."""
    flat = np.sort(probs.reshape(len(probs), -1), axis=1)
    top = max(1, flat.shape[1] // 100)
    return np.stack([flat[:, -1], flat[:, -16:].mean(1), flat[:, -top:].mean(1),
                     (probs > 0.5).mean((1, 2)), (probs > 0.2).mean((1, 2)),
                     probs.mean((1, 2))], axis=1)


def fit_head(features: np.ndarray, is_lesion: np.ndarray, seed: int = 0):
    """busi's own presence head (busi.models.presence.PresenceHead): C by 5-fold CV here."""
    from busi.models.presence import PresenceHead

    return PresenceHead.fit(features, is_lesion, seed)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fold_scores(cv: Path, k: int, arms: list[str]) -> dict:
    """Every score's validation and test values for fold ``k``, and the images' truth."""
    from busi.config import load_config
    from busi.data.loading import dataset_from_config
    from busi.data.split import read_manifest
    from busi.models.presence import pooled_features
    from busi.models.saving import load_model
    from busi.runs import (
        PREDICTIONS,
        cv_fold_classifier,
        cv_fold_unet,
        read_predictions,
        read_split,
    )

    seg, done = cv_fold_unet(cv, k)
    if not done:
        raise SystemExit(f"fold {k}'s U-Net has not finished: busi cv --resume {cv}")
    cfg = load_config(seg / "config.yaml")
    ds = dataset_from_config(cfg)
    split = read_split(seg)
    parts = read_manifest(split["manifest"], cfg.split.val_size,
                          cfg.runtime.seed).partition(split["fold"])
    idx = {p: ds.index(files) for p, files in parts.items()}
    lesion = np.array(ds.classes)[ds.labels] != "normal"
    z = np.load(seg / "masks.npz")
    probs = np.zeros(ds.images.shape, np.float32)
    probs[ds.index(z["files"].tolist())] = z["probs"] / 255.0
    stats = map_statistics(probs)
    feats = pooled_features(load_model(seg / "best.keras"), ds.images)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "unet max": (stats[idx["val"], 0], stats[idx["test"], 0])}
    for name, x in (("prob-map LR", stats), ("encoder head LR", feats)):
        head = fit_head(x[idx["train"]], lesion[idx["train"]], cfg.runtime.seed)
        scores[name] = tuple(head.score(x[idx[p]]) for p in ("val", "test"))
    files = np.array(ds.files)
    for arm in arms:
        run, finished, _ = cv_fold_classifier(cv, k, arm, seg)
        if not finished:
            raise SystemExit(f"fold {k} has no finished {arm} run: busi cv --resume {cv}")
        got = []
        for part, name in (("val", "val_predictions.csv"), ("test", PREDICTIONS)):
            f, _, _, p, classes = read_predictions(run / name)
            by_file = dict(zip(f, 1.0 - p[:, classes.index("normal")], strict=True))
            got.append(np.array([by_file[x] for x in files[idx[part]]]))
        scores[f"{arm} 1-p(normal)"] = tuple(got)
        scores[f"head + {arm}"] = tuple(
            (_logit(scores["encoder head LR"][i]) + _logit(got[i])) / 2 for i in (0, 1))
    return {"scores": scores, "val": lesion[idx["val"]], "test": lesion[idx["test"]]}


def table(folds: list[dict], max_missed: float) -> tuple[list[str], list[dict]]:
    """Markdown rows and JSON records: per score, validation AUC (mean over folds), pooled test
    AUC, and the test figures at each fold's validation-chosen threshold, pooled."""
    from sklearn.metrics import roc_auc_score

    from busi.models.decision import threshold_for_sensitivity

    rows, records = [], []
    for name in folds[0]["scores"]:
        val_auc, test_s, test_y, called = [], [], [], []
        for f in folds:
            sv, st = f["scores"][name]
            # a validation part with scans of one kind only (small data) has no AUC
            val_auc.append(float(roc_auc_score(f["val"], sv)) if len(np.unique(f["val"])) > 1
                           else float("nan"))
            thr = threshold_for_sensitivity(sv, f["val"], 1.0 - max_missed)
            test_s.append(st)
            test_y.append(f["test"])
            called.append(st >= thr)
        y, s, c = np.concatenate(test_y), np.concatenate(test_s), np.concatenate(called)
        rec = {"score": name, "val_auc_per_fold": val_auc,
               "test_auc_pooled": float(roc_auc_score(y, s)),
               "normal_called_empty": int((~c[~y]).sum()), "normal_scans": int((~y).sum()),
               "lesion_missed": int((~c[y]).sum()), "lesion_scans": int(y.sum())}
        records.append(rec)
        empty, missed = (~c[~y]).mean(), (~c[y]).mean()
        ok = [a for a in val_auc if np.isfinite(a)]
        val = (f"{np.mean(ok):.3f} ({min(ok):.3f}-{max(ok):.3f})" if ok else "n/a") + (
            f", {len(ok)} of {len(val_auc)} folds" if len(ok) < len(val_auc) else "")
        rows.append(f"| {name} | {val} "
                    f"| {rec['test_auc_pooled']:.3f} | {rec['normal_called_empty']}/"
                    f"{rec['normal_scans']} ({empty:.2f}) | {rec['lesion_missed']}/"
                    f"{rec['lesion_scans']} ({missed:.3f}) |")
    return rows, records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cv", type=Path, help="a busi cv run folder")
    p.add_argument("--folds", default="", help="comma-separated fold numbers (default: all)")
    p.add_argument("--arms", default="", help="comma-separated arms (default: all)")
    p.add_argument("--max-missed", type=float, default=0.03,
                   help="share of validation lesion scans the threshold may miss (0.03)")
    args = p.parse_args(argv)
    from busi.runs import read_json, write_json

    meta = read_json(args.cv / "cv.json")
    arms = args.arms.split(",") if args.arms else list(meta.get("models") or [])
    ks = ([int(x) for x in args.folds.split(",")] if args.folds
          else list(range(int(meta["folds"]))))
    folds = [fold_scores(args.cv, k, arms) for k in ks]
    rows, records = table(folds, args.max_missed)
    lines = [f"# Lesion presence: scores from the U-Net against the classifiers' ({args.cv.name})",
             "", f"Folds {', '.join(map(str, ks))}; threshold chosen on each fold's validation "
             f"images to miss at most {100 * args.max_missed:g}% of their lesion scans "
             "(split-conformal rank), test figures pooled over the folds. Written by "
             "`python scripts/presence_probe.py "
             + " ".join(sys.argv[1:] if argv is None else argv) + "`.", "",
             "| presence score | validation AUC, mean (range) | test AUC, pooled | "
             "normal scans called empty | lesion scans missed |", "|---|---|---|---|---|", *rows]
    text = "\n".join(lines) + "\n"
    out, i = args.cv / "presence_probe.md", 1
    while out.exists() or out.with_suffix(".json").exists():
        i += 1
        out = args.cv / f"presence_probe-{i}.md"
    write_json(out.with_suffix(".json"), {"folds": ks, "arms": arms, "rows": records})
    out.write_text(text)
    print(text + f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
