"""The config is the contract of a run: typos must fail loudly, paper numbers must be exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from busi.config import dump_yaml, find_config, load_config
from busi.errors import BusiError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_paper_config_holds_the_papers_numbers() -> None:
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.data.image_size == [128, 128]
    assert cfg.data.classes == ["benign", "malignant", "normal"]
    assert cfg.split.scheme == "holdout" and cfg.split.test_size == 0.1
    aug = cfg.augmentation
    assert aug.engine == "image_data_generator" and aug.horizontal_flip
    assert (aug.rotation_range, aug.width_shift_range, aug.height_shift_range) == (15, 10, 10)
    assert aug.zoom_range == [0.8, 1.0]
    unet = cfg.model.unet
    assert (unet.base_filters, unet.depth, unet.encoder_dropout, unet.decoder_dropout) == (
        64, 4, 0.2, 0.1)
    seg = cfg.training.seg
    assert (seg.optimizer, seg.learning_rate, seg.loss, seg.batch_size, seg.epochs) == (
        "adam", 5e-5, "mse", 64, 100)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(name: str) -> None:
    load_config(find_config(name))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, words", [
    ("training:\n  seg:\n    epoch: 5\n", ["unknown key 'training.seg.epoch'", "epochs"]),
    ("training:\n  seg:\n    epochs: five\n", ["'training.seg.epochs'", "an integer", "'five'"]),
    ("training:\n  seg:\n    epochs: 0\n", ["'training.seg.epochs'", ">= 1"]),
    ("split:\n  test_size: 1.5\n", ["'split.test_size'", "< 1"]),
    ("augmentation:\n  horizontal_flip: 1\n", ["horizontal_flip", "true or false"]),
    ("runtime:\n  precision: fp8\n", ["runtime.precision", "mixed_bfloat16"]),
    ("data:\n  image_size: [128]\n", ["data.image_size", "exactly 2"]),
    ("data: [1, 2]\n", ["'data'", "mapping"]),
    ("data:\n  root: [unclosed\n", ["YAML syntax error", "line"]),
    # segmentation-only settings under the classifier's loop are typos, not no-ops
    ("training:\n  cls:\n    threshold: 0.3\n",
     ["unknown key 'training.cls.threshold'", "segmentation setting", "training.seg"]),
    ("training:\n  cls:\n    out_of_fold_masks: 5\n", ["'training.cls.out_of_fold_masks'"]),
    ("training:\n  cls:\n    flip_tta: true\n", ["'training.cls.flip_tta'"]),
    # names Keras (or busi's losses) would refuse minutes into the run
    ("training:\n  seg:\n    loss: focal\n", ["'training.seg.loss'", "bce_dice"]),
    ("training:\n  cls:\n    loss: crossentropy\n",
     ["'training.cls.loss'", "categorical_crossentropy"]),
    ("training:\n  cls:\n    optimizer: adamax\n", ["'training.cls.optimizer'", "adam"]),
    # shapes the U-Net or an ImageNet backbone cannot take
    ("data:\n  image_size: [100, 128]\n", ["'data.image_size' 100x128", "2^4 = 16", "[96, 128]"]),
    ("data:\n  image_size: [96, 96]\nmodel:\n  unet:\n    depth: 6\n", ["2^6 = 64"]),
    ("data:\n  image_size: [16, 16]\nmodel:\n  unet: {depth: 2}\n  classifier: {name: vgg19}\n",
     ["vgg19 needs images of at least 32x32"]),
    ("training:\n  seg:\n    fold_ensemble: true\n", ["fold_ensemble", "out_of_fold_masks"]),
    ("data:\n  image_size: [112, 112]\nmodel:\n  unet: {encoder: mobilenet}\n",
     ["2^5 = 32", "[128, 128]"]),
    ("model:\n  unet: {encoder_weights: w.weights.h5}\n",
     ["'model.unet.encoder_weights'", "encoder: mobilenet"]),
    ("augmentation:\n  gain_range: [0, 2]\n", ["'augmentation.gain_range'", ">= 0.05"]),
    ("data:\n  classes: [benign, benign]\n", ["'data.classes'"]),
])
def test_bad_config_is_one_message_naming_key_and_file(tmp_path: Path, text: str,
                                                       words: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(BusiError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for w in words:
        assert w in message


def test_overrides_apply_after_the_file_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  seg:\n    epochs: 7\n")
    cfg = load_config(path, ["training.seg.epochs=3", "data.image_size=[64, 64]",
                             "augmentation.horizontal_flip=false",
                             "training.seg.learning_rate=1e-3"])
    assert cfg.training.seg.epochs == 3
    assert cfg.training.seg.learning_rate == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert cfg.data.image_size == [64, 64]
    assert cfg.augmentation.horizontal_flip is False
    with pytest.raises(BusiError, match="--set training.seg.epochz=3"):
        load_config(path, ["training.seg.epochz=3"])
    with pytest.raises(BusiError, match="KEY=VALUE"):
        load_config(path, ["training.seg.epochs"])


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "cpu.yaml", ["runtime.seed=7"])
    again = load_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


def test_a_partial_section_keeps_that_sections_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "training:\n  cls:\n    epochs: 5\n"))
    assert cfg.training.cls.epochs == 5
    assert cfg.training.cls.loss == "categorical_crossentropy"  # not the seg default "mse"
    assert cfg.training.seg.loss == "mse"
    assert load_config(find_config("cpu")).training.cls.loss == "categorical_crossentropy"


def test_an_override_that_breaks_a_cross_field_rule_is_named(tmp_path: Path) -> None:
    with pytest.raises(BusiError, match=r"--set data.image_size=\[100,100\]"):
        load_config(write(tmp_path, ""), ["data.image_size=[100,100]"])


def test_loss_names_the_config_allows_are_the_ones_keras_and_busi_build() -> None:
    import typing

    import keras

    from busi.config import ClsLoss, SegLoss
    from busi.models.losses import SEG_LOSSES, segmentation_loss

    assert set(typing.get_args(SegLoss)) == set(SEG_LOSSES)
    for name in SEG_LOSSES:
        segmentation_loss(name)
    for name in typing.get_args(ClsLoss):
        assert keras.losses.get(name) is not None


def test_a_config_that_is_not_utf8_text_is_one_message(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"data:\n  root: \xff\xfe\x00\n")
    with pytest.raises(BusiError, match="not a UTF-8 text file") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_auto_precision_uses_bfloat16_only_where_the_cpu_computes_it(tmp_path: Path) -> None:
    """Emulated bfloat16 is several times slower than float32 (docs/PERFORMANCE.md)."""
    from busi import runtime

    with_amx = tmp_path / "amx"
    with_amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert runtime.cpu_has_bf16(str(with_amx)) and not runtime.cpu_has_bf16(str(without))
    assert not runtime.cpu_has_bf16(str(tmp_path / "missing"))
    assert runtime.resolve_precision("float32") == "float32"
    assert runtime.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    expected = "mixed_bfloat16" if runtime.cpu_has_bf16() else "float32"
    assert runtime.resolve_precision("auto") == expected  # no GPU on the test machines


def test_predict_min_confidence_is_a_checked_probability(tmp_path: Path) -> None:
    """busi issue 16: the threshold under which busi predict flags a call lives in the config."""
    assert load_config(write(tmp_path, "predict: {min_confidence: 0.75}\n")
                       ).predict.min_confidence == 0.75
    assert load_config(find_config("paper")).predict.min_confidence == 0.6
    with pytest.raises(BusiError, match=r"'predict.min_confidence' must be a number >= 0 and <= 1"):
        load_config(write(tmp_path, "predict: {min_confidence: 1.5}\n"))
    with pytest.raises(BusiError, match="did you mean 'predict.min_confidence'"):
        load_config(write(tmp_path, "predict: {min_confidense: 0.5}\n"))


# --------------------------------------------------------------------------- paths are not YAML


@pytest.mark.parametrize("path", ["scans #2/BUSI", "2024-01-01", "on", "null", "[a, b]", "~",
                                  "1e5", "x: y", "'quoted'"])
def test_a_key_value_pair_reaches_the_config_as_that_string(path: str) -> None:
    """A path given as a value is never re-read as YAML: as --set text ``scans #2/BUSI`` would
    be ``scans`` (a comment), ``2024-01-01`` a date, ``on`` true, ``null`` nothing."""
    from busi.config import with_overrides

    cfg = load_config(None, [("data.root", path), ("outputs.root", path),
                             ("data.cache_dir", path)])
    assert (cfg.data.root, cfg.outputs.root, cfg.data.cache_dir) == (path, path, path)
    assert load_config(None, [("data.root", [path, "b #3"])]).data.root == [path, "b #3"]
    assert with_overrides(cfg, [("outputs.root", f"{path}/fold0")]).outputs.root == f"{path}/fold0"
    # and the --set text form keeps its YAML reading: numbers and lists get their types
    assert load_config(None, ["training.seg.epochs=5", ("outputs.root", path)]
                       ).training.seg.epochs == 5


def test_a_key_value_pair_is_checked_like_any_other_value() -> None:
    with pytest.raises(BusiError, match="'training.seg.epochs' must be an integer, got '5'"):
        load_config(None, [("training.seg.epochs", "5")])
    with pytest.raises(BusiError, match="unknown key 'data.rot'.*did you mean 'data.root'"):
        load_config(None, [("data.rot", "x")])
    with pytest.raises(BusiError, match="'data.root' names no data source"):
        load_config(None, [("data.root", [])])


# ------------------------------------------------------------------ classifier families


@pytest.mark.parametrize("model, expected", [
    # (weights, mask_mode, learning_rate, epochs, early_stopping_patience)
    ("efficientnet_lite0", ("data/weights/efficientnet_lite0_notop.npz", "lesion_crop", 1e-4,
                            20, 6)),                   # the default: ImageNet, lesion crop
    ("mobilenet", ("unet", "channel", 1e-4, 20, 6)),   # fine-tuning a pretrained base
    ("cnn", ("none", "multiply", 1e-3, 80, 15)),       # the paper's CNN from scratch
    ("vgg19", ("none", "multiply", 1e-4, 60, 10)),     # no ImageNet file offline
])
def test_cpu_yaml_gives_each_classifier_family_its_own_settings(
        model: str, expected: tuple) -> None:
    """`busi train-cls --model cnn --config configs/cpu.yaml` (a README command) trained the
    CNN with MobileNet's fine-tuning schedule and stopped at 0.487 accuracy: each family
    gets the settings that suit it, and the command line still wins."""
    cfg = load_config(CONFIGS / "cpu.yaml", [("model.classifier.name", model)])
    c, t = cfg.model.classifier, cfg.training.cls
    assert (c.weights, c.mask_mode, t.learning_rate, t.epochs,
            t.early_stopping_patience) == expected
    cfg = load_config(CONFIGS / "cpu.yaml", [("model.classifier.name", model),
                                             "training.cls.epochs=3"])
    assert cfg.training.cls.epochs == 3


def test_switching_family_lays_a_whole_block_over_the_last_one(tmp_path: Path) -> None:
    """A CV arm or the demo switches family with with_overrides: nothing of one family's
    block leaks into another, a --set given when the config was read survives the switch,
    and a run's resolved config.yaml reads back as the same config (rerun)."""
    from busi.config import with_overrides

    path = tmp_path / "c.yaml"
    path.write_text("model: {classifier: {name: mobilenet, mask_mode: channel}}\n"
                    "training: {cls: {learning_rate: 1.0e-4, epochs: 20}}\n"
                    "classifiers:\n"
                    "  cnn: {classifier: {mask_mode: multiply},\n"
                    "        training: {learning_rate: 1.0e-3, early_stopping_patience: 15}}\n")
    cfg = load_config(path, ["training.cls.epochs=7"])
    cnn = with_overrides(cfg, ["model.classifier.name=cnn"])
    assert (cnn.model.classifier.mask_mode, cnn.training.cls.learning_rate,
            cnn.training.cls.early_stopping_patience, cnn.training.cls.epochs) == (
        "multiply", 1e-3, 15, 7)
    back = with_overrides(cnn, ["model.classifier.name=mobilenet"])
    assert (back.model.classifier.mask_mode, back.training.cls.learning_rate,
            back.training.cls.early_stopping_patience, back.training.cls.epochs) == (
        "channel", 1e-4, 0, 7)
    vgg = with_overrides(cnn, ["model.classifier.name=vgg19"])  # no block: the file's values
    assert (vgg.model.classifier.mask_mode, vgg.training.cls.learning_rate) == ("channel", 1e-4)
    saved = tmp_path / "run.yaml"
    saved.write_text(dump_yaml(cnn))
    assert load_config(saved) == cnn


@pytest.mark.parametrize("block, expected", [
    ("{resnet: {training: {epochs: 3}}}", "unknown classifier family 'classifiers.resnet'"),
    ("{cnn: {optimizer: adam}}", "'classifiers.cnn' takes the sections"),
    ("{cnn: {training: {epoch: 3}}}", "did you mean 'classifiers.cnn.training.epochs'"),
    ("{cnn: {classifier: {name: vgg19}}}", "'classifiers.cnn.classifier.name' cannot be set"),
    ("{cnn: {training: {learning_rate: fast}}}", "'classifiers.cnn.training.learning_rate' must"),
])
def test_a_bad_classifier_family_block_is_one_message(tmp_path: Path, block: str,
                                                       expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"classifiers: {block}\n")
    with pytest.raises(BusiError, match=None) as err:
        load_config(path)
    assert expected in str(err.value) and str(path) in str(err.value)
