"""A run records the precision ``runtime.precision: auto`` resolved to, not ``auto``.

``auto`` is a choice per machine (bfloat16 on a GPU or a CPU that computes it, else
float32), so a run folder that said ``auto`` would be rerun or resumed in another
precision elsewhere. Two machines are played here by what ``auto`` resolves to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from busi import runtime
from busi.cli import main
from busi.config import dump_yaml, load_config
from busi.runs import read_config, write_config

TINY = """
data: {{root: {data}, image_size: [32, 32], cache_dir: {work}/cache}}
split: {{manifest_dir: {work}/splits, test_size: 0.25}}
augmentation: {{engine: none}}
model: {{unet: {{base_filters: 4, depth: 2}}}}
training: {{seg: {{loss: bce_dice, batch_size: 8, epochs: 1, steps_per_epoch: 1}}}}
runtime: {{precision: auto}}
outputs: {{root: {work}/outputs}}
"""


def machine(monkeypatch: pytest.MonkeyPatch, auto: str) -> None:
    """Be a machine on which ``auto`` resolves to ``auto``'s argument."""
    real = runtime.resolve_precision
    monkeypatch.setattr(runtime, "resolve_precision",
                        lambda precision: auto if precision == "auto" else real(precision))


@pytest.fixture
def float32_after():
    """Training sets the global dtype policy; the tests after these expect float32."""
    yield
    runtime.import_keras().mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    work = tmp_path_factory.mktemp("precision")
    (work / "tiny.yaml").write_text(TINY.format(data=synth_root, work=work))
    return work


@pytest.mark.parametrize("auto", ["mixed_bfloat16", "float32"])
def test_a_written_config_records_what_auto_resolved_to(
        auto: str, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every config.yaml goes through write_config: train-seg's, train-cls's, a CV's and its
    fold runs'."""
    machine(monkeypatch, auto)
    cfg = load_config(work / "tiny.yaml")
    assert cfg.runtime.precision == "auto"
    write_config(tmp_path, cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert read_config(tmp_path).runtime.precision == auto
    assert f"precision was auto; it resolved to {auto}" in text  # what was asked, said
    explicit = load_config(work / "tiny.yaml", ["runtime.precision=mixed_float16"])
    write_config(tmp_path, explicit)
    assert (tmp_path / "config.yaml").read_text() == dump_yaml(explicit)


def test_rerun_on_another_machine_trains_in_the_recorded_precision(
        work: Path, monkeypatch: pytest.MonkeyPatch, float32_after: None) -> None:
    import busi.training.segmentation

    machine(monkeypatch, "float32")  # a CPU without native bfloat16
    assert main(["train-seg", "--config", str(work / "tiny.yaml"), "--name", "first"]) == 0
    (run,) = (work / "outputs" / "seg").glob("*-first")
    assert yaml.safe_load((run / "config.yaml").read_text())["runtime"]["precision"] == "float32"
    assert json.loads((run / "state.json").read_text())["precision"] == "float32"

    machine(monkeypatch, "mixed_bfloat16")  # a GPU, where auto would be bfloat16
    seen = {}
    monkeypatch.setattr(busi.training.segmentation, "train_segmentation",
                        lambda cfg, **kw: seen.setdefault("cfg", cfg))
    assert main(["rerun", str(run)]) == 0
    # what train-seg hands runtime.setup
    assert runtime.resolve_precision(seen["cfg"].runtime.precision) == "float32"

    # scripts/seg_eval.py reads the run's recorded config back
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import seg_eval

    assert seg_eval.main([str(run), "--part", "test"]) == 0


def test_a_float32_run_is_told_when_auto_would_train_in_bfloat16(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """paper.yaml pins float32: on a CPU with native bfloat16 that is hours at its width."""
    machine(monkeypatch, "mixed_bfloat16")
    assert "--set runtime.precision=auto" in runtime.precision_hint("float32")
    assert runtime.precision_hint("mixed_bfloat16") == ""  # already fast
    machine(monkeypatch, "float32")  # bfloat16 emulated: float32 is the fast one
    assert runtime.precision_hint("float32") == ""
