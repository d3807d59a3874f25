"""Executors: where the runs of ``cilab reproduce`` happen (``--jobs``, ``--executor``).

Here one after another, in N processes of this machine sharing its GPUs, or as
tasks of a Ray cluster. Register another with :func:`register_executor`.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError
from .runspec import RunResult, RunSpec

# An executor is called with ``specs``, the runs to train or evaluate (never the skipped or
# copied ones), and ``work``, the picklable function that does one (run_one with its options),
# and yields ("start", spec) when it hands a run to a worker and
# ("end", RunResult) when the run is over, in whatever order runs finish.
# ``specs`` grows while the executor runs: while it handles an "end", run_all
# appends the runs that were waiting for that one (evaluations of its
# checkpoints). So an executor takes runs from ``specs`` in order, looks again
# after every "end" it yields, and is done when it has started every run in
# ``specs`` and none is still running.
# Planning, skipping, the progress bar, the result lines, failures and the
# report are run_all's and reproduce's, the same code for every executor, so
# a group gives the same run folders whichever way it ran. Executors are built
# before the plan, so a bad option or a missing package stops the command
# before any work.
# An executor may also define ``notes(specs) -> list[str]``: advice printed
# before the runs start (LocalExecutor: several runs on one GPU want MPS).

Event = tuple[str, "RunSpec | RunResult"]
EXECUTORS: dict[str, type] = {}


def register_executor(name: str):
    """Register an executor class under ``--executor name``."""
    def register(cls):
        EXECUTORS[name] = cls
        return cls
    return register


def make_executor(name: str = "local", **options):
    """The executor ``name`` with the options given (None: its default); ConfigError for a bad name or option."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor '{name}'; executors: {', '.join(EXECUTORS)}")
    cls = EXECUTORS[name]
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(inspect.signature(cls).parameters))
    if foreign:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in foreign)} does not apply to --executor {name}")
    return cls(**given)


def _check_threads(threads) -> None:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset), not the host's
    except AttributeError:
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPU ids a worker may be given in CUDA_VISIBLE_DEVICES; [] without CUDA."""
    import torch

    n = torch.cuda.device_count()  # asks NVML: does not initialise CUDA in this process
    if not n:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # ours may be a subset ("2,3"): hand out those ids
    return ([i.strip() for i in visible.split(",")] if visible else [str(i) for i in range(n)])[:n]


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon seems to serve this process: its pipe directory
    (``CUDA_MPS_PIPE_DIRECTORY``, default /tmp/nvidia-mps) holds a 'control' pipe."""
    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()


# Several runs on one GPU, measured with `cilab bench concurrency` on one H200
# (README, "Several runs on one GPU"): the aggregate training img/s of 8 runs
# at once against one run. Without MPS the GPU time-slices between the
# processes' contexts and nothing overlaps.
SHARED_GPU_SPEEDUP = {"without MPS": 1.04, "with MPS": 1.97}


def _in_worker(work: Callable[[RunSpec], RunResult], spec: RunSpec, threads: int, env: dict | None = None,
               cwd: str | None = None) -> RunResult:
    """``work(spec)`` in a worker process, after giving the process its GPU, its threads and its folder."""
    # CUDA reads CUDA_VISIBLE_DEVICES when it initialises, which no import does:
    # set here, it limits this process to the GPU it was given.
    os.environ.update(env or {})
    if cwd:
        os.chdir(cwd)  # (Ray) relative run folders and data paths mean what they meant to the command
    import torch
    from threadpoolctl import threadpool_limits

    # N runs that each use every core are 5-10x slower than N runs sharing them:
    # PyTorch's CPU kernels oversubscribe. Limit torch's pool and the BLAS /
    # OpenMP pools of numpy and scikit-learn (the knn / svm / mlp classifiers).
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    return work(spec)


def _process_main(conn, work, spec: RunSpec, threads: int, env: dict) -> None:
    try:
        conn.send(_in_worker(work, spec, threads, env))
    except KeyboardInterrupt:
        pass  # Ctrl-C reached the whole process group: the run saved what it finished; the command reports the stop


@register_executor("local")
class LocalExecutor:
    """``jobs`` runs at once on this machine.

    jobs=1: in this process, one after another, each run with its own progress
    bar (what ``reproduce`` always did). jobs>1: each run in a fresh process
    (spawned: a forked child would inherit this process's torch thread pools
    and CUDA state half set up; fresh per run: it frees the run's GPU memory
    and a crash or a kill costs that run only), given a GPU round-robin over
    the visible ones (several runs per GPU when jobs exceeds them) and
    max(1, cores // runs at once) CPU threads unless ``threads`` says otherwise.
    """

    active = "running"  # what the progress bar calls the runs handed to workers and not over yet

    def __init__(self, jobs: int = 1, threads: int | None = None):
        if not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
        _check_threads(threads)
        self.jobs, self.threads = jobs, threads

    @property
    def in_process(self) -> bool:
        return self.jobs == 1

    def notes(self, specs: list[RunSpec]) -> list[str]:
        """What the user should know before ``specs`` run: several runs per GPU without MPS gain nothing."""
        gpus, at_once = visible_gpus(), min(self.jobs, len(specs))
        on_gpu = any(s.cfg.train.device != "cpu" for s in specs)  # auto is the GPU where there is one
        if not gpus or not on_gpu or at_once <= len(gpus) or mps_running():
            return []
        return [f"{at_once} runs at once share {len(gpus)} GPU(s) by time-slicing, which made 8 runs on an H200 "
                f"only {SHARED_GPU_SPEEDUP['without MPS']}x as fast as one; with CUDA MPS they were "
                f"{SHARED_GPU_SPEEDUP['with MPS']}x as fast: start it first with `nvidia-cuda-mps-control -d` "
                "(README, 'Several runs on one GPU')"]

    def __call__(self, specs: list[RunSpec], work) -> Iterator[Event]:
        return self._here(specs, work) if self.in_process else self._processes(specs, work)

    def _here(self, specs, work) -> Iterator[Event]:
        import torch

        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for spec in specs:  # a list's iterator also yields what is appended to it meanwhile
                yield "start", spec
                yield "end", work(spec)
        finally:
            torch.set_num_threads(previous)

    def _processes(self, specs, work) -> Iterator[Event]:
        import multiprocessing
        from multiprocessing.connection import wait

        ctx = multiprocessing.get_context("spawn")
        gpus = visible_gpus()
        started, live = 0, {}  # runs of specs handed out; slot -> (process, its result pipe, spec, start time)
        try:
            while started < len(specs) or live:
                for slot in range(self.jobs):
                    if slot in live or started == len(specs):
                        continue
                    # the cores shared by the runs that will run beside this one, as far as known now
                    at_once = min(self.jobs, len(live) + len(specs) - started)
                    threads = self.threads or max(1, cpu_count() // at_once)
                    spec = specs[started]
                    started += 1
                    env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus else {}
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_process_main, args=(send, work, spec, threads, env),
                                       name=f"cilab {spec.name}")
                    proc.start()
                    send.close()  # the child holds the only write end: its exit, however it happens, wakes wait()
                    live[slot] = (proc, recv, spec, time.perf_counter())
                    yield "start", spec
                ready = wait([c for _, c, _, _ in live.values()])
                for slot, (proc, recv, spec, t0) in list(live.items()):
                    if recv not in ready:
                        continue
                    try:
                        res = recv.recv()
                    except (EOFError, OSError):  # died without a word: killed (out of memory?) or crashed
                        res = None
                    proc.join()
                    recv.close()
                    del live[slot]
                    yield "end", res or RunResult(spec, "failed", time.perf_counter() - t0,
                                                  f"its worker process died (exit code {proc.exitcode})")
        finally:
            # Interrupted: a Ctrl-C in a terminal reaches every run, which stops
            # and marks its folder interrupted; give them a moment, then stop
            # what is left (their completed tasks are saved in any case).
            deadline = time.monotonic() + 15
            for proc, *_ in live.values():
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.terminate()
                    proc.join()


@register_executor("ray")
class RayExecutor:
    """Every run a Ray task: a local Ray (``address`` None) or a cluster ('auto', 'host:port').

    Each task asks for ``gpus_per_run`` of a GPU (default 0.25 where the
    cluster has GPUs: four runs share one; Ray sets the task's
    CUDA_VISIBLE_DEVICES) and ``cpus_per_run`` cores, which is also its torch
    thread count unless ``threads`` says otherwise. Workers write the run
    folders themselves, so ``--out`` must be on a filesystem every node sees.
    """

    in_process = False
    active = "on the cluster"  # Ray queues what it has no free resources for: running or waiting, we cannot tell

    def __init__(self, address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: float = 1.0,
                 threads: int | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("--executor ray needs Ray, an optional extra: pip install 'cilab[ray]'") from None
        if gpus_per_run is not None and (gpus_per_run < 0 or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run))):
            raise ConfigError(f"--gpus-per-run must be a fraction of one GPU (0.25: four runs share one) or a whole "
                              f"number of GPUs, got {gpus_per_run}")
        if cpus_per_run <= 0:
            raise ConfigError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
        _check_threads(threads)
        self.address, self.gpus_per_run, self.cpus_per_run, self.threads = address, gpus_per_run, cpus_per_run, threads

    def __call__(self, specs: list[RunSpec], work) -> Iterator[Event]:
        import ray

        started = not ray.is_initialized()  # a Ray set up by the caller (tests, a notebook) is used as it is
        if started:
            ray.init(address=self.address)  # None starts one on this machine; 'auto' joins the one `ray start` made
        refs: dict = {}
        pending: list = []
        try:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            gpus = self.gpus_per_run if self.gpus_per_run is not None else (0.25 if has_gpus else 0)
            if gpus and not has_gpus:  # the tasks would wait for a GPU forever
                raise ConfigError(f"--gpus-per-run {gpus} but the Ray cluster has no GPU; pass --gpus-per-run 0")
            # max_calls=1: a fresh worker process per run, which starts CUDA on
            # the GPU Ray gave this task and frees the GPU memory when done.
            task = ray.remote(num_cpus=self.cpus_per_run, num_gpus=gpus, max_calls=1)(_in_worker)
            threads, cwd = self.threads or max(1, int(self.cpus_per_run)), os.getcwd()
            while len(refs) < len(specs) or pending:
                for spec in specs[len(refs):]:  # all at once: Ray queues what has no free resources
                    ref = task.options(name=f"cilab {spec.name}").remote(work, spec, threads, None, cwd)
                    refs[ref] = spec
                    pending.append(ref)
                    yield "start", spec  # handed to the cluster; Ray starts it once a node has its resources free
                if not pending:
                    break
                [ref], pending = ray.wait(pending, num_returns=1)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayError as e:  # its worker died (out of memory, node lost): this run fails only
                    res = RunResult(refs[ref], "failed", error=f"{type(e).__name__}: {e}")
                yield "end", res
        finally:
            for ref in pending:  # interrupted: the runs stop as in a terminal, saving what they finished
                ray.cancel(ref)
            if started:
                ray.shutdown()
