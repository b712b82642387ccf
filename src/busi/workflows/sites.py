"""``busi evaluate --data``: trained runs on other labelled data (other hospitals'), no
retraining, each site's intervals resampling its patients.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from busi.errors import BusiError
from busi.runs import (
    EVAL_DIR,
    PREDICTIONS,
    atomic_write,
    new_run_dir,
    paired_seg_run,
    read_config,
    read_json,
    read_split,
    resolve_cls_run,
    resolve_seg_run,
    unique_name,
    write_json,
    write_predictions,
)


def evaluate_on_data(data: str | Path | list[str | Path], cls_run: str | None = None,
                     seg_run: str | None = None, outputs_root: str = "outputs",
                     allow_overlap: bool = False, sensitivity: float | None = None,
                     presence: str | None = None) -> Path:
    """Run trained models on other labelled data (other hospitals') and report, no retraining.

    ``data`` is one site or several: each a BUSI-layout folder or a CSV manifest
    (``image,mask,label``, and ``patient`` when known). Which runs: ``--cls-run`` names
    the classifier (with its own U-Net, or ``--seg-run``); ``--seg-run`` alone measures
    that U-Net only, so a U-Net can be measured on another site without a classifier;
    neither takes the newest finished classifier. The run's own config decides the image
    size and how masks are applied; the segmentation run's stored rule decides how its
    probabilities become masks -- exactly as for the run's own test images. Classes the
    model knows but the data lacks (often ``normal``) are fine and get no table row;
    unknown labels are not. Every 95% interval resamples patients
    (:func:`resampling_groups`): one patient's scans are alike, so counting them as
    independent images would give intervals far too narrow.

    One output folder holds one table with the sites side by side and the runs' own
    (internal) test figures as the first row -- a drop on another site is read against
    the same model's own test score. Each site gets its ROC curve and failure gallery;
    with one site its files lie in the folder itself (as before several were allowed),
    with several each site has a subfolder.

    A site is first compared with the images the runs trained and validated on
    (:func:`training_overlap`: the same decoded pixels, a pHash near-duplicate, a shared
    patient id). A site with any of those images is refused unless ``allow_overlap``:
    figures on images a model was fitted to are not another hospital's, and a warning
    scrolls past where a table gets copied into a paper. With ``allow_overlap`` it is
    evaluated, loudly, and the counts stand in its report. Shared patient ids alone are
    a loud warning, not a refusal: ids such as "P1" of two hospitals coincide by
    accident, and busi cannot tell whether they name one person.
    """
    from busi.models.masks import load_unets
    from busi.models.saving import load_model

    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if seg_run and not cls_run:  # the U-Net alone
        cls, seg = None, resolve_seg_run(seg_run, outputs_root)
        cfg = read_config(seg)
    else:
        cls = resolve_cls_run(cls_run, outputs_root)
        cfg = read_config(cls)
    model_classes = tuple(cfg.data.classes)
    # Every site is read and checked before anything is written: a bad one leaves nothing.
    sites = _load_sites(paths, model_classes, cfg)
    if cls is not None:
        c = cfg.model.classifier
        uses_masks = c.masks != "none" and c.mask_mode != "none"
        seg, why = (paired_seg_run(cls, seg_run, outputs_root, "busi evaluate")
                    if uses_masks and c.masks == "predicted" or seg_run else (None, ""))
        print(f"busi evaluate: classifier run {cls}{'' if cls_run else ' (the latest finished)'}"
              f"; U-Net run {f'{seg} ({why})' if seg else 'none'}")
    else:
        print(f"busi evaluate: U-Net run {seg} (segmentation only: no --cls-run)")
    # Every model is loaded before the output folder is made: a bad one leaves nothing behind.
    unets = load_unets(seg) if seg is not None else []
    clf = load_model(cls / "best.keras") if cls is not None else None
    # Checked after the models load (a broken model is the first thing to fix) and before
    # the output folder exists: a refused site leaves nothing behind.
    _check_overlap(sites, [r for r in (cls, seg) if r is not None],
                   cfg.split.near_duplicate_distance, allow_overlap)
    # The classifier's operating point, chosen once on its validation images (for
    # --sensitivity / --presence if given; one the run cannot serve is refused here) and
    # applied unchanged to its own test split and to every site; all before the folder too.
    from busi.evaluation.classification import operating_point

    op = operating_point(cls, sensitivity, presence) if cls is not None else None
    internal = _internal_figures(cls, seg, op)
    out = new_run_dir(Path(outputs_root) / EVAL_DIR)
    try:
        return _write_evaluation(out, sites, cfg, cls, seg, clf, unets, internal, op)
    except BaseException:  # a failure (or Ctrl-C) part-way leaves no half-written evaluation
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_evaluation(out: Path, sites: list, cfg, cls: Path | None, seg: Path | None, clf,
                      unets: list, internal: dict, op) -> Path:
    """Every site's evaluation into ``out``, then the side-by-side table and the report."""
    from busi.reporting.report import report_after_run

    model_classes = tuple(cfg.data.classes)
    for site in sites:
        site.out = out if len(sites) == 1 else out / site.slug
        site.out.mkdir(parents=True, exist_ok=True)
    names = ", ".join(s.name for s in sites)
    parts = [f"# Evaluation on {names}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Classifier run: {cls or 'none (segmentation only)'}; segmentation run: "
             f"{seg or 'none'}; {len(sites)} site{'s' if len(sites) > 1 else ''}, "
             f"{sum(len(s.ds) for s in sites)} images.", ""]
    records = []
    for site in sites:
        print(f"== {site.name} ({site.data})")
        record, section = _evaluate_site(site, cfg, cls, seg, clf, unets, len(sites) > 1, op)
        records.append(record)
        parts += section
    table = _sites_table(internal, records, model_classes)
    print("Side by side:\n" + "\n".join(table))
    parts = [*parts[:4], "## Sites side by side, with the runs' own test split", "", *table, "",
             *parts[4:]]
    atomic_write(out / "evaluation.md", "\n".join(parts))
    if len(sites) == 1:  # the single-site record, as before several sites were allowed
        summary = {**records[0], "internal": internal}
    else:
        summary = {"data": [str(s.data) for s in sites], "cls_run": str(cls) if cls else None,
                   "seg_run": str(seg) if seg else None, "internal": internal,
                   "sites": records}
    write_json(out / "evaluation.json", summary)
    print(f"reports: {out}/evaluation.md, evaluation.json")
    report_after_run(out)
    return out


def unets_on_data(data: str | Path | list[str | Path], seg_runs: list[str],
                  outputs_root: str = "outputs", allow_overlap: bool = False) -> Path:
    """``busi evaluate --data SITE --seg-run A --seg-run B``: U-Nets side by side on another
    site's images, segmentation only -- e.g. the paper's U-Net trained from scratch beside
    cpu.yaml's pretrained encoder, at a hospital neither saw.

    Each U-Net is measured as ``evaluate_on_data`` measures one (its own stored mask rule,
    its folder of files), then one table per site puts them side by side with the paired
    difference in lesion Dice of the first against each other one: on the same images,
    the hard scans are hard for both, so the difference is far surer than two separate
    intervals suggest. Every interval resamples the site's patients. The U-Nets must read
    images alike (one image size, one class list): Dice on two pixel grids is not one
    measurement.
    """
    from busi.models.masks import load_unets
    from busi.workflows.evaluate import unet_said

    paths = [data] if isinstance(data, (str, Path)) else list(data)
    segs = [resolve_seg_run(r, outputs_root) for r in seg_runs]
    if len({s.resolve() for s in segs}) < len(segs):
        raise BusiError("one U-Net run is named twice by --seg-run",
                        fix="give each --seg-run another run folder")
    cfgs = [read_config(s) for s in segs]
    reads = {(tuple(c.data.image_size), tuple(c.data.classes)) for c in cfgs}
    if len(reads) > 1:
        said = "; ".join(f"{s.name}: {'x'.join(map(str, c.data.image_size))}, classes "
                         f"{', '.join(c.data.classes)}" for s, c in zip(segs, cfgs, strict=True))
        raise BusiError(f"these U-Nets read images differently ({said}): per-image Dice on "
                        "two pixel grids or class lists is not one measurement",
                        fix="compare U-Nets of one data.image_size and data.classes, or "
                            "measure each alone: busi evaluate --data SITE --seg-run RUN")
    cfg = cfgs[0]
    sites = _load_sites(paths, tuple(cfg.data.classes), cfg)  # all read before any file
    print("busi evaluate: U-Net runs " + ", ".join(f"{s} ({unet_said(s)})" for s in segs)
          + " side by side (segmentation only: no --cls-run)")
    unets = [load_unets(s) for s in segs]
    _check_overlap(sites, segs, cfg.split.near_duplicate_distance, allow_overlap)
    out = new_run_dir(Path(outputs_root) / EVAL_DIR)
    try:
        return _write_unets_evaluation(out, sites, cfgs, segs, unets)
    except BaseException:  # a failure (or Ctrl-C) part-way leaves no half-written evaluation
        shutil.rmtree(out, ignore_errors=True)
        raise


def _write_unets_evaluation(out: Path, sites: list[_Site], cfgs: list, segs: list[Path],
                            unets: list[list]) -> Path:
    """Each U-Net on each site into ``out/<U-Net run>/[<site>/]``, then per site the table
    of them side by side, into ``evaluation.md`` / ``evaluation.json`` and the report."""
    from busi.evaluation.segmentation import unets_side_by_side
    from busi.reporting.report import report_after_run
    from busi.workflows.evaluate import unet_said

    folders: list[str] = []
    for s in segs:  # a folder per U-Net, named after its run
        folders.append(unique_name(s.name, folders))
    names = ", ".join(s.name for s in sites)
    parts = [f"# U-Nets side by side on {names}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             "Segmentation only (no classifier). U-Net runs: "
             + "; ".join(f"`{s}` ({unet_said(s)})" for s in segs)
             + f". {len(sites)} site{'s' if len(sites) > 1 else ''}, "
             f"{sum(len(s.ds) for s in sites)} images.", ""]
    sections: list[str] = []
    records = []
    for site in sites:
        runs, scores = [], []
        for seg, folder, cfg, members in zip(segs, folders, cfgs, unets, strict=True):
            site.out = out / folder / (site.slug if len(sites) > 1 else "")
            site.out.mkdir(parents=True, exist_ok=True)
            print(f"== {site.name} ({site.data}): U-Net {seg.name}")
            record, section = _evaluate_site(site, cfg, None, seg, None, members,
                                             len(sites) > 1, None, root=out)
            sections += [f"## {site.name}: U-Net {seg.name}", *section[1:]]
            runs.append(record)
            if record["segmentation"] is not None:
                scores.append(read_json(site.out / SITE_SCORES))
        record = {"data": str(site.data), "site": site.name, "unets": runs, "side_by_side": []}
        if len(scores) == len(segs):
            files = [str(f) for f in site.ds.files]
            unit = dict(zip(files, site.groups.tolist(), strict=True))
            metrics = [{**r["segmentation"], "train_seconds": _train_seconds(seg)}
                       for r, seg in zip(runs, segs, strict=True)]
            table = unets_side_by_side(
                [f"{s.name} ({unet_said(s)})" for s in segs], metrics, scores,
                {f: v["lesion_px"] > 0 for sc in scores for f, v in sc.items()},
                {f: unit[f] for f in scores[0]}, unit_name=site.unit_name, images="images")
            record["side_by_side"] = table
        else:
            table = ["No image of this site has a mask to score: no U-Net figures."]
        print(f"U-Nets side by side on {site.name}:\n" + "\n".join(table))
        parts += [f"## U-Nets side by side on {site.name}", "",
                  f"{len(site.ds)} images of {len(np.unique(site.groups))} {site.unit_name}; "
                  f"95% intervals resample {site.unit_name}: {site.unit_note}.", "", *table, ""]
        records.append(record)
    atomic_write(out / "evaluation.md", "\n".join(parts + sections))
    write_json(out / "evaluation.json", {"data": [str(s.data) for s in sites],
                                         "seg_runs": [str(s) for s in segs], "sites": records})
    print(f"reports: {out}/evaluation.md, evaluation.json")
    report_after_run(out)
    return out


def _train_seconds(seg: Path) -> float | None:
    """A U-Net run's training time from its metrics.json (None if it has none)."""
    try:
        return read_json(seg / "metrics.json").get("train_seconds")
    except BusiError:
        return None


GALLERY_EACH = 6  # a site's failure gallery: this many wrong calls and this many worst Dice
SITE_SCORES = "segmentation_scores.json"  # each scored image's Dice, IoU, HD95 at the site


class _Site:
    """One external data set being evaluated: its data, resampling units and output folder."""

    def __init__(self, data: Path, ds, groups: np.ndarray, unit_name: str, unit_note: str,
                 model_classes: tuple[str, ...]) -> None:
        self.data, self.ds = data, ds
        self.names = [ds.classes[k] for k in ds.labels]
        self.labels = np.array([model_classes.index(n) for n in self.names])  # model's indices
        self.groups, self.unit_name, self.unit_note = groups, unit_name, unit_note
        self.name = site_name(data)
        self.slug = "".join(ch if ch.isalnum() or ch in "._-" else "_"
                            for ch in self.name.replace("/", "__"))
        self.out = Path()
        self.overlap: dict = {"checked": False, "why": "not checked"}


def site_name(data: str | Path) -> str:
    """A site as headings name it: its folder or CSV with the folder above, e.g.
    ``bus-uclm-dev/manifest.csv`` -- ``manifest.csv`` alone says nothing of which site."""
    path = Path(data).resolve()
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _load_sites(paths: list[str | Path], model_classes: tuple[str, ...], cfg) -> list[_Site]:
    """Read every site (any error is a BusiError before the output folder exists); two
    sites with one name get -2, -3 ... folders."""
    from busi.data.loading import load_dataset

    sites = []
    for data in paths:
        ds = load_dataset(data, _classes_in(str(data), model_classes),
                          tuple(cfg.data.image_size), cache_dir=cfg.data.cache_dir,
                          on_bad_file=cfg.data.on_bad_file)
        groups, unit_name, unit_note = resampling_groups(str(data), ds,
                                                         cfg.split.near_duplicate_distance)
        site = _Site(Path(data), ds, groups, unit_name, unit_note, model_classes)
        site.slug = unique_name(site.slug, {s.slug for s in sites})
        sites.append(site)
    return sites


def _evaluate_site(site: _Site, cfg, cls: Path | None, seg: Path | None, clf, unets: list,
                   several: bool, op=None, root: Path | None = None) -> tuple[dict, list[str]]:
    """One site's figures and files (into ``site.out``): its record for evaluation.json
    and its section of evaluation.md. ``op``: the classifier's operating point, chosen on
    its own validation images, applied unchanged (None: argmax figures only). ``root``:
    the folder of that evaluation.md, which the section's file paths are relative to
    (default: the evaluation folder, ``site.out`` or the one above it)."""
    from busi.evaluation.classification import (
        PER_IMAGE,
        at_operating_point,
        compute,
        inputs_of,
        markdown_table,
        missed_lesions,
        model_of,
        present_classes_view,
        read_per_image,
        write_per_image,
        write_run_reports,
    )
    from busi.evaluation.segmentation import patient_intervals, per_image, summarise
    from busi.models.inputs import classifier_inputs
    from busi.models.masks import as_stored, predict_probs, read_rule
    from busi.reporting.plots import (
        plot_benign_malignant_roc,
        save_failure_gallery,
        segmentation_markdown,
        segmentation_text,
    )

    ds, names, labels, groups = site.ds, site.names, site.labels, site.groups
    model_classes = tuple(cfg.data.classes)
    n_units = len(np.unique(groups))
    root = root or (site.out.parent if several else site.out)  # evaluation.md's folder
    where = f" Files: `{site.out.relative_to(root)}/`." if site.out != root else ""
    counts = ", ".join(f"{k} {names.count(k)}" for k in model_classes if k in names)
    parts = [f"## {site.name}", "",
             f"Data `{site.data}`: {len(ds)} images ({counts}) of {n_units} {site.unit_name}. "
             f"95% intervals resample {site.unit_name}, not images: {site.unit_note}.{where}", "",
             _overlap_markdown(site.overlap, len(ds)), ""]
    record: dict = {"data": str(site.data), "site": site.name,
                    "cls_run": str(cls) if cls else None, "seg_run": str(seg) if seg else None,
                    "n_images": len(ds),
                    "resampled": {"unit": site.unit_name, "n": n_units, "source": site.unit_note},
                    "training_overlap": site.overlap,
                    "segmentation": None, "classification": None}
    c = cfg.model.classifier
    uses_masks = cls is not None and c.masks != "none" and c.mask_mode != "none"
    masks = ds.masks if cls is not None and c.masks == "ground_truth" else None
    predicted, dice = None, np.full(len(ds), np.nan)
    if seg is not None:
        rule, tta = read_rule(seg)
        probs = as_stored(predict_probs(unets, ds.images, flip_tta=tta))
        predicted = rule.apply(probs)
        masks = predicted if cls is not None and c.masks == "predicted" else masks
        scored = (ds.n_masks > 0) | (np.array(names) == "normal")
        if scored.any():
            scores = per_image(ds.masks[scored], predicted[scored].astype(np.float32), 0.5)
            dice[scored] = scores["dice"]
            dice[scored & (ds.masks.reshape(len(ds), -1).max(1) == 0)] = np.nan  # lesion-free
            summary = summarise(scores, labels[scored], model_classes)
            # No best_epoch / epochs_done: another site's images were not trained on.
            summary.update({"threshold": rule.threshold, "postprocess": rule.postprocess,
                            "flip_tta": tta, "n_test": int(scored.sum()),
                            "data": str(site.data),
                            "intervals": patient_intervals(scores, groups[scored],
                                                           site.unit_name)})
            write_json(site.out / "segmentation.json", summary)
            # Each image's figures, as a U-Net run's test_scores.json: U-Nets side by side
            # pair them by file, and a reader finds the scans a U-Net fails on.
            at = np.flatnonzero(scored)
            write_json(site.out / SITE_SCORES, {
                ds.files[i]: {**{m: float(scores[m][k]) for m in ("dice", "iou", "hd95")},
                              "lesion_px": int((ds.masks[i] > 0).sum()),
                              "predicted_px": int((predicted[i] > 0.5).sum())}
                for k, i in enumerate(at)})
            record["segmentation"] = summary
            print(segmentation_text(summary))
            parts += [segmentation_markdown(summary).replace(f"# Segmentation on {site.data}",
                                                             "### Segmentation"), ""]
    wrong: list[tuple[int, str]] = []
    if cls is not None:
        from busi.data.loading import original_images
        from busi.models.inputs import needs_originals

        use = masks if uses_masks else None
        x = classifier_inputs(ds.images, use, c, original_images(ds)
                              if needs_originals(c) and use is not None else None)
        probs_cls = clf.predict(x.astype("float32"), batch_size=64, verbose=0)
        peak = None
        if seg is not None:  # the U-Net's presence scores (models/decision.py)
            from busi.models.presence import pooled_features, run_head

            head = run_head(seg)
            peak = {"max": probs.reshape(len(probs), -1).max(axis=1).astype(float),
                    "head": (None if head is None
                             else head.score(pooled_features(unets[0], ds.images)))}
        write_predictions(site.out / PREDICTIONS, ds.files, labels, probs_cls, model_classes,
                          peak)
        pred = [model_classes[int(i)] for i in probs_cls.argmax(1)]
        r = compute(ds.files, names, pred, probs_cls, list(model_classes), groups=groups,
                    unit_name=site.unit_name)
        if op is not None:
            r["clinical"] = at_operating_point(op, names, probs_cls, list(model_classes), peak,
                                               groups=groups)
        if predicted is not None:  # each image's call joined to its mask; missed lesions
            write_per_image(site.out / PER_IMAGE, ds.files, names, pred, probs_cls.max(1),
                            ds.masks, predicted)
            r["unet_missed"] = missed_lesions(read_per_image(site.out / PER_IMAGE))
        title = f"{model_of(cls)} ({inputs_of(cls)}) -- {cls.name} on {site.name}"
        r["title"] = title
        r = present_classes_view(r)  # no rows for the model's classes the site lacks
        r["text"] = f"{title}\n{r['report_text']}"
        write_run_reports(site.out, r, title)
        table = markdown_table(r, title).replace(f"### {title}", "### Classification")
        print(markdown_table(r, title))
        parts += [f"Classifier: {title}.", "", table]
        if r.get("absent_note"):
            parts += [r["absent_note"], ""]
        record["classification"] = {k: v for k, v in r.items()
                                    if k not in ("text", "report_text")}
        roc = plot_benign_malignant_roc(names, probs_cls, list(model_classes),
                                        site.out / f"roc_{site.slug}.png",
                                        f"{site.name}: benign vs malignant",
                                        r["benign_malignant_auc"])
        if roc is not None:
            parts += [f"Benign vs malignant ROC curve: `{roc.relative_to(root)}`.", ""]
        conf = probs_cls.max(1)
        wrong = sorted(((i, f"{names[i]} called {pred[i]} {conf[i]:.2f}")
                        for i in range(len(ds)) if pred[i] != names[i]),
                       key=lambda t: -conf[t[0]])
    # The gallery: the most confident wrong calls, then the lowest-Dice lesion scans.
    chosen = [(i, text + (f", Dice {dice[i]:.2f}" if np.isfinite(dice[i]) else ""))
              for i, text in wrong[:GALLERY_EACH]]
    worst = [int(i) for i in np.argsort(np.where(np.isfinite(dice), dice, np.inf), kind="stable")
             if np.isfinite(dice[i]) and int(i) not in {j for j, _ in chosen}]
    chosen += [(i, f"{names[i]}, Dice {dice[i]:.2f}") for i in worst[:GALLERY_EACH]]
    if chosen:
        idx = [i for i, _ in chosen]
        gallery = save_failure_gallery(
            site.out / f"failures_{site.slug}.png", ds.images[idx], ds.masks[idx],
            None if predicted is None else predicted[idx],
            [f"{Path(ds.files[i]).name}: {text}" for i, text in chosen],
            f"{site.name}: wrong calls and lowest Dice", shapes=ds.shapes[idx])
        parts += [f"Failure gallery: `{gallery.relative_to(root)}` -- the "
                  f"{min(len(wrong), GALLERY_EACH)} most confident wrong classifications and "
                  f"the {min(len(worst), GALLERY_EACH)} lowest lesion Dice scans (green: the "
                  "true lesion, red: the U-Net's mask).", ""]
    return record, parts


def _internal_figures(cls: Path | None, seg: Path | None, op=None) -> dict:
    """The runs' own test-split figures, from their own files: the classifier's
    predictions.csv (intervals over its split's duplicate groups, as its report; at ``op``,
    its operating point) and the U-Net's metrics.json. A figure a run lacks is None."""
    from busi.evaluation.classification import (
        at_operating_point,
        compute,
        own_unet,
        split_groups,
        unet_columns,
    )
    from busi.runs import read_predictions

    out: dict = {"classification": None, "dice": None, "n_lesion_images": None}
    if cls is not None and (cls / PREDICTIONS).is_file():
        files, y_true, y_pred, probs, classes = read_predictions(cls / PREDICTIONS)
        groups = split_groups(cls, files)
        r = compute(files, y_true, y_pred, probs, classes, groups=groups)
        if op is not None:
            # Both U-Net scores (max and head), as the run's own report reads them: a
            # head presence kind needs the head's.
            r["clinical"] = at_operating_point(op, y_true, probs, classes,
                                               unet_columns(cls / PREDICTIONS, own_unet(cls)),
                                               groups=groups)
        r["n_units"] = len(np.unique(groups)) if groups is not None else len(files)
        r["unit_name"] = "duplicate groups" if groups is not None else "images"
        out["classification"] = {k: v for k, v in r.items() if k != "report_text"}
    if seg is not None and (seg / "metrics.json").is_file():
        le = read_json(seg / "metrics.json").get("lesion_images", {})
        if "dice" in le:
            out["dice"], out["n_lesion_images"] = le["dice"]["mean"], le["dice"]["n"]
    return out


def _sites_table(internal: dict, records: list[dict], classes: tuple[str, ...]) -> list[str]:
    """The sites side by side (one row each) under the runs' own test-split row (Markdown):
    images and resampled units, accuracy, macro-F1, per-class recall, benign-vs-malignant
    AUC and lesion Dice, each with its 95% interval."""

    def ci(value: float | None, interval: list[float] | None, digits: int = 3) -> str:
        if value is None or not np.isfinite(value):
            return "n/a"
        return f"{value:.{digits}f}" + ("" if interval is None else
                                        f" ({interval[0]:.2f}-{interval[1]:.2f})")

    def cls_cells(r: dict | None) -> list[str]:
        if r is None:
            return ["n/a"] * (4 + len(classes))
        cs = (r.get("clinical") or {}).get("sensitivity_specificity") or {}
        point = ("n/a" if not cs else
                 f"{ci(cs['sensitivity'], cs['ci95']['sensitivity'], 2)} / "
                 f"{ci(cs['specificity'], cs['ci95']['specificity'], 2)}")
        rec = r["ci95"].get("recall", {})
        recall = [ci(r["report"][k]["recall"], rec.get(k), 2) if k in r["present"]
                  else "not in data" for k in classes]
        bm = r.get("benign_malignant_auc") or {}
        return [ci(r["accuracy"], r["ci95"]["accuracy"]), ci(r["macro_f1"], r["ci95"]["macro_f1"]),
                *recall, ci(bm.get("auc"), bm.get("ci95")), point]

    # The class order of the reports' own tables (their r["labels"]), so columns read alike.
    shown = [r for r in (internal["classification"], *(x["classification"] for x in records)) if r]
    classes = tuple(shown[0].get("labels_all", shown[0]["labels"])) if shown else classes
    head = ["", "images / units", "accuracy (95% CI)", "macro-F1 (95% CI)",
            *[f"recall {k} (95% CI)" for k in classes], "benign vs malignant AUC (95% CI)",
            "malignant sensitivity / specificity at the chosen point (95% CI)",
            "lesion Dice (95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    ic = internal["classification"]
    n = (f"{ic['n']} / {ic['n_units']} {ic['unit_name']}" if ic else
         f"{internal['n_lesion_images']} lesion images" if internal["dice"] is not None else "n/a")
    lines.append(f"| internal test split (the runs' own) | {n} | "
                 + " | ".join([*cls_cells(ic), ci(internal["dice"], None)]) + " |")
    for rec in records:
        s = rec["segmentation"]
        dice = (ci(s["lesion_images"]["dice"]["mean"], s["intervals"]["ci95"]["dice"])
                if s and s["lesion_images"]["dice"]["n"] else "n/a")
        units = f"{rec['n_images']} / {rec['resampled']['n']} {rec['resampled']['unit']}"
        lines.append(f"| {rec['site']} | {units} | "
                     + " | ".join([*cls_cells(rec["classification"]), dice]) + " |")
    for rec in records:
        overlap = rec.get("training_overlap") or {}
        if overlap.get("images"):
            lines += ["", f"**{rec['site']} is not unseen data**: {_overlap_words(overlap)}; "
                          "its row overstates how the models do on a new hospital."]
    lines += ["", "Each site's intervals resample its patients (or near-duplicate groups where "
                  "it names none); the internal row's resample its test split's duplicate "
                  "groups, as the run's own report. Recall \"not in data\": the site has no "
                  "scan of that class. Lesion Dice: scans with a mask file; internal Dice is "
                  "the U-Net run's own test figure (no interval). The chosen point: the "
                  "thresholds the classifier chose on its own validation images (a target "
                  "malignant sensitivity, decision.malignant_sensitivity or --sensitivity), "
                  "applied unchanged to every site, as a user would."]
    return lines


def resampling_groups(data: str, ds, near_distance: int) -> tuple[np.ndarray, str, str]:
    """What an interval resamples for each image of ``ds``: (group ids, their name, why).

    A CSV manifest's ``patient`` column gives patients. Without one (a BUSI-layout
    folder, or a CSV without the column) the near-duplicate groups stand in: they keep
    repeated frames of one lesion together but cannot join a patient's different
    views, so those intervals can still be too narrow -- the report says so. A blank
    patient cell is an error, not a guess: the interval would claim more than it knows.
    """
    path = Path(data)
    # The loader read the CSV's patient column (Case.patient, Dataset.patients); the
    # layout's cases are the CSV's rows in order, so row k is line k + 2.
    known = [c.patient for c in ds.layout.cases] if ds.layout is not None else []
    if any(known):
        blank = next((k for k, p in enumerate(known) if not p), None)
        if blank is not None:
            raise BusiError("empty patient cell", where=f"{path}, line {blank + 2}",
                            fix="write whose scan the image is (any id), or drop the "
                                "patient column to resample near-duplicate groups")
        return np.array(ds.patients), "patients", f"the patient column of {path.name}"
    why = (f"{path.name} has no patient column" if path.suffix.lower() == ".csv"
           else "a BUSI-layout folder names no patients")
    from busi.data.split import duplicate_groups

    return (duplicate_groups(ds, near_distance), "duplicate groups",
            f"{why}, so near-duplicate groups (pHash distance <= {near_distance}) stand in for "
            "patients; a patient's different views are still counted as independent, so these "
            "intervals may be too narrow")


@dataclass
class SeenImages:
    """The images some runs were fitted to -- their split's train and validation parts --
    as the overlap check needs them: decoded-pixel hashes, pHashes and patient ids."""

    files: list[str] = field(default_factory=list)
    pixel_hashes: list[str] = field(default_factory=list)
    phashes: np.ndarray = field(default_factory=lambda: np.zeros((0, 8), np.uint8))
    patients: set[str] = field(default_factory=set)
    against: list[str] = field(default_factory=list)  # which split parts, for the report


def seen_images(runs: list[Path]) -> SeenImages:
    """The train and validation images of ``runs`` (a classifier and its U-Net: the
    encoder and the masks learnt from them too), read again from each run's data
    (``data.root`` of its config.yaml) through the loader's cache.

    A run whose data or split manifest cannot be read is a BusiError: the caller says
    the check could not be made, and does not pretend the site is unseen.
    """
    from busi.data.loading import load_dataset
    from busi.data.split import read_manifest

    seen = SeenImages()
    done: set[tuple[str, object]] = set()
    phashes = []
    for run in runs:
        split = read_split(run)
        if not isinstance(split.get("manifest"), str):
            raise BusiError("split.json names no split manifest", where=str(run / "split.json"))
        key = (str(Path(split["manifest"]).resolve()), split.get("fold"))
        if key in done:  # a classifier and its own U-Net: one split
            continue
        done.add(key)
        cfg = read_config(run)
        manifest = read_manifest(split["manifest"])
        test = set(manifest.partition(split.get("fold"))["test"])
        fitted = [f for f in manifest.files if f not in test]
        ds = load_dataset(cfg.data.root, tuple(cfg.data.classes), tuple(cfg.data.image_size),
                          cache_dir=cfg.data.cache_dir, on_bad_file=cfg.data.on_bad_file,
                          workers=cfg.data.workers, collect=True)
        idx = ds.index(fitted)
        seen.files += fitted
        seen.pixel_hashes += [ds.pixel_hashes[i] for i in idx]
        phashes.append(ds.phashes.reshape(-1, 8)[idx])
        # With several sources a patient id carries its source's tag ("site/P1"); the
        # site's own CSV says "P1", so the tag is taken off again to compare.
        patients = list(ds.patients)
        for src in ds.sources:
            if src.tag:
                patients[src.start:src.stop] = [p.removeprefix(f"{src.tag}/")
                                                for p in patients[src.start:src.stop]]
        seen.patients |= {patients[i] for i in idx if patients[i]}
        fold = split.get("fold")
        seen.against.append(f"the train and validation parts of {Path(split['manifest']).name}"
                            + (f" (fold {fold})" if fold is not None else "")
                            + f", {len(fitted)} images of {ds.location}")
    if phashes:
        seen.phashes = np.concatenate(phashes)
    return seen


def training_overlap(ds, seen: SeenImages, near_distance: int) -> dict:
    """How much of a site (``ds``) the runs have seen: its images with the same decoded
    pixels as a training or validation image, those within ``near_distance`` pHash bits of
    one (the split's own near-duplicate rule: a resaved, recropped or re-exported copy),
    and the patient ids it shares with them. Examples pair a site file with its twin."""
    from scipy.spatial.distance import cdist

    twin_of = dict(zip(seen.pixel_hashes, seen.files, strict=True))
    twin = [twin_of.get(h) for h in ds.pixel_hashes]
    exact = np.array([t is not None for t in twin], dtype=bool)
    near = np.zeros(len(ds), dtype=bool)
    if len(ds) and len(seen.files):
        theirs = np.unpackbits(seen.phashes, axis=1).astype(bool)
        mine = np.unpackbits(ds.phashes.reshape(-1, 8), axis=1).astype(bool)
        for start in range(0, len(ds), 1024):  # in blocks: n x m distances can be large
            dist = np.rint(cdist(mine[start:start + 1024], theirs, "hamming") * theirs.shape[1])
            nearest = dist.argmin(axis=1)
            for k, j in enumerate(nearest):
                i = start + k
                if not exact[i] and dist[k, j] <= near_distance:
                    near[i], twin[i] = True, seen.files[j]
    shared = sorted({p for p in ds.patients if p} & seen.patients)
    hit = np.flatnonzero(exact | near)
    return {"checked": True, "against": seen.against, "n_site_images": len(ds),
            "images": len(hit), "exact_duplicates": int(exact.sum()),
            "near_duplicates": int(near.sum()), "near_duplicate_distance": int(near_distance),
            "shared_patients": len(shared), "patients": shared[:20],
            "examples": [[ds.files[i], twin[i]] for i in hit[:5]]}


def _check_overlap(sites: list[_Site], runs: list[Path], near_distance: int,
                   allow: bool) -> None:
    """Compare every site with the runs' training data (``site.overlap``); refuse a site
    holding their images unless ``allow``, and warn on stderr about what is let through."""
    try:
        seen = seen_images(runs)
    except BusiError as exc:
        for site in sites:
            site.overlap = {"checked": False, "why": str(exc)}
        print(f"busi: warning: evaluate --data: could not compare the site(s) with the runs' "
              f"training images, so nothing shows they are unseen data ({exc})",
              file=sys.stderr)
        return
    for site in sites:
        site.overlap = training_overlap(site.ds, seen, near_distance)
    hit = [s for s in sites if s.overlap["images"]]
    if hit and not allow:
        mine, theirs = hit[0].overlap["examples"][0]
        raise BusiError(
            "not another site's data: " + "; ".join(f"{s.name}: {_overlap_words(s.overlap)}"
                                                    for s in hit)
            + f" (e.g. {mine} is the training image {theirs}); figures on images a model "
              "was fitted to say nothing of a new hospital",
            where=", ".join(str(s.data) for s in hit),
            fix="evaluate on images the runs never saw (leave these out of the site's "
                "manifest), or pass --allow-overlap to evaluate anyway, the overlap "
                f"stated in the report (compared with {'; '.join(seen.against)})")
    for site in hit:
        print(f"busi: warning: {site.name} is NOT unseen data: {_overlap_words(site.overlap)}"
              "; evaluated because of --allow-overlap, its figures overstate how the models "
              "do on a new hospital", file=sys.stderr)
    for site in sites:
        if site.overlap["shared_patients"]:
            print(f"busi: warning: {site.name}: {_patients_words(site.overlap)}",
                  file=sys.stderr)


def _overlap_words(o: dict) -> str:
    """'9 of its 36 images are training or validation images of the runs (7 with the same
    pixels, 2 near duplicates within pHash distance 6)'."""
    return (f"{o['images']} of its {o['n_site_images']} images are training or validation "
            f"images of the runs ({o['exact_duplicates']} with the same pixels, "
            f"{o['near_duplicates']} near duplicates within pHash distance "
            f"{o['near_duplicate_distance']})")


def _patients_words(o: dict) -> str:
    shown = ", ".join(o["patients"][:5]) + (", ..." if o["shared_patients"] > 5 else "")
    return (f"{o['shared_patients']} of its patient ids ({shown}) are also patients of the "
            "runs' training or validation images; if they name the same people, these scans "
            "are not of new patients (ids of two hospitals can also coincide by chance)")


def _overlap_markdown(o: dict, n_images: int) -> str:
    """A site's line on what the runs have seen of it, for its section of evaluation.md."""
    if not o.get("checked"):
        return (f"**Not checked against the runs' training images** ({o.get('why')}): "
                "nothing shows that these are unseen data.")
    if o["images"]:
        mine, theirs = o["examples"][0]
        text = (f"**Not unseen data: {_overlap_words(o)}**, e.g. `{mine}` is the training "
                f"image `{theirs}`; evaluated because of --allow-overlap.")
    else:
        text = (f"Unseen by the runs: none of its {n_images} images is a training or "
                "validation image of theirs (the same pixels, or pHash within "
                f"{o['near_duplicate_distance']} bits of one)")
        text += "." if o["shared_patients"] else ", and it shares no patient id with them."
    if o["shared_patients"]:
        text += f" {_patients_words(o)}."
    return text + f" Compared with {'; '.join(o['against'])}."


def _classes_in(data: str, model_classes: tuple[str, ...]) -> tuple[str, ...]:
    """The model's classes that a BUSI-layout folder has; a folder of another name is an error."""
    root = Path(data)
    if not root.is_dir():
        return model_classes  # a CSV manifest: labels are checked row by row
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in model_classes]
    if unknown:
        raise BusiError(f"class folder(s) {', '.join(unknown)} are not among the model's classes "
                        f"({', '.join(model_classes)})", where=str(root),
                        fix="rename or remove those folders; the model cannot predict new classes")
    present = tuple(c for c in model_classes if c in folders)
    if not present:
        raise BusiError("no class folder of the model's classes found", where=str(root),
                        fix=f"put images under {', '.join(model_classes)}/ or pass a CSV manifest")
    return present
