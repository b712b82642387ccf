"""The BUSI data layer: find the cases, decode them, cache the arrays.

BUSI's layout is ``<class>/<name>.png`` with ``<name>_mask.png`` beside it and,
for a few images with several lesions, ``<name>_mask_1.png`` ...; the masks of
one image are merged by OR. Names contain spaces and parentheses.

Decoding 780 PNGs takes seconds, so the decoded 128x128 arrays are cached on
disk under a key made from every file's bytes and the target size: editing,
adding or removing a file changes the key, and nothing stale is ever read.

``data.root`` may also list several sources (BUSI-layout folders and CSV
manifests), so that a user's own labelled scans train beside BUSI: each source
is scanned and cached on its own, and the arrays are concatenated into one
:class:`Dataset` whose ids carry the source's name.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from busi.errors import BusiError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)
CACHE_VERSION = "1"  # bump when decoding changes, so old caches are not reused
SKIP_FIX = "replace or remove the file, or set data.on_bad_file: skip to leave it out"


@dataclass(frozen=True)
class Case:
    """One image of the data set, its mask files (none: no lesion) and its label."""

    image: Path
    masks: tuple[Path, ...]
    label: str
    id: str = ""  # set for CSV manifests: the image path as the CSV writes it
    patient: str = ""  # CSV manifests' optional `patient` column; "" = not known

    @property
    def name(self) -> str:
        """The id in manifests: ``benign/benign (1).png`` for the BUSI layout."""
        return self.id or f"{self.label}/{self.image.name}"


@dataclass
class Problem:
    """A defect in the data: which file, what is wrong, how to fix it."""

    file: str
    problem: str
    fix: str = SKIP_FIX

    def as_error(self) -> BusiError:
        return BusiError(self.problem, where=self.file, fix=self.fix)


@dataclass
class Layout:
    """What a scan of the data folder found, before any pixel is decoded."""

    root: Path
    classes: tuple[str, ...]
    cases: list[Case]
    orphan_masks: list[Path] = field(default_factory=list)
    missing_masks: list[Path] = field(default_factory=list)
    other_files: list[Path] = field(default_factory=list)
    # Images whose name, less the extension, another image of the same class folder has
    # (x.png and x.jpg): their masks (x_mask.png) cannot say which image they belong to.
    name_clashes: list[tuple[Path, Path]] = field(default_factory=list)


CSV_COLUMNS = ("image", "mask", "label")
PATIENT_COLUMN = "patient"


def scan_csv(path: Path, classes: tuple[str, ...]) -> Layout:
    """List the cases of a CSV manifest: columns ``image,mask,label``, paths relative to it.

    For data that is not in the BUSI layout (another hospital's export, say). An
    empty ``mask`` cell means "no lesion" (an all-zero mask, as BUSI's normal
    images have); several masks of one image go in one cell separated by ``;``.
    A class of ``classes`` with no row is fine (external sets often have no
    normal images); a label outside ``classes`` is an error. An optional
    ``patient`` column says whose scan each image is: the split keeps all of a
    patient's images on one side, as it does near-duplicates (an empty cell:
    not known, the image is grouped by its duplicates only).
    """
    import csv

    def fail(problem: str, fix: str, line: int | None = None) -> BusiError:
        return BusiError(problem, where=f"{path}" + (f", line {line}" if line else ""), fix=fix)

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise fail(f"cannot read the CSV manifest ({exc})",
                   "pass a UTF-8 CSV file with columns image,mask,label") from None
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        raise fail(f"the CSV manifest lacks column(s) {', '.join(missing)} "
                   f"(found: {', '.join(columns) or 'none'})",
                   "give it a header line 'image,mask,label'")
    if not rows:
        raise fail("the CSV manifest has no rows", "list one image per line under the header")
    base = path.parent
    layout = Layout(root=base, classes=classes, cases=[])
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        label, image = row["label"], row["image"]
        if label not in classes:
            raise fail(f"label {label!r} is not one of the model's classes "
                       f"({', '.join(classes)})", "relabel the row, or leave the image out", line)
        if not image:
            raise fail("empty image path", "write the image's path, relative to the CSV", line)
        if image in seen:
            raise fail(f"image {image!r} is listed twice", "keep one row per image", line)
        seen.add(image)
        paths = [base / image] + [base / m for m in row["mask"].split(";") if m.strip()]
        for p in paths:
            if not p.is_file():
                raise fail(f"file not found: {p}", "fix the path (relative to the CSV's folder)",
                           line)
        layout.cases.append(Case(image=paths[0], masks=tuple(paths[1:]), label=label, id=image,
                                 patient=row.get(PATIENT_COLUMN, "")))
    return layout


def scan(root: str | Path, classes: Iterable[str], *, partial: bool = False) -> Layout:
    """List the cases under ``root`` (BUSI layout, or a CSV manifest); no decoding.

    Raises for problems that make the folder unusable as a whole (missing root,
    missing or empty class folder); per-file problems are returned in the layout
    so that ``busi data check`` can list them all at once. ``partial`` (one of
    several sources): a folder may lack some class folders, as a CSV may lack
    some labels, but a sub-folder that is not a class is an error, as an unknown
    CSV label is: its images would otherwise be left out without a word.
    """
    root = Path(root)
    classes = tuple(classes)
    if root.suffix.lower() == ".csv" and root.is_file():
        return scan_csv(root, classes)
    if not root.is_dir():
        raise BusiError("data folder not found", where=str(root),
                        fix="pass --data PATH to a folder with benign/ malignant/ normal/ "
                            "or to a CSV manifest (image,mask,label), or run "
                            "`busi data synth --out DIR`")
    layout = Layout(root=root, classes=classes, cases=[])
    if partial:
        present = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        unknown = [f for f in present if f not in classes]
        if unknown:
            raise BusiError(f"folder(s) {', '.join(unknown)} are not among data.classes "
                            f"({', '.join(classes)})", where=str(root),
                            fix="rename or remove those folders, or add the classes to "
                                "data.classes")
        if not present:
            raise BusiError(f"no class folder ({', '.join(classes)}) found", where=str(root),
                            fix="pass a folder with class sub-folders, or a CSV manifest")
        classes = tuple(c for c in classes if c in present)
    for label in classes:
        folder = root / label
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise BusiError(f"class folder '{label}/' is missing (found: {present or 'none'})",
                            where=str(root), fix=f"create {folder} or set data.classes "
                                                 "to the folders that exist")
        images: dict[str, Path] = {}
        clashed: set[str] = set()
        masks: dict[str, list[tuple[int, Path]]] = {}
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                layout.other_files.append(path)
                continue
            m = MASK_RE.match(path.stem)
            if m:
                masks.setdefault(m["stem"], []).append((int(m["k"] or 0), path))
            elif path.stem in images or path.stem in clashed:
                other = images.pop(path.stem, None)
                if other is not None:
                    layout.name_clashes.append((other, path))
                layout.name_clashes.append((path, other or layout.name_clashes[-1][0]))
                clashed.add(path.stem)
            else:
                images[path.stem] = path
        if not images and not clashed:
            raise BusiError(f"class folder '{label}/' has no images", where=str(folder),
                            fix="put the images of this class there, or remove the class "
                                "from data.classes")
        for stem, image in images.items():
            found = [p for _, p in sorted(masks.get(stem, []))]
            if not found:
                layout.missing_masks.append(image)
                continue
            layout.cases.append(Case(image=image, masks=tuple(found), label=label))
        layout.orphan_masks += [p for stem, ms in masks.items()
                                if stem not in images and stem not in clashed for _, p in ms]
    return layout


# --------------------------------------------------------------------------- decoding


def to_gray(array: np.ndarray) -> np.ndarray:
    """Any PNG flavour (gray, RGB, RGBA, 16-bit) -> 8-bit gray, so the models see one format."""
    if array.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(array.shape[2])
        array = array[..., 0] if code is None else cv2.cvtColor(array, code)
    if array.dtype == np.uint16:
        array = (array.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
    return array


def binarise(mask: np.ndarray) -> np.ndarray:
    """0/1 mask from 0/1, 0/255 or 16-bit masks: on at half the mask's own maximum."""
    peak = float(mask.max())
    return (mask >= peak / 2).astype(np.uint8) if peak > 0 else np.zeros(mask.shape, np.uint8)


def resize_image(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area interpolation when shrinking (no aliasing of speckle), bilinear when enlarging."""
    h, w = size
    shrink = gray.shape[0] >= h and gray.shape[1] >= w
    return cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour, so a mask stays binary and is never blurred."""
    h, w = size
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def phash(gray: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (pHash), packed into 8 bytes.

    Near-duplicate ultrasound frames (the same lesion saved twice, with a caliper
    drawn or a slightly different crop) differ by a few bits; unrelated images by
    ~32. OpenCV's img_hash module is only in the contrib wheel, so the standard
    recipe is spelled out here: 32x32 area resize, 2-D DCT, the 8x8 lowest
    frequencies compared with their median.
    """
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    return np.packbits(low > np.median(low))


def decode(data: bytes) -> np.ndarray | None:
    """Decoded pixels, or None for anything that is not a readable image.

    OpenCV returns None for most bad files but raises for some (an empty buffer,
    some truncated headers); every caller treats both the same way: a bad file.
    """
    if not data:
        return None
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    return array if array is not None and array.size else None


@dataclass
class Decoded:
    """One case after decoding, or the problem that stopped it."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    shape: tuple[int, int] = (0, 0)
    phash: np.ndarray | None = None
    pixel_hash: str = ""
    problem: Problem | None = None


def decode_case(case: Case, blobs: dict[Path, bytes], size: tuple[int, int]) -> Decoded:
    """Decode, validate, merge and resize one case. Never raises for bad files."""
    raw = decode(blobs[case.image])
    if raw is None:
        return Decoded(problem=Problem(str(case.image), "cannot decode image (corrupt file, "
                                                        "or not an image)"))
    gray = to_gray(raw)
    merged = np.zeros(gray.shape, np.uint8)
    for mpath in case.masks:
        m = decode(blobs[mpath])
        if m is None:
            return Decoded(problem=Problem(str(mpath), "cannot decode mask (corrupt file, "
                                                       "or not an image)"))
        m = to_gray(m)
        if m.shape != gray.shape:
            return Decoded(problem=Problem(
                str(mpath), f"mask is {m.shape[1]}x{m.shape[0]} but its image is "
                            f"{gray.shape[1]}x{gray.shape[0]} (width x height)",
                fix="a mask must be drawn on its own image at the same size; replace it, "
                    "or set data.on_bad_file: skip"))
        merged |= binarise(m)
    return Decoded(image=resize_image(gray, size), mask=resize_mask(merged, size),
                   shape=gray.shape[:2], phash=phash(gray),
                   pixel_hash=hashlib.sha1(gray.tobytes()).hexdigest())


# --------------------------------------------------------------------------- data set


@dataclass
class Source:
    """One data source of a :class:`Dataset`: its images are ``files[start:stop]``."""

    tag: str                       # prefix of its ids ("" when it is the only source)
    path: Path                     # the BUSI-layout folder or the CSV manifest
    layout: Layout
    fingerprint: str
    start: int
    stop: int
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Dataset:
    """Decoded arrays of one or more data sources, in manifest order."""

    root: Path                     # the (first) source's folder or CSV
    classes: tuple[str, ...]
    files: list[str]               # "benign/benign (1).png", the ids in every manifest;
                                   # with several sources "<tag>/benign/benign (1).png"
    images: np.ndarray             # uint8 (N, H, W)
    masks: np.ndarray              # uint8 (N, H, W), 0/1, OR of all masks of the image
    labels: np.ndarray             # int (N,), index into classes
    shapes: np.ndarray             # int (N, 2), original height, width
    n_masks: np.ndarray            # int (N,), mask files merged per image
    phashes: np.ndarray            # uint8 (N, 8), packed 64-bit pHash of the original
    pixel_hashes: list[str]        # sha1 of the decoded gray original (exact duplicates)
    fingerprint: str               # hash of every file's bytes: identifies the data set
    problems: list[Problem] = field(default_factory=list)
    layout: Layout | None = None   # the scan of a single source (None for several)
    # Patient id per image ("" = not known), from a CSV's `patient` column; namespaced by
    # source tag with several sources, so two sites' patient "A" are two patients.
    patients: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def location(self) -> str:
        """The source path(s), for messages: ``A + B`` when there are several."""
        return " + ".join(str(s.path) for s in self.sources) or str(self.root)

    def index(self, files: Iterable[str]) -> np.ndarray:
        where = {f: i for i, f in enumerate(self.files)}
        missing = [f for f in files if f not in where]
        if missing:
            raise BusiError(f"{len(missing)} file(s) of the split manifest are not in the data, "
                            f"e.g. {missing[0]!r}", where=self.location,
                            fix="use the data set the manifest was made for, or delete the "
                                "manifest so a new one is written")
        return np.array([where[f] for f in files], dtype=np.int64)


def _read_all(paths: list[Path], workers: int) -> dict[Path, bytes]:
    def read(p: Path) -> bytes:
        try:
            return p.read_bytes()
        except OSError as exc:
            raise BusiError(f"cannot read file: {exc.strerror}", where=str(p),
                            fix="check the file's permissions") from None

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(read, paths), strict=True))


def _fingerprint(layout: Layout, blobs: dict[Path, bytes]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for case in layout.cases:
        for p in (case.image, *case.masks):
            h.update(f"{case.label}/{p.name}\0".encode())
            h.update(hashlib.blake2b(blobs[p], digest_size=16).digest())
    return h.hexdigest()


def source_tag(path: str | Path) -> str:
    """The short name that prefixes a source's ids: its folder's name, or its CSV's stem."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return path.stem
    return path.name or path.resolve().name


def load_dataset(root: str | Path | list[str] | list[Path],
                 classes: Iterable[str] = ("benign", "malignant", "normal"),
                 size: tuple[int, int] | list[int] = (128, 128), *,
                 cache_dir: str | Path | None = "data/cache", on_bad_file: str = "error",
                 workers: int = 0, collect: bool = False) -> Dataset:
    """Decode one data source, or several, into arrays, through the on-disk cache.

    ``root`` is a BUSI-layout folder or a CSV manifest, or a list of them. One
    source (or a list of one) gives exactly the ids and fingerprint it always
    had, so existing split manifests and runs still match. Several sources give
    one data set: each is scanned and cached on its own, its ids get its
    :func:`source_tag` as a prefix (two sources with one tag are refused: their
    ids could collide) and the fingerprint is a hash of the sources'
    fingerprints. A source may lack some of ``classes``, never add one.

    ``on_bad_file='error'`` stops at the first bad file with a message naming it;
    ``'skip'`` leaves bad cases out and reports them on stderr. ``collect=True``
    (used by ``busi data check``) never stops and keeps every problem in
    ``Dataset.problems``.
    """
    roots = list(root) if isinstance(root, (list, tuple)) else [root]
    if not roots:
        raise BusiError("no data source given", where="data.root",
                        fix="pass --data PATH (a BUSI-layout folder or a CSV manifest)")
    kwargs = {"cache_dir": cache_dir, "on_bad_file": on_bad_file, "workers": workers,
              "collect": collect}
    if len(roots) == 1:
        return _load_source(roots[0], classes, size, **kwargs)
    tags: dict[str, Path] = {}
    for r in map(Path, roots):
        tag = source_tag(r)
        if tag in tags:
            raise BusiError(f"data sources {tags[tag]} and {r} would both be called {tag!r} "
                            "in the image ids" + (" (the same source twice)"
                                                  if tags[tag] == r else ""),
                            where="data.root",
                            fix="list each source once, and give folders / CSV files that "
                                "hold different images different names")
        tags[tag] = r
    parts = [_load_source(r, classes, size, partial=True, **kwargs) for r in tags.values()]
    return _concatenate(parts, list(tags))


def _concatenate(parts: list[Dataset], tags: list[str]) -> Dataset:
    """One data set of several sources; ids and patient ids get ``<tag>/`` in front."""
    h = hashlib.blake2b(digest_size=12)
    sources, start = [], 0
    for tag, part in zip(tags, parts, strict=True):
        h.update(f"{tag}\0{part.fingerprint}\0".encode())
        src = part.sources[0]
        sources.append(Source(tag, src.path, src.layout, src.fingerprint, start,
                              start + len(part), src.problems))
        start += len(part)
    return Dataset(
        root=parts[0].root, classes=parts[0].classes,
        files=[f"{tag}/{f}" for tag, part in zip(tags, parts, strict=True) for f in part.files],
        images=np.concatenate([p.images for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        shapes=np.concatenate([p.shapes.reshape(-1, 2) for p in parts]),
        n_masks=np.concatenate([p.n_masks for p in parts]),
        phashes=np.concatenate([p.phashes.reshape(-1, 8) for p in parts]),
        pixel_hashes=[x for p in parts for x in p.pixel_hashes],
        fingerprint=h.hexdigest(), problems=[x for p in parts for x in p.problems],
        patients=[f"{tag}/{x}" if x else "" for tag, part in zip(tags, parts, strict=True)
                  for x in part.patients],
        sources=sources)


def _load_source(root: str | Path, classes: Iterable[str], size: tuple[int, int] | list[int],
                 *, cache_dir: str | Path | None, on_bad_file: str, workers: int,
                 collect: bool, partial: bool = False) -> Dataset:
    """One source (a BUSI-layout folder or a CSV manifest) -> its :class:`Dataset`."""
    size = (int(size[0]), int(size[1]))
    workers = workers or min(8, os.cpu_count() or 1)
    layout = scan(root, classes, partial=partial)
    problems = [Problem(str(p), "image has no mask file (<name>_mask.png)",
                        fix="add its mask, remove the image, or set data.on_bad_file: skip")
                for p in layout.missing_masks]
    problems += [Problem(str(p), "mask has no image (<name>.png) beside it",
                         fix="add the image or remove the stray mask") for p in layout.orphan_masks]
    problems += [Problem(str(p), f"another image has the same name before the extension "
                                 f"({other.name}), so its mask cannot be told apart; neither "
                                 "image is used",
                         fix="rename one of the two images (and its mask files)")
                 for p, other in layout.name_clashes]
    if problems and on_bad_file == "error" and not collect:
        raise problems[0].as_error()

    paths = [p for c in layout.cases for p in (c.image, *c.masks)]
    blobs = _read_all(paths, workers)
    fingerprint = _fingerprint(layout, blobs)
    key = f"{fingerprint}-{size[0]}x{size[1]}-v{CACHE_VERSION}"
    cache_file = Path(cache_dir) / f"{key}.npz" if cache_dir else None

    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            arrays = None  # a damaged cache is rebuilt, never trusted
    else:
        arrays = None

    if arrays is None:
        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(lambda c: decode_case(c, blobs, size), layout.cases))
        keep = [i for i, d in enumerate(decoded) if d.problem is None]
        bad = [d.problem for d in decoded if d.problem is not None]
        arrays = _stack(layout, decoded, keep, size)
        arrays["bad_files"] = np.array([p.file for p in bad], dtype=str)
        arrays["bad_reasons"] = np.array([p.problem for p in bad], dtype=str)
        if cache_file is not None:
            _atomic_savez(cache_file, arrays)
    bad = [Problem(f, r) for f, r in zip(arrays["bad_files"].tolist(),
                                         arrays["bad_reasons"].tolist(), strict=True)]
    problems += bad
    if bad and on_bad_file == "error" and not collect:
        # Re-decode the one bad case to give its full message (mask size, etc.).
        case = next(c for c in layout.cases if str(c.image) == bad[0].file
                    or str(bad[0].file) in map(str, c.masks))
        raise (decode_case(case, blobs, size).problem or bad[0]).as_error()
    if problems and on_bad_file == "skip" and not collect:
        for p in problems:
            print(f"busi: warning: skipped {p.file}: {p.problem}", file=sys.stderr)
    keep_idx = arrays["keep"]
    kept_cases = [layout.cases[i] for i in keep_idx]
    if not kept_cases and not collect:
        raise BusiError("no usable image in the data folder", where=str(root),
                        fix="check the folder with `busi data check --data PATH`")
    return Dataset(
        root=Path(root), classes=tuple(layout.classes), files=[c.name for c in kept_cases],
        images=arrays["images"], masks=arrays["masks"],
        labels=np.array([layout.classes.index(c.label) for c in kept_cases], dtype=np.int64),
        shapes=arrays["shapes"], n_masks=np.array([len(c.masks) for c in kept_cases], np.int64),
        phashes=arrays["phashes"], pixel_hashes=arrays["pixel_hashes"].tolist(),
        fingerprint=fingerprint, problems=problems, layout=layout,
        patients=[c.patient for c in kept_cases],
        sources=[Source("", Path(root), layout, fingerprint, 0, len(kept_cases), problems)])


def _stack(layout: Layout, decoded: list[Decoded], keep: list[int],
           size: tuple[int, int]) -> dict[str, np.ndarray]:
    h, w = size
    n = len(keep)
    return {
        "keep": np.array(keep, dtype=np.int64),
        "images": (np.stack([decoded[i].image for i in keep]) if n
                   else np.zeros((0, h, w), np.uint8)),
        "masks": (np.stack([decoded[i].mask for i in keep]) if n
                  else np.zeros((0, h, w), np.uint8)),
        "shapes": np.array([decoded[i].shape for i in keep], dtype=np.int64).reshape(n, 2),
        "phashes": np.stack([decoded[i].phash for i in keep]) if n else np.zeros((0, 8), np.uint8),
        "pixel_hashes": np.array([decoded[i].pixel_hash for i in keep], dtype=str),
    }


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary name then rename, so a killed run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def dataset_from_config(cfg) -> Dataset:  # cfg: busi.config.Config (kept untyped: no cycle)
    d = cfg.data
    return load_dataset(d.root, d.classes, tuple(d.image_size), cache_dir=d.cache_dir,
                        on_bad_file=d.on_bad_file, workers=d.workers)


def image_paths(ds: Dataset) -> list[Path]:
    """The image file of each of ``ds.files``, from its source's scan.

    The cached arrays hold the images at the models' size only; a classifier that reads
    the lesion at the scan's own resolution (``mask_mode: lesion_crop``) goes back to the
    files.
    """
    paths: list[Path] = []
    for s in ds.sources:
        by_name = {c.name: c.image for c in s.layout.cases}
        cut = len(s.tag) + 1 if s.tag else 0
        paths += [by_name[f[cut:]] for f in ds.files[s.start:s.stop]]
    return paths


def original_images(ds: Dataset, idx: Iterable[int] | None = None,
                    workers: int = 0) -> list[np.ndarray]:
    """The 8-bit gray originals of ``ds`` (or of its images ``idx``), at their own size.

    A file that no longer decodes, or no longer matches the data set's fingerprint (its
    pixels changed since the cache was made), is a BusiError naming it: the crop would
    otherwise come from another image than the one the U-Net segmented.
    """
    paths = image_paths(ds)
    chosen = list(range(len(ds))) if idx is None else [int(i) for i in idx]

    def read(i: int) -> np.ndarray:
        try:
            raw = decode(paths[i].read_bytes())
        except OSError:
            raw = None
        gray = None if raw is None else to_gray(raw)
        if gray is None or hashlib.sha1(gray.tobytes()).hexdigest() != ds.pixel_hashes[i]:
            raise BusiError("the image cannot be read again, or changed since the data set was "
                            "loaded", where=str(paths[i]),
                            fix="restore the file, or run again so the data set is re-read")
        return gray

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(read, chosen))
