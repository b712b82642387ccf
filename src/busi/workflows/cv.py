"""``busi cv``: the whole pipeline trained and scored on every fold of a k-fold split.

Layout of a CV run (``run_cv``)::

    outputs/cv/<run>/config.yaml, command.txt      what ran, and how to rerun it
    outputs/cv/<run>/cv.json                        folds, arms, each fold's U-Net (unets)
    outputs/cv/<run>/fold<k>/seg/<run>/             that fold's U-Net run
    outputs/cv/<run>/fold<k>/cls/<arm>/<run>/       that fold's classifier runs
    outputs/cv/<run>/pooled/<arm>/                  pooled out-of-fold report per arm
    outputs/cv/<run>/cv_results.md, .json           per-fold and aggregated tables

An *arm* is one classifier setting compared on the folds: a bare model name (``cnn``:
the config's classifier with ``model.classifier.name=cnn``) or a named set of classifier
overrides (``--arm 'mnet_channel: model.classifier.name=mobilenet
model.classifier.mask_mode=channel'``). ``cv.json`` records the arms' names (``models``)
and overrides (``arms``), so ``--resume`` and ``busi rerun`` train exactly the same arms.

Each fold's runs are ordinary runs (checkpoints, resume, reports), so a killed
CV resumes where it stopped: finished runs are kept, the interrupted one is
continued with its own ``--resume``, and later folds start afresh. A fold's classifiers
are the runs trained on its U-Net (the one cv.json records): the tables never pair a
classifier with another U-Net, and ``busi rerun`` of a fold's run writes outside the CV.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from busi.config import Config, with_overrides
from busi.errors import BusiError
from busi.runs import (
    CONFIG,
    CV_DIR,
    CV_UNETS,
    SPLIT,
    check_kind,
    cv_arms,
    cv_fold_classifier,
    cv_fold_unet,
    new_run_dir,
    read_config,
    read_json,
    write_command,
    write_config,
    write_json,
)

MODELS = ("cnn", "vgg19", "mobilenet", "efficientnet_lite0")


# What an arm may change: the classifier and its training. The folds, the data and the
# U-Nets are shared by every arm (a fair comparison), so their keys are refused.
ARM_KEYS = ("model.classifier.", "training.cls.", "augmentation.")


def _fold_config(cfg: Config, fold_dir: Path, arm: list[str] | None = None) -> Config:
    """A fold's config: its runs go under ``fold_dir``. The folder is set as a value, not as
    ``--set`` text, so a CV root such as ``my runs #2`` is not cut at YAML's comment."""
    return with_overrides(cfg, [("outputs.root", str(fold_dir)), ("outputs.run_name", ""),
                                *(arm or [])])


def _record_unet(cv_dir: Path, k: int, seg: Path) -> None:
    """Record fold ``k``'s U-Net in cv.json (:data:`busi.runs.CV_UNETS`, relative to the CV
    folder) once the CV has it, so every later resume, arm and table uses that one."""
    meta = read_json(cv_dir / "cv.json")
    unets = dict(meta.get(CV_UNETS) or {})
    rel = Path(seg).resolve().relative_to(cv_dir.resolve()).as_posix()
    if unets.get(f"fold{k}") != rel:
        write_json(cv_dir / "cv.json", {**meta, CV_UNETS: {**unets, f"fold{k}": rel}})


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``'NAME: KEY=VALUE KEY=VALUE'`` (``--arm``) as (name, overrides); a bare model name
    (``cnn``) is the arm that only sets ``model.classifier.name``."""
    import re
    import shlex

    name, sep, rest = text.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise BusiError(f"arm name {name!r} is not a plain name", where=f"--arm {text}",
                        fix="write --arm 'NAME: KEY=VALUE ...' with NAME made of letters, "
                            "digits, '_', '-' or '.' (it names the arm's folders)")
    if not sep:
        if name not in MODELS:
            raise BusiError(f"unknown model {name!r}", where="--models",
                            fix=f"choose from {', '.join(MODELS)}, or name an arm with its "
                                "overrides: --arm 'NAME: model.classifier.name=... ...'")
        return name, [f"model.classifier.name={name}"]
    overrides = shlex.split(rest)
    if not overrides:
        raise BusiError(f"arm {name!r} sets nothing", where=f"--arm {text}",
                        fix="give KEY=VALUE overrides after the colon, e.g. "
                            "--arm 'mnet: model.classifier.name=mobilenet'")
    for o in overrides:
        key = o.partition("=")[0].strip()
        if "=" not in o or not key.startswith(ARM_KEYS):
            raise BusiError(f"an arm can only set the classifier: {o!r}", where=f"--arm {text}",
                            fix="use KEY=VALUE with KEY under " + ", ".join(
                                k.rstrip(".") for k in ARM_KEYS)
                                + " (folds, data and U-Nets are shared by every arm)")
    return name, overrides


def _check_arms(cfg: Config, arms: dict[str, list[str]]) -> None:
    """Every arm's overrides applied to the CV's config, before any training starts, so a
    wrong key or value is refused (exit 2) rather than found hours later at that arm."""
    for name, overrides in arms.items():
        try:
            with_overrides(cfg, overrides)
        except BusiError as exc:
            raise BusiError(f"arm {name!r}: {exc.problem}", where=exc.where,
                            fix=exc.fix) from None


def cv_config(cfg: Config, folds: int) -> Config:
    """The config with a stratified k-fold split (duplicate groups kept together)."""
    return with_overrides(cfg, ["split.scheme=kfold", f"split.folds={folds}",
                                "split.stratify=true"])


def run_cv(cfg: Config, *, folds: int | None = None, models: tuple[str, ...] = ("cnn",),
           resume: str | None = None, config_source: str | None = None,
           arms: dict[str, list[str]] | None = None) -> Path:
    """Train and evaluate U-Net + classifier arms on every fold; write the aggregated tables.

    ``models``: bare model names (arms that only set the classifier's name); ``arms``:
    named arms with their overrides (:func:`parse_arm`); trained in that order. ``folds``:
    5 when None; a resumed CV keeps the folds it has, and refuses another number.
    """
    from busi.evaluation.crossval import aggregate
    from busi.reporting.report import report_after_run
    from busi.training.classification import train_classifier
    from busi.training.segmentation import train_segmentation

    wanted = dict(parse_arm(m) for m in models)
    for name, overrides in (arms or {}).items():
        if name in wanted and wanted[name] != overrides:
            raise BusiError(f"arm {name!r} is named twice", where="--arm",
                            fix="give each arm its own name")
        wanted[name] = list(overrides)
    if resume:
        cv_dir = Path(resume)
        if not (cv_dir / CONFIG).is_file() or not (cv_dir / "cv.json").is_file():
            if (cv_dir / SPLIT).is_file():  # a U-Net or classifier run: say which
                check_kind(cv_dir, CV_DIR, option="--resume")
            raise BusiError("not a CV run folder (no config.yaml / cv.json)", where=str(cv_dir),
                            fix="pass a folder under outputs/cv/")
        meta = json.loads((cv_dir / "cv.json").read_text())
        if folds is not None and folds != meta["folds"]:
            raise BusiError(f"this CV has {meta['folds']} folds; a resumed CV keeps its folds "
                            f"(its U-Nets and tables are per fold), so --folds {folds} cannot "
                            "apply", where="--folds",
                            fix=f"drop --folds to continue {cv_dir}, or start a new CV "
                                f"without --resume for {folds} folds")
        cfg, folds = read_config(cv_dir), meta["folds"]
        known = cv_arms(meta)
        for name, overrides in wanted.items():
            if name in known and known[name] != overrides:
                raise BusiError(f"this CV already has an arm {name!r} with other settings "
                                f"({' '.join(known[name])})", where=str(cv_dir / "cv.json"),
                                fix="give the new arm another name")
        added = {n: o for n, o in wanted.items() if n not in known}
        _check_arms(cfg, added)
        arms = {**known, **added}
        if added:
            # New arms on the same folds and the same U-Nets: a fair comparison for free.
            print(f"busi cv: adding {', '.join(added)} to {cv_dir} (same folds, same U-Nets)")
            write_json(cv_dir / "cv.json", {**meta, "models": list(arms), "arms": arms})
    else:
        folds = 5 if folds is None else folds
        cfg = cv_config(cfg, folds)
        arms = wanted
        _check_arms(cfg, arms)
        from busi.data.augment import require_engine
        from busi.training.loop import load_data

        require_engine(cfg.augmentation)  # an engine this install lacks: also before the folder
        load_data(cfg)  # missing or bad data, an impossible split: refused before the folder
        cv_dir = new_run_dir(Path(cfg.outputs.root) / CV_DIR, cfg.outputs.run_name)
        write_config(cv_dir, cfg)
        write_json(cv_dir / "cv.json", {"folds": folds, "models": list(arms), "arms": arms})
        write_command(cv_dir, resume="cv")
    t0 = time.perf_counter()
    for k in range(folds):
        fold_dir = cv_dir / f"fold{k}"
        # The fold's U-Net is the one cv.json records (a CV from before the record: the one
        # it trained), never merely the newest run in fold<k>/seg/.
        seg, done = cv_fold_unet(cv_dir, k)
        if not done:
            print(f"busi cv: fold {k + 1}/{folds}: U-Net"
                  + (f" (continuing {seg})" if seg else ""))
            seg = train_segmentation(_fold_config(cfg, fold_dir), fold=k,
                                     resume=str(seg) if seg else None)
        _record_unet(cv_dir, k, seg)
        for m, overrides in arms.items():
            # Each arm's run on this U-Net's masks; one trained on another U-Net is left alone.
            run, done, others = cv_fold_classifier(cv_dir, k, m, seg)
            if done:
                continue
            print(f"busi cv: fold {k + 1}/{folds}: {m}" + (f" (continuing {run})" if run else "")
                  + (f" ({others} other {m} run(s) in {fold_dir / 'cls' / m} did not learn "
                     "from this fold's U-Net: left out)" if others and not run else ""))
            train_classifier(_fold_config(cfg, fold_dir, overrides), seg_run=str(seg),
                             resume=str(run) if run else None, name=m)
    result = aggregate(cv_dir)
    wall = time.perf_counter() - t0
    print(result["text"])
    print(f"busi cv: finished in {wall / 60:.1f} min (this invocation); tables: "
          f"{cv_dir / 'cv_results.md'}")
    report_after_run(cv_dir)
    return cv_dir
