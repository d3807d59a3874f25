"""What the benchmarks share: the config and device they train under, and how they describe them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import warnings

import torch

from ..config import ConfigError, build_config
from ..data.loader import BatchLoader, Normalizer
from ..losses import Criterion
from ..models import create_model
from ..runtime import Runtime
from ..trainer import build_step, train_task


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def warnings_into(seen: list[str]):
    """Record the warnings raised in the block into ``seen`` (each message once), and show them
    as usual: a figure made while, say, a CUDA-graph capture failed and training went on eagerly
    (train.cuda_graphs=auto) is an eager figure, and the benchmark's JSON must say so.

    Yields a function giving the messages recorded so far, for a JSON written before the block ends.
    """
    caught: list = []

    def messages() -> list[str]:
        return list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:  # after the recording ends (showwarning is the real one again), and when the block fails too
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        seen.extend(m for m in messages() if m not in seen)


def device_info(device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Setup:
    """The config and what it resolves to on this machine, shared by a, b and c.

    These benchmarks train random CIFAR-shaped data with iCaRL's step: of the overrides only
    the sections they read apply (``APPLIES``); any other is refused rather than ignored."""

    APPLIES = ("train", "model", "loss")

    def __init__(self, train_overrides: list[str]):
        keys = [o.split("=", 1)[0].strip() for o in train_overrides]
        stray = [k for k in keys if k.split(".", 1)[0] not in self.APPLIES]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: this benchmark trains random CIFAR-shaped data and reads only "
                              f"{', '.join(s + '.*' for s in self.APPLIES)} overrides; leave the others out")
        self.cfg = build_config("icarl", ["data.name=digits", *train_overrides])
        self.rt = Runtime.resolve(self.cfg.train)
        self.device, self.memory_format = self.rt.device, self.rt.memory_format

    def settings(self) -> dict:
        """What the benchmark trains under, for its JSON. cuDNN autotuning is read from torch while
        the run's settings are applied, as metrics.json records it: on a CPU, where
        train.cudnn_benchmark=auto leaves torch's flag alone, that is the flag as it was."""
        with self.rt.applied():
            cudnn_benchmark = torch.backends.cudnn.benchmark
        return {"amp": self.rt.amp, "channels_last": self.rt.channels_last, "cuda_graphs": self.rt.graphs,
                "deterministic": self.rt.deterministic, "cudnn_benchmark": cudnn_benchmark,
                "compile": self.cfg.train.compile, "model": self.cfg.model.name}

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

    def loader(self, images: int, num_classes: int, seed: int = 0) -> BatchLoader:
        """Random CIFAR-shaped uint8 data on the device, batched and augmented as a run's task data."""
        x, y = random_cifar(images, num_classes, seed)
        normalizer = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return BatchLoader(x.to(self.device), y.to(self.device), self.cfg.train.batch_size, normalizer, True, gen,
                           self.rt.channels_last)

    def train(self, model, loader: BatchLoader, crit: Criterion, old_model, task: int, epochs: int) -> int:
        """``epochs`` epochs of trainer.train_task (no milestones; the shared config stays as it is)."""
        cfg = dataclasses.replace(self.cfg.train, epochs=epochs, milestones=[])
        return train_task(model, loader, cfg, crit, old_model, task, self.device, self.rt.amp, progress=False,
                          graphs=self.rt.graphs)


def random_cifar(n: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % num_classes
    return x, y


def parse_jobs(text: str | None, device: torch.device, option: str = "--jobs") -> list[int]:
    if text is None:
        return [1, 2, 4, 8] if device.type == "cuda" else [1, 2]
    try:
        jobs = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        jobs = []
    if not jobs or min(jobs) < 1:
        raise ConfigError(f"{option} must be comma-separated integers >= 1 (e.g. 1,2,4,8), got '{text}'")
    return jobs


def mps_running_on(device) -> bool | None:
    from ..executors import mps_running

    return mps_running() if device.type == "cuda" else None


def spawn_together(n: int, target, args: tuple, threads: int | None = None) -> dict:
    """``target(conn, barrier, i, *args, threads)`` in n spawned processes on the one device, which
    start their timed part together at the barrier and send back {images, start, end, ...} or
    {error}; their numbers and the aggregate: all images / (last end - first start)."""
    import multiprocessing
    from multiprocessing.connection import wait

    from ..executors import cpu_count

    ctx = multiprocessing.get_context("spawn")  # like reproduce --jobs: fresh processes, no inherited CUDA state
    threads = threads or max(1, cpu_count() // n)  # reproduce --jobs N's default
    barrier = ctx.Barrier(n)
    procs, pipes = [], []
    for i in range(n):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(send, barrier, i, *args, threads), daemon=True)  # never outlives the benchmark
        p.start()
        send.close()
        procs.append(p)
        pipes.append(recv)
    # Each result as it comes: a process that dies without a word (killed for memory, a crash in
    # CUDA) breaks the barrier at once, or the others would wait for it until the barrier's timeout.
    runs: list[dict | None] = [None] * n
    while None in runs:
        waiting = [i for i in range(n) if runs[i] is None]
        ready = wait([pipes[i] for i in waiting] + [procs[i].sentinel for i in waiting])
        for i in waiting:
            if pipes[i] in ready or procs[i].sentinel in ready:
                try:
                    runs[i] = pipes[i].recv()
                except EOFError:
                    procs[i].join()
                    runs[i] = {"error": f"the process died without a word (exit code {procs[i].exitcode}; "
                                        "out of memory?)"}
                    barrier.abort()
    for p in procs:
        p.join()
    return {"threads_per_run": threads, **combine_runs(runs)}


def combine_runs(runs: list[dict]) -> dict:
    """Runs timed together ({images, start, end} on one clock, or {error}) -> each run's seconds and
    images/s, and all images / (last end - first start); {runs, error} if any failed."""
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"runs": runs, "error": "; ".join(dict.fromkeys(errors))}
    for r in runs:
        r["seconds"] = r["end"] - r["start"]
        r["images_per_s"] = r["images"] / r["seconds"]
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    total = sum(r["images"] for r in runs)
    return {"runs": runs, "wall_s": wall, "images": total, "aggregate_images_per_s": total / wall}
