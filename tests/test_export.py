"""``busi export``: deployable files whose predictions match the trained Keras model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import TINY

from busi.cli import main


@pytest.fixture(scope="module")
def mobilenet_run(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """A MobileNet classifier of the scan and its U-Net mask (mask_mode channel): two input
    channels and busi's own layer before the base, the harder case for every format (the
    one-channel models differ only in a plain Concatenate there)."""
    work = tmp_path_factory.mktemp("export")
    (work / "tiny.yaml").write_text(TINY.format(data=synth_root, work=work))
    # The U-Net on a MobileNet encoder (random weights: no file needed), whose encoder
    # starts the classifier (weights: unet): cpu.yaml's U-Net and issue 14's transfer path.
    assert main(["train-seg", "--config", str(work / "tiny.yaml"),
                 "--set", "model.unet.encoder=mobilenet",
                 "--set", "model.unet.input_norm=per_image"]) == 0
    assert main(["train-cls", "--model", "mobilenet", "--config", str(work / "tiny.yaml"),
                 "--set", "model.classifier.mask_mode=channel",
                 "--set", "model.classifier.weights=unet"]) == 0
    (run,) = list((work / "outputs" / "cls" / "mobilenet").iterdir())
    return run


def _run_exported(path: Path, x: np.ndarray) -> np.ndarray:
    """Class probabilities from the exported file itself, loaded here without busi's code."""
    if path.suffix == ".keras":
        import keras

        return keras.models.load_model(path).predict(x, verbose=0)
    import tensorflow as tf

    if path.is_dir():
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return list(serve(tf.constant(x)).values())[0].numpy()
    try:  # LiteRT, the runtime that replaces tf.lite.Interpreter
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806
    interp = Interpreter(model_path=str(path))
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *x.shape[1:]])
    interp.allocate_tensors()
    probs = []
    for sample in x:
        value = sample[None]
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            value = np.clip(np.round(value / scale + zero), -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], value)
        interp.invoke()
        y = interp.get_tensor(out["index"])[0]
        if out["dtype"] == np.int8:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        probs.append(y)
    return np.stack(probs)


# The largest |p_exported - p_keras| an export may have: float formats, rounding error;
# int8, what 8-bit weights, activations and outputs (1/256 steps) cost.
TOLERANCE = {"none": 1e-4, "int8": 0.05}


def check_agreement(reference: np.ndarray, exported: np.ndarray, quantize: str) -> float:
    """Compare an export's probabilities with the Keras model's own; return top-1 agreement.

    Every probability within the tolerance, and the same top-1 class wherever the Keras
    model's top two classes are further apart than twice the tolerance (an export within
    it cannot flip those; closer calls may flip under int8 rounding).
    """
    tol = TOLERANCE[quantize]
    diff = float(np.abs(reference - exported).max())
    assert diff <= tol, f"max |p - p_keras| {diff:.4f} > {tol}"
    top2 = np.sort(reference, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * tol
    agree = reference.argmax(1) == exported.argmax(1)
    assert agree[decisive].all(), f"{int((~agree[decisive]).sum())} clear calls changed class"
    return float(agree.mean())


@pytest.fixture(scope="module")
def keras_reference(mobilenet_run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's test inputs and the trained Keras model's probabilities on them."""
    import keras

    from busi.inference.export import run_inputs

    x, _, _ = run_inputs(mobilenet_run)
    return x, keras.models.load_model(mobilenet_run / "best.keras").predict(x, verbose=0)


@pytest.mark.parametrize("fmt,quantize", [("tflite", "none"), ("tflite", "int8"),
                                          ("savedmodel", "none"), ("keras", "none")])
def test_export_matches_the_keras_model(mobilenet_run: Path, keras_reference: tuple,
                                        tmp_path: Path, fmt: str, quantize: str) -> None:
    out = tmp_path / "export"
    assert main(["export", str(mobilenet_run), "--format", fmt, "--quantize", quantize,
                 "--out", str(out)]) == 0
    r = json.loads((out / "export.json").read_text())
    x, reference = keras_reference
    assert r["n_test"] == len(x) > 0
    agreement = check_agreement(reference, _run_exported(Path(r["path"]), x), quantize)
    assert r["top1_agreement"] == pytest.approx(agreement), "export.json says what was measured"
    if quantize == "int8":
        assert r["size_bytes"] < 0.5 * r["keras_size_bytes"]


def test_the_agreement_check_fails_for_a_wrong_model(mobilenet_run: Path,
                                                     keras_reference: tuple) -> None:
    """Other models of the same architecture in place of the export: rejected."""
    import keras

    x, reference = keras_reference
    for quantize in ("none", "int8"):
        check_agreement(reference, reference, quantize)
    shuffled = keras.models.load_model(mobilenet_run / "best.keras")
    rng = np.random.default_rng(0)
    shuffled.set_weights([rng.permutation(w.ravel()).reshape(w.shape)
                          for w in shuffled.get_weights()])
    with pytest.raises(AssertionError):
        check_agreement(reference, shuffled.predict(x, verbose=0), "none")
    biased = keras.models.load_model(mobilenet_run / "best.keras")  # leans to one class
    kernel, bias = biased.layers[-1].get_weights()
    biased.layers[-1].set_weights([kernel, bias + np.eye(len(bias))[0] * 2.0])
    for quantize in ("none", "int8"):
        with pytest.raises(AssertionError):
            check_agreement(reference, biased.predict(x, verbose=0), quantize)


def test_export_options_that_do_not_fit_are_clear_errors(
        mobilenet_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(mobilenet_run), "--format", "keras", "--quantize", "int8"]) == 2
    assert "tflite only" in capsys.readouterr().err
    assert main(["export", str(mobilenet_run.parent)]) == 2
    assert f"this is a folder of runs, not a run -- fix: pass one run folder, e.g. its newest " \
        f"finished run: {mobilenet_run}" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.keras").write_text("the user's own file")
    assert main(["export", str(mobilenet_run), "--format", "keras", "--out", str(full)]) == 2
    assert "--out exists and is not an empty folder" in capsys.readouterr().err
    assert (full / "model.keras").read_text() == "the user's own file"


def test_scan_and_mask_inputs_are_the_same_in_train_cls_evaluate_and_predict(
        mobilenet_run: Path, synth_root: Path, tmp_path: Path) -> None:
    """mask_mode channel: evaluate and predict (with Grad-CAM) build the two-channel input as
    train-cls did -- the same probabilities for the run's test images -- and the scan channel
    is the whole scan whatever the U-Net found."""
    import csv

    from busi.data.loading import load_dataset
    from busi.inference.predict import Predictor
    from busi.models.saving import load_model

    assert load_model(mobilenet_run / "best.keras").input_shape == (None, 32, 32, 2)
    assert list((mobilenet_run / "gradcam").glob("*_gradcam.png"))

    def probs(path: Path) -> dict[str, np.ndarray]:
        with open(path) as fh:
            return {r["file"]: np.array([float(v) for k, v in r.items() if k.startswith("p_")])
                    for r in csv.DictReader(fh)}

    trained = probs(mobilenet_run / "predictions.csv")
    # the run's own data on purpose (its test images' probabilities must match training's):
    # its training images are in it, so evaluate refuses it as a site without --allow-overlap
    assert main(["evaluate", "--data", str(synth_root), "--cls-run", str(mobilenet_run),
                 "--outputs", str(tmp_path / "o"), "--allow-overlap"]) == 0
    (ev,) = (tmp_path / "o" / "eval").iterdir()
    evaluated = probs(ev / "predictions.csv")
    for f, p in trained.items():
        np.testing.assert_allclose(evaluated[f], p, atol=2e-6, err_msg=f)
    work = mobilenet_run.parents[2]
    ds = load_dataset(synth_root, size=(32, 32), cache_dir=work / "cache")
    predictor = Predictor(cls_run=str(mobilenet_run))
    for f in sorted(trained)[:4]:
        image = ds.images[ds.index([f])[0]]
        mask, x, p = predictor(image)
        assert x.shape == (1, 32, 32, 2)
        np.testing.assert_array_equal(x[0, ..., 0], image)
        np.testing.assert_array_equal(x[0, ..., 1], 255 * (mask > 0))
        np.testing.assert_allclose(p, trained[f], atol=2e-6, err_msg=f)
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(synth_root / "malignant" / "malignant (1).png", scans)
    assert main(["predict", str(scans), "--cls-run", str(mobilenet_run),
                 "--out", str(tmp_path / "p"), "--explain"]) == 0
    assert (tmp_path / "p" / "malignant_(1)_gradcam.png").is_file()
