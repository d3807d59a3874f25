"""Helpers the test modules share: small datasets, written run folders, checks of a run's
bookkeeping, an interrupted-and-resumed run, and a stand-in for CUDA-graph capture.

A plain module (not a conftest, not a test module), so that a test imports what it uses by
name and importing it runs no other module's tests or fixtures.
"""

import contextlib
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cilab import results
from cilab.config import build_config
from cilab.trainer import GraphBackend, GraphedStep, build_step

# Overrides under which two runs of one seed agree bit for bit on this machine. On a CPU runs
# repeat anyway (at one torch thread count); on a GPU they need deterministic algorithms: without
# them two CUDA runs of one seed differ (cuDNN's atomics), and on an H100 the EWC and LUCIR resume
# tests failed so (README, "Deterministic CUDA").
REPEATABLE = ["train.deterministic=true"] if torch.cuda.is_available() else []


# -- datasets -------------------------------------------------------------------------------

def small_npz(path: Path, **over) -> Path:
    """An npz dataset of 4 classes of random 8x8 grey images (10 train, 2 test a class); ``over``
    replaces arrays, to make a file bad in one named way."""
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.repeat(np.arange(4), 10),
                  x_test=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y_test=np.repeat(np.arange(4), 2))
    np.savez(path, **{**arrays, **over})
    return path


def tiny_npz(path, per_class=12, test_per_class=4):
    """A real but small dataset: the first images of each digit (10 classes)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    xs, ys, xt, yt = [], [], [], []
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        xs.append(d.images[idx[:per_class]])
        xt.append(d.images[idx[per_class: per_class + test_per_class]])
        ys += [c] * per_class
        yt += [c] * test_per_class
    u8 = lambda a: (np.concatenate(a) * (255 / 16)).round().astype(np.uint8)  # noqa: E731
    np.savez(path, x_train=u8(xs), y_train=np.array(ys), x_test=u8(xt), y_test=np.array(yt))
    return path


def npz_overrides(npz, tasks=5):
    """The fastest settings that still train: one batch per task, ResNet-20, K=20."""
    return ["data.name=npz", f"data.path={npz}", f"scenario.num_tasks={tasks}", "train.epochs=1", "train.milestones=[]",
            "train.batch_size=64", "memory.size=20", "model.name=resnet20"]


def write_fake_cifar100(root, n_train=20, n_test=10, monkeypatch=None):
    """A small file set in torchvision's on-disk CIFAR-100 format; its md5s patched in."""
    from torchvision.datasets import CIFAR100

    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(100)]
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n * 100, 3072), dtype=np.uint8),
                 "fine_labels": np.repeat(np.arange(100), n).tolist(), "coarse_labels": [0] * (n * 100)}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    md5 = lambda f: hashlib.md5((folder / f).read_bytes()).hexdigest()  # noqa: E731
    if monkeypatch is not None:
        monkeypatch.setattr(CIFAR100, "train_list", [["train", md5("train")]])
        monkeypatch.setattr(CIFAR100, "test_list", [["test", md5("test")]])
        monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5("meta")})
    return folder


# -- run folders and runs ---------------------------------------------------------------------

def fake_metrics(preset, seed, overrides, acc_by_clf, status="complete", cpt=2):
    """A metrics.json as experiment.run writes it, from accuracy lists (one per classifier)."""
    from cilab.evaluation import summarize

    n = len(next(iter(acc_by_clf.values())))
    m = {"method": preset, "preset": preset, "seed": seed, "overrides": overrides + [f"seed={seed}"],
         "dataset": "digits", "classes_per_task": cpt, "num_tasks": n, "classifiers": list(acc_by_clf),
         "status": status, "completed_tasks": n if status == "complete" else n - 2, "memory_total": [0] * n}
    for c, acc in acc_by_clf.items():
        matrix = [[acc[t] + j for j in range(t + 1)] + [None] * (n - t - 1) for t in range(n)]
        m[c] = {"accuracy": acc, "current_task_accuracy": [a + 5 for a in acc], "accuracy_matrix": matrix,
                **summarize(acc, matrix)}
    return m


def write_run(folder, metrics):
    folder.mkdir(parents=True)
    results.atomic_write_json(folder / results.METRICS, metrics)
    return folder


def check_bookkeeping(out, m):
    """Every accuracy in metrics.json recomputed from the saved confusion matrices, and every
    confusion row checked against the dataset's own test-image count of that class.

    Independent of evaluation.py: the class counts come from the dataset (as the run
    folder's config.yaml names it) and the class order, accuracies from confusion traces.
    Catches accuracies over the wrong images (unseen classes, another task), a shifted
    accuracy matrix, lost or double-counted images.
    """
    import yaml

    from cilab.config import config_from_dict
    from cilab.data import load_dataset
    from cilab.results import CONFIG

    y_test = load_dataset(config_from_dict(yaml.safe_load((out / CONFIG).read_text())).data).y_test
    per_class = [int((y_test == c).sum()) for c in m["class_order"]]  # output k = k-th class of the order
    cpt = m["classes_per_task"]
    with np.load(out / "confusion.npz") as z:
        for clf in m["classifiers"]:
            r = m[clf]
            for t in range(m["num_tasks"]):
                cm = z[f"{clf}_task{t + 1:02d}"]
                n = cpt * (t + 1)
                # one more column, for predictions of classes not seen yet, only where the
                # arg-max may pick one: the FC head over all its outputs (eval.fc_scope=all)
                unseen = clf == "fc" and r["scope"] == "all"
                assert cm.shape == (n, n + 1 if unseen else n), (clf, t, cm.shape)
                assert cm.sum(axis=1).tolist() == per_class[:n], (clf, t)
                assert r["accuracy"][t] == pytest.approx(100.0 * np.trace(cm) / cm.sum()), (clf, t)
                for j in range(t + 1):
                    block = cm[j * cpt:(j + 1) * cpt]
                    hits = sum(block[i, j * cpt + i] for i in range(cpt))
                    assert r["accuracy_matrix"][t][j] == pytest.approx(100.0 * hits / block.sum()), (clf, t, j)
                assert r["accuracy_matrix"][t][t + 1:] == [None] * (m["num_tasks"] - t - 1)
                assert r["current_task_accuracy"][t] == pytest.approx(r["accuracy_matrix"][t][t])
            assert r["final_accuracy"] == r["accuracy"][-1]
            assert r["average_incremental_accuracy"] == pytest.approx(sum(r["accuracy"]) / len(r["accuracy"]))


def interrupted_and_resumed(cfg, tmp_path, monkeypatch, stop_at: int = 2):
    """(the uninterrupted run's metrics, the metrics of a run stopped before task stop_at+1 and resumed).

    Both runs take REPEATABLE."""
    from cilab import experiment
    from cilab.config import config_from_dict, deep_merge, overrides_to_dict

    cfg = config_from_dict(deep_merge(cfg.to_dict(), overrides_to_dict(REPEATABLE)))
    whole = experiment.run(cfg, tmp_path / "whole", progress=False)
    real = experiment.Protocol.run_task

    def stop(self, t):
        if t == stop_at:
            raise KeyboardInterrupt
        real(self, t)

    monkeypatch.setattr(experiment.Protocol, "run_task", stop)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(experiment.Protocol, "run_task", real)
    return whole, experiment.run(cfg, tmp_path / "cut", resume=True, progress=False)


# -- CUDA-graph capture on a CPU --------------------------------------------------------------

class StandInCapture(GraphBackend):
    """A CPU stand-in for torch.cuda.graph that keeps a capture's contract.

    Capturing runs nothing (every tensor is left as it was); a replay recomputes the recorded
    step from the static inputs into the static output; the Python numbers of the step (the
    learning rate) stay those of the capture. Tests put it behind GraphedStep to check the
    loop around it: warm-up, a capture per batch shape and learning rate, the copy of each
    batch into the static inputs, the loss handed back. tests/test_cuda.py runs the real
    capture where a GPU is present."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer  # optimizer: () -> the step's optimiser
        self.warmups = self.captures = self.replays = 0

    def _state(self):
        opt = self.optimizer()
        bufs = [opt.state[p]["momentum_buffer"] for p in self.model.parameters() if p in opt.state]
        return [*self.model.parameters(), *self.model.buffers(), *bufs]

    def warmup(self):
        self.warmups += 1
        return contextlib.nullcontext()

    def capture(self, fn):
        self.captures += 1
        saved = [t.detach().clone() for t in self._state()]
        out = fn().detach().clone()
        with torch.no_grad():  # a real capture executes nothing: undo the step
            for t, s in zip(self._state(), saved):
                t.copy_(s)
        groups = self.optimizer().param_groups
        frozen_lrs = [g["lr"] for g in groups]  # a graph keeps the kernel arguments of its capture

        def replay():
            self.replays += 1
            now = [g["lr"] for g in groups]
            for g, lr in zip(groups, frozen_lrs):
                g["lr"] = lr
            out.copy_(fn().detach())
            for g, lr in zip(groups, now):
                g["lr"] = lr

        return replay, out


def eager_and_graphed(models, loss):
    """(an eager step of models[0], a graphed step of models[1] on a stand-in capture, the backend),
    both with ``loss`` and one optimiser setting: the two models must start equal."""
    models[1].load_state_dict(models[0].state_dict())
    cfg = build_config("icarl", ["train.lr=0.5"]).train
    eager, _, _ = build_step(models[0], cfg, loss, None, torch.device("cpu"))
    step, opt, _ = build_step(models[1], cfg, loss, None, torch.device("cpu"))
    backend = StandInCapture(models[1], lambda: opt)
    return eager, GraphedStep(step, opt, backend, strict=True, warmup=1), backend
