"""``cilab reproduce GROUP --out DIR [key=value ...]``: the study's experiments, a group at a time or all at once.

A group (presets/groups.yaml) lists runs: a preset, its seeds, optional
overrides of its own and a tag. Each run goes to ``DIR/GROUP/<preset>[-<tag>]-s<seed>``.
Several groups (``all``, or names joined by commas) are planned and run as one pool
(:func:`plan_study`): a run that groups share trains once and is copied to the others.

The order of work:

1. plan (studyplan.py): every run's config is built and validated, the datasets are loaded
   once and the scenarios checked, and every run folder inspected, before any
   training starts; a bad override, a missing preset or a folder holding a
   different experiment stops everything with one clear message;
2. run: each run is one call of :func:`run_one` (finished runs are skipped,
   interrupted or failed ones resumed from their last completed task); a run
   that fails is reported and the others go on. An executor decides where the
   calls happen: here one after another (``--jobs 1``), in N processes of this
   machine sharing its GPUs (``--jobs N``), or as tasks of a Ray cluster
   (``--executor ray``), see :mod:`cilab.executors`; everything else is the same code for all three;
3. report: ``cilab report`` on the group's run folders, into ``DIR/GROUP/report``,
   and a table of average incremental and final accuracy per variant and classifier.

Running the same command again therefore continues where it stopped.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from . import experiment, results, runfolder
from .checkpoint_figures import FigureCache
from .config import ConfigError
from .executors import EXECUTORS, LocalExecutor, cpu_count, make_executor
from .reevaluate import evaluate_run
from .runspec import RunResult, RunSpec
from .studyplan import (GROUPS_FILE, check_datasets, check_out, describe_groups, group_names, load_groups,
                        longest_first, parse_seeds, plan_study, trained_here)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


# -- running -------------------------------------------------------------------------------


def dropped_notes(specs: list[RunSpec]) -> list[str]:
    """One line per override left out of some runs, naming them."""
    by: dict[tuple[str, str], list[str]] = {}
    for s in specs:
        for o, why in s.dropped:
            by.setdefault((o, why.split(" ", 2)[-1]), []).append(s.name)
    return [f"{o} not applied to {', '.join(names)}: their method {why}" for (o, why), names in by.items()]


def run_one(spec: RunSpec, *, progress: bool = True, position: int = 1,
            log: Callable[[str], None] | None = None) -> RunResult:
    """Run (or skip, or resume) one planned run; never raises except on KeyboardInterrupt.

    Self-contained on purpose: a parallel executor can call it from a worker
    with its own ``position`` for the progress bar.
    """
    if spec.action == "skip":
        return RunResult(spec, "skipped", metrics=results.read_metrics(spec.folder))
    start = time.perf_counter()
    if spec.action == "copy":  # its twin has run (run_all calls this after the twin's result)
        try:
            runfolder.copy_run(spec.source.folder, spec.folder, planned_for=None if spec.replaces else spec.cfg)
            return RunResult(spec, "copied", time.perf_counter() - start, metrics=results.read_metrics(spec.folder))
        except (OSError, ValueError, results.RunFolderError) as e:
            return RunResult(spec, "failed", time.perf_counter() - start,
                             f"could not copy {spec.source.folder}: {type(e).__name__}: {e}")
    if spec.action == "evaluate":  # its trainer has run (run_all calls this after the trainer's result)
        try:
            # The plan found the folder new, half-done (made again) or to be replaced (--overwrite);
            # a run there now that it did not see was written since, and is kept.
            metrics = evaluate_run(spec.cfg, spec.source.folder, spec.folder, overwrite=True, log=log,
                                   meta={"preset": spec.preset, "overrides": list(spec.overrides)},
                                   planned_for=None if spec.replaces else spec.cfg)
            return RunResult(spec, "evaluated", time.perf_counter() - start, metrics=metrics)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - as a failing run: the others go on
            return RunResult(spec, "failed", time.perf_counter() - start,
                             f"could not evaluate {spec.source.folder}: {type(e).__name__}: {e}")
    try:
        metrics = experiment.run(  # looked up at call time: tests may replace it
            spec.cfg, spec.folder, resume=spec.action == "resume", overwrite=spec.action == "overwrite",
            progress=progress, position=position, meta={"preset": spec.preset, "overrides": list(spec.overrides)},
            log=log)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one failing run must not stop the group
        return RunResult(spec, "failed", time.perf_counter() - start, f"{type(e).__name__}: {e}")
    return RunResult(spec, "resumed" if spec.action == "resume" else "done", time.perf_counter() - start,
                     metrics=metrics)


def _result_line(res: RunResult, i: int, n: int, name: Callable[[RunSpec], str]) -> str:
    s = res.spec
    head = f"[{i}/{n}] {name(s)}: "
    if res.failed:
        return head + f"FAILED after {res.seconds:.0f}s: {res.error}"
    m = res.metrics or {}
    accs = "  ".join(f"{c} avg {m[c]['average_incremental_accuracy']:.1f}% final {m[c]['final_accuracy']:.1f}%"
                     for c in m.get("classifiers", []) if c in m)
    source = s.source.label if s.source else "?"
    what = {"skipped": "already complete, skipped", "copied": f"copied from {source}",
            "evaluated": f"evaluated from {source}'s checkpoints in {res.seconds:.0f}s"}.get(
                res.status, f"{res.status} in {res.seconds:.0f}s")
    return head + f"{what}  {accs}"


def run_all(specs: list[RunSpec], *, executor=None, progress: bool = True,
            log: Callable[[str], None] | None = None) -> list[RunResult]:
    """Every run of ``specs`` through ``executor`` (default: here, one after another); results in plan order.

    One overall bar counts the runs finished and shows those running and the
    failures; a run in this process also draws its own bar beneath it, but
    runs in parallel do not (their bars would fight over the terminal).
    """
    from tqdm.auto import tqdm

    executor = executor or LocalExecutor()
    log = log or (lambda msg: tqdm.write(msg))
    work = functools.partial(run_one, progress=progress and executor.in_process, position=1)
    groups = list(dict.fromkeys(s.group for s in specs))
    name = (lambda s: s.name) if len(groups) == 1 else (lambda s: s.label)  # run names repeat across groups
    done: dict[Path, RunResult] = {}  # by folder
    running: list[str] = []
    # a run's folder -> the runs that copy it or evaluate its checkpoints, once it is over
    copies: dict[Path, list[RunSpec]] = {}
    for s in specs:
        if s.action in ("copy", "evaluate"):
            copies.setdefault(s.source.folder, []).append(s)
    todo = [s for s in specs if s.action not in ("skip", "copy", "evaluate")]
    if todo and not executor.in_process:
        todo = longest_first(todo)  # runs at once: the long ones must not be left for last
    with tqdm(total=len(specs), desc=groups[0] if len(groups) == 1 else "study", unit="run", position=0,
              disable=not progress, dynamic_ncols=True) as bar:
        def finished(res: RunResult) -> None:
            done[res.spec.folder] = res
            bar.update(1)
            log(_result_line(res, len(done), len(specs), name))
            for twin in copies.pop(res.spec.folder, []):
                verb = "copied" if twin.action == "copy" else "evaluated"
                if res.failed:
                    finished(RunResult(twin, "failed", error=f"not {verb}: {res.spec.label} failed"))
                elif twin.action == "copy":
                    finished(run_one(twin, log=log))  # file work: here, at once
                else:  # the executor's: its GPU and threads, not this process's
                    todo.append(twin)

        for spec in specs:  # complete runs are read here: no worker, no cluster needed for them
            if spec.action == "skip":
                finished(run_one(spec))
        if todo:
            with contextlib.closing(executor(todo, work)) as events:
                for kind, item in events:
                    if kind == "start":
                        running.append(name(item))
                    else:
                        running.remove(name(item.spec))
                        finished(item)
                    failed = sum(r.failed for r in done.values())
                    bar.set_postfix_str("; ".join(
                        ([f"{executor.active} {len(running)}: {', '.join(running)}"] if running else [])
                        + ([f"failed {failed}"] if failed else [])))
    # the plan's own spec objects: a worker sends back a copy
    return [replace(done[s.folder], spec=s) for s in specs]


def report_group(specs: list[RunSpec], out: Path, *, draw_tsne: bool = True, log=print,
                 cache: FigureCache | None = None, tsne_workers: int = 1):
    """The group's report: confusion matrices and t-SNE rows for the first seed of each variant
    (``cache``: datasets and embeddings shared with the other groups' reports; ``tsne_workers``: see :func:`cilab.report.make_report`)."""
    from .report import make_report

    folders = [s.folder for s in specs if s.folder.exists() and any(s.folder.iterdir())]
    first = {}
    for s in specs:
        if results.is_complete(s.folder):
            first.setdefault(s.variant, s.name)
    title = f"{specs[0].group} on {specs[0].cfg.data.name}"
    return make_report(folders, out, title=title, confusion=list(first.values()) or None,
                       tsne=list(first.values()) or None, draw_tsne=draw_tsne, log=log,
                       labels={s.name: s.variant for s in specs}, cache=cache, tsne_workers=tsne_workers)


def reproduce(group: str | list[str], out: str | Path, overrides: list[str] | None = None, *,
              groups: dict | None = None, seeds: list[int] | None = None, overwrite: bool = False,
              progress: bool = True, report: bool = True, draw_tsne: bool = True, log: Callable[[str], None] = print,
              tsne_workers: int = 1, executor: str = "local", **executor_options) -> tuple[list[RunResult], object]:
    """Plan, run and report one group, several (a list, or names joined by commas) or ``"all"``;
    returns the run results and the report (several groups: a dict group -> report; None where
    none was written).

    Several groups are one plan and one pool of runs (:func:`plan_study`): a run two groups share
    trains once, and with runs at once the longest start first. Each group gets its own report.
    ``executor`` and its options (``jobs``, ``threads``; for Ray ``address``,
    ``gpus_per_run``, ``cpus_per_run``) choose where the runs happen; ``tsne_workers`` the processes
    of the reports' t-SNE (:func:`cilab.report.make_report`; the command line: one a core).
    """
    groups = load_groups() if groups is None else groups
    names = group_names(group, groups) if isinstance(group, str) else list(dict.fromkeys(group))
    runner = make_executor(executor, **executor_options)  # a bad option or a missing Ray stops us before the plan
    check_out(Path(out))  # by looking; then by trying: permissions, a read-only mount. Before the data loads.
    runfolder.check_writable(Path(out))
    specs = plan_study(names, out, overrides, groups=groups, seeds=seeds, overwrite=overwrite)
    todo = [s for s in specs if s.action not in ("skip", "copy")]  # what the executor will run
    advice = getattr(runner, "notes", None)  # optional in the executor contract
    for line in [*dropped_notes(specs), *(advice(todo) if advice and todo else [])]:
        log(f"note: {line}")
    for name in names:
        mine = [s for s in specs if s.group == name]
        copied, evaluated = (sum(s.action == a for s in mine) for a in ("copy", "evaluate"))
        log(f"group {name}: {len(mine)} run{'s' * (len(mine) != 1)} into {Path(out) / name} "
            f"({sum(s.action == 'skip' for s in mine)} already complete"
            + (f", {copied} copied from an identical run of another group" if copied else "")
            + (f", {evaluated} evaluated from the checkpoints of a run that trains alike" if evaluated else "") + ")")
    res = run_all(specs, executor=runner, progress=progress)
    # one dataset loaded, and one network's t-SNE fitted, once for every group's report
    reports, cache = {}, FigureCache()
    for name in names if report else []:
        where = Path(out) / name
        try:
            reports[name] = report_group([s for s in specs if s.group == name], where / "report",
                                         draw_tsne=draw_tsne, log=log, cache=cache,
                                         tsne_workers=tsne_workers)
        except Exception as e:  # noqa: BLE001 - the runs are done and saved; say why the report is missing
            log(f"could not write the report of {name}: {type(e).__name__}: {e}; run `cilab report {where} "
                f"--out {where / 'report'}` to retry")
    if len(names) == 1:
        return res, reports.get(names[0])
    return res, reports or None


# -- command line ------------------------------------------------------------------------


def add_parser(sub) -> None:
    import argparse

    try:
        listing = describe_groups(load_groups())
    except ConfigError as e:
        listing = f"  (cannot read the groups: {e})"
    p = sub.add_parser(
        "reproduce", help="run a group of the study's experiments and report them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every run of GROUP into DIR/GROUP/<preset>[-<tag>]-s<seed>, then write the group's report "
        "(report.md, summary.csv, figures) into DIR/GROUP/report and print average incremental and final "
        "accuracy per variant and classifier.\n\n"
        "All configs are built and validated, the data loaded and the run folders inspected before any run "
        "starts. Complete runs with the same config are skipped and interrupted or failed ones resumed from "
        "their last completed task, so the same command continues an interrupted reproduction. A run that "
        "fails is reported and the others go on; the exit status is then 1.\n\n"
        "--jobs N runs N at once on this machine, each in its own process, spread round-robin over the visible "
        "GPUs; --executor ray makes every run a Ray task on a Ray cluster (pip install 'cilab[ray]'); the run "
        "folders and the report are the same either way. With Ray the workers write the run folders "
        "themselves: --out must be on a filesystem every node sees, at the same path.\n\n"
        "key=value overrides (positional or with --set) apply to every run, after the run's own; an override "
        "of memory.* is left out of runs whose method keeps no exemplars (finetune, joint, lwf) and one of "
        "loss.distillation out of runs that do not distill (finetune, joint), with a note.\n\n"
        "GROUP may be several groups joined by commas, or all: one plan and one pool of runs, a run that "
        "several groups share (same preset, overrides and config) trained once and copied to the others, the "
        "longest runs started first when runs go at once, and a report per group.",
        epilog=f"groups (from presets/{GROUPS_FILE}):\n{listing}\n\n"
        "example (minutes on a CPU):\n  cilab reproduce baselines --out runs/repro data.name=digits "
        "scenario.num_tasks=5 model.name=resnet20 train.epochs=4 train.milestones=[3] train.batch_size=16 "
        "train.lr=0.2 memory.size=100",
    )
    p.add_argument("group", nargs="?", help="group name (see below), several joined by commas, or all: one plan "
                   "and one pool of runs, a run two groups share trained once, a report per group")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--out", type=Path, help="root folder; runs go to OUT/GROUP/<run>, the report to OUT/GROUP/report")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="key=value",
                   help="a config override for every run (repeatable; same as a positional key=value)")
    p.add_argument("--seeds", metavar="S,S,...", help="replace the seeds of every run of the group (e.g. 0,1)")
    p.add_argument("--groups-file", type=Path, help=f"a YAML file of groups instead of the bundled {GROUPS_FILE} "
                   "(group -> {description, runs: [{preset, seeds, overrides, tag}]})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace run folders that hold a run with another config (default: refuse)")
    p.add_argument("--dry-run", action="store_true", help="validate and show what would run, skip or resume; run nothing")
    p.add_argument("--list", action="store_true", help="list the groups and exit")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--no-tsne", action="store_true", help="leave the t-SNE figure out of the report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    par = p.add_argument_group("running in parallel")
    par.add_argument("--jobs", type=int, metavar="N",
                     help="runs at once on this machine (default 1: one after another, in this process); each in its "
                     "own process, given a GPU round-robin over the visible ones (several per GPU when N exceeds "
                     "them); one overall progress bar, no per-run bars")
    par.add_argument("--threads", type=int, metavar="N",
                     help="PyTorch CPU threads per run (default: the cores divided by the runs at once; with Ray "
                     "--cpus-per-run); results are bit-identical only between runs with the same thread count")
    par.add_argument("--executor", choices=list(EXECUTORS), default="local",
                     help="local (default): this machine, see --jobs; ray: every run a Ray task on a Ray cluster "
                     "(pip install 'cilab[ray]'), --out on a filesystem every node sees")
    par.add_argument("--address", metavar="ADDR",
                     help="(ray) the cluster to join: 'auto' (the cluster `ray start` made on this machine) or "
                     "HOST:PORT; default: start a Ray on this machine alone")
    par.add_argument("--gpus-per-run", type=float, metavar="F",
                     help="(ray) GPUs each run asks for: 0.25 lets four runs share a GPU (default 0.25 when the "
                     "cluster has GPUs, else 0)")
    par.add_argument("--cpus-per-run", type=float, metavar="F", help="(ray) CPU cores each run asks for (default 1)")
    p.set_defaults(func=cmd_reproduce)


def _executor_args(args) -> tuple[str, dict]:
    return args.executor, {k: getattr(args, k) for k in ("jobs", "threads", "address", "gpus_per_run", "cpus_per_run")}


def cmd_reproduce(args) -> int:
    groups = load_groups(args.groups_file)
    if args.list:
        print(describe_groups(groups))
        return 0
    if not args.group:
        raise ConfigError(f"name a group: {', '.join(groups)}, or all (cilab reproduce --list describes them)")
    names = group_names(args.group, groups)
    if args.out is None:
        raise ConfigError("--out DIR is required: runs go to DIR/GROUP/<run>")
    overrides = list(args.set_overrides) + list(args.overrides)
    seeds = parse_seeds(args.seeds)
    name, options = _executor_args(args)
    if args.dry_run:
        make_executor(name, **options)  # its options are checked too
        specs = plan_study(names, args.out, overrides, groups=groups, seeds=seeds, overwrite=args.overwrite,
                           check_data=False)
        for note in check_datasets(trained_here(specs), download=False):
            print(f"note: {note}")
        for s in specs:
            what = f"(from {s.source.folder})" if s.source else f"{s.preset} {' '.join(s.overrides)}"
            print(f"{s.action:9s} {s.folder}  {what}")
            for n in s.notes:
                print(f"          note: {n}")
        actions = collections.Counter(s.action for s in specs)
        print(f"{len(specs)} run{'s' * (len(specs) != 1)}: " + ", ".join(f"{n} {a}" for a, n in actions.items()))
        return 0
    try:
        res, rep = reproduce(names, args.out, overrides, groups=groups, seeds=seeds, overwrite=args.overwrite,
                             progress=not args.quiet, report=not args.no_report, draw_tsne=not args.no_tsne,
                             tsne_workers=cpu_count(), executor=name, **options)
    except KeyboardInterrupt:
        cmd = ["cilab", "reproduce", args.group, "--out", str(args.out), *overrides]
        if args.seeds:
            cmd += ["--seeds", args.seeds]
        if args.groups_file:
            cmd += ["--groups-file", str(args.groups_file)]
        if name != "local":
            cmd += ["--executor", name]
        cmd += [x for k, v in options.items() if v is not None for x in ("--" + k.replace("_", "-"), str(v))]
        print("\ninterrupted; complete runs and completed tasks are saved. Continue with:\n  "
              + " ".join(map(shlex.quote, cmd)), file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    from .report import print_summary

    reports = (rep or {}) if len(names) > 1 else {names[0]: rep}
    for group, one in reports.items():
        if one is not None:
            if len(names) > 1:
                print(f"== {group}")
            print_summary(one)
    failed = [r for r in res if r.failed]
    counts = {k: sum(r.status == k for r in res) for k in ("done", "resumed", "copied", "evaluated", "skipped",
                                                           "failed")}
    print(f"{len(res)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    for r in failed:
        print(f"FAILED {r.spec.name if len(names) == 1 else r.spec.label} ({r.spec.folder}): {r.error}",
              file=sys.stderr)
    return EXIT_FAILED if failed else 0
