"""``busi export RUN``: a trained model in a deployable format, checked against the original.

Formats: ``keras`` (the ``.keras`` file, any backend), ``savedmodel`` (TensorFlow
Serving / TF.js converters) and ``tflite`` (phones, edge devices), optionally
with full-integer ``int8`` quantisation calibrated on training images. Every
export is verified: the exported model is run on the run's own test images
and compared with the Keras model (classifier: top-1 agreement; U-Net: Dice
between the two masks), and the figures go into ``export.json``.

SavedModel and TFLite are TensorFlow formats, so they need the TensorFlow
backend; the error says so on JAX.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from busi import runtime
from busi.errors import BusiError
from busi.models.saving import load_model
from busi.runs import (
    atomic_write,
    new_run_dir,
    read_config,
    read_split,
    require_run,
    resolve_seg_run,
    run_kind,
    write_json,
)

FORMATS = ("keras", "savedmodel", "tflite")


def run_inputs(run: Path, part: str = "test") -> tuple[np.ndarray, np.ndarray, str]:
    """The model inputs of a run's split part, exactly as in training: (x float32, labels, kind).

    Classifier runs: images masked by their segmentation run's stored masks. U-Net
    runs: images scaled to 0..1.
    """
    from busi.data.loading import dataset_from_config
    from busi.data.split import read_manifest

    cfg = read_config(run)
    split = read_split(run)
    ds = dataset_from_config(cfg)
    manifest = read_manifest(split["manifest"], cfg.split.val_size, cfg.runtime.seed)
    idx = ds.index(manifest.partition(split.get("fold"))[part])
    if "seg_run" not in split:
        return (ds.images[idx][..., None] / 255.0).astype("float32"), ds.masks[idx], "seg"
    from busi.models.inputs import classifier_inputs, classifier_masks, needs_originals

    c = cfg.model.classifier
    seg = (resolve_seg_run(split["seg_run"], cfg.outputs.root,
                           option="the classifier's split.json (seg_run)")
           if split.get("seg_run") else None)
    masks = classifier_masks(cfg, ds, seg)
    if needs_originals(c) and masks is not None:
        from busi.data.loading import original_images

        x = classifier_inputs(ds.images[idx], masks[idx], c, original_images(ds, idx))
    else:
        x = classifier_inputs(ds.images, masks, c)[idx]
    return x.astype("float32"), ds.labels[idx], "cls"


def _as_float32(obj):
    """A model config with every mixed-precision dtype policy replaced by float32."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: _as_float32(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_float32(v) for v in obj]
    return obj


def float32_model(model):
    """The same model computing in float32 (weights are float32 already under mixed precision).

    TFLite and most runtimes have no bfloat16 kernels; a model trained with
    ``mixed_bfloat16`` is exported in float32, and the export check measures
    what that changes.
    """
    if all(layer.compute_dtype == "float32" for layer in model.layers):
        return model
    clone = model.__class__.from_config(_as_float32(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


def _tflite_predict(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    try:  # LiteRT: the TFLite runtime that replaces the deprecated tf.lite.Interpreter
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tensorflow.lite import Interpreter

    interp = Interpreter(model_content=model_bytes, num_threads=2)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *x.shape[1:]])
    interp.allocate_tensors()
    results = []
    for sample in x:
        value = sample[None]
        if inp["dtype"] != np.float32:  # integer input: quantise with the model's own scale
            scale, zero = inp["quantization"]
            value = np.clip(np.round(value / scale + zero), np.iinfo(inp["dtype"]).min,
                            np.iinfo(inp["dtype"]).max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], value)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        results.append(y[0])
    return np.stack(results)


def _to_tflite(model, quantize: str, calibration: np.ndarray) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="busi-export-") as name:
        tmp = Path(name)
        model.export(str(tmp / "sm"), format="tf_saved_model", verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(tmp / "sm"))
        if quantize == "int8":
            def representative():
                for sample in calibration:
                    yield [sample[None]]

            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        return conv.convert()


def _agreement(kind: str, reference: np.ndarray, exported: np.ndarray,
               labels: np.ndarray) -> dict:
    if kind == "cls":
        ref, exp = reference.argmax(1), exported.argmax(1)
        return {"top1_agreement": float((ref == exp).mean()),
                "accuracy_keras": float((ref == labels).mean()),
                "accuracy_exported": float((exp == labels).mean()),
                "max_abs_prob_diff": float(np.abs(reference - exported).max())}
    from busi.evaluation.segmentation import dice

    a, b = reference[..., 0] > 0.5, exported[..., 0] > 0.5
    return {"mask_dice_vs_keras": float(np.mean([dice(p, q) for p, q in zip(a, b,
                                                                              strict=True)])),
            "max_abs_prob_diff": float(np.abs(reference - exported).max())}


def export_run(run_dir: str | Path, fmt: str = "tflite", quantize: str = "none",
               out: str | None = None, outputs_root: str = "outputs") -> Path:
    """Export a finished run's best checkpoint; verify it on the run's test images."""
    keras = runtime.import_keras()

    run = Path(run_dir)
    if not run.is_dir():
        raise BusiError("run folder not found", where=str(run),
                        fix="pass a folder under outputs/seg/ or outputs/cls/<model>/")
    kind = run_kind(run)  # a clear error for a folder without config.yaml / split.json
    # A CV run or an evaluation folder: said so, with the run inside it to export instead.
    require_run(run, kind if kind in ("seg", "cls") else "cls", option="`busi export`",
                needs=("best.keras",))
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise BusiError("--out exists and is not an empty folder", where=out,
                        fix="choose a new or empty --out folder; busi export never overwrites")
    if fmt not in FORMATS:
        raise BusiError(f"unknown format {fmt!r}", where="--format", fix=f"use {'|'.join(FORMATS)}")
    if quantize != "none" and fmt != "tflite":
        raise BusiError("--quantize int8 applies to --format tflite only", where="--quantize",
                        fix="add --format tflite, or drop --quantize")
    if fmt != "keras" and keras.backend.backend() != "tensorflow":
        raise BusiError(f"--format {fmt} is a TensorFlow format; the backend is "
                        f"{keras.backend.backend()}", where="KERAS_BACKEND",
                        fix="run the export with KERAS_BACKEND=tensorflow "
                            "(pip install 'busi[tensorflow]'); a .keras file loads on any backend")
    trained = load_model(run / "best.keras")
    x, labels, kind = run_inputs(run)
    print(f"busi export: {'U-Net' if kind == 'seg' else 'classifier'} run {run}")
    # The reference is the model as trained (its own precision), so the check covers
    # every change the export makes, float32 conversion included.
    reference = trained.predict(x, batch_size=32, verbose=0).astype(np.float32)
    model = trained if fmt == "keras" else float32_model(trained)
    dest = Path(out) if out else new_run_dir(Path(outputs_root) / "export",
                                             f"{run.parent.name}-{run.name}-{fmt}"
                                             + ("-int8" if quantize == "int8" else ""))
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if fmt == "keras":
        path = dest / "model.keras"
        shutil.copyfile(run / "best.keras", path)
        exported = load_model(path).predict(x, batch_size=32, verbose=0)
    elif fmt == "savedmodel":
        import tensorflow as tf

        path = dest / "savedmodel"
        model.export(str(path), format="tf_saved_model", verbose=False)
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        exported = np.concatenate([list(serve(tf.constant(x[i:i + 32])).values())[0].numpy()
                                   for i in range(0, len(x), 32)])
    else:
        calib, _, _ = run_inputs(run, "train")
        calib = calib[np.random.default_rng(0).permutation(len(calib))[:200]]
        blob = _to_tflite(model, quantize, calib)
        path = atomic_write(dest / ("model_int8.tflite" if quantize == "int8" else "model.tflite"),
                            blob)
        exported = _tflite_predict(blob, x)
    seconds = time.perf_counter() - t0
    exported = np.asarray(exported, np.float32)
    extra = {}
    if model is not trained:  # mixed precision: also compare with the float32 Keras model
        ref32 = model.predict(x, batch_size=32, verbose=0).astype(np.float32)
        extra = {f"{k}_vs_float32_keras": v
                 for k, v in _agreement(kind, ref32, exported, labels).items()
                 if k in ("top1_agreement", "mask_dice_vs_keras", "max_abs_prob_diff")}
    size = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
            else path.stat().st_size)
    result = {"run": str(run), "format": fmt, "quantize": quantize, "path": str(path),
              "size_bytes": int(size),
              "keras_size_bytes": int((run / "best.keras").stat().st_size),
              "n_test": int(len(x)), "export_seconds": round(seconds, 1),
              "trained_precision": next((layer.dtype_policy.name for layer in trained.layers
                                         if layer.compute_dtype != "float32"), "float32"),
              **_agreement(kind, reference, exported, labels), **extra}
    if (run / "masks.npz").is_file():
        from busi.models.masks import unet_members

        members = unet_members(run)
        if len(members) > 1:
            result["ensemble_note"] = (
                f"this run segments with a fold ensemble of {len(members)} U-Nets; the export "
                "holds the final U-Net alone, which is what the agreement figures compare")
    write_json(dest / "export.json", result)
    return dest


def summary(result_dir: Path) -> str:
    r = json.loads((result_dir / "export.json").read_text())
    lines = [f"exported {r['format']}{' int8' if r['quantize'] == 'int8' else ''}: {r['path']} "
             f"({r['size_bytes'] / 1e6:.2f} MB; .keras {r['keras_size_bytes'] / 1e6:.2f} MB)"]
    if "top1_agreement" in r:
        lines.append(f"  top-1 agreement with the Keras model on {r['n_test']} test images: "
                     f"{r['top1_agreement']:.3f} (accuracy {r['accuracy_keras']:.3f} Keras, "
                     f"{r['accuracy_exported']:.3f} exported)")
    else:
        lines.append(f"  mask Dice vs the Keras model on {r['n_test']} test images: "
                     f"{r['mask_dice_vs_keras']:.3f}")
    lines.append(f"  max |probability difference| {r['max_abs_prob_diff']:.4f}")
    if "top1_agreement_vs_float32_keras" in r:
        lines.append(f"  the run trained in {r['trained_precision']}; exported in float32. "
                     f"Agreement with the float32 Keras model: "
                     f"{r['top1_agreement_vs_float32_keras']:.3f}")
    elif "mask_dice_vs_keras_vs_float32_keras" in r:
        lines.append(f"  the run trained in {r['trained_precision']}; exported in float32. "
                     f"Mask Dice vs the float32 Keras model: "
                     f"{r['mask_dice_vs_keras_vs_float32_keras']:.3f}")
    if "ensemble_note" in r:
        lines.append(f"  note: {r['ensemble_note']}")
    return "\n".join(lines)
