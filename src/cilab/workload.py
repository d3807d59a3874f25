"""How many training images a run trains on, from its config alone (nothing is run or loaded).

With T tasks of c classes (B50: a first task of 50), ``per_class`` training images a class,
E = train.epochs (train.first_task.* for task 1) and K = memory.size, task t (0-based) trains E
epochs on

    the task's c * per_class images (``trains_on = "seen"``, joint: all the classes seen so far),
    plus the exemplars: the n_old old classes with min(K // n_old, cap) each
    (cap = per_class, or per_class // 4 for the collage kinds, 4 images a collage),
    less the held-out split (train.val_split) of the two,

and a run's images are the sum over its tasks. Only training images: herding, DeepInversion's
synthesis and evaluation are not counted. ``cilab bench concurrency`` prices the study with it
and ``cilab reproduce`` starts the longest runs first by it.
"""

from __future__ import annotations

import numpy as np

from .config import task_train_config
from .data import Scenario
from .memory.collage import COLLAGES, IMAGES_PER_COLLAGE
from .methods import METHODS


def run_images(cfg, classes: int = 100, per_class: int = 500) -> int:
    """Training images of one run of ``cfg`` on ``classes`` classes of ``per_class`` images (the formula above)."""
    sc = Scenario(list(range(classes)), cfg.scenario.num_tasks, [str(c) for c in range(classes)],
                  cfg.scenario.first_task_classes)
    method = METHODS[cfg.method]
    cap = per_class // IMAGES_PER_COLLAGE if cfg.memory.kind in COLLAGES else per_class
    total = 0
    for t in range(sc.num_tasks):
        n_old, n_seen = sc.old(t), sc.seen(t)
        task = (n_seen if method.trains_on == "seen" else n_seen - n_old) * per_class
        memory = n_old * min(cfg.memory.size // n_old, cap) if (method.uses_memory and n_old > 0) else 0
        train_cfg = task_train_config(cfg.train, t)
        held_out = max(1, round(train_cfg.val_split * (task + memory))) if train_cfg.val_split > 0 else 0
        total += train_cfg.epochs * (task + memory - held_out)
    return total


def checked_scenario(cfg, data, *, training: bool = True) -> Scenario:
    """The task split of a run of ``cfg`` on ``data`` (Scenario.for_run), refused (ValueError) where it
    or the run's exemplar memory cannot serve it (:func:`exemplar_problem`): for the runs about to
    train (``training``) or be evaluated again, before any work. Reports and figures, which read
    finished runs as they are, take Scenario.for_run alone."""
    scenario = Scenario.for_run(cfg, data)
    problem = exemplar_problem(cfg, scenario, data.y_train, training=training)
    if problem:
        raise ValueError(problem)
    return scenario


def exemplar_problem(cfg, scenario: Scenario, y_train, *, training: bool = True) -> str | None:
    """Why the exemplar memory of ``cfg`` cannot serve its run on this split (None: it can), before any work.

    After task t each of the n_seen classes keeps K // n_seen exemplars (fewer where the class has
    fewer training images; a collage takes 4). ``training``: a run about to train, whose
    memory.size must leave every class an exemplar (with none, NME guesses and an SVM fails at
    that task); a finished run's memory, evaluated again, is what it is. kNN votes among the
    exemplars, so its k must not exceed the fewest there are after any task.
    """
    k = cfg.memory.size
    if k == 0:
        return None
    n = scenario.num_classes
    if training and k < n:
        return (f"memory.size={k} keeps no exemplar of a class once more than {k} of the {n} classes are seen "
                f"(memory.size // classes seen each); choose memory.size >= {n}, or 0 for no exemplars")
    if "knn" not in cfg.eval.classifiers:
        return None
    counts = np.bincount(np.asarray(y_train), minlength=n)[scenario.class_order]  # training images of output i
    if cfg.memory.kind in COLLAGES:
        counts = counts // IMAGES_PER_COLLAGE
    elif cfg.memory.kind != "real":  # synthesised (DeepInversion): the quota whatever the images
        counts = np.full(n, k)
    kept = [(int(np.minimum(counts[: scenario.seen(t)], k // scenario.seen(t)).sum()), t)
            for t in range(scenario.num_tasks)]
    fewest, t = min(kept)
    if cfg.eval.knn.k <= fewest:
        return None
    seen = scenario.seen(t)
    return (f"eval.knn.k={cfg.eval.knn.k} neighbours vote among the exemplars, and after task {t + 1} there are "
            f"{fewest} (memory.size={k} // {seen} classes = {k // seen} a class, fewer where a class has fewer "
            f"images); choose eval.knn.k <= {fewest}")
