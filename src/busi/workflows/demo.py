"""``busi demo``: the whole pipeline on synthetic data, for a newcomer."""

from __future__ import annotations

import time
from pathlib import Path

from busi.config import find_config, load_config
from busi.workflows.evaluate import evaluate_command


def run_demo(workdir: Path = Path("outputs/demo"), per_class: int = 40,
             overrides: list[str] | None = None,
             models: tuple[str, ...] = ("cnn", "vgg19", "mobilenet")) -> Path:
    """``busi demo``: the whole pipeline on synthetic data, so that a newcomer sees every step
    and its outputs in a few minutes on a CPU, with the same functions as a real run."""
    from busi.data.augment import require_engine
    from busi.data.check import check_dataset, format_report
    from busi.data.synth import SynthSpec, write_dataset
    from busi.training.classification import train_classifier
    from busi.training.segmentation import train_segmentation

    t0 = time.perf_counter()
    workdir = Path(workdir)
    data = workdir / "data"
    # Paths as (key, value) pairs, not --set text: YAML would cut "my runs #2" at the '#'.
    base = [("data.root", str(data)), ("data.cache_dir", str(workdir / "cache")),
            ("split.manifest_dir", str(workdir / "splits")), ("outputs.root", str(workdir))]
    cfg = load_config(find_config("demo"), [*base, *(overrides or [])])
    require_engine(cfg.augmentation)  # before the synthetic data is written
    if not data.exists():
        print(f"[1/5] writing {per_class} synthetic images per class to {data}")
        write_dataset(data, SynthSpec(per_class=per_class, seed=cfg.runtime.seed))
    else:
        print(f"[1/5] reusing synthetic data in {data}")
    report = check_dataset(data, tuple(cfg.data.classes),
                           near_distance=cfg.split.near_duplicate_distance,
                           cache_dir=cfg.data.cache_dir, size=tuple(cfg.data.image_size))
    print(format_report(report, limit=3))
    print("[2/5] segmentation (U-Net)")
    seg = train_segmentation(cfg)
    runs = []
    print("[3/5] classifiers on the U-Net's predicted masks")
    for i, name in enumerate(models, start=1):
        print(f"[3/5] classifier {i}/{len(models)}: {name}")
        model_cfg = load_config(find_config("demo"), [*base, *(overrides or []),
                                                      f"model.classifier.name={name}"])
        runs.append(str(train_classifier(model_cfg, seg_run=str(seg))))
    print("[4/5] evaluation")
    out = evaluate_command(runs, seg_runs=[str(seg)], outputs_root=str(workdir))
    print("note: the demo trains VGG19 and MobileNet (when asked) from scratch for a few "
          "epochs on 64x64 images (no ImageNet download), so near-chance scores for them are "
          "expected here; the CNN is the one to read. Real-data figures: docs/RESULTS.md")
    print(f"[5/5] demo finished in {time.perf_counter() - t0:.0f} s. "
          f"Everything is under {workdir}/: seg/ (U-Net), cls/<model>/ (classifiers), "
          f"eval/ (tables: {out}/evaluation.md)")
    return out
