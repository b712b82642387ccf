"""Segmentation losses and per-epoch metrics, in ``keras.ops`` so any backend runs them."""

from __future__ import annotations

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)
from keras import ops  # noqa: E402

from busi.errors import BusiError  # noqa: E402

SEG_LOSSES = ("mse", "bce", "dice", "bce_dice")


@keras.saving.register_keras_serializable(package="busi")
class SoftDice(keras.losses.Loss):
    """1 - soft Dice per image, smoothed by 1: an empty mask predicted empty costs 0.

    Per image, not pooled over the batch: a per-sample loss is what Keras can
    average correctly across devices (a batch-pooled Dice is summed per replica
    under MirroredStrategy, doubling it on two devices), and the same value on
    one device or many is what the distribution tests pin.
    """

    def __init__(self, name: str = "dice", smooth: float = 1.0, **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        axes = tuple(range(1, len(y_pred.shape)))
        y_true = ops.cast(y_true, y_pred.dtype)
        inter = ops.sum(y_true * y_pred, axis=axes)
        total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        return 1.0 - (2.0 * inter + self.smooth) / (total + self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="busi")
class BceDice(keras.losses.Loss):
    """Binary cross-entropy plus soft Dice, per image: BCE gives smooth per-pixel
    gradients, Dice counters the ~10:1 background/lesion imbalance of BUSI masks."""

    def __init__(self, name: str = "bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.dice = SoftDice()

    def call(self, y_true, y_pred):
        axes = tuple(range(1, len(y_pred.shape) - 1))
        bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=axes)
        return bce + self.dice.call(y_true, y_pred)


def segmentation_loss(name: str) -> keras.losses.Loss:
    losses = {"mse": keras.losses.MeanSquaredError, "bce": keras.losses.BinaryCrossentropy,
              "dice": SoftDice, "bce_dice": BceDice}
    if name not in losses:
        raise BusiError(f"unknown segmentation loss {name!r}", where="training.seg.loss",
                        fix=f"use one of {', '.join(SEG_LOSSES)}")
    return losses[name]()


@keras.saving.register_keras_serializable(package="busi")
class DiceScore(keras.metrics.Metric):
    """Dice of the thresholded prediction, pooled over all pixels seen in the epoch."""

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.threshold = threshold
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="inter")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t = ops.cast(y_true > 0.5, "float32")
        p = ops.cast(y_pred > self.threshold, "float32")
        self.intersection.assign_add(ops.sum(t * p))
        self.total.assign_add(ops.sum(t) + ops.sum(p))

    def result(self):
        return ops.divide_no_nan(2.0 * self.intersection, self.total)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


def segmentation_metrics(threshold: float = 0.5) -> list[keras.metrics.Metric]:
    return [DiceScore(threshold, name="dice"),
            keras.metrics.BinaryIoU(target_class_ids=[1], threshold=threshold, name="iou")]
