"""The pipeline on the JAX backend, on a machine without TensorFlow.

Each test runs ``busi`` in a fresh interpreter with a finder that refuses
``tensorflow``, so any import of TensorFlow fails as it would where it is not
installed, and with KERAS_BACKEND unset, so busi has to pick JAX itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from test_demo import TINY

pytestmark = pytest.mark.skipif(find_spec("jax") is None,
                                reason="JAX not installed (pip install -e '.[dev]')")

NO_TF = """
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
from busi.cli import main
sys.exit(main(sys.argv[1:]))
"""


def busi_without_tensorflow(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return subprocess.run([sys.executable, "-c", NO_TF, *argv], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.parametrize("models", [
    "cnn",
    # JAX compiles VGG19 and MobileNet for minutes on 2 cores: on demand (pytest -m slow);
    # tests/test_models.py builds them with keras.ops only, on either backend.
    pytest.param("cnn,vgg19,mobilenet", marks=pytest.mark.slow)])
def test_demo_pipeline_runs_on_jax_without_tensorflow(tmp_path: Path, models: str) -> None:
    work = tmp_path / "demo"
    argv = ["demo", "--outputs", str(work), "--per-class", "8", "--models", models]
    for item in TINY:
        argv += ["--set", item]
    out = busi_without_tensorflow(*argv)
    assert out.returncode == 0, out.stderr[-3000:]
    for word in ("precision", "recall", "Side by side"):
        assert word in out.stdout
    (seg,) = list((work / "seg").iterdir())
    env = json.loads((seg / "state.json").read_text())["environment"]
    assert env["backend"] == "jax" and "tensorflow" not in env
    for model in models.split(","):
        (run,) = list((work / "cls" / model).iterdir())
        assert (run / "predictions.csv").is_file() and (run / "report.html").is_file(), model
        assert list((run / "gradcam").glob("*.png")), model


@pytest.mark.parametrize("command", ["demo", "train-seg"])
def test_image_data_generator_without_tensorflow_names_the_extra(
        tmp_path: Path, synth_root: Path, command: str) -> None:
    """The paper's engine lives in tf.keras: without TensorFlow it is refused before any data
    is written or read and before a run folder exists, not at the first training batch."""
    work = tmp_path / "d"
    argv = (["demo", "--outputs", str(work), "--per-class", "4"] if command == "demo" else
            ["train-seg", "--config", "demo", "--data", str(synth_root), "--outputs", str(work),
             "--set", f"data.cache_dir={tmp_path / 'cache'}",
             "--set", f"split.manifest_dir={tmp_path / 'splits'}"])
    out = busi_without_tensorflow(*argv, "--set", "augmentation.engine=image_data_generator",
                                  *sum((["--set", t] for t in TINY), []))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "busi[tensorflow]" in out.stderr and "augmentation.engine" in out.stderr
    assert "Traceback" not in out.stderr
    assert not work.exists(), sorted(p.name for p in work.rglob("*"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "splits").exists()
