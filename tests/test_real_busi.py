"""Facts about the real BUSI that the pipeline relies on (skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from busi.config import SplitConfig
from busi.data.check import check_dataset
from busi.data.loading import load_dataset
from busi.data.split import get_manifest

pytestmark = pytest.mark.real_data


def test_busi_counts_masks_and_known_duplicate(real_busi: Path, tmp_path: Path) -> None:
    r = check_dataset(real_busi, cache_dir=tmp_path)
    assert r.images_per_class == {"benign": 437, "malignant": 210, "normal": 133}
    assert r.n_problems == 0
    assert sum(k * v for k, v in r.masks_per_image.items()) == 798
    assert ["benign/benign (433).png", "malignant/malignant (145).png"] in r.exact_groups
    assert len(r.near_groups) > 100  # the literature reports many near-duplicates


def test_paper_split_is_702_78(real_busi: Path, tmp_path: Path) -> None:
    ds = load_dataset(real_busi, cache_dir=tmp_path)
    m = get_manifest(ds, SplitConfig(manifest_dir=str(tmp_path)), seed=42)
    parts = m.partition()
    assert len(parts["test"]) == 78 and len(parts["train"]) + len(parts["val"]) == 702


@pytest.mark.slow
def test_whole_pipeline_on_real_busi(real_busi: Path, mobilenet_weights: Path,
                                     tmp_path: Path) -> None:
    """Real files through every stage (tiny training): `pytest -m slow`, about 2 minutes."""
    import csv
    import json

    from busi.cli import main

    common = ["--data", str(real_busi), "--set", f"outputs.root={tmp_path}",
              "--set", f"data.cache_dir={tmp_path}/cache",
              "--set", f"split.manifest_dir={tmp_path}/splits",
              "--set", "model.unet.base_filters=4", "--set", "model.classifier.weights=none",
              "--set", f"model.unet.encoder_weights={mobilenet_weights}"]
    assert main(["train-seg", "--config", "cpu", *common, "--set", "training.seg.epochs=1",
                 "--set", "training.seg.steps_per_epoch=4"]) == 0
    assert main(["train-cls", "--model", "cnn", "--config", "cpu", *common,
                 "--set", "training.cls.epochs=1", "--set", "training.cls.steps_per_epoch=4"]) == 0
    assert main(["evaluate", "--outputs", str(tmp_path)]) == 0
    (seg,) = (tmp_path / "seg").iterdir()
    assert json.loads((seg / "split.json").read_text())["test"] == 78
    (cls,) = (tmp_path / "cls" / "cnn").iterdir()
    with open(cls / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 78
