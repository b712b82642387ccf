"""Grad-CAM heatmaps: where in the image a classifier looked for the class it chose.

Grad-CAM (Selvaraju et al., 2017) weighs the last spatial feature map of the
network by the gradient of the class score, averaged over positions. The
model is cut in two Keras models at its last 4-D layer -- ``features`` (image
-> feature map) and ``head`` (feature map -> probabilities) -- so the heatmap
code is plain ``keras.ops``; only the gradient needs the backend's own
autodiff (TensorFlow's GradientTape or ``jax.grad``), kept in ``_gradients``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from busi import runtime

keras = runtime.import_keras()


def split_model(model) -> tuple:
    """(features, head): the model cut after its last layer with a 4-D (spatial) output."""
    layers = model.layers
    cut = max(i for i, layer in enumerate(layers)
              if len(getattr(layer, "output", None).shape or ()) == 4)
    target = layers[cut]
    # The tensor this layer produced in *this* model's graph: for a nested base
    # model, ``target.output`` is the base's inner output, not connected here.
    out = target._inbound_nodes[-1].output_tensors[0]
    features = keras.Model(model.inputs[0], out, name="gradcam_features")
    x = inp = keras.Input(out.shape[1:])
    for layer in layers[cut + 1:]:
        x = layer(x)
    return features, keras.Model(inp, x, name="gradcam_head")


def _gradients(head, feats, class_idx: np.ndarray):
    """d score[class] / d feature map, for a batch; the one backend-specific step."""
    backend = keras.backend.backend()
    onehot = keras.ops.one_hot(class_idx, head.output.shape[-1])
    if backend == "tensorflow":
        import tensorflow as tf

        a = tf.convert_to_tensor(feats)
        with tf.GradientTape() as tape:
            tape.watch(a)
            score = tf.reduce_sum(head(a, training=False) * onehot)
        return tape.gradient(score, a).numpy()
    if backend == "jax":
        import jax

        tv = [v.value for v in head.trainable_variables]
        ntv = [v.value for v in head.non_trainable_variables]

        def score(a):
            probs, _ = head.stateless_call(tv, ntv, a, training=False)
            return (probs * onehot).sum()

        return np.asarray(jax.grad(score)(feats))
    if backend == "torch":
        import torch

        a = torch.tensor(np.asarray(feats), requires_grad=True)
        (head(a, training=False) * torch.as_tensor(np.asarray(onehot))).sum().backward()
        return a.grad.numpy()
    raise NotImplementedError(f"Grad-CAM has no gradient for backend {backend!r}")


def gradcam(model, x: np.ndarray, class_idx: np.ndarray | None = None,
            parts: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] at the input size, and the probabilities.

    ``x`` are the classifier's inputs (N, H, W, C) in 0..255, as
    :func:`busi.models.inputs.classifier_inputs` makes them; ``class_idx`` defaults to
    the predicted class of each image.
    """
    features, head = parts or split_model(model)
    xb = np.asarray(x).astype("float32")
    feats = keras.ops.convert_to_numpy(features(xb, training=False)).astype("float32")
    probs = keras.ops.convert_to_numpy(head(feats, training=False))
    if class_idx is None:
        class_idx = probs.argmax(axis=1)
    grads = _gradients(head, feats, np.asarray(class_idx))
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((weights * feats).sum(axis=-1), 0.0)
    h, w = x.shape[1:3]
    out = np.zeros((len(x), h, w), np.float32)
    for i, c in enumerate(cam):
        up = cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR)
        peak = up.max()
        out[i] = up / peak if peak > 0 else up
    return out, probs


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """BGR image: the gray (or already BGR) image with the heatmap (jet colour map) blended
    over it."""
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = gray if gray.ndim == 3 else cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(colour, alpha, base, 1 - alpha, 0)


def sample(y_true: np.ndarray, y_pred: np.ndarray, n_right: int = 4, n_wrong: int = 4,
           seed: int = 0) -> list[int]:
    """A fixed sample of indices: up to ``n_right`` correct and ``n_wrong`` wrong predictions."""
    rng = np.random.default_rng(seed)
    right, wrong = np.flatnonzero(y_true == y_pred), np.flatnonzero(y_true != y_pred)
    pick = [rng.permutation(right)[:n_right], rng.permutation(wrong)[:n_wrong]]
    return sorted(int(i) for i in np.concatenate(pick))


def input_view(x: np.ndarray) -> np.ndarray:
    """A classifier input (H, W, C) as a BGR picture: its gray image, and for a
    (scan, mask) input the mask's outline in green over the scan."""
    view = cv2.cvtColor(np.ascontiguousarray(x[..., 0]).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    if x.shape[-1] > 1:
        contours, _ = cv2.findContours((x[..., 1] > 0).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(view, contours, -1, (0, 255, 0), 1)
    return view


def save_panels(out_dir: Path, files: list[str], images: np.ndarray, inputs: np.ndarray,
                heat: np.ndarray, y_true: list[str] | None, y_pred: list[str],
                conf: np.ndarray, scale: int = 2) -> list[Path]:
    """One PNG per image: [image | classifier input + heatmap], captioned true/pred.

    ``inputs`` are the classifier's inputs (N, H, W, C); a mask channel is drawn as the
    mask's outline, so the panel shows where the U-Net's mask was beside where the
    classifier looked."""
    from busi.reporting.plots import caption
    from busi.runs import atomic_write

    paths = []
    for i, f in enumerate(files):
        h, w = images[i].shape
        left = cv2.cvtColor(images[i], cv2.COLOR_GRAY2BGR)
        right = overlay(input_view(inputs[i]), heat[i])
        panel = np.concatenate([left, right], axis=1)
        panel = cv2.resize(panel, (2 * w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        truth = f"true {y_true[i]}, " if y_true is not None else ""
        mark = "" if y_true is None else ("  RIGHT" if y_true[i] == y_pred[i] else "  WRONG")
        strip = caption(panel.shape[1], f"{truth}pred {y_pred[i]} ({conf[i]:.2f}){mark}")
        stem = Path(f).stem.replace(" ", "_").replace("/", "_")
        ok, buf = cv2.imencode(".png", np.concatenate([panel, strip], axis=0))
        paths.append(atomic_write(out_dir / f"{stem}_gradcam.png", buf.tobytes()))
    return paths


def save_gradcam(out_dir: Path, model, ds, test_idx: np.ndarray, x: np.ndarray,
                 probs: np.ndarray) -> None:
    """Grad-CAM panels for a fixed sample of test images, right and wrong predictions: what a
    finished classifier run shows of where it looked, wrong answers included."""
    y_true, y_pred = ds.labels[test_idx], probs.argmax(axis=1)
    pick = sample(y_true, y_pred)
    if not pick:
        return
    sel = test_idx[pick]
    heat, _ = gradcam(model, x[sel], y_pred[pick])
    names = list(ds.classes)
    save_panels(out_dir, [ds.files[i] for i in sel], ds.images[sel], x[sel], heat,
                [names[k] for k in y_true[pick]], [names[k] for k in y_pred[pick]],
                probs[pick].max(axis=1))
