"""Shared fixtures: a small synthetic BUSI-layout data set, and the real one when present."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# busi's CLI turns an unexpected exception into one line; in tests it must stay a traceback,
# so that a defect fails loudly (and a "no traceback" test notices it).
os.environ.setdefault("BUSI_DEBUG", "1")

REAL_BUSI = Path(__file__).resolve().parents[1].parent / "shared/data/busi/Dataset_BUSI_with_GT"
REAL_BUSI = Path(os.environ.get("BUSI_DATA", REAL_BUSI))
# The ImageNet MobileNet v1 weights (no top) that configs/cpu.yaml's U-Net encoder loads.
MOBILENET_WEIGHTS = Path(os.environ.get("BUSI_MOBILENET_WEIGHTS", Path(__file__).resolve(
).parents[1].parent / "shared/weights/mobilenet_v1_imagenet/mobilenet_1_0_notop.weights.h5"))
# The ImageNet EfficientNet-Lite0 weights (no top, .npz): the second pretrained backbone.
LITE0_WEIGHTS = Path(os.environ.get("BUSI_EFFICIENTNET_LITE0_WEIGHTS", Path(__file__).resolve(
).parents[1].parent / "shared/weights/efficientnet_lite0_imagenet/efficientnet_lite0_notop.npz"))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention synthetic data set (12 images per class)."""
    from busi.data.synth import SynthSpec, write_dataset

    root = tmp_path_factory.mktemp("synth") / "busi"
    write_dataset(root, SynthSpec(per_class=12, seed=0, height=96, width=128))
    return root


@pytest.fixture
def data_copy(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic set, for tests that break files on purpose."""
    dst = tmp_path / "data"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture(scope="session")
def real_busi() -> Path:
    if not (REAL_BUSI / "benign").is_dir():
        pytest.skip(f"real BUSI not found at {REAL_BUSI} (set BUSI_DATA to its folder)")
    return REAL_BUSI


def _weights_file(path: Path, what: str, variable: str) -> Path:
    if not path.is_file():
        pytest.skip(f"{what} ImageNet weights not found at {path} (set {variable} to the file)")
    return path


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    return _weights_file(MOBILENET_WEIGHTS, "MobileNet", "BUSI_MOBILENET_WEIGHTS")


@pytest.fixture(scope="session")
def lite0_weights() -> Path:
    return _weights_file(LITE0_WEIGHTS, "EfficientNet-Lite0", "BUSI_EFFICIENTNET_LITE0_WEIGHTS")


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, so that its functions and main() run in this
    process (no second start-up of TensorFlow)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"busi_script_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up
    spec.loader.exec_module(module)
    return module
