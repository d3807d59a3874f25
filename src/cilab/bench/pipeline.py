"""``cilab bench throughput``: training images/s of (a) the bare step, (b) cilab's trainer and
(c) the common reference pipeline, in one process on one device (see the package's docstring)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..trainer import GraphedStep
from .common import Setup, device_info, random_cifar, sync, warnings_into


class BareStep:
    """(a) forward+backward+step on one fixed batch already on the device: the model's ceiling."""

    def __init__(self, setup: Setup):
        self.step = setup.step(setup.model())
        n, device = setup.cfg.train.batch_size, setup.device
        self.x = torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=setup.memory_format)
        self.y = torch.randint(0, 10, (n,), device=device)
        self.device = device

    def __call__(self, steps: int) -> float:
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self.step(self.x, self.y)
        sync(self.device)
        return steps * len(self.y) / (time.perf_counter() - t)


class CilabTrainer:
    """(b) trainer.train_task on uint8 data on the device, augmented, exemplars mixed in."""

    def __init__(self, setup: Setup, n_task: int, n_exemplars: int):
        self.setup, self.loader = setup, setup.loader(n_task + n_exemplars, 10)
        self.model, self.crit = setup.model(), setup.criterion()

    def __call__(self, epochs: int) -> float:
        sync(self.setup.device)
        t = time.perf_counter()
        images = self.setup.train(self.model, self.loader, self.crit, None, 0, epochs)
        sync(self.setup.device)
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

        x, y = random_cifar(n, 10)
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
        sync(self.device)
        t = time.perf_counter()
        images = 0
        for _ in range(epochs):
            for xb, yb in self.loader:
                xb = xb.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)
                self.step(xb, yb.to(self.device, non_blocking=True))
                images += len(yb)
        sync(self.device)
        return images / (time.perf_counter() - t)


def throughput(args) -> dict:
    """Rounds of a, b, c in turn; medians. Interleaving keeps drifting load
    (another process, thermal state) from favouring whichever ran first."""
    setup = Setup(args.overrides)
    seen: list[str] = []
    with setup.rt.applied(), warnings_into(seen):  # train.deterministic, as a run would train
        out = _throughput(args, setup)
    return {**out, "warnings": seen}


def _throughput(args, setup: Setup) -> dict:
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
        "benchmark": "throughput", **device_info(device), **setup.settings(), "batch_size": cfg.train.batch_size,
        "images_per_epoch": args.images + args.exemplars, "epochs_per_round": epochs, "rounds": args.rounds,
        "workers": args.workers, "load_average_1min": os.getloadavg()[0],
        "a_bare_step_img_s": med["a"], "b_cilab_trainer_img_s": med["b"], "c_reference_dataloader_img_s": med["c"],
        "b_over_a": med["b"] / med["a"], "b_over_c": med["b"] / med["c"], "all_rounds_img_s": rounds,
    }
