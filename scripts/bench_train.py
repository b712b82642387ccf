"""Benchmark: can the input pipeline keep the U-Net fed? img/s of each side.

Prints, for each augmentation engine, how many training images per second the
input pipeline (busi.data.batches.Batches: slicing, scaling, augmentation, mask
binarisation) prepares on one thread, and for the U-Net at each config how many
images per second one training step consumes on in-memory arrays. The pipeline
runs in ``workers`` threads while the model trains, so the ratio that matters is
(input img/s x workers) / model img/s; above 1 the model never waits.

    python scripts/bench_train.py --data ../shared/data/busi/Dataset_BUSI_with_GT
    python scripts/bench_train.py --configs cpu --precisions float32 mixed_bfloat16

``runtime.precision: auto`` is measured as what it resolves to on this machine.
Timings belong here, not in tests; copy the output into docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from busi import runtime
from busi.config import find_config, load_config

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/busi/Dataset_BUSI_with_GT"


def _images(data: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    """Real BUSI when present, else a synthetic set of the same size (so it always runs)."""
    from busi.data.loading import load_dataset

    if Path(data, "benign").is_dir():
        ds = load_dataset(data, size=size, cache_dir="data/cache")
        return ds.images, ds.masks, f"{data} ({len(ds)} images)"
    import tempfile

    from busi.data.synth import SynthSpec, write_dataset

    tmp = Path(tempfile.mkdtemp()) / "synth"
    write_dataset(tmp, SynthSpec(per_class=40, seed=0))
    ds = load_dataset(tmp, size=size, cache_dir=None)
    return ds.images, ds.masks, f"synthetic ({len(ds)} images; real BUSI not found)"


def bench_input(images, masks, cfg, engine: str, batch: int, seconds: float) -> float:
    """Images/s that one thread of the input pipeline prepares with this engine."""
    from dataclasses import replace

    from busi.data.augment import build_augment
    from busi.data.batches import Batches

    aug = build_augment(replace(cfg.augmentation, engine=engine), tuple(cfg.data.image_size))
    batches = Batches(images, masks, batch, augment=aug, shuffle=True, seed=0)
    batches[0]  # warm-up: builds layers / imports
    n, t0, i = 0, time.perf_counter(), 1
    while time.perf_counter() - t0 < seconds:
        x, _ = batches[i % len(batches)]
        n += len(x)
        i += 1
    return n / (time.perf_counter() - t0)


def bench_model(images, masks, cfg, precision: str, batch: int, steps: int) -> float:
    """Images/s of U-Net training steps on in-memory arrays (no input pipeline)."""
    from busi.models.losses import segmentation_loss, segmentation_metrics
    from busi.models.unet import unet_from_config

    keras = runtime.import_keras()
    runtime.setup(0, precision)
    u, t = cfg.model.unet, cfg.training.seg
    h, w = cfg.data.image_size
    model = unet_from_config(u, (h, w))
    model.compile(optimizer=keras.optimizers.Adam(t.learning_rate),
                  loss=segmentation_loss(t.loss), metrics=segmentation_metrics())
    x = images[:batch, ..., None].astype("float32") / 255.0
    y = masks[:batch, ..., None].astype("float32")
    model.train_on_batch(x, y)  # warm-up: tracing
    model.train_on_batch(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    rate = steps * batch / (time.perf_counter() - t0)
    keras.mixed_precision.set_dtype_policy("float32")
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="BUSI-layout folder")
    ap.add_argument("--configs", nargs="+", default=["cpu", "paper"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of every config, as busi's --set (repeatable)")
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="override each config's runtime.precision (default: the config's own; "
                         "auto: as training resolves it on this machine)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per case")
    ap.add_argument("--seconds", type=float, default=5.0, help="time per input-pipeline case")
    ap.add_argument("--workers", type=int, default=2, help="input threads busi trains with")
    ap.add_argument("--dry-run", action="store_true",
                    help="resolve each config and list the cases that would be timed, timing "
                         "nothing")
    args = ap.parse_args(argv)

    argv = sys.argv[1:] if argv is None else argv
    print(f"command: python scripts/bench_train.py {' '.join(shlex.quote(a) for a in argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"date {time.strftime('%Y-%m-%d')}; Keras backend "
          f"{runtime.import_keras().backend.backend()}")
    rows = []
    for name in args.configs:
        cfg = load_config(find_config(name), args.overrides)
        batch = cfg.training.seg.batch_size
        if args.dry_run:
            for asked in args.precisions or [cfg.runtime.precision]:
                print(f"dry run: config {name}, U-Net base {cfg.model.unet.base_filters}, "
                      f"{runtime.resolve_precision(asked)}, batch {batch}")
            continue
        images, masks, source = _images(args.data, tuple(cfg.data.image_size))
        inputs = {e: bench_input(images, masks, cfg, e, batch, args.seconds)
                  for e in ("image_data_generator", "layers")}
        for asked in args.precisions or [cfg.runtime.precision]:
            precision = runtime.resolve_precision(asked)  # the table names what ran
            model = bench_model(images, masks, cfg, precision, batch, args.steps)
            for engine, rate in inputs.items():
                rows.append((name, cfg.model.unet.base_filters, precision, batch, engine, rate,
                             model, rate * args.workers / model))
        print(f"data: {source}")
    if args.dry_run:
        return 0
    print(f"\n| config | U-Net base | precision | batch | augmentation | input img/s (1 thread) "
          f"| model train img/s | input x{args.workers} threads / model |")
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.0f} | {r[6]:.1f} | "
              f"{r[7]:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
