"""cilab reproduce --jobs N and --executor ray: the numbers of one run after another, failures contained.

Real iCaRL runs on a digits subset (30 training and 10 test images per digit,
two tasks, one epoch, ResNet-20). Floats agree only between runs with the same
torch thread count, so every run here, the sequential reference included, uses
one thread (threads=1 / --threads 1). The group holds a third run whose own
override (train.lr=1e30) passes every check of the plan and then diverges: the
run fails while the others finish.
"""

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cilab import cli, executors, reproduce as rp, results, runlock, studyplan
from cilab.config import ConfigError
from cilab.executors import LocalExecutor, make_executor
from cilab.reproduce import reproduce
from cilab.runspec import RunResult, RunSpec

from helpers import REPEATABLE, npz_overrides, tiny_npz

GROUPS = {"par": {"runs": [
    {"preset": "icarl", "seeds": [0, 1]},
    {"preset": "icarl", "tag": "diverges", "seeds": [0], "overrides": ["train.lr=1e30"]},
]}}
GOOD = ["icarl-s0", "icarl-s1"]
BAD = "icarl-diverges-s0"


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return tiny_npz(tmp_path_factory.mktemp("data") / "digits.npz", per_class=30, test_per_class=10)


@pytest.fixture(scope="module")
def overrides(npz):
    # runs are compared number for number: on a GPU that needs deterministic algorithms
    return npz_overrides(npz, tasks=2) + REPEATABLE


def numbers(folder: Path) -> dict:
    """What must not depend on where a run ran: class order, every accuracy, the final weights."""
    m = results.read_metrics(folder)
    task, path = results.last_checkpoint(folder)
    weights = results.load_checkpoint(path)["model"]
    return {"class_order": m["class_order"], "tasks": m["tasks"], "completed": task + 1,
            **{c: {k: m[c][k] for k in ("accuracy", "current_task_accuracy", "accuracy_matrix")}
               for c in m["classifiers"]},
            "weights": {k: v.flatten().tolist() for k, v in weights.items()}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, overrides):
    """The good runs one after another in this process (the default executor), one thread."""
    out = tmp_path_factory.mktemp("sequential")
    groups = {"par": {"runs": GROUPS["par"]["runs"][:1]}}
    res, _ = reproduce("par", out, overrides, groups=groups, progress=False, report=False, threads=1)
    assert [r.status for r in res] == ["done", "done"]
    return {name: numbers(out / "par" / name) for name in GOOD}


def check_group(out: Path, res: list[RunResult], reference: dict) -> None:
    by = {r.spec.name: r for r in res}
    assert [r.spec.name for r in res] == GOOD + [BAD]  # plan order, whatever order they finished in
    for name in GOOD:
        assert by[name].status == "done" and results.is_complete(out / name)
        assert numbers(out / name) == reference[name], name
    assert by[BAD].failed and "NonFiniteLossError" in by[BAD].error and "1e+30" in by[BAD].error
    assert (out / BAD / results.CONFIG).exists() and not results.is_complete(out / BAD)  # retried next time


def test_jobs_2_gives_the_numbers_of_one_run_after_another(tmp_path, overrides, reference, capsys, monkeypatch):
    gfile = tmp_path / "groups.yaml"
    gfile.write_text(yaml.safe_dump(GROUPS))
    out = tmp_path / "rep"
    argv = ["reproduce", "par", "--out", str(out), "--groups-file", str(gfile), "--jobs", "2", "--threads", "1",
            "--no-tsne", *overrides]
    used, real = [], rp.run_all
    monkeypatch.setattr(rp, "run_all", lambda specs, **kw: used.append(kw["executor"]) or real(specs, **kw))
    assert cli.main(argv) == 1  # one run failed
    assert isinstance(used[0], LocalExecutor) and (used[0].jobs, used[0].threads) == (2, 1)
    io = capsys.readouterr()
    assert f"FAILED {BAD}" in io.err and "the loss became nan" in io.err
    assert "2 done, 1 failed" in io.out and "avg incremental acc" in io.out
    for name in GOOD:
        assert numbers(out / "par" / name) == reference[name], name
    assert (out / "par" / BAD / results.CONFIG).exists() and not results.is_complete(out / "par" / BAD)
    summary = (out / "par" / "report" / "summary.csv").read_text()
    assert ",icarl," in summary and "diverges" not in summary  # the numbers are those of the runs that finished
    report = (out / "par" / "report" / "report.md").read_text().splitlines()
    assert any(BAD in line and "incomplete" in line for line in report)  # the failed run is marked

    # the same command again: the complete runs are skipped, only the failed one runs (and fails) again
    stamps = {p: p.stat().st_mtime_ns for name in GOOD for p in (out / "par" / name).rglob("*")}
    assert cli.main(argv) == 1
    io = capsys.readouterr()
    assert "2 skipped, 1 failed" in io.out and f"FAILED {BAD}" in io.err
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_jobs_2_evaluates_in_workers_two_at_once_from_one_source(tmp_path, overrides, reference, monkeypatch):
    """The hybrid and the kNN variant of iCaRL read one trainer's checkpoints: both are handed to
    workers once it is over (evaluating here, in the command's process, fails), sharing its lock."""
    groups = {"par": {"runs": [{"preset": "icarl", "seeds": [0]},
                               {"preset": "icarl", "tag": "hybrid1", "seeds": [0], "overrides": ["eval.classifiers=[fc]"]},
                               {"preset": "icarl", "tag": "knn", "seeds": [0], "overrides": ["eval.classifiers=[nme,knn]"]}]}}
    monkeypatch.setattr(rp, "evaluate_run", lambda *a, **k: pytest.fail("evaluated in the command's process"))
    res, _ = reproduce("par", tmp_path, overrides, groups=groups, progress=False, report=False, jobs=2, threads=1)
    assert [(r.spec.name, r.status) for r in res] == [
        ("icarl-s0", "done"), ("icarl-hybrid1-s0", "evaluated"), ("icarl-knn-s0", "evaluated")]
    assert numbers(tmp_path / "par" / "icarl-s0") == reference["icarl-s0"]
    icarl, hybrid, knn = (results.read_metrics(r.spec.folder) for r in res)
    assert hybrid["fc"] == icarl["fc"] and knn["nme"] == icarl["nme"] and knn["classifiers"] == ["nme", "knn"]
    assert not (tmp_path / "par" / "icarl-s0" / runlock.LOCK).exists()  # the last reader removed it


def probe(spec: RunSpec) -> RunResult:
    """A stand-in for run_one, in a worker: where it ran, with what, and at the same time as the others."""
    marks = spec.folder.parent
    (marks / f"{spec.name}.started").touch()
    if spec.name == "crash":
        os._exit(3)  # a hard death (as when the kernel kills a process out of memory): no exception, no result
    deadline = time.monotonic() + 120  # every worker waits for all three: passes only if they run at once
    while len(list(marks.glob("*.started"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    return RunResult(spec, "done", metrics={"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                            "threads": torch.get_num_threads(),
                                            "together": len(list(marks.glob("*.started"))) == 3})


def test_workers_are_processes_with_their_gpu_and_threads_and_a_crash_costs_one_run(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1"])  # two GPUs, three runs: 0, 1, 0
    specs = [RunSpec("g", n, n, "icarl", 0, [], None, tmp_path / n) for n in ("a", "b", "crash")]
    events = list(LocalExecutor(jobs=3)(specs, probe))
    assert [k for k, _ in events[:3]] == ["start"] * 3
    ends = {r.spec.name: r for k, r in events if k == "end"}
    assert ends["crash"].failed and "worker process died (exit code 3)" in ends["crash"].error
    a, b = ends["a"].metrics, ends["b"].metrics
    assert a["together"] and b["together"]
    assert len({a["pid"], b["pid"], os.getpid()}) == 3
    assert (a["gpu"], b["gpu"]) == ("0", "1")
    assert a["threads"] == b["threads"] == max(1, executors.cpu_count() // 3)  # the cores shared, not oversubscribed


def test_several_runs_per_gpu_without_mps_get_a_note_before_they_start(tmp_path, overrides, monkeypatch):
    pipes = tmp_path / "mps"
    pipes.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipes))
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0"])
    monkeypatch.setattr(rp, "run_all", lambda specs, **kw: [])  # the note is said before any run starts
    lines = []
    reproduce("par", tmp_path / "out", overrides, groups=GROUPS, jobs=2, log=lines.append, report=False)
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "2 runs at once share 1 GPU(s) by time-slicing" in notes[0]
    assert "1.04x" in notes[0] and "1.97x" in notes[0] and "nvidia-cuda-mps-control -d" in notes[0]

    # no note: MPS is running (its control pipe is there), one run per GPU, one run left, no GPU,
    # runs on the CPU
    specs = studyplan.plan("par", tmp_path / "out", overrides, groups=GROUPS)  # 3 runs, train.device=auto
    (pipes / "control").touch()
    assert LocalExecutor(jobs=2).notes(specs) == []
    (pipes / "control").unlink()
    assert LocalExecutor(jobs=2).notes(specs[:1]) == [] and LocalExecutor(jobs=1).notes(specs) == []
    on_cpu = studyplan.plan("par", tmp_path / "out", overrides + ["train.device=cpu"], groups=GROUPS)
    assert len(LocalExecutor(jobs=3).notes(specs)) == 1 and LocalExecutor(jobs=3).notes(on_cpu) == []
    monkeypatch.setattr(executors, "visible_gpus", lambda: ["0", "1"])
    assert LocalExecutor(jobs=2).notes(specs) == [] and len(LocalExecutor(jobs=3).notes(specs)) == 1
    monkeypatch.setattr(executors, "visible_gpus", lambda: [])
    assert LocalExecutor(jobs=4).notes(specs) == []


def test_executor_options_are_checked_before_any_work(tmp_path, overrides, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="--jobs must be an integer >= 1"):
        make_executor("local", jobs=0)
    with pytest.raises(ConfigError, match="unknown executor 'slurm'"):
        make_executor("slurm")
    gfile = tmp_path / "groups.yaml"
    gfile.write_text(yaml.safe_dump(GROUPS))
    argv = ["reproduce", "par", "--out", str(tmp_path / "rep"), "--groups-file", str(gfile), *overrides]
    assert cli.main(argv + ["--address", "auto"]) == 2
    assert "--address does not apply to --executor local" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert cli.main(argv + ["--executor", "ray"]) == 2
    assert "pip install 'cilab[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


@pytest.fixture
def local_ray(monkeypatch):
    ray = pytest.importorskip("ray")  # `make test` installs the ray extra; skipped only where it is missing
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # local, CPU only, no network
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_same_numbers(tmp_path, overrides, reference, local_ray):
    with pytest.raises(ConfigError, match="--jobs does not apply to --executor ray"):
        make_executor("ray", jobs=2)
    with pytest.raises(ConfigError, match="has no GPU"):  # a GPU request on a CPU cluster would wait forever
        reproduce("par", tmp_path, overrides, groups=GROUPS, progress=False, report=False, executor="ray",
                  gpus_per_run=0.25)
    res, rep = reproduce("par", tmp_path, overrides, groups=GROUPS, progress=False, draw_tsne=False,
                         executor="ray", cpus_per_run=1, threads=1)
    check_group(tmp_path / "par", res, reference)
    assert {r["variant"] for r in rep.rows} == {"icarl"}

    # work that becomes ready while the executor runs (an evaluation once its trainer is over) is
    # picked up: here copies, as Ray tasks, the second appended when the first ends
    good = res[0].spec
    specs = [RunSpec("c", "one", "one", "icarl", 0, [], good.cfg, tmp_path / "c" / "one", "copy", source=good)]
    events = []
    for kind, item in make_executor("ray", cpus_per_run=1, threads=1)(specs, rp.run_one):
        events.append((kind, (item if kind == "start" else item.spec).name, getattr(item, "status", None)))
        if kind == "end" and len(specs) == 1:
            specs.append(RunSpec("c", "two", "two", "icarl", 0, [], good.cfg, tmp_path / "c" / "two", "copy",
                                 source=good))
    assert events == [("start", "one", None), ("end", "one", "copied"), ("start", "two", None), ("end", "two", "copied")]
    assert numbers(tmp_path / "c" / "two") == reference["icarl-s0"]
    assert local_ray.is_initialized()  # a Ray the caller started is left running
