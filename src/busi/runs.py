"""Run directories: one folder per run, never overwritten, written atomically.

A run folder is created with ``exist_ok=False``, so a second run can never
write into the first; every file is written to a temporary name and renamed,
so an interrupted run leaves complete files or none.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from busi.errors import BusiError

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


def is_finished(run_dir: str | Path) -> bool:
    """Whether a training run's ``state.json`` says it finished (unreadable: not finished)."""
    try:
        return bool(json.loads((Path(run_dir) / "state.json").read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


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
        raise BusiError(f"not a run folder ({missing} missing)", where=str(run_dir),
                        fix="pass a folder under outputs/seg/, outputs/cls/<model>/, outputs/cv/ "
                            "or outputs/eval/")
    record = read_json(split)
    if not isinstance(record, dict):
        raise BusiError("not a run's split record (expected a JSON object)", where=str(split),
                        fix="use a complete run folder, or retrain it")
    return "cls" if "seg_run" in record else "seg"


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
        raise BusiError(f"not {name} ({' and '.join(missing)} missing)", where=str(path), fix=fix)
    actual = run_kind(path)
    if actual != kind:
        raise BusiError(f"this is {KINDS[actual][0]}, not {name}", where=str(path), fix=fix)
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


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    """numpy scalars and arrays -> plain Python, for json.dumps."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
