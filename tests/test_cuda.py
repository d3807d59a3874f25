"""The CUDA paths on a real GPU: CUDA-graph capture and a training loop free of host syncs.

Skipped where no CUDA GPU is visible (CI and the developers' machines); the
same logic is checked on the CPU in test_speed_paths.py with a stand-in for
the capture. On a GPU machine: `make test` runs these too.
"""

import copy
import warnings

import pytest
import torch

from cilab.config import build_config
from cilab.data import BatchLoader
from cilab.data.loader import Normalizer
from cilab.losses import Criterion
from cilab.models import create_model
from cilab.trainer import GraphedStep, build_step, train_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def _loader(n: int, batch_size: int, seed: int = 0) -> BatchLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(CUDA)
    normalizer = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(CUDA)
    return BatchLoader(x, (torch.arange(n) % 10).to(CUDA), batch_size, normalizer, True,
                       torch.Generator(device=CUDA).manual_seed(seed), channels_last=True)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train(graphs: str, amp: str = "off", epochs: int = 3, nudge: float = 0.0):
    torch.manual_seed(0)
    model = create_model(build_config("icarl").model, 10).to(CUDA, memory_format=torch.channels_last)
    old = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)).to(CUDA) * nudge)
    cfg = build_config("icarl", [f"train.epochs={epochs}", "train.milestones=[1]", "train.lr=0.05"]).train
    train_task(model, _loader(600, 128), cfg, Criterion("bce", "bce", 5, 10), old, 1, CUDA, amp, progress=False,
               graphs=graphs)
    torch.cuda.synchronize()
    return model


@pytest.fixture
def deterministic():
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def test_captured_training_matches_eager_training(deterministic):
    # Replays run the eager kernels, so the two should agree to rounding. SGD
    # magnifies rounding, so the yardstick is how far eager training moves when
    # its weights are nudged by 1e-7 (see test_speed_paths.py, compile).
    eager, graphed, nudged = _flat(_train("off")), _flat(_train("on")), _flat(_train("off", nudge=1e-7))
    rounding = (nudged - eager).norm()
    assert (graphed - eager).norm() <= 3 * rounding + 1e-6 * eager.norm()


def test_bf16_captured_training_stays_finite_and_close_to_fp32():
    fp32, bf16 = _flat(_train("off")), _flat(_train("on", amp="bf16"))
    torch.manual_seed(0)
    start = _flat(create_model(build_config("icarl").model, 10))
    assert torch.isfinite(bf16).all()
    # bf16 keeps ~3 significant digits: it lands near fp32, far nearer than training moved
    assert (bf16 - fp32).norm() < 0.5 * (fp32 - start.to(CUDA)).norm()


def test_both_batch_shapes_are_captured_and_replayed():
    torch.manual_seed(0)
    model = create_model(build_config("icarl").model, 10).to(CUDA, memory_format=torch.channels_last)
    cfg = build_config("icarl", ["train.lr=0.5"]).train
    step, _, _ = build_step(model, cfg, Criterion("bce", "none", 0, 10), None, CUDA, "bf16", graphs="on")
    assert isinstance(step, GraphedStep)
    loader = _loader(600, 128)  # 4 batches of 128, then 88
    losses = [step(x, y).clone() for _ in range(GraphedStep.WARMUP + 2) for x, y in loader]
    assert len(step.graphs) == 2
    assert torch.isfinite(torch.stack(losses)).all()
    assert len({float(v) for v in losses[-5:]}) == 5  # every replay computed its own batch


def test_the_training_loop_syncs_only_where_it_reads_the_loss():
    torch.manual_seed(0)
    model = create_model(build_config("icarl").model, 10).to(CUDA, memory_format=torch.channels_last)
    epochs, log_every = 6, 2
    cfg = build_config("icarl", [f"train.epochs={epochs}", "train.milestones=[3]", "train.lr=0.5",
                                 f"train.log_every={log_every}"]).train
    loader = _loader(64 * 40, 64)  # 40 batches an epoch
    train_task(model, loader, cfg, Criterion("bce", "none", 0, 10), None, 0, CUDA, "bf16", progress=False,
               graphs="on")  # CUDA context, cuDNN and allocator warm up here, outside the counted run
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_task(model, loader, cfg, Criterion("bce", "none", 0, 10), None, 0, CUDA, "bf16", progress=False,
                       graphs="on")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # the loss reads, the schedule's lr update, and once per run each shape's
    # capture: a handful per epoch, against 40 batches an epoch
    assert len(syncs) <= epochs * (log_every + 2) + 10, [str(w.message) for w in syncs[:5]]
