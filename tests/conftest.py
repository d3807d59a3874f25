import os

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

