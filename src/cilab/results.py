"""The run folder: atomic writes, reading runs back, aggregation over seeds.

Layout of a run folder (public interface, see README):

    config.yaml          the resolved config
    metrics.json         method, seed, class_order, tasks, per-classifier metrics, timing
    confusion.npz        <classifier>_task<t> -> confusion matrix after task t (output order)
    checkpoints/task_XX.pt  model, memory, generator states, metrics and confusion matrices after task XX
    accuracy.png         accuracy after each task, one line per classifier
    .cilab-run           cilab's marker: this folder is a run folder (see runfolder.py)
    .cilab-lock          while a run writes the folder: its pid and start time, flock-ed

A run folder is data, never code: checkpoints hold only tensors and plain data
(dicts, lists, numbers, strings) and are loaded with ``torch.load(weights_only=True)``,
which refuses anything that would run code while loading.

Every file is written to a temporary name and renamed, so whatever moment the
process dies, each file is either the previous complete version or the new one.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

METRICS = "metrics.json"
CONFIG = "config.yaml"
CONFUSION = "confusion.npz"
CHECKPOINTS = "checkpoints"
# Temporary files of atomic writes: hidden, and never matched by the globs that find results.
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"
FIGURES = ("accuracy.png",)  # drawn into the run folder at the end of a run
CHECKPOINT_RE = re.compile(r"task_(\d+)\.pt")
TENSORBOARD = "tensorboard"  # log.tensorboard's event files (tensorboard --logdir runs/)
EVENT_FILE_RE = re.compile(r"events\.out\.tfevents\..+")  # the names torch's SummaryWriter gives them
# What experiment.Protocol saves after each task (and a resume needs); a method plugin adds "method_state".
CHECKPOINT_KEYS = ("task", "model", "memory", "generator", "torch_rng", "metrics", "confusion", "class_order")


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked; the message says why and what to do."""


class CheckpointError(RunFolderError):
    """A checkpoint that cilab refuses to load: damaged, or holding more than tensors and plain data."""


def _file_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` would give: 0o666 less the umask.

    ``mkstemp`` creates its file 0o600, and the rename keeps that mode, so
    without this every result would be unreadable to the rest of a group
    sharing a results folder.
    """
    try:  # Linux: read it; setting and resetting the umask is not thread-safe
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    A reader (or a resumed run) sees the old complete file or the new complete
    one, never a prefix; on any error (a full disk, Ctrl-C) the temporary file
    is removed and ``path`` is left as it was. Only SIGKILL or a power cut can
    leave a temporary file behind; ``remove_temp_files`` clears those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the folder's entry is on disk
    # (matters after a power cut, not after a killed process).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporary files that a killed write left in the run folder; returns them.

    Only the run's own process writes into its folder, so at the start of a
    run every temporary file there is a leftover of a process that died.
    """
    run_dir = Path(run_dir)
    stale = [p for d in (run_dir, run_dir / CHECKPOINTS) if d.is_dir()
             for p in d.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def _strict_json(obj: Any) -> Any:
    """NaN / inf -> null: Python would write them as bare NaN, which is not JSON
    (jq, JavaScript and most readers refuse the whole file). They arise e.g. as
    the accuracy on a task without test images."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    # Serialised before anything is opened: an unserialisable object leaves no trace.
    text = json.dumps(_strict_json(obj), indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def atomic_write_yaml(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, yaml.safe_dump(obj, sort_keys=False).encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def checkpoint_path(run_dir: Path, task: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"task_{task + 1:02d}.pt"


def last_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(task index, path) of the latest completed task's checkpoint, or None."""
    # By number, not by name: task_100 comes after task_99.
    found = [(int(m.group(1)) - 1, p) for p in (Path(run_dir) / CHECKPOINTS).glob("task_*.pt")
             if (m := CHECKPOINT_RE.fullmatch(p.name))]
    return max(found, default=None)


def plain_data(obj: Any, where: str = "metrics", tensors: bool = False) -> Any:
    """``obj`` as JSON-like plain data (dict, list, str, int, float, bool, None), and tensors if ``tensors``.

    numpy scalars become Python numbers (``float(np.mean(...))`` is easy to
    forget, and a numpy scalar in a checkpoint would make it unloadable with
    ``weights_only=True``); tuples become lists; with ``tensors``, numpy arrays
    become tensors (a method's state for the checkpoint: ``plain_data(state,
    "method_state", tensors=True)``); anything else is a bug and raises
    TypeError naming where it is.
    """
    if obj is None or type(obj) in (str, int, float, bool):
        return obj
    if tensors and isinstance(obj, torch.Tensor):
        return obj
    if tensors and isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {plain_data(k, where): plain_data(v, f"{where}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    raise TypeError(f"{where} holds a {type(obj).__name__}, which is not plain data (numbers, strings, lists, dicts)")


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint's content, loaded as data only; CheckpointError for anything else.

    ``torch.load(weights_only=True)`` rebuilds tensors and plain containers
    and refuses every other pickled object, so a crafted checkpoint (shared
    run folders are other people's files) cannot run code here. ``required``:
    top-level keys the caller needs.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):  # cilab writes torch's zip format; the legacy format is a bare pickle
        raise CheckpointError(f"{path} is damaged or not a cilab checkpoint (not a zip archive); delete it and "
                              "rerun the task (--resume starts after the last intact checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; cilab never does that, so it is not repeated.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"it asks to call or build {found.group(1)}" if found else "it holds objects that are not plain data"
        if found and found.group(1).startswith("numpy"):
            what += " (checkpoints of cilab before issue 15 held numpy arrays: rerun such a run)"
        raise CheckpointError(
            f"refused to load {path}: {what}; cilab never unpickles code from a run folder (checkpoints hold only "
            "tensors and plain data). Do not trust this run folder; delete the file or get the run again"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "delete it and rerun the task") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a cilab checkpoint (a dict)")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a cilab checkpoint: it lacks {', '.join(missing)}")
    return state


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / METRICS).read_text())


def is_complete(run_dir: Path) -> bool:
    try:
        m = read_metrics(run_dir)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("status") == "complete"
