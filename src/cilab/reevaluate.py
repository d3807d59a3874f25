"""A run evaluated again from another run's checkpoints: the same training, other classifiers.

Two runs whose configs differ only in what evaluation alone reads (``EVAL_ONLY``:
which classifiers, and their settings) train the same network on the same data
with the same random draws: nothing in training reads those keys, and no
classifier draws from the run's random streams (the kNN, SVM and MLP are seeded
on their own; a plugin classifier must do the same, see ``classifiers.Classifier``).
Each task's checkpoint of the first run
holds the model and the exemplars its evaluation used; evaluating them again
with the second run's classifiers gives the numbers the second run would have
got by training (tests/test_reevaluate.py checks it against a trained run, bit
for bit on the CPU). ``eval.batch_size`` is not among those keys: training reads
it (herding's and ``train.keep_best``'s features).

The study's iCaRL "hybrid1" (``eval.classifiers=[fc]``) and its classifier
ablation (``[nme,fc,knn,svm,mlp]``) are such runs: ``cilab reproduce`` evaluates
them from the plain iCaRL run instead of training them again.

The new run folder is a complete run of its own config: config.yaml, every
task's checkpoint (the first run's training state, with this run's metrics
and confusion matrices), metrics.json (``evaluated_from`` names the first run;
its timings and training images are the first run's training) and
confusion.npz.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import results, runfolder, runlock
from .aggregate import format_run_table
from .config import Config, ConfigError, config_from_dict, deep_merge, overrides_to_dict
from .evaluation import single_class_notes_in
from .experiment import Protocol, load_run_data
from .runtime import Runtime
from .results import RunFolderError
from .workload import checked_scenario

EVAL_ONLY = ("classifiers", "knn", "svm", "mlp", "fc_scope")  # the eval keys no part of training reads


_DEFAULTS = Config()


def _training_part(cfg: Config) -> Config:
    """``cfg`` with what evaluation alone reads (and ``log``) set to the defaults."""
    return dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, **{k: getattr(_DEFAULTS.eval, k) for k in EVAL_ONLY}), log=_DEFAULTS.log)


def training_key(cfg: Config) -> str:
    """Equal for two configs exactly when they train alike."""
    return repr(_training_part(cfg))


def trains_like(cfg: Config, other: Config) -> bool:
    """Whether ``cfg`` trains exactly as ``other`` does: the configs differ at most in ``EVAL_ONLY``
    (and ``log``, which only says where scalars go)."""
    return training_key(cfg) == training_key(other)


def source_config(source: Path) -> Config:
    """The config ``source``'s run computed with (keys added to cilab since: as it computed them)."""
    try:
        return runfolder.read_config(source)
    except ConfigError as e:
        raise type(e)(f"cannot evaluate from {source}: {e}") from None


def _check_complete(source: Path) -> None:
    if not source.exists():
        raise RunFolderError(f"cannot evaluate from {source}: it does not exist")
    if source.is_dir() and not any(source.iterdir()):
        raise RunFolderError(f"cannot evaluate from {source}: it is empty; give a complete run's folder")
    if not results.is_complete(source):
        if runfolder.holder(source):  # still training: resuming it is not the advice
            raise RunFolderError(f"cannot evaluate from {source}: it holds {runfolder.describe(source)}; wait for it "
                                 "to finish")
        raise RunFolderError(f"cannot evaluate from {source}: it holds {runfolder.describe(source)}, not a complete "
                             "run; finish it first with `cilab run ... --resume` (or `cilab reproduce`, which "
                             "resumes it)")


def evaluate_run(cfg: Config, source: str | Path, out: str | Path, *, overwrite: bool = False,
                 meta: dict | None = None, log: Callable[[str], None] | None = None, planned_for=None) -> dict:
    """A complete run of ``cfg`` in ``out``, evaluated from the checkpoints of the complete run in
    ``source`` (whose config must train as ``cfg`` does, see :func:`trains_like`); returns
    metrics.json's content. Refuses before writing anything: a source that is not complete or
    trains otherwise, a folder in ``out`` in the way (as ``cilab run`` would). ``planned_for``
    (reproduce): a run in ``out`` that the plan did not see is kept (:func:`runfolder.claim`)."""
    source, out = Path(source), Path(out)
    log = log or (lambda msg: tqdm.write(msg))
    if out.resolve() == source.resolve():
        raise RunFolderError(f"cannot evaluate {source} into itself; choose another --out")
    _check_complete(source)  # (a missing folder: said here, before a lock is made in it)
    with runlock.RunLock(source, shared=True):  # checked and read as it is: nothing writes it meanwhile
        _check_complete(source)
        theirs = source_config(source)
        if not trains_like(cfg, theirs):
            keys = runfolder.config_diff(_training_part(theirs).to_dict(), _training_part(cfg).to_dict())
            raise ConfigError(f"cannot evaluate from {source}: its training differs ({keys}); only "
                              f"eval.{', eval.'.join(EVAL_ONLY)} may differ")
        runfolder.check(out, cfg, False, overwrite, resumable=False)
        runtime = Runtime.resolve(cfg.train)
        data = load_run_data(cfg.data)
        try:
            scenario = checked_scenario(cfg, data, training=False)  # the source's memory, as it is
        except ValueError as e:
            raise ConfigError(f"cannot evaluate from {source}: {e}") from None
        with runfolder.claim(out, cfg, False, overwrite, log, resumable=False, planned_for=planned_for):
            results.atomic_write_yaml(out / results.CONFIG, cfg.to_dict())
            with runtime.applied():
                protocol = Protocol(cfg, out, data, scenario, runtime, False, 0, meta or {}, log)
                return evaluate_checkpoints(protocol, source)


def evaluate_checkpoints(p: Protocol, source: Path) -> dict:
    """Each task's checkpoint of ``source``, evaluated by ``p`` (its config's classifiers) and saved
    into ``p.out`` with ``p``'s metrics; then metrics.json, marked complete."""
    mine = list(p.cfg.eval.classifiers)
    t0 = time.perf_counter()
    with p.stop_marked() as ctrl_c:  # cut short: metrics.json says why, as a run's does; the tasks done stay
        for t in range(p.scenario.num_tasks):
            path = results.checkpoint_path(source, t)
            state = results.load_checkpoint(path, required=results.CHECKPOINT_KEYS)  # data only: never runs code
            if state["class_order"] != p.scenario.class_order:
                raise RunFolderError(f"cannot evaluate {path}: it was made for another class order")
            p.load_trained(state)  # as a resume does (DER's grown network)
            p.evaluate(t, p.scenario.seen(t))
            p.summarize_classifiers()
            trained = state["metrics"]  # the source's metrics after task t: its memory sizes and timings stay
            p.metrics = {**{k: v for k, v in trained.items() if k not in trained["classifiers"]},
                         **{k: p.metrics[k] for k in ("preset", "overrides", "classifiers", *mine)},
                         "evaluated_from": str(source)}
            state["metrics"] = results.plain_data(p.metrics)
            state["confusion"] = {k: torch.from_numpy(v) for k, v in p.confusion.items()}
            p.commit(t, state)  # the source's training state, this run's evaluation
            if ctrl_c.count:  # a Ctrl-C whose KeyboardInterrupt was swallowed: stop now, task t is saved
                raise KeyboardInterrupt
    p.metrics["status"] = "complete"
    p.metrics["reevaluation_s"] = time.perf_counter() - t0
    results.atomic_write_json(p.out / results.METRICS, p.metrics)
    p.plot_accuracy()
    return p.metrics


# -- cilab evaluate ------------------------------------------------------------------------


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="a finished run evaluated again with other classifiers, without training",
        description="Evaluate each task's checkpoint of the complete run in RUN_DIR again with other "
        f"classifiers (eval.{', eval.'.join(EVAL_ONLY)}) and write a complete run folder of the new config "
        "into --out: what training that config would give, without training. A key that changes training "
        "is refused. Example: cilab evaluate runs/icarl --out runs/icarl-knn eval.classifiers=[nme,knn] eval.knn.k=3",
    )
    p.add_argument("run", type=Path, metavar="RUN_DIR", help="a complete run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="eval.* overrides")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (your other files stay)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    if not args.run.exists():
        raise RunFolderError(f"{args.run} does not exist; give a run folder `cilab run` wrote")
    if not (args.run / results.CONFIG).is_file():
        raise RunFolderError(f"{args.run} is not a run folder (no {results.CONFIG}); give a folder `cilab run` wrote")
    if any(o.split("=", 1)[0].strip().split(".")[0] != "eval" for o in args.overrides):
        raise ConfigError(f"cilab evaluate takes eval.* overrides only (the rest is the run's), got "
                          f"{' '.join(args.overrides)}")
    cfg = config_from_dict(deep_merge(source_config(args.run).to_dict(), overrides_to_dict(list(args.overrides))))
    before = results.read_metrics(args.run) if results.is_complete(args.run) else {}
    meta = {"preset": before.get("preset"), "overrides": [*(before.get("overrides") or []), *args.overrides]}
    m = evaluate_run(cfg, args.run, args.out, overwrite=args.overwrite, meta=meta)
    print(format_run_table({args.out.name: m}))  # as `cilab run` prints it, to read the two side by side
    for note in single_class_notes_in(args.out, m["classifiers"]):
        print(f"note: {note}")
    print(f"results in {args.out} (evaluated from {args.run}'s checkpoints in {m['reevaluation_s']:.0f}s)")
    return 0
