"""run(config) -> metrics: the class-incremental protocol, task by task, resumable.

For each task t (the method plugin's hooks in brackets, see methods/base.py):
  1. [before_task] the method may grow or re-initialise the network;
     [training_data] the task's images plus the exemplars by default; the
     previous model, frozen, is kept when the method distills;
  2. the one training loop (trainer.py) with [loss], [parameters], [after_step];
     then [after_train];
  3. memory: old classes cut to m = K // classes seen, exemplars built for the
     new ones; then [after_memory];
  4. evaluation: test features extracted once, every classifier predicts from them;
  5. checkpoint (the method's [state_dict] in it) + metrics written atomically,
     so a killed run resumes after t.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import signal
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import results, runfolder
from .classifiers import CLASSIFIERS, FitData, build_classifier
from .config import Config, ConfigError, task_train_config
from .data import BatchLoader, DatasetError, Scenario, load_dataset
from .data.loader import Normalizer, data_placement, place
from .evaluation import (accuracy, confusion_matrix, extract_features, single_class_note, single_class_tasks, summarize,
                         task_accuracies)
from .losses import Criterion
from .memory import EXEMPLAR_BUILDERS, BuildContext, ExemplarMemory
from .methods import METHODS, TaskContext
from .results import RunFolderError  # noqa: F401 - the CLI's user errors name it here
from .runtime import Runtime
from .tracking import Trackers
from .trainer import train_task
from .workload import checked_scenario


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        position: int = 0, meta: dict | None = None, log: Callable[[str], None] | None = None,
        on_task: Callable[[dict], None] | None = None) -> dict:
    """Run the whole protocol of ``cfg`` into the run folder ``out``; returns metrics.json's content.

    ``meta`` (preset name, overrides) is stored in metrics.json for reports. ``resume`` of a
    complete run (of the same config) writes nothing and returns its metrics. ``on_task`` is
    called with the metrics so far after each task is saved (``bench protocol`` writes them out).
    """
    out = Path(out)
    log = log or (lambda msg: tqdm.write(msg))
    if resume and overwrite:  # the command line's --resume and --overwrite exclude each other too
        raise ConfigError("resume=True continues the run in the folder and overwrite=True deletes it; pass one of them")
    # Everything that can refuse the run is checked before the run folder is
    # touched: the folder first (cheap, before loading data: not a run folder,
    # in use by another run, unwritable), then the device, the data and the task split.
    runfolder.check(out, cfg, resume, overwrite)
    if resume and results.is_complete(out):  # the same config (checked): nothing to train, load or write
        m = results.read_metrics(out)
        log(f"{out} is complete ({m.get('num_tasks', '?')} tasks): nothing to resume")
        return m
    runtime = Runtime.resolve(cfg.train)  # refuses cuda without a GPU (and the like) before any work
    data = load_run_data(cfg.data)  # refuses missing / broken data before any work
    try:
        scenario = checked_scenario(cfg, data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Locked for the life of the run: a second run on `out` is refused at once.
    with runfolder.claim(out, cfg, resume, overwrite, log):
        results.atomic_write_yaml(out / results.CONFIG, cfg.to_dict())
        with runtime.applied():  # before Protocol moves the data to the device: cuBLAS's setting must come first
            return Protocol(cfg, out, data, scenario, runtime, progress, position, meta or {}, log).run(resume, on_task)


def load_run_data(data_cfg):
    try:
        return load_dataset(data_cfg)
    except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError) as e:
        # The loaders name the problems they expect; a file cut short or with
        # flipped bits surfaces instead from deep inside zipfile / numpy /
        # pickle, and must still be refused with a message, not a traceback.
        where = data_cfg.path if data_cfg.name == "npz" else data_cfg.root
        raise DatasetError(
            f"the {data_cfg.name} data in '{where}' is damaged ({type(e).__name__}: {e}); "
            "replace it with an intact copy (or delete it and let it download again)"
        ) from e


class _InterruptWatch:
    """Counts the Ctrl-Cs of a run, and passes each on to the handler in place.

    Python delivers Ctrl-C as a KeyboardInterrupt raised wherever the main
    thread happens to be, and a few C paths swallow it (seen in
    copy.deepcopy of a torch module, about once in a hundred tries), so a
    Ctrl-C could go unheard. The count is checked after each task: such a
    Ctrl-C still stops the run, at the latest once the task under way is saved.
    Only a Python handler is wrapped: an ignored Ctrl-C (SIG_IGN) stays ignored.
    """

    def __enter__(self) -> "_InterruptWatch":
        self.count = 0
        self.previous = signal.getsignal(signal.SIGINT)
        self.active = threading.current_thread() is threading.main_thread() and callable(self.previous)
        if self.active:
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.count += 1
        self.previous(signum, frame)

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C back while the block runs, then deliver it as usual.

    Signal handlers can only be set from the main thread; elsewhere (a run in
    a worker thread) the block runs unprotected.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # None: a handler set outside Python, which could not be put back
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):  # Python's default handler raises KeyboardInterrupt
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


_TASK_OLD_MODEL = object()  # train_on's default: the task's old model (None is a valid choice: no old model)


class Protocol:
    """State of one run: model, memory, generators, metrics; advanced task by task."""

    def __init__(self, cfg: Config, out: Path, data, scenario: Scenario, runtime: Runtime, progress, position, meta,
                 log):
        self.cfg, self.out, self.scenario, self.rt = cfg, out, scenario, runtime
        self.device = device = runtime.device
        self.progress, self.position, self.log = progress, position, log
        method_cls = METHODS[cfg.method]
        self.method = method_cls(method_cls.parse_args(cfg.method_args))

        # Whole splits on the device, labels remapped so output i = i-th class of the order.
        mean, std = data.mean_std()
        self.normalizer = Normalizer(mean, std).to(device)
        where = data_placement(data.x_train.nbytes + data.x_test.nbytes, device, cfg.data.placement)
        self.x_train, self.x_test = place(data.x_train, device, where), place(data.x_test, device, where)
        self.y_train, self.y_test = scenario.remap(data.y_train).to(device), scenario.remap(data.y_test).to(device)

        torch.manual_seed(cfg.seed)  # model initialisation
        self.model = self.new_model().to(
            device, memory_format=runtime.memory_format)
        self.train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)  # shuffling, augmentation, selection
        self.memory = ExemplarMemory(cfg.memory.size)
        self.confusion: dict[str, np.ndarray] = {}
        self._saved_metrics: dict | None = None  # metrics as of the last checkpoint (commit, _restore)
        cpt = scenario.classes_per_task
        self.metrics = {
            "method": cfg.method, "seed": cfg.seed, "preset": meta.get("preset"), "overrides": meta.get("overrides", []),
            "dataset": cfg.data.name, "class_order": scenario.class_order, "class_names": scenario.ordered_names,
            "method_args": cfg.method_args,
            "tasks": scenario.tasks, "num_tasks": scenario.num_tasks, "classes_per_task": cpt,
            "first_task_classes": scenario.first_task_classes,
            "classes_seen": [scenario.seen(t) for t in range(scenario.num_tasks)],
            "classifiers": list(cfg.eval.classifiers), "device": str(device), "amp": runtime.amp,
            "channels_last": runtime.channels_last, "cuda_graphs": runtime.graphs,
            "deterministic": runtime.deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "status": "running", "completed_tasks": 0,
            **{c: {"accuracy": [], "current_task_accuracy": [], "accuracy_matrix": []} for c in cfg.eval.classifiers},
            "memory_per_class": [], "memory_total": [],
            "timing": {"train_s": 0.0, "memory_s": 0.0, "eval_s": 0.0, "total_s": 0.0, "per_task": []},
            "train_images": 0, "train_images_per_s": 0.0,
        }

    # -- checkpointing -------------------------------------------------------------------

    def _restore(self) -> int:
        """Load the latest completed task; returns the index of the next task.

        The checkpoint holds everything the next task depends on: the model
        (which is also the frozen old model for distillation, since that is
        the previous task's model), the exemplars, both generators' states and
        the metrics so far, so the resumed run computes what the uninterrupted
        one would have (same device).
        """
        found = results.last_checkpoint(self.out)
        if found is None:
            self.log(f"nothing to resume in {self.out} (no completed task); starting from task 1")
            return 0
        task, path = found
        state = results.load_checkpoint(path, required=results.CHECKPOINT_KEYS)  # data only: never runs code
        if state.get("class_order") != self.scenario.class_order or task >= self.scenario.num_tasks:
            raise RunFolderError(f"cannot resume from {path}: it was made for another class order or task split")
        self.load_trained(state)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.metrics = state["metrics"]
        self.confusion = {k: v.numpy() for k, v in state["confusion"].items()}
        self._saved_metrics = copy.deepcopy(self.metrics)
        self.log(f"resuming {self.out} after task {task + 1}/{self.scenario.num_tasks}")
        return task + 1

    def load_trained(self, state: dict) -> None:
        """A checkpoint's network, method state and exemplars: all that evaluation reads."""
        self.method.load_state_dict(state.get("method", {}))
        self.method.load_model(self.model, state["model"])  # a grown network (DER) grows back first
        self.memory = ExemplarMemory.from_state_dict(state["memory"], self.device)

    def _save(self, task: int) -> None:
        state = {
            "task": task, "model": self.model.state_dict(), "memory": self.memory.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            # Tensors and plain data only, so that torch.load(weights_only=True) reads it back.
            "metrics": results.plain_data(self.metrics), "class_order": self.scenario.class_order,
            "confusion": {k: torch.from_numpy(v) for k, v in self.confusion.items()},
            "method": results.plain_data(self.method.state_dict(), "method", tensors=True),
        }
        self.commit(task, state)

    def commit(self, task: int, state: dict) -> None:
        """Write task ``task``'s checkpoint ``state``, then confusion.npz and metrics.json from this run's.

        The checkpoint is the commit point and holds everything a resume
        needs (confusion matrices included); confusion.npz and metrics.json
        are views of it written after, so a kill between the writes loses
        nothing: the resumed run rewrites them. Ctrl-C is held back until all
        three are written, so an interrupted run's files always agree.
        """
        with _sigint_deferred():
            results.atomic_torch_save(results.checkpoint_path(self.out, task), state)
            self._saved_metrics = copy.deepcopy(self.metrics)
            results.atomic_savez(self.out / results.CONFUSION, self.confusion)
            results.atomic_write_json(self.out / results.METRICS, self.metrics)

    # -- the protocol ---------------------------------------------------------------------

    @contextlib.contextmanager
    def stop_marked(self) -> Iterator[_InterruptWatch]:
        """Work on the run's tasks; if it stops (an error, Ctrl-C), metrics.json says why.

        Completed tasks stay saved. metrics.json is written from the last
        checkpoint's metrics, not the live ones, which may hold part of the
        failed task (an accuracy appended for one classifier but not the next,
        its timing). Yields the Ctrl-C count (:class:`_InterruptWatch`): check
        it after each task.
        """
        try:
            with _InterruptWatch() as ctrl_c:
                yield ctrl_c
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e}"
            self.metrics["status"] = status
            if self._saved_metrics is not None:
                results.atomic_write_json(self.out / results.METRICS, {**self._saved_metrics, "status": status})
            raise

    def run(self, resume: bool, on_task: Callable[[dict], None] | None = None) -> dict:
        start = self._restore() if resume else 0
        self.tracker = Trackers(self.cfg.log)
        self.tracker.start(self.out, self.cfg)
        try:
            with self.stop_marked() as ctrl_c:
                for t in range(start, self.scenario.num_tasks):
                    self.run_task(t)
                    if on_task is not None:
                        on_task(self.metrics)
                    if ctrl_c.count:  # a Ctrl-C whose KeyboardInterrupt was swallowed: stop now, task t is saved
                        raise KeyboardInterrupt
        finally:
            self.tracker.close()
        self.metrics["status"] = "complete"
        results.atomic_write_json(self.out / results.METRICS, self.metrics)
        self.plot_accuracy()
        for c in self.cfg.eval.classifiers:  # an accuracy of 1 / classes seen is not a result: say so
            found = single_class_tasks(self.confusion, c)
            if found:
                self.log(f"note: {single_class_note(c, found)}")
        return self.metrics

    def plot_accuracy(self) -> None:
        try:
            from .plots import plot_run_accuracy

            plot_run_accuracy(self.metrics, self.out / "accuracy.png")
        except Exception as e:  # a figure must never cost the results
            self.log(f"warning: could not draw {self.out / 'accuracy.png'}: {e}")

    def task_context(self, t: int) -> TaskContext:
        cfg, sc = self.cfg, self.scenario
        n_old, n_seen = sc.old(t), sc.seen(t)
        ctx = TaskContext(
            t=t, n_old=n_old, n_seen=n_seen, num_classes=sc.num_classes, model=self.model, memory=self.memory,
            criterion=Criterion.from_config(cfg.loss, n_old, n_seen),
            device=self.device, generator=self.generator, train_cfg=task_train_config(cfg.train, t),
            data=self.class_data, features=self.features, normalize=self.normalize, train=None,
            new_model=self.new_model, log=self.log,
        )
        ctx.train = lambda x, y, *per_sample, **kw: self.train_on(ctx, x, y, *per_sample, **kw)
        return ctx

    def class_data(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images (uint8, on the device) and labels of outputs [lo, hi)."""
        mask = (self.y_train >= lo) & (self.y_train < hi)
        return self.x_train[mask.to(self.x_train.device)], self.y_train[mask]  # x may be in host memory

    def new_model(self) -> torch.nn.Module:
        return self.method.build_model(self.cfg.model, self.scenario.num_classes, self.cfg.data.image_size)

    def train_on(self, ctx: TaskContext, x: torch.Tensor, y: torch.Tensor, *per_sample: torch.Tensor, loss=None,
                 parameters=None, train_cfg=None, old_model=_TASK_OLD_MODEL, desc: str | None = None) -> int:
        """The one loop on (x, y) for a method's hook; returns the images trained on.

        ``per_sample``: further tensors, one row per image (DER++'s stored
        logits), batched alongside and passed to the loss after ``old``.

        Defaults: the method's loss and parameters, the task's ``train``
        settings and old model. ``train.val_split`` holds out part of (x, y),
        and with ``train.keep_best`` the epoch with the best accuracy on it
        (argmax over the seen outputs) is the one kept.
        """
        train_cfg = ctx.train_cfg if train_cfg is None else train_cfg
        old_model = ctx.old_model if old_model is _TASK_OLD_MODEL else old_model
        loss_fn = loss or (lambda xb, yb, out, old, *ps: self.method.loss(xb, yb, out, old, ctx, *ps))
        params = list(self.method.parameters(ctx) if parameters is None else parameters)
        graphs = self.rt.graphs if self.method.graph_safe else "off"
        after_step = None if self.method.after_step is None else (lambda: self.method.after_step(ctx))
        x, y, per_sample, keeper = self._validation(x, y, per_sample, train_cfg, ctx.n_seen)
        loader = BatchLoader(x, y, train_cfg.batch_size, self.normalizer, train_cfg.augment, self.generator,
                             self.rt.channels_last, per_sample=per_sample)
        steps_before = self.metrics.setdefault("train_steps", 0)  # the loss's x axis runs on over tasks and stages
        # What the optimiser does not update takes no gradient for the loop: no backward
        # through it (a head-only stage, DER's old extractors), the updated ones' unchanged.
        chosen = {id(p) for p in params}
        frozen = [p for p in ctx.model.parameters() if p.requires_grad and id(p) not in chosen]
        for p in frozen:
            p.requires_grad_(False)
        try:
            images = train_task(self.train_model, loader, train_cfg, loss_fn, old_model, ctx.t, self.device,
                                self.rt.amp, self.progress, self.position, graphs=graphs, params=params,
                                after_step=after_step, epoch_end=keeper, desc=desc,
                                on_log=lambda step, loss: self.tracker.log_step(steps_before + step, loss))
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.metrics["train_steps"] = steps_before + train_cfg.epochs * len(loader)
        if keeper is not None:
            keeper.restore()
        return images

    def _validation(self, x, y, per_sample, train_cfg, n_seen):
        """Split off ``train.val_split`` of (x, y), drawn from the run's generator; (x, y, per_sample, BestEpoch or None)."""
        if train_cfg.val_split <= 0:
            return x, y, per_sample, None
        perm = torch.randperm(len(y), device=y.device, generator=self.generator)
        n_val = max(1, round(train_cfg.val_split * len(y)))
        val, keep = perm[:n_val], perm[n_val:]
        per_sample = tuple(t[keep] for t in per_sample)
        on_x = lambda i: i.to(x.device)  # noqa: E731  (x may be in host memory)
        if not train_cfg.keep_best:
            return x[on_x(keep)], y[keep], per_sample, None
        return x[on_x(keep)], y[keep], per_sample, BestEpoch(self, x[on_x(val)], y[val], n_seen)

    def run_task(self, t: int) -> None:
        cfg, sc = self.cfg, self.scenario
        n_seen = sc.seen(t)
        t0 = time.perf_counter()

        # 1-2. train
        ctx = self.task_context(t)
        self.method.before_task(ctx)
        data = self.method.training_data(ctx)  # (x, y) or (x, y, *per_sample)
        if self.method.uses_old_model(ctx):
            ctx.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        images = ctx.train(*data)
        self.method.after_train(ctx)
        del data
        ctx.old_model = None
        _sync(self.device)
        t1 = time.perf_counter()

        # 3. memory
        if cfg.memory.size > 0:
            self.update_memory(t, n_seen)
        self.method.after_memory(ctx)
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
        self.summarize_classifiers()
        self._save(t)
        self.tracker.log_task(t, self.metrics)
        accs = "  ".join(f"{c} {self.metrics[c]['accuracy'][-1]:5.1f}%" for c in cfg.eval.classifiers)
        if self.progress:
            self.log(f"[{self.out.name}] task {t + 1}/{sc.num_tasks} ({n_seen} classes): {accs}  ({t3 - t0:.1f}s)")

    def summarize_classifiers(self) -> None:
        """Each classifier's summaries (average incremental accuracy, ...) from its accuracies so far."""
        for c in self.cfg.eval.classifiers:
            m = self.metrics[c]
            m.update(summarize(m["accuracy"], m["accuracy_matrix"]))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer(x).contiguous(memory_format=self.rt.memory_format)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 whatever train.amp says (see extract_features): exemplar selection and every classifier use these
        return extract_features(self.model, x, self.normalizer, self.cfg.eval.batch_size, self.rt.memory_format)

    def update_memory(self, t: int, n_seen: int) -> None:
        m = self.memory.per_class_quota(n_seen)
        self.memory.reduce(m)
        new = {c: self.x_train[(self.y_train == c).to(self.x_train.device)].to(self.device)
               for c in self.scenario.task_outputs(t)}
        ctx = BuildContext(
            cfg=self.cfg.memory, model=self.model.eval(),
            features=lambda x: torch.nn.functional.normalize(self.features(x), dim=1),
            normalizer=self.normalizer, generator=self.generator, num_classes=self.scenario.num_classes,
            log=self.log, progress=self.progress,
        )
        built = EXEMPLAR_BUILDERS[self.cfg.memory.kind](ctx, new, m)
        for c, imgs in built.items():
            self.memory.add(c, imgs)
        self.model.train()

    def evaluate(self, t: int, n_seen: int) -> None:
        mask = self.y_test < n_seen
        y = self.y_test[mask]
        feats = self.features(self.x_test[mask.to(self.x_test.device)])  # once per task, shared by every classifier
        if len(self.memory):
            mx, my = self.memory.data(self.device)
            mem_feats = self.features(mx)
            # iCaRL's class means also average the mirrored exemplars
            flips = any(CLASSIFIERS[c].uses_flipped_exemplars for c in self.cfg.eval.classifiers)
            flipped = self.features(mx.flip(-1)) if flips else None
        else:
            mem_feats, my, flipped = feats[:0], y[:0], None
        fit = FitData(mem_feats, my, self.model.head, n_seen, self.cfg.seed, flipped_features=flipped)
        current = y >= self.scenario.old(t)
        task_of_y = self.scenario.task_of(y)
        for name in self.cfg.eval.classifiers:
            clf = build_classifier(name, self.cfg.eval)
            clf.fit(fit)
            pred = clf.predict(feats)
            m = self.metrics[name]
            m.update(clf.settings())  # e.g. fc's arg-max scope, named in metrics.json
            m["accuracy"].append(accuracy(pred, y))
            m["current_task_accuracy"].append(accuracy(pred[current], y[current]))
            row = task_accuracies(pred, y, task_of_y, t + 1)
            m["accuracy_matrix"].append(row + [None] * (self.scenario.num_tasks - t - 1))
            self.confusion[f"{name}_task{t + 1:02d}"] = confusion_matrix(pred, y, n_seen, clf.may_predict_unseen)


class BestEpoch:
    """``train.keep_best``: after each epoch, the accuracy on the held-out split; the best epoch's weights are kept.

    The study's fine-tuning "takes the best epoch" on 10% of each task's data.
    Accuracy is the argmax over the seen outputs [0, n_seen); ties keep the
    earlier epoch. One host read per epoch.
    """

    def __init__(self, protocol: "Protocol", x: torch.Tensor, y: torch.Tensor, n_seen: int):
        self.p, self.x, self.y, self.n_seen = protocol, x, y, n_seen
        self.best_acc, self.best_epoch, self.best_state = -1.0, -1, None

    def __call__(self, epoch: int) -> None:
        p = self.p
        feats = p.features(self.x)
        with torch.no_grad():
            pred = p.model.head(feats)[:, : self.n_seen].argmax(dim=1)
        acc = accuracy(pred, self.y)
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.best_state = {k: v.detach().clone() for k, v in p.model.state_dict().items()}

    def restore(self) -> None:
        if self.best_state is not None:
            self.p.model.load_state_dict(self.best_state)
