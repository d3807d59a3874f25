import os

import pytest
import torch

# cuBLAS reads its workspace setting once, when it starts; runs with
# train.deterministic=true need the repeatable one, and the test process may have
# started cuBLAS in an earlier test (tests/test_cuda.py). Harmless without a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# CI has 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_overrides():
    """The fastest settings that still train something on digits."""
    return ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]", "train.batch_size=64"]
