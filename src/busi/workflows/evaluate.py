"""``busi evaluate``: finished runs on their own test split, side by side, beside the paper's
tables, and U-Nets side by side with their paired Dice difference. Another hospital's data
(``--data``) is :mod:`busi.workflows.sites`.
"""

from __future__ import annotations

import time
from pathlib import Path

from busi.errors import BusiError
from busi.runs import (
    EVAL_DIR,
    PREDICTIONS,
    atomic_write,
    find_classifier_runs,
    new_run_dir,
    read_config,
    read_json,
    read_split,
    require_run,
    write_json,
)


def evaluate_command(runs: list[str] | None = None, seg_runs: list[str] | None = None,
                     outputs_root: str = "outputs", sensitivity: float | None = None,
                     presence: str | None = None) -> Path:
    """``busi evaluate``: finished classifier runs side by side (the newest split's by default),
    into a new ``outputs/eval/<run>/`` -- evaluating never modifies a run's own folder.
    ``seg_runs``: U-Nets whose test figures are reported too, side by side when several; with
    no classifier run named or found, the U-Nets alone."""
    from busi.evaluation.classification import (
        comparison_markdown,
        evaluate_run,
        markdown_table,
        paper_table_markdown,
        summary_markdown,
    )
    from busi.reporting.report import report_after_run

    segs = [require_run(r, "seg", option="--seg-run", needs=("metrics.md",))
            for r in seg_runs or []]
    run_dirs = ([require_run(r, "cls", option="`busi evaluate`", needs=(PREDICTIONS,))
                 for r in runs] if runs else find_classifier_runs(outputs_root,
                                                                  required=not segs))
    said = [f"classifier run(s) {', '.join(map(str, run_dirs))}"] if run_dirs else []
    if segs:
        said.append(f"U-Net run(s) {', '.join(map(str, segs))}")
    print("busi evaluate: " + "; ".join(said))
    results = [evaluate_run(r, sensitivity, presence) for r in run_dirs]
    out = new_run_dir(Path(outputs_root) / EVAL_DIR)
    parts = [f"# Evaluation, {time.strftime('%Y-%m-%d %H:%M')}", "", "## Summary", ""]
    for r in results:  # the clinician's figures of each run first; the tables follow
        parts += [f"### {r['title']}", "", summary_markdown(r)]
    if segs:  # with 95% intervals over duplicate groups; several: side by side
        table = _unets_table(segs)
        title = "U-Nets side by side" if len(segs) > 1 else "U-Net, with 95% intervals"
        print(f"{title}:\n" + "\n".join(table))
        parts += [f"## {title}", "", *table, ""]
    for seg in segs:
        text = (seg / "metrics.md").read_text()
        print(text)
        heading = "## Segmentation" + (f" ({seg.name})" if len(segs) > 1 else "")
        parts += [text.replace("# Segmentation", heading, 1), ""]
    for r in results:
        print(r["text"], end="\n\n")
        parts.append(markdown_table(r, r["title"], summary=False))
    beside = [t for t in (paper_table_markdown(r, d) for r, d in zip(results, run_dirs,
                                                                     strict=True)) if t]
    if beside:  # the paper's own models, row for row against its Tables 1-3
        text = "\n".join(beside)
        print("Beside the paper:\n" + text)
        parts += ["## Beside the paper (its Tables 1-3, on its own 78 test images)", "",
                  "The paper's test images are another draw of 78 from BUSI: a difference "
                  "inside our interval is not a difference.", "", text]
    if results:
        table = comparison_markdown(results, run_dirs)
        print("Side by side:\n" + table)
        parts += ["## Side by side", "", table]
    atomic_write(out / "evaluation.md", "\n".join(parts))
    write_json(out / "evaluation.json",
               [{"run": str(d), **{k: v for k, v in r.items() if k not in ("text",)}}
                for r, d in zip(results, run_dirs, strict=True)])
    each = " (and classification_report.* in each run folder)" if run_dirs else ""
    print(f"reports: {out}/evaluation.md{each}")
    report_after_run(out)
    return out


def unet_said(seg: Path) -> str:
    """A U-Net run's design in a few words, e.g. 'plain encoder, base 64, mse, lr 5e-05'."""
    try:
        cfg = read_config(seg)
    except BusiError:
        return "?"
    u, t = cfg.model.unet, cfg.training.seg
    return f"{u.encoder} encoder, base {u.base_filters}, {t.loss}, lr {t.learning_rate:g}"


def _unets_table(segs: list[Path]) -> list[str]:
    """U-Net runs side by side (:func:`unets_side_by_side`), from their own files; intervals
    resample duplicate groups, each file's from the split manifest of a run that tested it
    (runs of one manifest share its groups; two manifests' group numbers are kept apart).
    A file has a lesion if its ground truth has pixels (``lesion_px``) or, in runs older
    than that field, if it is not labelled normal in the run's split manifest."""
    from busi.data.split import read_manifest
    from busi.evaluation.classification import split_groups
    from busi.evaluation.segmentation import unets_side_by_side

    scores = [read_json(s / "test_scores.json") for s in segs]
    label: dict[str, str] = {}
    for s in segs:
        try:
            m = read_manifest(read_split(s)["manifest"])
            label.update(zip(m.files, m.labels, strict=True))
        except (BusiError, KeyError):
            pass
    lesion = {f: (v["lesion_px"] > 0 if "lesion_px" in v else label.get(f, "normal") != "normal")
              for sc in scores for f, v in sc.items()}
    groups: dict[str, object] = {}
    for s, sc in zip(segs, scores, strict=True):
        files = [f for f in sc if f not in groups]
        found = split_groups(s, files) if files else None
        if found is not None:
            manifest = str(Path(read_split(s)["manifest"]).resolve())
            groups.update((f, f"{manifest}#{g}") for f, g in zip(files, found.tolist(),
                                                                 strict=True))
    return unets_side_by_side([f"{s.name} ({unet_said(s)})" for s in segs],
                              [read_json(s / "metrics.json") for s in segs], scores, lesion,
                              groups or None)
