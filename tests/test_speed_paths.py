"""The CUDA fast paths (bf16 autocast, channels_last) and the no-sync loop, checked on the CPU."""

import torch

from cilab.config import build_config
from cilab.data import BatchLoader
from cilab.data.loader import Normalizer
from cilab.experiment import resolve_amp, resolve_channels_last, run
from cilab.losses import Criterion
from cilab.models import create_model
from cilab.trainer import train_task

TINY = ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]", "train.batch_size=64",
        "memory.size=40"]


def _loader(n=256, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    return BatchLoader(x, y, 32, Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)), True,
                       torch.Generator().manual_seed(0), channels_last)


def test_auto_settings_resolve_per_device():
    cfg = build_config("icarl").train
    assert resolve_amp(cfg, torch.device("cuda")) == "bf16"
    assert resolve_amp(cfg, torch.device("cpu")) == "off"
    assert resolve_channels_last(cfg, torch.device("cuda")) is True
    cfg.channels_last = "off"
    assert resolve_channels_last(cfg, torch.device("cuda")) is False


def test_channels_last_batches_and_training():
    loader = _loader(channels_last=True)
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    model = create_model(build_config("icarl").model, 10).to(memory_format=torch.channels_last)
    cfg = build_config("icarl", ["train.epochs=2", "train.milestones=[]", "train.lr=0.1"]).train
    before = [p.detach().clone() for p in model.parameters()]
    train_task(model, loader, cfg, Criterion("bce", "none", 0, 10), None, 0, torch.device("cpu"), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bf16_autocast_runs_the_trainer_and_a_whole_run(tmp_path):
    m = run(build_config("icarl", TINY + ["train.amp=bf16", "train.channels_last=on"]), tmp_path / "run", progress=False)
    assert m["amp"] == "bf16" and m["status"] == "complete"
    assert all(0.0 <= a <= 100.0 for a in m["nme"]["accuracy"])


def test_bf16_and_fp32_logits_agree_closely():
    torch.manual_seed(0)
    model = create_model(build_config("icarl").model, 10).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel  # bf16 keeps ~3 significant digits per op


def test_training_loop_reads_the_loss_only_a_few_times_per_epoch(monkeypatch):
    calls = []
    original = torch.Tensor.item

    def counting_item(self):
        calls.append(1)
        return original(self)

    loader = _loader(n=640)  # 20 batches per epoch
    cfg = build_config("icarl", ["train.epochs=3", "train.milestones=[]", "train.lr=0.1", "train.log_every=2"]).train
    model = create_model(build_config("icarl").model, 10)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    train_task(model, loader, cfg, Criterion("bce", "none", 0, 10), None, 0, torch.device("cpu"), progress=False)
    assert len(calls) == 3 * 2  # log_every reads per epoch, not one per batch (60 batches)
