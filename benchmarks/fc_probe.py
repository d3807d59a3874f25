"""Evidence for issue 20: where the FC head's logits sit, per output and per epoch, on digits.

For every epoch of every task it records, on the test images of the task
being learnt, the mean logit of (a) the new classes' own outputs at their
true class, (b) the best old output, and the share of those images whose FC
argmax over the seen outputs is a new class. JSON out.

    PYTHONPATH=src python benchmarks/fc_probe.py --out runs/fc_probe.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from cilab import experiment
from cilab.config import build_config


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="icarl")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    over = ["data.name=digits", "scenario.num_tasks=5", "train.epochs=10", "train.milestones=[7,9]",
            "memory.size=200"] + args.overrides
    cfg = build_config(args.preset, over)
    trace: list[dict] = []
    real_run_task, real_train = experiment.Protocol.run_task, experiment.train_task
    state = {}

    def run_task(self, t):
        state["p"], state["t"] = self, t
        real_run_task(self, t)

    def train_task(model, loader, cfg_, loss, old, task, *a, epoch_end=None, **k):
        p = state["p"]
        lo, hi = p.scenario.old(task), p.scenario.seen(task)
        mask = (p.y_test >= lo) & (p.y_test < hi)
        x, y = p.x_test[mask], p.y_test[mask]

        def probe(epoch):
            if epoch_end is not None:
                epoch_end(epoch)
            with torch.no_grad():
                z = p.model.head(p.features(x))
            own = z.gather(1, y[:, None]).squeeze(1)
            best_old = z[:, :lo].max(dim=1).values if lo else torch.full_like(own, float("nan"))
            trace.append({"task": task + 1, "epoch": epoch + 1,
                          "own_logit": own.mean().item(), "best_old_logit": best_old.mean().item(),
                          "unseen_logit": z[:, hi:].mean().item() if hi < z.shape[1] else None,
                          "argmax_new": (z[:, :hi].argmax(1) >= lo).float().mean().item() * 100})

        return real_train(model, loader, cfg_, loss, old, task, *a, epoch_end=probe, **k)

    experiment.Protocol.run_task, experiment.train_task = run_task, train_task
    try:
        with tempfile.TemporaryDirectory() as tmp:
            m = experiment.run(cfg, tmp, progress=False)
    finally:
        experiment.Protocol.run_task, experiment.train_task = real_run_task, real_train
    result = {"preset": args.preset, "overrides": over, "trace": trace,
              "fc_current_task_accuracy": m["fc"]["current_task_accuracy"] if "fc" in m else None}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    r = main()
    for row in r["trace"]:
        print(row)
    print("fc current-task accuracy:", r["fc_current_task_accuracy"])
