"""``cilab bench protocol``: the wall time of a whole iCaRL run, split into training, memory and evaluation."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import build_config
from .common import device_info, warnings_into

CLASSES = 100


def protocol(args) -> dict:
    """Wall time of a whole iCaRL run on CIFAR-100 if present, else random CIFAR-shaped data."""
    from .. import experiment
    from ..config import ConfigError, parse_override

    for key, option in (("scenario.num_tasks", "--tasks"), ("train.epochs", "--epochs")):
        if any(parse_override(o)[0] == key for o in args.overrides):  # else it wins, and the JSON says the option's
            raise ConfigError(f"bench protocol sets {key} with {option}; pass {option} instead")
    first_task = any(parse_override(o)[0] == "scenario.first_task_classes" for o in args.overrides)
    if CLASSES % args.tasks and not first_task:  # CIFAR-100 or its random stand-in: 100 classes
        divisors = ", ".join(str(d) for d in range(1, CLASSES + 1) if CLASSES % d == 0)
        raise ConfigError(f"--tasks {args.tasks} does not divide the {CLASSES} classes; choose one of {divisors}")
    overrides = [f"scenario.num_tasks={args.tasks}", f"train.epochs={args.epochs}", "eval.classifiers=[nme,fc]",
                 *args.overrides]
    if args.epochs <= 63 and not any(o.startswith("train.milestones") for o in overrides):
        # the study's milestones (49, 63) scaled to the epochs asked for
        overrides.append(f"train.milestones=[{max(1, round(args.epochs * 0.7))}]" if args.epochs > 1 else "train.milestones=[]")
    with tempfile.TemporaryDirectory() as tmp:
        from ..data import DatasetError, load_dataset

        data = ["data.download=false"]
        try:
            load_dataset(build_config("icarl", overrides + data).data)
            source = "cifar100"
        except DatasetError:
            # random CIFAR-shaped data: 100 classes, 500 train / 100 test images each
            path = Path(tmp) / "random_cifar.npz"
            rng = np.random.default_rng(0)
            per = args.train_per_class
            n, n_test = CLASSES * per, CLASSES * max(1, per // 5)
            np.savez(path, x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                     y_train=np.arange(n) % CLASSES,
                     x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
                     y_test=np.arange(n_test) % CLASSES)
            data = ["data.name=npz", f"data.path={path}"]
            source = f"random CIFAR-shaped ({per} train images per class)"
        cfg = build_config("icarl", overrides + data)
        seen: list[str] = []
        t = time.perf_counter()

        def result(m: dict, warned: list[str]) -> dict:
            tm = m["timing"]
            return {
                "benchmark": "protocol", **device_info(torch.device(m["device"])), "data": source, "amp": m["amp"],
                "channels_last": m["channels_last"], "cuda_graphs": m["cuda_graphs"],
                "deterministic": m["deterministic"], "cudnn_benchmark": m["cudnn_benchmark"],
                "compile": cfg.train.compile, "tasks": args.tasks, "epochs": args.epochs, "overrides": overrides,
                "wall_s": time.perf_counter() - t, "completed_tasks": m["completed_tasks"],
                "train_s": tm["train_s"], "memory_s": tm["memory_s"], "eval_s": tm["eval_s"],
                "memory_and_eval_fraction": (tm["memory_s"] + tm["eval_s"]) / max(tm["total_s"], 1e-9),
                "train_images_per_s": m["train_images_per_s"], "per_task": tm["per_task"],
                "final_accuracy_nme_percent": m["nme"]["accuracy"][-1], "warnings": warned,
            }

        with warnings_into(seen) as warned_so_far:
            # after each task, the figures so far: protocol 10 x 70 cut off at gpu.sh's timeout keeps them
            m = experiment.run(cfg, Path(tmp) / "run", progress=not args.quiet,
                               on_task=lambda so_far: args.partial(result(so_far, warned_so_far())))
        return result(m, seen)
