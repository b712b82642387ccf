"""Synthetic BUSI-layout data: the demo's default and the tests' fixture.

No patient image is ever committed, so the project makes its own. The images
imitate what distinguishes the classes on real ultrasound (BI-RADS descriptors):

- texture: layered tissue (bright skin line, dark fat, brighter gland) times
  Rayleigh speckle, darkening with depth;
- benign: a smooth, oval, wider-than-tall hypoechoic lesion, sometimes with
  posterior enhancement, sometimes a second lesion saved as ``_mask_1.png``;
- malignant: an irregular, spiculated, taller-than-wide hypoechoic lesion
  casting a posterior acoustic shadow;
- normal: tissue only, with an all-zero mask.

Each image depends only on (seed, class, index), so output is byte-identical
for a seed, and a small CNN can learn the classes (shape and shadow differ).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("benign", "malignant", "normal")


@dataclass(frozen=True)
class SynthSpec:
    per_class: int = 20
    height: int = 192
    width: int = 256
    seed: int = 0
    extra_mask_fraction: float = 0.15


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Layered echogenicity, 0..1, before speckle."""
    y = np.arange(h, dtype=np.float32)[:, None] / h
    x = np.arange(w, dtype=np.float32)[None, :] / w
    skin = 0.06 + 0.02 * rng.random()
    fat = skin + 0.15 + 0.1 * rng.random()
    wave = 0.03 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 1.5) + rng.random()))
    base = np.where(y < skin + wave, 0.85, np.where(y < fat + wave, 0.35, 0.6))
    blobs = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), w / 20)
    blobs = (blobs - blobs.mean()) / (blobs.std() + 1e-6)
    tissue = base + 0.12 * blobs
    return np.clip(tissue * (1.0 - 0.45 * y), 0.05, 1.0).astype(np.float32)


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float,
             radius_fn=None) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    r = np.sqrt(dy**2 + dx**2)
    if radius_fn is not None:
        r = r / radius_fn(np.arctan2(dy, dx))
    return (r <= 1.0).astype(np.uint8)


def _lesion(rng: np.random.Generator, label: str, h: int, w: int,
            avoid: np.ndarray | None = None) -> np.ndarray:
    """A lesion mask (0/1) fully inside the image, not overlapping ``avoid``."""
    for _ in range(50):
        size = rng.uniform(0.08, 0.25) * w / 2
        if label == "benign":
            aspect = rng.uniform(1.3, 2.0)  # wider than tall
            rx, ry = size * aspect ** 0.5, size / aspect ** 0.5
            radius_fn = None
        else:
            aspect = rng.uniform(1.2, 1.8)  # taller than wide
            rx, ry = size / aspect ** 0.5, size * aspect ** 0.5
            k = rng.integers(3, 7, size=3)
            a = rng.uniform(0.08, 0.18, size=3)
            ph = rng.uniform(0, 2 * np.pi, size=3)
            n_spic = int(rng.integers(6, 12))
            spic_ph = rng.uniform(0, 2 * np.pi)

            def radius_fn(t, k=k, a=a, ph=ph, n=n_spic, sp=spic_ph):
                lobes = 1 + sum(ai * np.sin(ki * t + pi) for ki, ai, pi in zip(k, a, ph,
                                                                               strict=True))
                spikes = 0.35 * np.clip(np.cos(n * t + sp), 0, 1) ** 12
                return lobes + spikes
        margin = 1.5 * max(rx, ry) + 2
        top = max(margin, 0.25 * h)
        if top >= h - margin or margin >= w - margin:
            continue
        cy, cx = rng.uniform(top, h - margin), rng.uniform(margin, w - margin)
        mask = _ellipse(h, w, cy, cx, ry, rx, radius_fn)
        if avoid is not None and (cv2.dilate(avoid, np.ones((5, 5), np.uint8)) & mask).any():
            continue
        if mask.sum() > 20:
            return mask
    raise RuntimeError("could not place a lesion; make the image larger")


def render_case(label: str, rng: np.random.Generator, height: int, width: int,
                two_lesions: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic image (uint8 HxW) and its lesion masks (0/255, one per lesion)."""
    h, w = height, width
    img = _tissue(rng, h, w)
    masks: list[np.ndarray] = []
    if label != "normal":
        first = _lesion(rng, label, h, w)
        masks.append(first)
        if two_lesions and label == "benign":
            masks.append(_lesion(rng, "benign", h, w, avoid=first))
        for m in masks:
            soft = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.0 if label == "benign" else 0.6)
            ys, xs = np.nonzero(m)
            below = np.zeros((h, w), np.float32)
            below[ys.max():, xs.min():xs.max() + 1] = 1.0
            below = cv2.GaussianBlur(below, (0, 0), max(2.0, (xs.max() - xs.min()) / 6))
            if label == "malignant":       # posterior acoustic shadow
                img *= 1.0 - 0.55 * below
            elif rng.random() < 0.6:      # posterior enhancement
                img *= 1.0 + 0.25 * below
            darkness = rng.uniform(0.25, 0.45)
            img = img * (1 - soft) + img * darkness * soft
    speckle = rng.rayleigh(1.0, (h, w)).astype(np.float32) / np.sqrt(np.pi / 2)
    speckle = cv2.GaussianBlur(speckle, (0, 0), 0.7)
    out = np.clip(img * speckle * 200.0, 0, 255).astype(np.uint8)
    if not masks:
        masks = [np.zeros((h, w), np.uint8)]
    return out, [(m > 0).astype(np.uint8) * 255 for m in masks]


def write_dataset(out_dir: str | os.PathLike, spec: SynthSpec) -> dict[str, int]:
    """Write ``<class>/<class> (i).png`` + ``_mask.png`` (+ ``_mask_1.png``) under ``out_dir``.

    Written into a temporary sibling folder and renamed at the end, so an
    interrupted call leaves no half data set; refuses a non-empty ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {}
        for ci, label in enumerate(CLASSES):
            folder = tmp / label
            folder.mkdir()
            for i in range(1, spec.per_class + 1):
                rng = np.random.default_rng([spec.seed, ci, i])
                two = label == "benign" and rng.random() < spec.extra_mask_fraction
                image, masks = render_case(label, rng, spec.height, spec.width, two)
                cv2.imwrite(str(folder / f"{label} ({i}).png"), image)
                for k, m in enumerate(masks):
                    suffix = "_mask" if k == 0 else f"_mask_{k}"
                    cv2.imwrite(str(folder / f"{label} ({i}){suffix}.png"), m)
            counts[label] = spec.per_class
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
