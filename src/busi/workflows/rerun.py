"""``busi rerun``: a finished run again, from what its folder recorded."""

from __future__ import annotations

from pathlib import Path

from busi.config import Config, with_overrides
from busi.errors import BusiError
from busi.runs import (
    CLS_DIR,
    CV_DIR,
    SEG_DIR,
    SPLIT,
    cv_arms,
    cv_of,
    read_config,
    read_json,
    read_split,
    run_kind,
)
from busi.workflows.cv import run_cv


def _outside_cv(cfg: Config, run_dir: Path, kind: str) -> Config:
    """The config a rerun trains with: a fold run of a CV (whose outputs.root is its fold
    folder) goes to the outputs root above the CV (``outputs/seg/``, ``outputs/cls/<model>/``;
    beside the CV folder when it is not under a ``cv/`` folder), said on the terminal. A CV's
    folders hold only the runs the CV made, so that a later ``busi cv --resume`` never
    meets a U-Net or a classifier it did not train."""
    cv_dir = cv_of(run_dir)
    if cv_dir is None:
        return cfg
    root = cv_dir.parent.parent if cv_dir.parent.name == CV_DIR else cv_dir.parent
    where = root / (SEG_DIR if kind == "seg" else f"{CLS_DIR}/{cfg.model.classifier.name}")
    print(f"busi rerun: {run_dir} is a fold run of cross-validation {cv_dir}; the rerun "
          f"writes to {where}/, outside the CV (its folders hold only the CV's own runs)")
    return with_overrides(cfg, [("outputs.root", str(root))])


def rerun(run_dir: str | Path) -> Path:
    """``busi rerun RUN_DIR``: the same run again, from what the run folder recorded.

    A run folder holds its resolved config (seed, precision and determinism
    included), the split manifest it used and, for a classifier, the segmentation
    run whose masks it read. A rerun uses exactly those, writes a new run folder
    (never the old one; for a CV's fold run, outside the CV: :func:`_outside_cv`), and
    refuses when the data no longer matches the manifest -- a different data set would
    be a different experiment, not a rerun.
    """
    from busi.data.loading import dataset_from_config
    from busi.data.split import manifest_name

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BusiError("run folder not found", where=str(run_dir),
                        fix="pass a folder under outputs/seg/, outputs/cls/<model>/ or outputs/cv/")
    kind = run_kind(run_dir)
    if kind == "eval":
        raise BusiError("an evaluation folder is not a training run", where=str(run_dir),
                        fix="rerun the runs it evaluated, then busi evaluate them")
    cfg = read_config(run_dir)
    if kind == "cv":
        meta = read_json(run_dir / "cv.json")
        if not (isinstance(meta, dict) and isinstance(meta.get("folds"), int)
                and isinstance(meta.get("models"), list)):
            raise BusiError("cv.json does not record folds and models", where=str(run_dir),
                            fix="restore cv.json, or start a new cross-validation with busi cv")
        print(f"busi rerun: cross-validation {run_dir} ({meta['folds']} folds, "
              f"{', '.join(meta['models'])})")
        return run_cv(cfg, folds=meta["folds"], models=(), arms=cv_arms(meta))
    from busi.training.loop import check_same_data

    split = read_split(run_dir)
    if "manifest" not in split:
        raise BusiError("split.json names no split manifest", where=str(run_dir / SPLIT),
                        fix="restore split.json, or start a new run instead")
    ds = dataset_from_config(cfg)
    expected = Path(split["manifest"]).name
    if "data_fingerprint" in split or split.get("seg_run") is not None:
        # Refused here, before train-* makes a run folder. Old runs without a fingerprint
        # are warned about.
        check_same_data(split, ds, cfg.data.image_size, where=str(run_dir))
    elif manifest_name(ds, cfg.split, cfg.runtime.seed) != expected:
        raise BusiError(f"the data under {cfg.data.root} is not the data this run used "
                        f"(its split manifest was {expected})", where=str(run_dir),
                        fix="restore the original data folder, or start a new run instead")
    print(f"busi rerun: {kind} run {run_dir} (seed {cfg.runtime.seed}, manifest {expected})")
    cfg = _outside_cv(cfg, run_dir, kind)
    if kind == "seg":
        from busi.training.segmentation import train_segmentation

        return train_segmentation(cfg, fold=split.get("fold"))
    from busi.training.classification import train_classifier

    return train_classifier(cfg, seg_run=split["seg_run"])
