"""Benchmarks: training throughput against its ceiling and a reference pipeline, and protocol wall time.

``cilab bench throughput`` measures, in one process on one device, training
images per second of
  (a) the bare step: forward, backward and SGD step of the model on one fixed
      random batch (the ceiling for this model on this device),
  (b) cilab's trainer (trainer.train_task) on CIFAR-shaped uint8 data with
      augmentation and exemplars mixed in,
  (c) the common reference pipeline: a Dataset of PIL images with torchvision
      transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
      Normalize) through torch.utils.data.DataLoader with workers, feeding
      the same model and step;
and the ratios b/a and b/c. All three run the trainer's own step
(``trainer.build_step``: the same model, memory format, autocast, SGD,
and on CUDA the same CUDA-graph capture) with the first task's loss (BCE, no
distillation), so they do the same arithmetic per image and differ only in
how the batches reach the step.

``cilab bench protocol`` times a whole iCaRL run (training, memory, evaluation).

Both print one JSON object (and write it with --out). With no real data they
use random CIFAR-shaped data, which costs the same to train on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import build_config
from .data.loader import BatchLoader, Normalizer
from .experiment import Runtime
from .losses import Criterion
from .models import create_model
from .trainer import GraphedStep, build_step, train_task


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_info(device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Setup:
    """The config and what it resolves to on this machine, shared by a, b and c."""

    def __init__(self, train_overrides: list[str]):
        self.cfg = build_config("icarl", ["data.name=digits", *train_overrides])
        self.rt = Runtime.resolve(self.cfg.train)
        self.device, self.memory_format = self.rt.device, self.rt.memory_format

    def model(self, num_classes: int = 100) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model(self.cfg.model, num_classes).to(self.device, memory_format=self.memory_format)
        return torch.compile(model) if self.cfg.train.compile else model

    def criterion(self) -> Criterion:
        # the first task's loss: BCE over all outputs, no distillation
        return Criterion(self.cfg.loss.classification, "none", 0, 10)

    def step(self, model):
        """The trainer's own step (optimiser, autocast, CUDA graph), as train_task builds it."""
        step, _, _ = build_step(model, self.cfg.train, self.criterion(), None, self.device, self.rt.amp, self.rt.graphs)
        return step


def _random_cifar(n: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    return x, y


class BareStep:
    """(a) forward+backward+step on one fixed batch already on the device: the model's ceiling."""

    def __init__(self, setup: Setup):
        self.step = setup.step(setup.model())
        n, device = setup.cfg.train.batch_size, setup.device
        self.x = torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=setup.memory_format)
        self.y = torch.randint(0, 10, (n,), device=device)
        self.device = device

    def __call__(self, steps: int) -> float:
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self.step(self.x, self.y)
        _sync(self.device)
        return steps * len(self.y) / (time.perf_counter() - t)


class CilabTrainer:
    """(b) trainer.train_task on uint8 data on the device, augmented, exemplars mixed in."""

    def __init__(self, setup: Setup, n_task: int, n_exemplars: int):
        x, y = _random_cifar(n_task + n_exemplars, 10)
        device = setup.device
        normalizer = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        self.loader = BatchLoader(x.to(device), y.to(device), setup.cfg.train.batch_size, normalizer, True, gen,
                                  setup.rt.channels_last)
        self.model = setup.model()
        self.crit = setup.criterion()
        self.cfg, self.device, self.rt = setup.cfg.train, device, setup.rt

    def __call__(self, epochs: int) -> float:
        cfg = dataclasses.replace(self.cfg, epochs=epochs, milestones=[])  # the shared config stays as it is
        _sync(self.device)
        t = time.perf_counter()
        images = train_task(self.model, self.loader, cfg, self.crit, None, 0, self.device, self.rt.amp,
                            progress=False, graphs=self.rt.graphs)
        _sync(self.device)
        return images / (time.perf_counter() - t)


class _PILDataset(torch.utils.data.Dataset):
    """CIFAR-like: HWC uint8 arrays -> PIL image -> transforms, per image (torchvision.datasets.CIFAR100 does this)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


class ReferencePipeline:
    """(c) torchvision-style Dataset of PIL images + transforms through a DataLoader with workers."""

    def __init__(self, setup: Setup, n: int, workers: int):
        from torchvision import transforms

        x, y = _random_cifar(n, 10)
        tf = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        ])
        ds = _PILDataset(x.permute(0, 2, 3, 1).numpy(), y.numpy(), tf)
        self.device = setup.device
        self.loader = torch.utils.data.DataLoader(ds, batch_size=setup.cfg.train.batch_size, shuffle=True,
                                                  num_workers=workers, pin_memory=self.device.type == "cuda",
                                                  persistent_workers=workers > 0)
        self.step = setup.step(setup.model())
        self.fmt = setup.memory_format

    def __call__(self, epochs: int) -> float:
        _sync(self.device)
        t = time.perf_counter()
        images = 0
        for _ in range(epochs):
            for xb, yb in self.loader:
                xb = xb.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
                self.step(xb, yb.to(self.device, non_blocking=True))
                images += len(yb)
        _sync(self.device)
        return images / (time.perf_counter() - t)


def throughput(args) -> dict:
    """Rounds of a, b, c in turn; medians. Interleaving keeps drifting load
    (another process, thermal state) from favouring whichever ran first."""
    setup = Setup(args.overrides)
    cfg, device = setup.cfg, setup.device
    a = BareStep(setup)
    b = CilabTrainer(setup, args.images, args.exemplars)
    c = ReferencePipeline(setup, args.images + args.exemplars, args.workers)
    steps = max(1, (args.images + args.exemplars) // cfg.train.batch_size)  # about one epoch's worth
    # The trainer warms up and captures its CUDA graphs once per call, as it
    # does once per task; on a GPU an epoch is a fraction of a second, so a
    # round is 20 epochs there to weigh that as a task of the protocol would.
    epochs = args.epochs or (20 if device.type == "cuda" else 1)
    # warm-up: allocator, kernel choice, compile, worker start, and (a)'s capture
    a(GraphedStep.WARMUP + 2), b(1), c(1)
    rounds = {"a": [], "b": [], "c": []}
    for _ in range(args.rounds):
        rounds["a"].append(a(steps * epochs))
        rounds["b"].append(b(epochs))
        rounds["c"].append(c(epochs))
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    return {
        "benchmark": "throughput", **_device_info(device), "amp": setup.rt.amp, "channels_last": setup.rt.channels_last,
        "cuda_graphs": setup.rt.graphs, "compile": cfg.train.compile, "batch_size": cfg.train.batch_size, "model": cfg.model.name,
        "images_per_epoch": args.images + args.exemplars, "epochs_per_round": epochs, "rounds": args.rounds,
        "workers": args.workers, "load_average_1min": os.getloadavg()[0],
        "a_bare_step_img_s": med["a"], "b_cilab_trainer_img_s": med["b"], "c_reference_dataloader_img_s": med["c"],
        "b_over_a": med["b"] / med["a"], "b_over_c": med["b"] / med["c"], "all_rounds_img_s": rounds,
    }


def protocol(args) -> dict:
    """Wall time of a whole iCaRL run on CIFAR-100 if present, else random CIFAR-shaped data."""
    from .experiment import run

    overrides = [f"scenario.num_tasks={args.tasks}", f"train.epochs={args.epochs}", "eval.classifiers=[nme,fc]",
                 *args.overrides]
    if args.epochs <= 63 and not any(o.startswith("train.milestones") for o in overrides):
        # the study's milestones (49, 63) scaled to the epochs asked for
        overrides.append(f"train.milestones=[{max(1, round(args.epochs * 0.7))}]" if args.epochs > 1 else "train.milestones=[]")
    with tempfile.TemporaryDirectory() as tmp:
        from .data import DatasetError, load_dataset

        data = ["data.download=false"]
        try:
            load_dataset(build_config("icarl", overrides + data).data)
            source = "cifar100"
        except DatasetError:
            # random CIFAR-shaped data: 100 classes, 500 train / 100 test images each
            path = Path(tmp) / "random_cifar.npz"
            rng = np.random.default_rng(0)
            per = args.train_per_class
            np.savez(path, x_train=rng.integers(0, 256, (100 * per, 32, 32, 3), dtype=np.uint8),
                     y_train=np.arange(100 * per) % 100,
                     x_test=rng.integers(0, 256, (100 * max(1, per // 5), 32, 32, 3), dtype=np.uint8),
                     y_test=np.arange(100 * max(1, per // 5)) % 100)
            data = ["data.name=npz", f"data.path={path}"]
            source = f"random CIFAR-shaped ({per} train images per class)"
        cfg = build_config("icarl", overrides + data)
        t = time.perf_counter()
        m = run(cfg, Path(tmp) / "run", progress=not args.quiet)
        wall = time.perf_counter() - t
    tm = m["timing"]
    return {
        "benchmark": "protocol", **_device_info(torch.device(m["device"])), "data": source, "amp": m["amp"],
        "channels_last": m["channels_last"], "cuda_graphs": m["cuda_graphs"],
        "tasks": args.tasks, "epochs": args.epochs, "overrides": overrides, "wall_s": wall,
        "train_s": tm["train_s"], "memory_s": tm["memory_s"], "eval_s": tm["eval_s"],
        "memory_and_eval_fraction": (tm["memory_s"] + tm["eval_s"]) / max(tm["total_s"], 1e-9),
        "train_images_per_s": m["train_images_per_s"],
        "final_accuracy_nme": m["nme"]["final_accuracy"],
    }


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput and protocol benchmarks (JSON out)",
                       description="Benchmarks; each prints one JSON object. See the README, section Speed.")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    t = bsub.add_parser("throughput", help="training images/s: bare step (a), cilab trainer (b), DataLoader reference (c)")
    t.add_argument("--images", type=int, default=5000, help="task images per epoch for (b) and (c), plus --exemplars")
    t.add_argument("--exemplars", type=int, default=2000, help="exemplars mixed into the task data")
    t.add_argument("--epochs", type=int, default=0,
                   help="timed epochs per round for (b) and (c), (a) does as many steps; 0 = 1 on CPU, 20 on CUDA")
    t.add_argument("--rounds", type=int, default=3, help="rounds of a, b, c in turn; the medians are reported")
    t.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers for (c)")
    t.add_argument("--out", type=Path, help="also write the JSON here")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (train.device, train.amp, ...)")
    t.set_defaults(func=_cmd(throughput))
    q = bsub.add_parser("protocol", help="wall time of a whole iCaRL run, split into training, memory, evaluation")
    q.add_argument("--tasks", type=int, default=10)
    q.add_argument("--epochs", type=int, default=70)
    q.add_argument("--train-per-class", type=int, default=500, help="images per class of the random stand-in data")
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--out", type=Path, help="also write the JSON here")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    q.set_defaults(func=_cmd(protocol))


def _cmd(fn):
    def run_bench(args) -> int:
        result = fn(args)
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return 0

    return run_bench
