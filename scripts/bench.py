"""Benchmark: where training and prediction time goes, as ratios, in one run.

1. Pipeline overhead: U-Net training img/s through busi's own input path
   (``Batches`` with the config's augmentation, 2 worker threads, ``model.fit``)
   vs ``model.fit`` on in-memory arrays of the same U-Net. Goal >= 0.95x.
2. Input pipeline vs model: img/s one input thread prepares, per augmentation
   engine, vs img/s the U-Net trains. Goal >= 5x.
3. Compute efficiency: the U-Net's training GFLOP/s (3 x forward FLOPs of its
   conv layers x img/s) vs this machine's measured matmul GFLOP/s (same backend,
   same precision).
4. ``busi predict`` latency per image (U-Net + classifier, as the CLI runs it:
   resize, U-Net with its mask rule, masked input, classifier): p50 / p95.

    python scripts/bench.py --config cpu --seg-run outputs/seg/<run> \
        --cls-runs outputs/cls/cnn/<run> outputs/cls/vgg19/<run> outputs/cls/mobilenet/<run>

``runtime.precision: auto`` is measured as what it resolves to on this machine (the
table names it). tests/test_scripts.py runs this on every config in configs/ (tiny sizes).

Prints the command, machine, date and a Markdown table; copy it into docs/PERFORMANCE.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DEFAULT_DATA, _images, bench_input  # noqa: E402


def _unet(cfg):
    from busi.models.losses import segmentation_loss, segmentation_metrics
    from busi.models.unet import unet_from_config

    keras = runtime.import_keras()
    u, t = cfg.model.unet, cfg.training.seg
    h, w = cfg.data.image_size
    model = unet_from_config(u, (h, w))
    model.compile(optimizer=keras.optimizers.Adam(t.learning_rate),
                  loss=segmentation_loss(t.loss), metrics=segmentation_metrics())
    return model


def _fit_rate(model, data, n_images: int, epochs: int, **kw) -> float:
    model.fit(data, epochs=1, verbose=0, **kw)  # warm-up: tracing, thread start-up
    t0 = time.perf_counter()
    model.fit(data, epochs=epochs, verbose=0, **kw)
    return epochs * n_images / (time.perf_counter() - t0)


def pipeline_overhead(cfg, images, masks, n: int, epochs: int) -> tuple[float, float]:
    """(img/s via busi's Batches + augmentation, img/s via model.fit on arrays)."""
    from busi.data.augment import build_augment
    from busi.data.batches import Batches

    b = cfg.training.seg.batch_size
    n = n - n % b  # whole batches on both sides
    x = images[:n, ..., None].astype("float32") / 255.0
    y = masks[:n, ..., None].astype("float32")
    runtime.setup(0, cfg.runtime.precision)
    plain = _fit_rate(_unet(cfg), x, n, epochs, y=y, batch_size=b, shuffle=True)
    runtime.setup(0, cfg.runtime.precision)
    aug = build_augment(cfg.augmentation, tuple(cfg.data.image_size))
    batches = Batches(images[:n], masks[:n], b, augment=aug, shuffle=True, seed=0,
                      workers=2 if aug is not None else 1)
    busi = _fit_rate(_unet(cfg), batches, n, epochs)
    return busi, plain


def unet_train_flops_per_image(model) -> float:
    """3 x forward FLOPs (multiply-adds x 2) of the conv and transposed-conv layers."""
    total = 0.0
    for layer in model.layers:
        name = type(layer).__name__
        if name not in ("Conv2D", "Conv2DTranspose"):
            continue
        kh, kw, cin, cout = layer.kernel.shape
        if name == "Conv2DTranspose":  # kernel is (kh, kw, out, in); work scales with input
            cin, cout = cout, cin
            _, h, w, _ = layer.input.shape
        else:
            _, h, w, _ = layer.output.shape
        total += 2.0 * h * w * kh * kw * cin * cout
    return 3.0 * total


def compute_dtype(precision: str) -> str:
    """The dtype layers compute in under ``runtime.precision`` (``auto`` resolved first, as
    training resolves it: it is a choice made per machine, not a dtype policy)."""
    keras = runtime.import_keras()
    return keras.mixed_precision.DTypePolicy(runtime.resolve_precision(precision)).compute_dtype


def matmul_gflops(precision: str, n: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul GFLOP/s of the backend at the compute dtype of ``precision``."""
    keras = runtime.import_keras()
    dtype = compute_dtype(precision)
    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n)).astype("float32"), dtype=dtype)
    b = keras.ops.convert_to_tensor(rng.standard_normal((n, n)).astype("float32"), dtype=dtype)
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        c = keras.ops.matmul(a, b)
    keras.ops.convert_to_numpy(c)
    return repeats * 2.0 * n**3 / (time.perf_counter() - t0) / 1e9


def predict_latency(seg_run: str, cls_run: str, images: np.ndarray,
                    n: int) -> tuple[float, float]:
    from busi.inference.predict import Predictor

    predictor = Predictor(seg_run, cls_run)
    predictor(images[0])  # warm-up
    times = []
    for img in images[1:n + 1]:
        t0 = time.perf_counter()
        predictor(img)
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 95) * 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="BUSI-layout folder")
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, as busi's --set (repeatable)")
    ap.add_argument("--precision", help="override runtime.precision (auto: as training "
                                        "resolves it on this machine)")
    ap.add_argument("--images", type=int, default=256, help="images per timed epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up)")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per input-pipeline case")
    ap.add_argument("--seg-run", help="U-Net run for the predict latency")
    ap.add_argument("--cls-runs", nargs="*", default=[], help="classifier runs for latency")
    ap.add_argument("--latency-images", type=int, default=40)
    ap.add_argument("--matmul-size", type=int, default=2048, help="side of the matmul measured")
    ap.add_argument("--dry-run", action="store_true",
                    help="resolve the config and say what would be measured, measuring nothing")
    args = ap.parse_args(argv)

    keras = runtime.import_keras()
    cfg = load_config(find_config(args.config), [*args.overrides, *(
        [f"runtime.precision={args.precision}"] if args.precision else [])])
    prec = runtime.resolve_precision(cfg.runtime.precision)  # what training computes in
    asked = "" if prec == cfg.runtime.precision else f" ({cfg.runtime.precision})"
    argv = sys.argv[1:] if argv is None else argv
    print(f"command: python scripts/bench.py {' '.join(shlex.quote(a) for a in argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"date {time.strftime('%Y-%m-%d')}; Keras {keras.__version__}, backend "
          f"{keras.backend.backend()}; config {args.config} (U-Net base "
          f"{cfg.model.unet.base_filters}, batch {cfg.training.seg.batch_size}, {prec}{asked})")
    if args.dry_run:
        print(f"dry run: would time U-Net training in {prec} and a {args.matmul_size}x"
              f"{args.matmul_size} matmul in {compute_dtype(prec)}; nothing measured")
        return 0
    images, masks, source = _images(args.data, tuple(cfg.data.image_size))
    print(f"data: {source}")
    rows = []

    busi_rate, plain_rate = pipeline_overhead(cfg, images, masks, args.images, args.epochs)
    rows.append(("U-Net training, busi input path (Batches + "
                 f"{cfg.augmentation.engine}, 2 threads) vs model.fit on arrays",
                 f"{busi_rate:.1f} vs {plain_rate:.1f} img/s", busi_rate / plain_rate, ">= 0.95"))
    for engine in ("image_data_generator", "layers"):
        rate = bench_input(images, masks, cfg, engine, cfg.training.seg.batch_size, args.seconds)
        rows.append((f"input pipeline, {engine}, 1 thread vs U-Net training",
                     f"{rate:.0f} vs {plain_rate:.1f} img/s", rate / plain_rate, ">= 5"))
    runtime.setup(0, prec)
    flops = unet_train_flops_per_image(_unet(cfg))
    peak = matmul_gflops(prec, args.matmul_size)
    achieved = flops * plain_rate / 1e9
    rows.append((f"U-Net training GFLOP/s ({flops / 1e9:.2f} GFLOP per image) vs "
                 f"{args.matmul_size}x{args.matmul_size} matmul GFLOP/s, {prec}",
                 f"{achieved:.1f} vs {peak:.1f} GFLOP/s", achieved / peak, "-"))
    keras.mixed_precision.set_dtype_policy("float32")
    for cls_run in args.cls_runs:
        if not args.seg_run:
            break
        p50, p95 = predict_latency(args.seg_run, cls_run, images, args.latency_images)
        model = Path(cls_run).parent.name
        rows.append((f"busi predict, one image: U-Net + {model} (ms p50 / p95)",
                     f"{p50:.1f} / {p95:.1f} ms", None, "-"))
    print("\n| measurement | figures | ratio | goal |\n|---|---:|---:|---:|")
    for what, figures, ratio, goal in rows:
        print(f"| {what} | {figures} | {'' if ratio is None else f'{ratio:.2f}x'} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
