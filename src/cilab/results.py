"""The run folder: atomic writes, reading runs back, aggregation over seeds.

Layout of a run folder (public interface, see README):

    config.yaml          the resolved config
    metrics.json         method, seed, class_order, tasks, per-classifier metrics, timing
    confusion.npz        <classifier>_task<t> -> confusion matrix after task t (output order)
    checkpoints/task_XX.pt  model, memory, generator states, metrics and confusion matrices after task XX
    accuracy.png         accuracy after each task, one line per classifier

Every file is written to a temporary name and renamed, so whatever moment the
process dies, each file is either the previous complete version or the new one.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
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
             if (m := re.fullmatch(r"task_(\d+)\.pt", p.name))]
    return max(found, default=None)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / METRICS).read_text())


def is_complete(run_dir: Path) -> bool:
    try:
        return read_metrics(run_dir).get("status") == "complete"
    except (OSError, ValueError):
        return False
