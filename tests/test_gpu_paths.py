"""Issue 17: one side stream for CUDA-graph warm-up and capture, train.deterministic, the
concurrency benchmark, benchmarks/gpu.sh.

The CPU parts run everywhere; the tests marked ``cuda`` need a CUDA GPU and are
skipped without one (benchmarks/gpu.sh runs them on a GPU machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cilab import trainer

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- CudaGraphs: warm-up and capture on one side stream ----------------------------------------


class _FakeStream:
    """Stands for a torch.cuda.Stream: records what waits on what."""

    def __init__(self, name):
        self.name, self.waited_on = name, []

    def wait_stream(self, other):
        self.waited_on.append(other)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph calls replaced by recorders, so CudaGraphs' use of
    streams can be checked on a CPU: which stream each warm-up runs on, which one the
    capture is given."""
    log = {"streams": [], "entered": [], "graph_streams": []}
    current = _FakeStream("current")

    def new_stream(device=None, *a, **k):
        s = _FakeStream(f"side{len(log['streams'])}")
        log["streams"].append(s)
        return s

    @contextlib.contextmanager
    def use_stream(s):
        log["entered"].append(s)
        yield

    class FakeGraph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, **k):
        log["graph_streams"].append(stream)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    log["current"] = current
    return log


def test_warmups_and_captures_share_one_side_stream(fake_cuda):
    # Issue 17 item 5: the warm-up ran on a fresh side stream each time and the
    # capture on torch.cuda.graph's own stream, so the parameters' AccumulateGrad
    # nodes (and the gradients and momentum buffers) were made on one stream and
    # used from another: torch's "AccumulateGrad node's stream does not match".
    backend = trainer.CudaGraphs(torch.device("cuda"))
    for _ in range(3):
        with backend.warmup():
            pass
    backend.capture(lambda: torch.zeros(()))
    with backend.warmup():  # the other batch shape warms up after the first capture
        pass
    backend.capture(lambda: torch.zeros(()))
    assert len(fake_cuda["streams"]) == 1, "a new stream was made after the first"
    side = fake_cuda["streams"][0]
    assert fake_cuda["entered"] == [side] * 4
    assert fake_cuda["graph_streams"] == [side, side]
    # the side stream joins the caller's stream before each warm-up and capture, and back after
    assert side.waited_on.count(fake_cuda["current"]) == 6
    assert fake_cuda["current"].waited_on.count(side) == 6
