"""Planning ``cilab reproduce``: the groups of runs (presets/groups.yaml), and a plan of every run's
config and folder action (new, resume, skip, copy, evaluate), made and checked before any run starts.

A group lists runs: a preset, its seeds, optional overrides of its own and a
tag. Each run goes to ``DIR/GROUP/<preset>[-<tag>]-s<seed>``. Several groups are
planned as one pool (:func:`plan_study`): a run that groups share trains once
and is copied to the others; a run that trains alike and differs only in how
it is evaluated is evaluated from the other's checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import yaml

from . import results, runfolder, runlock
from .config import Config, ConfigError, build_config, overrides_to_dict, preset_names, yaml_problem
from .reevaluate import training_key
from .runspec import RunSpec
from .workload import checked_scenario

GROUPS_FILE = "groups.yaml"


# -- groups ------------------------------------------------------------------------------


def load_groups(path: str | Path | None = None) -> dict[str, dict]:
    """The groups of ``path`` (default: the bundled presets/groups.yaml), checked for shape."""
    if path is None:
        text, where = (resources.files("cilab") / "presets" / GROUPS_FILE).read_text(), f"presets/{GROUPS_FILE}"
    else:
        try:
            text, where = Path(path).read_text(), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the groups file {path}: {e}") from None
    try:
        groups = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML{yaml_problem(e)}") from None
    if not isinstance(groups, dict):
        raise ConfigError(f"{where} must map group names to groups")
    for name, g in groups.items():
        check_group(str(name), g, where)
    return groups


def check_group(name: str, group, where: str = "groups") -> None:
    bad = lambda msg: ConfigError(f"{where}: group '{name}': {msg}")  # noqa: E731
    if not isinstance(group, dict) or not isinstance(group.get("runs"), list) or not group["runs"]:
        raise bad("needs a non-empty list 'runs' of {preset, seeds, overrides, tag}")
    for i, r in enumerate(group["runs"]):
        if not isinstance(r, dict) or not isinstance(r.get("preset"), str):
            raise bad(f"run {i + 1} needs a 'preset' name")
        unknown = set(r) - {"preset", "seeds", "overrides", "tag"}
        if unknown:
            raise bad(f"run {i + 1} has unknown keys {sorted(unknown)}; allowed: preset, seeds, overrides, tag")
        if "tag" in r and not (isinstance(r["tag"], str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r["tag"])):
            raise bad(f"run {i + 1} ({r['preset']}): 'tag' names the run's folders: letters, digits, '.', '_' "
                      f"and '-', got {r['tag']!r}")
        seeds = r.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise bad(f"run {i + 1} ({r['preset']}): 'seeds' must be a non-empty list of integers >= 0")
        twice = repeated(seeds)
        if twice is not None:
            raise bad(f"run {i + 1} ({r['preset']}): 'seeds' lists {twice} twice; give each seed once")
        ov = r.get("overrides", [])
        if not isinstance(ov, list) or not all(isinstance(o, str) for o in ov):
            raise bad(f"run {i + 1} ({r['preset']}): 'overrides' must be a list of 'key=value' strings")
    # Two runs of one name would write one folder (<name>-s<seed>).
    names = [_variant(r) for r in group["runs"]]
    twice = repeated(names)
    if twice is not None:
        first = names.index(twice)
        raise bad(f"runs {first + 1} and {names.index(twice, first + 1) + 1} are both named {twice} "
                  "(their preset and tag): they would write one folder; give one a 'tag'")


def _variant(run: dict) -> str:
    """A group's run's name: its preset's, then its tag; its folders are <name>-s<seed>."""
    return f"{Path(run['preset']).stem}{'-' + run['tag'] if run.get('tag') else ''}"


def repeated(items: list):
    """The first item that ``items`` holds twice, or None."""
    seen = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def describe_groups(groups: dict[str, dict]) -> str:
    lines = []
    for name, g in groups.items():
        runs = ", ".join(
            f"{r['preset']}{' (tag ' + r['tag'] + ')' if r.get('tag') else ''}"  # the preset to `cilab run`
            f"{' [' + ' '.join(r['overrides']) + ']' if r.get('overrides') else ''}"
            f" (seeds {','.join(map(str, r.get('seeds', [0])))})"
            for r in g["runs"])
        lines.append(f"  {name}: {runs}")
        if g.get("description"):
            lines.append(f"      {' '.join(str(g['description']).split())}")
    return "\n".join(lines)


# -- planning: every config validated, every folder inspected, before any run -----------


def _key(text: str) -> str:
    return text.split("=", 1)[0].strip()


def _inapplicable(key: str, method) -> str | None:
    """Why a command-line override does not concern a method (it is then left out of that run)."""
    section = key.split(".", 1)[0]  # memory.size=... and a whole memory={...} alike
    if section == "memory" and not method.uses_memory:
        return f"method {method.name} keeps no exemplars"
    if section == "loss" and method.own_loss:
        return f"method {method.name} has a loss of its own"
    if key.startswith("loss.distillation") and not method.distills:
        return f"method {method.name} does not distill"
    return None


def _folder_action(folder: Path, cfg: Config) -> tuple[str, str | None]:
    """(action, conflict): what to do with the run folder for this config.

    Action "refuse": a conflict that --overwrite must not resolve either (a
    folder cilab did not make, a folder another run is writing).
    """
    if folder.exists() and not folder.is_dir():
        return "refuse", f"{folder} exists and is not a folder"
    live = runlock.holder(folder) if folder.exists() else None
    if live:
        return "refuse", f"{folder} is in use by another cilab run ({live.describe()})"
    if not folder.exists() or all(p.name == runlock.LOCK for p in folder.iterdir()):
        return "new", None
    if not runfolder.is_run_folder(folder):
        return "refuse", f"{folder} holds files but is not a run folder (no {runfolder.MARKER}); cilab never deletes it"
    problem = runfolder.config_conflict(folder, cfg)
    if problem:
        return "conflict", f"{folder} holds another run: {problem}"
    return ("skip" if results.is_complete(folder) else "resume"), None


def plan(group: str, out: str | Path, overrides: list[str] | None = None, *, groups: dict | None = None,
         seeds: list[int] | None = None, overwrite: bool = False, check_data: bool = True) -> list[RunSpec]:
    """Resolve and validate every run of ``group``; raise ConfigError before anything runs."""
    from .methods import METHODS

    groups = load_groups() if groups is None else groups
    if group not in groups:
        raise ConfigError(f"unknown group '{group}'; groups: {', '.join(groups)}")
    g = groups[group]
    check_group(group, g)
    check_out(Path(out))
    user = list(overrides or [])
    user_dict = overrides_to_dict(user)  # refuses malformed key=value early
    if "seed" in user_dict:
        raise ConfigError("seeds come from the group; pass --seeds 0,1,2 instead of seed=...")

    known = set(preset_names())
    missing = [r["preset"] for r in g["runs"]
               if r["preset"] not in known and not (r["preset"].endswith((".yaml", ".yml")) and Path(r["preset"]).exists())]
    if missing:
        raise ConfigError(
            f"group '{group}' needs presets that do not exist (yet): {', '.join(dict.fromkeys(missing))}. "
            f"Available presets: {', '.join(sorted(known))}"
        )

    specs, errors, conflicts, hard = [], {}, [], []  # errors: message -> runs (one line per distinct error)
    own_cfgs: dict[str, Config] = {}  # each run's config before the user's overrides
    root = Path(out) / group
    for r in g["runs"]:
        preset, own, variant = r["preset"], list(r.get("overrides", [])), _variant(r)
        for seed in (seeds if seeds is not None else r.get("seeds", [0])):
            name = f"{variant}-s{seed}"
            try:
                base = build_config(preset, own + [f"seed={seed}"])
                wanted = user_dict.get("method", base.method)
                method = METHODS[wanted if wanted in METHODS else base.method]  # a bad method=... fails below
                applied, dropped = [], []
                for o in user:
                    why = _inapplicable(_key(o), method)
                    if why:
                        dropped.append((o, why))
                    else:
                        applied.append(o)
                ov = own + applied + [f"seed={seed}"]
                cfg = build_config(preset, ov)
                own_cfgs[name] = base
            except ConfigError as e:
                errors.setdefault(str(e), []).append(name)
                continue
            folder = root / name
            action, conflict = _folder_action(folder, cfg)
            if conflict:
                if overwrite and action != "refuse":
                    action = "overwrite"
                else:
                    conflicts.append(conflict)
                    hard += [conflict] if action == "refuse" else []
            specs.append(RunSpec(group, name, variant, preset, seed, ov, cfg, folder, action, dropped))
    if errors:
        lines = [f"{', '.join(names)}: {msg}" for msg, names in errors.items()]
        raise ConfigError(f"group '{group}': " + ("\n  " if len(lines) > 1 else "") + "\n  ".join(lines))
    _refuse_identical_runs(group, specs, own_cfgs, user)
    if conflicts:
        fixable = len(hard) < len(conflicts)  # with --overwrite, only the hard ones are left
        how = "pass --overwrite to replace those with another config, or " if fixable else ""
        raise ConfigError("\n  ".join([f"run folders in the way ({how}choose another --out):"] + conflicts))
    if check_data:
        check_datasets(specs)
    return specs


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _refuse_identical_runs(group: str, specs: list[RunSpec], own_cfgs: dict[str, Config], user: list[str]) -> None:
    """A group compares its runs: two that compute the same thing (an override of what they differ in,
    e.g. memory.kind=real for the collage group) would train one run twice and report it under two
    names. Refused, naming the override, before anything runs."""
    same: dict[str, list[RunSpec]] = {}
    for spec in specs:
        same.setdefault(repr(spec.cfg), []).append(spec)
    twins = [runs for runs in same.values() if len(runs) > 1]
    if not twins:
        return
    first, *more = [_and([r.name for r in runs]) for runs in twins]
    a, b = (own_cfgs[r.name].to_dict() for r in twins[0][:2])
    varied = [k for k, _, _ in runfolder.config_differences(a, b)]  # what the group's own settings make them differ in
    culprits = [o for o in user if any(k == _key(o) or k.startswith(_key(o) + ".") for k in varied)]
    if not culprits:
        raise ConfigError(f"group '{group}': {first} have the same config; give each run of the group settings "
                          "of its own")
    also = f" (so are {'; '.join(more)})" if more else ""
    raise ConfigError(f"group '{group}': {first} are the same run once {' '.join(culprits)} "
                      f"appl{'y' if len(culprits) > 1 else 'ies'}{also}: "
                      f"{'they set' if len(culprits) > 1 else 'it sets'} what the group's runs differ in "
                      f"({', '.join(varied)}); drop {'them' if len(culprits) > 1 else 'it'}, "
                      "or run one of them with cilab run")


def check_datasets(specs: list[RunSpec], download: bool = True) -> list[str]:
    """Load each distinct dataset once and check every scenario fits it, before any training.

    ``download=False`` (a dry run: a plan fetches nothing) checks only the data already here; of
    data the runs would download, it returns a note, and their task splits are checked when they
    start."""
    from .data import DatasetNotHere, load_dataset

    seen: dict[str, object] = {}
    notes: list[str] = []
    for s in specs:
        if s.action == "skip":
            continue
        key = repr(s.cfg.data)
        if key not in seen:
            try:  # DatasetError: the CLI prints it, exit 2
                seen[key] = load_dataset(s.cfg.data if download else replace(s.cfg.data, download=False))
            except DatasetNotHere as e:
                if not s.cfg.data.download:
                    raise
                seen[key] = None
                notes.append(f"{e.title} is not in {e.folder} yet: the runs download it (data.download=true), "
                             "and check their task split on it then")
        if seen[key] is None:
            continue
        try:
            checked_scenario(s.cfg, seen[key], training=s.action not in ("copy", "evaluate"))
        except ValueError as e:
            raise ConfigError(f"{s.name}: {e}") from None
    return notes


def trained_here(specs: list[RunSpec]) -> list[RunSpec]:
    """The runs that read their data: not copies, not evaluations of another run's checkpoints."""
    return [s for s in specs if s.action not in ("copy", "evaluate")]


def check_out(out: Path) -> None:
    """Refuse an --out that cannot hold the groups' run folders, by looking only (a dry run of a
    read-only study is a plan too; ``reproduce`` then checks it can write there)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    runfolder.check_creatable(out)  # a file above it
    if runfolder.is_run_folder(out):
        raise ConfigError(f"--out {out} is a run folder; cilab reproduce writes a folder of groups of run folders: "
                          "choose another --out")


def parse_seeds(text: str | None, option: str = "--seeds") -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"{option} must be comma-separated integers >= 0 (e.g. 0,1,2), got '{text}'")
    if repeated(seeds) is not None:
        raise ConfigError(f"{option} lists {repeated(seeds)} twice; give each seed once (e.g. 0,1)")
    return seeds


def group_names(text: str, groups: dict) -> list[str]:
    """``all``, one group, or several joined by commas: the group names, in the order given."""
    names = list(groups) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in groups]
    if unknown or not names:
        raise ConfigError(f"unknown group '{', '.join(unknown) or text}'; groups: {', '.join(groups)}, or all")
    return list(dict.fromkeys(names))


def _identity(spec: RunSpec) -> tuple:
    """Two runs with the same identity compute the same numbers and write the same run folder."""
    return spec.preset, tuple(spec.overrides), repr(spec.cfg)


def plan_study(names: list[str], out: str | Path, overrides: list[str] | None = None, *, groups: dict | None = None,
               seeds: list[int] | None = None, overwrite: bool = False, check_data: bool = True) -> list[RunSpec]:
    """Several groups planned as one (:func:`plan` for each; one group too). Two kinds of runs
    are not trained again where their folder is not complete (a complete one is kept), from a
    complete run of the plan where there is one, else from the first:

    - a run that another one of the plan is (same preset, overrides and config: the study's
      iCaRL runs are in five groups): action "copy", its folder a copy of the other's;
    - a run that trains as another one does and differs only in its classifiers (iCaRL's
      hybrid1, the classifier ablation; :func:`cilab.reevaluate.trains_like`): action
      "evaluate", the other's checkpoints evaluated again with its own classifiers.
    """
    groups = load_groups() if groups is None else groups
    specs = [s for name in names
             for s in plan(name, out, overrides, groups=groups, seeds=seeds, overwrite=overwrite, check_data=False)]
    # The source of each identity and of each training: a complete run where there is one (nothing
    # to train), else the first in plan order.
    first: dict[tuple, RunSpec] = {}
    trainers: dict[str, RunSpec] = {}
    for spec in sorted(specs, key=lambda s: s.action != "skip"):  # stable: plan order otherwise
        first.setdefault(_identity(spec), spec)
        trainers.setdefault(training_key(spec.cfg), spec)
    for i, spec in enumerate(specs):
        if spec.action == "skip":
            continue
        # A half-done folder of a run that another one provides (a copy or an evaluation cut
        # short) is made again from it, not trained on.
        twin, trainer = first[_identity(spec)], trainers[training_key(spec.cfg)]
        if twin is not spec:
            specs[i] = replace(spec, action="copy", source=twin, replaces=spec.action == "overwrite")
        elif trainer is not spec:
            specs[i] = replace(spec, action="evaluate", source=trainer, replaces=spec.action == "overwrite")
    if check_data:
        check_datasets(trained_here(specs))
    return specs


def longest_first(specs: list[RunSpec]) -> list[RunSpec]:
    """``specs`` by the training images each run has (workload.run_images, on CIFAR-100's 100
    classes of 500 images whatever the data: it orders, it does not predict), the most first:
    a pool of N workers then ends with short runs, not with joint training alone."""
    from .workload import run_images

    def images(spec: RunSpec) -> int:
        try:
            return run_images(spec.cfg)
        except (ValueError, KeyError):  # a scenario 100 classes cannot make: keep its place
            return 0

    return sorted(specs, key=images, reverse=True)
