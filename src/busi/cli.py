"""``busi`` command line: parse arguments, load the config, call the library.

Kept thin on purpose: every command is a few lines that hand over to the
module that owns the work, so the same work is reachable from Python. A
:class:`~busi.errors.BusiError` anywhere becomes one message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from busi import __version__
from busi.errors import EXIT_USAGE, BusiError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def _add_config_args(p: argparse.ArgumentParser, default: str | None = "paper") -> None:
    # --config's own default is None, so that a --config the user gave can be told from the
    # default (a resumed run refuses one: it keeps its own config); load_cli_config falls
    # back to config_default.
    p.add_argument("--config", "-c", default=None,
                   help="YAML config: a path, or a name in configs/ (paper, cpu, demo); "
                        f"default: {default}")
    p.set_defaults(config_default=default)
    p.add_argument("--data", action="append", metavar="PATH",
                   help="data folder in the BUSI layout, or a CSV manifest (image,mask,label"
                        "[,patient]); repeat it to train on several sources together "
                        "(overrides data.root)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set training.seg.epochs=5 "
                        "(repeatable)")


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option (hidden from --help): still works, with a one-line note."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"busi: note: {option_string} is deprecated; use {self.new} (same meaning)",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


class _Once(argparse.Action):
    """A run flag that names one run: given twice, one clear error instead of argparse's
    silent "last one wins" -- beside repeatable flags (``--seg-run``, ``--data``) a user
    who repeats it expects both runs, and would otherwise get a report of one."""

    def __init__(self, option_strings, dest, *, fix: str, **kwargs):
        self.fix = fix
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        if before is not None and before != values:
            parser.error(f"{option_string} names one run; it was given twice ({before}, "
                         f"{values}). Fix: {self.fix}")
        setattr(namespace, self.dest, values)


def _add_outputs_arg(p: argparse.ArgumentParser, default: str | None = None,
                     aliases: tuple[str, ...] = ()) -> None:
    """``--outputs DIR``: the one name, on every command, for the outputs root -- where runs
    are found and new run folders are made (the same as ``--set outputs.root=DIR``)."""
    p.add_argument("--outputs", metavar="DIR", default=default,
                   help="outputs root: where runs are looked up and new run folders are made "
                        + (f"(default: {default})" if default else
                           "(same as --set outputs.root=DIR; default: the config's)"))
    for old in aliases:
        p.add_argument(old, dest="outputs", action=_DeprecatedAlias, new="--outputs",
                       help=argparse.SUPPRESS)


def _run_name(text: str) -> str:
    """argparse type for ``--name``: a plain name, since it becomes part of a folder name."""
    from busi.runs import RUN_NAME_RE

    if not RUN_NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain name: use letters, digits, '.', '_' and '-' only "
            "(it becomes part of the run folder's name)")
    return text


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """--outputs and --name: where a new training run goes and what it is called."""
    _add_outputs_arg(p)
    p.add_argument("--name", type=_run_name, metavar="NAME",
                   help="name the run: its folder is <timestamp>-NAME (same as --set "
                        "outputs.run_name=NAME)")


def _check_resume_args(args: argparse.Namespace) -> None:
    """A flag given with --resume is honoured or refused, never parsed and dropped.

    --outputs and --name shape a new run; a resumed run keeps its folder and name. --config,
    --data and --model would change what the run trains, which its own config.yaml decides
    (epochs of two different experiments under one run would be neither). --set is
    left to the trainer (``busi.training.loop.resumed_config``), which honours the keys that
    only say how long a run goes on and records them in its config.yaml; a CV's fold runs
    share the CV's config, so ``cv --resume`` takes none (--models and --arm add arms).
    """
    if not args.resume:
        return
    for flag, given in (("--outputs", args.outputs), ("--name", args.name)):
        if given:
            raise BusiError(f"is for a new run; --resume continues {args.resume} in place",
                            where=flag, fix=f"drop {flag}, or start a new run without --resume")
    for flag, given in (("--config", args.config is not None), ("--data", args.data),
                        ("--model", getattr(args, "model", None))):
        if given:
            raise BusiError(f"cannot change a resumed run: {args.resume} keeps the config, "
                            "data and model it started with (its config.yaml)", where=flag,
                            fix=f"drop {flag} to continue the run as it was, or start a new "
                                "run without --resume")
    if args.command == "cv" and args.overrides:
        raise BusiError(f"cannot change a resumed CV: its folds share {args.resume}'s "
                        "config.yaml", where=f"--set {args.overrides[0]}",
                        fix="drop --set to continue the CV as it was; to compare another "
                            "classifier setting on its folds add an arm: --arm "
                            "'NAME: KEY=VALUE ...'")


def _count(text: str) -> int:
    """argparse type for image counts: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def load_cli_config(args: argparse.Namespace):
    """Config from --config, then --set, then --outputs/--name/--data/--model (the most
    specific wins).

    The flags' values go in as (key, value) pairs, never as ``--set`` text: YAML would read
    ``--data "scans #2/BUSI"`` as ``scans``, ``2024-01-01`` as a date and ``on`` as true.
    """
    from busi.config import Override, find_config, load_config

    overrides: list[Override] = list(args.overrides)
    if getattr(args, "outputs", None):  # --outputs and --name: --set spelled as a flag
        overrides.append(("outputs.root", args.outputs))
    if getattr(args, "name", None):
        overrides.append(("outputs.run_name", args.name))
    if getattr(args, "model", None):
        overrides.append(("model.classifier.name", args.model))
    data = getattr(args, "data", None) or []
    if data:  # one source is a string, several a list: data.root's two forms
        overrides.append(("data.root", data[0] if len(data) == 1 else list(data)))
    config = args.config if args.config is not None else getattr(args, "config_default", None)
    path = find_config(config) if config else None
    return load_config(path, overrides)


def _resumed_config(args: argparse.Namespace, kind: str):
    """The config of the run --resume continues: its own, with the --set keys a resume may
    change applied and recorded in its config.yaml (``busi.training.loop.resumed_config``)."""
    from busi.training.loop import resumed_config

    return resumed_config(args.resume, kind, args.overrides, command=args.command)


# --------------------------------------------------------------------------- commands


def cmd_data_check(args: argparse.Namespace) -> int:
    from busi.data.check import check_dataset, format_markdown, format_report

    cfg = load_cli_config(args)
    report = check_dataset(cfg.data.root, tuple(cfg.data.classes),
                           near_distance=cfg.split.near_duplicate_distance,
                           cache_dir=cfg.data.cache_dir, size=tuple(cfg.data.image_size))
    print(format_report(report, limit=10**9 if args.all else 20))
    if args.markdown:
        from busi.runs import atomic_write

        atomic_write(args.markdown, format_markdown(report))
        print(f"Markdown summary written to {args.markdown}")
    if args.strict and report.n_problems:
        print(f"busi: error: {report.n_problems} problem(s) found and --strict is set -- fix: "
              "repair or remove the files listed above", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from busi.data.synth import SynthSpec, write_dataset

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BusiError("output folder exists and is not empty", where=str(out),
                        fix="choose a new --out folder; busi never overwrites data")
    counts = write_dataset(out, SynthSpec(per_class=args.per_class, seed=args.seed))
    print(f"Wrote a synthetic BUSI-layout data set to {out}: "
          + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from busi.data.loading import dataset_from_config
    from busi.data.split import get_manifest, summarise

    cfg = load_cli_config(args)
    ds = dataset_from_config(cfg)
    manifest = get_manifest(ds, cfg.split, cfg.runtime.seed)
    print(f"Split manifest: {manifest.path}")
    if manifest.fold is not None:
        print(f"{manifest.n_folds} folds; fold 0 shown")
    print(summarise(manifest))
    return 0


def cmd_train_seg(args: argparse.Namespace) -> int:
    from busi.training.segmentation import train_segmentation

    _check_resume_args(args)
    cfg = _resumed_config(args, "seg") if args.resume else load_cli_config(args)
    train_segmentation(cfg, resume=args.resume, config_source=args.config)
    return 0


def cmd_train_cls(args: argparse.Namespace) -> int:
    from busi.training.classification import train_classifier

    _check_resume_args(args)
    cfg = _resumed_config(args, "cls") if args.resume else load_cli_config(args)
    train_classifier(cfg, seg_run=args.seg_run, resume=args.resume, config_source=args.config)
    return 0


def _sensitivity(text: str) -> float:
    """``--sensitivity``: a share in (0, 1], or a clear exit 2 (argparse's own message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.9)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g} (e.g. 0.9)")
    return value


def _add_sensitivity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sensitivity", type=_sensitivity, metavar="S",
                   help="the malignant sensitivity the operating point is chosen for, on the "
                        "classifier run's validation images (default: the run's own, "
                        "decision.malignant_sensitivity, 0.9 unless set); at another site the "
                        "threshold chosen on the run's validation images is applied unchanged")


def _add_presence_arg(p: argparse.ArgumentParser) -> None:
    from busi.models.decision import PRESENCE_SCORES

    p.add_argument("--presence", choices=PRESENCE_SCORES,
                   help="how lesion presence is decided: the classifier's argmax, or a score "
                        "(classifier: 1 - p(normal); unet: the U-Net's highest lesion "
                        "probability; both: their mean; head: the U-Net's presence head; "
                        "head_classifier: its mean with 1 - p(normal)) with its threshold chosen "
                        "on the classifier run's validation images to miss at most "
                        "decision.max_missed_lesions of their lesions (default: the run's own "
                        "decision.presence)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from busi.workflows.evaluate import evaluate_command
    from busi.workflows.sites import evaluate_on_data, unets_on_data

    seg_runs = args.seg_run or []
    if args.data:
        if len(seg_runs) > 1 and (args.cls_run or args.runs):
            raise BusiError("with --data and a classifier, one --seg-run segments the images",
                            fix="give --seg-run once (or leave it out for the classifier's own "
                                "U-Net); several U-Nets side by side at a site is `busi evaluate "
                                "--data SITE --seg-run A --seg-run B`, without a classifier")
        if len(seg_runs) > 1:
            unets_on_data(args.data, seg_runs, outputs_root=args.outputs,
                          allow_overlap=args.allow_overlap)
            return 0
        if args.runs:
            raise BusiError("with --data, name the classifier with --cls-run, not as a run folder",
                            fix="busi evaluate " + " ".join(f"--data {d}" for d in args.data)
                                + f" --cls-run {args.runs[0]}")
        evaluate_on_data(args.data, cls_run=args.cls_run,
                         seg_run=seg_runs[0] if seg_runs else None, outputs_root=args.outputs,
                         allow_overlap=args.allow_overlap, sensitivity=args.sensitivity,
                         presence=args.presence)
        return 0
    evaluate_command(runs=args.runs, seg_runs=seg_runs, outputs_root=args.outputs,
                     sensitivity=args.sensitivity, presence=args.presence)
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from busi.workflows.cv import parse_arm, run_cv

    models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
    arms = dict(parse_arm(a) for a in args.arm or [])
    _check_resume_args(args)
    cfg = None if args.resume else load_cli_config(args)
    if args.models is None and cfg is not None and not arms:
        models = (cfg.model.classifier.name,)  # the config's own recipe
    if not models and not arms and not args.resume:
        raise BusiError("no classifier named", where="--models",
                        fix="name one or more, e.g. --models cnn,vgg19,mobilenet, or "
                            "--models none for the U-Nets only")
    models = () if models == ("none",) else models
    run_cv(cfg, folds=args.folds, models=models, resume=args.resume, arms=arms)
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from busi.workflows.rerun import rerun

    rerun(args.run_dir)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from busi.reporting.report import write_run_report

    for run in args.runs:
        html, md = write_run_report(run)
        print(f"report: {html}\n        {md}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from busi.inference.export import export_run, summary

    out = export_run(args.run_dir, args.format, args.quantize, out=args.out,
                     outputs_root=args.outputs)
    print(summary(out))
    print(f"outputs: {out} (export.json has the figures)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from busi.inference.predict import EXIT_SKIPPED, predict_command

    done = predict_command(args.inputs, seg_run=args.seg_run, cls_run=args.cls_run,
                           out=args.out, outputs_root=args.outputs, explain=args.explain,
                           min_confidence=args.min_confidence, sensitivity=args.sensitivity,
                           cv=args.cv, arm=args.arm, presence=args.presence)
    # 3: the readable images were predicted, some others skipped (named, in skipped.csv).
    return EXIT_SKIPPED if getattr(done, "skipped", None) else 0


def cmd_runs(args: argparse.Namespace) -> int:
    from busi.runs import all_runs, describe_run, format_runs

    root = Path(args.outputs)
    if not root.is_dir():
        raise BusiError("outputs folder not found", where=str(root),
                        fix="pass --outputs DIR, the folder your runs were written to")
    runs = all_runs(root)
    if args.kind:
        runs = [(k, r) for k, r in runs if k == args.kind]
    print(format_runs([describe_run(k, r) for k, r in runs], root))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from busi.workflows.demo import run_demo

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in ("cnn", "vgg19", "mobilenet")]
    if unknown or not models:
        raise BusiError(f"unknown demo classifier {', '.join(unknown) or '(none)'}",
                        where="--models", fix="a comma-separated list of cnn, vgg19, mobilenet")
    run_demo(workdir=Path(args.outputs), per_class=args.per_class, overrides=args.overrides,
             models=models)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="busi", formatter_class=fmt,
        description="Breast-ultrasound tumour segmentation (U-Net) and benign/malignant/normal "
                    "classification (CNN, VGG19, MobileNet) on BUSI-layout data.",
        epilog=_examples("""
            busi demo                                   # whole pipeline on synthetic data
            busi data check --data data/Dataset_BUSI_with_GT
            busi train-seg --config configs/cpu.yaml --data data/Dataset_BUSI_with_GT
            busi train-cls --model vgg19 --config configs/cpu.yaml
            busi evaluate
            busi runs                                   # every run, its status and figures
        """))
    parser.add_argument("--version", action="version", version=f"busi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train-seg", help="train the U-Net that segments the tumour",
                       formatter_class=fmt, epilog=_examples("""
            busi train-seg --config configs/paper.yaml --data data/Dataset_BUSI_with_GT
            busi train-seg --config cpu --set training.seg.epochs=5
            busi train-seg --config cpu --outputs runs --name baseline  # runs/seg/<time>-baseline
            busi train-seg --resume outputs/seg/20261124-101500   # continue it
            busi train-seg --resume outputs/seg/20261124-101500 --set training.seg.epochs=150
        """))
    _add_config_args(p)
    _add_training_args(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run with its own config; only --set "
                        "training.seg.epochs (to extend or end it) and the *_patience keys "
                        "may change, recorded in its config.yaml")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("train-cls", help="train a classifier on images masked by the U-Net",
                       formatter_class=fmt, epilog=_examples("""
            busi train-cls --model vgg19 --config configs/cpu.yaml
            busi train-cls --model cnn --seg-run outputs/seg/20261124-101500
            busi train-cls --model cnn --set model.classifier.masks=none   # no-mask baseline
        """))
    _add_config_args(p)
    p.add_argument("--model", choices=["cnn", "vgg19", "mobilenet", "efficientnet_lite0"],
                   help="classifier (overrides model.classifier.name)")
    p.add_argument("--seg-run", metavar="RUN_DIR",
                   help="segmentation run whose predicted masks to use (default: the latest "
                        "finished one)")
    _add_training_args(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run with its own config; only --set "
                        "training.cls.epochs, model.classifier.fine_tune_epochs (to extend "
                        "or end it) and the *_patience keys may change, recorded in its "
                        "config.yaml")
    p.set_defaults(func=cmd_train_cls)

    p = sub.add_parser("evaluate", help="per-class precision/recall/F1 tables of classifier runs "
                                        "(--data: trained runs on another site's images)",
                       formatter_class=fmt, epilog=_examples("""
            busi evaluate                                 # every classifier run of the latest split
            busi evaluate outputs/cls/vgg19/20261124-120000
            busi evaluate --seg-run outputs/seg/20261124-101500
            # two U-Nets side by side on the same test images (e.g. paper.yaml vs cpu.yaml):
            busi evaluate --seg-run outputs/seg/A-paper --seg-run outputs/seg/B-cpu
            # trained models on another hospital's images (BUSI layout, or a CSV manifest
            # image,mask,label[,patient]; 95% intervals resample its patients, not images):
            busi evaluate --data other_site.csv --cls-run outputs/cls/cnn/B   # + its own U-Net
            busi evaluate --data other_site.csv --seg-run outputs/seg/A       # the U-Net only
            # two U-Nets side by side there, paired Dice difference over its patients:
            busi evaluate --data other_site.csv --seg-run outputs/seg/A --seg-run outputs/seg/B
            # several sites side by side, with the run's own test figures as the first row:
            busi evaluate --data site_a.csv --data site_b/ --cls-run outputs/cls/cnn/B
        """))
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="classifier run folders")
    p.add_argument("--seg-run", metavar="RUN_DIR", action="append",
                   help="also report this U-Net's Dice/IoU/HD95 (repeat it: U-Nets side by "
                        "side, each on its own test split); with --data, the U-Net that "
                        "segments the images (default: the classifier's own), and without "
                        "--cls-run the U-Net alone is measured (no classifier; repeated: "
                        "U-Nets side by side at that site)")
    p.add_argument("--data", metavar="PATH", action="append",
                   help="evaluate trained runs on this data (BUSI-layout folder, or CSV manifest "
                        "with columns image,mask,label and optionally patient) instead of their "
                        "own test split; repeat it for several sites, reported side by side in "
                        "one table with the runs' own test figures. Runs: --cls-run -> that "
                        "classifier and its U-Net; "
                        "only --seg-run -> segmentation only; neither -> the newest finished "
                        "classifier. Intervals resample the CSV's patients (without a patient "
                        "column: near-duplicate groups)")
    p.add_argument("--cls-run", metavar="RUN_DIR", action=_Once,
                   fix="run `busi evaluate --data ... --cls-run RUN` once per classifier",
                   help="with --data: the classifier run (default: the newest finished, "
                        "unless --seg-run alone asks for segmentation only); one per command")
    p.add_argument("--allow-overlap", action="store_true",
                   help="with --data: evaluate a site even though some of its images are the "
                        "runs' own training or validation images (same pixels or pHash near "
                        "duplicates; refused without this flag); the report states how many")
    _add_sensitivity_arg(p)
    _add_presence_arg(p)
    _add_outputs_arg(p, "outputs")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("cv", help="k-fold cross-validation of the whole pipeline",
                       formatter_class=fmt, epilog=_examples("""
            busi cv --config configs/cpu.yaml --folds 5 --data data/Dataset_BUSI_with_GT
            busi cv --config cpu --folds 5 --models cnn,vgg19,mobilenet
            busi cv --config cpu --folds 5 --models none     # the U-Nets only
            busi cv --resume outputs/cv/20261125-101500 --models mobilenet  # add an arm
            busi cv --resume outputs/cv/20261125-101500 --arm \\
                'mnet_ch: model.classifier.name=mobilenet model.classifier.mask_mode=channel'
            busi cv --resume outputs/cv/20261125-101500      # continue a killed CV
        """))
    _add_config_args(p)
    p.add_argument("--folds", type=int, default=None,
                   help="number of folds (default 5; a resumed CV keeps its own)")
    p.add_argument("--models", default=None,
                   help="comma-separated classifiers to train per fold (default: the config's "
                        "model.classifier.name, with its settings; "
                        "none: segmentation only); with --resume, classifiers to add to the "
                        "CV, trained on its folds and U-Nets")
    p.add_argument("--arm", action="append", metavar="'NAME: KEY=VALUE ...'",
                   help="a named classifier arm: --set-style overrides of model.classifier.*, "
                        "training.cls.* or augmentation.* (repeatable; trained after --models "
                        "on the same folds and U-Nets)")
    _add_training_args(p)
    p.add_argument("--resume", metavar="CV_DIR",
                   help="continue an interrupted CV run with its own config and folds "
                        "(--models/--arm add arms; --config, --data, --set are refused)")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("runs", help="list runs: kind, model, finished or not, headline "
                                    "figures, data",
                       formatter_class=fmt, epilog=_examples("""
            busi runs                            # everything under outputs/, newest last
            busi runs --outputs outputs/demo --kind cls
        """))
    _add_outputs_arg(p, "outputs")
    p.add_argument("--kind", choices=["seg", "cls", "cv", "eval"], help="only runs of this kind")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", help="write report.html and report.md for run folders",
                       formatter_class=fmt, epilog=_examples("""
            busi report outputs/seg/20261125-101500
            busi report outputs/cls/cnn/20261125-110000 outputs/cv/20261125-120000
        """))
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("rerun", help="run a finished run again from its saved config",
                       formatter_class=fmt, epilog=_examples("""
            busi rerun outputs/seg/20261125-101500     # same config, seed, split and data
        """))
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("export", help="write a deployable model (keras, SavedModel, TFLite)",
                       formatter_class=fmt, epilog=_examples("""
            busi export outputs/cls/mobilenet/20261125-120000 --format tflite
            busi export outputs/cls/mobilenet/20261125-120000 --format tflite --quantize int8
            busi export outputs/seg/20261125-101500 --format savedmodel
        """))
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="tflite", choices=["keras", "savedmodel", "tflite"],
                   help="default: tflite")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="tflite only: full-integer int8, calibrated on 200 training images")
    p.add_argument("--out", metavar="DIR", help="this exact new or empty folder instead "
                                                "(default: <outputs>/export/<timestamp>-...)")
    _add_outputs_arg(p, "outputs")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="mask and class probabilities for new images",
                       formatter_class=fmt, description=(
                           "Mask and class probabilities for new images, each flagged when the "
                           "segmenter found no\nlesion or the call is unsure. busi is a "
                           "research tool, not a diagnostic device.\n\n"
                           "An unreadable image among others is skipped, named on stderr and "
                           "in skipped.csv of the\noutput folder. Exit status: 0 all "
                           "predicted; 3 some skipped, the rest predicted; 2 nothing\n"
                           "predicted (bad arguments, or no input readable) and nothing "
                           "written."), epilog=_examples("""
            busi predict scan1.png scans/ --seg-run outputs/seg/A --cls-run outputs/cls/cnn/B
            busi predict scan1.png --explain        # + Grad-CAM heatmap of the classifier
            busi predict scans/ --min-confidence 0.8  # flag calls under 80%
        """))
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--seg-run", metavar="RUN_DIR", action=_Once,
                   fix="give one U-Net; run `busi predict` once per U-Net to compare them",
                   help="U-Net run (default: the one the classifier was trained with)")
    p.add_argument("--cls-run", metavar="RUN_DIR", action=_Once,
                   fix="give one classifier; run `busi predict` once per classifier",
                   help="classifier run (default: the latest finished)")
    p.add_argument("--out", metavar="DIR", help="this exact new or empty folder instead "
                                                "(default: <outputs>/predict/<timestamp>)")
    _add_outputs_arg(p, "outputs")
    p.add_argument("--explain", action="store_true",
                   help="also write a Grad-CAM heatmap per image (<name>_gradcam.png)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="flag calls whose top class probability is below P (0-1; default: "
                        "the classifier run's predict.min_confidence, 0.6 unless set)")
    _add_sensitivity_arg(p)
    _add_presence_arg(p)
    p.add_argument("--cv", metavar="CV_DIR", nargs="?", const="latest",  # predict.LATEST_CV
                   help="predict with a CV arm's fold models together (a fold ensemble: each "
                        "fold's classifier on its own U-Net's masks, probabilities averaged) "
                        "instead of one classifier run; without CV_DIR the latest finished CV. "
                        "With neither --cv nor --cls-run: a finished one-arm CV if it is newer "
                        "than the latest classifier run")
    p.add_argument("--arm", metavar="NAME", help="with --cv: which arm (needed when it has "
                                                 "several)")
    p.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="inspect, split or synthesise data",
                          formatter_class=fmt, epilog=_examples("""
            busi data check --data data/Dataset_BUSI_with_GT
            busi data split --config paper --data data/Dataset_BUSI_with_GT
            busi data synth --out data/synthetic --per-class 50 --seed 0
        """))
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("check", help="counts, unreadable files, missing masks, duplicates",
                        formatter_class=fmt, epilog=_examples("""
            busi data check --data data/Dataset_BUSI_with_GT
            busi data check --data data/Dataset_BUSI_with_GT --strict --markdown docs/DATA.md
        """))
    _add_config_args(p)
    p.add_argument("--strict", action="store_true", help="exit 2 if any file is unusable")
    p.add_argument("--all", action="store_true", help="list every file, not the first 20")
    p.add_argument("--markdown", metavar="FILE", help="also write a Markdown summary")
    p.set_defaults(func=cmd_data_check)
    p = dsub.add_parser("split", help="write (or show) the split manifest", formatter_class=fmt,
                        epilog=_examples("""
            busi data split --config paper --data data/Dataset_BUSI_with_GT
            busi data split --config paper --set split.scheme=kfold --set split.folds=5
            busi data split --config paper --data data/Dataset_BUSI_with_GT --data my_scans.csv
        """))
    _add_config_args(p)
    p.set_defaults(func=cmd_data_split)
    p = dsub.add_parser("synth", help="write a synthetic BUSI-layout data set",
                        formatter_class=fmt, epilog=_examples("""
            busi data synth --out data/synthetic --per-class 50 --seed 0
        """))
    p.add_argument("--out", required=True, help="new folder to write into")
    p.add_argument("--per-class", type=_count, default=40, help="images per class (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data, in minutes on a CPU",
                       formatter_class=fmt, epilog=_examples("""
            busi demo
            busi demo --outputs outputs/demo --per-class 40
            busi demo --models cnn                      # the U-Net and the paper's CNN only
        """))
    _add_outputs_arg(p, "outputs/demo", aliases=("--workdir",))  # its data and tables too
    p.add_argument("--per-class", type=_count, default=40, help="synthetic images per class")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of configs/demo.yaml")
    p.add_argument("--models", default="cnn,vgg19,mobilenet",
                   help="the classifiers to train (default: the paper's three)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BusiError as exc:
        print(f"busi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("busi: interrupted; completed files are kept and a training run can be continued "
              "with --resume RUN_DIR", file=sys.stderr)
        return 130
    except OSError as exc:
        # The file system said no (no space, no permission, a path that is a folder):
        # the user's to fix, so one line that names the path, like any BusiError.
        where = exc.filename or "file system"
        print(f"busi: error: {where}: {exc.strerror or exc} -- fix: check that the path exists, "
              "is of the right kind (file or folder) and that you may read/write it, and that "
              "the disk has space", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a defect in busi, not in the input: say so, in one line
        if os.environ.get("BUSI_DEBUG"):
            raise
        print(f"busi: internal error: {type(exc).__name__}: {exc} -- this is a bug in busi, "
              "not in your input; rerun with BUSI_DEBUG=1 for the traceback and report it",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
