"""Typed run configuration, read from YAML.

The shape follows TF Model Garden: one dataclass per section (data, split,
augmentation, model, training, runtime, outputs). Defaults are the paper's
numbers, so a YAML file only has to say what differs; ``configs/paper.yaml``
still spells every number out so a reader can check it against the paper.

Validation is strict because a typo in a config silently falling back to a
default is the worst kind of irreproducibility: an unknown key, a wrong type or
an out-of-range value is one :class:`~busi.errors.BusiError` naming the key,
the file and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from busi.errors import BusiError

CLASSES = ("benign", "malignant", "normal")
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> dict[str, Any]:
    """Field metadata for a numeric range check (closed unless told otherwise)."""
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class DataConfig:
    """Where the images are and how they are decoded."""

    # A BUSI-layout folder or a CSV manifest, or a list of them: one data set of several
    # sources (e.g. BUSI plus the user's own labelled scans), split together.
    root: str | list[str] = "data/Dataset_BUSI_with_GT"
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    image_size: list[int] = field(default_factory=lambda: [128, 128],
                                  metadata={**_range(16, 4096), "length": 2})
    on_bad_file: Literal["error", "skip"] = "error"
    cache_dir: str = "data/cache"
    workers: int = field(default=0, metadata=_range(0, 256))


@dataclass
class SplitConfig:
    """How images are divided into train/val/test (or folds)."""

    scheme: Literal["holdout", "kfold"] = "holdout"
    test_size: float = field(default=0.1, metadata=_range(0, 1, lo_open=True, hi_open=True))
    val_size: float = field(default=0.1, metadata=_range(0, 1, hi_open=True))
    folds: int = field(default=5, metadata=_range(2, 100))
    stratify: bool = False
    group_duplicates: bool = True
    near_duplicate_distance: int = field(default=6, metadata=_range(0, 64))
    manifest_dir: str = "outputs/splits"


@dataclass
class AugmentationConfig:
    """The paper's ImageDataGenerator settings; shifts are in pixels."""

    engine: Literal["image_data_generator", "layers", "none"] = "image_data_generator"
    horizontal_flip: bool = True
    rotation_range: float = field(default=15.0, metadata=_range(0, 180))
    width_shift_range: float = field(default=10.0, metadata=_range(0))
    height_shift_range: float = field(default=10.0, metadata=_range(0))
    zoom_range: list[float] = field(default_factory=lambda: [0.8, 1.0],
                                    metadata={**_range(0.1, 10), "length": 2})
    fill_mode: Literal["nearest", "constant", "reflect", "wrap"] = "nearest"
    # What changes between scanners and hospitals, drawn per image of the training batches
    # and applied to the image only (off by default: the paper has none). Each range is
    # [low, high]; [1, 1] / 0 leaves the image alone.
    gain_range: list[float] = field(default_factory=lambda: [1.0, 1.0],
                                    metadata={**_range(0.05, 20), "length": 2})
    contrast_range: list[float] = field(default_factory=lambda: [1.0, 1.0],
                                        metadata={**_range(0.05, 20), "length": 2})
    gamma_range: list[float] = field(default_factory=lambda: [1.0, 1.0],
                                     metadata={**_range(0.05, 20), "length": 2})
    blur_sigma: float = field(default=0.0, metadata=_range(0, 20))  # px, max; half the images
    speckle: float = field(default=0.0, metadata=_range(0, 2))  # SD of multiplicative noise


@dataclass
class UNetConfig:
    """The paper's U-Net; width and depth are knobs so CPU runs can be narrower."""

    base_filters: int = field(default=64, metadata=_range(1, 1024))
    depth: int = field(default=4, metadata=_range(1, 6))
    # "plain": the paper's encoder, trained from scratch. "mobilenet": Keras' MobileNet v1
    # (alpha 1.0) as the encoder, ImageNet weights from encoder_weights ('' = random);
    # "efficientnet_lite0": EfficientNet-Lite0, its weights from the .npz (README);
    # depth is then 5 (strides 2..32) and base_filters sets the decoder's width.
    encoder: Literal["plain", "mobilenet", "efficientnet_lite0"] = "plain"
    encoder_weights: str = ""
    # "fixed": the [0, 1] image as it is (the paper); "per_image": each image standardised
    # to zero mean and unit SD inside the model, so a scanner's gain and offset drop out.
    input_norm: Literal["fixed", "per_image"] = "fixed"
    encoder_dropout: float = field(default=0.2, metadata=_range(0, 1, hi_open=True))
    decoder_dropout: float = field(default=0.1, metadata=_range(0, 1, hi_open=True))


@dataclass
class ClassifierConfig:
    """Which classifier, its weights, and how the segmentation masks feed it."""

    name: Literal["cnn", "vgg19", "mobilenet", "efficientnet_lite0"] = "cnn"
    # vgg19/mobilenet base: "imagenet" (Keras download), a weights file, "none" (random), or
    # "unet" (mobilenet, efficientnet_lite0): the encoder of its own U-Net run, whose
    # model.unet.encoder is the same family. efficientnet_lite0: its .npz file (no download).
    weights: str = "imagenet"
    masks: Literal["predicted", "ground_truth", "none"] = "predicted"
    # channel: the whole scan plus the mask as a second input channel, so a missed lesion is
    # not a blank image and the lesion's surroundings stay in view (models/inputs.py)
    # lesion_crop: a square around the predicted lesion, cut from the scan at its original
    # resolution (crop_scale x the lesion's longer side); the whole scan where none was found
    mask_mode: Literal["multiply", "crop", "channel", "lesion_crop", "none"] = "multiply"
    crop_margin: float = field(default=0.15, metadata=_range(0, 2))
    crop_scale: float = field(default=1.5, metadata=_range(1, 10))
    mask_dilation: int = field(default=0, metadata=_range(0, 64))  # px; 0 = the paper
    freeze_base: bool = False
    fine_tune_blocks: int = field(default=0, metadata=_range(0, 100))
    fine_tune_learning_rate: float = field(default=1e-5, metadata=_range(0, lo_open=True))
    fine_tune_epochs: int = field(default=0, metadata=_range(0))
    class_weights: bool = False


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


@dataclass
class TrainConfig:
    """What every training loop has: optimiser, schedule, logging.

    Stage-specific settings live in :class:`SegTrainConfig` and :class:`ClsTrainConfig`, so a
    segmentation-only key under ``training.cls`` is an unknown key, not a silently ignored one.
    """

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = field(default=5e-5, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=64, metadata=_range(1))
    epochs: int = field(default=100, metadata=_range(1))
    early_stopping_patience: int = field(default=0, metadata=_range(0))
    reduce_lr_patience: int = field(default=0, metadata=_range(0))
    tensorboard: bool = False
    steps_per_epoch: int = field(default=0, metadata=_range(0))


# The names busi.losses.segmentation_loss builds (a test keeps the two lists equal).
SegLoss = Literal["mse", "bce", "dice", "bce_dice"]
# Keras losses that take one-hot labels and softmax outputs (a test builds each with Keras).
ClsLoss = Literal["categorical_crossentropy", "categorical_focal_crossentropy",
                  "categorical_hinge", "kl_divergence", "mse"]


@dataclass
class SegTrainConfig(TrainConfig):
    """The U-Net's loop, and how its probabilities become the masks everything else uses."""

    loss: SegLoss = "mse"
    threshold: float = field(default=0.5, metadata=_range(0, 1, lo_open=True, hi_open=True))
    tune_threshold: bool = False
    flip_tta: bool = False             # U-Net masks: average with the mirrored prediction
    postprocess: Literal["none", "largest_component"] = "none"  # U-Net masks: clean-up
    out_of_fold_masks: int = field(default=0, metadata=_range(0, 20))
    fold_ensemble: bool = False        # U-Net masks of test/new images: average of the final
                                       # U-Net and the out-of-fold ones (needs out_of_fold_masks)


@dataclass
class ClsTrainConfig(TrainConfig):
    """The classifier's loop: cross-entropy on one-hot labels by default."""

    learning_rate: float = field(default=1e-4, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=32, metadata=_range(1))
    loss: ClsLoss = "categorical_crossentropy"


@dataclass
class TrainingConfig:
    seg: SegTrainConfig = field(default_factory=SegTrainConfig)
    cls: ClsTrainConfig = field(default_factory=ClsTrainConfig)


@dataclass
class RuntimeConfig:
    """How the run executes: randomness, numeric precision, devices."""

    seed: int = 42
    # auto: mixed_bfloat16 on a GPU or a CPU with native bfloat16 (AVX512-BF16/AMX), else
    # float32 (emulated bfloat16 is several times slower than float32).
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16", "auto"] = "float32"
    distribution: Literal["none", "mirrored", "data_parallel"] = "none"
    deterministic: bool = False
    # TensorFlow only: split the CPU into this many logical devices (0 = leave as is), so
    # `mirrored` can be tried without GPUs. For JAX set
    # XLA_FLAGS=--xla_force_host_platform_device_count=N before starting busi.
    cpu_devices: int = field(default=0, metadata=_range(0, 64))
    # Multi-process / multi-host `data_parallel` (JAX): the coordinator's host:port, the number
    # of processes and this process's id. Empty / 0 / -1 = read BUSI_COORDINATOR_ADDRESS,
    # BUSI_NUM_PROCESSES, BUSI_PROCESS_ID from the environment (one process if unset).
    coordinator_address: str = ""
    num_processes: int = field(default=0, metadata=_range(0, 65536))
    process_id: int = field(default=-1, metadata=_range(-1, 65535))


@dataclass
class OutputsConfig:
    root: str = "outputs"
    run_name: str = ""


@dataclass
class PredictConfig:
    """How ``busi predict`` marks calls a reader should not take at face value.

    Its own section, not under ``model`` or ``training``: it changes no weights and no
    reported figure, only which predictions of new images get flagged. It is saved with
    every run like the rest, so a classifier run carries the threshold it is meant to be
    read with (``busi predict --min-confidence`` overrides it for one call).
    """

    # A call whose top class probability is below this is flagged low_confidence.
    min_confidence: float = field(default=0.6, metadata=_range(0, 1))


@dataclass
class DecisionConfig:
    """The call a clinician acts on (models/decision.py): both thresholds are chosen on the
    validation images when a classifier is trained, reported beside the argmax call, and
    applied unchanged to new images and other sites (``--sensitivity`` picks another)."""

    # the share of validation cancers the malignant threshold must call malignant
    malignant_sensitivity: float = field(default=0.9, metadata=_range(0, 1, lo_open=True))
    # lesion or not: argmax (the classifier's own call), or a score with a threshold:
    # classifier (1 - p(normal)), unet (its highest lesion probability), both (their mean),
    # head (the U-Net encoder's presence head), head_classifier (its mean with 1 - p(normal))
    presence: Literal["argmax", "classifier", "unet", "both", "head",
                      "head_classifier"] = "argmax"
    # the share of validation lesion images the presence threshold may call lesion-free
    max_missed_lesions: float = field(default=0.03, metadata=_range(0, 1, hi_open=True))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    # Per classifier family: ``{cnn: {classifier: {...}, training: {...}}}``, values of
    # model.classifier and training.cls that suit that family, laid over the file's own
    # sections whenever that family is trained (resolve_families). A from-scratch CNN and
    # a pretrained MobileNet want different schedules; one config serves both.
    classifiers: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def _describe(tp: Any) -> str:
    """Human description of a type annotation, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {re.sub(r'^an? ', '', _describe(inner))}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _check_range(value: float, meta: dict[str, Any]) -> str | None:
    if "range" not in meta:
        return None
    lo, hi, lo_open, hi_open = meta["range"]
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if not bad:
        return None
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def _convert(value: Any, tp: Any, key: str, where: str, meta: dict[str, Any],
             default: Any = None) -> Any:
    """Check ``value`` against annotation ``tp``; return the typed value or raise."""

    original = value

    def fail(allowed: str) -> BusiError:
        return BusiError(f"'{key}' must be {allowed}, got {original!r}", where=where)

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail("a mapping of settings")
        return _build(tp, value, where, prefix=key + ".", default=default)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail(_describe(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key, where, meta)
            except BusiError:
                continue
        raise fail(_describe(tp))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return value  # its contents are checked where they are used (resolve_families)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise fail(_describe(tp))
        if "length" in meta and len(value) != meta["length"]:
            raise fail(f"a list of exactly {meta['length']} "
                       f"{re.sub(r'^an? ', '', _describe(inner))}s")
        return [_convert(v, inner, key, where, meta) for v in value]
    if tp is type(None):
        if value is not None:
            raise fail("null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
    elif tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # PyYAML reads 1e-4 (no dot) as a string; users write it
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    allowed = _check_range(value, meta)
    if allowed:
        raise fail(f"{_describe(tp)} {allowed}")
    return value


def _build(cls: type, raw: dict[str, Any], where: str, prefix: str = "",
           default: Any = None) -> Any:
    """Validate ``raw`` and lay it over ``default`` (the section's own default value).

    A partial section keeps the parent's defaults for what it does not say:
    ``training.cls: {epochs: 5}`` must keep the classifier's cross-entropy loss,
    not fall back to ``TrainConfig``'s generic (segmentation) defaults.
    """
    default = cls() if default is None else default
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            if prefix == "training.cls." and key in _field_names(SegTrainConfig):
                hint = f"'{key}' is a segmentation setting: put it under training.seg. "
            raise BusiError(
                f"unknown key '{prefix}{key}'", where=where,
                fix=f"{hint}allowed keys under '{prefix.rstrip('.') or 'top level'}': "
                    + ", ".join(fields))
    kwargs = {name: _convert(raw[name], hints[name], prefix + name, where, f.metadata,
                             getattr(default, name))
              for name, f in fields.items() if name in raw}
    return dataclasses.replace(default, **kwargs)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BusiError("config file not found", where=str(path),
                        fix="pass an existing file to --config, e.g. configs/paper.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BusiError(f"not a UTF-8 text file (byte {exc.start} cannot be decoded)",
                        where=str(path), fix="pass a YAML text file, saved as UTF-8") from None
    except OSError as exc:
        raise BusiError(f"cannot read the config file: {exc.strerror}", where=str(path),
                        fix="check the path and its permissions") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BusiError(f"YAML syntax error{line}: {problem}", where=str(path),
                        fix="correct the YAML syntax at that line") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BusiError("a config file must be a mapping of sections (data:, split:, ...)",
                        where=str(path), fix="see configs/paper.yaml for the layout")
    return raw


# One override: ``"KEY=VALUE"`` as ``--set`` writes it (VALUE read as YAML), or a
# ``(KEY, value)`` pair whose value is taken as it is (a path the user gave).
Override = str | tuple[str, Any]


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``("training.seg.epochs", 5)`` as ``{"training": {"seg": {"epochs": 5}}}``."""
    node: dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``training.seg.epochs=5`` into ``{"training": {"seg": {"epochs": 5}}}``.

    The value is parsed as YAML so ``true``, ``1e-4`` and ``[64, 64]`` get their
    natural types; the type check then happens in the same place as for files.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BusiError(f"--set expects KEY=VALUE, got {text!r}",
                        fix="write e.g. --set training.seg.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return _nest(key, parsed)


def _override_layer(override: Override) -> tuple[dict[str, Any], str]:
    """One override as a nested mapping, and how an error names it.

    A ``(key, value)`` pair is never read as YAML: a path the user gave (``--data``,
    ``--outputs``, a CV's fold folder) reaches the config as that string, where YAML would
    read ``scans #2`` as ``scans`` (a comment), ``2024-01-01`` as a date and ``on`` as true.
    It is still type-checked like any other value.
    """
    if isinstance(override, str):
        return parse_override(override), f"--set {override}"
    key, value = override
    if not isinstance(key, str) or not key.strip():
        raise BusiError(f"an override needs a key, got {override!r}",
                        fix="pass (KEY, value), e.g. ('data.root', 'data/BUSI')")
    return _nest(key, value), f"{key.strip()}={value}"


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[Override]) -> tuple[
        dict[str, Any], list[str]]:
    """``raw`` with each override laid over it, each validated on its own first so an error
    names the override that caused it; returns the merged mapping and the overrides' names."""
    names = []
    for override in overrides:
        extra, name = _override_layer(override)
        _build(Config, extra, name)
        raw = _merge(raw, extra)
        names.append(name)
    return raw, names


# classifiers.<family>.<section> -> the config section it is laid over.
FAMILY_SECTIONS = {"classifier": ("model", "classifier", ClassifierConfig),
                   "training": ("training", "cls", ClsTrainConfig)}


def _family_layer(block: dict[str, Any]) -> dict[str, Any]:
    """A family's block as a config layer: ``classifier`` -> model.classifier, ``training``
    -> training.cls."""
    layer: dict[str, Any] = {}
    for sec, (top, sub, _) in FAMILY_SECTIONS.items():
        if block.get(sec):
            layer = _merge(layer, {top: {sub: dict(block[sec])}})
    return layer


def _check_families(families: Any, where: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``classifiers:`` checked like any section: known families, known sections and keys,
    typed values; ``name`` cannot be set inside a family (the family *is* the name)."""
    known = typing.get_args(typing.get_type_hints(ClassifierConfig)["name"])
    if not isinstance(families, dict):
        raise BusiError(f"'classifiers' must be a mapping of {', '.join(known)}, got "
                        f"{families!r}", where=where)
    for name, block in families.items():
        if name not in known:
            raise BusiError(f"unknown classifier family 'classifiers.{name}'", where=where,
                            fix=f"use one of {', '.join(known)}")
        if not isinstance(block, dict) or set(block) - set(FAMILY_SECTIONS):
            raise BusiError(f"'classifiers.{name}' takes the sections "
                            f"{' and '.join(FAMILY_SECTIONS)}, got {block!r}", where=where,
                            fix=f"e.g. classifiers: {{{name}: {{training: {{epochs: 80}}}}}}")
        for sec, (_, _, cls) in FAMILY_SECTIONS.items():
            part = block.get(sec) or {}
            if "name" in part:
                raise BusiError(f"'classifiers.{name}.{sec}.name' cannot be set",
                                where=where, fix="the family's key is its name; remove it")
            _convert(part, cls, f"classifiers.{name}.{sec}", where, {})
    return families


def resolve_families(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    """``base`` (defaults and file) <- the trained family's block <- ``over`` (the command's
    overrides), as one raw mapping.

    The family's block sits between the file and the command line: ``--set
    training.cls.epochs=5`` still wins. Every family's block is stored *filled*: each
    sets every key any family sets, with the value it resolves to under this command
    (overrides included). So switching family later (a CV arm, the demo's three models:
    ``with_overrides(cfg, ['model.classifier.name=cnn'])``) lays a complete block over
    the previous family's values, and nothing of one family leaks into another.
    """
    merged = _merge(base, over)
    families = _check_families(merged.get("classifiers") or {}, where)
    if not families:
        return merged
    keys = {sec: sorted({k for b in families.values() for k in (b.get(sec) or {})})
            for sec in FAMILY_SECTIONS}

    def full(name: str) -> dict[str, Any]:
        return _merge(_merge(base, _family_layer(families.get(name, {}))), over)

    # Every family, also one the file gives no block: its filled block holds the file's own
    # values, so switching back to it undoes another family's block.
    known = typing.get_args(typing.get_type_hints(ClassifierConfig)["name"])
    filled: dict[str, dict[str, dict[str, Any]]] = {}
    for name in known:
        cfg = _build(Config, {**full(name), "classifiers": {}}, where)
        filled[name] = {sec: {k: getattr(getattr(getattr(cfg, top), sub), k) for k in keys[sec]}
                        for sec, (top, sub, _) in FAMILY_SECTIONS.items() if keys[sec]}
    name = _build(Config, {**merged, "classifiers": {}}, where).model.classifier.name
    return {**full(name), "classifiers": filled}


def load_config(path: str | Path | None = None, overrides: Sequence[Override] = (),
                ) -> Config:
    """Defaults <- YAML file <- overrides (``--set`` text, or typed ``(key, value)`` pairs),
    validated at each layer.

    Each layer is validated on its own first so an error names the layer that
    caused it (the file, or the ``--set`` argument).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
        _build(Config, raw, str(path))
    over, names = _apply_overrides({}, overrides)
    where = " ".join(([str(path)] if path else []) + names) or "defaults"
    return check_consistency(_build(Config, resolve_families(raw, over, where), where), where)


def check_consistency(cfg: Config, where: str) -> Config:
    """Rules that tie two settings together, checked when the config is read.

    Each would otherwise surface minutes into a run, inside Keras or after a
    run folder was made: a U-Net input that its pooling levels cannot halve
    evenly is a shape error in the decoder's concatenation; ImageNet
    backbones refuse inputs under 32 px.
    """
    h, w = cfg.data.image_size
    unet = cfg.model.unet
    depth = 5 if unet.encoder != "plain" else unet.depth
    step = 2 ** depth
    if h % step or w % step:
        def near(v: int) -> int:
            return max(step, round(v / step) * step)

        raise BusiError(f"'data.image_size' {h}x{w} cannot pass through the U-Net's {depth} "
                        f"pooling levels: both sides must be multiples of 2^{depth} = {step}",
                        where=where, fix=f"use e.g. [{near(h)}, {near(w)}]"
                        + (", or lower model.unet.depth" if unet.encoder == "plain" else ""))
    if unet.encoder_weights and unet.encoder == "plain":
        raise BusiError("'model.unet.encoder_weights' is for a pretrained encoder, and "
                        "model.unet.encoder is 'plain' (trained from scratch)", where=where,
                        fix="set model.unet.encoder: mobilenet, or encoder_weights: ''")
    name = cfg.model.classifier.name
    if name in ("vgg19", "mobilenet", "efficientnet_lite0") and min(h, w) < 32:
        raise BusiError(f"'model.classifier.name' {name} needs images of at least 32x32, "
                        f"'data.image_size' is {h}x{w}", where=where,
                        fix="raise data.image_size to 32 or more, or use the cnn classifier")
    seg = cfg.training.seg
    if seg.fold_ensemble and seg.out_of_fold_masks < 2:
        raise BusiError("'training.seg.fold_ensemble' needs the out-of-fold U-Nets",
                        where=where, fix="set training.seg.out_of_fold_masks to 2 or more "
                                         "(e.g. 5), or fold_ensemble: false")
    if cfg.data.root == []:
        raise BusiError("'data.root' names no data source", where=where,
                        fix="pass --data PATH (repeat it for several sources)")
    classes = cfg.data.classes
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise BusiError(f"'data.classes' must name two or more different classes, got {classes}",
                        where=where, fix="e.g. [benign, malignant, normal]")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_overrides(cfg: Config, overrides: Sequence[Override]) -> Config:
    """A copy of ``cfg`` with overrides applied (and validated): ``--set``-style text, or
    ``(key, value)`` pairs for values that must not be read as YAML (paths)."""
    over, _ = _apply_overrides({}, overrides)
    raw = resolve_families(to_dict(cfg), over, "--set")
    return check_consistency(_build(Config, raw, "--set"), "--set")


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML: what a run directory stores for reruns."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


_NAMES_SAID: set[str] = set()  # bare config names already said on stderr in this process


def find_config(name_or_path: str) -> Path:
    """Accept a path, or a bare name (``cpu``) of a config file.

    A bare name is ``configs/<name>.yaml`` under the working directory when there is
    one (a checkout's own configs, or a user's edited copies), else the copy packaged
    with busi, ``busi/configs/<name>.yaml``. In the source tree that folder is a link to
    the top-level ``configs/``, so there is one set of files to edit; a built wheel
    carries them as they were when it was built. When ``./configs/<name>.yaml`` is not
    the packaged file of that name, stderr says which one was read (once per name): two
    files of one name that differ are the case a reader must be told about. Every run's
    ``config.yaml`` records the settings that were read either way.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    packaged = Path(__file__).parent / "configs" / f"{name_or_path}.yaml"
    for candidate in (Path("configs") / f"{name_or_path}.yaml", packaged):
        if candidate.is_file():
            differs = (candidate is not packaged and packaged.is_file()
                       and candidate.read_bytes() != packaged.read_bytes())
            if differs and name_or_path not in _NAMES_SAID:
                _NAMES_SAID.add(name_or_path)
                print(f"busi: config {name_or_path!r} is {candidate.resolve()} (not the same "
                      f"as busi's packaged {packaged.resolve()})", file=sys.stderr)
            return candidate
    names = ", ".join(sorted(f.stem for f in packaged.parent.glob("*.yaml"))) or "paper, cpu, demo"
    raise BusiError(f"no config named {name_or_path!r}", where="--config",
                    fix=f"pass a YAML path, or one of: {names}")
