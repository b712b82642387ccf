"""EfficientNet-Lite0: the second pretrained backbone, as classifier and as U-Net encoder.

Its ImageNet weights come as an ``.npz`` (shared/weights/efficientnet_lite0_imagenet/
SOURCE.md), not as a Keras download: a file that does not fit must be one clear error, and
the network must be the one those arrays were made for (Keras' EfficientNet builder with
B0's blocks, no squeeze-excite, ReLU6, Keras' layer names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from busi import runtime
from busi.errors import BusiError

keras = runtime.import_keras()
from busi.models import build_classifier, build_unet  # noqa: E402
from busi.models.efficientnet_lite import FEATURES, efficientnet_lite0  # noqa: E402
from busi.models.weights import load_efficientnet_lite0_weights  # noqa: E402

N_LAYERS = 98  # weight-bearing layers: stem conv+BN, 16 blocks (4 or 6 each), top conv+BN
N_PARAMS = 3_413_024  # SOURCE.md: 3.4 M parameters in the no-top part




def _npz_of(model: keras.Model, path: Path, drop: tuple[str, ...] = (),
            extra: dict[str, np.ndarray] | None = None,
            reshape: dict[str, tuple[int, ...]] | None = None) -> Path:
    """``model``'s weights in the SOURCE.md layout, less ``drop``'s layers, plus ``extra``."""
    arrays = {f"{layer.name}/{k}": w for layer in model.layers if layer.name not in drop
              for k, w in enumerate(layer.get_weights())}
    for key, shape in (reshape or {}).items():
        arrays[key] = np.zeros(shape, "float32")
    np.savez(path, **arrays, **(extra or {}))
    return path


def _base(model: keras.Model) -> keras.Model:
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def test_the_network_is_keras_efficientnet_builders_lite0() -> None:
    """Same layers, names, order, weight shapes and outputs as Keras' own (private) builder
    called with B0's blocks at se_ratio 0 and relu6, its input rescaling made the identity."""
    import copy

    ke = pytest.importorskip("keras.src.applications.efficientnet")
    blocks = copy.deepcopy(ke.DEFAULT_BLOCKS_ARGS)
    for b in blocks:
        b["se_ratio"] = 0.0
    ref = ke.EfficientNet(1.0, 1.0, 224, activation="relu6", blocks_args=blocks,
                          include_top=False, weights=None, input_shape=(32, 32, 3))
    mine = efficientnet_lite0((32, 32, 3))
    assert mine.count_params() == N_PARAMS
    skip = (keras.layers.InputLayer, keras.layers.Rescaling, keras.layers.Normalization)
    assert [la.name for la in mine.layers[1:]] == [la.name for la in ref.layers
                                                   if not isinstance(la, skip)]
    for layer in mine.layers[1:]:
        twin = ref.get_layer(layer.name)
        assert type(twin) is type(layer), layer.name
        assert [w.shape for w in twin.weights] == [w.shape for w in layer.weights], layer.name
        if layer.weights:
            twin.set_weights(layer.get_weights())
    norm = next(la for la in ref.layers if isinstance(la, keras.layers.Normalization))
    norm.set_weights([np.zeros(3, "float32"), np.ones(3, "float32"), *norm.get_weights()[2:]])
    assert sum(1 for la in mine.layers if la.weights) == N_LAYERS
    assert all(mine.get_layer(n) for n in FEATURES)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(mine(x)),
                               keras.ops.convert_to_numpy(ref(255.0 * x)), atol=1e-4)


def test_a_complete_file_loads_every_layer_and_misfits_are_one_error(tmp_path: Path) -> None:
    model = efficientnet_lite0((32, 32, 3), drop_connect_rate=0.0)
    good = _npz_of(model, tmp_path / "good.npz")
    other = efficientnet_lite0((32, 32, 3))
    assert load_efficientnet_lite0_weights(other, str(good), "model.unet.encoder_weights") \
        == N_LAYERS
    for name in ("stem_conv", "block4b_dwconv", "top_bn"):
        for a, b in zip(other.get_layer(name).get_weights(), model.get_layer(name).get_weights(),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    misfits = {
        "missing layers": (_npz_of(model, tmp_path / "part.npz", drop=("top_conv", "top_bn")),
                           "2 of the network's layers are not in it (top_conv, top_bn)"),
        "another shape": (_npz_of(model, tmp_path / "shape.npz",
                                  reshape={"stem_conv/0": (3, 3, 3, 16)}),
                          "shapes differ (stem_conv/0 (3, 3, 3, 16)"),
        "squeeze-excite": (_npz_of(model, tmp_path / "se.npz",
                                   extra={"block1a_se_reduce/0": np.zeros((1, 1, 32, 8))}),
                           "holds weights the network lacks (block1a_se_reduce/0)"),
        "not an npz": (garbage, "cannot read"),
        "a .npy": (npy, "cannot read"),
        "truncated": (cut, "cannot read"),
    }
    before = other.get_layer("top_bn").get_weights()[0].copy()
    for why, (path, says) in misfits.items():
        with pytest.raises(BusiError) as err:
            load_efficientnet_lite0_weights(other, str(path), "model.unet.encoder_weights")
        text = str(err.value)
        assert says in text, (why, text)
        assert f"model.unet.encoder_weights: {path}" in text, why
        assert "efficientnet_lite0_notop.npz" in text and "\n" not in text, why
    np.testing.assert_array_equal(other.get_layer("top_bn").get_weights()[0], before)


def test_a_missing_file_or_imagenet_is_a_clear_error(tmp_path: Path) -> None:
    from busi.models.unet import build_efficientnet_unet

    nope = tmp_path / "nope.npz"
    with pytest.raises(BusiError, match="EfficientNet-Lite0 weights file not found") as err:
        load_efficientnet_lite0_weights(efficientnet_lite0((32, 32, 3)), str(nope), "key")
    assert str(nope) in str(err.value)
    with pytest.raises(BusiError, match="not found") as err:
        build_efficientnet_unet((32, 32, 1), base_filters=4, weights=str(nope))
    assert str(nope) in str(err.value) and "model.unet.encoder_weights" in str(err.value)
    with pytest.raises(BusiError, match="weights file not found") as err:
        build_classifier("efficientnet_lite0", (32, 32), 3, weights=str(nope))
    assert "efficientnet_lite0_notop.npz" in str(err.value)
    with pytest.raises(BusiError, match="no Keras download") as err:
        build_classifier("efficientnet_lite0", (32, 32), 3, weights="imagenet")
    assert "model.classifier.weights=data/weights/efficientnet_lite0_notop.npz" in str(err.value)


def test_the_imagenet_file_loads_every_layer_as_its_arrays(lite0_weights: Path) -> None:
    model = efficientnet_lite0((32, 32, 3))
    assert load_efficientnet_lite0_weights(model, str(lite0_weights), "w") == N_LAYERS
    with np.load(lite0_weights) as z:
        assert len({k.rsplit("/", 1)[0] for k in z.files}) == N_LAYERS
        clf = build_classifier("efficientnet_lite0", (32, 32), 3, weights=str(lite0_weights),
                               channels=2)
        base = _base(clf)
        for name in ("stem_conv", "block3b_dwconv", "block6a_expand_bn", "top_bn"):
            for k, got in enumerate(base.get_layer(name).get_weights()):
                np.testing.assert_array_equal(got, z[f"{name}/{k}"])
    assert not any(la.trainable for la in base.layers
                   if isinstance(la, keras.layers.BatchNormalization)), "pretrained BN frozen"


@pytest.mark.parametrize("channels", [1, 2])
def test_the_classifier_takes_gray_or_scan_and_mask_and_reloads_the_same(
        channels: int, tmp_path: Path) -> None:
    from busi.models.saving import load_model

    model = build_classifier("efficientnet_lite0", (32, 32), 3, weights="none",
                             channels=channels)
    assert model.input_shape == (None, 32, 32, channels)
    assert model.get_layer("fc").units == 256 and model.output_shape == (None, 3)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, channels)).astype("float32")
    p = model.predict(x, verbose=0)
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    pre = keras.Model(model.input, model.get_layer("preprocess").output)
    rgb = np.repeat(x, 3, -1) if channels == 1 else np.concatenate(
        [x[..., :1], x[..., :1] * x[..., 1:] / 255, x[..., 1:]], -1)
    np.testing.assert_allclose(pre.predict(x, verbose=0), (rgb - 127.5) / 128, atol=1e-4)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_model(tmp_path / "m.keras").predict(x, verbose=0), p,
                               atol=1e-5)


def test_fine_tuning_opens_whole_stages_from_the_top() -> None:
    from busi.training.classification import _block_of, _set_trainable_top_blocks

    assert [_block_of(n) for n in ("stem_conv", "block1a_dwconv", "block6d_project_bn",
                                   "top_conv", "block5_conv4", "conv_pw_13_bn", "conv1")] == [
        "", "block1", "block6", "top", "block5", "13", ""]
    model = build_classifier("efficientnet_lite0", (32, 32), 3, weights="none")
    base = _base(model)

    def open_layers() -> set[str]:
        return {la.name for la in base.layers if la.weights and la.trainable}

    _set_trainable_top_blocks(model, 0)
    assert not open_layers()
    _set_trainable_top_blocks(model, 1)
    assert open_layers() == {"top_conv"}, "batch norms stay frozen"
    _set_trainable_top_blocks(model, 2)
    assert open_layers() == {"top_conv", "block7a_expand_conv", "block7a_dwconv",
                             "block7a_project_conv"}
    assert model.get_layer("fc").trainable


def test_the_unet_on_the_lite0_encoder_saves_whole_and_starts_the_classifier(
        tmp_path: Path) -> None:
    from busi.config import UNetConfig
    from busi.models.saving import load_model
    from busi.models.unet import unet_from_config
    from busi.models.weights import copy_encoder_weights, unet_encoder

    weights = _npz_of(efficientnet_lite0((64, 64, 3)), tmp_path / "lite0.npz")
    cfg = UNetConfig(base_filters=4, encoder="efficientnet_lite0",
                     encoder_weights=str(weights))
    unet = unet_from_config(cfg, (64, 64))
    encoder = unet.get_layer("efficientnet_lite0_encoder")
    assert [tuple(o.shape[1:3]) for o in encoder.outputs] == [(32, 32), (16, 16), (8, 8),
                                                               (4, 4), (2, 2)]
    with np.load(weights) as z:
        np.testing.assert_array_equal(encoder.get_layer("block2a_expand_conv").get_weights()[0],
                                      z["block2a_expand_conv/0"])
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 1)).astype("float32")
    p = unet.predict(x, verbose=0)
    assert p.shape == (2, 64, 64, 1) and p.min() >= 0 and p.max() <= 1
    unet.save(tmp_path / "u.keras")
    unet = load_model(tmp_path / "u.keras")
    np.testing.assert_allclose(unet.predict(x, verbose=0), p, atol=1e-5)
    norm = keras.Model(unet.input, unet.get_layer("input_norm").output)
    np.testing.assert_allclose(norm.predict(x, verbose=0), (255 * x - 127.5) / 128, atol=1e-5)

    clf = build_classifier("efficientnet_lite0", (64, 64), 3, weights="unet", channels=2)
    assert copy_encoder_weights(unet_encoder(unet, "run", "efficientnet_lite0"), clf) == N_LAYERS
    assert unet_encoder(unet, "run").name == "efficientnet_lite0_encoder"
    np.testing.assert_array_equal(_base(clf).get_layer("top_conv").get_weights()[0],
                                  unet.get_layer("efficientnet_lite0_encoder")
                                  .get_layer("top_conv").get_weights()[0])
    with pytest.raises(BusiError, match="U-Net has an EfficientNet-Lite0 encoder") as err:
        unet_encoder(unet, "outputs/seg/x", "mobilenet")
    assert "train-cls --model efficientnet_lite0" in str(err.value)
    with pytest.raises(BusiError, match="EfficientNet-Lite0 encoder, and this run's U-Net has "
                                        "the paper's plain encoder"):
        unet_encoder(build_unet((32, 32, 1), base_filters=4, depth=2), "x", "efficientnet_lite0")


def test_the_config_and_cli_take_the_family(tmp_path: Path) -> None:
    from busi.cli import build_parser
    from busi.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: {unet: {encoder: efficientnet_lite0}}\n"
                    "classifiers:\n"
                    "  efficientnet_lite0: {classifier: {weights: none},\n"
                    "                       training: {learning_rate: 3.0e-4}}\n")
    cfg = load_config(path, [("model.classifier.name", "efficientnet_lite0")])
    assert cfg.model.unet.encoder == "efficientnet_lite0"
    assert cfg.model.classifier.weights == "none" and cfg.training.cls.learning_rate == 3e-4
    assert load_config(path).model.classifier.weights == "imagenet", "only for that family"
    with pytest.raises(BusiError, match="multiples of 2\\^5 = 32"):
        load_config(path, [("data.image_size", [112, 112])])
    args = build_parser().parse_args(["train-cls", "--model", "efficientnet_lite0"])
    assert args.model == "efficientnet_lite0"
