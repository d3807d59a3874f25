"""Benchmarks (``cilab bench``), each printing one JSON object (and writing it with --out).

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
(pipeline.py, wholerun.py)

``cilab bench batched`` times one step of N ResNets fused into one grouped
network (models/grouped.py) for each N: the other way to put several runs on
one GPU, one process and N-times larger kernels (fused.py).

``cilab bench concurrency`` runs N short trainings at once, each its own
process on the one device (as ``cilab reproduce --jobs N`` does), for each N
asked for; it reports every run's images and start/end times, the aggregate
images/s (all images / (last end - first start)), and the whole study's
projected wall time from the best N (``study_images``) (sharing.py).

With no real data they use random CIFAR-shaped data, which costs the same to
train on. What they share (the config they train under, the device's
description) is in common.py.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import results, runfolder
from ..config import ConfigError
from ..results import RunFolderError
from . import fused, pipeline, sharing, wholerun
from .sharing import study_images

__all__ = ["add_parser", "study_images"]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput, protocol, concurrency and batched benchmarks (JSON out)",
                       description="Benchmarks; each prints one JSON object. See the README, section Speed.")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    t = bsub.add_parser("throughput", help="training images/s: bare step (a), cilab trainer (b), DataLoader reference (c)",
                        description="Training images/s of (a) the bare step on one batch, (b) cilab's trainer and (c) "
                        "a torchvision DataLoader pipeline, all through the trainer's own step; rounds of a, b, c in "
                        "turn, medians reported (README, Speed).")
    t.add_argument("--images", type=_count(1), default=5000, help="task images per epoch for (b) and (c), plus --exemplars")
    t.add_argument("--exemplars", type=_count(0), default=2000, help="exemplars mixed into the task data")
    t.add_argument("--epochs", type=_count(0), default=0,
                   help="timed epochs per round for (b) and (c), (a) does as many steps; 0 = 1 on CPU, 20 on CUDA")
    t.add_argument("--rounds", type=_count(1), default=3, help="rounds of a, b, c in turn; the medians are reported")
    t.add_argument("--workers", type=_count(0), default=min(4, os.cpu_count() or 1), help="DataLoader workers for (c)")
    t.add_argument("--out", type=Path, help="also write the JSON here")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="train.*, model.*, loss.* overrides (train.device, train.amp, ...)")
    t.set_defaults(func=_cmd(pipeline.throughput))
    q = bsub.add_parser("protocol", help="wall time of a whole iCaRL run, split into training, memory, evaluation",
                        description="Times a whole iCaRL run (CIFAR-100 if it is in data.root, else random "
                        "CIFAR-shaped data) and splits it into training, memory building and evaluation "
                        "(README, Speed).")
    q.add_argument("--tasks", type=_count(1), default=10, help="tasks (default 10)")
    q.add_argument("--epochs", type=_count(1), default=70,
                   help="epochs a task (default 70; the study's milestones 49, 63 scale with fewer)")
    q.add_argument("--train-per-class", type=_count(1), default=500, help="images per class of the random stand-in data")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--out", type=Path, help="also write the JSON here")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    q.set_defaults(func=_cmd(wholerun.protocol))
    c = bsub.add_parser("concurrency", help="aggregate training images/s of N runs at once on one device, "
                        "and the whole study's projected wall time")
    c.add_argument("--jobs", metavar="N,N,...", help="runs at once to try (default 1,2,4,8 on CUDA, 1,2 on CPU)")
    c.add_argument("--images", type=_count(1), default=5000, help="random CIFAR-shaped training images of each run")
    c.add_argument("--epochs", type=_count(0), default=0, help="timed epochs of each run; 0 = 10 on CUDA, 1 on CPU")
    c.add_argument("--warmup-epochs", type=_count(0), default=1, help="untimed epochs first (CUDA start, graph capture)")
    c.add_argument("--threads", type=_count(1), help="CPU threads per run (default: the cores divided by N, as reproduce --jobs)")
    _study_arguments(c)
    c.add_argument("--out", type=Path, help="also write the JSON here")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="train.*, model.*, loss.* overrides for the runs")
    c.set_defaults(func=_cmd(sharing.concurrency))
    g = bsub.add_parser("batched", help="training images/s of N ResNets fused into one grouped network, per N")
    g.add_argument("--models", metavar="N,N,...", help="networks fused, to try (default 1,2,4,8 on CUDA, 1,2 on CPU)")
    g.add_argument("--steps", type=_count(0), default=0, help="timed steps per N; 0 = 200 on CUDA, 2 on CPU")
    g.add_argument("--processes", type=_count(1), default=1,
                   help="processes, each with its own fused network, timed at once (fused networks under MPS); "
                        "default 1: in this process")
    _study_arguments(g)
    g.add_argument("--out", type=Path, help="also write the JSON here")
    g.add_argument("overrides", nargs="*", metavar="key=value",
                   help="train.*, loss.* and model.name=resnet20|resnet32 overrides")
    g.set_defaults(func=_cmd(fused.batched))


def _study_arguments(p) -> None:
    """The projected study's options (concurrency, batched): which runs, and the data's size."""
    p.add_argument("--study-seeds", default="0,1,2", help="seeds of every run of the projected study (default 0,1,2)")
    p.add_argument("--groups-file", type=Path, help="groups of the projected study (default: the bundled groups.yaml)")
    p.add_argument("--classes", type=_count(1), default=100, help="classes of the study's data (CIFAR-100: 100)")
    p.add_argument("--per-class", type=_count(1), default=500,
                   help="training images per class of the study's data (CIFAR-100: 500)")


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum`` (images, epochs, steps, rounds ...)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _check_out(out: Path | None) -> None:
    """Refuse an --out the JSON cannot be written to, before the benchmark runs (it writes at the end)."""
    if out is None:
        return
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name for the JSON")
    try:
        runfolder.check_writable(out.parent)  # a file on the way to it, permissions, a read-only mount
    except RunFolderError as e:
        raise ConfigError(f"cannot write --out {out}: {e}") from None


def _cmd(fn):
    def run_bench(args) -> int:
        _check_out(args.out)

        def partial(so_far: dict) -> None:
            """What is timed so far, into --out: a benchmark killed at a timeout (gpu.sh's steps) keeps it."""
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                results.atomic_write_json(args.out, {**so_far, "partial": True})

        args.partial = partial  # benchmarks that time several N call it after each
        result = fn(args)
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return 0

    return run_bench
