"""Runtime set-up shared by every training command: backend, precision, seeds."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path


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
        try:
            import keras
        except ImportError as exc:
            from busi.errors import BusiError

            backend = os.environ.get("KERAS_BACKEND", "tensorflow")
            raise BusiError(f"Keras cannot load its {backend} backend ({exc})",
                            where="KERAS_BACKEND",
                            fix="pip install 'busi[tensorflow]' or 'busi[jax]', or set "
                                "KERAS_BACKEND to an installed backend") from None

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices()  # device discovery prints its own lines
            # "N out of the last N calls ... triggered tf.function retracing": each member
            # of a fold ensemble traces its own predict function once, as it should.
            tf.get_logger().setLevel("ERROR")
    return keras


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True if the CPU computes bfloat16 natively (AVX512-BF16 or AMX).

    Without it, TensorFlow emulates bfloat16 and ``mixed_bfloat16`` is slower than
    float32, not faster: measured here on a 2-core Xeon with AVX-512 but no BF16
    flags, the base-24 U-Net trained at 20 img/s in float32 and 3.9 img/s in
    bfloat16 (docs/PERFORMANCE.md), where a CPU with AMX gave 1.86x the other way.
    """
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str) -> str:
    """``auto``: ``mixed_bfloat16`` on a GPU or a CPU with native bfloat16, else float32."""
    if precision != "auto":
        return precision
    keras = import_keras()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # Physical, not logical: listing logical devices would fix TensorFlow's device set
        # before runtime.cpu_devices splits the CPU (a CV resolves before its first fold).
        gpu = bool(tf.config.list_physical_devices("GPU"))
    else:
        # The backend's default devices: GPUs where there are any, else CPU.
        gpu = any(d.lower().startswith("gpu") for d in keras.distribution.list_devices())
    return "mixed_bfloat16" if gpu or cpu_has_bf16() else "float32"


def precision_hint(precision: str) -> str:
    """A note for a float32 run on a machine where ``auto`` would pick bfloat16, else "".

    The paper's configs pin float32 (the paper's, and safe where bfloat16 is emulated,
    4.9x slower); on a CPU that computes bfloat16 the same run is 1.8-3.6x faster in
    ``mixed_bfloat16`` (docs/PERFORMANCE.md), hours at the paper's width: worth a line.
    """
    if precision != "float32" or resolve_precision("auto") != "mixed_bfloat16":
        return ""
    return (" (this machine computes bfloat16 natively: --set runtime.precision=auto trains "
            "in mixed_bfloat16, 1.8-3.6x faster on such CPUs, docs/PERFORMANCE.md)")


def resolve_config(cfg):
    """``cfg`` with ``runtime.precision: auto`` replaced by what it resolves to here.

    A run folder records this, not ``auto``: ``busi rerun`` and ``--resume`` read
    the run's config.yaml back, and on another machine ``auto`` may resolve to
    another precision, which would make the rerun a different run.
    """
    import dataclasses

    rt = cfg.runtime
    if rt.precision != "auto":
        return cfg
    if rt.distribution == "data_parallel":
        # Resolving lists the devices, and with several JAX processes nothing may touch
        # a device before they are connected (a CV writes its config before any fold).
        _connect_processes(rt)
    return dataclasses.replace(
        cfg, runtime=dataclasses.replace(rt, precision=resolve_precision(rt.precision)))


def setup(seed: int, precision: str = "float32", deterministic: bool = False) -> str:
    """Seed every generator and set the dtype policy before any model is built.

    Returns the policy set (``auto`` resolved), for the run's record.
    """
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    precision = resolve_precision(precision)
    keras.mixed_precision.set_dtype_policy(precision)
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    return precision


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
    elif info["backend"] == "jax":
        import jax

        info["devices"] = ", ".join(str(d) for d in jax.devices())
        info["jax_processes"] = str(jax.process_count())
    return info


# --------------------------------------------------------------------------- distribution

_SCOPE: dict[str, object] = {"strategy": None, "process": (0, 1), "devices": 1}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        from busi.errors import BusiError

        raise BusiError(f"{name}={value!r} is not an integer", where=name,
                        fix=f"set {name} to a whole number, or unset it") from None


def setup_distribution(rt) -> tuple[int, int]:
    """Set up ``runtime.distribution``; return (this process's index, process count).

    ``mirrored``: ``tf.distribute.MirroredStrategy`` over the local devices
    (TensorFlow backend); models are built inside :func:`model_scope`.
    ``data_parallel``: ``keras.distribution.DataParallel`` over every device of
    every process (JAX backend); with several processes,
    ``keras.distribution.initialize`` (``jax.distributed.initialize``) connects
    them first. The global batch is ``batch_size``; each process feeds its share.
    """
    from busi.errors import BusiError

    keras = import_keras()
    backend = keras.backend.backend()
    if rt.cpu_devices and backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        with contextlib.suppress(RuntimeError):  # already initialised earlier in this process
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * rt.cpu_devices)
    _SCOPE["strategy"], _SCOPE["process"], _SCOPE["devices"] = None, (0, 1), 1
    if rt.distribution == "none":
        return 0, 1
    if rt.distribution == "mirrored":
        if backend != "tensorflow":
            raise BusiError(f"runtime.distribution: mirrored needs the TensorFlow backend, not "
                            f"{backend}", where="runtime.distribution",
                            fix="use data_parallel with KERAS_BACKEND=jax, or KERAS_BACKEND="
                                "tensorflow")
        import tensorflow as tf

        _SCOPE["strategy"] = tf.distribute.MirroredStrategy()
        _SCOPE["devices"] = _SCOPE["strategy"].num_replicas_in_sync
        print(f"distribution: MirroredStrategy over "
              f"{_SCOPE['strategy'].num_replicas_in_sync} device(s)")
        return 0, 1
    if backend != "jax":
        raise BusiError(f"runtime.distribution: data_parallel needs the JAX backend, not "
                        f"{backend} (keras.distribution supports JAX only)",
                        where="runtime.distribution",
                        fix="run with KERAS_BACKEND=jax, or use mirrored on TensorFlow")
    _connect_processes(rt)
    import jax

    devices = keras.distribution.list_devices()
    # Batches already give each process its own slice of every global batch.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    _SCOPE["process"] = (jax.process_index(), jax.process_count())
    _SCOPE["devices"] = len(devices)
    print(f"distribution: DataParallel over {len(devices)} device(s), process "
          f"{_SCOPE['process'][0] + 1} of {_SCOPE['process'][1]}")
    return _SCOPE["process"]


def _connect_processes(rt) -> None:
    """Connect the processes of a multi-process ``data_parallel`` run (JAX), once.

    Must come before anything touches a JAX device (``jax.devices()`` included);
    a single process has nothing to connect.
    """
    from busi.errors import BusiError

    keras = import_keras()
    n = rt.num_processes or _env_int("BUSI_NUM_PROCESSES", 1)
    if n <= 1 or keras.backend.backend() != "jax":  # setup_distribution says why not JAX
        return
    pid = rt.process_id if rt.process_id >= 0 else _env_int("BUSI_PROCESS_ID", 0)
    address = rt.coordinator_address or os.environ.get("BUSI_COORDINATOR_ADDRESS", "")
    if not address:
        raise BusiError(f"{n} processes need a coordinator address",
                        where="runtime.coordinator_address",
                        fix="set runtime.coordinator_address=HOST:PORT (process 0's host) "
                            "or BUSI_COORDINATOR_ADDRESS on every process")
    if not 0 <= pid < n:
        raise BusiError(f"process id {pid} is outside 0..{n - 1}", where="runtime.process_id",
                        fix="give each process a distinct id from 0 to num_processes-1")
    import jax

    if not jax.distributed.is_initialized():
        keras.distribution.initialize(address, n, pid)


def end_distribution() -> None:
    """Back to one device for what follows training (prediction, metrics, reports).

    Every process then evaluates the best checkpoint on its own, on whole
    arrays; outputs of processes other than 0 go to their workers/ folders.
    """
    keras = import_keras()
    if keras.backend.backend() == "jax":
        keras.distribution.set_distribution(None)
    _SCOPE["strategy"], _SCOPE["process"], _SCOPE["devices"] = None, (0, 1), 1


def model_scope():
    """Where models must be built and loaded: the strategy's scope, or nothing."""
    strategy = _SCOPE["strategy"]
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def batch_multiple() -> int:
    """Batches must be a multiple of this: the number of devices training in sync."""
    return int(_SCOPE["devices"])  # type: ignore[call-overload]


def process() -> tuple[int, int]:
    """(index, count) of this training process; (0, 1) unless multi-process."""
    return _SCOPE["process"]  # type: ignore[return-value]
