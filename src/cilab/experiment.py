"""run(config) -> metrics: the class-incremental protocol, task by task, resumable.

For each task t:
  1. training data: the task's images (or all seen tasks' for ``joint``) plus
     the exemplars; the previous model, frozen, is kept for distillation;
  2. the one training loop (trainer.py);
  3. memory: old classes cut to m = K // classes seen, exemplars built for the new ones;
  4. evaluation: test features extracted once, every classifier predicts from them;
  5. checkpoint + metrics written atomically, so a killed run resumes after t.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import results
from .classifiers import FitData, build_classifier
from .config import Config, ConfigError
from .data import BatchLoader, Scenario, load_dataset
from .data.loader import Normalizer
from .evaluation import accuracy, confusion_matrix, extract_features, summarize, task_accuracies
from .losses import Criterion
from .memory import EXEMPLAR_BUILDERS, BuildContext, ExemplarMemory
from .methods import METHODS
from .models import create_model
from .trainer import autocast_for, train_task


class RunFolderError(RuntimeError):
    pass


def resolve_device(train_cfg) -> torch.device:
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if train_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_cfg.device)


def resolve_amp(train_cfg, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "off") if train_cfg.amp == "auto" else train_cfg.amp


def resolve_channels_last(train_cfg, device: torch.device) -> bool:
    # auto = on everywhere: NHWC convolutions were faster on CUDA (tensor cores)
    # and on the 2-core CPU too (384 vs 260 img/s for the bare ResNet-32 step).
    return train_cfg.channels_last in ("auto", "on")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_run_folder(out: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber results; check a resumed run has the same config."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder")
    non_empty = out.exists() and any(out.iterdir())
    if resume:
        saved = out / results.CONFIG
        if saved.exists():
            from .config import config_from_dict
            import yaml

            old = config_from_dict(yaml.safe_load(saved.read_text()) or {})
            if old != cfg:
                diff = _config_diff(old.to_dict(), cfg.to_dict())
                raise RunFolderError(f"cannot resume {out}: its config differs ({diff}); rerun with the same preset and overrides")
        return
    if non_empty and not overwrite:
        raise RunFolderError(
            f"{out} already holds results; pass --resume to continue it or --overwrite to start again, or choose another --out"
        )
    if non_empty and overwrite:
        shutil.rmtree(out)


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for k in a:
        if isinstance(a[k], dict):
            d = _config_diff(a[k], b[k], prefix + k + ".")
            if d:
                diffs.append(d)
        elif a[k] != b[k]:
            diffs.append(f"{prefix}{k}: {a[k]!r} saved, {b[k]!r} now")
    return "; ".join(diffs)


def run(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        position: int = 0, meta: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the whole protocol of ``cfg`` into the run folder ``out``; returns metrics.json's content.

    ``meta`` (preset name, overrides) is stored in metrics.json for reports.
    """
    out = Path(out)
    log = log or (lambda msg: tqdm.write(msg))
    prepare_run_folder(out, cfg, resume, overwrite)
    device = resolve_device(cfg.train)  # refuses cuda without a GPU before any work
    data = load_dataset(cfg.data)  # refuses missing / broken data before any work
    try:
        scenario = Scenario.from_seed(data.num_classes, cfg.scenario.num_tasks, cfg.seed, data.class_names)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    results.atomic_write_yaml(out / results.CONFIG, cfg.to_dict())
    return Protocol(cfg, out, data, scenario, device, progress, position, meta or {}, log).run(resume)


class Protocol:
    """State of one run: model, memory, generators, metrics; advanced task by task."""

    def __init__(self, cfg: Config, out: Path, data, scenario: Scenario, device, progress, position, meta, log):
        self.cfg, self.out, self.scenario, self.device = cfg, out, scenario, device
        self.progress, self.position, self.log = progress, position, log
        self.method = METHODS[cfg.method]
        self.amp = resolve_amp(cfg.train, device)
        self.channels_last = resolve_channels_last(cfg.train, device)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        # Whole splits on the device, labels remapped so output i = i-th class of the order.
        mean, std = data.mean_std()
        self.normalizer = Normalizer(mean, std).to(device)
        self.x_train, self.x_test = data.x_train.to(device), data.x_test.to(device)
        self.y_train, self.y_test = scenario.remap(data.y_train).to(device), scenario.remap(data.y_test).to(device)

        torch.manual_seed(cfg.seed)  # model initialisation
        self.model = create_model(cfg.model, scenario.num_classes).to(device, memory_format=self.memory_format)
        self.train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)  # shuffling, augmentation, selection
        self.memory = ExemplarMemory(cfg.memory.size)
        self.confusion: dict[str, np.ndarray] = {}
        cpt = scenario.classes_per_task
        self.metrics = {
            "method": cfg.method, "seed": cfg.seed, "preset": meta.get("preset"), "overrides": meta.get("overrides", []),
            "dataset": cfg.data.name, "class_order": scenario.class_order, "class_names": scenario.ordered_names,
            "tasks": scenario.tasks, "num_tasks": scenario.num_tasks, "classes_per_task": cpt,
            "classifiers": list(cfg.eval.classifiers), "device": str(device), "amp": self.amp,
            "status": "running", "completed_tasks": 0,
            **{c: {"accuracy": [], "current_task_accuracy": [], "accuracy_matrix": []} for c in cfg.eval.classifiers},
            "memory_per_class": [], "memory_total": [],
            "timing": {"train_s": 0.0, "memory_s": 0.0, "eval_s": 0.0, "total_s": 0.0, "per_task": []},
            "train_images": 0, "train_images_per_s": 0.0,
        }

    # -- checkpointing -------------------------------------------------------------------

    def _restore(self) -> int:
        """Load the latest completed task; returns the index of the next task."""
        found = results.last_checkpoint(self.out)
        if found is None:
            return 0
        task, path = found
        state = results.load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.memory = ExemplarMemory.from_state_dict(state["memory"], self.device)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.metrics = state["metrics"]
        conf = self.out / results.CONFUSION
        if conf.exists():
            with np.load(conf) as z:
                self.confusion = {k: z[k] for k in z.files}
        self.log(f"resuming {self.out} after task {task + 1}/{self.scenario.num_tasks}")
        return task + 1

    def _save(self, task: int) -> None:
        state = {
            "task": task, "model": self.model.state_dict(), "memory": self.memory.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "metrics": self.metrics, "class_order": self.scenario.class_order,
        }
        results.atomic_torch_save(results.checkpoint_path(self.out, task), state)
        results.atomic_savez(self.out / results.CONFUSION, self.confusion)
        results.atomic_write_json(self.out / results.METRICS, self.metrics)

    # -- the protocol ---------------------------------------------------------------------

    def run(self, resume: bool) -> dict:
        start = self._restore() if resume else 0
        try:
            for t in range(start, self.scenario.num_tasks):
                self.run_task(t)
        except BaseException as e:
            # Completed tasks stay saved; metrics.json says why the run stopped.
            self.metrics["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e}"
            if self.metrics["completed_tasks"]:
                results.atomic_write_json(self.out / results.METRICS, self.metrics)
            raise
        self.metrics["status"] = "complete"
        results.atomic_write_json(self.out / results.METRICS, self.metrics)
        try:
            from .plots import plot_run_accuracy

            plot_run_accuracy(self.metrics, self.out / "accuracy.png")
        except Exception as e:  # a figure must never cost the results
            self.log(f"warning: could not draw {self.out / 'accuracy.png'}: {e}")
        return self.metrics

    def training_data(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        cpt = self.scenario.classes_per_task
        lo = 0 if self.method.train_on == "seen" else t * cpt
        mask = (self.y_train >= lo) & (self.y_train < (t + 1) * cpt)
        x, y = self.x_train[mask], self.y_train[mask]
        if len(self.memory):
            mx, my = self.memory.data(self.device)
            x, y = torch.cat([x, mx]), torch.cat([y, my])
        return x, y

    def run_task(self, t: int) -> None:
        cfg, sc = self.cfg, self.scenario
        n_old, n_seen = t * sc.classes_per_task, sc.seen(t)
        t0 = time.perf_counter()

        # 1-2. train
        criterion = Criterion(cfg.loss.classification, cfg.loss.distillation, n_old, n_seen)
        old_model = None
        if criterion.distills:
            old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        x, y = self.training_data(t)
        loader = BatchLoader(x, y, cfg.train.batch_size, self.normalizer, cfg.train.augment, self.generator,
                             self.channels_last)
        images = train_task(self.train_model, loader, cfg.train, criterion, old_model, t, self.device, self.amp,
                            self.progress, self.position)
        del old_model, loader
        _sync(self.device)
        t1 = time.perf_counter()

        # 3. memory
        if cfg.memory.size > 0:
            self.update_memory(t, n_seen)
        _sync(self.device)
        t2 = time.perf_counter()

        # 4. evaluation
        self.evaluate(t, n_seen)
        _sync(self.device)
        t3 = time.perf_counter()

        tm = self.metrics["timing"]
        tm["train_s"] += t1 - t0
        tm["memory_s"] += t2 - t1
        tm["eval_s"] += t3 - t2
        tm["total_s"] += t3 - t0
        tm["per_task"].append({"train_s": t1 - t0, "memory_s": t2 - t1, "eval_s": t3 - t2})
        self.metrics["train_images"] += images
        self.metrics["train_images_per_s"] = self.metrics["train_images"] / max(tm["train_s"], 1e-9)
        self.metrics["memory_per_class"].append(self.memory.per_class_quota(n_seen) if cfg.memory.size else 0)
        self.metrics["memory_total"].append(len(self.memory))
        self.metrics["completed_tasks"] = t + 1
        for c in cfg.eval.classifiers:
            m = self.metrics[c]
            m.update(summarize(m["accuracy"], m["accuracy_matrix"]))
        self._save(t)
        accs = "  ".join(f"{c} {self.metrics[c]['accuracy'][-1]:5.1f}%" for c in cfg.eval.classifiers)
        if self.progress:
            self.log(f"[{self.out.name}] task {t + 1}/{sc.num_tasks} ({n_seen} classes): {accs}  ({t3 - t0:.1f}s)")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return extract_features(self.model, x, self.normalizer, self.cfg.eval.batch_size,
                                autocast_for(self.device, self.amp), self.memory_format)

    def update_memory(self, t: int, n_seen: int) -> None:
        m = self.memory.per_class_quota(n_seen)
        self.memory.reduce(m)
        new = {c: self.x_train[self.y_train == c] for c in self.scenario.task_outputs(t)}
        ctx = BuildContext(
            cfg=self.cfg.memory, model=self.model.eval(),
            features=lambda x: torch.nn.functional.normalize(self.features(x), dim=1),
            normalizer=self.normalizer, generator=self.generator, num_classes=self.scenario.num_classes,
            log=self.log,
        )
        built = EXEMPLAR_BUILDERS[self.cfg.memory.kind](ctx, new, m)
        for c, imgs in built.items():
            self.memory.add(c, imgs)
        self.model.train()

    def evaluate(self, t: int, n_seen: int) -> None:
        cpt = self.scenario.classes_per_task
        mask = self.y_test < n_seen
        y = self.y_test[mask]
        feats = self.features(self.x_test[mask])  # once per task, shared by every classifier
        if len(self.memory):
            mx, my = self.memory.data(self.device)
            mem_feats = self.features(mx)
        else:
            mem_feats, my = feats[:0], y[:0]
        fit = FitData(mem_feats, my, self.model.head, n_seen, self.cfg.seed)
        current = y >= t * cpt
        for name in self.cfg.eval.classifiers:
            clf = build_classifier(name, self.cfg.eval)
            clf.fit(fit)
            pred = clf.predict(feats)
            m = self.metrics[name]
            m["accuracy"].append(accuracy(pred, y))
            m["current_task_accuracy"].append(accuracy(pred[current], y[current]))
            row = task_accuracies(pred, y, cpt, t + 1)
            m["accuracy_matrix"].append(row + [None] * (self.scenario.num_tasks - t - 1))
            self.confusion[f"{name}_task{t + 1:02d}"] = confusion_matrix(pred, y, n_seen)
