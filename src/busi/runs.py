"""Run folders: the one module that knows their layout -- create, find, check, resume, read, write.

A run folder is created with ``exist_ok=False``, so a second run can never
write into the first; every file is written to a temporary name and renamed,
so an interrupted run leaves complete files or none. Trainers, evaluation,
reporting and inference all go through here, so the names of a run's files
(config.yaml, split.json, state.json, predictions.csv, command.txt) live in one place::

    outputs/seg/<run>/            a U-Net run (train-seg)
    outputs/cls/<model>/<run>/    a classifier run (train-cls)
    outputs/cv/<run>/             a cross-validation run (cv)
    outputs/eval/<run>/           an evaluation folder (evaluate)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from busi.errors import BusiError

if TYPE_CHECKING:
    from busi.config import Config

SEG_DIR = "seg"
CLS_DIR = "cls"
CV_DIR = "cv"
EVAL_DIR = "eval"
CONFIG = "config.yaml"
SPLIT = "split.json"
STATE = "state.json"
PREDICTIONS = "predictions.csv"
COMMAND = "command.txt"

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def new_run_dir(parent: str | Path, name: str = "") -> Path:
    """Create ``parent/<timestamp>[-name]`` (with a -2, -3 ... suffix if taken)."""
    if name and not RUN_NAME_RE.match(name):
        raise BusiError(f"run name {name!r} has characters other than letters, digits, "
                        "'.', '_' and '-'", where="outputs.run_name", fix="choose a plain name")
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S") + (f"-{name}" if name else "")
    for k in range(1, 1000):
        path = parent / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise BusiError("could not find a free run folder name", where=str(parent))


def unique_name(base: str, taken: Iterable[str], fold_case: bool = False) -> str:
    """``base``, or ``base-2``, ``base-3`` ... the first not in ``taken``.

    For names of files or folders written side by side in one run folder (a site's,
    a U-Net's, an image's outputs); ``fold_case`` compares them as a case-insensitive
    disk would, where X.png and x.png would overwrite each other.
    """
    key = str.casefold if fold_case else str
    seen = {key(t) for t in taken}
    name, k = base, 2
    while key(name) in seen:
        name, k = f"{base}-{k}", k + 1
    return name


def list_runs(parent: str | Path) -> list[Path]:
    """Run folders under ``parent``, oldest first (names start with a timestamp)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def latest_run(parent: str | Path, *, require: str | None = None,
               finished: bool = False) -> Path | None:
    """Newest run under ``parent`` (optionally: that has the file ``require``; that finished).

    ``finished`` matters wherever "the latest run" is a default: a run still
    training already has a ``best.keras``, and must not be picked up half-way.
    """
    runs = [r for r in list_runs(parent) if (require is None or (r / require).exists())
            and (not finished or is_finished(r))]
    return runs[-1] if runs else None


def newest_run(parent: str | Path) -> tuple[Path | None, bool]:
    """The newest run under ``parent`` and whether it finished: what a resumed CV continues."""
    runs = list_runs(parent)
    if not runs:
        return None, False
    return runs[-1], is_finished(runs[-1])


def is_finished(run_dir: str | Path) -> bool:
    """Whether a training run's ``state.json`` says it finished (unreadable: not finished)."""
    try:
        return bool(json.loads((Path(run_dir) / STATE).read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


# cv.json's record of each fold's U-Net run ({"fold0": "fold0/seg/<run>"}, relative to the
# CV folder, so it survives a moved or copied CV): the U-Net whose masks the fold's
# classifiers are trained and scored on.
CV_UNETS = "unets"


def cv_fold_unet(cv_dir: str | Path, k: int, meta: dict[str, Any] | None = None,
                 ) -> tuple[Path | None, bool]:
    """Fold ``k``'s U-Net run of a CV, and whether it finished.

    The run cv.json records (:data:`CV_UNETS`, written once the CV has it). A CV recorded
    before that: the oldest finished run in ``fold<k>/seg/`` -- the one the CV trained;
    a newer one came from elsewhere (an old ``busi rerun`` wrote there) -- else the
    newest unfinished one (the U-Net the CV was training when it stopped), else none.
    """
    cv_dir = Path(cv_dir)
    meta = read_json(cv_dir / "cv.json") if meta is None else meta
    recorded = (meta.get(CV_UNETS) or {}).get(f"fold{k}")
    if recorded:
        seg = cv_dir / recorded
        if not seg.is_dir():
            raise BusiError(f"fold {k}'s U-Net run {recorded} (recorded in cv.json) is gone",
                            where=str(cv_dir),
                            fix=f"restore {seg} (the fold's classifiers learnt from its "
                                "masks), or start a new CV")
        return seg, is_finished(seg)
    runs = list_runs(cv_dir / f"fold{k}" / SEG_DIR)
    done = [r for r in runs if is_finished(r)]
    if done:
        return done[0], True
    return (runs[-1], False) if runs else (None, False)


def trained_on(cls_run: str | Path, seg: str | Path) -> bool:
    """Whether classifier run ``cls_run`` learnt from U-Net run ``seg`` (``seg_run`` in its
    split.json): the same folder, or -- a CV folder moved or copied -- a U-Net of the same
    name at the same place in a CV (``fold<k>/seg/<run>``). An unreadable record: no."""
    try:
        own = read_split(Path(cls_run)).get("seg_run")
    except (BusiError, AttributeError):
        return False
    if not isinstance(own, str):
        return False
    return same_path(own, seg) or Path(own).parts[-3:] == Path(seg).parts[-3:]


def cv_fold_classifier(cv_dir: str | Path, k: int, arm: str, seg: Path | None,
                       ) -> tuple[Path | None, bool, int]:
    """Arm ``arm``'s classifier run of fold ``k`` trained on the fold's U-Net ``seg``:
    the newest finished one, else the newest unfinished one (what a resumed CV continues),
    else None; whether it finished; and how many of the arm's runs in that fold learnt from
    another U-Net (never mixed into the CV's tables)."""
    runs = list_runs(Path(cv_dir) / f"fold{k}" / CLS_DIR / arm)
    paired = [r for r in runs if seg is not None and trained_on(r, seg)]
    done = [r for r in paired if is_finished(r)]
    run = done[-1] if done else paired[-1] if paired else None
    return run, bool(done), len(runs) - len(paired)


def cv_folds_done(cv_dir: str | Path, meta: dict[str, Any], arms: list[str]) -> int:
    """How many of a CV's folds have a finished U-Net and a finished run of each of ``arms``
    on that U-Net."""
    def fold_done(k: int) -> bool:
        try:
            seg, done = cv_fold_unet(cv_dir, k, meta)
        except BusiError:
            return False
        return done and all(cv_fold_classifier(cv_dir, k, a, seg)[1] for a in arms)

    return sum(fold_done(k) for k in range(int(meta.get("folds", 0))))


def latest_cv(outputs_root: str | Path, *, single_arm: bool = False) -> Path | None:
    """The newest CV under ``<outputs_root>/cv`` whose every fold finished (its U-Net and all
    its arms): a fold ensemble ``busi predict`` can use. ``single_arm``: only a CV of one
    arm (no ``--arm`` needed to say which fold models)."""
    for run in reversed(list_runs(Path(outputs_root) / CV_DIR)):
        meta = _json_or_none(run / "cv.json")
        if not isinstance(meta, dict) or not meta.get("folds") or not meta.get("models"):
            continue
        arms = list(meta["models"])
        if single_arm and len(arms) != 1:
            continue
        if cv_folds_done(run, meta, arms) == meta["folds"]:
            return run
    return None


def cv_of(run_dir: str | Path) -> Path | None:
    """The CV folder a fold run lies in (``<cv>/fold<k>/seg/<run>``,
    ``<cv>/fold<k>/cls/<arm>/<run>``), or None for a run outside any CV."""
    for above in list(Path(run_dir).resolve().parents)[:4]:
        if (above / "cv.json").is_file():
            return above
    return None


def read_json(path: str | Path, *, fix: str = "use a complete run folder, or retrain it") -> Any:
    """A JSON file of a run folder, or a BusiError naming it (missing, unreadable, corrupt)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BusiError("file missing", where=str(path), fix=fix) from None
    except OSError as exc:
        raise BusiError(f"cannot read file: {exc.strerror}", where=str(path), fix=fix) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BusiError(f"not valid JSON ({exc})", where=str(path), fix=fix) from None


# What each kind of run folder is called in messages, and where such folders live.
KINDS = {"seg": ("a segmentation (U-Net) run", "outputs/seg/"),
         "cls": ("a classifier run", "outputs/cls/<model>/"),
         "cv": ("a cross-validation run", "outputs/cv/"),
         "eval": ("an evaluation folder", "outputs/eval/")}
TRAIN_COMMAND = {"seg": "train-seg", "cls": "train-cls", "cv": "cv"}


def run_kind(run_dir: str | Path) -> str:
    """'cv', 'eval', 'cls' or 'seg', from the files a run folder holds."""
    run_dir = Path(run_dir)
    if (run_dir / "cv.json").is_file():
        return "cv"
    if (run_dir / "evaluation.md").is_file():
        return "eval"
    split = run_dir / "split.json"
    if not (run_dir / "config.yaml").is_file() or not split.is_file():
        missing = " and ".join(n for n in ("config.yaml", "split.json")
                               if not (run_dir / n).is_file())
        inside = newest_inside(run_dir) if run_dir.is_dir() else None
        if inside is not None:
            raise BusiError("this is a folder of runs, not a run", where=str(run_dir),
                            fix=f"pass one run folder, e.g. its newest finished run: {inside} "
                                "(busi runs lists them)")
        raise BusiError(f"not a run folder ({missing} missing)", where=str(run_dir),
                        fix="pass a folder under outputs/seg/, outputs/cls/<model>/, outputs/cv/ "
                            "or outputs/eval/")
    record = read_json(split)
    if not isinstance(record, dict):
        raise BusiError("not a run's split record (expected a JSON object)", where=str(split),
                        fix="use a complete run folder, or retrain it")
    return "cls" if "seg_run" in record else "seg"


def newest_inside(folder: str | Path, kind: str | None = None) -> Path | None:
    """The newest finished run of ``kind`` (None: seg or cls) anywhere under ``folder`` (a
    folder of runs, a CV run's folds), for a fix that names a folder the user can paste.
    Four levels deep at most (a CV's fold<k>/cls/<arm>/<run>/): whatever folder a user
    passed by mistake, a hint must not crawl a whole disk."""
    found = []
    splits = [s for depth in range(1, 5) for s in Path(folder).glob("*/" * depth + SPLIT)]
    for split in splits:
        run = split.parent
        try:
            record = read_json(split)
        except BusiError:
            continue
        if (isinstance(record, dict)
                and (kind is None or ("seg_run" in record) == (kind == CLS_DIR))
                and (run / CONFIG).is_file() and is_finished(run)):
            found.append(run)
    return max(found, key=lambda r: (r.name, str(r))) if found else None


def _json_or_none(path: Path) -> Any:
    """A run's JSON file, or None when it is missing or damaged (for hints and listings)."""
    try:
        return read_json(path)
    except BusiError:
        return None


def check_kind(run_dir: str | Path, kind: str, *, option: str) -> None:
    """Nothing if ``run_dir`` is a run of ``kind``; otherwise one BusiError that says what it
    is instead (a classifier run given as a U-Net run, a CV run, an evaluation folder) and
    what to pass -- not a misleading "did it finish?" about a file such a run never has."""
    path = Path(run_dir)
    actual = run_kind(path)
    if actual == kind:
        return
    name, folder = KINDS[kind]
    fix = f"pass {option} a folder under {folder}"
    if actual == CV_DIR and kind in (SEG_DIR, CLS_DIR):
        inside = newest_inside(path, kind)
        if inside is not None:
            fix = (f"pass {option} one of its folds' runs, e.g. {inside}, or a folder "
                   f"under {folder}")
    elif actual == EVAL_DIR and kind == CLS_DIR:
        record = _json_or_none(path / "evaluation.json")
        used = ([r.get("run") for r in record if isinstance(r, dict)]
                if isinstance(record, list) else
                [record.get("cls_run")] if isinstance(record, dict) else [])
        used = [u for u in used if u]
        if used:
            fix = f"pass {option} the classifier run it evaluated, e.g. {used[0]}"
    elif actual in (SEG_DIR, CLS_DIR) and kind == CV_DIR:
        fix = f"busi {kind_command(actual)} --resume {path}, or {fix}"
    raise BusiError(f"this is {KINDS[actual][0]}, not {name}", where=str(path), fix=fix)


def require_run(run_dir: str | Path, kind: str, *, option: str, finished: bool = True,
                needs: tuple[str, ...] = ()) -> Path:
    """The folder a user named (``option``, e.g. '--seg-run') as a run of ``kind``, checked.

    Wrong, incomplete or unfinished folders end in one BusiError that says what
    the folder is instead (a classifier run given as a U-Net run, ...) and what
    to pass, before anything is loaded or written.
    """
    path = Path(run_dir)
    name, folder = KINDS[kind]
    fix = f"pass {option} a folder under {folder}"
    if not path.is_dir():
        raise BusiError(f"{name} folder not found", where=str(path), fix=fix)
    missing = [n for n in ("config.yaml", "split.json") if not (path / n).is_file()]
    if missing and not (path / "cv.json").is_file() and not (path / "evaluation.md").is_file():
        inside = newest_inside(path, kind)
        if inside is not None:  # outputs/seg/, outputs/cls/cnn/, a CV's fold<k>/ ...
            raise BusiError(f"this is a folder of runs, not {name}", where=str(path),
                            fix=f"pass {option} one run folder, e.g. its newest finished "
                                f"{name.split(' ', 1)[1]}: {inside}")
        raise BusiError(f"not {name} ({' and '.join(missing)} missing)", where=str(path), fix=fix)
    check_kind(path, kind, option=option)
    if finished and not is_finished(path):
        raise BusiError(f"{name} that has not finished (state.json does not say finished)",
                        where=str(path),
                        fix=f"finish it with `busi {TRAIN_COMMAND[kind]} --resume {path}`, "
                            f"or {fix}")
    for file in needs:
        if not (path / file).exists():
            raise BusiError(f"incomplete {name.split(' ', 1)[1]}: {file} is missing",
                            where=str(path),
                            fix=f"restore the file, or {fix}")
    return path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def cv_arms(meta: dict[str, Any]) -> dict[str, list[str]]:
    """A CV's arms (``cv.json``), each with its classifier overrides; an arm without recorded
    overrides (a bare model name, or a CV made before arms) only sets the classifier's name."""
    return {m: meta.get("arms", {}).get(m, [f"model.classifier.name={m}"])
            for m in meta["models"]}


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (RFC 8259): an undefined figure (NaN, e.g. the HD95 of a missed lesion)
    is written as null, which every JSON reader accepts -- Python's default ``NaN`` is not
    JSON, and strict parsers (jq, JavaScript, Go) refuse the whole file."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_jsonable,
                      allow_nan=False)
    return atomic_write(path, text + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, numpy included."""
    if hasattr(obj, "tolist") and not isinstance(obj, str):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    """numpy scalars and arrays -> plain Python, for json.dumps."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_figure(fig, out: Path) -> Path:
    """Write a matplotlib figure atomically (temporary name, then rename) and close it.

    Beside :func:`atomic_write` because a figure is one more file of a run folder,
    and an interrupted run must not leave half a PNG behind.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- a run's files


def write_config(run_dir: Path, cfg: Config) -> Path:
    """The resolved config a run used: ``busi rerun`` and ``--resume`` read it back.

    ``runtime.precision: auto`` is written as the precision it resolved to here (a
    comment says ``auto`` was asked): ``auto`` itself could resolve to another
    precision on the machine a rerun or resume runs on.
    """
    from busi import runtime
    from busi.config import dump_yaml

    resolved = runtime.resolve_config(cfg)
    note = "" if resolved is cfg else (
        f"# runtime.precision was auto; it resolved to {resolved.runtime.precision} on the "
        f"machine this run started on,\n# and busi rerun / --resume train in that.\n")
    return atomic_write(Path(run_dir) / CONFIG, note + dump_yaml(resolved))


def read_config(run_dir: Path) -> Config:
    """A run's own config, so that a resumed or rerun run is the same run."""
    from busi.config import load_config

    return load_config(Path(run_dir) / CONFIG)


def read_split(run_dir: Path) -> dict[str, Any]:
    """A run's split.json (manifest, fold, segmentation run, data fingerprint).

    Its ``manifest`` and ``seg_run`` paths are as they were given when the run was made,
    usually relative to the folder busi ran in (``outputs/splits/...``). Read from another
    folder, such a path is found again beside the run: under the first folder above the run
    that holds it, so a run works from wherever it is used (or after its project is moved).
    """
    record = read_json(Path(run_dir) / SPLIT)
    for key in ("manifest", "seg_run"):
        if isinstance(record.get(key), str):
            record[key] = str(_beside(Path(run_dir), record[key]))
    return record


def _beside(run_dir: Path, stored: str) -> Path:
    """``stored`` as it is (when it exists), else under the nearest folder above ``run_dir``
    that holds it; unchanged when none does (the reader's error then names it)."""
    path = Path(stored)
    if path.is_absolute() or path.exists():
        return path
    for above in run_dir.resolve().parents:
        if (above / path).exists():
            return above / path
    return path


def write_split(run_dir: Path, record: dict[str, Any]) -> Path:
    """Which images a run used (manifest, fold, counts, data fingerprint), so that a later
    classifier, evaluation or rerun uses exactly the same ones."""
    return write_json(Path(run_dir) / SPLIT, record)


def write_command(run_dir: Path, *, resume: str, rerun_note: str = "") -> Path:
    """command.txt: the command line that made the run and how to rerun or continue it, so a
    reader of the folder never has to guess how it came about."""
    import shlex

    argv = " ".join(shlex.quote(a) for a in ["busi", *sys.argv[1:]]) if sys.argv else ""
    return atomic_write(Path(run_dir) / COMMAND,
                        f"{argv}\n# rerun exactly{rerun_note}: busi rerun {run_dir}\n"
                        f"# continue if interrupted: busi {resume} --resume {run_dir}\n")


VAL_PREDICTIONS = "val_predictions.csv"
OPERATING_POINT = "operating_point.json"


def write_predictions(path: Path, files: list[str], labels: np.ndarray, probs: np.ndarray,
                      classes: tuple[str, ...] | list[str],
                      unet: dict[str, np.ndarray | None] | None = None) -> None:
    """``file,true,pred,p_<class>...``, written by the csv module: a file name with a comma,
    a quote or a line break is quoted and escaped, so it reads back as it was. ``unet``: the
    U-Net's presence scores (``{"max": ..., "head": ...}``, what the presence decision
    reads), each one it has as a ``unet_<key>`` column after the probabilities."""
    extra = {f"unet_{k}": v for k, v in (unet or {}).items() if v is not None}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "true", "pred", *[f"p_{c}" for c in classes], *extra])
    for i, (f, t, p) in enumerate(zip(files, labels, probs, strict=True)):
        writer.writerow([f, classes[t], classes[int(np.argmax(p))], *[f"{v:.6f}" for v in p],
                         *[f"{float(v[i]):.6f}" for v in extra.values()]])
    atomic_write(path, buf.getvalue())


def read_column(path: Path, name: str) -> np.ndarray | None:
    """One numeric extra column of a predictions file (None when the file lacks it: runs
    from before it was written)."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if name not in (reader.fieldnames or []):
            return None
        try:
            return np.array([float(r[name]) for r in reader], dtype=float)
        except (TypeError, ValueError):
            raise BusiError(f"column {name} has a value that is not a number", where=str(path),
                            fix="restore the file, or rerun the run it belongs to") from None


def read_predictions(path: Path) -> tuple[list[str], list[str], list[str], np.ndarray, list[str]]:
    """The columns of a predictions.csv; a damaged file is a BusiError naming it, because every
    table and figure of a classifier is recomputed from this file."""
    if not path.is_file():
        if (path.parent / SPLIT).is_file() or (path.parent / "cv.json").is_file():
            check_kind(path.parent, CLS_DIR, option="a run with predictions:")
        raise BusiError("run has no predictions.csv (did it finish?)", where=str(path.parent),
                        fix="finish it with --resume, or pick a finished run")
    fix = "restore the file, or rerun the run it belongs to"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BusiError(f"cannot read predictions ({exc})", where=str(path), fix=fix) from None
    classes = [c[2:] for c in fields if c.startswith("p_")]
    missing = [c for c in ("file", "true", "pred") if c not in fields]
    if missing or not classes:
        raise BusiError(f"not a predictions file (columns {', '.join(missing) or 'p_<class>'} "
                        "missing)", where=str(path), fix=fix)
    try:
        probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows],
                         dtype=float).reshape(len(rows), len(classes))
    except (TypeError, ValueError):  # a short row (None) or a non-number
        bad = next(k for k, r in enumerate(rows, start=2) if not _numbers(r, classes))
        raise BusiError(f"line {bad}: a probability is missing or not a number",
                        where=str(path), fix=fix) from None
    return ([r["file"] for r in rows], [r["true"] for r in rows], [r["pred"] for r in rows],
            probs, classes)


def _numbers(row: dict, classes: list[str]) -> bool:
    try:
        [float(row[f"p_{c}"]) for c in classes]
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- resuming


def kind_command(kind: str) -> str:
    """The command that trains (and resumes) a run of ``kind``, for hints and command.txt."""
    return "train-seg" if kind == SEG_DIR else "train-cls"


def resume_target(resume: str, kind: str) -> tuple[Path, Config]:
    """The run folder ``--resume`` names, checked to be an unfinished run of ``kind``, and
    its own config. Runs before anything is loaded or written."""
    run_dir = Path(resume)
    want = SEG_DIR if kind == SEG_DIR else CLS_DIR
    fix = f"pass --resume an unfinished run folder under {KINDS[want][1]}"
    if not (run_dir / CONFIG).is_file():
        raise BusiError("not a run folder (no config.yaml)", where=str(run_dir), fix=fix)
    if (run_dir / SPLIT).is_file() or (run_dir / "cv.json").is_file():
        actual = run_kind(run_dir)
    else:  # killed before split.json: the folder it lives in tells
        actual = CLS_DIR if run_dir.parent.parent.name == CLS_DIR else SEG_DIR
    if actual != want:
        raise BusiError(f"this is {KINDS[actual][0]}, not {KINDS[want][0]}",
                        where=str(run_dir),
                        fix=f"busi {'cv' if actual == 'cv' else kind_command(actual)} "
                            f"--resume {run_dir}")
    if saved_state(run_dir).get("finished"):
        raise BusiError("this run has already finished", where=str(run_dir),
                        fix="start a new run instead of --resume")
    return run_dir, read_config(run_dir)


def saved_state(run_dir: Path) -> dict[str, Any]:
    """What a (possibly interrupted) training in ``run_dir`` committed; {} if nothing usable,
    so that a resume continues from the last committed epoch and never from a torn one."""
    state_file = run_dir / STATE
    if not state_file.is_file():
        return {}
    state = read_json(state_file, fix=f"delete {state_file} to train this run from the start")
    if not (run_dir / "last.keras").is_file() and not state.get("finished"):
        return {}
    return state


def write_state(run_dir: Path, state: dict[str, Any]) -> Path:
    """state.json: the commit point of an epoch (and, with ``finished``, of the whole run)."""
    return write_json(Path(run_dir) / STATE, state)


# --------------------------------------------------------------------------- finding runs


def resolve_seg_run(seg_run: str | None, outputs_root: str, option: str = "--seg-run") -> Path:
    """The named segmentation run (checked: kind, finished, complete), or the newest finished."""
    if seg_run:
        return require_run(seg_run, SEG_DIR, option=option, needs=("masks.npz", "best.keras"))
    latest = latest_run(Path(outputs_root) / SEG_DIR, require="masks.npz", finished=True)
    if latest is None:
        raise BusiError(f"no finished segmentation run under {Path(outputs_root) / SEG_DIR}",
                        fix="train one first: busi train-seg --config <same config>")
    return latest


def resolve_cls_run(cls_run: str | None, outputs_root: str, option: str = "--cls-run") -> Path:
    """The named classifier run (checked), or the newest finished one of any model.

    "Finished" matters: a classifier still training has a best.keras already.
    """
    if cls_run:
        return require_run(cls_run, CLS_DIR, option=option, needs=("best.keras",))
    runs = [r for m in sorted((Path(outputs_root) / CLS_DIR).glob("*"))
            if (r := latest_run(m, require="best.keras", finished=True))]
    if not runs:
        raise BusiError(f"no finished classifier run under {Path(outputs_root) / CLS_DIR}",
                        fix="pass --cls-run, or train one: busi train-cls --model cnn")
    return max(runs, key=lambda r: r.name)


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings of a run folder name the same folder (relative or absolute)."""
    return Path(a).resolve() == Path(b).resolve()


def paired_seg_run(cls: Path, seg_run: str | None, outputs_root: str,
                   command: str) -> tuple[Path, str]:
    """The U-Net run to use with classifier run ``cls``, and why (for the command's output).

    By default the classifier's own U-Net (``seg_run`` in its split.json): a
    later U-Net draws other masks than the ones the classifier learnt from. An
    explicit ``--seg-run`` that differs is allowed, with a warning. A classifier
    without a U-Net of its own (ground-truth or no masks) gets the newest one.
    """
    own = read_split(cls).get("seg_run")
    if seg_run:
        seg = resolve_seg_run(seg_run, outputs_root)
        if own and not trained_on(cls, seg):  # a moved or copied CV still pairs
            print(f"busi: warning: {command}: --seg-run {seg} is not the U-Net run classifier "
                  f"{cls} was trained with ({own}); its masks can differ from the ones the "
                  "classifier learnt from", file=sys.stderr)
            return seg, "--seg-run, not the classifier's own"
        return seg, "--seg-run"
    if own:
        if not Path(own).is_dir():
            raise BusiError(f"the classifier's segmentation run {own} is gone", where=str(cls),
                            fix="restore that folder, or name another U-Net run with --seg-run "
                                "(its masks differ from those the classifier learnt from)")
        return resolve_seg_run(own, outputs_root), "the classifier's own"
    return resolve_seg_run(None, outputs_root), "the latest; the classifier has none of its own"


def seg_record(seg_path: Path) -> dict[str, Any]:
    """A segmentation run's split.json, with its image size (from config.yaml in old runs)."""
    record = read_split(seg_path)
    if "manifest" not in record:
        raise BusiError("split.json names no split manifest", where=str(seg_path / SPLIT),
                        fix="use a complete segmentation run, or retrain it")
    if "image_size" not in record:
        import yaml

        try:
            size = yaml.safe_load((seg_path / CONFIG).read_text())["data"]["image_size"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            size = None
        record["image_size"] = size
    return record


def find_classifier_runs(outputs_root: str | Path, required: bool = True) -> list[Path]:
    """Finished classifier runs of the most recent split (the newest run's manifest): what
    ``busi evaluate`` compares when no run is named. None is an error only if ``required``
    (``busi evaluate --seg-run`` also works before any classifier exists)."""
    root = Path(outputs_root) / CLS_DIR
    runs = [r for m in sorted(root.glob("*")) for r in list_runs(m)
            if (r / PREDICTIONS).is_file() and is_finished(r)]
    if not runs:
        if not required:
            return []
        raise BusiError(f"no finished classifier run under {root}",
                        fix="train one first: busi train-cls --model cnn --config <config>")
    def manifest(r: Path) -> str:
        return read_split(r).get("manifest", "")

    newest = max(runs, key=lambda r: r.name)
    return [r for r in runs if manifest(r) == manifest(newest)]


# --------------------------------------------------------------------------- listing runs


def all_runs(outputs_root: str | Path) -> list[tuple[str, Path]]:
    """(kind, folder) of every run under an outputs root -- seg/, cls/<model>/, cv/, eval/ --
    oldest first: folder names start with their timestamp, so this is the order they were
    made in, across kinds. A CV's fold runs live inside its folder and are not listed."""
    root = Path(outputs_root)
    found = [(SEG_DIR, r) for r in list_runs(root / SEG_DIR)]
    found += [(CLS_DIR, r) for m in list_runs(root / CLS_DIR) for r in list_runs(m)]
    found += [(CV_DIR, r) for r in list_runs(root / CV_DIR)]
    found += [(EVAL_DIR, r) for r in list_runs(root / EVAL_DIR)]
    return sorted(found, key=lambda kr: (kr[1].name, kr[0]))


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def describe_run(kind: str, run_dir: str | Path) -> dict[str, Any]:
    """One row of ``busi runs``: kind, model, status, data and headline figures of a run.

    Read from the files the run wrote (config.yaml, state.json, metrics.json,
    classification_report.json, cv_results.json, evaluation.json); a file that is missing
    or damaged leaves its cell as '-' rather than stopping the listing, since a listing
    is how a user finds the broken run in the first place.
    """
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"kind": kind, "run": str(run_dir), "name": run_dir.name,
                           "model": "-", "finished": False, "status": "-", "data": "-",
                           "headline": "-"}

    def load(name: str) -> Any:
        return _json_or_none(run_dir / name)

    try:
        cfg = read_config(run_dir) if kind != EVAL_DIR else None
    except BusiError:
        cfg = None
    if cfg is not None:
        root = cfg.data.root
        row["data"] = ", ".join(root) if isinstance(root, list) else root
    try:
        if kind in (SEG_DIR, CLS_DIR):
            row["finished"] = is_finished(run_dir)
            done = saved_state(run_dir).get("epochs_done", 0)
            row["status"] = (f"finished, {done} epochs" if row["finished"]
                             else f"not finished ({done} epochs done)")
    except BusiError:
        row["status"] = "not finished (state.json unreadable)"
    if kind == SEG_DIR:
        unet = cfg.model.unet if cfg else None
        row["model"] = "unet" + (f"-{unet.encoder}" if unet and unet.encoder != "plain" else "")
        metrics = load("metrics.json") if row["finished"] else None
        if isinstance(metrics, dict):
            dice = metrics.get("lesion_images", {}).get("dice", {}).get("mean")
            row["headline"] = f"test lesion Dice {_fmt(dice)}"
    elif kind == CLS_DIR:
        c = cfg.model.classifier if cfg else None
        row["model"] = run_dir.parent.name
        if c is not None:
            extra = [f"masks={c.masks}"] * (c.masks != "predicted") + \
                [f"mask_mode={c.mask_mode}"] * (c.mask_mode != "multiply")
            row["model"] = (c.name if c.name == run_dir.parent.name
                            else f"{run_dir.parent.name} ({c.name})") + \
                "".join(f", {e}" for e in extra)
        report = load("classification_report.json") if row["finished"] else None
        if isinstance(report, dict):
            recall = report.get("report", {}).get("malignant", {}).get("recall")
            row["headline"] = (f"accuracy {_fmt(report.get('accuracy'))}, macro-F1 "
                               f"{_fmt(report.get('macro_f1'))}, malignant recall "
                               f"{_fmt(recall, 2)}")
    elif kind == CV_DIR:
        meta = load("cv.json")
        arms = list(meta.get("models", [])) if isinstance(meta, dict) else []
        folds = meta.get("folds", 0) if isinstance(meta, dict) else 0
        row["model"] = "U-Nets" + "".join(f", {a}" for a in arms)

        complete = cv_folds_done(run_dir, meta, arms) if isinstance(meta, dict) else 0
        row["finished"] = bool(folds) and complete == folds
        row["status"] = (f"finished, {folds} folds" if row["finished"]
                         else f"not finished ({complete} of {folds or '?'} folds done)")
        result = load("cv_results.json") if row["finished"] else None
        if isinstance(result, dict):
            dice = result.get("segmentation", {}).get("dice", {}).get("mean")
            accs = [f"{a} {_fmt(r.get('accuracy', {}).get('mean'))}"
                    for a, r in result.get("classification", {}).items()]
            row["headline"] = f"mean Dice {_fmt(dice)}" + (
                f"; mean accuracy {', '.join(accs)}" if accs else "")
    elif kind == EVAL_DIR:
        row["finished"], row["status"] = True, "finished"
        record = load("evaluation.json")
        if isinstance(record, dict):  # busi evaluate --data: one classifier and/or U-Net
            row["data"] = str(record.get("data", "-"))
            row["model"] = ", ".join(Path(r).parent.name if k == "cls_run" else "unet"
                                     for k in ("cls_run", "seg_run") if (r := record.get(k)))
            cls = record.get("classification") or {}
            seg = (record.get("segmentation") or {}).get("lesion_images", {})
            figures = ([f"lesion Dice {_fmt(seg['dice'].get('mean'))}"]
                       if isinstance(seg.get("dice"), dict) else [])
            if cls:
                figures.append(f"accuracy {_fmt(cls.get('accuracy'))}")
            row["headline"] = ", ".join(figures) or "-"
        elif isinstance(record, list):  # busi evaluate: runs on their own test splits
            row["data"] = "the runs' own test splits"
            row["model"] = ", ".join(Path(r.get("run", "?")).parent.name for r in record
                                     if isinstance(r, dict))
            row["headline"] = "accuracy " + ", ".join(
                _fmt(r.get("accuracy")) for r in record if isinstance(r, dict))
    return row


def format_runs(rows: list[dict[str, Any]], outputs_root: str | Path) -> str:
    """``busi runs``' table: one line per run, oldest first, so the newest is at the bottom."""
    if not rows:
        return (f"no runs under {outputs_root} (train one: busi train-seg, or pass "
                "--outputs DIR)")
    cols = [("run", lambda r: str(Path(r["run"]).relative_to(outputs_root))),
            ("kind", lambda r: r["kind"]), ("model", lambda r: r["model"]),
            ("status", lambda r: r["status"]), ("headline figures", lambda r: r["headline"]),
            ("data", lambda r: r["data"])]
    cells = [[name for name, _ in cols]] + [[get(r) for _, get in cols] for r in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(cols) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in cells]
    return "\n".join([f"Runs under {outputs_root}, oldest first (the newest last):", *lines])
