"""``busi report RUN_DIR``: one self-contained ``report.html`` and a ``report.md`` per run.

A run folder already holds every number and figure (metrics.json, the
classification_report.* files, PNG plots); the report gathers them in one
place, results first: the summary a clinician reads (for a classifier: cancer
sensitivity and specificity with intervals, ROC AUC, each class's recall, lesions
the U-Net missed), the tables and figures, the worst cases (lowest-Dice masks,
wrong classifications with the mask that caused them), training curves, data and
split, and at the end the config and environment. The HTML embeds its
images (base64), so it can be mailed or archived alone; the Markdown links
to the PNGs beside it. Both are views: regenerating them changes no result.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from busi.errors import BusiError
from busi.runs import (
    CONFIG,
    PREDICTIONS,
    SPLIT,
    STATE,
    atomic_write,
    cv_fold_classifier,
    cv_fold_unet,
    read_json,
    read_split,
    run_kind,
)

Block = tuple  # ("h", level, text) | ("md", text) | ("img", path, caption) | ("pre", text)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1em}td,th{border:1px solid #bbb;padding:.25em .6em}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.4em .6em .8em 0;vertical-align:top}
figure img{max-width:520px;border:1px solid #ddd}figure.wide{display:block}
figure.wide img{max-width:100%}figcaption{font-size:.85em;color:#555}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.muted{color:#666;font-size:.9em}
"""


# --------------------------------------------------------------------------- rendering


def _inline(text: str) -> str:
    """Escape, then the two inline marks the project's Markdown uses: `code` and **bold**."""
    import re

    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _md_to_html(text: str) -> str:
    """The Markdown the project writes itself: headings, pipe tables, ``- `` lists,
    paragraphs."""
    out, para, lines = [], [], text.splitlines()

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line.startswith("#"):
            flush()
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # nested under the page's h2
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            i -= 1
            body = [r for r in rows if not all(set(c) <= set(":-") and c for c in r)]
            head, rest = body[0], body[1:]
            cells = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
            for r in rest:
                cells.append("<tr>" + "".join(
                    f'<td class="{"num" if _numeric(c) else "txt"}">{_inline(c)}</td>'
                    for c in r) + "</tr>")
            out.append("<table>" + "".join(cells) + "</table>")
        elif line.startswith("- "):  # a list (a CV's arms), one item per line
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:].strip())}</li>")
                i += 1
            i -= 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    return bool(cell) and cell.replace(".", "").replace("±", "").replace(" ", "").replace(
        "-", "").replace("(", "").replace(")", "").isdigit()


WIDE_PX = 1000  # a figure wider than this (a failure gallery) gets the page's full width


def _png_width(path: Path) -> int:
    """A PNG's width from its header (bytes 16-20), without decoding it; 0 if unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(title: str, blocks: list[Block]) -> str:
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    gallery = False
    for b in blocks:
        if b[0] != "img" and gallery:
            parts.append("</div>")
            gallery = False
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "md":
            parts.append(_md_to_html(b[1]))
        elif b[0] == "pre":
            parts.append(f"<pre>{html.escape(b[1])}</pre>")
        elif b[0] == "img":
            if not gallery:
                parts.append("<div>")
                gallery = True
            wide = ' class="wide"' if _png_width(b[1]) > WIDE_PX else ""
            parts.append(f"<figure{wide}><img src=\"{_data_uri(b[1])}\" "
                         f"alt=\"{html.escape(b[2])}\">"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    if gallery:
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, blocks: list[Block], base: Path) -> str:
    parts = [f"# {title}", ""]
    for b in blocks:
        if b[0] == "h":
            parts += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "md":
            parts += ["\n".join(("##" + ln) if ln.startswith("#") else ln
                                for ln in b[1].splitlines()), ""]
        elif b[0] == "pre":
            parts += ["```", b[1].rstrip(), "```", ""]
        elif b[0] == "img":
            rel = Path(os.path.relpath(b[1], base)).as_posix()
            parts += [f"![{b[2]}]({quote(rel)})", ""]  # names like "benign (1).png"
    return "\n".join(parts)


# --------------------------------------------------------------------------- content


def _json(path: Path) -> dict:
    """A run's JSON file, {} when absent (an unfinished run); corrupt: a BusiError naming it."""
    if not path.is_file():
        return {}
    value = read_json(path, fix="restore the file, or rerun the run")
    if not isinstance(value, dict):
        raise BusiError("expected a JSON object", where=str(path),
                        fix="restore the file, or rerun the run")
    return value


def _config_blocks(run: Path, kind: str = "cv") -> list[Block]:
    """The settings table and the resolved config, for the end of a report. Rows that do
    not bear on the run are left out: the classifier's settings in a U-Net run (``kind``
    "seg"), the U-Net's in a classifier run ("cls": its U-Net run has its own report)."""
    import yaml

    cfg = yaml.safe_load((run / CONFIG).read_text())
    t, u, c = cfg["training"], cfg["model"]["unet"], cfg["model"]["classifier"]
    a, r, sp = cfg["augmentation"], cfg["runtime"], cfg["split"]
    root = cfg["data"]["root"]  # one source, or a list of several
    root = " + ".join(map(str, root)) if isinstance(root, list) else root
    rows = [("data", f"{root} at {cfg['data']['image_size'][0]}x"
                     f"{cfg['data']['image_size'][1]}"),
            ("split", f"{sp['scheme']}, test {sp['test_size']}, val {sp['val_size']}, folds "
                      f"{sp['folds']}, stratify {sp['stratify']}, duplicate groups "
                      f"{sp['group_duplicates']}"),
            ("augmentation", f"{a['engine']}: flip {a['horizontal_flip']}, rotation "
                             f"{a['rotation_range']}, shift {a['width_shift_range']}/"
                             f"{a['height_shift_range']} px, zoom {a['zoom_range']}"),
            ("U-Net", f"base {u['base_filters']}, depth {u['depth']}, dropout "
                      f"{u['encoder_dropout']}/{u['decoder_dropout']}; {t['seg']['loss']}, "
                      f"{t['seg']['optimizer']} lr {t['seg']['learning_rate']}, batch "
                      f"{t['seg']['batch_size']}, {t['seg']['epochs']} epochs"),
            ("classifier", f"{c['name']}, weights {c['weights']}, masks {c['masks']} "
                           f"({c['mask_mode']}), class weights {c['class_weights']}; "
                           f"{t['cls']['optimizer']} lr {t['cls']['learning_rate']}, batch "
                           f"{t['cls']['batch_size']}, {t['cls']['epochs']} epochs"),
            ("runtime", f"seed {r['seed']}, precision {r['precision']}, distribution "
                        f"{r['distribution']}, deterministic {r['deterministic']}")]
    skip = {"seg": {"classifier"}, "cls": {"U-Net"}}.get(kind, set())
    rows = [(k, v) for k, v in rows if k not in skip]
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return [("h", 2, "Config"), ("md", table),
            ("md", "The full resolved config (`config.yaml` in the run folder):"),
            ("pre", (run / CONFIG).read_text())]


def _split_blocks(manifest_path: str, fold: int | None, val_size: float, seed: int) -> list[Block]:
    from busi.data.split import read_manifest

    path = Path(manifest_path)
    if not path.is_file():
        return [("h", 2, "Data and split"), ("md", f"Split manifest {path} is missing.")]
    m = read_manifest(path, val_size, seed)
    cls_of = dict(zip(m.files, m.labels, strict=True))
    names = sorted(set(m.labels))
    lines = ["| part | " + " | ".join(names) + " | total |", "|---|" + "---:|" * (len(names) + 1)]
    parts = m.partition(fold) if (m.fold is None or fold is not None) else None
    if parts is None:  # a CV run: one test fold each
        parts = {f"fold {k}": [f for f, g in zip(m.files, m.fold, strict=True) if g == k]
                 for k in range(m.n_folds)}
    for part, files in parts.items():
        counts = Counter(cls_of[f] for f in files)
        lines.append(f"| {part} | " + " | ".join(str(counts[c]) for c in names)
                     + f" | {len(files)} |")
    sizes = Counter(m.groups.tolist())
    dup = [g for g, n in sizes.items() if n > 1]
    in_dup = sum(sizes[g] for g in dup)
    mixed = sum(1 for g in dup if len({cls_of[f] for f, gg in zip(m.files, m.groups,
                                                                    strict=True) if gg == g}) > 1)
    note = (f"{len(m.files)} images; {len(dup)} duplicate / near-duplicate group(s) holding "
            f"{in_dup} images ({mixed} with more than one class label), each kept on one side "
            f"of every split. Manifest: `{path}`"
            + (f", fold {fold}." if fold is not None else "."))
    return [("h", 2, "Data and split"), ("md", "\n".join(lines)), ("md", note)]


def _environment_blocks(run: Path, state: dict, extra: dict | None = None) -> list[Block]:
    env = dict(state.get("environment", {}))
    rows = {**env, **(extra or {})}
    lines = ["| item | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()]
    blocks: list[Block] = [("h", 2, "Environment and provenance"), ("md", "\n".join(lines))]
    if (run / "command.txt").is_file():
        blocks += [("md", "Command (and how to rerun it):"),
                   ("pre", (run / "command.txt").read_text())]
    return blocks


def _seg_blocks(run: Path, overlays: int = 9, title: str = "Segmentation (U-Net)",
                n_worst: int = 10) -> list[Block]:
    """The U-Net's tables, then its worst test images: the lowest-Dice ones in a table
    (``test_scores.json``) and as overlay panels (worst first)."""
    blocks: list[Block] = [("h", 2, title)]
    if (run / "metrics.md").is_file():
        blocks.append(("md", (run / "metrics.md").read_text()))
    scores = {f: v for f, v in _json(run / "test_scores.json").items() if isinstance(v, dict)}
    lesion = {f: v for f, v in scores.items()  # older runs: no pixel counts, every image
              if v.get("lesion_px", 1) and v.get("dice") is not None}
    ranked = sorted(lesion.items(), key=lambda fv: fv[1]["dice"])[:n_worst]
    if ranked:
        def hd(v: dict) -> str:
            if v.get("hd95") is not None:
                return f"{v['hd95']:.1f}"
            return "missed (empty mask)" if v.get("predicted_px") == 0 else "n/a"

        lines = ["| image | Dice | IoU | HD95 (px) |", "|---|---:|---:|---:|"]
        lines += [f"| `{f}` | {v['dice']:.3f} | {v['iou']:.3f} | {hd(v)} |" for f, v in ranked]
        false = sorted(((f, v["predicted_px"]) for f, v in scores.items()
                        if v.get("lesion_px") == 0 and v.get("predicted_px")),
                       key=lambda fv: -fv[1])
        note = (f" Normal (lesion-free) test images given a mask: {len(false)}"
                + (": " + ", ".join(f"`{f}` ({n} px)" for f, n in false[:5])
                   + (" ..." if len(false) > 5 else "") if false else "") + "."
                if any("lesion_px" in v for v in scores.values()) else "")
        blocks += [("h", 3, "Worst test images"),
                   ("md", f"The {len(ranked)} lesion images of lowest Dice, worst first (all "
                          f"in `test_scores.json`; pixels of the model's input grid).{note} "
                          "Panels: the worst lesion images, then the normal images with the "
                          "largest false masks."), ("md", "\n".join(lines))]
    for png in sorted((run / "overlays").glob("*.png"))[:overlays]:
        blocks.append(("img", png, png.stem))
    return blocks


def _cls_blocks(run: Path, title: str = "Classification", tables: bool = True) -> list[Block]:
    """The classifier's tables (without the summary, which leads the page; none with
    ``tables=False``, where the page has them already), confusion matrix and ROC curves."""
    from busi.evaluation.classification import markdown_table
    from busi.reporting.plots import plot_roc

    blocks: list[Block] = [("h", 2, title)]
    rep = _json(run / "classification_report.json")
    if not tables:
        pass
    elif rep.get("report"):
        blocks.append(("md", markdown_table(rep, rep.get("title", title), summary=False)))
    elif (run / "classification_report.md").is_file():
        blocks.append(("md", (run / "classification_report.md").read_text()))
    roc = run / "roc_curve.png"
    if not roc.is_file() and (run / PREDICTIONS).is_file():
        plot_roc(run / PREDICTIONS, roc, "ROC curves")
    for png, cap in ((run / "confusion_matrix.png", "confusion matrix"), (roc, "ROC curves")):
        if png.is_file():
            blocks.append(("img", png, cap))
    return blocks


def _summary_blocks(rep: dict) -> list[Block]:
    """The clinician's summary of a classification report (the page's lead)."""
    from busi.evaluation.classification import summary_markdown

    return [("md", summary_markdown(rep))] if rep.get("report") else []


def _worst_blocks(run: Path, cam_dirs: list[Path]) -> list[Block]:
    """Wrong classifications and lowest-Dice masks (``per_image.csv``), then the Grad-CAM
    panels: the wrong ones first, each with the mask the classifier was given."""
    from busi.evaluation.classification import PER_IMAGE, read_per_image, worst_cases_markdown
    from busi.reporting.gradcam import panel_name

    rows = read_per_image(run / PER_IMAGE)
    cams = {p.name: p for d in cam_dirs for p in sorted(d.glob("*_gradcam.png"))}
    if not rows and not cams:
        return []
    blocks: list[Block] = [("h", 2, "Worst cases")]
    if rows:
        blocks.append(("md", worst_cases_markdown(rows)))
    wrong = [panel_name(r["file"]) for r in (rows or []) if not r["correct"]]
    shown = [cams[n] for n in wrong if n in cams]
    rest = [p for n, p in cams.items() if p not in shown]
    if cams:
        blocks += [("h", 3, "Grad-CAM"),
                   ("md", "Left: the scan with the ground-truth lesion (green) and the U-Net's "
                          "mask (red); right: the Grad-CAM heatmap of the predicted class over "
                          "the whole, unmasked scan (colour bar: 1 = most weight). Wrong "
                          "predictions first, then a fixed sample of right ones; panels keep "
                          "the scan's aspect ratio.")]
        blocks += [("img", p, p.stem.removesuffix("_gradcam")) for p in shown + rest]
    return blocks


def _loss_blocks(pngs: list[tuple[Path, str]]) -> list[Block]:
    pngs = [(p, c) for p, c in pngs if p.is_file()]
    if not pngs:
        return []
    return [("h", 2, "Loss curves and validation figures"), *[("img", p, c) for p, c in pngs]]


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _unet_minutes(metrics: dict) -> str:
    """A U-Net run's training time: every U-Net it trained, the out-of-fold ones named."""
    oof = metrics.get("train_seconds_out_of_fold") or []
    if not oof:
        return _minutes(metrics.get("train_seconds"))
    return (f"{_minutes(metrics.get('train_seconds'))}, all {len(oof) + 1} U-Nets (final "
            f"{_minutes(metrics.get('train_seconds_final'))}, {len(oof)} out-of-fold "
            f"{_minutes(sum(oof))})")


def build_blocks(run: Path) -> tuple[str, list[Block]]:
    """A run's report: results first, then training curves, data, and config and
    environment at the end."""
    kind = run_kind(run)
    state = _json(run / STATE)
    split = read_split(run) if (run / SPLIT).is_file() else {}
    when = time.strftime("%Y-%m-%d %H:%M")
    if kind == "seg":
        metrics = _json(run / "metrics.json")
        title = f"busi U-Net run {run.name}"
        le = metrics.get("lesion_images", {})

        def px(stat: dict) -> str:  # strict JSON: null when no lesion was detected
            return "n/a" if stat.get("mean") is None else f"{stat['mean']:.1f} px"

        every = (f"{px(le['hd95_all'])} with misses at the image diagonal, "
                 if "hd95_all" in le else "")
        summary = (f"Test Dice {fmt_mean(le['dice'])}, IoU {fmt_mean(le['iou'])}, HD95 "
                   f"{every}{px(le['hd95'])} on the detected lesions "
                   f"(**{le['hd95_undefined']} of {le['dice']['n']} lesion images missed**: "
                   f"empty predicted mask); training {_unet_minutes(metrics)}."
                   if le else "The run has not finished: no metrics yet.")
        cfg = _cfg(run)
        blocks = [("md", f"{summary} Report written {when}; run folder `{run}`."),
                  *_seg_blocks(run),
                  *_loss_blocks([(run / "loss_curve.png", "U-Net training curves")]),
                  *_split_blocks(split.get("manifest", ""), split.get("fold"),
                                 cfg["split"]["val_size"], cfg["runtime"]["seed"]),
                  *_config_blocks(run, "seg"),
                  *_environment_blocks(run, state, {"wall time (training)":
                                                    _unet_minutes(metrics),
                                                    "seed": cfg["runtime"]["seed"],
                                                    "precision": cfg["runtime"]["precision"]})]
        return title, blocks
    if kind == "cls":
        rep = _json(run / "classification_report.json")
        cfg = _cfg(run)
        model = cfg["model"]["classifier"]["name"]
        title = f"busi {model} classifier run {run.name}"
        summary = (f"Test accuracy {rep['accuracy']:.3f} (95% CI {rep['ci95']['accuracy'][0]:.3f}"
                   f"-{rep['ci95']['accuracy'][1]:.3f}), macro-F1 {rep['macro_f1']:.3f} on "
                   f"{rep['n']} images." if rep else "The run has not finished: no report yet.")
        seg = split.get("seg_run")
        blocks = [*_summary_blocks(rep),
                  ("md", f"{summary} Masks from segmentation run `{seg}`. Report written {when}; "
                         f"run folder `{run}`."),
                  *_cls_blocks(run),
                  *_worst_blocks(run, [run / "gradcam"])]
        if seg and (Path(seg) / "metrics.md").is_file():
            blocks += _seg_blocks(Path(seg), overlays=3,
                                  title="Segmentation: the U-Net whose masks it was given",
                                  n_worst=0)
        blocks += _loss_blocks([(run / "loss_curve.png", f"{model} training curves")])
        blocks += _split_blocks(split.get("manifest", ""), split.get("fold"),
                                cfg["split"]["val_size"], cfg["runtime"]["seed"])
        blocks += _config_blocks(run, "cls")
        blocks += _environment_blocks(run, state, {
            "wall time (training)": _minutes(state.get("train_seconds")),
            "seed": cfg["runtime"]["seed"], "precision": cfg["runtime"]["precision"]})
        return title, blocks
    if kind == "cv":
        return _cv_blocks(run, when)
    return _eval_blocks(run, when)


def fmt_mean(stat: dict) -> str:
    """A mean from strict JSON: 'n/a' for null."""
    return "n/a" if stat.get("mean") is None else f"{stat['mean']:.3f}"


def _cfg(run: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load((run / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BusiError(f"cannot read the run's config ({type(exc).__name__})",
                        where=str(run / CONFIG), fix="restore the file") from None
    if not isinstance(cfg, dict):
        raise BusiError("not a run config (expected a YAML mapping)",
                        where=str(run / CONFIG), fix="restore the file")
    return cfg


def _cv_blocks(run: Path, when: str) -> tuple[str, list[Block]]:
    meta = _json(run / "cv.json")
    cfg = _cfg(run)
    title = f"busi {meta['folds']}-fold cross-validation {run.name}"
    blocks: list[Block] = []
    if (run / "cv_results.md").is_file():  # leads with each arm's summary
        blocks.append(("md", (run / "cv_results.md").read_text()))
    else:
        blocks.append(("md", "The CV has not finished: continue it with "
                             f"`busi cv --resume {run}`."))
    blocks.append(("md", f"Report written {when}; run folder `{run}`."))
    # Each fold's own U-Net and, per arm, the classifier trained on it (the runs the CV's
    # tables use): a stray run in a fold folder never lends its curves or figures.
    unets = [cv_fold_unet(run, k, meta)[0] for k in range(meta["folds"])]
    fold_cls = {m: [cv_fold_classifier(run, k, m, unets[k])[0] for k in range(meta["folds"])]
                for m in meta["models"]}
    first = next((u for u in unets if u is not None), None)
    for m in meta["models"]:
        pooled = run / "pooled" / m
        if pooled.is_dir():
            # cv_results.md above holds the pooled tables: the figures only here
            blocks += _cls_blocks(pooled, f"{m}: pooled out-of-fold predictions", tables=False)
            cam_dirs = [r / "gradcam" for r in fold_cls[m] if r is not None]
            worst = _worst_blocks(pooled, cam_dirs)
            if worst:
                worst[0] = ("h", 2, f"{m}: worst cases, all folds")
            blocks += worst
    if first is not None:
        blocks += _seg_blocks(first, overlays=6, title="Segmentation: worst test images (fold 0)")
    curves = [(u / "loss_curve.png", f"fold {k} U-Net") for k, u in enumerate(unets)
              if u is not None]
    for m in meta["models"]:
        curves += [(r / "loss_curve.png", f"fold {k} {m}") for k, r in enumerate(fold_cls[m])
                   if r is not None]
    blocks += _loss_blocks(curves)
    if first is not None:
        sp = read_split(first) if (first / SPLIT).is_file() else {}
        blocks += _split_blocks(sp.get("manifest", ""), None, cfg["split"]["val_size"],
                                cfg["runtime"]["seed"])
    blocks += _config_blocks(run)
    state = _json(first / STATE) if first is not None else {}
    total = 0.0
    for r in [*unets, *(r for runs in fold_cls.values() for r in runs)]:
        if r is not None and (r / STATE).is_file():
            total += _json(r / STATE).get("train_seconds", 0.0)
    blocks += _environment_blocks(run, state, {"wall time (all trainings)": _minutes(total),
                                               "seed": cfg["runtime"]["seed"],
                                               "precision": cfg["runtime"]["precision"]})
    return title, blocks


def _eval_blocks(run: Path, when: str) -> tuple[str, list[Block]]:
    title = f"busi evaluation {run.name}"
    blocks: list[Block] = [("md", f"Report written {when}; folder `{run}`."),
                           ("md", (run / "evaluation.md").read_text())]
    for png in sorted(run.rglob("*.png")):
        # the path, not the stem: U-Nets side by side have one gallery name in each folder
        blocks.append(("img", png, str(png.relative_to(run).with_suffix(""))))
    return title, blocks


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` into the run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise BusiError("run folder not found", where=str(run),
                        fix="pass a folder under outputs/seg/, outputs/cls/<model>/, outputs/cv/ "
                            "or outputs/eval/")
    title, blocks = build_blocks(run)
    html_path = atomic_write(run / "report.html", render_html(title, blocks))
    md_path = atomic_write(run / "report.md", render_markdown(title, blocks, run))
    return html_path, md_path


def report_after_run(run_dir: str | Path) -> Path | None:
    """Write the report at the end of a command; a failure here never fails the run.

    The run's results are already on disk; the report is a view of them, so a
    problem drawing it is a warning that names the command to retry.
    """
    import sys

    try:
        html_path, _ = write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001  -- see docstring
        print(f"busi: warning: report not written ({type(exc).__name__}: {exc}); "
              f"retry with: busi report {run_dir}", file=sys.stderr)
        return None
    print(f"report: {html_path}")
    return html_path
