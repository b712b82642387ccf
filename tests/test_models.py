"""Models: the paper's architectures, and the weights routes a user relies on offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from busi import runtime
from busi.errors import BusiError

keras = runtime.import_keras()
from busi.models import build_classifier, build_unet  # noqa: E402


def test_unet_at_paper_settings_has_31_0_m_parameters() -> None:
    model = build_unet((128, 128, 1), base_filters=64, depth=4)
    assert model.count_params() == 31_030_593
    assert model.output_shape == (None, 128, 128, 1)
    names = [layer.name for layer in model.layers]
    assert "bottleneck_conv2" in names and "dec1_up" in names
    assert model.get_layer("bottleneck_conv2").filters == 1024
    assert model.get_layer("enc1_dropout").rate == 0.2
    assert model.get_layer("dec1_dropout").rate == 0.1


def test_unet_width_and_depth_are_knobs() -> None:
    small = build_unet((64, 64, 1), base_filters=8, depth=3)
    assert small.count_params() < 200_000
    assert small.output_shape == (None, 64, 64, 1)


@pytest.mark.parametrize("family", ["cnn", "vgg19", "mobilenet"])
def test_classifiers_take_gray_and_give_three_probabilities(family: str) -> None:
    model = build_classifier(family, (64, 64), 3, weights="none")
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 3) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_cnn_follows_the_paper() -> None:
    model = build_classifier("cnn", (128, 128), 3, weights="none")
    convs = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [32, 64, 128, 256]
    assert model.get_layer("fc").units == 32
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 4


def test_weights_from_a_file_path(tmp_path: Path) -> None:
    base = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(64, 64, 3))
    for w in base.weights:
        w.assign(np.full(w.shape, 0.01, dtype=w.dtype))
    path = tmp_path / "mobilenet_notop.weights.h5"
    base.save_weights(path)
    model = build_classifier("mobilenet", (64, 64), 3, weights=str(path))
    loaded = model.get_layer(base.name).weights[0]
    assert np.allclose(keras.ops.convert_to_numpy(loaded), 0.01)


def test_a_pretrained_base_fine_tunes_with_its_batch_norm_statistics_kept(
        tmp_path: Path, mobilenet_weights: Path) -> None:
    """Fine-tuning on a few masked scans must not overwrite ImageNet's BN statistics (the
    cause of issue 14's 0.89 train / 0.5 validation), also after a save and reload (resume);
    the convolutions still learn. A from-scratch base keeps training-mode batch norm."""
    from busi.models.saving import load_model

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 2)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 8), 3)

    def bn_and_conv(m):
        base = next(layer for layer in m.layers if isinstance(layer, keras.Model))
        bn = next(la for la in base.layers if isinstance(la, keras.layers.BatchNormalization))
        conv = next(la for la in base.layers if isinstance(la, keras.layers.Conv2D))
        return [keras.ops.convert_to_numpy(v).copy() for v in (bn.moving_mean, conv.kernel)]

    model = build_classifier("mobilenet", (32, 32), 3, weights=str(mobilenet_weights),
                             channels=2)
    for m in (model, None):
        if m is None:
            model.save(tmp_path / "m.keras")
            m = load_model(tmp_path / "m.keras")
        m.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
        mean0, kernel0 = bn_and_conv(m)
        m.fit(x, y, epochs=2, batch_size=4, verbose=0)
        mean1, kernel1 = bn_and_conv(m)
        np.testing.assert_array_equal(mean1, mean0)
        assert not np.allclose(kernel1, kernel0)
    scratch = build_classifier("mobilenet", (32, 32), 3, weights="none", channels=2)
    scratch.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
    mean0, _ = bn_and_conv(scratch)
    scratch.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert not np.allclose(bn_and_conv(scratch)[0], mean0)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BusiError, match="weights file not found"):
        build_classifier("vgg19", (64, 64), 3, weights=str(tmp_path / "nope.h5"))


def test_no_network_for_imagenet_says_how_to_predownload(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(**kwargs):
        raise OSError("URL fetch failure: network is unreachable")

    monkeypatch.setattr(keras.applications, "VGG19", offline)
    with pytest.raises(BusiError) as err:
        build_classifier("vgg19", (64, 64), 3, weights="imagenet")
    text = str(err.value)
    assert "could not be downloaded" in text and "model.classifier.weights=" in text


def test_fine_tuning_opens_only_the_top_blocks_of_the_base() -> None:
    from busi.training.classification import _set_trainable_top_blocks

    model = build_classifier("vgg19", (64, 64), 3, weights="none")
    base = model.get_layer("vgg19")
    _set_trainable_top_blocks(model, 0)
    assert not any(layer.trainable for layer in base.layers if layer.weights)
    _set_trainable_top_blocks(model, 1)
    open_layers = {layer.name for layer in base.layers if layer.weights and layer.trainable}
    assert open_layers == {f"block5_conv{i}" for i in range(1, 5)}
    assert model.get_layer("fc").trainable, "the new head always trains"


def test_mobilenet_unet_loads_its_encoder_weights_and_saves_whole(tmp_path: Path) -> None:
    """The pretrained encoder's weights arrive; the saved U-Net takes raw gray images."""
    from busi.models.saving import load_model
    from busi.models.unet import build_mobilenet_unet

    base = keras.applications.MobileNet(input_shape=(64, 64, 3), include_top=False,
                                        weights=None)
    weights = tmp_path / "encoder.weights.h5"
    base.save_weights(weights)
    model = build_mobilenet_unet((64, 64, 1), base_filters=4, weights=str(weights))
    encoder = model.get_layer("mobilenet_encoder")
    np.testing.assert_array_equal(encoder.get_layer("conv1").get_weights()[0],
                                  base.get_layer("conv1").get_weights()[0])
    x = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 1)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 64, 64, 1) and p.min() >= 0 and p.max() <= 1
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_model(tmp_path / "m.keras").predict(x, verbose=0), p,
                               atol=1e-5)


def test_a_weights_file_of_another_network_is_a_clear_error(tmp_path: Path) -> None:
    from busi.models.unet import build_mobilenet_unet

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    wrong = tmp_path / "other.weights.h5"
    other.save_weights(wrong)
    with pytest.raises(BusiError, match="does not fit the MobileNet encoder") as err:
        build_mobilenet_unet((64, 64, 1), base_filters=4, weights=str(wrong))
    assert str(wrong) in str(err.value)
    with pytest.raises(BusiError, match="not found"):
        build_mobilenet_unet((64, 64, 1), base_filters=4, weights=str(tmp_path / "none.h5"))


@pytest.mark.parametrize("norm, blind", [("per_image", True), ("fixed", False)])
def test_per_image_norm_makes_the_unet_blind_to_a_scanners_gain_and_offset(
        norm: str, blind: bool) -> None:
    model = build_unet((32, 32, 1), base_filters=4, depth=2, input_norm=norm)
    x = np.random.default_rng(1).uniform(0.1, 0.5, (2, 32, 32, 1)).astype("float32")
    same = np.allclose(model.predict(x, verbose=0), model.predict(1.7 * x + 0.1, verbose=0),
                       atol=1e-4)
    assert same == blind


@pytest.mark.parametrize("family", ["cnn", "vgg19", "mobilenet"])
def test_classifiers_take_the_scan_and_its_mask_and_reload_the_same(family: str,
                                                                   tmp_path: Path) -> None:
    """mask_mode channel: (scan, mask) in; an ImageNet base gets (scan, scan x mask, mask);
    the saved model loads in safe mode and predicts the same."""
    from busi.models.saving import load_model

    model = build_classifier(family, (32, 32), 3, weights="none", channels=2)
    assert model.input_shape == (None, 32, 32, 2)
    rng = np.random.default_rng(0)
    scan = rng.uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    mask = np.zeros_like(scan)
    mask[0, 8:20, 10:24] = 255
    x = np.concatenate([scan, mask], axis=-1)
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    if family != "cnn":
        rgb = keras.Model(model.input, model.get_layer("scan_mask_to_rgb").output)
        np.testing.assert_allclose(rgb.predict(x, verbose=0),
                                   np.concatenate([scan, scan * mask / 255, mask], -1),
                                   atol=1e-3)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_model(tmp_path / "m.keras").predict(x, verbose=0), p,
                               atol=1e-5)


def _misfit_files(tmp_path: Path) -> dict[str, Path]:
    """Weights files that are not a MobileNet v1 alpha 1.0 base without its top."""
    files = {}
    base = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3),
                                        alpha=0.5)
    files["another width"] = tmp_path / "alpha05.weights.h5"
    base.save_weights(files["another width"])
    full = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3))
    part = keras.Model(full.input, full.get_layer("conv_pw_5_relu").output)
    files["missing layers"] = tmp_path / "part.weights.h5"
    part.save_weights(files["missing layers"])
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    files["another network"] = tmp_path / "dense.weights.h5"
    other.save_weights(files["another network"])
    return files


def test_a_classifier_weights_file_that_does_not_fit_is_one_clear_error(
        tmp_path: Path) -> None:
    for why, path in _misfit_files(tmp_path).items():
        with pytest.raises(BusiError) as err:
            build_classifier("mobilenet", (32, 32), 3, weights=str(path))
        text = str(err.value)
        assert "does not fit the MobileNet base (include_top=False, alpha=1.0)" in text, why
        assert str(path) in text and "model.classifier.weights" in text, why
        assert "\n" not in text, why
    with pytest.raises(BusiError, match="does not fit the VGG19 base") as err:
        build_classifier("vgg19", (32, 32), 3, weights=str(path))
    assert str(path) in str(err.value)


def test_a_weights_file_keras_only_warns_about_is_refused(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras 3 only warns ("Skipping ...") for some missing layer groups, which would leave
    them at random weights: that is refused like any other misfit."""
    import warnings

    base = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "mobilenet.weights.h5"
    base.save_weights(path)

    def load_and_warn(self, filepath, *args, **kwargs):
        warnings.warn("Skipping nested container at 'layers/conv_dw_13': no matching group "
                      "found in the saved file.", stacklevel=2)

    monkeypatch.setattr(keras.Model, "load_weights", load_and_warn)
    with pytest.raises(BusiError, match="does not fit the MobileNet base") as err:
        build_classifier("mobilenet", (32, 32), 3, weights=str(path))
    assert "Skipping nested container" in str(err.value) and str(path) in str(err.value)


def test_the_imagenet_mobilenet_file_loads_into_the_classifiers_base(
        mobilenet_weights: Path) -> None:
    model = build_classifier("mobilenet", (64, 64), 3, weights=str(mobilenet_weights),
                             channels=2)
    ref = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(64, 64, 3))
    ref.load_weights(mobilenet_weights)
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    for name in ("conv1", "conv_pw_13_bn"):
        for got, want in zip(base.get_layer(name).get_weights(), ref.get_layer(name).get_weights(),
                             strict=True):
            np.testing.assert_array_equal(got, want)


def test_the_unets_mobilenet_encoder_starts_the_mobilenet_classifier() -> None:
    from busi.models.unet import build_mobilenet_unet
    from busi.models.weights import copy_encoder_weights, unet_encoder

    unet = build_mobilenet_unet((64, 64, 1), base_filters=4)
    clf = build_classifier("mobilenet", (64, 64), 3, weights="none", channels=2)
    assert copy_encoder_weights(unet_encoder(unet, "run"), clf) == 54  # 27 convs + 27 BNs
    base = next(layer for layer in clf.layers if isinstance(layer, keras.Model))
    for name in ("conv1", "conv_dw_7", "conv_pw_13_bn"):
        for a, b in zip(base.get_layer(name).get_weights(),
                        unet.get_layer("mobilenet_encoder").get_layer(name).get_weights(),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(BusiError, match="plain encoder"):
        unet_encoder(build_unet((32, 32, 1), base_filters=4, depth=2), "outputs/seg/x")


def test_the_unets_mobilenet_encoder_adapts_its_batch_norms_as_documented() -> None:
    """The design that runs is the documented one: the U-Net's MobileNet encoder re-estimates
    its batch-norm statistics in ``fit`` (every measured U-Net figure used that), and neither
    the docstring nor the graph claims they stay frozen (Keras 3's functional ``fit``
    overrides a nested ``training=False``, which the old docstring relied on)."""
    import inspect

    from busi.models import unet

    model = unet.build_mobilenet_unet((32, 32, 1), base_filters=4)
    bn = model.get_layer("mobilenet_encoder").get_layer("conv1_bn")
    mean0 = keras.ops.convert_to_numpy(bn.moving_mean).copy()
    rng = np.random.default_rng(0)
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    model.fit(rng.uniform(0, 1, (4, 32, 32, 1)).astype("float32"),
              (rng.uniform(0, 1, (4, 32, 32, 1)) > 0.5).astype("float32"), epochs=1, verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(bn.moving_mean), mean0)
    doc = inspect.getdoc(unet.build_mobilenet_unet)
    assert "re-estimate their statistics" in doc and "run in inference mode" not in doc
    assert "training=False)" not in inspect.getsource(unet.build_mobilenet_unet)
