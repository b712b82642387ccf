"""``busi predict``: lesion mask and class probabilities for new images.

Uses exactly the preprocessing of training (gray, area resize, the classifier
run's mask mode), so a prediction here equals what ``evaluate`` measured.

Every input is read before any model is loaded or any output written. A batch keeps
going past an unreadable, corrupt or empty image (or one removed while it runs): each is
skipped with one line on stderr naming it and why, and listed in ``skipped.csv`` (and under
``skipped`` in predictions.json) of the output folder; the command then exits with
:data:`EXIT_SKIPPED` (3), not 0, so a script sees that the result set lacks scans -- while
the readable ones of a thousand-scan folder are still predicted. When no input can be read
(one unreadable file passed alone, or every file of a folder) nothing is written and the
exit code is 2, like any bad input; so is a path that does not exist at all (a typo).

Each prediction is flagged when it should not be taken at face value
(``no_lesion_found``: the U-Net's mask is empty; ``low_confidence``: the top class
probability is below ``predict.min_confidence``), names the runs that made it, and
states its units. busi is a research tool, not a diagnostic device.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from busi.data.loading import IMAGE_EXTENSIONS, MASK_RE, decode, resize_image, to_gray
from busi.errors import BusiError
from busi.models.decision import decide, malignancy
from busi.runs import (
    CV_DIR,
    atomic_write,
    latest_cv,
    new_run_dir,
    paired_seg_run,
    read_config,
    resolve_cls_run,
    unique_name,
    write_json,
)

DISCLAIMER = ("busi is a research tool, not a diagnostic device: its masks and classes are "
              "not validated for clinical use and must not guide diagnosis or treatment")
# The flags of a prediction, and what each means (printed, and kept in predictions.json).
FLAGS = {"no_lesion_found": "the segmenter found no lesion (empty mask)",
         "low_confidence": "top class probability below predict.min_confidence"}
# Exit code of ``busi predict`` when some inputs were skipped as unreadable and the rest were
# predicted: not 0 (a script must notice the missing scans), not 2 (nothing done, bad input).
EXIT_SKIPPED = 3


@dataclass
class Predicted:
    """What :func:`predict_command` did: its folder, and the inputs it skipped and why."""

    out_dir: Path
    n_predicted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def _images(inputs: list[str]) -> list[Path]:
    found: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS
                            and not MASK_RE.match(q.stem))
        elif p.is_file():
            found.append(p)
        else:
            missing.append(item)
    if missing:
        raise BusiError("not found", where=", ".join(missing),
                        fix="pass existing image files or folders")
    if not found:
        raise BusiError("no image to predict", where=" ".join(inputs),
                        fix="pass image files or folders that contain images")
    return found


def _read_gray(path: Path) -> tuple[np.ndarray | None, str]:
    """A file's pixels as gray, or None and why it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, exc.strerror or str(exc)
    if not data:
        return None, "empty file (0 bytes)"
    raw = decode(data)
    if raw is None:
        return None, "cannot decode image (corrupt file, or not an image)"
    return to_gray(raw), ""


def _warn_skipped(path: Path | str, why: str) -> None:
    print(f"busi: warning: skipped {path}: {why}", file=sys.stderr)


def _readable(images: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(the images that decode, [(file, why)] of those that do not), each of the latter
    named on stderr. None readable is one BusiError naming them: nothing to predict."""
    good: list[Path] = []
    bad: list[tuple[str, str]] = []
    for path in images:
        gray, why = _read_gray(path)
        if gray is None:
            bad.append((str(path), why))
        else:
            good.append(path)
    if not good:
        others = "".join(f"{p} ({w}); " for p, w in bad[1:6]) + ("...; " if len(bad) > 6 else "")
        raise BusiError(f"{bad[0][1]}; {others}nothing predicted ({len(bad)} of {len(images)} "
                        "image(s) cannot be read)", where=bad[0][0],
                        fix="replace or remove the file(s) named here and run again "
                            "(busi data check lists every unreadable image of a folder)")
    for path, why in bad:
        _warn_skipped(path, why)
    return good, bad


def flags_of(mask: np.ndarray, probs: np.ndarray, min_confidence: float) -> list[str]:
    """The flags of one prediction (keys of :data:`FLAGS`).

    An empty mask is flagged whatever the class: with masked inputs the classifier then
    saw a blank image, so its call says nothing about the scan; and on a scan with a
    lesion it is a miss. A top probability under ``min_confidence`` is a call to check.
    """
    flags = []
    if not mask.any():
        flags.append("no_lesion_found")
    if float(np.max(probs)) < min_confidence:
        flags.append("low_confidence")
    return flags


def _output_stems(images: list[Path]) -> list[str]:
    """A distinct output name stem per input image (``<stem>_mask.png``, ...).

    Two inputs of the same name (a/x.png, b/x.png; X.png and x.png on a
    case-insensitive disk) would overwrite each other's outputs: the later ones
    get ``x-2``, ``x-3``, ..., and a warning says so.
    """
    stems: list[str] = []
    taken: dict[str, Path] = {}
    for path in images:
        base = path.stem.replace(" ", "_")
        stem = unique_name(base, taken, fold_case=True)
        if stem != base:
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
                 outputs_root: str = "outputs", sensitivity: float | None = None,
                 cv: str | None = None, arm: str | None = None, presence: str | None = None):
        from busi.models.masks import load_unets, read_rule
        from busi.models.saving import load_model

        self.members: list[Predictor] = []
        if cv:
            self._fold_ensemble(cv, arm, outputs_root, sensitivity, presence)
            return

        self.cls = resolve_cls_run(cls_run, outputs_root)
        self.seg, why = paired_seg_run(self.cls, seg_run, outputs_root, "busi predict")
        print(f"busi predict: classifier run {self.cls}"
              f"{'' if cls_run else ' (the latest finished)'}\n"
              f"  U-Net run {self.seg} ({why})")
        cfg = read_config(self.cls)
        self.c = cfg.model.classifier
        self.size = tuple(cfg.data.image_size)
        self.classes = list(cfg.data.classes)
        self.min_confidence = cfg.predict.min_confidence  # the run's; --min-confidence wins
        self.rule, self.flip_tta = read_rule(self.seg)
        self.unets = load_unets(self.seg)  # one U-Net, or a run's fold ensemble
        from busi.models.presence import run_head

        self.head = run_head(self.seg)  # the lesion-presence head on its encoder, if any
        if self.head is not None:  # built once, not per image
            from busi.models.presence import bottleneck_model

            self.encoder = bottleneck_model(self.unets[0])
        self.last_unet_head: float | None = None
        self.clf = load_model(self.cls / "best.keras")
        from busi.evaluation.classification import operating_point

        # The thresholds chosen on the classifier's validation images (models/decision.py);
        # None for a run from before busi chose them: then only the argmax call is given.
        self.op = operating_point(self.cls, sensitivity, presence)
        if tuple(self.unets[0].input_shape[1:3]) != self.size:
            raise BusiError(f"U-Net input {self.unets[0].input_shape[1:3]} differs from the "
                            f"classifier's {self.size}", where=str(self.seg),
                            fix="use runs trained at the same image size")

    def _fold_ensemble(self, cv: str, arm: str | None, outputs_root: str,
                       sensitivity: float | None, presence: str | None = None) -> None:
        """A CV arm's fold models as one predictor: each fold's classifier on the masks of its
        own U-Net, their probabilities averaged; the mask shown is the fold U-Nets' average
        probability under their mean threshold; the operating point the mean of the folds'
        (each chosen on its own validation images)."""
        from busi.models.decision import mean_operating_point
        from busi.models.masks import MaskRule
        from busi.runs import cv_arms, cv_fold_classifier, cv_fold_unet, read_json

        cv_dir = Path(cv)
        if not (cv_dir / "cv.json").is_file():
            raise BusiError("not a CV run folder (no cv.json)", where=str(cv_dir),
                            fix="pass a folder under outputs/cv/ made by busi cv")
        meta = read_json(cv_dir / "cv.json")
        arms = list(cv_arms(meta))
        if arm is None and len(arms) == 1:
            arm = arms[0]
        if arm not in arms:
            raise BusiError(f"{'no --arm named' if arm is None else f'no arm {arm!r} in'} this "
                            f"CV (its arms: {', '.join(arms) or 'none'})", where=str(cv_dir),
                            fix="add --arm NAME, one of those")
        pairs = []  # every fold checked before any model is loaded
        for k in range(meta["folds"]):
            seg, done = cv_fold_unet(cv_dir, k, meta)
            run, finished, _ = cv_fold_classifier(cv_dir, k, arm, seg) if done else (None, 0, 0)
            if not finished:
                raise BusiError(f"fold {k} has no finished {arm} run", where=str(cv_dir),
                                fix=f"finish the CV first: busi cv --resume {cv_dir}")
            pairs.append((seg, run))
        self.members = [Predictor(str(seg), str(run), outputs_root, sensitivity,
                                  presence=presence) for seg, run in pairs]
        first = self.members[0]
        self.cls, self.seg = cv_dir, cv_dir
        self.arm = arm
        self.c, self.size, self.classes = first.c, first.size, first.classes
        self.min_confidence, self.clf, self.flip_tta = first.min_confidence, first.clf, None
        self.rule = MaskRule(float(np.mean([m.rule.threshold for m in self.members])),
                             first.rule.postprocess)
        ops = [m.op for m in self.members]
        self.op = None if any(o is None for o in ops) else mean_operating_point(ops)
        if any(m.size != self.size or m.classes != self.classes for m in self.members):
            raise BusiError("the CV's fold models differ in image size or classes",
                            where=str(cv_dir), fix="use a CV made by one busi cv command")

    def __call__(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask at model size, classifier input (1, H, W, C), class probabilities) for a
        gray image. With ``mask_mode: channel`` the input is the scan and this mask, which is
        empty (the scan still there) where the U-Net found no lesion."""
        from busi.models.inputs import classifier_inputs
        from busi.models.masks import as_stored, predict_probs

        if self.members:  # a fold ensemble: member 0's input is the one returned (Grad-CAM)
            calls = [m(gray) for m in self.members]
            mean = np.mean([m.last_prob for m in self.members], axis=0)
            self.last_unet_max = float(np.mean([m.last_unet_max for m in self.members]))
            heads = [m.last_unet_head for m in self.members]
            self.last_unet_head = None if None in heads else float(np.mean(heads))
            return (self.rule.apply(mean)[0], calls[0][1],
                    np.mean([p for _, _, p in calls], axis=0))
        small = resize_image(gray, self.size)
        prob = as_stored(predict_probs(self.unets, small[None], flip_tta=self.flip_tta))
        mask = self.rule.apply(prob)[0]
        self.last_prob, self.last_unet_max = prob, float(prob.max())
        if self.head is not None:
            from busi.models.presence import pooled_features

            self.last_unet_head = float(self.head.score(pooled_features(
                self.unets[0], small[None], encoder=self.encoder))[0])
        use_mask = None if self.c.masks == "none" else mask[None]
        x = classifier_inputs(small[None], use_mask, self.c, [gray])
        p = np.asarray(self.clf.predict_on_batch(x.astype("float32")))[0]
        return mask, x, p


LATEST_CV = "latest"  # what the CLI passes for ``--cv`` without a folder


def resolve_cv(cv: str, outputs_root: str) -> str:
    """``--cv``'s folder; without one (:data:`LATEST_CV`) the newest finished CV."""
    if cv != LATEST_CV:
        return cv
    found = latest_cv(outputs_root)
    if found is None:
        raise BusiError(f"no finished CV under {Path(outputs_root) / CV_DIR}", where="--cv",
                        fix="name one (--cv outputs/cv/<run>), or make one: busi cv --config "
                            "configs/cpu.yaml --folds 5")
    print(f"busi predict: CV {found} (the latest finished)")
    return str(found)


def default_cv(outputs_root: str) -> str | None:
    """Without ``--cls-run`` or ``--cv``: the newest finished one-arm CV when it started
    after the newest finished classifier run -- the recipe's fold models averaged, which
    beat each fold model alone at another hospital (docs/RESULTS.md) -- else None (that
    classifier run). Run names start with their start time."""
    cv = latest_cv(outputs_root, single_arm=True)
    if cv is None:
        return None
    try:
        cls = resolve_cls_run(None, outputs_root)
    except BusiError:  # no classifier run: the CV it is
        cls = None
    if cls is not None and cv.name[:15] < cls.name[:15]:
        return None
    print(f"busi predict: the fold ensemble of CV {cv} (the latest finished model; "
          "--cls-run for one classifier run)")
    return str(cv)


def predict_command(inputs: list[str], seg_run: str | None = None, cls_run: str | None = None,
                    out: str | None = None, outputs_root: str = "outputs",
                    explain: bool = False, min_confidence: float | None = None,
                    sensitivity: float | None = None, cv: str | None = None,
                    arm: str | None = None, presence: str | None = None) -> Predicted:
    """Predict every readable image; write masks, overlays, predictions.csv/.json (and
    skipped.csv when some input could not be read) into a new folder.

    ``min_confidence`` overrides the classifier run's ``predict.min_confidence``. Unreadable
    images are skipped and returned in :attr:`Predicted.skipped`; none readable is a
    BusiError, before anything is written.
    """
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise BusiError("--out exists and is not an empty folder", where=out,
                        fix="choose a new or empty --out folder; busi predict never overwrites")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise BusiError(f"must be between 0 and 1, got {min_confidence:g}",
                        where="--min-confidence", fix="e.g. --min-confidence 0.6")
    found = _images(inputs)
    images, skipped = _readable(found)
    stems = _output_stems(images)
    if cv and (seg_run or cls_run):
        raise BusiError("--cv uses the CV's own fold models: --seg-run / --cls-run do not apply",
                        where="--cv", fix="leave out --seg-run and --cls-run")
    cv = (resolve_cv(cv, outputs_root) if cv else None if cls_run or seg_run
          else default_cv(outputs_root))
    predictor = Predictor(seg_run, cls_run, outputs_root, sensitivity, cv=cv, arm=arm,
                          presence=presence)
    members = [(str(m.seg), str(m.cls)) for m in getattr(predictor, "members", [])]
    op = predictor.op
    if op is None and (sensitivity is not None or presence is not None):
        raise BusiError("this classifier run has no validation predictions to choose an "
                        "operating point on (it predates them)", where=str(predictor.cls),
                        fix="leave out --sensitivity and --presence, or retrain the "
                            "classifier")
    seg, cls, rule, flip_tta = predictor.seg, predictor.cls, predictor.rule, predictor.flip_tta
    if min_confidence is None:
        min_confidence = predictor.min_confidence
    grid = f"{predictor.size[1]}x{predictor.size[0]}"  # width x height, as image sizes are said
    out_dir = Path(out) if out else new_run_dir(Path(outputs_root) / "predict")
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = predictor.classes
    if explain:
        from busi.reporting.gradcam import gradcam, save_panels, split_model

        parts = split_model(predictor.clf)
    rows = []
    for path, stem in zip(images, stems, strict=True):
        gray, why = _read_gray(path)
        if gray is None:  # changed since _readable read it: skipped like the others
            why += " (the file changed while busi predict ran)"
            _warn_skipped(path, why)
            skipped.append((str(path), why))
            continue
        mask, x, p = predictor(gray)
        head = predictor.last_unet_head
        unet = {"max": np.array([predictor.last_unet_max]),
                "head": None if head is None else np.array([head])}
        call = decide(op, p[None], classes, unet)[0] if op is not None else ""
        # Called lesion-free at the chosen point: the mask written is empty, whatever blob
        # the U-Net drew (its size stays in unet_lesion_pixels).
        drawn = np.zeros_like(mask) if call == "normal" else mask
        full = cv2.resize(drawn, (gray.shape[1], gray.shape[0]),
                          interpolation=cv2.INTER_NEAREST)
        ok, buf = cv2.imencode(".png", full * 255)
        atomic_write(out_dir / f"{stem}_mask.png", buf.tobytes())
        view = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        contours, _ = cv2.findContours(full, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(view, contours, -1, (0, 0, 255), 2)
        ok, buf = cv2.imencode(".png", view)
        atomic_write(out_dir / f"{stem}_overlay.png", buf.tobytes())
        flags = flags_of(mask, p, min_confidence)
        if explain:
            heat, _ = gradcam(predictor.clf, x, np.array([int(np.argmax(p))]), parts=parts)
            # The scan's own aspect ratio, and the U-Net's mask outlined beside the heatmap.
            save_panels(out_dir, [f"{stem}.png"], resize_image(gray, predictor.size)[None], x, heat,
                        None, [classes[int(np.argmax(p))]], np.array([float(p.max())]),
                        shapes=np.array([gray.shape[:2]]), unet=mask[None],
                        notes=["flagged: " + "; ".join(FLAGS[f] for f in flags)] if flags
                        else None,
                        crop_view=predictor.c.mask_mode == "lesion_crop"
                        and predictor.c.masks != "none")
        rows.append({"file": str(path), "pred": classes[int(np.argmax(p))],
                     **{f"p_{k}": round(float(v), 6) for k, v in zip(classes, p, strict=True)},
                     "lesion_pixels": int(drawn.sum()), "output_stem": stem,
                     "lesion_pixels_grid": grid,
                     "lesion_fraction": round(float(drawn.mean()), 6),
                     "flags": ";".join(flags),
                     "cls_run": str(cls), "seg_run": str(seg), "call": call,
                     "malignancy": round(float(malignancy(p[None], classes)[0]), 6),
                     "unet_max": round(predictor.last_unet_max, 6),
                     "unet_lesion_pixels": int(mask.sum()),
                     "unet_head": "" if head is None else round(head, 6)})
    # New columns after the old ones, so a script that reads columns by position still works.
    header = ["file", "pred", *[f"p_{k}" for k in classes], "lesion_pixels", "output_stem",
              "lesion_pixels_grid", "lesion_fraction", "flags", "cls_run", "seg_run", "call",
              "malignancy", "unet_max", "unet_lesion_pixels", "unet_head"]
    buf_csv = io.StringIO()
    writer = csv.DictWriter(buf_csv, header, lineterminator="\n")  # quotes commas, quotes, ...
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "predictions.csv", buf_csv.getvalue())
    if skipped:
        buf_csv = io.StringIO()
        writer = csv.writer(buf_csv, lineterminator="\n")
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
        atomic_write(out_dir / "skipped.csv", buf_csv.getvalue())
    write_json(out_dir / "predictions.json", {
        "note": DISCLAIMER, "seg_run": str(seg), "cls_run": str(cls),
        "threshold": rule.threshold, "postprocess": rule.postprocess, "flip_tta": flip_tta,
        "min_confidence": min_confidence, "flags": FLAGS,
        "operating_point": None if op is None else {**op.as_dict(), "words": op.words()},
        "fold_ensemble": None if not members else {
            "cv": str(cv), "arm": predictor.arm,
            "members": [{"seg_run": a, "cls_run": b} for a, b in members],
            "how": "each fold's classifier on its own U-Net's masks, probabilities averaged; "
                   "the mask: the U-Nets' mean probability at their mean threshold; Grad-CAM "
                   "(--explain): fold 0's classifier"},
        "units": {"lesion_pixels": f"pixels of the predicted mask on the {grid} grid the "
                                   "models see (the scan resized), not of the original scan",
                  "lesion_fraction": "share of the image area inside the predicted mask "
                                     "(0-1; the same at any resolution)",
                  "p_<class>": "classifier probability (softmax; the classes sum to 1)",
                  "pred": "the classifier's most probable class (argmax)",
                  "call": "the call at the operating point chosen on the classifier's "
                          "validation images (operating_point); empty for runs from before",
                  "malignancy": "p(malignant) / (p(benign) + p(malignant))",
                  "unet_max": "the U-Net's highest lesion probability in the scan",
                  "unet_head": "the U-Net encoder's presence head: p(lesion) (empty for a "
                               "U-Net run without one)",
                  "unet_lesion_pixels": "pixels the U-Net drew on the model grid; the mask "
                                        "written (lesion_pixels, <name>_mask.png) is empty "
                                        "when the call at the chosen point is normal"},
        "predictions": rows,
        "skipped": [{"file": f, "reason": why} for f, why in skipped]})
    for r in rows:
        probs = ", ".join(f"{k} {r[f'p_{k}']:.3f}" for k in classes)
        flagged = f"  [{r['flags'].replace(';', ', ')}]" if r["flags"] else ""
        at = f"; at the chosen point: {r['call']}" if r["call"] else ""
        print(f"{r['file']}: {r['pred']} ({probs}){at}; lesion "
              f"{100 * r['lesion_fraction']:.1f}% "
              f"of the image ({r['lesion_pixels']} px on the {grid} model grid){flagged}")
    counts = {f: sum(f in r["flags"].split(";") for r in rows) for f in FLAGS}
    n_flagged = sum(bool(r["flags"]) for r in rows)
    print(f"{len(rows)} image(s) predicted, {n_flagged} flagged ("
          f"no lesion found by the segmenter: {counts['no_lesion_found']}; "
          f"low confidence, top probability < {min_confidence:g}: {counts['low_confidence']})")
    if members:
        print(f"runs: the fold ensemble of arm {predictor.arm} of {cls}: "
              + "; ".join(f"fold {k}: {b} on {a}" for k, (a, b) in enumerate(members)))
    else:
        print(f"runs: classifier {cls}; U-Net {seg}")
    if op is not None:
        print(f"chosen point (the classifier's validation images): {op.words()}")
    print(f"outputs: {out_dir} (predictions.csv, predictions.json, "
          f"{'skipped.csv, ' if skipped else ''}<name>_mask.png, <name>_overlay.png)")
    print(f"note: {DISCLAIMER}")
    if skipped:
        print(f"busi: warning: {len(skipped)} of {len(found)} image(s) skipped as unreadable, "
              f"each named above and in {out_dir / 'skipped.csv'}; exit code {EXIT_SKIPPED} -- "
              "fix: replace or remove those files and predict them again", file=sys.stderr)
    return Predicted(out_dir, len(rows), skipped)
