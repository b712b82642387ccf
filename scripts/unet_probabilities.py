"""How far a U-Net run is from drawing masks: its probabilities on its validation images.

A U-Net whose validation Dice is 0 either learnt nothing or is still below the threshold.
This loads a run's ``last.keras`` (training may still be going on: it is written after
every epoch) and prints, over the run's own validation images, the mean probability on
lesion and background pixels, the highest probabilities, and how many pixels pass 0.5.
Issue 15 used it to follow the paper's U-Net (MSE, lr 5e-5) while it trained:

    python scripts/unet_probabilities.py outputs/seg/20261126-000419 \
        --data ../shared/data/busi/Dataset_BUSI_with_GT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from busi.data.loading import load_dataset
from busi.data.split import read_manifest
from busi.models.masks import predict_probs
from busi.models.saving import load_model
from busi.runs import read_config, read_split


def validation_files(run: Path) -> list[str]:
    """The run's own validation images, as train-seg chose them. A cross-validation fold's
    validation part is drawn from the fold's training part with the run's seed and
    val_size (``Manifest.partition``), so both come from the run's config: with seed 0 and
    the default 0.1 a run of another seed gets other images, some of which it trained on."""
    cfg = read_config(run)
    split = read_split(run)
    manifest = read_manifest(split["manifest"], cfg.split.val_size, cfg.runtime.seed)
    return manifest.partition(split.get("fold"))["val"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a U-Net run folder (outputs/seg/<run>)")
    ap.add_argument("--data", help="the run's data folder (default: its config's data.root)")
    ap.add_argument("--checkpoint", default="last.keras", help="last.keras (default) or best.keras")
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = read_config(run)
    ds = load_dataset(args.data or cfg.data.root, tuple(cfg.data.classes),
                      tuple(cfg.data.image_size), cache_dir=cfg.data.cache_dir)
    val = ds.index(validation_files(run))
    probs = predict_probs([load_model(run / args.checkpoint)], ds.images[val])
    lesion = ds.masks[val] > 0
    epochs = json.loads((run / "state.json").read_text())["epochs_done"]
    print(f"{run} ({args.checkpoint}, {epochs} epochs done), {len(val)} validation images: "
          f"mean p on lesion pixels {probs[lesion].mean():.3g}, on background "
          f"{probs[~lesion].mean():.3g}; highest p {probs.max():.4f}; 99.9th percentile "
          f"{np.percentile(probs, 99.9):.3g}; pixels over 0.5: {int((probs > 0.5).sum())} "
          f"(lesion pixels: {int(lesion.sum())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
