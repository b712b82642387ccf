"""Score a finished segmentation run on a part of its split, under other mask rules or U-Nets.

    python scripts/seg_eval.py RUN [--part val|test|train] [--variants] [--member CKPT ...]
                               [--tune] [--json OUT]

A run's metrics.md scores its test images once, with the mask rule it chose.
Two questions need the same measurement under other settings, and this is the
command that answers them (docs/RESULTS.md quotes it):

* What did flip test-time augmentation and the largest-component clean-up add
  on the validation images, where they are chosen (never on the test images)?

      python scripts/seg_eval.py outputs/seg/RUN --part val --variants --tune

* How does one member of a fold ensemble (e.g. the final U-Net) do alone on the
  test images, at the run's threshold and clean-up?

      python scripts/seg_eval.py outputs/seg/RUN --part test --member best.keras

The images, split and mask rule are the run's own (config.yaml, split.json,
masks.npz); the U-Nets are its checkpoints (all members of its ensemble unless
--member picks some). The threshold is the run's unless --tune, which tunes it
per variant on the scored images, as train-seg does on its validation images.
Prints a Markdown table (and the command); --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from busi.errors import EXIT_USAGE, BusiError

RULES = [(False, "none"), (True, "none"), (False, "largest_component"),
         (True, "largest_component")]


def _run_data(run: Path, part: str):
    """The run's data set and the indices of one part of its split."""
    from busi.config import load_config
    from busi.data.loading import dataset_from_config
    from busi.data.split import read_manifest

    if not (run / "config.yaml").is_file() or not (run / "split.json").is_file():
        raise BusiError("not a segmentation run folder (no config.yaml / split.json)",
                        where=str(run), fix="pass a folder under outputs/seg/")
    cfg = load_config(run / "config.yaml")
    split = json.loads((run / "split.json").read_text())
    manifest = read_manifest(split["manifest"], cfg.split.val_size, cfg.runtime.seed)
    files = manifest.partition(split.get("fold"))[part]
    if not files:
        raise BusiError(f"the run's split has no {part} images", where=str(run / "split.json"),
                        fix="choose another --part")
    ds = dataset_from_config(cfg)
    return ds, ds.index(files)


def evaluate(run: str | Path, part: str = "val", variants: bool = False,
             members: list[str] | None = None, tune: bool = False) -> list[dict]:
    """One row per mask rule: Dice, IoU, HD95 and misses on the part's images."""
    from busi import runtime
    from busi.evaluation.segmentation import per_image, summarise, tune_threshold
    from busi.models.masks import MaskRule, as_stored, predict_probs, read_rule, unet_members

    run = Path(run)
    rule, tta = read_rule(run)
    if members:
        paths = [run / m for m in members]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise BusiError("no such checkpoint in the run", where=str(missing[0]),
                            fix="name one of: " + ", ".join(
                                str(p.relative_to(run)) for p in unet_members(run)))
    else:
        paths = unet_members(run)
    keras = runtime.import_keras()
    import busi.models.losses  # noqa: F401  (registers the loss and metrics the checkpoints name)

    models = [keras.models.load_model(p) for p in paths]
    ds, idx = _run_data(run, part)
    truth, labels = ds.masks[idx], ds.labels[idx]
    probs = {}
    rows = []
    for flip, post in (RULES if variants else [(tta, rule.postprocess)]):
        if flip not in probs:
            probs[flip] = as_stored(predict_probs(models, ds.images[idx], flip_tta=flip))
        threshold = (tune_threshold(truth, probs[flip], postprocess=post) if tune
                     else rule.threshold)
        masks = MaskRule(threshold, post).apply(probs[flip])
        s = summarise(per_image(truth, masks.astype(np.float32), 0.5), labels, ds.classes)
        le, lf = s["lesion_images"], s["lesion_free_images"]
        rows.append({"run": str(run), "part": part, "unets": [str(p.relative_to(run))
                                                             for p in paths],
                     "flip_tta": flip, "postprocess": post, "threshold": round(threshold, 4),
                     "threshold_source": "tuned on these images" if tune else "the run's",
                     "n_lesion": le["dice"]["n"], "dice": le["dice"]["mean"],
                     "dice_std": le["dice"]["std"], "iou": le["iou"]["mean"],
                     "hd95_all": le["hd95_all"]["mean"], "missed": le["hd95_undefined"],
                     "n_lesion_free": lf["n"],
                     "lesion_free_empty": round(lf["fraction_predicted_empty"] * lf["n"])
                     if lf["n"] else 0})
    return rows


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"{first['run']}, {first['part']} images, U-Net(s) {', '.join(first['unets'])}; "
             f"threshold: {first['threshold_source']}.", "",
             "| flip TTA | clean-up | threshold | lesion images | Dice | Dice vs first row | "
             "IoU | HD95, misses counted (px) | missed | lesion-free predicted empty |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['flip_tta'] else 'off'} | {r['postprocess']} | "
                     f"{r['threshold']:.2f} | {r['n_lesion']} | {r['dice']:.3f} ± "
                     f"{r['dice_std']:.3f} | {r['dice'] - first['dice']:+.3f} | {r['iou']:.3f} | "
                     f"{r['hd95_all']:.1f} | {r['missed']} | "
                     f"{r['lesion_free_empty']} of {r['n_lesion_free']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a finished segmentation run folder (outputs/seg/<run>)")
    ap.add_argument("--part", choices=("val", "test", "train"), default="val",
                    help="which images of the run's split to score (default: val)")
    ap.add_argument("--variants", action="store_true",
                    help="every combination of flip TTA and largest-component clean-up, "
                         "instead of the run's own rule only")
    ap.add_argument("--member", action="append", metavar="CKPT",
                    help="score these checkpoints of the run (path relative to it, e.g. "
                         "best.keras or oof/fold0/best.keras; repeat to average several) "
                         "instead of all the U-Nets the run segments with")
    ap.add_argument("--tune", action="store_true",
                    help="tune the threshold per variant on the scored images (as train-seg "
                         "does on validation images) instead of using the run's")
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    try:
        rows = evaluate(args.run, args.part, args.variants, args.member, args.tune)
    except BusiError as exc:
        print(f"seg_eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(markdown(rows))
    print("command: python scripts/seg_eval.py "
          + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
