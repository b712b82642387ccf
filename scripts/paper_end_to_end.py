"""The paper's pipeline end to end, resumable: README "The paper's configuration, end to end".

    python scripts/paper_end_to_end.py --data D [--config paper_bce_dice]
        [--site bus-uclm-dev/manifest.csv] [--outputs outputs] [--precision auto]
        [--mobilenet-weights F] [--effnet-weights F] [--set KEY=VALUE] [--no-cpu] [--dry-run]

The stages, in this order, each a plain ``busi`` command (printed before it runs):

1. the config's U-Net (the paper's: 31.0 M parameters, 100 epochs), run name the config's
   (``paper_bce_dice``; ``paper`` for the paper as printed);
2. ``configs/cpu.yaml``'s U-Net on the same split, run name ``cpu`` (``--no-cpu`` leaves
   it and its classifier out);
3. ``busi evaluate``: the U-Nets alone, at a second site (``--site``) and side by side on
   BUSI's test split (paired Dice): minutes, so they come before the classifiers' hours;
4. the paper's MobileNet (the ImageNet file) and CNN (150 epochs) on the first U-Net's
   masks, and cpu.yaml's classifier on its U-Net's;
5. ``busi evaluate``: the classifiers and both U-Nets on BUSI's test split, beside the
   paper's Tables 1-3;
6. VGG19 from scratch (no ImageNet VGG19 file exists offline; hours on 2 cores, so last),
   then ``busi evaluate`` again with it.

Why a script: the chain is about 8 h on 2 CPU cores, longer than a working session, and
a machine can be stopped half-way. Run the same command again: a stage whose run
finished is kept, one whose run stopped is continued with ``--resume`` (it keeps its own
config), the rest start. Stages are found by run name under ``--outputs``, so keep one
chain per outputs root. An evaluation makes a new folder each time it runs (never
overwriting one), so a finished chain run again only evaluates again.

``--precision auto`` (the default) trains in bfloat16 where the CPU or GPU computes it
natively, else in float32; the paper's configs pin float32, which on a CPU with
AVX512_BF16 is 1.8-3.6x slower (docs/PERFORMANCE.md). ``--precision float32`` keeps them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from busi.config import find_config, load_config
from busi.errors import EXIT_USAGE, BusiError
from busi.runs import is_finished, list_runs

CPU = "cpu"


@dataclass
class Stage:
    """One training run of the chain: where its run folder lives and how to start it."""

    kind: str                      # "seg" | "cls"
    name: str                      # the run name: its folder is <timestamp>-<name>
    config: str
    model: str | None = None       # classifiers: the family (its folder under cls/)
    seg: Stage | None = None       # classifiers: the U-Net whose masks they train on
    sets: list[str] = field(default_factory=list)

    def parent(self, outputs: Path) -> Path:
        return outputs / "seg" if self.kind == "seg" else outputs / "cls" / str(self.model)

    def run(self, outputs: Path) -> Path | None:
        """The newest run of this stage under ``outputs`` (finished or not), if any."""
        mine = re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(self.name)}(-\d+)?")  # runs.new_run_dir
        runs = [r for r in list_runs(self.parent(outputs)) if mine.fullmatch(r.name)]
        return runs[-1] if runs else None

    def finished(self, outputs: Path) -> bool:
        run = self.run(outputs)
        return run is not None and is_finished(run)

    def command(self, outputs: Path, data: str) -> list[str]:
        """What to run now: nothing if finished, ``--resume`` if stopped, else a new run."""
        run = self.run(outputs)
        verb = "train-seg" if self.kind == "seg" else "train-cls"
        if run is not None and is_finished(run):
            return []
        if run is not None:
            return ["busi", verb, "--resume", str(run)]
        cmd = ["busi", verb, "--config", self.config, "--data", data, "--outputs", str(outputs),
               "--name", self.name]
        if self.model:
            cmd += ["--model", self.model]
        if self.seg is not None:
            cmd += ["--seg-run", _run_or_placeholder(self.seg, outputs)]
        for s in self.sets:
            cmd += ["--set", s]
        return cmd


def _run_or_placeholder(stage: Stage, outputs: Path) -> str:
    run = stage.run(outputs)
    what = f"{stage.name} U-Net" if stage.kind == "seg" else f"{stage.name} {stage.model}"
    return str(run) if run is not None else f"<the {what} run>"


def build_stages(args: argparse.Namespace) -> dict[str, Stage]:
    """The chain's training runs, keyed by what they are, in the order they run."""
    every_run = [f"runtime.precision={args.precision}", *args.set]  # new runs only
    name = Path(args.config).stem  # paper_bce_dice, or paper: both can share an outputs root
    useg = Stage("seg", name, args.config, sets=every_run)
    stages = {
        "unet": useg,
        "mobilenet": Stage("cls", name, args.config, "mobilenet", useg,
                           every_run + [f"model.classifier.weights={args.mobilenet_weights}"]),
        "cnn": Stage("cls", name, args.config, "cnn", useg, every_run),
    }
    if args.cpu:
        cpu_config = str(find_config(CPU))
        cseg = Stage("seg", CPU, cpu_config,
                     sets=every_run + [f"model.unet.encoder_weights={args.mobilenet_weights}"])
        family = load_config(cpu_config).model.classifier.name
        stages["cpu_unet"] = cseg
        stages["cpu_classifier"] = Stage(
            "cls", CPU, cpu_config, family, cseg,
            every_run + [f"model.classifier.weights={args.effnet_weights}"])
    stages["vgg19"] = Stage("cls", name, args.config, "vgg19", useg,
                            every_run + ["model.classifier.weights=none"])
    return stages


def evaluate_commands(stages: dict[str, Stage], args: argparse.Namespace,
                      classifiers: list[str], *, site: bool) -> list[list[str]]:
    """``busi evaluate`` at the second site (U-Nets alone), then on BUSI's test split.

    With no ``classifiers``, ``busi evaluate`` finds none yet (``plan`` asks for this only
    before any classifier has finished), so the BUSI evaluation is the U-Nets alone.
    """
    out = args.outputs
    segs = [x for k in ("unet", "cpu_unet") if k in stages
            for x in ("--seg-run", _run_or_placeholder(stages[k], out))]
    cmds = []
    if site and args.site:
        cmds.append(["busi", "evaluate", "--outputs", str(out), "--data", args.site, *segs])
    runs = [_run_or_placeholder(stages[k], out) for k in classifiers]
    cmds.append(["busi", "evaluate", "--outputs", str(out), *runs, *segs])
    return cmds


def check_inputs(args: argparse.Namespace) -> None:
    """Every file the chain will read, checked before the hours of its first stage.

    The ImageNet files are read by the second and fourth stages: without this, a
    mistyped path would surface hours into the run.
    """
    load_config(find_config(args.config))  # a bad config or key: BusiError naming it
    files = [(args.data, "--data", "the BUSI folder (benign/ malignant/ normal/)")]
    files.append((args.mobilenet_weights, "--mobilenet-weights",
                  "the Keras MobileNet v1 ImageNet file (README 'Pretrained weights')"))
    if args.cpu:
        files.append((args.effnet_weights, "--effnet-weights",
                      "the EfficientNet-Lite0 ImageNet file (README 'Pretrained weights'), "
                      "or --no-cpu"))
    if args.site:
        files.append((args.site, "--site", "a CSV manifest (image,mask,label[,patient]) or folder"))
    for path, flag, what in files:
        if path not in ("imagenet", "none") and not Path(path).exists():
            raise BusiError(f"{path} does not exist", where=flag, fix=f"pass {what}")


Step = tuple[list[str], Stage | None]  # a command, and the training stage it runs (if one)


def plan(args: argparse.Namespace) -> list[Step]:
    """Every command still to run, in order, as the outputs root stands now.

    A dry run prints this; the real run plans again after each stage, because a
    stage's command names the run folder the stage before it made.
    """
    stages = build_stages(args)
    out = args.outputs
    segs = [k for k in ("unet", "cpu_unet") if k in stages]
    classifiers = [k for k in stages if k not in segs and k != "vgg19"]

    def train(keys: list[str]) -> list[Step]:
        return [(c, stages[k]) for k in keys if (c := stages[k].command(out, args.data))]

    steps = train(segs)
    site = True  # the second site's evaluation goes with the first evaluation planned
    if not any(stages[k].finished(out) for k in [*classifiers, "vgg19"]):
        # the U-Nets' comparisons take minutes: have them before the classifiers' hours
        steps += [(c, None) for c in evaluate_commands(stages, args, [], site=True)]
        site = False
    steps += train(classifiers)
    vgg = stages["vgg19"].command(out, args.data)
    if vgg:  # VGG19 takes hours: evaluate the others first
        steps += [(c, None) for c in evaluate_commands(stages, args, classifiers, site=site)]
        steps.append((vgg, stages["vgg19"]))
        site = False
    steps += [(c, None) for c in
              evaluate_commands(stages, args, [*classifiers, "vgg19"], site=site)]
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="BUSI in its published layout")
    p.add_argument("--config", default="paper_bce_dice",
                   help="the paper's config, a path or a name in configs/ "
                        "(default: paper_bce_dice; paper for the paper as printed)")
    p.add_argument("--site", help="a second site's images (CSV manifest or BUSI-layout folder): "
                                  "the U-Nets are measured there")
    p.add_argument("--outputs", type=Path, default=Path("outputs"), help="outputs root")
    p.add_argument("--precision", default="auto",
                   help="runtime.precision of new runs (default auto; the configs say float32)")
    p.add_argument("--mobilenet-weights", default="data/weights/mobilenet_1_0_notop.weights.h5",
                   help="Keras MobileNet v1 ImageNet file: the paper's MobileNet classifier "
                        "and cpu.yaml's U-Net encoder (README 'Pretrained weights')")
    p.add_argument("--effnet-weights", default="data/weights/efficientnet_lite0_notop.npz",
                   help="EfficientNet-Lite0 ImageNet file: cpu.yaml's classifier")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every new run, e.g. augmentation.engine=layers "
                        "where TensorFlow is not installed (repeatable)")
    p.add_argument("--no-cpu", dest="cpu", action="store_false",
                   help="leave out configs/cpu.yaml's U-Net and classifier")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run")
    args = p.parse_args(argv)
    try:
        check_inputs(args)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c, _ in plan(args)))
            return 0
        done: list[list[str]] = []  # an evaluation never "finishes": run each once
        while todo := [(c, st) for c, st in plan(args) if c not in done]:
            cmd, stage = todo[0]
            print(f"+ {shlex.join(cmd)}", flush=True)
            # this interpreter's busi, whether or not its venv is on PATH
            rc = subprocess.run([sys.executable, "-m", "busi.cli", *cmd[1:]]).returncode
            if rc != 0:
                print(f"stopped: that stage exited {rc}; run this script again to continue",
                      file=sys.stderr)
                return rc
            run = stage.run(args.outputs) if stage is not None else None
            if stage is not None and not (run is not None and is_finished(run)):
                print(f"stopped: {shlex.join(cmd)} exited 0 but its run did not finish",
                      file=sys.stderr)
                return 1
            done.append(cmd)
    except BusiError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
