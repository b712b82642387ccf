"""scripts/unet_probabilities.py reads a run's own validation images, as train-seg chose them."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

from busi.config import load_config
from busi.data.loading import load_dataset
from busi.data.split import get_manifest, read_manifest
from busi.runs import write_config


def test_a_cv_folds_validation_part_is_rebuilt_with_the_runs_seed_and_val_size(
        synth_root: Path, tmp_path: Path) -> None:
    """busi issue: the script rebuilt a CV fold's validation part with seed 0 (and val_size
    0.1) instead of the run's, so it measured another set of images -- some of them trained
    on. A fold run of seed 7 and val_size 0.2 (no model needed: only its files are read)."""
    cfg = load_config(None, [f"data.root={synth_root}", f"data.cache_dir={tmp_path}/cache",
                             "data.image_size=[32, 32]", f"split.manifest_dir={tmp_path}/splits",
                             "split.scheme=kfold", "split.folds=3", "split.val_size=0.2",
                             "runtime.seed=7"])
    ds = load_dataset(synth_root, cfg.data.classes, (32, 32), cache_dir=cfg.data.cache_dir)
    manifest = get_manifest(ds, cfg.split, cfg.runtime.seed)
    run = tmp_path / "outputs" / "seg" / "20260101-000000"
    run.mkdir(parents=True)
    write_config(run, cfg)
    (run / "split.json").write_text(json.dumps({"manifest": str(manifest.path), "fold": 1}))
    own = read_manifest(manifest.path, 0.2, 7).partition(1)
    assert sorted(load_script("unet_probabilities").validation_files(run)) == sorted(own["val"])
    for val_size, seed in ((0.2, 0), (0.1, 0)):  # the seed alone already picks others
        assert sorted(own["val"]) != sorted(
            read_manifest(manifest.path, val_size, seed).partition(1)["val"]), (val_size, seed)
