"""``cilab report RUN_DIR... --out DIR``: run folders -> tables and figures, aggregated over seeds.

How runs are read, grouped into variants and aggregated over seeds (a seed
counted once, the spread's formula) is in aggregate.py.

Written into ``--out``:

- report.md: runs and their status, the summary table, accuracy after each task, figures;
- summary.csv: per variant and classifier, mean and std of the average incremental
  accuracy, the final accuracy and the forgetting, with the number of seeds;
- curves.csv: per variant, classifier and task, mean and std of the accuracy on all
  seen classes and of the current task's accuracy;
- accuracy.png: accuracy vs number of classes seen (the study's figures 1, 3, 7);
- current_task_accuracy.png: accuracy on the current task's classes vs task (figure 5, right);
- confusion_<run>_<classifier>.png: confusion matrix after the last task (figure 2);
- tsne.png: features of 5 classes of the first task, training images light and
  exemplars deep, after tasks 1, 5 and the last (figures 4 and 9), recomputed from
  the checkpoints, without retraining;
- exemplars_<run>_task<NN>.png: the exemplars held after a task, one row per class.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import results, runfolder
from .aggregate import (CURVE_FIELDS, RUN_FILES, STD_DDOF, SUMMARY_FIELDS, Run, Variant, check_ddof, common_overrides,
                        curve_rows, find_run_folders, fmt_mean_std, format_summary_table, group_runs,
                        holds_run_files, load_run, mean_std, repeat_notes, spread_note, std_over,
                        summarize_variants, write_csv)
from .checkpoint_figures import TSNE_CLASSES, TSNE_TASKS, FigureCache, RunState, exemplar_figure, tsne_rows
from .config import ConfigError
from .errors import ReportError
from .evaluation import single_class_notes_in
from .results import RunFolderError
from .executors import cpu_count

REPORT_FILES = ("report.md", "summary.csv", "curves.csv", "accuracy.png", "current_task_accuracy.png", "tsne.png",
                "confusion_*.png", "exemplars_*_task*.png")


# -- figures from metrics ----------------------------------------------------------------


def accuracy_figures(variants: list[Variant], out: Path, title: str, ddof: int = STD_DDOF) -> list[Path]:
    """Each legend entry names its spread: 'mean ± std (ddof=1, n=3 seeds)', or '1 seed' alone."""
    from .plots import plot_curves

    check_ddof(ddof)
    acc_curves, cur_curves, xs, tasks = [], [], set(), set()
    for v in variants:
        cpt = v.runs[0].metrics["classes_per_task"]
        for c in v.classifiers:
            label = f"{v.label} ({c})" if len(v.classifiers) > 1 or len(variants) == 1 else v.label
            n = len(v.runs)
            label += f", {spread_note(ddof, n)}" if n > ddof else f", {n} seed{'s' if n != 1 else ''}"
            avg = f": avg {fmt_mean_std(*mean_std(v.values(c, 'average_incremental_accuracy'), ddof), digits=1)}%"
            acc, cur = v.series(c, "accuracy"), v.series(c, "current_task_accuracy")
            x = [cpt * (t + 1) for t in range(acc.shape[1])]
            xs.update(x)
            tasks.update(range(1, acc.shape[1] + 1))
            acc_curves.append({"label": label + avg, "x": x, "mean": list(acc.mean(axis=0)), "std": std_over(acc, ddof)})
            cur_curves.append({"label": label, "x": list(range(1, acc.shape[1] + 1)), "mean": list(cur.mean(axis=0)),
                               "std": std_over(cur, ddof)})
    spread = f" ({spread_note(ddof)} over seeds)" if any(len(v.runs) > 1 for v in variants) else ""
    return [
        plot_curves(acc_curves, out / "accuracy.png", title=f"{title}: accuracy on all classes seen{spread}",
                    xlabel="number of classes seen", ylabel="accuracy on the classes seen so far (%)",
                    xticks=sorted(xs)),
        plot_curves(cur_curves, out / "current_task_accuracy.png",
                    title=f"{title}: accuracy on the current task{spread}", xlabel="task",
                    ylabel="accuracy on the current task's classes (%)", xticks=sorted(tasks)),
    ]


def single_class_notes(runs: list[Run]) -> list[str]:
    """A note for each complete run and classifier that gave every test image one class after some
    task (:func:`cilab.evaluation.single_class_tasks`): its curve is no result."""
    # (an unreadable confusion.npz gives none here: the confusion figure's note says what is wrong)
    return [f"{r.name}: {note}" for r in runs if r.complete
            for note in single_class_notes_in(r.path, r.metrics["classifiers"])]


def confusion_figures(run: Run, out: Path) -> list[Path]:
    from .plots import plot_confusion

    m = run.metrics
    t = m["num_tasks"]
    paths = []
    with np.load(run.path / results.CONFUSION) as z:
        for c in m["classifiers"]:
            key = f"{c}_task{t:02d}"
            if key not in z.files:
                raise ReportError(f"{run.path / results.CONFUSION} has no '{key}'")
            mat = z[key]
            acc = 100.0 * np.trace(mat) / max(mat.sum(), 1)
            paths.append(plot_confusion(
                mat, out / f"confusion_{run.name}_{c}.png", classes_per_task=m["classes_per_task"],
                class_names=m.get("class_names"),
                title=f"{run.name} ({c}): confusion after task {t}, {mat.shape[0]} classes, accuracy {acc:.1f}%"))
    return paths


# -- the report --------------------------------------------------------------------------


@dataclass
class Report:
    out: Path
    runs: list[Run]
    variants: list[Variant]
    rows: list[dict]
    figures: list[Path]
    notes: list[str]
    ddof: int = STD_DDOF

    @property
    def excluded(self) -> list[Run]:
        return [r for r in self.runs if not r.complete]


def _select(runs: list[Run], names: list[str] | None, what: str) -> list[Run]:
    out = []
    for n in names or []:
        hit = [r for r in runs if r.name == n or r.path.resolve() == Path(n).resolve()]
        if not hit:
            raise ReportError(f"--{what}: no run '{n}' among {', '.join(r.name for r in runs)}")
        out.append(hit[0])
    return out


def make_report(paths: list[str | Path], out: str | Path, *, title: str | None = None,
                confusion: list[str] | None = None, tsne: list[str] | None = None, draw_tsne: bool = True,
                tsne_at: tuple = TSNE_TASKS, tsne_classes: int = TSNE_CLASSES, exemplars: str | None = None,
                exemplar_task: int | None = None, exemplars_per_class: int = 10, exemplar_classes: int = 20,
                device: str = "auto", seed: int = 0, labels: dict[str, str] | None = None,
                log: Callable[[str], None] = print, ddof: int = STD_DDOF, cache: FigureCache | None = None,
                tsne_workers: int = 1) -> Report:
    """Read the run folders under ``paths`` and write report.md, CSVs and figures into ``out``.

    ``confusion`` / ``tsne``: run names (folder names or paths) to draw; by
    default the first complete run, and the first run of each variant. A figure
    that cannot be drawn becomes a note in report.md, never an exception.
    ``labels``: run folder name -> variant label (see :func:`group_runs`).
    ``ddof``: 1 (sample std over seeds, the default) or 0 (the study's), see aggregate.py's doc.
    ``cache``: datasets and t-SNE embeddings shared with other reports (:class:`FigureCache`).
    ``tsne_workers``: processes for the t-SNE embeddings (the command line: one a core). They are
    spawned, so a script that asks for more than one calls this under ``if __name__ == "__main__":``.
    """
    import torch

    check_ddof(ddof)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder; choose another --out")
    if holds_run_files(out):  # a run's files, marker or not: the report must not mix with (or clear) them
        found = ", ".join(n for n in RUN_FILES if (out / n).exists())
        raise ReportError(f"--out {out} holds a run's files ({found}); write the report into another folder")
    try:
        runfolder.check_writable(out)  # a file on the way to it, permissions: before any run is read
    except RunFolderError as e:
        raise ReportError(str(e)) from None
    if exemplar_task is not None and exemplar_task < 1:
        raise ReportError(f"--exemplar-task {exemplar_task}: tasks count from 1; leave it out for the last")
    runs = [load_run(p) for p in find_run_folders(paths)]
    # the runs named: a misspelt one is refused here, while the previous report is still whole
    confusion_runs = _select(runs, confusion, "confusion") if confusion else None
    tsne_runs = _select(runs, tsne, "tsne") if tsne else None
    exemplar_run = _select(runs, [exemplars], "exemplars")[0] if exemplars else None
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a previous report's files: none may outlive this one
        if old.is_file() and any(fnmatch.fnmatch(old.name, pat) for pat in REPORT_FILES):
            old.unlink()
    variants = group_runs(runs, labels)
    rows = summarize_variants(variants, ddof)
    done = [r for r in runs if r.complete]
    title = title or (variants[0].runs[0].metrics.get("dataset", "") if variants else "cilab report")
    figures: list[Path] = []
    notes: list[str] = repeat_notes(variants) + single_class_notes(done)
    write_csv(out / "summary.csv", rows, SUMMARY_FIELDS)
    write_csv(out / "curves.csv", curve_rows(variants, ddof), CURVE_FIELDS)

    def attempt(what: str, fn):
        try:
            got = fn()
            figures.extend(got if isinstance(got, list) else [got])
        except Exception as e:  # a figure never costs the report
            notes.append(f"{what}: not drawn ({type(e).__name__}: {e})")

    if variants:
        attempt("accuracy curves", lambda: accuracy_figures(variants, out, title, ddof))
        for r in confusion_runs or done[:1]:
            if not r.complete:
                notes.append(f"confusion matrix of {r.name}: not drawn, the run is not complete")
                continue
            attempt(f"confusion matrix of {r.name}", lambda r=r: confusion_figures(r, out))

        dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available()) else
                           ("cpu" if device == "auto" else device))
        cache = FigureCache() if cache is None else cache
        datasets = cache.datasets
        if draw_tsne:
            chosen = tsne_runs or [v.runs[0] for v in variants]
            states = []
            for r in chosen:
                if not r.complete:
                    notes.append(f"t-SNE of {r.name}: skipped, the run is not complete")
                elif not r.has_memory:
                    notes.append(f"t-SNE of {r.name}: skipped, the run keeps no exemplars (memory.size=0)")
                else:
                    try:
                        states.append(RunState(r, dev, datasets))
                    except Exception as e:
                        notes.append(f"t-SNE of {r.name}: not drawn ({type(e).__name__}: {e})")
            if states:
                from .plots import plot_tsne

                def draw():
                    rows_ = tsne_rows(states, tsne_classes, tsne_at, seed, log, cache.embeddings, tsne_workers)
                    # One legend of class names when every row draws the same classes (same seed).
                    same = len({tuple(x["class_names"]) for x in rows_}) == 1
                    n = len(rows_[0]["class_names"])
                    return plot_tsne(rows_, out / "tsne.png", class_names=rows_[0]["class_names"] if same else None,
                                     title=f"{title}: t-SNE of the features of {n} classes of the first task "
                                     "(light: training images, deep: exemplars)")
                attempt("t-SNE", draw)

        ex_run = exemplar_run or next((r for r in done if r.has_memory), None)
        if ex_run is None:
            notes.append("exemplar grid: no complete run keeps exemplars")
        elif not ex_run.complete or not ex_run.has_memory:
            notes.append(f"exemplar grid of {ex_run.name}: skipped, the run is not complete or keeps no exemplars")
        else:
            def grid():
                task = exemplar_task or ex_run.metrics["num_tasks"]
                if not 1 <= task <= ex_run.metrics["num_tasks"]:
                    raise ReportError(f"task {task} is outside 1..{ex_run.metrics['num_tasks']}")
                return exemplar_figure(RunState(ex_run, dev, datasets), task, exemplars_per_class, exemplar_classes, out)
            attempt(f"exemplar grid of {ex_run.name}", grid)

    report = Report(out, runs, variants, rows, figures, notes, ddof)
    (out / "report.md").write_text(render_markdown(report, title))
    return report


def render_markdown(rep: Report, title: str) -> str:
    L = [f"# Report: {title}", "",
         f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} from {len(rep.runs)} run folder(s); "
         f"{len(rep.runs) - len(rep.excluded)} complete, {len(rep.excluded)} excluded (failed or incomplete).", ""]
    common = common_overrides(rep.variants)
    if common:
        L += [f"Overrides common to every variant: `{' '.join(common)}`", ""]
    if rep.variants:
        L += ["| variant | preset | its own overrides (seed aside) | runs |", "|---|---|---|---|"]
        for v in rep.variants:
            own = [o for o in v.overrides if o not in common]
            L.append(f"| {v.label} | {v.preset} | {'`' + ' '.join(own) + '`' if own else '-'} | "
                     f"{', '.join(r.name for r in v.runs)} |")
        L.append("")
    if rep.rows:
        L += ["## Summary", "",
              f"Accuracies in percent on the test images of all classes seen: {spread_note(rep.ddof)} over the "
              f"seeds, sqrt(sum (x - mean)^2 / (n - {rep.ddof})) "
              f"({'the sample standard deviation' if rep.ddof == 1 else 'the population standard deviation, as the study'})"
              "; a bare number is a single seed. Forgetting: mean over the tasks before the last "
              "of the drop from their best accuracy to their final accuracy.", "",
              f"| variant | classifier | seeds | average incremental accuracy, {spread_note(rep.ddof)} | "
              f"final accuracy, {spread_note(rep.ddof)} | forgetting, {spread_note(rep.ddof)} |",
              "|---|---|---|---|---|---|"]
        for r in rep.rows:
            L.append(f"| {r['variant']} | {r['classifier']} | {r['n_seeds']} ({r['seeds']}) | "
                     f"{fmt_mean_std(r['avg_inc_acc_mean'], r['avg_inc_acc_std'])} | "
                     f"{fmt_mean_std(r['final_acc_mean'], r['final_acc_std'])} | "
                     f"{fmt_mean_std(r['forgetting_mean'], r['forgetting_std'])} |")
        L.append("")
        L += ["## Accuracy after each task", "", "Mean over seeds, by number of classes seen.", ""]
        for v in rep.variants:
            cpt = v.runs[0].metrics["classes_per_task"]
            n = v.series(v.classifiers[0], "accuracy").shape[1]
            L += [f"**{v.label}**", "", "| classifier | " + " | ".join(str(cpt * (t + 1)) for t in range(n)) + " |",
                  "|---|" + "---|" * n]
            for c in v.classifiers:
                a = v.series(c, "accuracy").mean(axis=0)
                L.append(f"| {c} | " + " | ".join(f"{x:.1f}" for x in a) + " |")
            L.append("")
    figs = {p.name: p for p in rep.figures}
    if figs:
        L += ["## Figures", ""]
        for name in sorted(figs, key=lambda n: (not n.startswith("accuracy"), not n.startswith("current"), n)):
            L += [f"![{name}]({name})", ""]
    L += ["## Runs", "", "| run | variant | seed | status | folder |", "|---|---|---|---|---|"]
    label_of = {id(r): v.label for v in rep.variants for r in v.runs + [x for x, _ in v.repeats]}
    repeated = {id(r) for v in rep.variants for r, _ in v.repeats}
    for r in rep.runs:
        status = (r.status + (", a repeat of its seed: not counted" if id(r) in repeated else "") if r.complete
                  else f"**{r.status}**")
        L.append(f"| {r.name} | {label_of.get(id(r), (r.metrics or {}).get('preset') or '-')} | "
                 f"{r.seed if r.seed is not None else '-'} | {status} | `{r.path}` |")
    L.append("")
    if rep.excluded:
        L += ["## Excluded runs", "", "Not in the aggregates above:", ""]
        L += [f"- `{r.name}`: {r.status}" for r in rep.excluded]
        L.append("")
    if rep.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    return "\n".join(L)


# -- command line ------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="tables and figures from run folders, aggregated over seeds",
        description="Aggregate run folders over seeds. Runs with the same preset and overrides (seed aside) form "
        "one variant, in which a seed counts once (a copy or rerun of a seed is listed, not counted); its average "
        "incremental accuracy, final accuracy and forgetting are reported as mean ± "
        "std over seeds (sample std, ddof=1, unless --ddof 0). Failed and incomplete runs are listed and left out. Writes report.md, "
        "summary.csv, curves.csv, accuracy.png (accuracy vs classes seen), current_task_accuracy.png, "
        "confusion_<run>_<clf>.png (after the last task), tsne.png (features of classes of the first task, "
        "training images light and exemplars deep, from the checkpoints, without retraining) and "
        "exemplars_<run>_task<NN>.png.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders, or folders holding run folders (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the report into")
    p.add_argument("--title", help="title of the report and figures (default: the dataset)")
    p.add_argument("--confusion", nargs="+", metavar="RUN",
                   help="runs (folder names or paths) whose confusion matrices to draw, one per classifier "
                   "(default: the first complete run)")
    p.add_argument("--tsne", nargs="+", metavar="RUN",
                   help="runs to draw in the t-SNE figure, one row each (default: the first run of each variant; "
                   "runs without exemplars are skipped with a note)")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure (it extracts features on the CPU "
                   "or GPU and runs t-SNE: seconds to minutes)")
    p.add_argument("--tsne-tasks", default=",".join(map(str, TSNE_TASKS)), metavar="T,T,T",
                   help="tasks after which to draw the t-SNE panels, clamped to the run's tasks, the last task "
                   f"always shown (default {','.join(map(str, TSNE_TASKS))})")
    p.add_argument("--tsne-classes", type=int, default=TSNE_CLASSES,
                   help=f"classes of the first task to draw (default {TSNE_CLASSES}, at most a task's classes)")
    p.add_argument("--exemplars", metavar="RUN", help="run whose exemplars to draw (default: the first complete run "
                   "with exemplars)")
    p.add_argument("--exemplar-task", type=int, help="draw the memory held after this task (1-based; default the last)")
    p.add_argument("--exemplars-per-class", type=int, default=10, help="images per class in the grid (default 10)")
    p.add_argument("--exemplar-classes", type=int, default=20,
                   help="rows (classes, in the learned order) in the grid at most (default 20)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device for feature extraction (default auto: cuda if visible)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random state (default 0)")
    p.add_argument("--ddof", type=int, default=STD_DDOF, choices=[0, 1],
                   help="std over seeds: 1 = sample std (default), 0 = population std, as the study reported")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    try:
        tasks = tuple(int(t) for t in args.tsne_tasks.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--tsne-tasks must be comma-separated task numbers, got '{args.tsne_tasks}'") from None
    for name in ("tsne_classes", "exemplars_per_class", "exemplar_classes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        rep = make_report(args.runs, args.out, title=args.title, confusion=args.confusion, tsne=args.tsne,
                          draw_tsne=not args.no_tsne, tsne_at=tasks or TSNE_TASKS, tsne_classes=args.tsne_classes,
                          exemplars=args.exemplars, exemplar_task=args.exemplar_task,
                          exemplars_per_class=args.exemplars_per_class, exemplar_classes=args.exemplar_classes,
                          device=args.device, seed=args.seed, ddof=args.ddof, tsne_workers=cpu_count())
    except ReportError as e:
        raise ConfigError(str(e)) from None
    print_summary(rep)
    return 0 if rep.rows else 1


def print_summary(rep: Report) -> None:
    if rep.rows:
        print(format_summary_table(rep.rows))
    else:
        print("no complete run to aggregate")
    for r in rep.excluded:
        print(f"excluded {r.name}: {r.status}")
    for n in rep.notes:
        print(f"note: {n}")
    print(f"report in {rep.out / 'report.md'}")
