"""Split manifests: one train/val/test assignment per (data set, seed, scheme).

A manifest is a CSV (file, class, group, split | fold) written once under
``outputs/splits/`` and read back by every later command, so segmentation and
classification can never be evaluated on different test sets.

Near-duplicate images (the same lesion saved twice; BUSI has ~140 such groups,
some across the benign/malignant folders) are grouped, and a group is never
split between train and test: otherwise a model is tested on images it has,
in effect, already seen. The same holds for a patient's images when the data
says whose they are (a CSV manifest's ``patient`` column): a model tested on a
patient it was trained on has seen that patient's anatomy and scanner.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from busi.config import SplitConfig
from busi.data.loading import Dataset
from busi.errors import BusiError


def duplicate_groups(ds: Dataset, max_distance: int) -> np.ndarray:
    """Group id per image: exact duplicates (same decoded pixels) and pHash neighbours.

    Groups are the connected components of the "is a near-duplicate of" graph,
    so chains (a~b, b~c) end up in one group.
    """
    n = len(ds)
    bits = np.unpackbits(ds.phashes, axis=1).astype(bool)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    same = dist <= max_distance
    by_hash: dict[str, int] = {}
    for i, h in enumerate(ds.pixel_hashes):
        j = by_hash.setdefault(h, i)
        same[i, j] = same[j, i] = True
    _, labels = connected_components(csr_matrix(same), directed=False)
    # Renumber by first appearance so ids do not depend on scipy's internals.
    first: dict[int, int] = {}
    return np.array([first.setdefault(lab, len(first)) for lab in labels[:n]], dtype=np.int64)


def image_groups(ds: Dataset, cfg: SplitConfig) -> np.ndarray:
    """The group id per image that every split keeps on one side: near-duplicates and patients.

    Groups are the connected components of "is a near-duplicate of" (when
    ``cfg.group_duplicates``) together with "is of the same patient" (always,
    where ``ds.patients`` knows the patient), so a patient whose image is a
    near-duplicate of another patient's joins that patient's group. Without
    patient ids this is :func:`duplicate_groups`, unchanged.
    """
    groups = (duplicate_groups(ds, cfg.near_duplicate_distance) if cfg.group_duplicates
              else np.arange(len(ds)))
    if not any(ds.patients):
        return groups
    first_of: dict[tuple[str, object], int] = {}
    rows, cols = [], []
    for i, (g, patient) in enumerate(zip(groups.tolist(), ds.patients, strict=True)):
        for key in [("group", g)] + ([("patient", patient)] if patient else []):
            rows.append(i)
            cols.append(first_of.setdefault(key, i))
    n = len(ds)
    graph = csr_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first: dict[int, int] = {}
    return np.array([first.setdefault(lab, len(first)) for lab in labels], dtype=np.int64)


def _smallest_present(labels: np.ndarray) -> int:
    """Images in the smallest class that has any (absent classes do not count)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return int(counts[counts > 0].min()) if counts.size and counts.any() else 0


def _stratified_take(idx: np.ndarray, g: np.ndarray, y: np.ndarray, n_taken: int,
                     fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, taken): ``n_taken`` images, whole groups, each class close to its share.

    Groups are visited in a seeded random order. The first pass takes a group if
    no class goes over its quota (``fraction`` of its images, rounded up) and the
    total stays within ``n_taken``; a second pass fills what the group sizes left
    open, so the total falls short by less than the largest group.
    """
    ids, inverse = np.unique(g, return_inverse=True)
    classes, y_code = np.unique(y, return_inverse=True)
    counts = np.zeros((len(ids), len(classes)), dtype=np.int64)
    np.add.at(counts, (inverse, y_code), 1)
    cap = np.ceil(fraction * counts.sum(axis=0) - 1e-9)
    chosen = np.zeros(len(ids), dtype=bool)
    per_class, count = np.zeros(len(classes), dtype=np.int64), 0
    order = np.searchsorted(ids, np.random.RandomState(seed).permutation(ids))
    for capped in (True, False):
        for grp in order:
            size = int(counts[grp].sum())
            if chosen[grp] or count + size > n_taken or (
                    capped and np.any(per_class + counts[grp] > cap)):
                continue
            chosen[grp], count, per_class = True, count + size, per_class + counts[grp]
            if count == n_taken:
                break
    mask = chosen[inverse]
    return idx[~mask], idx[mask]


def _is_fold_fraction(fraction: float) -> bool:
    """True for 1/k (0.5, 0.25, 0.2, 0.1, ...): one fold of a k-fold split is that size."""
    return math.isclose(1 / fraction, max(2, round(1 / fraction)), rel_tol=1e-9)


def _take_groups(idx: np.ndarray, groups: np.ndarray, labels: np.ndarray, fraction: float,
                 seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, taken) with ``taken`` ~ fraction of images, whole groups only.

    Without duplicates this is exactly sklearn's ``train_test_split`` (the
    paper's call), so the paper's 702/78 split is reproduced. With groups,
    sklearn's GroupShuffleSplit would size the test set in groups, not images;
    here groups are taken in a seeded random order until the image count of
    ``train_test_split`` is reached, so the counts stay those of the paper.
    Stratified: one fold of a StratifiedGroupKFold when ``1/fraction`` is a fold
    count (0.1, 0.2, 0.25) and that fold has the asked size within one duplicate
    group; otherwise (a 0.3 split would be a third) the groups are picked per class
    quota by :func:`_stratified_take`. Either way the count is ``train_test_split``'s
    within the largest group.
    """
    g = groups[idx]
    if stratify:
        n_taken = len(train_test_split(idx, test_size=fraction, random_state=seed)[1])
        k = max(2, round(1 / fraction))
        if not _is_fold_fraction(fraction):
            return _stratified_take(idx, g, labels[idx], n_taken, fraction, seed)
        if _smallest_present(labels[idx]) < k:
            print(f"busi: warning: a class has fewer than {k} images here, too few to stratify "
                  f"a {fraction:g} split; splitting without stratification (duplicate groups "
                  "still kept together)", file=sys.stderr)
            return _take_groups(idx, groups, labels, fraction, seed, False)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        rest, taken = next(splitter.split(idx, labels[idx], g))
        if abs(len(taken) - n_taken) > np.bincount(np.unique(g, return_inverse=True)[1]).max():
            return _stratified_take(idx, g, labels[idx], n_taken, fraction, seed)
        return idx[np.sort(rest)], idx[np.sort(taken)]
    if len(np.unique(g)) == len(g):
        rest, taken = train_test_split(idx, test_size=fraction, random_state=seed, shuffle=True)
        return np.sort(rest), np.sort(taken)
    n_taken = len(train_test_split(idx, test_size=fraction, random_state=seed)[1])
    order = np.random.RandomState(seed).permutation(np.unique(g))
    chosen: list[int] = []
    count = 0
    for grp in order:
        size = int((g == grp).sum())
        if count + size <= n_taken:
            chosen.append(grp)
            count += size
        if count == n_taken:
            break
    mask = np.isin(g, chosen)
    return idx[~mask], idx[mask]


@dataclass
class Manifest:
    """A split manifest: which image goes where. Rows are in data-set order."""

    path: Path
    files: list[str]
    labels: list[str]                   # class name per row
    groups: np.ndarray
    split: list[str] | None = None      # holdout: "train" | "val" | "test"
    fold: np.ndarray | None = None      # kfold: 0..k-1
    val_size: float = 0.1
    seed: int = 0

    @property
    def scheme(self) -> str:
        return "kfold" if self.fold is not None else "holdout"

    @property
    def n_folds(self) -> int:
        return int(self.fold.max()) + 1 if self.fold is not None else 1

    def partition(self, fold: int | None = None) -> dict[str, list[str]]:
        """File names of train, val and test (for k-fold: test = the given fold)."""
        if self.fold is None:
            return {part: [f for f, s in zip(self.files, self.split, strict=True) if s == part]
                    for part in ("train", "val", "test")}
        if fold is None or not 0 <= fold < self.n_folds:
            raise BusiError(f"this manifest has folds 0..{self.n_folds - 1}, got {fold}",
                            where=str(self.path), fix="pass a fold number in that range")
        test = np.flatnonzero(self.fold == fold)
        rest = np.flatnonzero(self.fold != fold)
        train, val = (_take_groups(rest, self.groups, np.zeros(len(self.files)), self.val_size,
                                   self.seed + fold, False) if self.val_size > 0
                      else (rest, rest[:0]))
        return {"train": [self.files[i] for i in train], "val": [self.files[i] for i in val],
                "test": [self.files[i] for i in test]}


def build_manifest_rows(ds: Dataset, cfg: SplitConfig, seed: int) -> list[dict[str, str]]:
    """The manifest's rows for this data set; a pure function of (data, cfg, seed)."""
    labels = ds.labels
    groups = image_groups(ds, cfg)
    idx = np.arange(len(ds))
    rows = [{"file": f, "class": ds.classes[labels[i]], "group": str(groups[i])}
            for i, f in enumerate(ds.files)]
    if any(ds.patients):  # so that a reader of the manifest sees why images are grouped
        for row, patient in zip(rows, ds.patients, strict=True):
            row["patient"] = patient
    if cfg.scheme == "holdout":
        rest, test = _take_groups(idx, groups, labels, cfg.test_size, seed, cfg.stratify)
        train, val = (_take_groups(rest, groups, labels, cfg.val_size, seed + 1, cfg.stratify)
                      if cfg.val_size > 0 else (rest, rest[:0]))
        for part, members in (("train", train), ("val", val), ("test", test)):
            for i in members:
                rows[i]["split"] = part
    else:
        smallest = _smallest_present(labels)
        if smallest < cfg.folds:
            name = next(c for k, c in enumerate(ds.classes) if (labels == k).sum() == smallest)
            raise BusiError(f"class '{name}' has {smallest} images, fewer than the "
                            f"{cfg.folds} folds asked for", where="split.folds",
                            fix=f"set split.folds to at most {max(2, smallest)}, or add images")
        splitter = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
        for k, (_, test) in enumerate(splitter.split(idx, labels, groups)):
            for i in test:
                rows[i]["fold"] = str(k)
    return rows


def manifest_name(ds: Dataset, cfg: SplitConfig, seed: int) -> str:
    """File name that changes whenever the data or any split setting changes."""
    settings = (f"{cfg.scheme}|{cfg.test_size}|{cfg.val_size}|{cfg.folds}|{cfg.stratify}|"
                f"{cfg.group_duplicates}|{cfg.near_duplicate_distance}|{seed}")
    if cfg.stratify and cfg.scheme == "holdout" and not all(
            _is_fold_fraction(f) for f in (cfg.test_size, cfg.val_size) if f > 0):
        # Earlier versions wrote a third for 0.3: such a manifest must not be reused.
        settings += "|quota"
    if any(ds.patients):
        # The same images grouped by other patients is another split (the fingerprint
        # covers the pixels and labels only); without patients, names stay as they were.
        settings += "|patients:" + hashlib.blake2b(
            "\n".join(f"{f}\t{p}" for f, p in zip(ds.files, ds.patients, strict=True)
                      if p).encode(), digest_size=8).hexdigest()
    tag = hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()
    return f"{ds.fingerprint[:12]}-{cfg.scheme}-seed{seed}-{tag}.csv"


def _to_csv(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_manifest(path: str | Path, val_size: float = 0.1, seed: int = 0) -> Manifest:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise BusiError("the split manifest this run used is gone", where=str(path),
                        fix="restore it (manifests live in <outputs>/splits/), or train a new "
                            "run") from None
    except OSError as exc:
        raise BusiError(f"cannot read split manifest: {exc.strerror}", where=str(path),
                        fix="delete it so that a new one is written") from None
    needed = {"file", "class", "group"}
    if not rows or not needed <= set(rows[0]) or not ({"split", "fold"} & set(rows[0])):
        raise BusiError("not a split manifest (needs columns file, class, group, split|fold)",
                        where=str(path), fix="delete it so that a new one is written")
    return Manifest(
        path=path, files=[r["file"] for r in rows], labels=[r["class"] for r in rows],
        groups=np.array([int(r["group"]) for r in rows]),
        split=[r["split"] for r in rows] if "split" in rows[0] else None,
        fold=np.array([int(r["fold"]) for r in rows]) if "fold" in rows[0] else None,
        val_size=val_size, seed=seed)


def get_manifest(ds: Dataset, cfg: SplitConfig, seed: int) -> Manifest:
    """Read this data set's manifest, writing it first if it does not exist yet.

    Written once and never rewritten: a second run with the same settings
    reuses the file, so all commands share one test set.
    """
    path = Path(cfg.manifest_dir) / manifest_name(ds, cfg, seed)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            rows = build_manifest_rows(ds, cfg, seed)
        except ValueError as exc:  # scikit-learn: a part of the split would be empty
            raise BusiError(f"cannot split {len(ds)} images with test_size {cfg.test_size:g} "
                            f"and val_size {cfg.val_size:g}: {exc}".split(" Adjust")[0],
                            where="split.test_size, split.val_size",
                            fix="lower them so that every part keeps images") from None
        tmp.write_text(_to_csv(rows), encoding="utf-8")
        os.replace(tmp, path)
    manifest = read_manifest(path, cfg.val_size, seed)
    if sorted(manifest.files) != sorted(ds.files):
        raise BusiError("the split manifest lists other files than the data folder holds",
                        where=str(path), fix="delete the manifest so that a new one is written")
    return manifest


def summarise(manifest: Manifest, fold: int | None = None) -> str:
    """Counts per class and part, as a small text table."""
    if manifest.fold is not None and fold is None:
        fold = 0
    parts = manifest.partition(fold)
    cls_of = dict(zip(manifest.files, manifest.labels, strict=True))
    names = sorted(set(manifest.labels))
    lines = [f"{'':8}" + "".join(f"{c:>11}" for c in names) + f"{'total':>8}"]
    for part, files in parts.items():
        counts = [sum(cls_of[f] == c for f in files) for c in names]
        lines.append(f"{part:8}" + "".join(f"{n:>11}" for n in counts) + f"{len(files):>8}")
    return "\n".join(lines)
