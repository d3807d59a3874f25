"""The run folder: atomic writes, reading runs back, aggregation over seeds.

Layout of a run folder (public interface, see README):

    config.yaml          the resolved config
    metrics.json         method, seed, class_order, tasks, per-classifier metrics, timing
    confusion.npz        <classifier>_task<t> -> confusion matrix after task t (output order)
    checkpoints/task_XX.pt  model, memory, generator states and metrics after task XX
    accuracy.png         accuracy after each task, one line per classifier

Every file is written to a temporary name and renamed, so whatever moment the
process dies, each file is either the previous complete version or the new one.
"""

from __future__ import annotations

import io
import json
import os
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


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
    files = sorted((Path(run_dir) / CHECKPOINTS).glob("task_*.pt"))
    if not files:
        return None
    return int(files[-1].stem.split("_")[1]) - 1, files[-1]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / METRICS).read_text())


def is_complete(run_dir: Path) -> bool:
    try:
        return read_metrics(run_dir).get("status") == "complete"
    except (OSError, ValueError):
        return False
