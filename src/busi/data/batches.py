"""Input pipeline: batches for ``model.fit`` as a ``keras.utils.PyDataset``.

PyDataset runs on every Keras backend (no tf.data), and with ``workers > 1``
prepares the next batches in threads while the model trains, so augmentation
does not stall the step. Each batch's random transform is seeded from
(seed, epoch, batch), so a run is reproducible whatever the thread timing.
Train with :func:`fit`, which keeps "epoch" fit's epoch and the batch order Batches'.
"""

from __future__ import annotations

import math

from busi.runtime import import_keras

keras = import_keras()  # first import of the backend: quiet (see runtime)
import numpy as np  # noqa: E402

from busi.data.augment import Augment  # noqa: E402


class Batches(keras.utils.PyDataset):
    """(x, y) batches from in-memory arrays, shuffled per epoch, optionally augmented.

    ``x``: uint8 images (N, H, W), or model inputs with their channels (N, H, W, C),
    scaled by ``x_scale`` (1/255 for the U-Net, 1 for classifiers, whose models rescale
    themselves). ``y``: masks (N, H, W),
    transformed with the images, or one-hot labels (N, C), left alone.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *,
                 augment: Augment | None = None, shuffle: bool = False, seed: int = 0,
                 x_scale: float = 1.0 / 255, steps: int = 0, workers: int = 1,
                 shard: tuple[int, int] = (0, 1), multiple: int = 1):
        super().__init__(workers=workers, use_multiprocessing=False,
                         max_queue_size=max(4, 2 * workers))
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.augment, self.shuffle, self.seed, self.x_scale = augment, shuffle, seed, x_scale
        self.y_is_mask = y.ndim == 3
        # Several devices: every batch is cut to a multiple of the device count (Keras'
        # distributed steps fail on uneven per-device shapes); at most multiple-1 images of
        # a pass are left out. Several processes: each walks the same global batches (same
        # seed) and takes its slice of each.
        self.shard, self.multiple = shard, max(1, multiple)
        if batch_size % self.multiple:
            from busi.errors import BusiError

            raise BusiError(f"batch size {batch_size} is not divisible by the {self.multiple} "
                            "devices", where="training.*.batch_size",
                            fix=f"use a multiple of {self.multiple}")
        rest = len(x) % batch_size
        full = len(x) // batch_size + (1 if rest - rest % self.multiple else 0)
        self.steps = steps or full
        self.epoch = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Order of samples for an epoch: one pass, or several when steps asks for more."""
        n = len(self.x)
        reps = max(1, math.ceil(self.steps * self.batch_size / n)) if n else 1
        if not self.shuffle:
            return np.arange(n)  # evaluation: every image exactly once
        rng = np.random.default_rng([self.seed, epoch])
        return np.concatenate([rng.permutation(n) for _ in range(reps)])

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        idx = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        idx = idx[:len(idx) - len(idx) % self.multiple]
        if self.shard[1] > 1:
            idx = idx[self.shard[0]::self.shard[1]]
        x = self.x[idx].astype("float32") * self.x_scale
        if x.ndim == 3:  # gray images: add the channel axis
            x = x[..., None]
        y = self.y[idx][..., None].astype("float32") if self.y_is_mask else self.y[idx]
        if self.augment is not None:
            seed = int(np.random.default_rng([self.seed, self.epoch, i]).integers(2**31 - 1))
            if self.y_is_mask:
                x, y = self.augment(x, y, seed)
                y = (y > 0.5).astype("float32")
            else:
                x, _ = self.augment(x, None, seed)
        return x, y

    def set_epoch(self, epoch: int) -> None:
        """Shuffle and augment as in ``epoch``; call only while no worker is fetching."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._order = self._permutation(epoch)

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


class FollowEpochs(keras.callbacks.Callback):
    """Set each epoch's ``Batches.epoch`` to ``model.fit``'s epoch number.

    Counting ``on_epoch_end`` calls is off by one under Keras 3 (``fit`` calls it once
    before the first epoch, in ``EpochIterator.reset``), and restarts at 0 when a run
    resumes at ``initial_epoch=k``. ``on_epoch_begin`` runs before the data adapter
    starts its worker threads for the epoch and after it stopped them for the last
    one, so no thread reads the epoch while it changes.
    """

    def __init__(self, batches: Batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.batches.set_epoch(epoch)


def fit(model, train: Batches, *, callbacks: list | tuple = (), **kwargs):
    """``model.fit(train, ...)`` so that its batches depend on (seed, epoch, batch) only.

    :class:`FollowEpochs` makes ``Batches.epoch`` fit's epoch (also when a run resumes
    at ``initial_epoch``), and ``shuffle=False`` keeps the batch order of ``Batches``,
    which shuffles itself per epoch: Keras' own batch-order shuffle draws from the
    global ``random``, which a resumed run re-seeds, so epoch k would replay epoch 0's.
    """
    return model.fit(train, shuffle=False, callbacks=[FollowEpochs(train), *callbacks],
                     **kwargs)
