"""The CUDA fast paths (bf16 autocast, channels_last, CUDA-graph capture) and the no-sync loop, checked on the CPU."""

import copy

import pytest
import torch

from cilab import trainer
from cilab.config import ConfigError, build_config
from cilab.data import BatchLoader
from cilab.data.loader import Normalizer
from cilab.experiment import run
from cilab.runtime import resolve_amp, resolve_channels_last, resolve_cuda_graphs
from cilab.losses import Criterion
from cilab.models import create_model
from cilab.trainer import GraphCaptureError, autocast_for, train_task
from helpers import StandInCapture, check_bookkeeping, eager_and_graphed

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


def small_digits(path):
    """20 training images a class of the bundled digits and their whole test set, as an npz file:
    bf16 on a CPU without bf16 instructions is ten times slower than fp32, so the bf16 run
    trains on 200 images an epoch instead of 1,347."""
    import numpy as np

    from cilab.config import DataConfig
    from cilab.data import load_dataset

    d = load_dataset(DataConfig(name="digits"))
    keep = torch.cat([torch.nonzero(d.y_train == c).flatten()[:20] for c in range(10)])
    np.savez(path, x_train=d.x_train[keep].numpy(), y_train=d.y_train[keep].numpy(),
             x_test=d.x_test.numpy(), y_test=d.y_test.numpy())
    return ["data.name=npz", f"data.path={path}"]


def test_bf16_autocast_runs_the_trainer_and_a_whole_run(tmp_path):
    data = small_digits(tmp_path / "digits.npz")
    tiny = TINY + data
    dtypes = set()  # what the convolutions computed in: the training steps must run in bf16

    def conv_dtype(module, args, out):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            dtypes.add(out.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(conv_dtype)
    try:
        m = run(build_config("icarl", tiny + ["train.amp=bf16", "train.channels_last=on"]), tmp_path / "run",
                progress=False)
    finally:
        hook.remove()
    assert m["amp"] == "bf16" and m["status"] == "complete" and dtypes == {torch.bfloat16}
    # every accuracy agrees with the confusion matrices and the data's class counts (not just 0..100)
    check_bookkeeping(tmp_path / "run", m)
    # the run's features are fp32 whatever train.amp says: the NME means of the final model,
    # recomputed here in plain fp32, classify the test images as the run did
    import numpy as np

    from cilab import results
    from cilab.data import Scenario, load_dataset
    from cilab.data.loader import Normalizer
    from cilab.memory import ExemplarMemory
    from cilab.models import create_model

    cfg = build_config("icarl", tiny)
    data = load_dataset(cfg.data)
    sc = Scenario.from_seed(data.num_classes, 5, cfg.seed, data.class_names)
    state = results.load_checkpoint(results.checkpoint_path(tmp_path / "run", 4))
    model = create_model(cfg.model, 10)
    model.load_state_dict(state["model"])
    model.eval()
    mx, my = ExemplarMemory.from_state_dict(state["memory"], torch.device("cpu")).data()
    norm = Normalizer(*data.mean_std())
    with torch.no_grad():
        unit = lambda x: torch.nn.functional.normalize(model.features(norm(x)), dim=1)  # noqa: E731
        f, ff, ft = unit(mx), unit(mx.flip(3)), unit(data.x_test)
    means = torch.stack([torch.cat([f[my == c], ff[my == c]]).mean(0) for c in range(10)])
    pred = (ft @ torch.nn.functional.normalize(means, dim=1).T).argmax(1)
    y = sc.remap(data.y_test)
    with np.load(tmp_path / "run" / "confusion.npz") as z:
        cm = z["nme_task05"]
    expected = np.bincount(y.numpy() * 10 + pred.numpy(), minlength=100).reshape(10, 10)
    assert (cm == expected).all(), np.abs(cm - expected).sum()


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


# -- CUDA-graph capture of the step ------------------------------------------------------------
# torch.cuda.graph cannot run on a CPU: these tests put helpers.StandInCapture behind GraphedStep.


class FailingCapture(StandInCapture):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def _graph_case(monkeypatch, graphs, backend_cls, epochs=5):
    """Trains a fresh seeded ResNet-32 with distillation on 16x16 images: 200 images in batches
    of 32 (6 full batches and a last one of 8), the lr cut after epoch 1. Returns the model and the backend."""
    made = []
    real_make = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda *a: made.append(real_make(*a)) or made[-1])
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8, generator=g)
    loader = BatchLoader(x, torch.arange(200) % 10, 32, Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)),
                         True, torch.Generator().manual_seed(0), channels_last=True)
    torch.manual_seed(0)
    model = create_model(build_config("icarl").model, 10).to(memory_format=torch.channels_last)
    old = copy.deepcopy(model).eval().requires_grad_(False)
    milestones = "[1]" if epochs > 1 else "[]"
    cfg = build_config("icarl", [f"train.epochs={epochs}", f"train.milestones={milestones}", "train.lr=0.5"]).train
    backend = backend_cls(model, lambda: made[-1][0]) if backend_cls else None
    train_task(model, loader, cfg, Criterion("bce", "bce", 5, 10), old, 1, torch.device("cpu"), progress=False,
               graphs=graphs, capture=backend)
    return model, backend


def test_graphed_training_equals_eager_training_bit_for_bit(monkeypatch):
    eager, _ = _graph_case(monkeypatch, "off", None)
    graphed, backend = _graph_case(monkeypatch, "on", StandInCapture)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name
    # 5 epochs x 7 batches, the lr cut after epoch 1. Each shape (32, and 8 for the last
    # batch) warms up 3 times; the full batches are captured in epoch 1 and again for
    # the new lr in epoch 2, the last batch in epoch 4. Every other batch is a replay.
    assert backend.warmups == 6 and backend.captures == 3
    assert backend.replays == 5 * 7 - 6


def test_graphed_step_returns_each_batch_loss_and_copies_each_batch_in():
    torch.manual_seed(0)
    models = [create_model(build_config("icarl").model, 10) for _ in range(2)]
    eager, graphed, backend = eager_and_graphed(models, Criterion("bce", "none", 0, 10))
    g = torch.Generator().manual_seed(2)
    for i in range(4):
        x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        expected, got = eager(x, y), graphed(x, y)
        assert torch.equal(expected, got), i
    assert backend.captures == 1 and backend.replays == 3


def test_a_failed_capture_is_an_error_with_on_and_falls_back_with_auto(monkeypatch):
    with pytest.raises(GraphCaptureError, match="set train.cuda_graphs=off"):
        _graph_case(monkeypatch, "on", FailingCapture, epochs=1)
    eager, _ = _graph_case(monkeypatch, "off", None, epochs=2)
    with pytest.warns(RuntimeWarning, match="training on with eager steps"):
        fallback, backend = _graph_case(monkeypatch, "try", FailingCapture, epochs=2)
    for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()):
        assert torch.equal(a, b)
    assert backend.warmups == 3  # 3 full batches, then the failed capture: eager for good


def test_cuda_graphs_setting_resolves_per_device():
    cfg = build_config("icarl").train
    assert resolve_cuda_graphs(cfg, torch.device("cpu")) == "off"
    assert resolve_cuda_graphs(cfg, torch.device("cuda")) == "try"
    cfg.cuda_graphs = "on"
    assert resolve_cuda_graphs(cfg, torch.device("cuda")) == "on"
    with pytest.raises(ConfigError, match="train.cuda_graphs=on needs a CUDA device"):
        resolve_cuda_graphs(cfg, torch.device("cpu"))
    cfg.cuda_graphs = "off"
    assert resolve_cuda_graphs(cfg, torch.device("cuda")) == "off"


def test_autocast_leaves_the_weight_cache_off_for_capture():
    assert autocast_for(torch.device("cpu"), "bf16")._cache_enabled is False


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_compiled_model_trains_like_the_eager_one():
    # train.compile=true. Inductor's fused kernels round differently from eager
    # ones, and a few SGD steps on a small batch-normalised net magnify any
    # rounding (a 1e-7 nudge to the weights moves the result by about 2% of
    # what training changed). So the compiled run is held to that yardstick:
    # no further from eager than eager from its nudged self, while training
    # itself moves the weights some fifty times further.
    torch.manual_seed(0)
    eager = create_model(build_config("icarl").model, 10).to(memory_format=torch.channels_last)
    compiled, nudged = copy.deepcopy(eager), copy.deepcopy(eager)
    with torch.no_grad():
        for p in nudged.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 1e-7)
    start = _flat(eager)
    cfg = build_config("icarl", ["train.epochs=1", "train.milestones=[]", "train.lr=0.05"]).train
    x = torch.randint(0, 256, (128, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for model in (eager, nudged, torch.compile(compiled)):
        loader = BatchLoader(x, torch.arange(128) % 10, 32, Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)),
                             True, torch.Generator().manual_seed(0), channels_last=True)
        train_task(model, loader, cfg, Criterion("bce", "none", 0, 10), None, 0, torch.device("cpu"), progress=False)
    moved = (_flat(eager) - start).norm()
    rounding = (_flat(nudged) - _flat(eager)).norm()
    apart = (_flat(compiled) - _flat(eager)).norm()
    assert rounding < 0.1 * moved
    assert apart < 3 * rounding, (apart, rounding, moved)
