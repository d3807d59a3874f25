"""Run folders -> runs -> variants -> mean and spread over seeds: the numbers of a report.

Runs are grouped into *variants*: same preset and same overrides, ``seed=...``
aside (overrides are compared by key and by value as the config reads it, so
``train.lr=0.10`` and ``train.lr=0.1``, or ``eval.classifiers=knn`` and
``eval.classifiers=[knn]``, are one variant, whatever their order). Only complete
runs enter the aggregates; failed and incomplete ones are listed in report.md
as such. A seed counts once in its variant: ``cilab reproduce all`` copies the
runs that several groups share (iCaRL is in five), so a report over the whole
study's folder finds each of those seeds five times; the first folder found
(in path order) is counted, the others are listed in report.md's notes and
runs table, with whether their numbers differ.

Spread over seeds: the standard deviation sqrt(sum_i (x_i - mean)^2 / (n - ddof))
over the n seeds. By default the *sample* standard deviation, ddof=1, the usual
estimate from a handful of seeds; the study reported numpy's default, ddof=0
(the population formula, smaller by sqrt((n-1)/n): 0.82x with 3 seeds), which
``--ddof 0`` reproduces. Every table header, the summary.csv / curves.csv
column ``std_ddof`` and every figure legend say which was used and over how
many seeds. With ddof=1 it is undefined for one seed, which the tables show as
a bare mean (an empty ``*_std`` cell in summary.csv) and the figures as a line
without error bars.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import results
from .config import Config, ConfigError, parse_override
from .errors import ReportError
from .runfolder import MARKER
from .schema import coerce_key

SUMMARY_FIELDS = [
    "variant", "preset", "overrides", "classifier", "n_seeds", "seeds",
    "avg_inc_acc_mean", "avg_inc_acc_std", "final_acc_mean", "final_acc_std",
    "forgetting_mean", "forgetting_std", "runs", "std_ddof",
]
CURVE_FIELDS = ["variant", "classifier", "task", "classes_seen", "n_seeds", "accuracy_mean", "accuracy_std",
                "current_task_accuracy_mean", "current_task_accuracy_std", "std_ddof"]
RUN_FILES = (results.METRICS, results.CONFIG, MARKER)  # any of them makes a folder a run folder
STD_DDOF = 1  # default: sample standard deviation over seeds (see module doc); the study: 0


# -- reading run folders -----------------------------------------------------------------


@dataclass
class Run:
    path: Path
    metrics: dict | None
    status: str  # "complete" | "failed: ..." | "incomplete: ..." | "unreadable: ..."

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def seed(self):
        return (self.metrics or {}).get("seed")

    @property
    def has_memory(self) -> bool:
        m = self.metrics or {}
        return any(m.get("memory_total") or [])


def holds_run_files(p: Path) -> bool:
    """A run folder, finished or not: the marker alone is one that died before its config.yaml
    was written, or a copy cut short."""
    return any((p / name).exists() for name in RUN_FILES)


def find_run_folders(paths: list[str | Path]) -> list[Path]:
    """Each path is a run folder, or a folder holding run folders (searched recursively)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p} is not a folder")
        if holds_run_files(p):
            found.append(p)
            continue
        inner = sorted({q.parent for pat in RUN_FILES for q in p.rglob(pat)})
        if not inner:
            raise ReportError(f"{p} is neither a run folder nor holds any (no {results.METRICS} or {results.CONFIG})")
        found += inner
    unique, seen = [], set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _metrics_problems(m: dict) -> list[str]:
    """What a complete run's metrics.json lacks or holds wrongly (a hand-edited or foreign file)."""
    if not isinstance(m.get("classifiers"), list) or not all(isinstance(c, str) for c in m["classifiers"]):
        return ["a list of classifier names under 'classifiers'"]
    problems = [f"a positive integer '{k}'" for k in ("classes_per_task", "num_tasks")
                if not (isinstance(m.get(k), int) and not isinstance(m.get(k), bool) and m[k] > 0)]
    for c in m["classifiers"]:
        section = m.get(c)
        if not isinstance(section, dict):
            problems.append(f"a section '{c}'")
            continue
        for k in ("accuracy", "current_task_accuracy"):  # null: an accuracy over no images
            v = section.get(k)
            if not isinstance(v, list) or not v or not all(x is None or _is_number(x) for x in v):
                problems.append(f"a non-empty list of numbers '{c}.{k}'")
        for k in ("average_incremental_accuracy", "final_accuracy", "forgetting"):
            if not (section.get(k) is None and k in section) and not _is_number(section.get(k)):
                problems.append(f"a number '{c}.{k}'")
    return problems


def _unfinished(path: Path, m: dict) -> str:
    """A run that is neither complete nor failed: still running, or its process is gone (item 7 of issue 15)."""
    from .runlock import holder

    status = str(m.get("status", "running"))
    done = f"{m.get('completed_tasks', 0)}/{m.get('num_tasks', '?')} tasks done"
    if status == "running":
        live = holder(path)
        status = f"running ({live.describe()})" if live else "interrupted (process gone)"
    return f"incomplete: {status}, {done}"


def load_run(path: Path) -> Run:
    path = Path(path)
    try:
        m = results.read_metrics(path)
    except FileNotFoundError:
        from .runlock import holder

        live = holder(path)
        return Run(path, None, f"incomplete: running ({live.describe()}), no task finished yet" if live
                   else "incomplete: no task finished (no metrics.json)")
    except (OSError, ValueError) as e:
        return Run(path, None, f"unreadable: {e}")
    if not isinstance(m, dict):
        return Run(path, None, f"unreadable: metrics.json holds a JSON {type(m).__name__}, not an object")
    status = str(m.get("status", "unknown"))
    if status == "complete":
        problems = _metrics_problems(m)
        if problems:
            return Run(path, m, f"unreadable: metrics.json lacks {', '.join(problems)}")
        return Run(path, m, "complete")
    if status.startswith("failed"):
        return Run(path, m, status)
    return Run(path, m, _unfinished(path, m))


# -- grouping and aggregation ------------------------------------------------------------


def _norm(value):
    """Numbers as floats (``2``, ``2.0``, ``1e-1`` and ``0.10`` compare by value), lists element-wise."""
    if isinstance(value, list):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _norm(v)) for k, v in value.items()))
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)  # YAML 1.1 reads 1e-1 as a string
    except (TypeError, ValueError):
        return str(value)


def _canonical(overrides: list[str]) -> tuple:
    """Overrides as sorted (key, normalised value) pairs, ``seed`` left out; a later override of a key wins.
    A value is read as the config reads it (``eval.classifiers=knn`` is ``[knn]``); a key the config
    lacks (``method_args.*``, a newer cilab's) keeps its parsed value."""
    items: dict[str, object] = {}
    for text in overrides or []:
        try:
            key, value = parse_override(text)
        except ConfigError:
            key, value = text, None
        else:
            try:
                value = coerce_key(Config, key, value)
            except ConfigError:
                pass
        if key != "seed":
            items[key] = _norm(value)
    return tuple(sorted(items.items(), key=lambda kv: kv[0]))


@dataclass
class Variant:
    key: tuple
    preset: str
    overrides: list[str]  # as written (seed left out), from the first run
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    repeats: list[tuple[Run, Run]] = field(default_factory=list)  # (left out, the run of its seed counted)

    @property
    def classifiers(self) -> list[str]:
        return list(self.runs[0].metrics["classifiers"])

    def values(self, clf: str, key: str) -> np.ndarray:
        return np.array([r.metrics[clf][key] for r in self.runs if clf in r.metrics], dtype=float)

    def series(self, clf: str, key: str) -> np.ndarray:
        """Runs x tasks array of a per-task metric."""
        rows = [r.metrics[clf][key] for r in self.runs if clf in r.metrics]
        n = min(len(x) for x in rows)
        return np.array([x[:n] for x in rows], dtype=float)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]


def group_runs(runs: list[Run], labels: dict[str, str] | None = None) -> list[Variant]:
    """Complete runs -> variants, in order of first appearance.

    A variant's label is its preset and the overrides not common to all
    variants, or ``labels[name of its first run]`` where given (and unique).
    A seed counts once in its variant: a later run of the same variant and
    seed (a copy made by ``reproduce`` for another group, a rerun elsewhere) is
    left out of the aggregates and listed in ``Variant.repeats``.
    """
    variants: dict[tuple, Variant] = {}
    for r in runs:
        if not r.complete:
            continue
        preset = r.metrics.get("preset") or r.metrics.get("method", "?")
        ov = [o for o in r.metrics.get("overrides") or [] if _canonical([o])]  # seed=... left out
        key = (preset, _canonical(ov))
        if key not in variants:
            variants[key] = Variant(key, preset, ov)
        v = variants[key]
        kept = next((k for k in v.runs if k.seed == r.seed), None) if r.seed is not None else None
        if kept is None:
            v.runs.append(r)
        else:
            v.repeats.append((r, kept))
    out = list(variants.values())
    common = set.intersection(*(set(v.key[1]) for v in out)) if out else set()
    for v in out:
        extra = [o for o in v.overrides if _canonical([o]) and _canonical([o])[0] not in common]
        v.label = " ".join([v.preset] + extra)
    given = [(labels or {}).get(v.runs[0].name) for v in out]
    if all(given) and len(set(given)) == len(given):
        for v, label in zip(out, given):
            v.label = label
    return out


def repeat_notes(variants: list[Variant]) -> list[str]:
    """One line per run left out as a repeat of its variant's seed, saying whether its numbers differ."""
    notes = []
    for v in variants:
        for r, kept in v.repeats:
            differ = next((c for c in kept.metrics["classifiers"]
                           if (r.metrics.get(c) or {}).get("accuracy") != kept.metrics[c]["accuracy"]), None)
            if differ is None:
                how = "with the same numbers"
            else:
                key = "average_incremental_accuracy"
                there = (r.metrics.get(differ) or {}).get(key)
                how = (f"with other numbers ({differ} average incremental accuracy "
                       f"{fmt_mean_std(there, None) if _is_number(there) else 'missing'} there, "
                       f"{fmt_mean_std(kept.metrics[differ][key], None)} in the one counted)")
            notes.append(f"{r.path} repeats {kept.path} (variant {v.label}, seed {r.seed}) {how}: a seed counts once")
    return notes


def common_overrides(variants: list[Variant]) -> list[str]:
    if not variants:
        return []
    common = set.intersection(*(set(v.key[1]) for v in variants))
    return [o for o in variants[0].overrides if _canonical([o]) and _canonical([o])[0] in common]


def check_ddof(ddof: int) -> None:
    if ddof not in (0, 1):
        raise ReportError(f"--ddof must be 0 (population std, as the study) or 1 (sample std), got {ddof}")


def mean_std(x: np.ndarray, ddof: int = STD_DDOF) -> tuple[float, float | None]:
    """Mean and std over seeds (the module doc's formula); std None where n - ddof < 1 (one seed, ddof=1)."""
    if len(x) == 0:
        return math.nan, None
    return float(np.mean(x)), (float(np.std(x, ddof=ddof)) if len(x) > ddof else None)


def std_over(a: np.ndarray, ddof: int) -> list | None:
    """Per-column std of a runs x tasks array, or None where it is undefined."""
    return list(np.std(a, axis=0, ddof=ddof)) if a.shape[0] > ddof else None


def spread_note(ddof: int, n: int | None = None) -> str:
    """How the spread was computed, for table headers and legends: 'mean ± std (ddof=1, n=3 seeds)'."""
    seeds = "" if n is None else f", n={n} seed{'s' if n != 1 else ''}"
    return f"mean ± std (ddof={ddof}{seeds})"


def summarize_variants(variants: list[Variant], ddof: int = STD_DDOF) -> list[dict]:
    check_ddof(ddof)
    rows = []
    for v in variants:
        for c in v.classifiers:
            row = {"variant": v.label, "preset": v.preset, "overrides": " ".join(v.overrides), "classifier": c,
                   "n_seeds": len(v.values(c, "final_accuracy")), "seeds": " ".join(map(str, v.seeds)),
                   "runs": " ".join(r.name for r in v.runs), "std_ddof": ddof}
            for name, key in (("avg_inc_acc", "average_incremental_accuracy"), ("final_acc", "final_accuracy"),
                              ("forgetting", "forgetting")):
                row[f"{name}_mean"], row[f"{name}_std"] = mean_std(v.values(c, key), ddof)
            rows.append(row)
    return rows


def curve_rows(variants: list[Variant], ddof: int = STD_DDOF) -> list[dict]:
    check_ddof(ddof)
    rows = []
    for v in variants:
        cpt = v.runs[0].metrics["classes_per_task"]
        for c in v.classifiers:
            acc, cur = v.series(c, "accuracy"), v.series(c, "current_task_accuracy")
            for t in range(acc.shape[1]):
                am, asd = mean_std(acc[:, t], ddof)
                cm, csd = mean_std(cur[:, t], ddof)
                rows.append({"variant": v.label, "classifier": c, "task": t + 1, "classes_seen": cpt * (t + 1),
                             "n_seeds": acc.shape[0], "accuracy_mean": am, "accuracy_std": asd,
                             "current_task_accuracy_mean": cm, "current_task_accuracy_std": csd, "std_ddof": ddof})
    return rows


def fmt_mean_std(mean: float, std: float | None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def format_run_table(runs: dict[str, dict]) -> str:
    """Accuracy after each task: one row per (run, classifier)."""
    first = next(iter(runs.values()))
    n = first["num_tasks"]
    seen = first.get("classes_seen") or [first["classes_per_task"] * (t + 1) for t in range(n)]  # older runs
    head = ["run", "clf"] + [str(s) for s in seen] + ["avg", "final"]
    rows = []
    for name, m in runs.items():
        for c in m["classifiers"]:
            acc = m[c]["accuracy"]
            rows.append([name, c] + [f"{a:.1f}" for a in acc] + [""] * (n - len(acc))
                        + [f"{m[c]['average_incremental_accuracy']:.1f}", f"{m[c]['final_accuracy']:.1f}"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = ["accuracy (%) on all seen classes, by number of classes seen", fmt(head), fmt(["-" * w for w in widths])]
    return "\n".join(lines + [fmt(r) for r in rows])


def format_summary_table(rows: list[dict]) -> str:
    """Plain-text table: one line per variant and classifier; the header says how the spread was computed."""
    ddof = rows[0].get("std_ddof", STD_DDOF) if rows else STD_DDOF
    spread = spread_note(ddof)
    head = ["variant", "clf", "seeds", f"avg incremental acc (%, {spread})", f"final acc (%, {spread})",
            f"forgetting (%, {spread})"]
    body = [[r["variant"], r["classifier"], str(r["n_seeds"]), fmt_mean_std(r["avg_inc_acc_mean"], r["avg_inc_acc_std"]),
             fmt_mean_std(r["final_acc_mean"], r["final_acc_std"]), fmt_mean_std(r["forgetting_mean"], r["forgetting_std"])]
            for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})
