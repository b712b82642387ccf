"""``busi predict``: lesion mask and class probabilities for new images.

Uses exactly the preprocessing of training (gray, area resize, the classifier
run's mask mode), so a prediction here equals what ``evaluate`` measured. A bad
image is reported and skipped; the others still get results.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import cv2
import numpy as np

from busi.data.loading import IMAGE_EXTENSIONS, MASK_RE, decode, resize_image, to_gray
from busi.errors import BusiError
from busi.runs import (
    atomic_write,
    new_run_dir,
    paired_seg_run,
    read_config,
    resolve_cls_run,
    write_json,
)


def _images(inputs: list[str]) -> list[Path]:
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS
                            and not MASK_RE.match(q.stem))
        elif p.is_file():
            found.append(p)
        else:
            print(f"busi: warning: {p}: not found, skipped", file=sys.stderr)
    if not found:
        raise BusiError("no image to predict", where=" ".join(inputs),
                        fix="pass image files or folders that contain images")
    return found


def _output_stems(images: list[Path]) -> list[str]:
    """A distinct output name stem per input image (``<stem>_mask.png``, ...).

    Two inputs of the same name (a/x.png, b/x.png; X.png and x.png on a
    case-insensitive disk) would overwrite each other's outputs: the later ones
    get ``x-2``, ``x-3``, ..., and a warning says so.
    """
    stems: list[str] = []
    taken: dict[str, Path] = {}
    for path in images:
        base = stem = path.stem.replace(" ", "_")
        k = 1
        while stem.casefold() in taken:
            k += 1
            stem = f"{base}-{k}"
        if k > 1:
            print(f"busi: warning: {path} has the same name as {taken[base.casefold()]}; its "
                  f"outputs are named {stem}_*", file=sys.stderr)
        taken[stem.casefold()] = path
        stems.append(stem)
    return stems


class Predictor:
    """A U-Net run and a classifier run, loaded once; one image in, mask and probabilities out.

    The same steps as training and ``evaluate``: gray, area resize, the U-Net's
    stored mask rule (threshold, clean-up, flip TTA), the classifier's mask mode.
    """

    def __init__(self, seg_run: str | None = None, cls_run: str | None = None,
                 outputs_root: str = "outputs"):
        from busi.models.masks import load_unets, read_rule
        from busi.models.saving import load_model

        self.cls = resolve_cls_run(cls_run, outputs_root)
        self.seg, why = paired_seg_run(self.cls, seg_run, outputs_root, "busi predict")
        print(f"busi predict: classifier run {self.cls}"
              f"{'' if cls_run else ' (the latest finished)'}\n"
              f"  U-Net run {self.seg} ({why})")
        cfg = read_config(self.cls)
        self.c = cfg.model.classifier
        self.size = tuple(cfg.data.image_size)
        self.classes = list(cfg.data.classes)
        self.rule, self.flip_tta = read_rule(self.seg)
        self.unets = load_unets(self.seg)  # one U-Net, or a run's fold ensemble
        self.clf = load_model(self.cls / "best.keras")
        if tuple(self.unets[0].input_shape[1:3]) != self.size:
            raise BusiError(f"U-Net input {self.unets[0].input_shape[1:3]} differs from the "
                            f"classifier's {self.size}", where=str(self.seg),
                            fix="use runs trained at the same image size")

    def __call__(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask at model size, classifier input (1, H, W, C), class probabilities) for a
        gray image. With ``mask_mode: channel`` the input is the scan and this mask, which is
        empty (the scan still there) where the U-Net found no lesion."""
        from busi.models.inputs import classifier_inputs
        from busi.models.masks import as_stored, predict_probs

        small = resize_image(gray, self.size)
        prob = as_stored(predict_probs(self.unets, small[None], flip_tta=self.flip_tta))
        mask = self.rule.apply(prob)[0]
        use_mask = None if self.c.masks == "none" else mask[None]
        x = classifier_inputs(small[None], use_mask, self.c)
        p = np.asarray(self.clf.predict_on_batch(x.astype("float32")))[0]
        return mask, x, p


def predict_command(inputs: list[str], seg_run: str | None = None, cls_run: str | None = None,
                    out: str | None = None, outputs_root: str = "outputs",
                    explain: bool = False) -> Path:
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise BusiError("--out exists and is not an empty folder", where=out,
                        fix="choose a new or empty --out folder; busi predict never overwrites")
    images = _images(inputs)
    stems = _output_stems(images)
    predictor = Predictor(seg_run, cls_run, outputs_root)
    seg, cls, rule, flip_tta = predictor.seg, predictor.cls, predictor.rule, predictor.flip_tta
    out_dir = Path(out) if out else new_run_dir(Path(outputs_root) / "predict")
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = predictor.classes
    if explain:
        from busi.reporting.gradcam import gradcam, save_panels, split_model

        parts = split_model(predictor.clf)
    rows, skipped = [], []
    for path, stem in zip(images, stems, strict=True):
        try:
            raw = decode(path.read_bytes())
        except OSError as exc:
            raw, why = None, exc.strerror
        else:
            why = "cannot decode image (corrupt file, or not an image)"
        if raw is None:
            print(f"busi: warning: {path}: {why}; skipped", file=sys.stderr)
            skipped.append({"file": str(path), "problem": why})
            continue
        gray = to_gray(raw)
        mask, x, p = predictor(gray)
        full = cv2.resize(mask, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_NEAREST)
        ok, buf = cv2.imencode(".png", full * 255)
        atomic_write(out_dir / f"{stem}_mask.png", buf.tobytes())
        view = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        contours, _ = cv2.findContours(full, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(view, contours, -1, (0, 0, 255), 2)
        ok, buf = cv2.imencode(".png", view)
        atomic_write(out_dir / f"{stem}_overlay.png", buf.tobytes())
        if explain:
            heat, _ = gradcam(predictor.clf, x, np.array([int(np.argmax(p))]), parts=parts)
            save_panels(out_dir, [f"{stem}.png"], resize_image(gray, predictor.size)[None], x, heat,
                        None,
                        [classes[int(np.argmax(p))]], np.array([float(p.max())]))
        rows.append({"file": str(path), "pred": classes[int(np.argmax(p))],
                     **{f"p_{k}": round(float(v), 6) for k, v in zip(classes, p, strict=True)},
                     "lesion_pixels": int(mask.sum()), "output_stem": stem})
    header = ["file", "pred", *[f"p_{k}" for k in classes], "lesion_pixels", "output_stem"]
    buf_csv = io.StringIO()
    writer = csv.DictWriter(buf_csv, header, lineterminator="\n")  # quotes commas, quotes, ...
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "predictions.csv", buf_csv.getvalue())
    write_json(out_dir / "predictions.json", {"seg_run": str(seg), "cls_run": str(cls),
                                              "threshold": rule.threshold,
                                              "postprocess": rule.postprocess,
                                              "flip_tta": flip_tta, "predictions": rows,
                                              "skipped": skipped})
    for r in rows:
        probs = ", ".join(f"{k} {r[f'p_{k}']:.3f}" for k in classes)
        print(f"{r['file']}: {r['pred']} ({probs})")
    print(f"{len(rows)} image(s) predicted, {len(skipped)} skipped; outputs: {out_dir}")
    return out_dir
