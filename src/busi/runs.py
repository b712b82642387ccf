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


def latest_run(parent: str | Path, *, require: str | None = None) -> Path | None:
    """Newest run under ``parent`` (optionally: that has the file ``require``)."""
    runs = [r for r in list_runs(parent) if require is None or (r / require).exists()]
    return runs[-1] if runs else None


def run_kind(run_dir: str | Path) -> str:
    """'cv', 'eval', 'cls' or 'seg', from the files a run folder holds."""
    run_dir = Path(run_dir)
    if (run_dir / "cv.json").is_file():
        return "cv"
    if (run_dir / "evaluation.md").is_file():
        return "eval"
    split = run_dir / "split.json"
    if not (run_dir / "config.yaml").is_file() or not split.is_file():
        raise BusiError("not a run folder (needs config.yaml and split.json)", where=str(run_dir),
                        fix="pass a folder under outputs/seg/, outputs/cls/<model>/, outputs/cv/ "
                            "or outputs/eval/")
    return "cls" if "seg_run" in json.loads(split.read_text()) else "seg"


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
