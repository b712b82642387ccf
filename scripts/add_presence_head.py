"""Fit the lesion-presence head (busi.models.presence) of U-Net runs made before busi fitted one.

    python scripts/add_presence_head.py outputs/seg/<run> [...]
    python scripts/add_presence_head.py outputs/cv/<run>        # every fold's U-Net

Each head is fitted on its run's own training images (from the run's config, data and split)
and written as a new file, presence_head.npz; nothing else in the run changes, and a run that
has a head keeps it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="U-Net runs, or CV folders")
    args = p.parse_args(argv)
    from busi.errors import BusiError
    from busi.runs import cv_fold_unet, read_json
    from busi.training.segmentation import add_presence_head

    try:
        for run in args.runs:
            segs = ([cv_fold_unet(run, k)[0] for k in range(read_json(run / "cv.json")["folds"])]
                    if (run / "cv.json").is_file() else [run])
            for seg in segs:
                print(f"{seg}: {add_presence_head(seg) or 'no head (see above)'}")
    except BusiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
