"""Command line: cilab run | demo (and the commands registered by other modules).

Errors the user can fix (bad config, missing data, a run folder in the way)
print one clear line and exit with status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .aggregate import format_run_table
from .config import ConfigError, build_config, preset_names

EXIT_USAGE = 2


def _user_errors():
    from .data import DatasetError
    from .experiment import RunFolderError
    from .trainer import GraphCaptureError, NonFiniteLossError

    return (ConfigError, DatasetError, RunFolderError, NonFiniteLossError, GraphCaptureError)


# -- cilab run ---------------------------------------------------------------------------


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="run one experiment from a preset",
        description="Run one class-incremental experiment. PRESET is a preset name "
        f"({', '.join(preset_names())}) or a YAML file; key=value pairs override config keys "
        "(e.g. seed=1 train.epochs=30 data.name=digits).",
    )
    p.add_argument("preset", help="preset name or path to a YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last completed task")
    g.add_argument("--overwrite", action="store_true", help="start again: delete the files cilab wrote in the run folder (your other files stay)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-task accuracy lines")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from .experiment import run

    cfg = build_config(args.preset, args.overrides)
    try:
        metrics = run(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                      meta={"preset": args.preset, "overrides": list(args.overrides)})
    except KeyboardInterrupt:
        from . import results

        # Ctrl-C: the experiment has already saved what is complete (and marked
        # metrics.json 'interrupted'); say how far it got and how to go on.
        last = results.last_checkpoint(args.out) if args.out.is_dir() else None
        done = f"{last[0] + 1} completed task(s) are saved in {args.out}" if last else "no task was completed yet"
        return _interrupted(done, ["run", args.preset, *args.overrides, "--out", str(args.out), "--resume"])
    print(format_run_table({args.out.name: metrics}))
    print(f"results in {args.out}")
    return 0


def _interrupted(done: str, argv: list[str]) -> int:
    """After a Ctrl-C: what is saved, and the cilab command (``argv``) that goes on from there."""
    print(f"\ninterrupted; {done}. Continue with:\n  cilab {' '.join(map(shlex.quote, argv))}", file=sys.stderr)
    return 130


# -- cilab demo --------------------------------------------------------------------------

# The demo's settings: the bundled digits (10 classes, 5 tasks of 2), a memory that
# fits that small set, and a schedule sized for it (README, "Why the FC head
# missed the newest classes on digits" and "Results"): lr 0.2, because the study's
# BCE is a mean over the outputs and digits has 10 of them where CIFAR-100 has 100,
# so lr 0.2 takes the study's step size; batch 16, so that a task of ~290 images
# gets ~70 SGD steps in 4 epochs; ResNet-20 (the study's ResNet-32 with 3 blocks a
# stage instead of 5) so that the four runs take about two minutes on two cores.
# Everything else is the study's.
DEMO_OVERRIDES = [
    "data.name=digits", "scenario.num_tasks=5", "model.name=resnet20", "train.epochs=4", "train.milestones=[3]",
    "train.batch_size=16", "train.lr=0.2",
]
DEMO_METHODS = {"finetune": [], "joint": [], "lwf": [], "icarl": ["memory.size=100"]}


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="fine-tuning, joint, LwF and iCaRL on the bundled digits",
        description="Run fine-tuning, joint, LwF and iCaRL (the study's figure 1) on scikit-learn's digits "
        "(8x8 upsampled to 32x32; 5 tasks of 2 "
        f"classes) with {' '.join(DEMO_OVERRIDES)}, print the accuracy table and draw demo.png.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the run folders (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every run")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-task accuracy lines")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the folders that hold another run (other settings); without it they are refused. "
                        "The demo's own runs are kept, and one cut short goes on")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from . import results
    from .experiment import run
    from .plots import plot_comparison

    start = time.perf_counter()
    plans = []
    for method, extra in DEMO_METHODS.items():  # every run's config and folder checked before any trains
        overrides = DEMO_OVERRIDES + extra + list(args.overrides)
        cfg = build_config(method, overrides)
        plans.append((method, overrides, cfg, _demo_folder_holds_another(args.out / method, cfg, args.overwrite)))
    runs = {}
    try:
        for method, overrides, cfg, another in plans:
            folder = args.out / method
            if not another and results.is_complete(folder) and results.read_metrics(folder).get("overrides") == overrides:
                runs[method] = results.read_metrics(folder)  # already done: a second `make demo` is instant
                continue
            print(f"== {method}")
            # the demo's own run cut short goes on where it stopped; another run's folder (--overwrite) is cleared
            runs[method] = run(cfg, folder, resume=not another, overwrite=another, progress=not args.quiet,
                               meta={"preset": method, "overrides": overrides})
    except KeyboardInterrupt:
        return _interrupted(f"the completed tasks are saved in {args.out}",
                            ["demo", "--out", str(args.out), *args.overrides, *(["--overwrite"] if args.overwrite else [])])
    plot = plot_comparison(runs, args.out / "demo.png", "cilab demo: digits, 5 tasks of 2 classes")
    print()
    print(format_run_table(runs))
    print(f"\nrun folders and plot in {args.out} ({plot.name}); {time.perf_counter() - start:.0f}s")
    return 0


def _demo_folder_holds_another(folder: Path, cfg, overwrite: bool) -> bool:
    """Whether ``folder`` holds another run than the demo's ``cfg`` (a demo with other settings, a run
    put there), which --overwrite replaces; without it, refused before any run trains. The demo's
    own run there is kept, or resumed."""
    from . import runfolder

    conflict = runfolder.is_run_folder(folder) and runfolder.config_conflict(folder, cfg)
    if conflict and not overwrite:
        raise runfolder.RunFolderError(f"{folder} holds another run than the demo's ({conflict}); pass "
                                       "--overwrite to replace it, or choose another --out")
    runfolder.check(folder, cfg, resume=not conflict, overwrite=bool(conflict))  # not a run folder, in use, ...
    return bool(conflict)


# -- entry point -------------------------------------------------------------------------

PARSERS = [add_run_parser, add_demo_parser]
# Modules that add a command through an ``add_parser(sub)`` function.
COMMAND_MODULES = ["reproduce", "report", "reevaluate", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cilab", description="Class-incremental learning: fine-tuning, joint, LwF, iCaRL and the study's ablations."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    import importlib

    for name in COMMAND_MODULES:  # imported here, not at the top: `cilab run` need not load them
        importlib.import_module(f"cilab.{name}").add_parser(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the command ``args`` came from (``cilab bench protocol``'s, not ``cilab``'s): its
    usage line is the one that helps."""
    while True:
        chosen = [a.choices[getattr(args, a.dest)] for a in parser._actions
                  if isinstance(a, argparse._SubParsersAction) and getattr(args, a.dest, None) in a.choices]
        if not chosen:
            return parser
        parser = chosen[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (argparse stops a
    # positional list at the first option), so collect the leftovers here.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        command = _command_parser(parser, args)
        command.error(f"unrecognized arguments: {' '.join(stray)} (`{command.prog} --help` lists the options"
                      + ("; config overrides are key=value)" if hasattr(args, "overrides") else ")"))
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"cilab: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
