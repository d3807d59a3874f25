"""``train.deterministic``: torch, cuDNN and cuBLAS set to deterministic algorithms for one run.

Two CUDA runs with one seed need not agree bit for bit: cuDNN picks among
convolution algorithms, some of which accumulate with atomic adds in whatever
order the threads finish, and cuBLAS may split a product over several
workspaces. With ``train.deterministic=true`` a run trains under

  * ``torch.use_deterministic_algorithms(True)``: every op takes its
    deterministic implementation, and one that has none raises an error
    naming itself. Of the ops PyTorch lists as having none on CUDA, none is
    on cilab's path (ResNet-32 pools with a mean, not AdaptiveAvgPool2d,
    whose backward has none; resizing is never differentiated); this is
    checked against the list, not yet on a GPU;
  * ``torch.backends.cudnn.deterministic = True``, ``cudnn.benchmark = False``:
    cuDNN's deterministic algorithms, the same every run (benchmarking would
    pick by timing, which can differ between runs);
  * ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8`` if already set), which
    cuBLAS needs for repeatable results and torch demands in this mode.

CUDA graphs stay as ``train.cuda_graphs`` says: a replay launches the very
kernels of the captured step, which are the deterministic ones, so a graphed
run repeats bit for bit like an eager one (a graphed and an eager run need
not agree with each other bit for bit; each repeats itself).

The torch and cuDNN flags are process-wide. They are set for the run and put
back as they were when it ends, however it ends, so a caller that runs
several experiments in one process (``cilab reproduce --jobs 1``, a notebook,
the tests) keeps its own settings. The environment variable stays set: cuBLAS
reads it once, when it starts in the process, so it must be set before the
first CUDA product. A run sets it before it moves any data to the device;
if CUDA had already started in the process without it, the run warns, and
exporting ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before starting Python makes
sure.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the two settings cuBLAS documents as reproducible


def set_cublas_workspace() -> None:
    """Set CUBLAS_WORKSPACE_CONFIG to a deterministic value unless it holds one; warn if it may be late."""
    if os.environ.get(CUBLAS_VAR) in CUBLAS_DETERMINISTIC:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn(
            f"train.deterministic=true sets {CUBLAS_VAR}={CUBLAS_DETERMINISTIC[0]} after CUDA started in this "
            "process; if cuBLAS had started too, it keeps its old workspace setting. Export "
            f"{CUBLAS_VAR}={CUBLAS_DETERMINISTIC[0]} before starting Python to be sure.", RuntimeWarning, stacklevel=3)
    os.environ[CUBLAS_VAR] = CUBLAS_DETERMINISTIC[0]


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """Deterministic torch / cuDNN / cuBLAS inside the block when ``on``; torch's flags put back after."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_cublas_workspace()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


@contextlib.contextmanager
def cudnn_benchmark(on: bool | None):
    """``torch.backends.cudnn.benchmark`` set to ``on`` inside the block (None: left alone), put back after."""
    if on is None:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
