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


def sample(y_true: np.ndarray, y_pred: np.ndarray, conf: np.ndarray | None = None,
           n_right: int = 4, n_wrong: int = 8, seed: int = 0) -> list[int]:
    """Indices to draw: the wrong predictions first (up to ``n_wrong``, the most confident
    ones when ``conf`` is given: those are the failures to understand), then a fixed random
    sample of up to ``n_right`` correct ones for comparison."""
    rng = np.random.default_rng(seed)
    right, wrong = np.flatnonzero(y_true == y_pred), np.flatnonzero(y_true != y_pred)
    if conf is not None:
        wrong = wrong[np.argsort(-np.asarray(conf)[wrong], kind="stable")]
    return [int(i) for i in wrong[:n_wrong]] + sorted(
        int(i) for i in rng.permutation(right)[:n_right])


def panel_name(file: str) -> str:
    """The Grad-CAM panel's file name for a data set image id (what the report looks up)."""
    return f"{Path(file).stem.replace(' ', '_').replace('/', '_')}_gradcam.png"


def colour_bar(height: int, width: int = 64) -> np.ndarray:
    """A vertical JET colour bar (BGR) for the Grad-CAM heatmap, high at the top, labelled."""
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None]
    bar = cv2.applyColorMap(np.repeat(ramp, 16, axis=1), cv2.COLORMAP_JET)
    out = np.full((height, width, 3), 255, np.uint8)
    out[:, 4:20] = bar
    for text, y in (("1 high", 12), ("0.5", height // 2 + 4), ("0 low", height - 4)):
        cv2.putText(out, text, (22, y), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return out


def save_panels(out_dir: Path, files: list[str], images: np.ndarray, inputs: np.ndarray,
                heat: np.ndarray, y_true: list[str] | None, y_pred: list[str],
                conf: np.ndarray, scale: int = 2, shapes: np.ndarray | None = None,
                truth: np.ndarray | None = None, unet: np.ndarray | None = None,
                notes: list[str] | None = None, crop_view: bool = False) -> list[Path]:
    """One PNG per image: [scan with its masks | Grad-CAM over the scan, colour bar].

    ``crop_view`` (``mask_mode: lesion_crop``): the classifier saw a crop of the scan, not
    the scan, so the heatmap is drawn over that crop (square, as the classifier saw it).

    The heatmap is drawn over the *unmasked* scan, so a hot spot in the background the
    classifier was not shown (masked out) is seen as such. The left half outlines the
    U-Net's mask in red (``unet``; else the mask channel of a (scan, mask) input) and the
    ground truth in green (``truth``), so a wrong class can be traced to a failed mask.
    Both halves keep the original scan's aspect ratio (``shapes``: its (height, width)).
    ``notes`` add a caption line per image (e.g. the mask's Dice)."""
    from busi.reporting.plots import caption, outline, to_aspect
    from busi.runs import atomic_write

    paths = []
    for i, f in enumerate(files):
        height = images[i].shape[0] * scale
        shape = None if shapes is None else shapes[i]
        scan = cv2.cvtColor(to_aspect(images[i], shape, height), cv2.COLOR_GRAY2BGR)
        left = scan
        if truth is not None:
            left = outline(left, truth[i], (0, 200, 0), fill=0)
        mask = unet[i] if unet is not None else (
            inputs[i][..., 1] > 0 if inputs[i].shape[-1] > 1 else None)
        right_text = "right: Grad-CAM over the lesion crop the classifier saw" if crop_view \
            else "right: Grad-CAM"
        if mask is not None:
            left = outline(left, mask, (0, 0, 255), fill=0)
        if crop_view:
            seen = cv2.cvtColor(to_aspect(inputs[i][..., 0].astype(np.uint8), None, height),
                                cv2.COLOR_GRAY2BGR)
            right = overlay(seen, to_aspect(heat[i].astype(np.float32), None, height))
        else:
            right = overlay(scan, to_aspect(heat[i].astype(np.float32), shape, height))
        sep = np.full((height, 4, 3), 255, np.uint8)
        panel = np.concatenate([left, sep, right, colour_bar(height)], axis=1)
        truth_text = f"true {y_true[i]}, " if y_true is not None else ""
        mark = "" if y_true is None else ("  RIGHT" if y_true[i] == y_pred[i] else "  WRONG")
        lines = [f"{truth_text}pred {y_pred[i]} ({conf[i]:.2f}){mark}",
                 ("green: ground truth, " if truth is not None else "")
                 + ("red: U-Net mask; " if mask is not None else "") + right_text]
        if notes is not None and notes[i]:
            lines.insert(1, notes[i])
        strips = [caption(panel.shape[1], text) for text in lines]
        ok, buf = cv2.imencode(".png", np.concatenate([panel, *strips], axis=0))
        paths.append(atomic_write(out_dir / panel_name(f), buf.tobytes()))
    return paths


def save_gradcam(out_dir: Path, model, ds, test_idx: np.ndarray, x: np.ndarray,
                 probs: np.ndarray, unet: np.ndarray | None = None,
                 crop_view: bool = False) -> None:
    """Grad-CAM panels of the test images: every wrong prediction (up to 8, most confident
    first) and a few right ones, each with its ground truth and U-Net mask (``unet``, the
    masks of every image of ``ds``) -- what a finished classifier run shows of where it
    looked and which mask it was given."""
    from busi.evaluation.segmentation import dice

    y_true, y_pred = ds.labels[test_idx], probs.argmax(axis=1)
    conf = probs.max(axis=1)
    pick = sample(y_true, y_pred, conf)
    if not pick:
        return
    sel = test_idx[pick]
    heat, _ = gradcam(model, x[sel], y_pred[pick])
    names = list(ds.classes)
    notes = None
    if unet is not None:
        notes = [f"U-Net mask Dice {dice(ds.masks[i] > 0, unet[i] > 0):.2f}"
                 + (" (lesion missed)" if not unet[i].any() else "")
                 if ds.masks[i].any() else f"no lesion; U-Net mask {int(unet[i].sum())} px"
                 for i in sel]
    save_panels(out_dir, [ds.files[i] for i in sel], ds.images[sel], x[sel], heat,
                [names[k] for k in y_true[pick]], [names[k] for k in y_pred[pick]],
                conf[pick], shapes=ds.shapes[sel], truth=ds.masks[sel],
                unet=None if unet is None else unet[sel], notes=notes, crop_view=crop_view)
