"""Which folders are run folders, who writes them, and what ``--overwrite`` may delete.

- **Marker.** cilab writes ``.cilab-run`` (JSON, ``{"cilab_run_folder": <format>}``)
  into every run folder it makes. Only a folder with this marker is a run
  folder: a folder that merely holds a ``config.yaml`` (a project, a folder of
  notes) is never resumed, cleared or overwritten.
- **What cilab deletes.** ``--overwrite`` (and a plain rerun of a run that
  never completed a task) deletes only the files cilab writes (:func:`cilab_files`):
  config.yaml, metrics.json, confusion.npz, checkpoints/task_NN.pt, the figures
  it draws, temporary files of its atomic writes, the marker and the lock, and
  the TensorBoard event files in tensorboard/ (so a new run's curves are not
  drawn over the old run's). Anything else in the folder stays where it is.
- **One writer.** See runlock.py: one run writes a folder, several may read it.

This module must not import experiment.py (it is imported by it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from . import results
from .results import RunFolderError
from .runlock import LOCK, RunLock, being_read, holder

MARKER = ".cilab-run"
MARKER_FORMAT = 1  # raised when the layout of a run folder changes incompatibly


# -- the marker ------------------------------------------------------------------------


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def write_marker(folder: Path) -> None:
    results.atomic_write_json(Path(folder) / MARKER, {"cilab_run_folder": MARKER_FORMAT})


def check_marker(folder: Path) -> None:
    """Refuse a marker this cilab cannot read (damaged, or made by a newer cilab)."""
    path = Path(folder) / MARKER
    try:
        fmt = json.loads(path.read_text())["cilab_run_folder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFolderError(f"{path} is damaged ({type(e).__name__}); cilab cannot tell what this folder holds. "
                             "Choose another --out") from None
    if not isinstance(fmt, int) or fmt > MARKER_FORMAT:
        raise RunFolderError(f"{folder} was made by a newer cilab (run folder format {fmt!r}, this cilab reads "
                             f"{MARKER_FORMAT}); use that cilab, or choose another --out")


# -- the files cilab writes --------------------------------------------------------------


def _is_temp(p: Path) -> bool:
    return p.name.startswith(results.TMP_PREFIX) and p.name.endswith(results.TMP_SUFFIX) and p.is_file()


# the folders cilab writes files into, each with which of its files are cilab's (by name)
_SUBFOLDERS = {
    results.CHECKPOINTS: lambda p: bool(results.CHECKPOINT_RE.fullmatch(p.name)) or _is_temp(p),
    results.TENSORBOARD: lambda p: bool(results.EVENT_FILE_RE.fullmatch(p.name)),
}


def cilab_files(folder: Path) -> list[Path]:
    """The files in ``folder`` that cilab writes (and so may delete), by name."""
    folder = Path(folder)
    names = (results.CONFIG, results.METRICS, results.CONFUSION, *results.FIGURES, MARKER, LOCK)
    found = [folder / n for n in names if (folder / n).is_file() and not (folder / n).is_symlink()]
    found += [p for p in folder.iterdir() if _is_temp(p)] if folder.is_dir() else []
    for name, ours in _SUBFOLDERS.items():
        sub = folder / name
        if sub.is_dir() and not sub.is_symlink():
            found += [p for p in sub.iterdir() if p.is_file() and not p.is_symlink() and ours(p)]
    return sorted(found)


def _subfolders(folder: Path) -> list[Path]:
    """The folders cilab writes files into (checkpoints/, tensorboard/)."""
    return [folder / name for name in _SUBFOLDERS]


def foreign_entries(folder: Path) -> list[Path]:
    """Everything in ``folder`` that cilab did not write (files, folders, links)."""
    folder = Path(folder)
    ours, subs = set(cilab_files(folder)), _subfolders(folder)
    out = [p for p in folder.iterdir() if p not in ours and p not in subs]
    for sub in subs:
        if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
            out.append(sub)
        elif sub.is_dir():
            out += [p for p in sub.iterdir() if p not in ours]
    return sorted(out)


def clear(folder: Path) -> list[Path]:
    """Delete what cilab wrote into ``folder`` (but the lock, held by the caller); returns what was kept."""
    folder = Path(folder)
    for p in cilab_files(folder):
        if p.name != LOCK:
            p.unlink()
    for sub in _subfolders(folder):
        if sub.is_dir() and not sub.is_symlink() and not any(sub.iterdir()):
            sub.rmdir()
    return foreign_entries(folder)


def copy_run(src: Path, dst: Path, *, planned_for=None) -> None:
    """Replace the run in ``dst`` (if any: what cilab wrote there goes, the user's files stay) by a
    copy of the run in ``src``: every file cilab wrote there but the lock, each through a temporary
    file, metrics.json last, holding both folders' locks. An interrupted copy leaves at most
    completed files and no metrics.json: a folder of the same config that resumes from its last
    checkpoint. ``planned_for``: the config a plan found ``dst`` new or half-done for; a run there
    now that it did not see is kept (RunFolderError, see :func:`unplanned_run`)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with RunLock(src, shared=True), RunLock(dst):
        refuse_unplanned_run(dst, planned_for)
        clear(dst)
        files = [f for f in cilab_files(src) if f.name != LOCK and not _is_temp(f)]
        for f in sorted(files, key=lambda f: f.name == results.METRICS):  # metrics.json, which says "complete", last
            results.atomic_write_bytes(dst / f.relative_to(src), f.read_bytes())


def unplanned_run(folder: Path, cfg) -> str | None:
    """What a copy or an evaluation that a plan found ``folder`` new or half-done for must keep
    there now (written since, by another command): a complete run, or a run of another config;
    None where there is nothing of the kind."""
    if results.is_complete(folder):
        return "a complete run"
    problem = config_conflict(folder, cfg)
    return f"another run: {problem}" if problem else None


def refuse_unplanned_run(folder: Path, cfg) -> None:
    problem = unplanned_run(folder, cfg) if cfg is not None else None
    if problem:
        raise RunFolderError(f"{folder} holds a run the plan did not see ({problem}); pass --overwrite to replace it")


def _names(paths: list[Path], folder: Path, most: int = 5) -> str:
    shown = [str(p.relative_to(folder)) + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths[:most]]
    return ", ".join(shown) + (f" and {len(paths) - most} more" if len(paths) > most else "")


# -- what a run may do with a folder -------------------------------------------------------


def check_creatable(out: Path) -> Path:
    """Refuse, by looking only, an ``--out`` with a file in the way (itself, or a parent still to be
    gone through); returns the nearest folder of its path that exists (``out`` itself where it does)."""
    out = Path(out)
    probe_in = out
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise RunFolderError(f"cannot create {out}: {probe_in} is a file, not a folder; choose another --out")
    return probe_in


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, by trying: permissions, read-only mounts, a file in the way."""
    out = Path(out)
    probe_in = check_creatable(out)
    try:
        if probe_in == out:
            fd, name = tempfile.mkstemp(dir=out, prefix=results.TMP_PREFIX, suffix=results.TMP_SUFFIX)
            os.close(fd)
            os.unlink(name)
        else:
            os.rmdir(tempfile.mkdtemp(dir=probe_in, prefix=results.TMP_PREFIX, suffix=results.TMP_SUFFIX))
    except OSError as e:
        raise RunFolderError(f"cannot write to {out} ({e.strerror or e} in {probe_in}); choose another --out "
                             "or fix its permissions") from None


def describe(folder: Path, live: bool = True) -> str:
    """What a run folder holds, in words, for messages: complete / failed / interrupted / running.

    ``live``: ask the lock whether a run is in progress (False: the caller holds it).
    """
    folder = Path(folder)
    try:
        m = results.read_metrics(folder)
    except (OSError, ValueError):
        m = None
    if not isinstance(m, dict):
        m = {}
    done = results.last_checkpoint(folder)
    tasks = f"{done[0] + 1 if done else 0} of {m.get('num_tasks', '?')} tasks done"
    running = holder(folder) if live else None
    if running:
        return f"a run in progress ({running.describe()}), {tasks}"
    status = str(m.get("status", "running"))
    if status == "complete":
        return "a complete run"
    if status == "running":
        return f"an interrupted run (process gone), {tasks}"
    return f"a run that stopped ({status}), {tasks}"


def check(out: Path, cfg, resume: bool, overwrite: bool, *, locked: bool = False, resumable: bool = True) -> str:
    """What a run into ``out`` will do: "new", "clear" (delete cilab's files first) or "resume".

    Only looks, never changes anything; raises RunFolderError (naming what is
    in the way) where the run must not start. ``locked``: the caller holds the
    folder's lock (so a live holder is the caller itself). ``resumable``: the
    command has a --resume to suggest (``cilab evaluate`` has none).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder")
    live = None if locked or not out.exists() else holder(out)
    if live:
        raise RunFolderError(f"{out} is in use by another cilab run ({live.describe()}); two runs must not write "
                             "one folder. Wait for it to finish, stop it, or choose another --out")
    if not locked and out.exists() and being_read(out):
        raise RunFolderError(f"{out} is being read by another cilab run (an evaluation from its checkpoints, or a "
                             "copy); wait for it to finish, or choose another --out")
    check_writable(out)
    # A lone lock file: ours (``locked``), or left by a run killed before it wrote anything.
    if not out.exists() or all(p.name == LOCK for p in out.iterdir()):
        return "new"
    if not is_run_folder(out):
        found = _names(sorted(out.iterdir()), out)
        what = "--overwrite only clears run folders" if overwrite else (
            "--resume only continues run folders" if resume else "a new run needs an empty folder")
        raise RunFolderError(
            f"{out} is not a run folder (no {MARKER}, which cilab writes into every run folder it makes) and it "
            f"holds {found}; {what}. Choose another --out (a run folder of an older cilab: delete it yourself)"
        )
    check_marker(out)
    if resume:
        _check_same_config(out, cfg)
        return "resume"
    if overwrite or results.last_checkpoint(out) is None:
        # Without a completed task there is nothing to lose: a run that failed
        # or was killed before its first checkpoint must not block a plain rerun.
        return "clear"
    resumable = resumable and not results.is_complete(out)  # a complete run has nothing to continue
    raise RunFolderError(
        f"{out} already holds results ({describe(out, live=not locked)}); pass "
        f"{'--resume to continue it or ' if resumable else ''}--overwrite to start again, or choose another --out"
    )


def _check_same_config(out: Path, cfg) -> None:
    conflict = config_conflict(out, cfg)
    if conflict:
        fix = ("rerun with the same preset and overrides" if conflict.differs
               else "start it again with --overwrite, or choose another --out")  # unreadable, or an older cilab's
        raise RunFolderError(f"cannot resume {out}: {conflict}; {fix}")


@dataclasses.dataclass(frozen=True)
class ConfigConflict:
    """Why a folder's run is not a run of the config at hand. ``differs``: its config is readable
    and another (the same preset and overrides would resume it); otherwise it is unreadable or an
    older cilab's, which only --overwrite resolves. Prints as the problem."""

    problem: str
    differs: bool

    def __str__(self) -> str:
        return self.problem


def config_conflict(out: Path, cfg) -> ConfigConflict | None:
    """Why the run in ``out`` is not a run of ``cfg`` (None: it is, or it saved no config yet).

    The one comparison for ``cilab run --resume`` and ``cilab reproduce``: the ``log``
    section is left out, since tracking may be switched on for the rest of a run."""
    from .config import ConfigError

    if not (out / results.CONFIG).exists():
        return None  # marked but killed before its config was written: nothing to lose
    try:
        old = read_config(out)
    except ConfigError as e:
        return ConfigConflict(str(e), differs=False)
    if dataclasses.replace(old, log=cfg.log) != cfg:
        return ConfigConflict(f"its config differs ({config_diff(old.to_dict(), cfg.to_dict())})", differs=True)
    return None


def read_config(folder: Path, *, network_only: bool = False):
    """The config the run in ``folder`` computed with (:func:`cilab.config.saved_config`: its
    config.yaml, keys added to cilab since read as the run computed them); ConfigError naming
    the file when it is unreadable, OlderRunError when no setting of this cilab reproduces it
    (``network_only``: read such a run's network sections all the same, for figures)."""
    import yaml

    from .config import ConfigError, OlderRunError, saved_config

    path = Path(folder) / results.CONFIG
    try:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"it holds a {type(data).__name__}, not a mapping")
        return saved_config(data, network_only=network_only)
    except OlderRunError:
        raise
    except (yaml.YAMLError, ConfigError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"its {results.CONFIG} is not a valid config ({e})") from None


_MISSING = "(not set)"


def config_differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in ``a``, value in ``b``) for every key where two config dicts differ;
    a key only one of them has (a method's own settings) shows as "(not set)" on the other side."""
    diffs = []
    for k in dict.fromkeys([*a, *b]):
        x, y = a.get(k, _MISSING), b.get(k, _MISSING)
        if isinstance(x, dict) and isinstance(y, dict):
            diffs += config_differences(x, y, prefix + k + ".")
        elif x != y:
            diffs.append((prefix + k, x, y))
    return diffs


def config_diff(a: dict, b: dict) -> str:
    return "; ".join(f"{k}: {x!r} saved, {y!r} now" for k, x, y in config_differences(a, b))


@contextlib.contextmanager
def claim(out: Path, cfg, resume: bool, overwrite: bool, log: Callable[[str], None], *,
          resumable: bool = True, planned_for=None) -> Iterator[str]:
    """Hold ``out`` for a run: create it, lock it, check it again, clear it if asked, mark it.

    The first :func:`check` ran before the data was loaded; the folder may
    have changed since (another run got there first), so it is checked again
    under the lock, and nothing is deleted before the lock is held. The lock
    is released when the block ends, however it ends. ``planned_for``: as in
    :func:`copy_run`, a run there that a plan did not see is kept.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()
    try:
        refuse_unplanned_run(out, planned_for)
        action = check(out, cfg, resume, overwrite, locked=True, resumable=resumable)
        if action == "clear":
            kept = clear(out)
            if kept:
                log(f"kept {_names(kept, out)} in {out}: cilab did not write them")
        for stale in results.remove_temp_files(out):  # left by a process killed mid-write
            log(f"removed {stale}, an unfinished write of a killed run")
        write_marker(out)
        yield action
    finally:
        lock.release()
