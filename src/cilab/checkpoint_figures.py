"""Figures drawn from a run's checkpoints, without retraining: t-SNE of the features, exemplar grids.

Used by ``cilab report``: each task's checkpoint holds the network and the
exemplars, and the run folder's config.yaml rebuilds the data, the class order
and the normaliser. ``run`` arguments are ``cilab.aggregate.Run`` objects (a
folder's path, its metrics and status).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import results, runfolder
from .errors import ReportError

TSNE_CLASSES = 5  # "Five class of the first task are chosen" (the study, figure 4)
TSNE_TASKS = (1, 5, 10)  # "at task 1, 5 and 10"; clamped to the run's tasks, the last one always drawn


@dataclass
class FigureCache:
    """What the figures of several reports share (``cilab reproduce`` gives every group's report
    one): the datasets loaded, by their data config, and the t-SNE embeddings, by their
    features (see :func:`tsne_rows`)."""

    datasets: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)


class RunState:
    """A run's data, scenario and normaliser rebuilt from its folder; models loaded per task."""

    def __init__(self, run, device, datasets: dict):
        import torch

        from .data import Scenario, load_dataset
        from .data.loader import Normalizer

        self.run, self.device = run, device
        # an older cilab's folder too: a figure reads the network, the exemplars and the data only
        self.cfg = runfolder.read_config(run.path, network_only=True)
        key = repr(self.cfg.data)
        if key not in datasets:
            datasets[key] = load_dataset(self.cfg.data)
        data = datasets[key]
        self.scenario = Scenario.for_run(self.cfg, data)
        if run.metrics and run.metrics.get("class_order") not in (None, self.scenario.class_order):
            raise ReportError(f"{run.path}: the class order rebuilt from config.yaml differs from metrics.json's")
        mean, std = data.mean_std()  # the train split's statistics, as in training
        self.normalizer = Normalizer(mean, std).to(device)
        self.x_train = data.x_train
        self.y_train = self.scenario.remap(data.y_train)
        self.torch = torch

    def load(self, task: int):
        """(model in eval mode, memory per_class dict) after task ``task`` (1-based)."""
        from .methods import METHODS

        path = results.checkpoint_path(self.run.path, task - 1)
        if not path.exists():
            raise ReportError(f"{path} not found")
        state = results.load_checkpoint(path)
        if state.get("class_order") not in (None, self.scenario.class_order):
            raise ReportError(f"{path}: its class order differs from the one rebuilt from config.yaml")
        # The method builds the network and loads the weights, as a resume does: LUCIR's and
        # PODNet's heads are not the linear one, and DER's network has grown an extractor a task.
        cls = METHODS[self.cfg.method]
        method = cls(cls.parse_args(self.cfg.method_args))
        model = method.build_model(self.cfg.model, self.scenario.num_classes, self.cfg.data.image_size)
        method.load_state_dict(state.get("method", {}))
        method.load_model(model, state["model"])
        model.to(self.device).eval()
        per_class = {int(c): x for c, x in state["memory"]["per_class"].items()}
        return model, per_class

    def features(self, model, x):
        from .evaluation import extract_features

        f = extract_features(model, x.to(self.device), self.normalizer, self.cfg.eval.batch_size)
        # t-SNE in the space iCaRL's herding and NME work in: L2-normalised features.
        return self.torch.nn.functional.normalize(f, dim=1).cpu().numpy()


def tsne_tasks(num_done: int, wanted=TSNE_TASKS) -> list[int]:
    """Wanted tasks clamped to the completed ones, the last always included, duplicates dropped."""
    tasks = sorted({min(max(int(t), 1), num_done) for t in wanted} | {num_done})
    if len(tasks) > len(wanted):  # e.g. 1, 5, 10 clamped in a 12-task run: show 1, 5, 12
        tasks = tasks[: len(wanted) - 1] + [num_done]
    return tasks


def tsne_rows(states: list[RunState], n_classes: int, wanted_tasks, seed: int, log,
              embeddings: dict | None = None, workers: int = 1) -> list[dict]:
    """One row of t-SNE panels per run, at the tasks ``tsne_tasks`` picks.

    Every panel's features first, then their embeddings (``cilab.embedding``:
    one thread each, in a pool of up to ``workers`` processes for large ones),
    then the rows. ``embeddings`` (features -> embedding) lets reports share
    embeddings: the same features give the same embedding, and a study shows
    one network in several rows (a run copied to several groups, runs
    evaluated from its checkpoints), each panel tens of seconds of CPU on
    CIFAR-100.
    """
    import hashlib

    from .embedding import embed_all

    cache = {} if embeddings is None else embeddings
    rows, todo = [], {}  # todo: key -> (features, perplexity, seed), the embeddings to make
    for st in states:
        m = st.run.metrics
        classes = list(range(min(n_classes, st.scenario.classes_per_task)))
        panels = []
        for t in tsne_tasks(m["num_tasks"], wanted_tasks):
            log(f"t-SNE: {st.run.name}, after task {t}")
            model, memory = st.load(t)
            feats, labels, ex = [], [], []
            for i, c in enumerate(classes):
                xs = st.x_train[st.y_train == c]
                mem = memory.get(c)
                for x, is_ex in ((xs, False), (mem, True)):
                    if x is None or not len(x):
                        continue
                    feats.append(st.features(model, x))
                    labels.append(np.full(len(x), i))
                    ex.append(np.full(len(x), is_ex))
            f = np.concatenate(feats)
            perplexity = float(min(30.0, max(2.0, (len(f) - 1) / 3.0)))
            key = (hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest(), f.shape, perplexity, seed)
            if key not in cache:
                todo[key] = (f, perplexity, seed)
            n_ex = int(np.concatenate(ex).sum())
            panels.append({"title": f"after task {t} ({st.scenario.seen(t - 1)} classes), {n_ex} exemplars",
                           "key": key, "labels": np.concatenate(labels), "exemplar": np.concatenate(ex)})
        names = [m.get("class_names", [str(c) for c in range(len(classes))])[c] for c in classes]
        rows.append({"label": st.run.name, "panels": panels, "class_names": names})
    if todo:
        log(f"t-SNE: {len(todo)} embeddings of {sum(len(f) for f, _, _ in todo.values())} points")
        cache.update(zip(todo, embed_all(list(todo.values()), workers)))
    for row in rows:
        for panel in row["panels"]:
            panel["xy"] = cache[panel.pop("key")]
    return rows


def exemplar_figure(st: RunState, task: int, per_class: int, max_classes: int, out: Path) -> Path:
    from .plots import plot_exemplar_grid

    _, memory = st.load(task)
    labels = sorted(memory)
    shown = labels[:max_classes]
    names = st.run.metrics.get("class_names") or [str(c) for c in range(st.scenario.num_classes)]
    quota = max((len(memory[c]) for c in labels), default=0)
    more = f", first {len(shown)} of {len(labels)} classes" if len(shown) < len(labels) else ""
    return plot_exemplar_grid(
        [memory[c][:per_class].numpy() for c in shown], [f"{c}: {names[c]}" for c in shown],
        out / f"exemplars_{st.run.name}_task{task:02d}.png", per_class=per_class,
        title=f"{st.run.name}: exemplars after task {task} ({quota} per class{more})")
