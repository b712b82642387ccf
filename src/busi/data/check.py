"""``busi data check``: what is in a data folder, and what is wrong with it.

Before training on anyone's images a user wants to know: how many per class,
which files are unusable, and which images are (near-)duplicates -- BUSI has
many, some filed under both benign and malignant, which both inflates test
scores and mislabels cases.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from busi.data.loading import Dataset, Source, load_dataset
from busi.data.split import duplicate_groups


@dataclass
class CheckReport:
    root: Path                     # the (first) source
    classes: tuple[str, ...]
    images_per_class: dict[str, int]
    masks_per_image: dict[int, int]
    images_without_mask: list[str]
    masks_without_image: list[str]
    unreadable: list[tuple[str, str]]
    other_files: list[str]
    size_min: tuple[int, int]
    size_max: tuple[int, int]
    exact_groups: list[list[str]]
    near_groups: list[list[str]]
    near_distance: int
    empty_lesion_masks: list[str] = field(default_factory=list)
    nonempty_normal_masks: list[str] = field(default_factory=list)
    label_of: dict[str, str] = field(default_factory=dict)  # id -> class, of usable images
    # With several sources: images per class of each (by source path); ids carry its tag.
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)  # patient id -> usable images

    @property
    def cross_class_groups(self) -> list[list[str]]:
        return [g for g in self.exact_groups + self.near_groups
                if len({self.label_of.get(f, f.split("/")[0]) for f in g}) > 1]

    @property
    def n_problems(self) -> int:
        """Problems that make a file unusable (duplicates are reported, not counted)."""
        return (len(self.images_without_mask) + len(self.masks_without_image)
                + len(self.unreadable))


def _groups(files: list[str], ids: np.ndarray) -> list[list[str]]:
    out: dict[int, list[str]] = {}
    for f, g in zip(files, ids, strict=True):
        out.setdefault(int(g), []).append(f)
    return [sorted(v) for v in out.values() if len(v) > 1]


def _name(path: str | Path, src: Source) -> str:
    """A file as the report names it: relative to its source, behind the source's tag."""
    try:
        name = Path(path).relative_to(src.layout.root).as_posix()
    except ValueError:
        name = str(path)
    return f"{src.tag}/{name}" if src.tag else name


def check_dataset(root: str | Path | list[str] | list[Path],
                  classes: tuple[str, ...] = ("benign", "malignant", "normal"),
                  *, near_distance: int = 6, cache_dir: str | Path | None = "data/cache",
                  size: tuple[int, int] = (128, 128)) -> CheckReport:
    """Check one data source, or several together (``root`` a list, as ``data.root``).

    With several, every file is named by its source's tag (as the ids are) and
    duplicates are looked for across sources too: the same scan in BUSI and in a
    user's own set would otherwise sit on both sides of a split unnoticed.
    """
    ds: Dataset = load_dataset(root, classes, size, cache_dir=cache_dir, collect=True)
    missing: set[str] = set()
    orphans: set[str] = set()
    unreadable: list[tuple[str, str]] = []
    other: list[str] = []
    per_class: Counter[str] = Counter()
    per_source: dict[str, dict[str, int]] = {}
    for src in ds.sources:
        layout = src.layout
        no_mask = {_name(p, src) for p in layout.missing_masks}
        no_image = {_name(p, src) for p in layout.orphan_masks}
        missing |= no_mask
        orphans |= no_image
        unreadable += [(_name(p.file, src), p.problem) for p in src.problems
                       if _name(p.file, src) not in no_mask | no_image]
        other += [_name(p, src) for p in layout.other_files]
        counts = Counter(c.label for c in layout.cases)
        counts.update(p.parent.name for p in layout.missing_masks)
        per_class.update(counts)
        if src.tag:
            per_source[str(src.path)] = {c: counts.get(c, 0) for c in ds.classes}
    exact_ids = np.unique(np.array(ds.pixel_hashes), return_inverse=True)[1] if len(ds) else []
    near_ids = duplicate_groups(ds, near_distance) if len(ds) else np.zeros(0, int)
    exact = _groups(ds.files, exact_ids)
    exact_sets = {tuple(g) for g in exact}
    near = [g for g in _groups(ds.files, near_ids) if tuple(g) not in exact_sets]
    lesion = {c for c in ds.classes if c != "normal"}
    has_lesion = ds.masks.reshape(len(ds), -1).any(1) if len(ds) else np.zeros(0, bool)
    shapes = ds.shapes if len(ds) else np.zeros((1, 2), int)
    return CheckReport(
        root=ds.root, classes=ds.classes,
        images_per_class={c: per_class.get(c, 0) for c in ds.classes},
        masks_per_image=dict(sorted(Counter(ds.n_masks.tolist()).items())),
        images_without_mask=sorted(missing), masks_without_image=sorted(orphans),
        unreadable=sorted(unreadable), other_files=sorted(other),
        size_min=(int(shapes[:, 0].min()), int(shapes[:, 1].min())),
        size_max=(int(shapes[:, 0].max()), int(shapes[:, 1].max())),
        exact_groups=exact, near_groups=near, near_distance=near_distance,
        empty_lesion_masks=[f for f, lab, m in zip(ds.files, ds.labels, has_lesion, strict=True)
                            if ds.classes[lab] in lesion and not m],
        nonempty_normal_masks=[f for f, lab, m in zip(ds.files, ds.labels, has_lesion,
                                                      strict=True)
                               if ds.classes[lab] == "normal" and m],
        label_of={f: ds.classes[lab] for f, lab in zip(ds.files, ds.labels, strict=True)},
        per_source=per_source, patients=dict(Counter(p for p in ds.patients if p)),
    )


def _listing(title: str, items: list[str], limit: int) -> list[str]:
    if not items:
        return [f"{title}: none"]
    lines = [f"{title}: {len(items)}"]
    lines += [f"  - {x}" for x in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more (--all lists every one)")
    return lines


def format_report(r: CheckReport, limit: int = 20) -> str:
    """Plain-text summary, the same facts as :func:`format_markdown`."""
    total = sum(r.images_per_class.values())
    lines = [f"Data folder: {r.root}"] if not r.per_source else [
        f"Data sources: {len(r.per_source)}, their images named <source>/..."]
    lines += [f"  - {path}: " + ", ".join(f"{c} {n}" for c, n in counts.items())
              + f" (total {sum(counts.values())})" for path, counts in r.per_source.items()]
    lines += ["Images per class: " + ", ".join(f"{c} {n}" for c, n in r.images_per_class.items())
              + f" (total {total})",
             "Masks per image: " + ", ".join(f"{k} mask{'s' if k != 1 else ''}: {v}"
                                             for k, v in r.masks_per_image.items()),
              f"Image size (height x width): {r.size_min[0]}x{r.size_min[1]} .. "
              f"{r.size_max[0]}x{r.size_max[1]}"]
    if r.patients:
        lines.append(f"Patients (CSV column 'patient'): {len(r.patients)}, with "
                     f"{sum(r.patients.values())} images, each patient kept on one side of "
                     "every split")
    lines += _listing("Images without a mask", r.images_without_mask, limit)
    lines += _listing("Masks without an image", r.masks_without_image, limit)
    lines += _listing("Unreadable files", [f"{f}: {why}" for f, why in r.unreadable], limit)
    if r.other_files:
        lines += _listing("Ignored non-image files", r.other_files, limit)
    lines += _listing("Lesion-class images with an empty mask", r.empty_lesion_masks, limit)
    lines += _listing("Normal images with a non-empty mask", r.nonempty_normal_masks, limit)
    n_exact = sum(len(g) for g in r.exact_groups)
    n_near = sum(len(g) for g in r.near_groups)
    lines.append(f"Exact duplicate groups (same pixels): {len(r.exact_groups)} "
                 f"({n_exact} images)")
    lines += [f"  - {' = '.join(g)}" for g in r.exact_groups[:limit]]
    lines.append(f"Near-duplicate groups (pHash distance <= {r.near_distance} of 64 bits): "
                 f"{len(r.near_groups)} ({n_near} images)")
    lines += [f"  - {' ~ '.join(g)}" for g in r.near_groups[:limit]]
    if len(r.near_groups) > limit:
        lines.append(f"  ... and {len(r.near_groups) - limit} more (--all lists every one)")
    cross = r.cross_class_groups
    lines.append(f"Duplicate groups that span classes (conflicting labels): {len(cross)}")
    lines += [f"  - {' ~ '.join(g)}" for g in cross]
    lines.append(f"Problems that make files unusable: {r.n_problems}")
    return "\n".join(lines)


def format_markdown(r: CheckReport) -> str:
    """The same facts as a Markdown section, for docs/DATA.md."""
    total = sum(r.images_per_class.values())
    out = ["| class | images |", "|---|---:|"]
    out += [f"| {c} | {n} |" for c, n in r.images_per_class.items()]
    out += [f"| **total** | **{total}** |", ""]
    out.append("| masks per image | images |")
    out.append("|---:|---:|")
    out += [f"| {k} | {v} |" for k, v in r.masks_per_image.items()]
    out += ["",
            f"- Image size (height x width): {r.size_min[0]}x{r.size_min[1]} to "
            f"{r.size_max[0]}x{r.size_max[1]}",
            f"- Images without a mask: {len(r.images_without_mask)}",
            f"- Masks without an image: {len(r.masks_without_image)}",
            f"- Unreadable files: {len(r.unreadable)}",
            f"- Lesion-class images with an empty mask: {len(r.empty_lesion_masks)}",
            f"- Normal images with a non-empty mask: {len(r.nonempty_normal_masks)}",
            f"- Exact duplicate groups: {len(r.exact_groups)} "
            f"({sum(len(g) for g in r.exact_groups)} images)",
            f"- Near-duplicate groups (pHash <= {r.near_distance}/64 bits): "
            f"{len(r.near_groups)} ({sum(len(g) for g in r.near_groups)} images)",
            f"- Groups spanning two classes: {len(r.cross_class_groups)}", ""]
    if r.cross_class_groups:
        out += ["Groups that span classes:", ""]
        out += [f"- {' ~ '.join(g)}" for g in r.cross_class_groups]
        out.append("")
    return "\n".join(out)
