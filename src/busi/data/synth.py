"""Synthetic BUSI-layout data: the demo's default and the tests' fixture.

No patient image may be committed, so the project makes its own. The images
imitate, in a deliberately simple way, the physics and the BI-RADS descriptors
that separate the classes on real breast ultrasound, so that a small CNN has
something real-looking to learn and the tests can check it:

- tissue: layers of different echogenicity (bright skin line, dark
  subcutaneous fat with bright Cooper's ligaments, brighter heterogeneous
  glandular tissue, striated pectoral muscle), multiplied by Rayleigh speckle
  (the envelope of a sum of random scatterers), darkening with depth
  (attenuation that time-gain compensation does not fully undo);
- benign: a smooth, oval, wider-than-tall ("parallel") hypoechoic lesion with a
  sharp margin, often with posterior acoustic enhancement (a fluid-like lesion
  attenuates less than tissue, so what is below it looks brighter);
- malignant: an irregular, spiculated, taller-than-wide ("not parallel")
  hypoechoic lesion with an indistinct margin and a posterior acoustic shadow
  (desmoplastic tissue attenuates strongly, so what is below it looks darker);
- normal: tissue only, with an all-zero mask.

Each mask is exactly the set of pixels darkened as lesion, so it is true ground
truth. Each image depends only on (seed, class, index), so output is
byte-identical for a seed and independent of ``per_class``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("benign", "malignant", "normal")

_MIN_SIDE = 48  # below this a spiculated lesion is a handful of pixels: not worth supporting


@dataclass(frozen=True)
class SynthSpec:
    """What to generate; every field takes part in the output, nothing else does."""

    per_class: int = 20          # images per class
    height: int = 192            # output image height (px)
    width: int = 256             # output image width (px)
    seed: int = 0
    extra_mask_fraction: float = 0.15  # benign images with a 2nd lesion ("_mask_1.png")

    def __post_init__(self) -> None:
        # Checked here so a bad spec fails before anything is written.
        if self.per_class < 0:
            raise ValueError(f"per_class must be >= 0, got {self.per_class}")
        if min(self.height, self.width) < _MIN_SIDE:
            raise ValueError(f"height and width must be >= {_MIN_SIDE}, "
                             f"got {self.height}x{self.width}")
        if not 0.0 <= self.extra_mask_fraction <= 1.0:
            raise ValueError("extra_mask_fraction must be in [0, 1], "
                             f"got {self.extra_mask_fraction}")


# --------------------------------------------------------------------------- tissue


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sx: float, sy: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise blurred anisotropically (structure, not speckle)."""
    field = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0),
                             sigmaX=max(sx, 0.5), sigmaY=max(sy, 0.5),
                             borderType=cv2.BORDER_REFLECT)
    return (field - field.mean()) / (field.std() + 1e-6)


def _boundary(rng: np.random.Generator, x: np.ndarray, depth: float, wave: float) -> np.ndarray:
    """A wavy, slightly tilted interface depth (fraction of height) for each column."""
    tilt = rng.uniform(-0.08, 0.08) * (x - 0.5)
    waves = sum(rng.uniform(0.3, 1.0) * wave
                * np.sin(2 * np.pi * (rng.uniform(0.4, 2.0) * x + rng.random()))
                for _ in range(2))
    return depth + tilt + waves


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity map (about 0..1) of layered breast tissue, before speckle.

    Layers are blended with a soft step so interfaces look like specular
    reflectors rather than hard edges; texture is smoother laterally than
    axially because ultrasound resolution is.
    """
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    soft = 1.5 / h  # interface blur, in fractions of height

    def below(b: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(np.clip((b - y) / soft, -30.0, 30.0)))

    skin = _boundary(rng, x, rng.uniform(0.03, 0.06), 0.006)
    skin_thick = max(2.5 / h, rng.uniform(0.015, 0.03))
    fat_bottom = _boundary(rng, x, rng.uniform(0.18, 0.34), rng.uniform(0.01, 0.04))
    gland_bottom = fat_bottom + _boundary(rng, x, rng.uniform(0.4, 0.55), rng.uniform(0.01, 0.04))

    e_gel, e_skin, e_fat = 0.08, rng.uniform(0.85, 1.0), rng.uniform(0.22, 0.35)
    e_gland, e_muscle = rng.uniform(0.55, 0.75), rng.uniform(0.35, 0.5)

    fat_tex = _smooth_noise(rng, h, w, w / 30, h / 40)
    gland_tex = _smooth_noise(rng, h, w, w / 18, h / 70)
    fat = e_fat * (1.0 + 0.25 * fat_tex)
    # Bright fibrous strands dominate; dark fat islands are kept shallow so that
    # normal tissue does not grow lesion-like dark ovals.
    gland = e_gland * (1.0 + 0.3 * np.clip(gland_tex, -0.8, None))
    # Pectoral muscle: irregular, slightly oblique fibre striations.
    phase = y * rng.uniform(8, 14) + rng.uniform(-1.5, 1.5) * x
    stripes = np.sin(2 * np.pi * (phase + 0.35 * _smooth_noise(rng, h, w, w / 10, h / 10)))
    muscle = e_muscle * (1.0 + 0.15 * stripes)

    t = e_gel + (e_skin - e_gel) * below(skin)
    t = t + (fat - e_skin) * below(skin + skin_thick)
    t = t + (gland - fat) * below(fat_bottom)
    t = t + (muscle - gland) * below(gland_bottom)

    # Cooper's ligaments: thin bright curvilinear echoes crossing the fat.
    lig = np.zeros((h, w), np.float32)
    xs = np.arange(w, dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):
        frac = rng.uniform(0.2, 0.9)
        ys = (skin + skin_thick + frac * (fat_bottom - skin - skin_thick))[0] * h
        sway = np.sin(2 * np.pi * (xs / w * rng.uniform(0.5, 2) + rng.random()))
        ys = ys + rng.uniform(2, 6) * sway
        x0, x1 = sorted(rng.uniform(0, w, size=2))
        keep = (xs >= x0) & (xs <= x1)
        if keep.sum() < 2:
            continue
        pts = np.stack([xs[keep], ys[keep]], axis=1).round().astype(np.int32)
        cv2.polylines(lig, [pts], False, 1.0, 1, cv2.LINE_AA)
    t = t + 0.35 * cv2.GaussianBlur(lig, (0, 0), 0.7)

    attenuation = np.exp(-rng.uniform(0.5, 1.0) * y)
    return np.clip(t * attenuation, 0.03, 1.2).astype(np.float32)


# --------------------------------------------------------------------------- lesions


def _outline(rng: np.random.Generator, label: str, rx: float, ry: float,
             angle: float) -> np.ndarray:
    """Boundary polygon (N, 2) around (0, 0), in pixels.

    Benign: an ellipse with at most a gentle lobulation. Malignant: the radius
    is modulated by several random harmonics (angular, lobulated margins).
    """
    theta = np.linspace(0.0, 2 * np.pi, 360, endpoint=False)
    radius = np.ones_like(theta)
    if label == "benign":
        for k in (2, 3):
            radius += rng.uniform(0.0, 0.04) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    else:
        for k in rng.choice(np.arange(3, 10), size=int(rng.integers(3, 5)), replace=False):
            radius += rng.uniform(0.05, 0.13) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        for k in rng.choice(np.arange(10, 18), size=2, replace=False):
            radius += rng.uniform(0.02, 0.04) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    px, py = rx * radius * np.cos(theta), ry * radius * np.sin(theta)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * px - s * py, s * px + c * py], axis=1)


def _spicules(rng: np.random.Generator, outline: np.ndarray, scale: float) -> list[np.ndarray]:
    """Thin tapered spikes radiating from the boundary (triangles, in pixels)."""
    spikes = []
    n = len(outline)
    for idx in rng.choice(n, size=int(rng.integers(5, 12)), replace=False):
        p = outline[idx]
        r = float(np.hypot(*p))
        d = p / (r + 1e-6)
        normal = np.array([-d[1], d[0]])
        length = rng.uniform(0.3, 0.8) * scale
        half = rng.uniform(0.8, 1.6) * max(1.0, scale / 20)
        base = p - d * 0.15 * r
        spikes.append(np.stack([base + normal * half, base - normal * half, p + d * length]))
    return spikes


def _fill(polys: list[np.ndarray], shape: tuple[int, int],
          offset: tuple[float, float]) -> np.ndarray:
    """Rasterise polygons (pixel coordinates relative to ``offset``) to a 0/1 uint8 mask."""
    mask = np.zeros(shape, np.uint8)
    shift = 4  # sub-pixel precision of cv2.fillPoly
    pts = [np.round((p + np.asarray(offset)) * (1 << shift)).astype(np.int32) for p in polys]
    cv2.fillPoly(mask, pts, 1, cv2.LINE_8, shift)
    return mask


def _lesion_shape(rng: np.random.Generator, label: str, major: float) -> list[np.ndarray]:
    """Polygons of one lesion centred on (0, 0); ``major`` is the body's long axis (px)."""
    if label == "benign":
        aspect = rng.uniform(1.3, 2.0)          # wider than tall: parallel to the skin
        rx, ry = major / 2, major / 2 / aspect
    else:
        aspect = rng.uniform(1.2, 1.8)          # taller than wide: not parallel
        rx, ry = major / 2 / aspect, major / 2
    body = _outline(rng, label, rx, ry, rng.uniform(-0.15, 0.15))
    if label == "benign":
        return [body]
    return [body, *_spicules(rng, body, major / 2)]


def _place(rng: np.random.Generator, polys: list[np.ndarray], h: int, w: int,
           avoid: np.ndarray | None) -> np.ndarray | None:
    """Put the lesion fully inside the image with a margin, clear of ``avoid``; None if no room."""
    allp = np.concatenate(polys)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    margin = max(3.0, 0.03 * min(h, w))
    x_range = (margin - lo[0], w - 1 - margin - hi[0])
    # Lesions sit in the glandular layer: below the fat, above the chest wall.
    y_range = (max(margin - lo[1], 0.3 * h), min(h - 1 - margin - hi[1], 0.7 * h))
    if y_range[0] > y_range[1]:
        y_range = (margin - lo[1], h - 1 - margin - hi[1])
    if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
        return None
    gap = np.ones((2 * int(margin) + 1,) * 2, np.uint8)
    grown = cv2.dilate(avoid, gap) if avoid is not None else None
    for _ in range(30):
        cx, cy = rng.uniform(*x_range), rng.uniform(*y_range)
        mask = _fill(polys, (h, w), (cx, cy))
        if grown is None or not (grown & mask).any():
            return mask
    return None


def _lesion(rng: np.random.Generator, label: str, h: int, w: int,
            size_range: tuple[float, float], avoid: np.ndarray | None = None) -> np.ndarray:
    """One lesion mask (0/1); the size shrinks until it fits, so small images still work."""
    lo, hi = size_range
    for _ in range(20):
        polys = _lesion_shape(rng, label, rng.uniform(lo, hi) * w)
        mask = _place(rng, polys, h, w, avoid)
        if mask is not None and mask.any():
            return mask
        hi = max(lo, hi * 0.85)
        lo *= 0.9
    raise RuntimeError(f"could not place a {label} lesion in a {h}x{w} image")


def _below(mask: np.ndarray) -> np.ndarray:
    """1 in every pixel under the lesion's lowest point in each of its columns, else 0."""
    h = mask.shape[0]
    cols = np.flatnonzero(mask.any(axis=0))
    bottom = h - 1 - np.argmax(mask[::-1, cols], axis=0)
    rows = np.arange(h)[:, None]
    out = np.zeros(mask.shape, np.float32)
    out[:, cols] = (rows > bottom[None, :]).astype(np.float32)
    return out


def _darken(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, label: str) -> np.ndarray:
    """Make the lesion hypoechoic inside ``mask`` and nowhere else.

    The darkening ramps in from the margin (sharply for benign, well-defined
    margins; gradually for malignant, indistinct ones), but every mask pixel is
    darkened and no pixel outside is, so the mask is exact ground truth.
    """
    darkness = rng.uniform(0.25, 0.45)                   # interior / surrounding brightness
    s = max(0.5, mask.shape[1] / 256)
    ramp = s * (rng.uniform(1.0, 2.0) if label == "benign" else rng.uniform(2.5, 4.5))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    t = np.clip(dist / ramp, 0.0, 1.0)
    h, w = mask.shape
    echoes = 1.0 + 0.15 * _smooth_noise(rng, h, w, 2.0, 1.5)  # low-level internal echoes
    factor = 1.0 - (1.0 - darkness * echoes) * (0.4 + 0.6 * t)
    return np.where(mask > 0, img * factor, img).astype(np.float32)


def _posterior(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
               label: str) -> np.ndarray:
    """Posterior acoustic features: shadow for malignant, enhancement (sometimes) for benign."""
    ys, xs = np.nonzero(mask)
    lw, lh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    below = _below(mask)
    if label == "malignant":
        # Shadow: narrower than the lesion, down to the bottom, edges blurred.
        core = cv2.erode(below, np.ones((1, max(1, int(lw * 0.2)) | 1), np.uint8))
        core = cv2.GaussianBlur(core, (0, 0), sigmaX=max(1.5, lw / 8), sigmaY=2.0)
        return img * (1.0 - rng.uniform(0.45, 0.7) * core)
    if rng.random() < 0.6:
        h = mask.shape[0]
        fade = np.exp(-np.maximum(0, np.arange(h) - ys.max())[:, None] / (1.5 * lh))
        band = cv2.GaussianBlur(below * fade.astype(np.float32), (0, 0),
                                sigmaX=max(1.5, lw / 10), sigmaY=1.5)
        return img * (1.0 + rng.uniform(0.2, 0.4) * band)
    return img


def render_case(label: str, rng: np.random.Generator, height: int, width: int,
                two_lesions: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic ultrasound image and its lesion masks.

    Returns ``(image, masks)``: ``image`` is uint8 ``height x width`` gray;
    ``masks`` holds one uint8 0/255 mask per lesion (``[all zeros]`` for
    normal). ``two_lesions`` (benign only) adds a second, smaller lesion that
    does not touch the first, as some BUSI cases have ``_mask_1.png``.
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    if two_lesions and label != "benign":
        raise ValueError("two_lesions is only supported for benign cases")
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"height and width must be >= {_MIN_SIDE}, got {height}x{width}")
    h, w = height, width
    img = _tissue(rng, h, w)
    masks: list[np.ndarray] = []
    if label != "normal":
        masks.append(_lesion(rng, label, h, w, (0.12, 0.25) if label == "benign" else (0.13, 0.22)))
        if two_lesions:
            masks.append(_lesion(rng, label, h, w, (0.08, 0.13), avoid=masks[0]))
        for m in masks:
            img = _posterior(img, m, rng, label)
        for m in masks:  # after the shadows, so a mask pixel's darkening is the lesion's own
            img = _darken(img, m, rng, label)

    # Speckle: Rayleigh envelope (mean 1), grains longer laterally than axially.
    speckle = rng.rayleigh(math.sqrt(2 / math.pi), (h, w)).astype(np.float32)
    s = max(1.0, w / 256)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=1.1 * s, sigmaY=0.6 * s)
    speckle /= speckle.mean()
    gain = rng.uniform(175.0, 215.0)
    out = np.clip(img * speckle * gain, 0, 255).round().astype(np.uint8)
    if not masks:
        masks = [np.zeros((h, w), np.uint8)]
    return out, [np.where(m > 0, 255, 0).astype(np.uint8) for m in masks]


# --------------------------------------------------------------------------- files


def _image_rng(seed: int, class_index: int, i: int) -> np.random.Generator:
    """The per-image generator: images depend on (seed, class, index) and nothing else."""
    return np.random.default_rng([seed, class_index, i])


def write_dataset(out_dir: str | os.PathLike, spec: SynthSpec) -> dict[str, int]:
    """Write a BUSI-layout data set and return the number of images per class.

    Layout: ``out_dir/<class>/<class> (i).png`` with ``<class> (i)_mask.png``
    (and ``_mask_1.png`` for a second lesion), ``i = 1..per_class``, spelt as in
    BUSI so the same loader reads both. Refuses (``FileExistsError``) a
    non-empty ``out_dir``: data is never overwritten. Everything is written to
    a temporary sibling folder that is renamed into place at the end, so an
    interrupted call leaves either nothing or a complete data set.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        counts: dict[str, int] = {}
        for ci, label in enumerate(CLASSES):
            folder = tmp / label
            folder.mkdir()
            for i in range(1, spec.per_class + 1):
                rng = _image_rng(spec.seed, ci, i)
                two = label == "benign" and rng.random() < spec.extra_mask_fraction
                image, masks = render_case(label, rng, spec.height, spec.width, two)
                stem = f"{label} ({i})"
                files = [(f"{stem}.png", image)]
                files += [(f"{stem}_mask{'' if k == 0 else f'_{k}'}.png", m)
                          for k, m in enumerate(masks)]
                for name, array in files:
                    if not cv2.imwrite(str(folder / name), array):
                        raise OSError(f"could not write {folder / name}")
            counts[label] = spec.per_class
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a data set is for everyone to read
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts



def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``, which may exist only as an empty folder.

    On POSIX the rename atomically replaces an empty folder; Windows cannot, so
    there the empty folder is removed first. If ``out`` was filled meanwhile,
    its contents win and the call fails.
    """
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
            os.replace(tmp, out)
        elif out.exists():
            raise FileExistsError(f"{out} was filled while writing; nothing replaced") from exc
        else:
            raise
