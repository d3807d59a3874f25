import os
from pathlib import Path

import numpy as np
import pytest
import torch

# cuBLAS reads its workspace setting once, when it starts; runs with
# train.deterministic=true need the repeatable one, and the test process may have
# started cuBLAS in an earlier test (tests/test_cuda.py). Harmless without a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# CI has 2 cores; keep torch from oversubscribing them. `make test` runs one pytest-xdist
# worker per core, so each worker gets its share of the cores (one thread on CI).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's real runs: they run whole trainings on 2 cores that other
    jobs share, where two threads fighting for a busy core were up to 6x slower than one; the
    CLI subprocesses those tests start get the same count, so they compute the same floats."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides():
    """The fastest settings that still train something on digits."""
    return ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]", "train.batch_size=64"]


def interrupted_and_resumed(cfg, tmp_path, monkeypatch, stop_at: int = 2):
    """(the uninterrupted run's metrics, the metrics of a run stopped before task stop_at+1 and resumed).

    On a GPU both runs use train.deterministic=true: without it two CUDA runs of one seed already
    differ (cuDNN's atomics), resumed or not; on the H100 the EWC and LUCIR resume tests failed so."""
    import dataclasses

    from cilab import experiment

    if torch.cuda.is_available() and cfg.train.device != "cpu":
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, deterministic=True))
    whole = experiment.run(cfg, tmp_path / "whole", progress=False)
    real = experiment.Protocol.run_task

    def stop(self, t):
        if t == stop_at:
            raise KeyboardInterrupt
        real(self, t)

    monkeypatch.setattr(experiment.Protocol, "run_task", stop)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(experiment.Protocol, "run_task", real)
    return whole, experiment.run(cfg, tmp_path / "cut", resume=True, progress=False)


def small_npz(path: Path, **over) -> Path:
    """An npz dataset of 4 classes of random 8x8 grey images (10 train, 2 test a class); ``over``
    replaces arrays, to make a file bad in one named way."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.repeat(np.arange(4), 10),
                  x_test=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y_test=np.repeat(np.arange(4), 2))
    np.savez(path, **{**arrays, **over})
    return path
