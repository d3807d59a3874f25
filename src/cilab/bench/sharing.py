"""``cilab bench concurrency``: several runs on one device at once.

The study is many small runs; one ResNet-32 run at batch 128 leaves a large
GPU mostly idle (its step is bound by kernel launches). N runs at once, as
separate processes on one device (what `cilab reproduce --jobs N` does), fill
it. This measures the aggregate training images/s for each N and projects
the study's wall time from the best one.
"""

from __future__ import annotations

import os
import time

import torch

from ..losses import Criterion
from .common import Setup, device_info, mps_running_on, parse_jobs, spawn_together, sync


def study_images(groups: dict | None = None, seeds: list[int] | None = (0, 1, 2), overrides: list[str] = (),
                 classes: int = 100, per_class: int = 500) -> list[dict]:
    """Every run of every `cilab reproduce` group, planned as ``cilab reproduce all`` plans them
    (``seeds`` replacing each run's own, like ``--seeds``; None keeps the group's), with the images
    it trains on (workload.run_images): [{group, name, method, images, copy_of, evaluated_from}].
    ``copy_of`` names the identical run of an earlier group that trains instead, ``evaluated_from``
    the run that trains alike and whose checkpoints this one evaluates (either way ``images`` is 0).
    """
    import tempfile

    from ..studyplan import load_groups, plan_study
    from ..workload import run_images

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
            sync(device)
            barrier.wait(timeout=600)
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine (Linux)
            n = train(epochs)
            sync(device)
            end = time.monotonic()
        conn.send({"images": n, "start": start, "end": end, "threads": threads, "device": str(device)})
    except BaseException as e:  # noqa: BLE001 - reported in the JSON, the next N goes on
        barrier.abort()
        conn.send({"error": f"{type(e).__name__}: {e}"})


def concurrent_runs(n: int, overrides: list[str], images: int, epochs: int, warmup_epochs: int,
                    threads: int | None = None) -> dict:
    """N short runs at once, each its own process on the same device; their numbers and the aggregate."""
    return {"jobs": n, **spawn_together(n, _short_run, (overrides, images, epochs, warmup_epochs), threads)}


def concurrency(args) -> dict:
    """Aggregate img/s of N simultaneous runs for each N, and the study's projected wall time."""
    from ..studyplan import load_groups, parse_seeds

    setup = Setup(args.overrides)  # refuses a bad override or an impossible device before any process starts
    jobs = parse_jobs(args.jobs, setup.device)
    epochs = args.epochs or (10 if setup.device.type == "cuda" else 1)
    seeds = parse_seeds(args.study_seeds, "--study-seeds")
    study = study_images(load_groups(args.groups_file), seeds, classes=args.classes, per_class=args.per_class)
    results = []
    for n in jobs:
        results.append(concurrent_runs(n, args.overrides, args.images, epochs, args.warmup_epochs, args.threads))
        args.partial({"benchmark": "concurrency", "results": results})
    ok = [r for r in results if "error" not in r]
    base = next((r for r in ok if r["jobs"] == 1), None)
    for r in ok:
        r["speedup_over_one_run"] = r["aggregate_images_per_s"] / base["aggregate_images_per_s"] if base else None
    out = {
        "benchmark": "concurrency", **device_info(setup.device), **setup.settings(),
        "batch_size": setup.cfg.train.batch_size,
        "images_per_run": args.images, "epochs": epochs, "warmup_epochs": args.warmup_epochs,
        "mps_running": mps_running_on(setup.device), "load_average_1min": os.getloadavg()[0],
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
