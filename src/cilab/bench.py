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

``cilab bench batched`` times one step of N ResNets fused into one grouped
network (models/grouped.py) for each N: the other way to put several runs on
one GPU, one process and N-times larger kernels.

``cilab bench concurrency`` runs N short trainings at once, each its own
process on the one device (as ``cilab reproduce --jobs N`` does), for each N
asked for; it reports every run's images and start/end times, the aggregate
images/s (all images / (last end - first start)), and the whole study's
projected wall time from the best N (``study_images``).

Both print one JSON object (and write it with --out). With no real data they
use random CIFAR-shaped data, which costs the same to train on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time
import warnings
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


@contextlib.contextmanager
def _warnings_into(seen: list[str]):
    """Record the warnings raised in the block into ``seen`` (each message once), and show them
    as usual: a figure made while, say, a CUDA-graph capture failed and training went on eagerly
    (train.cuda_graphs=auto) is an eager figure, and the benchmark's JSON must say so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    seen.extend(m for m in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught) if m not in seen)


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
        x, y = _random_cifar(images, num_classes, seed)
        normalizer = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return BatchLoader(x.to(self.device), y.to(self.device), self.cfg.train.batch_size, normalizer, True, gen,
                           self.rt.channels_last)

    def train(self, model, loader: BatchLoader, crit: Criterion, old_model, task: int, epochs: int) -> int:
        """``epochs`` epochs of trainer.train_task (no milestones; the shared config stays as it is)."""
        cfg = dataclasses.replace(self.cfg.train, epochs=epochs, milestones=[])
        return train_task(model, loader, cfg, crit, old_model, task, self.device, self.rt.amp, progress=False,
                          graphs=self.rt.graphs)


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
        self.setup, self.loader = setup, setup.loader(n_task + n_exemplars, 10)
        self.model, self.crit = setup.model(), setup.criterion()

    def __call__(self, epochs: int) -> float:
        _sync(self.setup.device)
        t = time.perf_counter()
        images = self.setup.train(self.model, self.loader, self.crit, None, 0, epochs)
        _sync(self.setup.device)
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
    seen: list[str] = []
    with setup.rt.applied(), _warnings_into(seen):  # train.deterministic, as a run would train
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
        "benchmark": "throughput", **_device_info(device), **setup.settings(), "batch_size": cfg.train.batch_size,
        "images_per_epoch": args.images + args.exemplars, "epochs_per_round": epochs, "rounds": args.rounds,
        "workers": args.workers, "load_average_1min": os.getloadavg()[0],
        "a_bare_step_img_s": med["a"], "b_cilab_trainer_img_s": med["b"], "c_reference_dataloader_img_s": med["c"],
        "b_over_a": med["b"] / med["a"], "b_over_c": med["b"] / med["c"], "all_rounds_img_s": rounds,
    }


def protocol(args) -> dict:
    """Wall time of a whole iCaRL run on CIFAR-100 if present, else random CIFAR-shaped data."""
    from . import experiment

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
        seen: list[str] = []
        t = time.perf_counter()
        with _warnings_into(seen):
            m = experiment.run(cfg, Path(tmp) / "run", progress=not args.quiet)
        wall = time.perf_counter() - t
    tm = m["timing"]
    return {
        "benchmark": "protocol", **_device_info(torch.device(m["device"])), "data": source, "amp": m["amp"],
        "channels_last": m["channels_last"], "cuda_graphs": m["cuda_graphs"], "deterministic": m["deterministic"],
        "cudnn_benchmark": m["cudnn_benchmark"], "compile": cfg.train.compile,
        "tasks": args.tasks, "epochs": args.epochs, "overrides": overrides, "wall_s": wall,
        "train_s": tm["train_s"], "memory_s": tm["memory_s"], "eval_s": tm["eval_s"],
        "memory_and_eval_fraction": (tm["memory_s"] + tm["eval_s"]) / max(tm["total_s"], 1e-9),
        "train_images_per_s": m["train_images_per_s"],
        "final_accuracy_nme": m["nme"]["final_accuracy"], "warnings": seen,
    }


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput, protocol and concurrency benchmarks (JSON out)",
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
    c = bsub.add_parser("concurrency", help="aggregate training images/s of N runs at once on one device, "
                        "and the whole study's projected wall time")
    c.add_argument("--jobs", metavar="N,N,...", help="runs at once to try (default 1,2,4,8 on CUDA, 1,2 on CPU)")
    c.add_argument("--images", type=int, default=5000, help="random CIFAR-shaped training images of each run")
    c.add_argument("--epochs", type=int, default=0, help="timed epochs of each run; 0 = 10 on CUDA, 1 on CPU")
    c.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first (CUDA start, graph capture)")
    c.add_argument("--threads", type=int, help="CPU threads per run (default: the cores divided by N, as reproduce --jobs)")
    _study_arguments(c)
    c.add_argument("--out", type=Path, help="also write the JSON here")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the runs (train.*)")
    c.set_defaults(func=_cmd(concurrency))
    g = bsub.add_parser("batched", help="training images/s of N ResNets fused into one grouped network, per N")
    g.add_argument("--models", metavar="N,N,...", help="networks fused, to try (default 1,2,4,8 on CUDA, 1,2 on CPU)")
    g.add_argument("--steps", type=int, default=0, help="timed steps per N; 0 = 200 on CUDA, 2 on CPU")
    g.add_argument("--processes", type=int, default=1,
                   help="processes, each with its own fused network, timed at once (fused networks under MPS); "
                        "default 1: in this process")
    _study_arguments(g)
    g.add_argument("--out", type=Path, help="also write the JSON here")
    g.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (train.*, model.name=resnet20|resnet32)")
    g.set_defaults(func=_cmd(batched))


def _study_arguments(p) -> None:
    """The projected study's options (concurrency, batched): which runs, and the data's size."""
    p.add_argument("--study-seeds", default="0,1,2", help="seeds of every run of the projected study (default 0,1,2)")
    p.add_argument("--groups-file", type=Path, help="groups of the projected study (default: the bundled groups.yaml)")
    p.add_argument("--classes", type=int, default=100, help="classes of the study's data (CIFAR-100: 100)")
    p.add_argument("--per-class", type=int, default=500,
                   help="training images per class of the study's data (CIFAR-100: 500)")


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


# -- cilab bench concurrency ----------------------------------------------------------------
#
# The study is many small runs; one ResNet-32 run at batch 128 leaves a large
# GPU mostly idle (its step is bound by kernel launches). N runs at once, as
# separate processes on one device (what `cilab reproduce --jobs N` does), fill
# it. This measures the aggregate training images/s for each N and projects
# the study's wall time from the best one.


def study_images(groups: dict | None = None, seeds: list[int] | None = (0, 1, 2), overrides: list[str] = (),
                 classes: int = 100, per_class: int = 500) -> list[dict]:
    """Every run of every `cilab reproduce` group, planned as ``cilab reproduce all`` plans them
    (``seeds`` replacing each run's own, like ``--seeds``; None keeps the group's), with the images
    it trains on (workload.run_images): [{group, name, method, images, copy_of, evaluated_from}].
    ``copy_of`` names the identical run of an earlier group that trains instead, ``evaluated_from``
    the run that trains alike and whose checkpoints this one evaluates (either way ``images`` is 0).
    """
    import tempfile

    from .reproduce import load_groups, plan_study
    from .workload import run_images

    groups = load_groups() if groups is None else groups
    with tempfile.TemporaryDirectory() as tmp:  # plan looks for run folders there: none, all runs are new
        specs = plan_study(list(groups), tmp, list(overrides), groups=groups,
                           seeds=list(seeds) if seeds is not None else None, check_data=False)
    return [{"group": s.group, "name": s.name, "method": s.cfg.method,
             "images": 0 if s.source else run_images(s.cfg, classes, per_class),
             "copy_of": s.source.label if s.action == "copy" else None,
             "evaluated_from": s.source.label if s.action == "evaluate" else None} for s in specs]


def _short_run(conn, barrier, seed: int, overrides: list[str], images: int, epochs: int, warmup_epochs: int,
               threads: int) -> None:
    """One of N simultaneous runs (a spawned process): iCaRL's second-task step on random
    CIFAR-shaped data, warmed up, then ``epochs`` timed epochs started together with the others."""
    try:
        import copy

        torch.set_num_threads(threads)
        setup = Setup(overrides)
        device = setup.device
        with setup.rt.applied():
            loader = setup.loader(images, 20, seed)
            model = setup.model(num_classes=100)
            old = copy.deepcopy(model).eval().requires_grad_(False)
            # the step most of the study's images take: BCE on 10 new outputs, BCE distillation
            # on 10 old ones against the previous model (its forward included)
            crit = Criterion(setup.cfg.loss.classification, setup.cfg.loss.distillation, 10, 20)
            train = lambda n: setup.train(model, loader, crit, old, 1, n)  # noqa: E731
            if warmup_epochs:
                train(warmup_epochs)  # CUDA context, allocator, cuDNN, graph capture: not timed
            _sync(device)
            barrier.wait(timeout=600)
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine (Linux)
            n = train(epochs)
            _sync(device)
            end = time.monotonic()
        conn.send({"images": n, "start": start, "end": end, "threads": threads, "device": str(device)})
    except BaseException as e:  # noqa: BLE001 - reported in the JSON, the next N goes on
        barrier.abort()
        conn.send({"error": f"{type(e).__name__}: {e}"})


def _together(n: int, target, args: tuple, threads: int | None = None) -> dict:
    """``target(conn, barrier, i, *args, threads)`` in n spawned processes on the one device, which
    start their timed part together at the barrier and send back {images, start, end, ...} or
    {error}; their numbers and the aggregate: all images / (last end - first start)."""
    import multiprocessing

    from .executors import cpu_count

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
    runs = []
    for p, recv in zip(procs, pipes):
        try:
            runs.append(recv.recv())
        except EOFError:
            runs.append({"error": "the process died without a word (out of memory?)"})
        p.join()
    out = {"threads_per_run": threads, "runs": runs}
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {**out, "error": "; ".join(dict.fromkeys(errors))}
    for r in runs:
        r["seconds"] = r["end"] - r["start"]
        r["images_per_s"] = r["images"] / r["seconds"]
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    total = sum(r["images"] for r in runs)
    return {**out, "wall_s": wall, "images": total, "aggregate_images_per_s": total / wall}


def concurrent_runs(n: int, overrides: list[str], images: int, epochs: int, warmup_epochs: int,
                    threads: int | None = None) -> dict:
    """N short runs at once, each its own process on the same device; their numbers and the aggregate."""
    return {"jobs": n, **_together(n, _short_run, (overrides, images, epochs, warmup_epochs), threads)}


def _parse_jobs(text: str | None, device: torch.device, option: str = "--jobs") -> list[int]:
    from .config import ConfigError

    if text is None:
        return [1, 2, 4, 8] if device.type == "cuda" else [1, 2]
    try:
        jobs = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        jobs = []
    if not jobs or min(jobs) < 1:
        raise ConfigError(f"{option} must be comma-separated integers >= 1 (e.g. 1,2,4,8), got '{text}'")
    return jobs


def concurrency(args) -> dict:
    """Aggregate img/s of N simultaneous runs for each N, and the study's projected wall time."""
    from .reproduce import _parse_seeds, load_groups

    setup = Setup(args.overrides)  # refuses a bad override or an impossible device before any process starts
    jobs = _parse_jobs(args.jobs, setup.device)
    epochs = args.epochs or (10 if setup.device.type == "cuda" else 1)
    seeds = _parse_seeds(args.study_seeds)
    study = study_images(load_groups(args.groups_file), seeds, classes=args.classes, per_class=args.per_class)
    results = [concurrent_runs(n, args.overrides, args.images, epochs, args.warmup_epochs, args.threads) for n in jobs]
    ok = [r for r in results if "error" not in r]
    base = next((r for r in ok if r["jobs"] == 1), None)
    for r in ok:
        r["speedup_over_one_run"] = r["aggregate_images_per_s"] / base["aggregate_images_per_s"] if base else None
    out = {
        "benchmark": "concurrency", **_device_info(setup.device), **setup.settings(),
        "batch_size": setup.cfg.train.batch_size,
        "images_per_run": args.images, "epochs": epochs, "warmup_epochs": args.warmup_epochs,
        "mps_running": _mps_running(setup.device), "load_average_1min": os.getloadavg()[0],
        "results": results,
    }
    total = sum(r["images"] for r in study)
    longest = max(study, key=lambda r: r["images"])
    study_out = {"seeds": seeds, "classes": args.classes, "train_images_per_class": args.per_class,
                 "runs": len(study), "runs_trained": sum(r["images"] > 0 for r in study),
                 "train_images": total,
                 "groups": {g: {"runs": sum(r["group"] == g for r in study),
                                "train_images": sum(r["images"] for r in study if r["group"] == g)}
                            for g in dict.fromkeys(r["group"] for r in study)},
                 "longest_run": longest, "per_run": study}
    if ok:
        best = max(ok, key=lambda r: r["aggregate_images_per_s"])
        rate = best["aggregate_images_per_s"]
        # The larger of: every image at the aggregate rate (the device's limit), and the
        # longest run at its share of that rate (rate / N), as if it shared the device to
        # its end: an estimate for one pool of N workers that starts the longest runs first.
        study_out.update({
            "best_jobs": best["jobs"], "best_aggregate_images_per_s": rate,
            "projected_train_s_at_best": total / rate,
            "longest_run_s_at_best": longest["images"] / (rate / best["jobs"]),
            "projected_wall_s": max(total / rate, longest["images"] / (rate / best["jobs"])),
            "projected_wall_s_one_at_a_time": total / base["aggregate_images_per_s"] if base else None,
        })
    out["study"] = study_out
    return out


# -- cilab bench batched ----------------------------------------------------------------------
#
# The same step as concurrency's runs (iCaRL's second task: BCE on 10 new outputs,
# BCE distillation on 10 old ones, the old network's forward), for N networks
# fused into one (models/grouped.py), on one fixed batch per network already on
# the device, like throughput's bare step (a): the ceiling of this way of
# sharing the GPU, to set against concurrency's aggregate under MPS.

GROUPED_BLOCKS = {"resnet20": 3, "resnet32": 5}  # blocks per stage of the CIFAR ResNets that fuse


def _fused_steps(setup: Setup, n: int, steps: int, barrier=None) -> dict:
    """``steps`` timed steps of n fused networks (after the warm-up and capture), started at
    ``barrier`` when other processes time theirs too; {images, start, end, graphed}."""
    from .models.grouped import GroupedResNetCifar

    cfg, device = setup.cfg, setup.device
    bs = cfg.train.batch_size
    crit = Criterion(cfg.loss.classification, cfg.loss.distillation, 10, 20)
    torch.manual_seed(0)
    model = GroupedResNetCifar(n, GROUPED_BLOCKS[cfg.model.name], 100).to(device, memory_format=setup.memory_format)
    old = GroupedResNetCifar(n, GROUPED_BLOCKS[cfg.model.name], 100).to(device, memory_format=setup.memory_format)
    old.eval().requires_grad_(False)
    if cfg.train.compile:
        model = torch.compile(model)

    def loss_fn(x, y, out, old_out):
        # every network's mean loss, summed: B x N rows as one batch of B*N, times N
        rows = len(y) * n
        return n * crit(out.logits.reshape(rows, -1), y.reshape(rows), old_out.logits.reshape(rows, -1))

    step, _, _ = build_step(model, cfg.train, loss_fn, old, device, setup.rt.amp, setup.rt.graphs)
    x = torch.randn(bs, 3 * n, 32, 32, device=device).contiguous(memory_format=setup.memory_format)
    y = torch.randint(0, 20, (bs, n), device=device)
    for _ in range(GraphedStep.WARMUP + 2):  # warm-up and capture, not timed
        step(x, y)
    _sync(device)
    if barrier is not None:
        barrier.wait(timeout=600)
    start = time.monotonic()  # one clock for every process of the machine, as concurrency's runs
    for _ in range(steps):
        step(x, y)
    _sync(device)
    end = time.monotonic()
    # a failed capture falls back to eager steps ("try"): say which the figure is
    graphed = isinstance(step, GraphedStep) and not step.failed
    return {"images": steps * bs * n, "start": start, "end": end, "graphed": graphed}


def _fused_process(conn, barrier, i: int, overrides: list[str], n: int, steps: int, threads: int) -> None:
    """One of ``--processes`` processes timing the fused step at once (a spawned process)."""
    try:
        torch.set_num_threads(threads)
        setup = Setup(overrides)
        seen: list[str] = []
        with setup.rt.applied(), _warnings_into(seen):
            r = _fused_steps(setup, n, steps, barrier)
        conn.send({**r, "warnings": seen, "threads": threads, "device": str(setup.device)})
    except BaseException as e:  # noqa: BLE001 - reported in the JSON, the next N goes on
        barrier.abort()
        conn.send({"error": f"{type(e).__name__}: {e}"})


def batched(args) -> dict:
    """Aggregate training img/s of N fused networks for each N, and the study's training time at the best.

    With ``--processes P`` > 1, P processes train their own fused network at once (each as
    concurrency's runs do, with cores // P threads): fused networks under MPS.
    """
    from .config import ConfigError
    from .reproduce import _parse_seeds, load_groups

    setup = Setup(args.overrides)
    cfg, device = setup.cfg, setup.device
    if cfg.model.name not in GROUPED_BLOCKS:
        raise ConfigError(f"bench batched fuses cilab's CIFAR ResNets ({', '.join(GROUPED_BLOCKS)}), "
                          f"not model.name={cfg.model.name}")
    if args.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {args.processes}")
    models = _parse_jobs(args.models, device, "--models")
    steps = args.steps or (200 if device.type == "cuda" else 2)
    results = []
    for n in models:
        if args.processes == 1:
            seen: list[str] = []
            with setup.rt.applied(), _warnings_into(seen):
                r = _fused_steps(setup, n, steps)
            r["warnings"] = seen
            seconds = r.pop("end") - r.pop("start")
            results.append({"models": n, **r, "seconds": seconds, "images_per_s": r["images"] / seconds})
            continue
        together = _together(args.processes, _fused_process, (args.overrides, n, steps))
        if "error" in together:
            results.append({"models": n, **together})
            continue
        results.append({"models": n, "runs": together["runs"], "threads_per_run": together["threads_per_run"],
                        "images": together["images"], "seconds": together["wall_s"],
                        "images_per_s": together["aggregate_images_per_s"],
                        "graphed": all(run["graphed"] for run in together["runs"])})
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise RuntimeError("bench batched: every N failed: " + "; ".join(r["error"] for r in results))
    base = next((r for r in ok if r["models"] == 1), None)
    for r in ok:
        r["speedup_over_one_model"] = r["images_per_s"] / base["images_per_s"] if base else None
    best = max(ok, key=lambda r: r["images_per_s"])
    total = sum(r["images"] for r in study_images(load_groups(args.groups_file), _parse_seeds(args.study_seeds),
                                                  classes=args.classes, per_class=args.per_class))
    return {"benchmark": "batched", **_device_info(device), **setup.settings(),
            "batch_size_per_model": cfg.train.batch_size, "processes": args.processes,
            "mps_running": _mps_running(device), "results": results,
            "study_train_images": total, "best_models": best["models"],
            # a ceiling: every image at the best fused rate, no data loading, herding or evaluation
            "projected_study_train_s_at_best": total / best["images_per_s"]}


def _mps_running(device) -> bool | None:
    from .executors import mps_running

    return mps_running() if device.type == "cuda" else None
