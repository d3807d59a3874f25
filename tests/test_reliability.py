"""Issue 9: interrupted runs resume exactly, bad input is refused clearly, nothing computed is lost.

Real runs on the bundled digits with tiny settings (5 tasks of 2 classes), on
the CPU. The kill / Ctrl-C tests run ``python -m cilab.cli`` as a subprocess
and signal it while it trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cilab import cli, experiment, results
from cilab.config import build_config, config_from_dict
from cilab.losses import Criterion
from helpers import small_npz

# train.deterministic: on a GPU two runs with one seed differ without it (issue 17)
TINY = ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]",
        "train.batch_size=64", "memory.size=40", "train.deterministic=true", "model.name=resnet20"]
# overrides refused only where no GPU is visible: on a GPU machine their tests hide it (below), so
# they run there too instead of skipping
NEEDS_A_GPU = {"train.device=cuda", "train.cuda_graphs=on"}


def hide_the_gpu_for(overrides, monkeypatch) -> None:
    if NEEDS_A_GPU.intersection(overrides):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- helpers -----------------------------------------------------------------------------


def numbers(m: dict) -> dict:
    """Everything in metrics.json that a rerun must reproduce: all but timing (and status)."""
    out = {k: m[k] for k in ("class_order", "tasks", "completed_tasks", "memory_per_class", "memory_total",
                             "train_images")}
    for c in m["classifiers"]:
        out[c] = {k: m[c][k] for k in ("accuracy", "current_task_accuracy", "accuracy_matrix",
                                       "average_incremental_accuracy", "final_accuracy", "forgetting")}
    return out


def strict_json(path: Path) -> dict:
    """Parse as JSON proper: NaN / Infinity are not JSON."""
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in (Path(folder) / results.CHECKPOINTS).glob("*"))


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(args)
    return rc, capsys.readouterr().err


def start_cli(args: list[str], log_dir: Path) -> subprocess.Popen:
    # Same number of threads as this process, so the subprocess computes the
    # very same floats (a reduction split over other threads sums in another order).
    n = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    return subprocess.Popen([sys.executable, "-m", "cilab.cli", *args], env=env,
                            stdout=open(log_dir / "stdout.txt", "w"), stderr=open(log_dir / "stderr.txt", "w"))


def wait_until(cond, proc: subprocess.Popen, log_dir: Path, timeout: float = 400.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"cilab exited ({proc.returncode}) too early:\n{(log_dir / 'stderr.txt').read_text()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def completed(folder: Path) -> int:
    """completed_tasks from metrics.json, read while the run writes it (so atomicity is exercised too)."""
    path = folder / results.METRICS
    return strict_json(path)["completed_tasks"] if path.exists() else 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of TINY: metrics, confusion matrices and final model."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["run", "icarl", "--out", str(out), *TINY, "--quiet"]) == 0
    with np.load(out / results.CONFUSION) as z:
        confusion = {k: z[k] for k in z.files}
    final = results.load_checkpoint(results.checkpoint_path(out, 4))["model"]
    return {"out": out, "metrics": strict_json(out / results.METRICS), "confusion": confusion, "model": final}


# -- resume --------------------------------------------------------------------------------


def test_sigkill_during_task_3_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_cli(["run", "icarl", "--out", str(out), *TINY, "--quiet"], tmp_path)
    # task_02.pt is written first, then metrics.json: once that says 2, task 3 is training.
    wait_until(lambda: completed(out) >= 2, proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoints(out) == ["task_01.pt", "task_02.pt"], "killed after task 3 finished: test not meaningful"

    # What a killed process leaves is complete, valid and says where it got to.
    m = strict_json(out / results.METRICS)
    assert m["completed_tasks"] == 2 and all(len(m[c]["accuracy"]) == 2 for c in m["classifiers"])
    assert config_from_dict(yaml.safe_load((out / results.CONFIG).read_text())) == build_config("icarl", TINY)
    for c in m["classifiers"]:  # and tasks 1-2 computed in this other process match the reference's
        assert m[c]["accuracy"] == reference["metrics"][c]["accuracy"][:2]
    (out / ".metrics.json.x1y2.tmp").write_text('{"half": ')  # as if killed in the middle of a write

    proc = start_cli(["run", "icarl", "--out", str(out), *TINY, "--quiet", "--resume"], tmp_path)
    assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()
    assert "resuming" in (tmp_path / "stderr.txt").read_text() + (tmp_path / "stdout.txt").read_text()

    m = strict_json(out / results.METRICS)
    assert m["status"] == "complete" and m["completed_tasks"] == 5
    assert numbers(m) == numbers(reference["metrics"])
    with np.load(out / results.CONFUSION) as z:
        assert sorted(z.files) == sorted(reference["confusion"])
        for k in z.files:
            np.testing.assert_array_equal(z[k], reference["confusion"][k], err_msg=k)
    final = results.load_checkpoint(results.checkpoint_path(out, 4))["model"]
    for k, v in reference["model"].items():
        assert torch.equal(final[k], v), k
    assert checkpoints(out) == [f"task_0{i}.pt" for i in range(1, 6)]  # no temporary file left anywhere
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_same_seed_same_config_twice_gives_identical_numbers(reference, capsys):
    # The second run goes through --overwrite into the reference's own folder:
    # that also pins that --overwrite really starts a run folder again.
    out = reference["out"]
    rc, err = run_cli(["run", "icarl", "--out", str(out), *TINY, "--quiet", "--overwrite"], capsys)
    assert rc == 0, err
    again = strict_json(out / results.METRICS)
    assert numbers(again) == numbers(reference["metrics"])
    assert again["timing"]["per_task"] != reference["metrics"]["timing"]["per_task"]  # a real second run
    final = results.load_checkpoint(results.checkpoint_path(out, 4))["model"]
    assert all(torch.equal(final[k], v) for k, v in reference["model"].items())


def test_ctrl_c_stops_cleanly_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(["run", "icarl", "--out", str(out), *TINY, "--quiet"], tmp_path)
    wait_until(lambda: completed(out) >= 1, proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err
    assert "interrupted" in err and f"--out {out} --resume" in err and "cilab run icarl data.name=digits" in err

    m = strict_json(out / results.METRICS)
    done = m["completed_tasks"]
    assert m["status"] == "interrupted" and 1 <= done < 5
    assert f"{done} completed task(s)" in err
    assert checkpoints(out) == [f"task_0{i}.pt" for i in range(1, done + 1)]  # and no temporary file
    for c in m["classifiers"]:
        assert len(m[c]["accuracy"]) == len(m[c]["accuracy_matrix"]) == done
    last = results.load_checkpoint(results.checkpoint_path(out, done - 1))["metrics"]
    assert last["completed_tasks"] == done and last["nme"]["accuracy"] == m["nme"]["accuracy"]


def test_ctrl_c_while_a_task_is_being_saved_waits_for_the_save(tmp_path, monkeypatch):
    # The signal lands between the checkpoint and metrics.json: the save is
    # finished first, so every file agrees that task 1 is complete.
    real = results.atomic_savez

    def savez_hit_by_ctrl_c(path, arrays):
        os.kill(os.getpid(), signal.SIGINT)
        real(path, arrays)

    monkeypatch.setattr(results, "atomic_savez", savez_hit_by_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run(build_config("icarl", TINY), out, progress=False)
    m = strict_json(out / results.METRICS)
    assert m["status"] == "interrupted" and m["completed_tasks"] == 1 and len(m["nme"]["accuracy"]) == 1
    assert checkpoints(out) == ["task_01.pt"]
    with np.load(out / results.CONFUSION) as z:
        assert sorted(z.files) == ["fc_task01", "nme_task01"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_ctrl_c_that_a_library_swallows_still_stops_the_run_after_the_task(tmp_path, monkeypatch):
    # Python raises Ctrl-C's KeyboardInterrupt wherever the main thread is, and
    # some C paths swallow it (seen in copy.deepcopy of a torch module); the
    # run must stop anyway, once the task under way is saved.
    real = experiment.train_task

    def train_and_swallow_ctrl_c(*args, **kwargs):
        images = real(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
        except KeyboardInterrupt:
            pass
        return images

    monkeypatch.setattr(experiment, "train_task", train_and_swallow_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.run(build_config("icarl", TINY), out, progress=False)
    m = strict_json(out / results.METRICS)
    assert m["status"] == "interrupted" and m["completed_tasks"] == 1
    assert checkpoints(out) == ["task_01.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


# -- a run folder is never overwritten by accident ------------------------------------------


@pytest.fixture
def old_run(tmp_path):
    """A run folder holding results (as a previous run leaves it)."""
    from cilab import runfolder

    out = tmp_path / "old"
    results.atomic_write_yaml(out / results.CONFIG, build_config("icarl", TINY).to_dict())
    runfolder.write_marker(out)
    results.atomic_write_json(out / results.METRICS, {"status": "complete", "completed_tasks": 5})
    results.atomic_write_bytes(out / results.CHECKPOINTS / "task_01.pt", b"weights")
    return out


def test_non_empty_run_folder_is_refused_without_resume_or_overwrite(old_run, capsys):
    before = files(old_run)
    rc, err = run_cli(["run", "icarl", "--out", str(old_run), *TINY], capsys)
    # a complete run: nothing to continue, so only --overwrite is offered
    assert rc == 2 and "already holds results (a complete run)" in err and "--overwrite" in err
    assert "--resume" not in err
    assert files(old_run) == before  # refused: nothing touched
    results.atomic_write_json(old_run / results.METRICS, {"status": "interrupted", "completed_tasks": 1})
    rc, err = run_cli(["run", "icarl", "--out", str(old_run), *TINY], capsys)
    assert rc == 2 and "already holds results" in err and "--resume to continue it" in err and "--overwrite" in err


def test_resume_with_another_config_is_refused(old_run, capsys):
    before = files(old_run)
    rc, err = run_cli(["run", "icarl", "--out", str(old_run), *TINY, "train.epochs=3", "--resume"], capsys)
    assert rc == 2 and "cannot resume" in err and "train.epochs: 1 saved, 3 now" in err
    assert files(old_run) == before


def test_resume_and_overwrite_together_are_refused(old_run, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "icarl", "--out", str(old_run), *TINY, "--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    ("train.device=cuda", "train.device=cuda but no CUDA GPU"),
    ("scenario.num_tasks=3", "scenario.num_tasks=3 does not divide the 10 classes; choose one of [1, 2, 5, 10]"),
])
def test_overwrite_refused_for_another_reason_keeps_the_old_results(old_run, capsys, monkeypatch, bad, message):
    # The old folder is only cleared once everything else has been checked.
    hide_the_gpu_for([bad], monkeypatch)
    before = files(old_run)
    rc, err = run_cli(["run", "icarl", "--out", str(old_run), *TINY, bad, "--overwrite"], capsys)
    assert rc == 2 and message in err
    assert files(old_run) == before


def test_overwrite_never_deletes_a_folder_that_is_not_a_run_folder(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    rc, err = run_cli(["run", "icarl", "--out", str(tmp_path), *TINY, "--overwrite"], capsys)
    assert rc == 2 and "not a run folder" in err
    assert files(tmp_path) == {"thesis.tex": b"years of work"}


# -- refused with a clear message before any training starts --------------------------------


def _damaged(path: Path, how: str) -> Path:
    good = small_npz(path).read_bytes()
    damage = {"truncated": good[: len(good) // 2], "empty": b"",
              "bit-flipped": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:]}
    path.write_bytes(damage[how])
    return path


@pytest.mark.parametrize("overrides, message", [
    (["train.epoch=2"], "unknown config key 'train.epoch'. Did you mean 'train.epochs'?"),
    (["train.lr=fast"], "'train.lr' must be a number, got 'fast'"),
    (["scenario.num_tasks=4"], "scenario.num_tasks=4 does not divide the 10 classes"),
    (["train.device=cuda"], "train.device=cuda but no CUDA GPU is visible"),
    (["train.cuda_graphs=on"], "train.cuda_graphs=on needs a CUDA device"),
    (["data.name=cifar100", "data.root={tmp}", "data.download=false"], "CIFAR-100 not found in"),
    (["data.name=npz", "data.path={tmp}/none.npz", "scenario.num_tasks=2"], "none.npz' not found"),
    (["data.name=npz", "data.path={truncated}", "scenario.num_tasks=2"], "is damaged"),
    (["data.name=npz", "data.path={bit-flipped}", "scenario.num_tasks=2"], "is damaged (BadZipFile"),
    (["data.name=npz", "data.path={empty}", "scenario.num_tasks=2"], "is damaged"),
    (["data.name=npz", "data.path={float-labels}", "scenario.num_tasks=2"], "y_train must be a 1-d integer array"),
    (["data.name=npz", "data.path={label-gap}", "scenario.num_tasks=2"], "y_train must use every label 0..4"),
])
def test_bad_input_is_refused_by_the_cli_before_anything_is_written(tmp_path, capsys, monkeypatch, overrides, message):
    hide_the_gpu_for(overrides, monkeypatch)
    paths = {"tmp": tmp_path,
             **{how: _damaged(tmp_path / f"{how}.npz", how) for how in ("truncated", "bit-flipped", "empty")},
             "float-labels": small_npz(tmp_path / "f.npz", y_train=np.repeat(np.arange(4.0), 10)),
             "label-gap": small_npz(tmp_path / "g.npz", y_train=np.repeat([0, 1, 2, 4], 10),
                               y_test=np.repeat([0, 1, 2, 4], 2))}
    out = tmp_path / "run"
    rc, err = run_cli(["run", "icarl", "--out", str(out), *TINY, *[o.format(**paths) for o in overrides]], capsys)
    assert rc == 2
    assert err.startswith("cilab: error: ") and message in err and "Traceback" not in err
    assert not out.exists()  # nothing trained, nothing written


# -- during a run -----------------------------------------------------------------------------


def test_non_finite_loss_stops_with_task_epoch_and_lr_and_keeps_completed_tasks(tmp_path, capsys, monkeypatch):
    real = Criterion.__call__

    def nan_from_task_2(self, z, y, z_old):  # n_seen > 2: the second task of 2 classes on
        loss = real(self, z, y, z_old)
        return loss * float("nan") if self.n_seen > 2 else loss

    monkeypatch.setattr(Criterion, "__call__", nan_from_task_2)
    out = tmp_path / "run"
    rc, err = run_cli(["run", "icarl", "--out", str(out), *TINY, "--quiet"], capsys)
    assert rc == 2
    assert "the loss became nan in task 2, epoch 1 at learning rate 2" in err and "Traceback" not in err

    m = strict_json(out / results.METRICS)
    assert m["status"].startswith("failed: the loss became nan in task 2, epoch 1")
    assert m["completed_tasks"] == 1 and all(len(m[c]["accuracy"]) == 1 for c in m["classifiers"])
    assert checkpoints(out) == ["task_01.pt"]
    assert results.load_checkpoint(out / results.CHECKPOINTS / "task_01.pt")["metrics"]["completed_tasks"] == 1


def test_a_failure_mid_task_reports_exactly_the_completed_tasks(tmp_path, monkeypatch):
    # nme is evaluated (and its accuracy appended) before fc fails in task 2:
    # metrics.json must still describe task 1 only, consistent with the checkpoints.
    real = experiment.build_classifier

    def failing(name, eval_cfg):
        clf = real(name, eval_cfg)
        if name == "fc":
            fit = clf.fit

            def fit_or_fail(data):
                if data.n_seen > 2:
                    raise MemoryError("out of memory while fitting fc")
                fit(data)
            clf.fit = fit_or_fail
        return clf

    monkeypatch.setattr(experiment, "build_classifier", failing)
    out = tmp_path / "run"
    cfg = build_config("icarl", TINY)
    with pytest.raises(MemoryError):
        experiment.run(cfg, out, progress=False)
    m = strict_json(out / results.METRICS)
    assert m["status"] == "failed: out of memory while fitting fc"
    assert m["completed_tasks"] == 1 and len(m["timing"]["per_task"]) == 1
    assert len(m["nme"]["accuracy"]) == len(m["fc"]["accuracy"]) == len(m["nme"]["accuracy_matrix"]) == 1
    assert checkpoints(out) == ["task_01.pt"]
    with np.load(out / results.CONFUSION) as z:
        assert sorted(z.files) == ["fc_task01", "nme_task01"]


# -- atomic writes -------------------------------------------------------------------------


WRITERS = {  # writer, first content, second content, reader (first content as read back)
    "json": (results.atomic_write_json, {"a": 1}, {"a": 2}, lambda p: json.loads(p.read_text())),
    "yaml": (results.atomic_write_yaml, {"a": 1}, {"a": 2}, lambda p: yaml.safe_load(p.read_text())),
    "torch": (results.atomic_torch_save, {"a": 1, "w": torch.ones(3)}, {"a": 2, "w": torch.zeros(3)},
              lambda p: {"a": results.load_checkpoint(p)["a"]}),
}


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("where, error", [("fsync", OSError("No space left on device")),
                                          ("replace", KeyboardInterrupt())])
def test_a_write_that_dies_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch, kind, where, error):
    write, first, second, read = WRITERS[kind]
    path = tmp_path / f"file.{kind}"
    write(path, first)
    before = path.read_bytes()

    def die(*args, **kwargs):
        raise error

    monkeypatch.setattr(results.os, where, die)
    with pytest.raises(type(error)):
        write(path, second)
    monkeypatch.undo()
    assert path.read_bytes() == before and read(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_unserialisable_object_leaves_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    results.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        results.atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_metrics_json_is_strict_json_and_readable_like_any_file(tmp_path):
    path = tmp_path / "metrics.json"
    results.atomic_write_json(path, {"acc": [50.0, float("nan")], "inf": float("inf")})
    assert strict_json(path) == {"acc": [50.0, None], "inf": None}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600


def test_temporary_files_of_killed_writes_are_found_and_removed(tmp_path):
    (tmp_path / results.CHECKPOINTS).mkdir()
    stale = [tmp_path / ".metrics.json.abc.tmp", tmp_path / results.CHECKPOINTS / ".task_03.pt.xyz.tmp"]
    keep = [tmp_path / "metrics.json", tmp_path / "notes.tmp", tmp_path / results.CHECKPOINTS / "task_02.pt"]
    for p in stale + keep:
        p.write_text("x")
    assert sorted(results.remove_temp_files(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_last_checkpoint_counts_tasks_by_number(tmp_path):
    for t in (1, 2, 99, 100):
        results.atomic_write_bytes(results.checkpoint_path(tmp_path, t - 1), b"x")
    (tmp_path / results.CHECKPOINTS / "task_101.pt.bak").write_text("x")
    assert results.last_checkpoint(tmp_path) == (99, results.checkpoint_path(tmp_path, 99))
    assert results.last_checkpoint(tmp_path / "empty") is None
