"""Tests for busi.synth: layout, determinism, atomic writing, and that the
synthetic classes differ the way real ones do (so a model has something to learn)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

import busi.data.synth as synth
from busi.data.synth import CLASSES, SynthSpec, render_case, write_dataset

NAME_RE = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(_1)?)?\.png$")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _phash(gray: np.ndarray) -> np.ndarray:
    """The pHash recipe of busi.data, repeated here so this test stands alone."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    return low > np.median(low)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dataset30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 images per class at the default size: enough for class statistics."""
    root = tmp_path_factory.mktemp("synth30") / "busi"
    counts = write_dataset(root, SynthSpec(per_class=30, seed=3))
    assert counts == dict.fromkeys(CLASSES, 30)
    return root


def _cases(root: Path, label: str) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    out = []
    for i in range(1, 31):
        stem = root / label / f"{label} ({i})"
        masks = [_read(Path(f"{stem}_mask.png"))]
        if Path(f"{stem}_mask_1.png").exists():
            masks.append(_read(Path(f"{stem}_mask_1.png")))
        out.append((_read(Path(f"{stem}.png")), masks))
    return out


def _features(img: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(bbox height/width, solidity, below/beside brightness) of one lesion."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    bw = x1 - x0 + 1
    aspect = (y1 - y0 + 1) / bw
    cnts, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull = cv2.convexHull(np.concatenate(cnts))
    solidity = float((mask > 0).sum()) / max(cv2.contourArea(hull), 1.0)
    h, w = img.shape
    top = min(y1 + 3, h - 1)
    below = img[top:, x0:x1 + 1].astype(float).mean()
    side = []
    if x0 - bw >= 0:
        side.append(img[top:, x0 - bw:x0])
    if x1 + 1 + bw <= w:
        side.append(img[top:, x1 + 1:x1 + 1 + bw])
    beside = np.mean([s.astype(float).mean() for s in side])
    return aspect, solidity, below / beside


# ------------------------------------------------------------------ spec and render_case


@pytest.mark.parametrize("kwargs", [dict(per_class=-1), dict(height=10), dict(width=20),
                                    dict(extra_mask_fraction=1.5),
                                    dict(extra_mask_fraction=-0.1)])
def test_spec_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SynthSpec(**kwargs)


@pytest.mark.parametrize("label", CLASSES)
@pytest.mark.parametrize("size", [(192, 256), (96, 128), (48, 64)])
def test_render_case_shapes_dtypes_and_binary_masks(label: str, size: tuple[int, int]) -> None:
    h, w = size
    for i in range(5):
        img, masks = render_case(label, np.random.default_rng([7, i]), h, w)
        assert img.shape == (h, w) and img.dtype == np.uint8
        assert len(masks) == 1
        m = masks[0]
        assert m.shape == (h, w) and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 255}
        if label == "normal":
            assert not m.any()
        else:
            assert m.any()
            # Fully inside with a margin: nothing on the border rows/columns.
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        # Not saturated, not black: a usable dynamic range.
        assert 25 < img.mean() < 150 and (img == 255).mean() < 0.01


def test_render_case_two_lesions_do_not_touch() -> None:
    for i in range(10):
        img, masks = render_case("benign", np.random.default_rng([1, i]), 192, 256,
                                 two_lesions=True)
        assert len(masks) == 2 and all(m.any() for m in masks)
        grown = cv2.dilate(masks[0], np.ones((5, 5), np.uint8))
        assert not (grown & masks[1]).any()
        assert (masks[1] > 0).sum() < (masks[0] > 0).sum()  # the second one is smaller


def test_render_case_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render_case("cyst", rng, 96, 128)
    with pytest.raises(ValueError):
        render_case("malignant", rng, 96, 128, two_lesions=True)
    with pytest.raises(ValueError):
        render_case("benign", rng, 20, 20)


@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_darkening_is_exactly_the_mask(label: str) -> None:
    """The ground truth promise: every mask pixel is darkened, no other pixel is."""
    rng = np.random.default_rng(5)
    h, w = 96, 128
    img = rng.uniform(0.3, 1.0, (h, w)).astype(np.float32)
    mask = synth._lesion(rng, label, h, w, (0.15, 0.25))
    out = synth._darken(img, mask, rng, label)
    inside = mask > 0
    assert np.array_equal(out[~inside], img[~inside])
    assert (out[inside] < img[inside]).all()


def test_render_case_is_deterministic_for_a_generator_state() -> None:
    a = render_case("malignant", np.random.default_rng([0, 1, 2]), 96, 128)
    b = render_case("malignant", np.random.default_rng([0, 1, 2]), 96, 128)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1][0], b[1][0])


# ------------------------------------------------------------------ write_dataset: layout


def test_layout_names_counts_and_masks(dataset30: Path) -> None:
    files = sorted(p for p in dataset30.rglob("*") if p.is_file())
    assert {p.parent.name for p in files} == set(CLASSES)
    for p in files:
        m = NAME_RE.match(p.name)
        assert m, p.name
        assert m.group(1) == p.parent.name and 1 <= int(m.group(2)) <= 30
    for label in CLASSES:
        folder = dataset30 / label
        images = [p for p in folder.iterdir() if "_mask" not in p.name]
        assert sorted(images) == sorted(folder / f"{label} ({i}).png" for i in range(1, 31))
        for img_path in images:
            img = _read(img_path)
            assert img.ndim == 2 and img.dtype == np.uint8
            mask_paths = sorted(folder.glob(f"{img_path.stem}_mask*.png"))
            assert mask_paths and mask_paths[0].name == f"{img_path.stem}_mask.png"
            for mp in mask_paths:
                mask = _read(mp)
                assert mask.shape == img.shape and mask.dtype == np.uint8
                assert set(np.unique(mask)) <= {0, 255}
                assert mask.any() == (label != "normal")
    extra = list(dataset30.rglob("*_mask_1.png"))
    assert extra and all(p.parent.name == "benign" for p in extra)


def test_extra_mask_fraction_extremes(tmp_path: Path) -> None:
    write_dataset(tmp_path / "all", SynthSpec(per_class=4, height=64, width=96,
                                              extra_mask_fraction=1.0))
    write_dataset(tmp_path / "none", SynthSpec(per_class=4, height=64, width=96,
                                               extra_mask_fraction=0.0))
    assert len(list((tmp_path / "all").rglob("*_mask_1.png"))) == 4
    assert not list((tmp_path / "none").rglob("*_mask_1.png"))


def test_images_are_distinct_to_the_near_duplicate_check(dataset30: Path) -> None:
    """The split groups images whose pHash differs by <= 6 bits: synthetic ones must not be."""
    hashes = np.array([_phash(_read(p)) for p in sorted(dataset30.rglob("*).png"))])
    dist = (hashes[:, None] != hashes[None]).sum(-1)
    np.fill_diagonal(dist, 64)
    assert dist.min() > 6


# ------------------------------------------------------------------ write_dataset: determinism


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    spec = SynthSpec(per_class=4, height=96, width=128, seed=11, extra_mask_fraction=0.5)
    write_dataset(tmp_path / "a", spec)
    write_dataset(tmp_path / "b", spec)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and len(a) >= 24
    write_dataset(tmp_path / "c", SynthSpec(per_class=4, height=96, width=128, seed=12,
                                            extra_mask_fraction=0.5))
    c = _files(tmp_path / "c")
    images = [k for k in a if "_mask" not in k]
    assert all(a[k] != c[k] for k in images)


def test_images_do_not_depend_on_per_class(tmp_path: Path) -> None:
    write_dataset(tmp_path / "small", SynthSpec(per_class=2, height=64, width=96, seed=4))
    write_dataset(tmp_path / "big", SynthSpec(per_class=5, height=64, width=96, seed=4))
    small, big = _files(tmp_path / "small"), _files(tmp_path / "big")
    assert small and all(big[k] == v for k, v in small.items())


# ------------------------------------------------------------------ write_dataset: safety


def test_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_dataset(out, SynthSpec(per_class=1, height=64, width=64))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left


def test_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "out", SynthSpec(per_class=1, height=64, width=64))


def test_accepts_an_empty_folder_and_creates_parents(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert write_dataset(tmp_path / "empty", SynthSpec(per_class=1, height=64, width=64)) == {
        c: 1 for c in CLASSES}
    assert (tmp_path / "empty" / "normal" / "normal (1)_mask.png").is_file()
    write_dataset(tmp_path / "a" / "b" / "c", SynthSpec(per_class=1, height=64, width=64))
    assert (tmp_path / "a" / "b" / "c" / "benign" / "benign (1).png").is_file()


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = cv2.imwrite
    calls = {"n": 0}

    def flaky(path: str, img: np.ndarray) -> bool:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(path, img)

    monkeypatch.setattr(synth.cv2, "imwrite", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "out", SynthSpec(per_class=3, height=64, width=64))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ physically right, learnable


def test_every_lesion_is_hypoechoic(dataset30: Path) -> None:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    for label in ("benign", "malignant"):
        for img, masks in _cases(dataset30, label):
            union = np.maximum.reduce(masks) > 0
            for m in masks:
                ring = (cv2.dilate(m, kernel) > 0) & ~union
                assert img[m > 0].mean() < 0.8 * img[ring].mean()


def test_shape_and_shadow_separate_benign_from_malignant(dataset30: Path) -> None:
    feats = {label: np.array([_features(img, masks[0]) for img, masks in _cases(dataset30, label)])
             for label in ("benign", "malignant")}
    ben, mal = feats["benign"], feats["malignant"]
    # Taller-than-wide vs wider-than-tall.
    assert mal[:, 0].mean() > 1.1 and ben[:, 0].mean() < 0.9
    # Spiculated, irregular margins are less convex.
    assert mal[:, 1].mean() < ben[:, 1].mean() - 0.05
    # Posterior shadow below malignant lesions; benign ones are not darker below.
    assert mal[:, 2].mean() < 0.85 and mal[:, 2].mean() < ben[:, 2].mean() - 0.1

    # A nearest-centroid classifier on these three numbers, leave-one-out.
    x = np.log(np.concatenate([ben, mal]))
    y = np.r_[np.zeros(len(ben)), np.ones(len(mal))]
    x = (x - x.mean(0)) / x.std(0)
    correct = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        c0 = x[keep & (y == 0)].mean(0)
        c1 = x[keep & (y == 1)].mean(0)
        pred = float(np.linalg.norm(x[i] - c1) < np.linalg.norm(x[i] - c0))
        correct += pred == y[i]
    assert correct / len(x) > 0.9


def test_normal_images_have_no_dark_column(dataset30: Path) -> None:
    """Shadowing is the lesion's doing: normal tissue has no column much darker than its row."""
    for img, _ in _cases(dataset30, "normal"):
        h, w = img.shape
        lower = img[h // 2:].astype(float)
        cols = cv2.blur(lower.mean(0, keepdims=True), (w // 8, 1))[0]
        assert cols.min() > 0.6 * np.median(cols)


def test_a_folder_filled_meanwhile_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = cv2.imwrite

    def racing(path: str, img: np.ndarray) -> bool:
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("x")
        return real(path, img)

    monkeypatch.setattr(synth.cv2, "imwrite", racing)
    with pytest.raises(FileExistsError):
        write_dataset(out, SynthSpec(per_class=1, height=64, width=64))
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_small_cnn_beats_chance_on_synthetic_images(tmp_path: Path) -> None:
    """The demo and the tests need data a model can learn: the classes must be separable."""
    keras = pytest.importorskip("keras")
    from busi.data.loading import load_dataset
    from busi.models import build_classifier

    root = tmp_path / "data"
    write_dataset(root, SynthSpec(per_class=40, seed=3, height=96, width=128))
    # 48x48 and 25 epochs: 0.77-0.97 over three seeds (64x64, 30 epochs: 0.87-0.90, twice the time).
    ds = load_dataset(root, size=(48, 48), cache_dir=None)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))
    test, train = order[:30], order[30:]
    from busi import runtime

    # Deterministic ops, as the pipeline tests before this one leave the process (TensorFlow
    # cannot turn them off again): the same result alone and inside the whole suite.
    runtime.setup(0, deterministic=True)
    model = build_classifier("cnn", (48, 48), 3, "none")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    x = ds.images[..., None].astype("float32")
    model.fit(x[train], ds.labels[train], epochs=25, batch_size=16, verbose=0)
    accuracy = float(np.mean(model.predict(x[test], verbose=0).argmax(1) == ds.labels[test]))
    # >= 17 of 30 right: guessing (p = 1/3) gets there with probability ~0.5%.
    assert accuracy > 0.55, f"accuracy {accuracy:.2f}; chance is 0.33"
