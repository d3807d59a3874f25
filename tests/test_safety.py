"""Issue 15: a run folder is trusted: no code from checkpoints, no deleted user files, one writer, no fake results.

Each probe of the issue is a test here. One real tiny run (iCaRL on a digits
subset, 2 tasks, 1 epoch, ResNet-20) gives a run folder; everything else is
crafted files, direct calls, or runs that are refused before they train
(those use the bundled digits: refused before any data is loaded).
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from cilab import cli, experiment, results
from cilab.config import Config, ConfigError, build_config

from helpers import npz_overrides, small_npz, tiny_npz

TINY = ["data.name=digits", "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]",
        "train.batch_size=64", "memory.size=20"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    io = capsys.readouterr()
    return rc, io.out, io.err


def one_line_error(err: str, *needles: str) -> None:
    """The CLI's error: one line, no traceback, naming what it must."""
    assert err.startswith("cilab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class Payload:
    """What an attacker pickles into a checkpoint: unpickling it creates ``flag`` (a stand-in for any code)."""

    def __init__(self, flag: Path):
        self.flag = str(flag)

    def __reduce__(self):
        return builtins.open, (self.flag, "w")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    """Overrides of the real runs here: a digits subset, 2 tasks of 5 classes."""
    return npz_overrides(tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz"), tasks=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ov):
    """A real run folder, and who held its lock while it trained."""
    out = tmp_path_factory.mktemp("runs") / "icarl"
    seen = []
    real = experiment.train_task

    def spy(*args, **kwargs):
        try:
            from cilab import runlock
        except ImportError:  # (the code before issue 15, to see these tests fail there)
            seen.append(None)
        else:
            seen.append((runlock.holder(out), (out / runlock.LOCK).read_text()))
        return real(*args, **kwargs)

    experiment.train_task = spy
    try:
        experiment.run(build_config("icarl", ov), out, progress=False, meta={"preset": "icarl", "overrides": ov})
    finally:
        experiment.train_task = real
    return out, seen


def copy_run(tiny_run, dest: Path) -> Path:
    shutil.copytree(tiny_run[0], dest)
    return dest


# -- 1. a checkpoint never runs code ------------------------------------------------------------


def test_checkpoints_load_with_weights_only_and_hold_the_metrics_and_confusion_matrices(tiny_run):
    out, _ = tiny_run
    m = json.loads((out / results.METRICS).read_text())
    with np.load(out / results.CONFUSION) as z:
        confusion = {k: z[k] for k in z.files}
    state = torch.load(results.checkpoint_path(out, 1), map_location="cpu", weights_only=True)  # raises on any object
    # metrics are plain data: equal to metrics.json as JSON reads it (NaN aside, there is none here)
    assert json.loads(json.dumps(state["metrics"], allow_nan=False)) == m | {"status": "running"}
    assert sorted(state["confusion"]) == sorted(confusion) == ["fc_task01", "fc_task02", "nme_task01", "nme_task02"]
    for k, v in state["confusion"].items():
        assert isinstance(v, torch.Tensor) and np.array_equal(v.numpy(), confusion[k]), k
    assert isinstance(state["generator"], torch.Tensor) and isinstance(state["torch_rng"], torch.Tensor)


def test_plain_data_turns_numpy_scalars_into_python_numbers_and_refuses_objects():
    got = results.plain_data({"a": np.float64(0.5), "b": [np.int64(3), (np.float32(0.25), None)], "c": np.bool_(True)})
    assert got == {"a": 0.5, "b": [3, [0.25, None]], "c": True}
    assert [type(got["a"]), type(got["b"][0]), type(got["c"])] == [float, int, bool]
    with pytest.raises(TypeError, match=r"metrics.x\[1\] holds a Tensor"):
        results.plain_data({"x": [1, torch.ones(1)]})
    # a method's state: tensors pass, numpy arrays become tensors, objects are still refused
    got = results.plain_data({"w": torch.ones(2), "f": np.full(3, 0.5), "n": np.int32(7)}, "method_state", tensors=True)
    assert torch.equal(got["w"], torch.ones(2)) and torch.equal(got["f"], torch.full((3,), 0.5, dtype=torch.float64))
    assert got["n"] == 7 and type(got["n"]) is int
    with pytest.raises(TypeError, match=r"method_state.f holds a builtin_function_or_method"):
        results.plain_data({"f": len}, "method_state", tensors=True)


def test_a_method_state_of_tensors_and_plain_data_loads(tmp_path):
    # A method plugin will add its own state under "method_state": anything weights_only-safe loads.
    state = {"task": 0, "model": {"w": torch.ones(2)},
             "method_state": {"fisher": {"conv.weight": torch.full((2, 2), 0.5)}, "lambda": 5000.0,
                              "names": ["a", "b"], "steps": 3, "old": None}}
    path = tmp_path / "task_01.pt"
    results.atomic_torch_save(path, state)
    got = results.load_checkpoint(path, required=("model",))
    assert got["method_state"]["lambda"] == 5000.0 and got["method_state"]["names"] == ["a", "b"]
    assert torch.equal(got["method_state"]["fisher"]["conv.weight"], torch.full((2, 2), 0.5))


def plant_payload(folder: Path, flag: Path) -> None:
    """Every checkpoint of ``folder`` rewritten with a pickled payload inside its metrics."""
    for path in sorted((folder / results.CHECKPOINTS).glob("task_*.pt")):
        state = torch.load(path, weights_only=False)  # the test's own file, just written
        state["metrics"]["note"] = Payload(flag)
        torch.save(state, path)


def test_the_payload_is_live_so_the_refusals_below_mean_something(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()


def test_load_checkpoint_refuses_a_pickled_payload_without_running_it(tiny_run, tmp_path):
    folder = copy_run(tiny_run, tmp_path / "shared")
    flag = tmp_path / "pwned"
    plant_payload(folder, flag)
    with pytest.raises(results.CheckpointError) as e:
        results.load_checkpoint(results.checkpoint_path(folder, 1))
    assert not flag.exists()
    msg = str(e.value)
    assert "\n" not in msg and "open" in msg and "cilab never unpickles" in msg
    assert "weights_only" not in msg  # torch's hint to load it unsafely is not passed on


def _cut_short(folder):
    """As if the run had been killed before it said it was complete: --resume then loads its last
    checkpoint (a complete run's --resume has nothing to load)."""
    m = results.read_metrics(folder)
    results.atomic_write_json(folder / results.METRICS, {**m, "status": "interrupted"})
    return folder


def test_resume_refuses_a_pickled_payload_without_running_it(tiny_run, tmp_path, capsys, ov):
    folder = _cut_short(copy_run(tiny_run, tmp_path / "shared"))
    flag = tmp_path / "pwned"
    plant_payload(folder, flag)
    rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov, "--quiet", "--resume"], capsys)
    assert rc == 2 and not flag.exists()
    one_line_error(err, "refused to load", "task_02.pt", "cilab never unpickles")


def test_report_refuses_a_pickled_payload_without_running_it(tiny_run, tmp_path, capsys):
    folder = copy_run(tiny_run, tmp_path / "shared")
    flag = tmp_path / "pwned"
    plant_payload(folder, flag)
    rc, out, err = run_cli(["report", folder, "--out", tmp_path / "report"], capsys)
    assert not flag.exists()
    assert rc == 0 and "Traceback" not in out + err  # metrics.json is plain JSON: the tables are still made
    # the t-SNE's and the exemplar grid's notes (a tiny run's fc may answer one class: another note)
    notes = [line for line in out.splitlines() if line.startswith("note:") and "one class" not in line]
    assert len(notes) == 2 and all("refused to load" in n and "cilab never unpickles" in n for n in notes)


def test_a_damaged_checkpoint_is_refused_in_one_line(tiny_run, tmp_path, capsys, ov):
    folder = _cut_short(copy_run(tiny_run, tmp_path / "shared"))
    path = results.checkpoint_path(folder, 1)
    path.write_bytes(path.read_bytes()[:1000])
    rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov, "--quiet", "--resume"], capsys)
    assert rc == 2
    one_line_error(err, "task_02.pt is damaged")


# -- 2. --overwrite deletes only what cilab wrote -------------------------------------------------


def test_overwrite_refuses_a_folder_with_a_config_yaml_but_no_marker(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "model.py").write_text("print('years of work')")
    (project / "notes.txt").write_text("notes")
    (project / "config.yaml").write_text("lr: 0.1\n")
    before = files(project)
    monkeypatch.setattr(experiment, "load_dataset", lambda cfg: pytest.fail("data loaded"))
    rc, _, err = run_cli(["run", "icarl", "--out", project, *TINY, "--overwrite"], capsys)
    assert rc == 2
    one_line_error(err, "is not a run folder", ".cilab-run", "config.yaml, notes.txt, src/", "--overwrite only clears")
    assert files(project) == before
    rc, _, err = run_cli(["run", "icarl", "--out", project, *TINY, "--resume"], capsys)
    assert rc == 2 and "is not a run folder" in err and files(project) == before


def test_a_run_folder_of_a_newer_format_is_refused(tiny_run, tmp_path, capsys, ov):
    from cilab import runfolder

    folder = copy_run(tiny_run, tmp_path / "run")
    (folder / runfolder.MARKER).write_text('{"cilab_run_folder": 99}')
    before = files(folder)
    rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov, "--overwrite"], capsys)
    assert rc == 2 and files(folder) == before
    one_line_error(err, "was made by a newer cilab (run folder format 99")


def test_clear_deletes_cilab_files_only(tmp_path):
    from cilab import runfolder

    f = tmp_path / "run"
    ours = ["config.yaml", "metrics.json", "confusion.npz", "accuracy.png", ".cilab-run",
            ".metrics.json.ab12.tmp", "checkpoints/task_01.pt", "checkpoints/task_12.pt",
            "checkpoints/.task_03.pt.x.tmp"]
    theirs = ["notes.txt", "src/model.py", "checkpoints/README", "checkpoints/task_01.pt.bak", "plot.png",
              "metrics.json.orig"]
    for name in ours + theirs:
        (f / name).parent.mkdir(parents=True, exist_ok=True)
        (f / name).write_text(name)
    kept = runfolder.clear(f)
    assert sorted(files(f)) == sorted(theirs)
    assert sorted(str(p.relative_to(f)) for p in kept) == sorted(
        ["checkpoints/README", "checkpoints/task_01.pt.bak", "metrics.json.orig", "notes.txt", "plot.png", "src"])


def test_overwrite_of_a_run_folder_keeps_the_users_files(tiny_run, tmp_path, capsys, ov):
    folder = copy_run(tiny_run, tmp_path / "run")
    (folder / "notes.txt").write_text("what I saw")
    (folder / results.CHECKPOINTS / "task_09.pt").write_bytes(b"a later task of the old run")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out.tfevents.1764201600.host.1.0").write_bytes(b"the old run's curves")
    (folder / "tensorboard" / "plan.txt").write_text("mine")
    old = (folder / results.METRICS).read_bytes()
    rc, out, err = run_cli(["run", "icarl", "--out", folder, *ov, "train.lr=1.0", "--quiet", "--overwrite"],
                           capsys)
    assert rc == 0, err
    assert (folder / "notes.txt").read_text() == "what I saw"
    assert not (folder / results.CHECKPOINTS / "task_09.pt").exists()  # the old run's: cilab wrote it
    assert sorted(p.name for p in (folder / results.CHECKPOINTS).iterdir()) == ["task_01.pt", "task_02.pt"]
    assert (folder / results.METRICS).read_bytes() != old and "kept notes.txt" in out + err
    # the old run's TensorBoard curves go (a new run's would be drawn over them), the user's file stays
    assert sorted(p.name for p in (folder / "tensorboard").iterdir()) == ["plan.txt"]


# -- 3. one writer --------------------------------------------------------------------------------


def test_a_run_holds_the_lock_while_it_trains_and_releases_it(tiny_run):
    from cilab import runlock

    out, seen = tiny_run
    assert len(seen) == 2  # two tasks
    for info, text in seen:
        assert info is not None and info.pid == os.getpid()
        started = dt.datetime.fromisoformat(info.started)
        assert abs((dt.datetime.now(dt.timezone.utc) - started).total_seconds()) < 600
        assert f"pid {os.getpid()}\n" in text
    assert not (out / runlock.LOCK).exists() and runlock.holder(out) is None


def test_a_second_run_on_a_locked_folder_is_refused_at_once_naming_the_holder(tiny_run, tmp_path, capsys,
                                                                              monkeypatch, ov):
    from cilab import runlock

    folder = copy_run(tiny_run, tmp_path / "run")
    before = files(folder)
    monkeypatch.setattr(experiment, "load_dataset", lambda cfg: pytest.fail("data loaded"))
    with runlock.RunLock(folder):  # another run (a separate open file: flock conflicts within a process too)
        info = runlock.holder(folder)
        for flags in (["--resume"], ["--overwrite"], []):
            t0 = time.monotonic()
            rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov, *flags], capsys)
            assert rc == 2 and time.monotonic() - t0 < 10
            one_line_error(err, "in use by another cilab run", f"pid {os.getpid()}", info.started)
        empty = tmp_path / "new"
        empty.mkdir()
        with runlock.RunLock(empty):  # a run that has just started: only its lock file is there
            rc, _, err = run_cli(["run", "icarl", "--out", empty, *ov], capsys)
            assert rc == 2 and f"pid {os.getpid()}" in err
    assert {k: v for k, v in files(folder).items() if k != runlock.LOCK} == before


HOLD_LOCK = """
import sys, time
from cilab.runfolder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_a_lock_of_a_killed_process_is_stale_and_its_run_reads_interrupted(tiny_run, tmp_path, capsys, ov):
    from cilab import runlock

    folder = copy_run(tiny_run, tmp_path / "run")
    m = json.loads((folder / results.METRICS).read_text())
    m.update(status="running", completed_tasks=1)  # as a run killed in task 2 leaves it
    results.atomic_write_json(folder / results.METRICS, m)
    (results.checkpoint_path(folder, 1)).unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        live = runlock.holder(folder)
        assert live is not None and live.pid == proc.pid
        rc, out, _ = run_cli(["report", folder, "--out", tmp_path / "rep1", "--no-tsne"], capsys)
        assert f"excluded run: incomplete: running (pid {proc.pid} on" in out
        rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov, "--resume"], capsys)
        assert rc == 2 and f"pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The kernel dropped the flock with the process; the lock file stays as a trace.
    assert (folder / runlock.LOCK).exists() and runlock.holder(folder) is None
    rc, out, _ = run_cli(["report", folder, "--out", tmp_path / "rep2", "--no-tsne"], capsys)
    assert "excluded run: incomplete: interrupted (process gone), 1/2 tasks done" in out
    rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov], capsys)  # a plain run: refused, and says why
    assert rc == 2
    one_line_error(err, "an interrupted run (process gone), 1 of 2 tasks done", "--resume")
    rc, _, err = run_cli(["run", "icarl", "--out", folder, *ov, "--quiet", "--resume"], capsys)
    assert rc == 0, err  # the stale lock does not stand in the way
    assert results.is_complete(folder) and not (folder / runlock.LOCK).exists()


def test_a_lock_held_for_a_dead_pid_is_stale(tmp_path):
    # The kernel keeps a flock while any process holds the descriptor (a forked
    # child of a killed run could): the lock file's pid, dead, tells it is stale.
    from cilab import runlock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / runlock.LOCK
    path.write_text(runlock.LockInfo(dead.pid, runlock.socket.gethostname(), "2026-01-01T00:00:00").text())
    orphan = os.open(path, os.O_RDWR)
    try:
        runlock.fcntl.flock(orphan, runlock.fcntl.LOCK_EX | runlock.fcntl.LOCK_NB)
        assert runlock.holder(folder) is None
        with runlock.RunLock(folder) as lock:
            assert runlock.holder(folder).pid == os.getpid() and lock.fd is not None
    finally:
        os.close(orphan)


def test_readers_share_a_run_folders_lock_and_keep_writers_out(tmp_path):
    """Two evaluations (or copies) read one source at once; a run that would write it is refused
    until both are done; the last reader out removes the lock file, as a writer does."""
    from cilab import runfolder, runlock

    folder = tmp_path / "run"
    folder.mkdir()
    first = runlock.RunLock(folder, shared=True).acquire(wait=0)
    second = runlock.RunLock(folder, shared=True).acquire(wait=0)
    with pytest.raises(runfolder.RunFolderError, match="is in use by another cilab run"):
        runlock.RunLock(folder).acquire(wait=0)
    assert runlock.holder(folder) is None  # read, not written: nobody to name as its writer
    first.release()
    assert (folder / runlock.LOCK).exists()  # the second reader still holds it
    with pytest.raises(runfolder.RunFolderError, match="is in use by another cilab run"):
        runlock.RunLock(folder).acquire(wait=0)
    second.release()
    assert not (folder / runlock.LOCK).exists()
    with runlock.RunLock(folder):  # free again for a writer, which keeps readers out
        with pytest.raises(runfolder.RunFolderError, match=f"in use by another cilab run \\(pid {os.getpid()}"):
            runlock.RunLock(folder, shared=True).acquire(wait=0)


def _dead_pid_lock(folder):
    """A lock file left by a killed run: it names a pid that is dead on this host."""
    from cilab import runlock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / runlock.LOCK).write_text(
        runlock.LockInfo(dead.pid, runlock.socket.gethostname(), "2026-01-01T00:00:00").text())


def test_readers_of_a_lock_file_that_names_a_dead_run_still_keep_writers_out(tmp_path):
    """Readers write nothing into the lock file: a dead writer's pid there must not make a writer take
    the folder from them, and a reader leaving must not remove a lock file that is not its own."""
    from cilab import runfolder, runlock

    folder = tmp_path / "run"
    folder.mkdir()
    _dead_pid_lock(folder)
    reader = runlock.RunLock(folder, shared=True).acquire(wait=0)
    with pytest.raises(runfolder.RunFolderError, match=r"in use by another cilab run \(a process reading it"):
        runlock.RunLock(folder).acquire(wait=0)
    with pytest.raises(runfolder.RunFolderError, match="is being read by another cilab run"):
        runfolder.check(folder, None, False, True)  # before any data is loaded
    reader.release()
    with runlock.RunLock(folder):  # the last reader is gone: free
        pass

    # a reader whose lock file was replaced meanwhile leaves the new one where it is
    reader = runlock.RunLock(folder, shared=True).acquire(wait=0)
    (folder / runlock.LOCK).unlink()
    writer = runlock.RunLock(folder).acquire(wait=0)
    reader.release()
    assert runlock.holder(folder).pid == os.getpid()
    with pytest.raises(runfolder.RunFolderError, match=f"pid {os.getpid()}"):
        runlock.RunLock(folder).acquire(wait=0)
    writer.release()


def test_a_reader_that_cannot_remove_a_stale_lock_gives_up_after_the_wait(tmp_path, monkeypatch):
    """An orphaned descriptor (a forked child of a killed run) holds the lock of a folder the reader
    may not write: it cannot replace the stale file, so it waits its time and says so, not spin forever."""
    from cilab import runfolder, runlock

    folder = tmp_path / "theirs"
    folder.mkdir()
    _dead_pid_lock(folder)
    orphan = os.open(folder / runlock.LOCK, os.O_RDWR)
    runlock.fcntl.flock(orphan, runlock.fcntl.LOCK_EX | runlock.fcntl.LOCK_NB)

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runfolder.os, "unlink", refuse)
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the reader spun past its wait"))
    signal.alarm(5)
    try:
        t0 = time.monotonic()
        with pytest.raises(runfolder.RunFolderError, match="is in use by another cilab run"):
            runlock.RunLock(folder, shared=True).acquire(wait=0.3)
        assert time.monotonic() - t0 < 3
    finally:
        signal.alarm(0)
        os.close(orphan)


def test_a_reader_needs_no_lock_file_in_a_folder_it_cannot_write(tmp_path, monkeypatch):
    """A source on a read-only mount (or another user's folder) is read without a lock file when it
    has none: no run of ours can be writing there; a writer is still refused in one line."""
    import errno

    from cilab import runfolder, runlock

    folder = tmp_path / "theirs"
    folder.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).startswith(str(folder)) and flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(runfolder.os, "open", read_only_open)
    with runlock.RunLock(folder, shared=True) as lock:
        assert lock.fd is None
    with pytest.raises(runfolder.RunFolderError, match="cannot create the lock .*Read-only file system"):
        runlock.RunLock(folder).acquire()
    monkeypatch.setattr(runfolder.os, "open", real_open)
    (folder / runlock.LOCK).write_text("")  # a lock file there (left by its writer): read-only, still locked
    monkeypatch.setattr(runfolder.os, "open", read_only_open)
    with runlock.RunLock(folder, shared=True) as lock:
        assert lock.fd is not None


def test_reproduce_refuses_a_locked_run_folder_even_with_overwrite(tiny_run, tmp_path, ov):
    from cilab import runlock
    from cilab.studyplan import plan

    groups = {"g": {"runs": [{"preset": "icarl", "seeds": [0]}]}}
    folder = copy_run(tiny_run, tmp_path / "g" / "icarl-s0")
    with runlock.RunLock(folder):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=f"in use by another cilab run \\(pid {os.getpid()} on") as e:
                plan("g", tmp_path, ov, groups=groups, overwrite=overwrite, check_data=False)
            assert "pass --overwrite" not in str(e.value)
    assert plan("g", tmp_path, ov, groups=groups, check_data=False)[0].action == "skip"  # released: complete
    groups = {"g": {"runs": [{"preset": "icarl", "tag": "other", "seeds": [0]}]}}
    (tmp_path / "g" / "icarl-other-s0").mkdir()
    (tmp_path / "g" / "icarl-other-s0" / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a run folder \(no \.cilab-run\); cilab never deletes it"):
        plan("g", tmp_path, TINY, groups=groups, overwrite=True, check_data=False)
    assert (tmp_path / "g" / "icarl-other-s0" / "config.yaml").read_text() == "{}"


def test_reproduce_jobs_workers_lock_their_run_folders(tmp_path):
    # Both run folders are locked after the plan looked at them: each worker
    # process checks its folder's lock itself and refuses, before loading data.
    from cilab import runlock
    from cilab.executors import LocalExecutor
    from cilab.reproduce import run_all
    from cilab.studyplan import plan

    groups = {"g": {"runs": [{"preset": "icarl", "seeds": [0, 1]}]}}
    specs = plan("g", tmp_path, TINY, groups=groups, check_data=False)
    locks = []
    for s in specs:
        s.folder.mkdir(parents=True)
        locks.append(runlock.RunLock(s.folder).acquire())
    try:
        res = run_all(specs, executor=LocalExecutor(jobs=2, threads=1), progress=False, log=lambda m: None)
    finally:
        for lock in locks:
            lock.release()
    assert [r.status for r in res] == ["failed", "failed"]
    for r in res:
        assert r.error.startswith("RunFolderError: ") and f"in use by another cilab run (pid {os.getpid()}" in r.error


# -- 4. no accuracy from zero images ------------------------------------------------------------------


NPZ_CASES = {
    "empty-test": (dict(x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64)),
                   ["x_test holds no images"]),
    "empty-train": (dict(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, np.int64)),
                    ["x_train holds no images"]),
    "objects": (dict(x_train=np.array([np.zeros((8, 8), np.uint8), "x"] * 20, dtype=object)),
                ["x_train is an array of Python objects", "cilab never unpickles"]),
    "zero-pixels": (dict(x_train=np.zeros((40, 0, 0), np.uint8), x_test=np.zeros((8, 0, 0), np.uint8)),
                    ["x_train holds images of 0 x 0 pixels"]),
    "rgba-last": (dict(x_train=np.zeros((40, 32, 32, 4), np.uint8)),
                  ["x_train has 4 channels (read as N x H x W x C, channels last)", "x[..., :3]"]),
    "two-last": (dict(x_train=np.zeros((40, 16, 16, 2), np.uint8)), ["x_train has 2 channels (read as N x H x W x C"]),
    "five-first": (dict(x_train=np.zeros((40, 5, 16, 16), np.uint8)), ["x_train has 5 channels (read as N x C x H x W"]),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_files_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, case):
    over, needles = NPZ_CASES[case]
    path = small_npz(tmp_path / f"{case}.npz", **over)
    out = tmp_path / "run"
    rc, _, err = run_cli(["run", "icarl", "--out", out, *TINY, "data.name=npz", f"data.path={path}",
                          "scenario.num_tasks=2"], capsys)
    assert rc == 2
    one_line_error(err, *needles)
    assert "allow_pickle" not in err  # numpy's hint to load it unsafely is not passed on
    assert not out.exists()


def test_an_accuracy_over_zero_images_is_undefined_not_zero():
    from cilab.evaluation import accuracy, task_accuracies

    assert np.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))
    # task 0 (labels 0, 1): 1 of 2 right; task 1 (labels 2, 3): no test image at all
    acc = task_accuracies(torch.tensor([0, 0]), torch.tensor([0, 1]), 2, n_tasks_seen=2)
    assert acc[0] == 50.0 and np.isnan(acc[1])


# -- 5. values that would only fail once training started --------------------------------------------


def _float_keys(cls=Config, prefix="") -> list[str]:
    import dataclasses

    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _float_keys(hints[f.name], prefix + f.name + ".")
        elif hints[f.name] is float:
            keys.append(prefix + f.name)
    return keys


def test_every_float_key_refuses_nan_and_inf_naming_the_key():
    keys = _float_keys()
    assert {"train.lr", "train.momentum", "eval.svm.C", "eval.mlp.lr"} <= set(keys)
    for key in keys:
        for value in (".nan", "nan", ".inf", "-.inf", "1e400"):
            with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
                build_config("icarl", TINY + [f"{key}={value}"])


@pytest.mark.parametrize("override, message", [
    ("seed=1.0e+23", "'seed' is 99999999999999991611392, too large"),
    ("seed=4294967296", "'seed' is 4294967296; it must be below 2**32"),
    ("train.epochs=1.0e+30", "'train.epochs' is 1000000000000000019884624838656, too large"),
])
def test_huge_integers_are_refused_naming_the_key(tmp_path, capsys, monkeypatch, override, message):
    monkeypatch.setattr(experiment, "load_dataset", lambda cfg: pytest.fail("data loaded"))
    rc, _, err = run_cli(["run", "icarl", "--out", tmp_path / "run", *TINY, override], capsys)
    assert rc == 2
    one_line_error(err, message)
    assert build_config("icarl", TINY + ["seed=4294967295"]).seed == 2**32 - 1  # the largest seed runs


def test_a_seed_too_large_in_a_preset_file_is_refused(tmp_path):
    preset = tmp_path / "big.yaml"
    preset.write_text("extends: icarl\nseed: 1.0e+23\n")
    with pytest.raises(ConfigError, match="'seed' is 99999999999999991611392, too large"):
        build_config(str(preset), TINY)


def test_a_run_that_fails_before_its_first_task_does_not_block_a_plain_rerun(tmp_path, monkeypatch, ov):
    def fail(message):
        def train_task(*args, **kwargs):
            raise RuntimeError(message)
        return train_task

    out = tmp_path / "run"
    monkeypatch.setattr(experiment, "train_task", fail("first run dies in task 1"))
    with pytest.raises(RuntimeError, match="first run dies"):
        experiment.run(build_config("icarl", ov), out, progress=False)
    assert (out / results.CONFIG).exists() and results.last_checkpoint(out) is None
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(experiment, "train_task", fail("second run got to task 1"))
    with pytest.raises(RuntimeError, match="second run got to task 1"):  # no flag needed: nothing was lost
        experiment.run(build_config("icarl", ov), out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


# -- 6. one-line errors, no tracebacks ------------------------------------------------------------------


def _preset(tmp_path: Path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, needles", [
    ("broken.yaml", b"train:\n  lr: [0.1\nseed: 1\n", ["preset", "broken.yaml' is not valid YAML at line"]),
    ("list.yaml", b"extends: [icarl, lwf]\n", ["'extends' must be one preset name or YAML path, got list"]),
    ("number.yaml", b"extends: 3\n", ["'extends' must be one preset name or YAML path, got int"]),
    ("latin1.yaml", "seed: 1  # r\xe9sum\xe9\n".encode("latin-1"), ["is not UTF-8 text (byte 0xe9", "save it as UTF-8"]),
    ("folder.yaml", None, ["folder.yaml' is a folder"]),
    ("folder", None, ["folder' is a folder"]),
    ("scalar.yaml", b"just text\n", ["must be a YAML mapping"]),
])
def test_bad_presets_are_refused_in_one_line(tmp_path, capsys, name, content, needles):
    path = _preset(tmp_path, name, content)
    rc, _, err = run_cli(["run", path, "--out", tmp_path / "run", *TINY], capsys)
    assert rc == 2
    one_line_error(err, *needles)


def test_an_unwritable_out_is_refused_before_the_data_is_loaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "load_dataset", lambda cfg: pytest.fail("data loaded"))
    (tmp_path / "a-file").write_text("x")
    rc, _, err = run_cli(["run", "icarl", "--out", tmp_path / "a-file" / "run", *TINY], capsys)
    assert rc == 2
    one_line_error(err, "a-file is a file, not a folder")
    if os.geteuid() != 0:
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        out = locked / "run"
    else:  # root writes through permissions; sysfs takes no new folders, even from root
        out = Path("/sys") / "cilab-test-run"
        try:
            out.mkdir()
        except OSError:
            pass
        else:
            out.rmdir()
            pytest.skip("no folder here that root cannot write")
    rc, _, err = run_cli(["run", "icarl", "--out", out, *TINY], capsys)
    assert rc == 2 and not out.exists()
    one_line_error(err, f"cannot write to {out}")


@pytest.mark.parametrize("content, needle", [
    ("[]", "unreadable: metrics.json holds a JSON list, not an object"),
    ('{"status": "complete", "classifiers": ["nme"], "classes_per_task": 2, "num_tasks": 2, '
     '"nme": {"accuracy": ["ninety", 80.0], "current_task_accuracy": [90.0, 70.0], '
     '"average_incremental_accuracy": 85.0, "final_accuracy": "high", "forgetting": 1.0}}',
     "unreadable: metrics.json lacks a non-empty list of numbers 'nme.accuracy', a number 'nme.final_accuracy'"),
    ('{"status": "complete", "classifiers": "nme"}', "unreadable: metrics.json lacks a list of classifier names"),
])
def test_report_on_a_broken_metrics_json_lists_the_run_without_a_traceback(tmp_path, capsys, content, needle):
    run = tmp_path / "runs" / "odd"
    run.mkdir(parents=True)
    (run / results.METRICS).write_text(content)
    rc, out, err = run_cli(["report", tmp_path / "runs", "--out", tmp_path / "report"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert f"excluded odd: {needle}" in out
    assert needle in (tmp_path / "report" / "report.md").read_text()



@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just words\n"])
def test_a_config_yaml_that_is_not_a_mapping_is_a_conflict_not_a_crash(tmp_path, text):
    from cilab import runfolder
    from cilab.config import build_config

    out = tmp_path / "run"
    out.mkdir()
    runfolder.write_marker(out)
    (out / "config.yaml").write_text(text)
    conflict = runfolder.config_conflict(out, build_config("icarl"))
    assert "its config.yaml is not a valid config (it holds a" in str(conflict)
    assert not conflict.differs  # unreadable: only --overwrite resolves it, not rerunning the same preset
