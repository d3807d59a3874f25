import os

import pytest
import torch

# CI has 2 cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_overrides():
    """The fastest settings that still train something on digits."""
    return ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]", "train.batch_size=64"]
