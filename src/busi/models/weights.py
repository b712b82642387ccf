"""Loading a Keras weights file into a network, or saying clearly why it does not fit.

Shared by the U-Net's pretrained encoders (``model.unet.encoder_weights``) and the
classifiers' ImageNet bases (``model.classifier.weights``), so both refuse a misfit
file the same way: Keras weights files for MobileNet v1 and VGG19, the ImageNet ``.npz``
for EfficientNet-Lite0 (:func:`load_efficientnet_lite0_weights`).
"""

from __future__ import annotations

from busi.errors import BusiError
from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)


def load_weights_file(model: keras.Model, path: str, what: str, where: str,
                      fix: str | None = None) -> None:
    """Load a Keras weights file into ``model``, or say clearly why it does not fit.

    Keras raises for some misfits (another architecture, another width) but only warns
    ("Skipping ...") for others, which would leave those layers at random weights and
    train on silently: both are one BusiError naming the file.
    """
    from pathlib import Path

    if not Path(path).is_file():
        raise BusiError(f"{what} weights file not found", where=f"{where}: {path}",
                        fix="give the path of a .weights.h5 file (e.g. "
                            "../shared/weights/mobilenet_v1_imagenet/"
                            "mobilenet_1_0_notop.weights.h5), or '' to start from random "
                            "weights")
    import warnings

    try:
        # Keras only warns when a file lacks some of the layers ("Skipping ..."), which
        # would leave them at random weights: that is a misfit too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.load_weights(path)
        skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()
                   or "could not be loaded" in str(w.message).lower()]
        if skipped:
            raise ValueError(skipped[0])
    except Exception as exc:  # Keras raises ValueError/KeyError/OSError for a misfit file
        detail = " ".join(str(exc).split())[:240]
        raise BusiError(f"the file does not fit the {what} ({type(exc).__name__}: {detail})",
                        where=f"{where}: {path}",
                        fix=fix or f"use a weights file saved from the same {what} "
                                   "architecture (include_top=False, alpha 1.0)") from None


EFFICIENTNET_LITE0_FILE = "efficientnet_lite0_notop.npz"


def load_efficientnet_lite0_weights(model: keras.Model, path: str, where: str, *,
                                    scratch: str = "''") -> int:
    """Load the ImageNet EfficientNet-Lite0 ``.npz`` (no top) into ``model``, every layer.

    ``model``: :func:`busi.models.efficientnet_lite.efficientnet_lite0`, or any model with
    its layer names. The file's key ``"<layer name>/<k>"`` is that layer's k-th weight
    (``layer.get_weights()`` order; shared/weights/efficientnet_lite0_imagenet/SOURCE.md).
    Every layer with weights must find all of them at their shapes, and every array in
    the file must find its layer: a file of another network (EfficientNet-B0's
    squeeze-excite layers, a top) or a truncated one is one BusiError naming the file,
    never a network left partly at random weights. Nothing is set unless all fits.
    ``where``: the config key that named the file; ``scratch``: its value for random
    weights, said in the fix. Returns how many layers were loaded.
    """
    import zipfile
    from pathlib import Path

    import numpy as np

    fix = (f"give the path of the EfficientNet-Lite0 ImageNet file {EFFICIENTNET_LITE0_FILE} "
           f"(README, 'Pretrained weights'; e.g. data/weights/{EFFICIENTNET_LITE0_FILE}), "
           f"or {scratch} to start from random weights")
    place = f"{where}: {path}"
    if not Path(path).is_file():
        raise BusiError("EfficientNet-Lite0 weights file not found", where=place, fix=fix)
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise ValueError("one array (a .npy), not an .npz of named arrays")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, AttributeError, TypeError,
            zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise BusiError(f"cannot read the EfficientNet-Lite0 weights file, not a complete "
                        f".npz ({type(exc).__name__}: {detail})", where=place, fix=fix) from None
    values, missing, misfit = {}, [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        keys = [f"{layer.name}/{k}" for k in range(len(layer.weights))]
        if not all(k in arrays for k in keys):
            missing.append(layer.name)
            continue
        for k, w in zip(keys, layer.weights, strict=True):
            if tuple(arrays[k].shape) != tuple(w.shape):
                misfit.append(f"{k} {tuple(arrays[k].shape)}, the layer needs {tuple(w.shape)}")
        values[layer] = [arrays[k] for k in keys]
    used = {f"{layer.name}/{k}" for layer in values for k in range(len(values[layer]))}
    extra = sorted(k for k in arrays if k not in used)

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if missing or misfit or extra or not values:
        why = (f"{len(missing)} of the network's layers are not in it ({some(missing)})"
               if missing else f"shapes differ ({some(misfit)})" if misfit
               else f"it holds weights the network lacks ({some(extra)})" if extra
               else "it holds no layers")
        raise BusiError(f"the file does not fit EfficientNet-Lite0 (no top, Keras layer "
                        f"names): {why}", where=place, fix=fix)
    for layer, weights in values.items():
        layer.set_weights(weights)
    return len(values)


# The U-Net's pretrained encoders (model.unet.encoder), by the name of their sub-model.
ENCODERS = {"mobilenet": ("mobilenet_encoder", "a MobileNet"),
            "efficientnet_lite0": ("efficientnet_lite0_encoder", "an EfficientNet-Lite0")}


def unet_encoder(unet: keras.Model, where: str, family: str | None = None) -> keras.Model:
    """The pretrained-encoder U-Net's encoder (``model.unet.encoder: mobilenet`` or
    ``efficientnet_lite0``).

    ``model.classifier.weights: unet`` starts the classifier of the same family from it:
    an encoder trained on the same scans with dense labels (where the lesion is, pixel
    by pixel), which knows ultrasound better than ImageNet does. ``family``: the
    classifier's, whose encoder it must be (None: either kind).
    """
    found = {kind: layer for kind, (name, _) in ENCODERS.items()
             for layer in unet.layers if layer.name == name}
    if found and family is None:
        return next(iter(found.values()))
    if family in found:
        return found[family]
    if found:
        (kind,) = found
        raise BusiError(f"'model.classifier.weights: unet' starts the {family} classifier "
                        f"from its U-Net's encoder, and this run's U-Net has "
                        f"{ENCODERS[kind][1]} encoder", where=where,
                        fix=f"train-cls --model {kind}, or use a U-Net trained with "
                            f"model.unet.encoder: {family}, or another weights value "
                            f"(e.g. none)")
    label, kind = ((ENCODERS[family][1], family) if family in ENCODERS
                   else ("a MobileNet", "mobilenet"))
    raise BusiError(f"'model.classifier.weights: unet' needs a U-Net with {label} "
                    "encoder, and this run's U-Net has the paper's plain encoder",
                    where=where, fix=f"use a U-Net trained with model.unet.encoder: {kind}"
                                     + (" (configs/cpu.yaml)" if kind == "mobilenet" else "")
                                     + ", or weights: imagenet / a weights file / none")


def copy_encoder_weights(encoder: keras.Model, classifier: keras.Model) -> int:
    """Copy ``encoder``'s layer weights into the classifier's base, matched by layer name.

    Returns how many layers were copied; every weight-bearing layer of the base must
    find its twin (the same network: MobileNet v1 or EfficientNet-Lite0), or nothing
    would be pretrained.
    """
    base = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    copied = 0
    for layer in base.layers:
        if not layer.weights:
            continue
        layer.set_weights(encoder.get_layer(layer.name).get_weights())
        copied += 1
    return copied
