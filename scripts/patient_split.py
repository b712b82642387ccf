"""Split a CSV manifest (image,mask,label,patient) into two halves by patient.

    python scripts/patient_split.py ../shared/data/bus-uclm-dev/manifest.csv --out DIR

For the "trained on BUSI plus part of a second hospital" measurement: ``DIR/train.csv``
goes to training with BUSI (``busi train-seg --data BUSI --data DIR/train.csv``) and
``DIR/test.csv`` is scored with ``busi evaluate --data DIR/test.csv``; no patient is in
both. The halves come from scikit-learn's StratifiedGroupKFold (2 folds, seeded), so
both have benign, malignant and normal scans in about the data's proportions. Image and
mask paths are written absolute, so the CSVs work from any folder; the data is not copied.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True, help="new folder for train.csv, test.csv")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with open(args.manifest, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "patient" not in rows[0]:
        raise SystemExit(f"{args.manifest}: needs a 'patient' column")
    base = args.manifest.resolve().parent
    for r in rows:
        for key in ("image", "mask"):
            r[key] = ";".join(str(base / m) for m in r[key].split(";") if m)
    labels = np.array([r["label"] for r in rows])
    patients = np.array([r["patient"] for r in rows])
    splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=args.seed)
    train, test = next(splitter.split(np.zeros(len(rows)), labels, patients))
    args.out.mkdir(parents=True, exist_ok=False)
    for name, idx in (("train", train), ("test", test)):
        with open(args.out / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[i] for i in idx)
        kinds = {str(c): int((labels[idx] == c).sum()) for c in sorted(set(labels))}
        print(f"{name}: {len(set(patients[idx]))} patients, {len(idx)} images {kinds}: "
              f"{' '.join(sorted(set(patients[idx])))}")


if __name__ == "__main__":
    main()
