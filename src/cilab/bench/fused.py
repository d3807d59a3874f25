"""``cilab bench batched``: N networks fused into one (models/grouped.py).

The same step as concurrency's runs (iCaRL's second task: BCE on 10 new outputs,
BCE distillation on 10 old ones, the old network's forward), for N networks
fused into one (models/grouped.py), on one fixed batch per network already on
the device, like throughput's bare step (a): the ceiling of this way of
sharing the GPU, to set against concurrency's aggregate under MPS.
"""

from __future__ import annotations

import time

import torch

from ..losses import Criterion
from ..trainer import GraphedStep, build_step
from .common import (Setup, combine_runs, device_info, mps_running_on, parse_jobs, spawn_together, sync,
                     warnings_into)
from .sharing import study_images

GROUPED_BLOCKS = {"resnet20": 3, "resnet32": 5}  # blocks per stage of the CIFAR ResNets that fuse


def _fused_steps(setup: Setup, n: int, steps: int, barrier=None) -> dict:
    """``steps`` timed steps of n fused networks (after the warm-up and capture), started at
    ``barrier`` when other processes time theirs too; {images, start, end, graphed}."""
    from ..models.grouped import GroupedResNetCifar

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
    sync(device)
    if barrier is not None:
        barrier.wait(timeout=600)
    start = time.monotonic()  # one clock for every process of the machine, as concurrency's runs
    for _ in range(steps):
        step(x, y)
    sync(device)
    end = time.monotonic()
    # a failed capture falls back to eager steps ("try"): say which the figure is
    graphed = isinstance(step, GraphedStep) and not step.failed
    return {"images": steps * bs * n, "start": start, "end": end, "graphed": graphed}


def _fused_process(conn, barrier, i: int, overrides: list[str], n: int, steps: int, threads: int) -> None:
    """One of ``--processes`` processes timing the fused step at once (a spawned process)."""
    seen: list[str] = []
    try:
        torch.set_num_threads(threads)
        setup = Setup(overrides)
        with setup.rt.applied(), warnings_into(seen):
            r = _fused_steps(setup, n, steps, barrier)
        conn.send({**r, "warnings": seen, "threads": threads, "device": str(setup.device)})
    except BaseException as e:  # noqa: BLE001 - reported in the JSON, the next N goes on
        barrier.abort()
        conn.send({"error": f"{type(e).__name__}: {e}", "warnings": seen})


def batched(args) -> dict:
    """Aggregate training img/s of N fused networks for each N, and the study's training time at the best.

    With ``--processes P`` > 1, P processes train their own fused network at once (each as
    concurrency's runs do, with cores // P threads): fused networks under MPS.
    """
    from ..config import ConfigError
    from ..studyplan import load_groups, parse_seeds

    setup = Setup(args.overrides)
    cfg, device = setup.cfg, setup.device
    # the study's size, read before the timing so a bad option costs nothing
    study = study_images(load_groups(args.groups_file), parse_seeds(args.study_seeds, "--study-seeds"),
                         classes=args.classes, per_class=args.per_class)
    if cfg.model.name not in GROUPED_BLOCKS:
        raise ConfigError(f"bench batched fuses cilab's CIFAR ResNets ({', '.join(GROUPED_BLOCKS)}), "
                          f"not model.name={cfg.model.name}")
    models = parse_jobs(args.models, device, "--models")
    steps = args.steps or (200 if device.type == "cuda" else 2)
    results = []
    for n in models:
        if args.processes == 1:  # here, timed as one of spawn_together's processes would be
            seen: list[str] = []
            with setup.rt.applied(), warnings_into(seen):
                run = _fused_steps(setup, n, steps)
            together = {"threads_per_run": torch.get_num_threads(), **combine_runs([{**run, "warnings": seen}])}
        else:
            together = spawn_together(args.processes, _fused_process, (args.overrides, n, steps))
        if "error" in together:
            results.append({"models": n, **together})
        else:
            runs = together["runs"]
            results.append({"models": n, "steps": steps, "runs": runs, "threads_per_run": together["threads_per_run"],
                            "images": together["images"], "seconds": together["wall_s"],
                            "images_per_s": together["aggregate_images_per_s"],
                            "graphed": all(r["graphed"] for r in runs),
                            "warnings": list(dict.fromkeys(w for r in runs for w in r["warnings"]))})
        args.partial({"benchmark": "batched", "processes": args.processes, "results": results})
    ok = [r for r in results if "error" not in r]
    if not ok:
        raise RuntimeError("bench batched: every N failed: " + "; ".join(r["error"] for r in results))
    base = next((r for r in ok if r["models"] == 1), None)
    for r in ok:
        r["speedup_over_one_model"] = r["images_per_s"] / base["images_per_s"] if base else None
    best = max(ok, key=lambda r: r["images_per_s"])
    total = sum(r["images"] for r in study)
    return {"benchmark": "batched", **device_info(device), **setup.settings(),
            "batch_size_per_model": cfg.train.batch_size, "processes": args.processes,
            "mps_running": mps_running_on(device), "results": results,
            "study_train_images": total, "best_models": best["models"],
            # a ceiling: every image at the best fused rate, no data loading, herding or evaluation
            "projected_study_train_s_at_best": total / best["images_per_s"]}
