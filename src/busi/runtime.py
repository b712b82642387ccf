"""Runtime set-up shared by every training command: backend, precision, seeds."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Silence C++ start-up lines that TF 2.21 prints whatever TF_CPP_MIN_LOG_LEVEL says.

    Only file descriptor 2 is redirected, and only while the backend is imported;
    Python exceptions still propagate normally.
    """
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_keras():
    """Import Keras (and TensorFlow, with that backend) quietly; return the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_silenced():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()  # device discovery prints its own lines
    return keras


def setup(seed: int, precision: str = "float32", deterministic: bool = False) -> None:
    """Seed every generator and set the dtype policy before any model is built."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_dtype_policy(precision)
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def git_commit() -> str:
    """Commit of the busi source tree (with '+dirty' for local edits), or 'unknown'."""
    import subprocess
    from pathlib import Path

    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=src,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment() -> dict[str, str]:
    """What a rerun needs to know about where a run ran."""
    keras = import_keras()
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "keras": keras.__version__, "backend": keras.backend.backend(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": str(os.cpu_count())}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("busi", "numpy", "scikit-learn", "opencv-python-headless", "scipy", "jax"):
        with contextlib.suppress(PackageNotFoundError):
            info[dist] = version(dist)
    info["git_commit"] = git_commit()
    if info["backend"] == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["devices"] = ", ".join(d.name for d in tf.config.list_logical_devices())
    return info
