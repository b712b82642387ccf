"""runtime.distribution: the same training on one device, on two, and in two processes.

Each run is a fresh ``busi train-seg`` process (device counts are fixed when a
backend starts). Dropout and augmentation are off, so the only difference
between runs is how the batch is spread; the loss per epoch must agree.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

CONFIG = """
data: {{root: {data}, image_size: [32, 32], cache_dir: {work}/cache}}
split: {{manifest_dir: {work}/splits, test_size: 0.25}}
augmentation: {{engine: none}}
model:
  unet: {{base_filters: 4, depth: 2, encoder_dropout: 0.0, decoder_dropout: 0.0}}
training:
  seg: {{loss: bce_dice, learning_rate: 0.003, batch_size: 8, epochs: 3, steps_per_epoch: 3}}
runtime: {{deterministic: true}}
outputs: {{root: {work}/outputs}}
"""
needs_jax = pytest.mark.skipif(find_spec("jax") is None, reason="JAX not installed")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    work = tmp_path_factory.mktemp("dist")
    (work / "c.yaml").write_text(CONFIG.format(data=synth_root, work=work))
    return work


def train(work: Path, name: str, *sets: str, backend: str = "tensorflow",
          env: dict[str, str] | None = None, wait: bool = True):
    argv = [sys.executable, "-m", "busi.cli", "train-seg", "--config", str(work / "c.yaml"),
            "--set", f"outputs.run_name={name}"]
    for s in sets:
        argv += ["--set", s]
    full_env = {**os.environ, "KERAS_BACKEND": backend, **(env or {})}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)
    return proc.communicate(timeout=600) + (proc.returncode,) if wait else proc


def losses(work: Path, name: str, root: str = "outputs") -> np.ndarray:
    (run,) = list((work / root / "seg").glob(f"*-{name}"))
    with open(run / "history.csv", newline="") as fh:
        return np.array([float(r["loss"]) for r in csv.DictReader(fh)])


def test_mirrored_on_two_cpu_devices_follows_one_device(work: Path) -> None:
    # both runs at once: most of each is start-up, which the two cores share well
    procs = [train(work, "tf1", wait=False),
             train(work, "tf2", "runtime.distribution=mirrored", "runtime.cpu_devices=2",
                   wait=False)]
    (_, err1, rc1), (out, err, rc) = [p.communicate(timeout=600) + (p.returncode,)
                                      for p in procs]
    assert rc1 == 0, err1[-2000:]
    assert rc == 0, err[-2000:]
    assert "MirroredStrategy over 2 device(s)" in out
    one, two = losses(work, "tf1"), losses(work, "tf2")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=2e-3)


@needs_jax
def test_data_parallel_on_two_jax_devices_follows_one_device(work: Path) -> None:
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [train(work, "jax1", backend="jax", wait=False),
             train(work, "jax2", "runtime.distribution=data_parallel", backend="jax",
                   env=flags, wait=False)]
    (_, err1, rc1), (out, err, rc) = [p.communicate(timeout=600) + (p.returncode,)
                                      for p in procs]
    assert rc1 == 0, err1[-2000:]
    assert rc == 0, err[-2000:]
    assert "DataParallel over 2 device(s)" in out
    np.testing.assert_allclose(losses(work, "jax2"), losses(work, "jax1"), rtol=2e-3)


@needs_jax
@pytest.mark.slow  # 30 s of two JAX start-ups; the multi-host path, run with `pytest -m slow`
def test_two_jax_processes_on_localhost_follow_one_process(work: Path) -> None:
    if not list((work / "outputs" / "seg").glob("*-jax1")):
        assert train(work, "jax1", backend="jax")[2] == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [train(work, "jax2p", "runtime.distribution=data_parallel", backend="jax",
                   env={"BUSI_COORDINATOR_ADDRESS": f"localhost:{port}",
                        "BUSI_NUM_PROCESSES": "2", "BUSI_PROCESS_ID": str(i)}, wait=False)
             for i in (0, 1)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for _out, err, rc in results:
        assert rc == 0, err[-2000:]
    assert "process 1 of 2" in results[0][0] and "process 2 of 2" in results[1][0]
    # process 0 owns the run folder; process 1 writes under workers/
    np.testing.assert_allclose(losses(work, "jax2p"), losses(work, "jax1"), rtol=2e-3)
    assert list((work / "outputs" / "workers" / "process1" / "seg").glob("*-jax2p"))


@pytest.mark.parametrize("backend,distribution,needs", [
    ("tensorflow", "data_parallel", "JAX backend"),
    ("jax", "mirrored", "TensorFlow backend"),
])
def test_distribution_on_the_wrong_backend_is_a_clear_error(
        work: Path, backend: str, distribution: str, needs: str) -> None:
    if backend == "jax" and find_spec("jax") is None:
        pytest.skip("JAX not installed")
    out, err, rc = train(work, f"wrong-{backend}", f"runtime.distribution={distribution}",
                         backend=backend)
    assert rc == 2 and needs in err and "Traceback" not in err
