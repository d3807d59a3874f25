"""What the command line says when it is given something it cannot use: one line that names the
problem and the fix, before any work, for each case a review of the commands met as a user would.
"""

import json
import re
from pathlib import Path

import pytest

from cilab import cli
from cilab.config import ConfigError, build_config
from helpers import npz_overrides, tiny_npz


@pytest.fixture
def npz(tmp_path):
    return tiny_npz(tmp_path / "tiny.npz")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_report_into_a_file_is_refused_in_one_line(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert cli.main(["report", str(tmp_path), "--out", str(file)]) == 2
    assert _error(capsys) == f"cilab: error: --out {file} is a file, not a folder; choose another --out"
    under = file / "report"
    assert cli.main(["report", str(tmp_path), "--out", str(under)]) == 2
    err = _error(capsys)
    assert err == f"cilab: error: cannot create {under}: {file} is a file, not a folder; choose another --out"
    assert file.read_text() == "mine"


@pytest.mark.parametrize("bench", ["throughput", "protocol", "concurrency", "batched"])
def test_a_benchmarks_out_that_cannot_be_written_is_refused_before_it_runs(tmp_path, capsys, monkeypatch, bench):
    """The JSON is written at the end: an --out found bad then cost the whole benchmark."""
    from cilab.bench import fused, pipeline, sharing, wholerun

    ran = []
    for mod, name in ((pipeline, "throughput"), (wholerun, "protocol"), (sharing, "concurrency"), (fused, "batched")):
        monkeypatch.setattr(mod, name, lambda args, name=name: ran.append(name) or {})
    assert cli.main(["bench", bench, "--out", str(tmp_path)]) == 2
    assert _error(capsys) == f"cilab: error: --out {tmp_path} is a folder; give a file name for the JSON"
    file = tmp_path / "f"
    file.write_text("")
    assert cli.main(["bench", bench, "--out", str(file / "b.json")]) == 2
    assert f"cannot write --out {file / 'b.json'}" in _error(capsys)
    assert ran == []
    assert cli.main(["bench", bench, "--out", str(tmp_path / "new" / "b.json")]) == 0 and ran == [bench]
    assert (tmp_path / "new" / "b.json").read_text() == "{}\n"


@pytest.mark.parametrize("argv, message", [
    (["concurrency", "--images", "0"], "argument --images: must be an integer >= 1, got 0"),
    (["concurrency", "--epochs", "-1"], "argument --epochs: must be an integer >= 0, got -1"),
    (["concurrency", "--warmup-epochs", "-1"], "argument --warmup-epochs: must be an integer >= 0, got -1"),
    (["concurrency", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["batched", "--steps", "-1"], "argument --steps: must be an integer >= 0, got -1"),
    (["batched", "--processes", "0"], "argument --processes: must be an integer >= 1, got 0"),
    (["throughput", "--rounds", "0"], "argument --rounds: must be an integer >= 1, got 0"),
    (["throughput", "--images", "0"], "argument --images: must be an integer >= 1, got 0"),
    (["throughput", "--exemplars", "-5"], "argument --exemplars: must be an integer >= 0, got -5"),
    (["throughput", "--workers", "-1"], "argument --workers: must be an integer >= 0, got -1"),
    (["protocol", "--tasks", "0"], "argument --tasks: must be an integer >= 1, got 0"),
    (["protocol", "--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
    (["protocol", "--train-per-class", "0"], "argument --train-per-class: must be an integer >= 1, got 0"),
])
def test_benchmark_counts_that_make_no_sense_are_refused(capsys, argv, message):
    """--images 0 divided by zero after the processes had started; --steps -1 projected a negative time."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


@pytest.mark.parametrize("bench", ["concurrency", "batched"])
@pytest.mark.parametrize("option, message", [
    (["--study-seeds", "x"], "--study-seeds must be comma-separated integers >= 0 (e.g. 0,1,2), got 'x'"),
    (["--groups-file", "{missing}"], "cannot read the groups file {missing}"),
])
def test_a_benchmarks_study_options_are_checked_before_it_times_anything(tmp_path, capsys, monkeypatch, bench,
                                                                         option, message):
    """batched read them after its timing (minutes on a GPU), then failed with no JSON."""
    from cilab.bench import fused, sharing

    monkeypatch.setattr(fused, "_fused_steps", lambda *a, **k: pytest.fail("timed before checking"))
    monkeypatch.setattr(sharing, "concurrent_runs", lambda *a, **k: pytest.fail("timed before checking"))
    missing = str(tmp_path / "nope.yaml")
    option = [o.format(missing=missing) for o in option]
    assert cli.main(["bench", bench, "--out", str(tmp_path / "b.json"), *option]) == 2
    assert _error(capsys).startswith("cilab: error: " + message.format(missing=missing))


def test_a_groups_file_that_is_not_text_is_refused_in_one_line(tmp_path, capsys):
    gfile = tmp_path / "groups.yaml"
    gfile.write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["reproduce", "all", "--out", str(tmp_path / "o"), "--groups-file", str(gfile), "--dry-run"]) == 2
    assert _error(capsys).startswith(f"cilab: error: cannot read the groups file {gfile}: ")


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("under", [False, True])
def test_reproduce_into_a_file_is_refused_before_any_work(tmp_path, capsys, npz, dry_run, under, monkeypatch):
    import cilab.data

    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out = file / "study" if under else file
    monkeypatch.setattr(cilab.data, "load_dataset", lambda *a: pytest.fail("the data was loaded first"))
    argv = ["reproduce", "classifiers", "--out", str(out), "--seeds", "0", *npz_overrides(npz, tasks=2)]
    assert cli.main(argv + (["--dry-run"] if dry_run else [])) == 2
    assert _error(capsys) == (f"cilab: error: cannot create {out}: {file} is a file, not a folder; choose another --out"
                              if under else f"cilab: error: --out {file} is a file, not a folder; choose another --out")
    assert file.read_text() == "mine"


def test_reproduce_into_a_run_folder_is_refused(tmp_path, capsys, npz):
    from cilab import runfolder

    run = tmp_path / "r1"
    run.mkdir()
    runfolder.write_marker(run)
    assert cli.main(["reproduce", "classifiers", "--out", str(run), "--seeds", "0", "--dry-run",
                     *npz_overrides(npz, tasks=2)]) == 2
    assert _error(capsys) == (f"cilab: error: --out {run} is a run folder; cilab reproduce writes a folder of "
                              "groups of run folders: choose another --out")


@pytest.mark.parametrize("epochs", [1, 2, 3, 5, 50])
def test_a_milestone_past_the_epochs_names_milestones_that_fit(epochs):
    """It suggested [3,4] whatever the epochs, itself invalid below 5, and 'outside 1..0' at one epoch."""
    with pytest.raises(ConfigError) as e:
        build_config("icarl", [f"train.epochs={epochs}", f"train.milestones=[{epochs}]"])
    text = str(e.value)
    if epochs == 1:
        assert text == ("'train.milestones' has 1, but train.epochs=1 leaves no epoch to lower the learning "
                        "rate after; pass train.milestones=[]")
        return
    assert text.startswith(f"'train.milestones' has {epochs}, outside 1..{epochs - 1} (train.epochs={epochs}); ")
    suggested = re.findall(r"\[[0-9, ]*\]", text.split("e.g.", 1)[1])  # every list it offers
    assert suggested[0] == "[]" and len(suggested) == 2
    for milestones in suggested:  # every suggestion is itself valid for these epochs
        build_config("icarl", [f"train.epochs={epochs}", f"train.milestones={milestones}"])


def test_a_complete_run_is_neither_offered_nor_given_a_resume(tmp_path, capsys, npz):
    from cilab import results

    out = tmp_path / "r1"
    argv = ["run", "icarl", "--out", str(out), "--quiet", *npz_overrides(npz, tasks=2)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = (out / results.METRICS).read_text()
    assert cli.main(argv) == 2
    assert _error(capsys) == (f"cilab: error: {out} already holds results (a complete run); "
                              "pass --overwrite to start again, or choose another --out")
    assert cli.main(argv + ["--resume"]) == 0
    assert f"{out} is complete (2 tasks): nothing to resume" in capsys.readouterr().out
    assert (out / results.METRICS).read_text() == before
    # a metrics.json without completed_tasks (hand-edited; reports need no such key) is complete: no KeyError
    m = results.read_metrics(out)
    del m["completed_tasks"]
    results.atomic_write_json(out / results.METRICS, m)
    assert cli.main(argv + ["--resume"]) == 0
    assert f"{out} is complete (2 tasks): nothing to resume" in capsys.readouterr().out


def test_evaluate_names_a_missing_source_and_an_unfinished_one(tmp_path, capsys, npz):
    from cilab import results, runfolder

    missing = tmp_path / "nowhere"
    assert cli.main(["evaluate", str(missing), "--out", str(tmp_path / "e")]) == 2
    assert _error(capsys) == f"cilab: error: {missing} does not exist; give a run folder `cilab run` wrote"

    half = tmp_path / "half"
    half.mkdir()
    runfolder.write_marker(half)
    cfg = build_config("icarl", npz_overrides(npz, tasks=2))
    results.atomic_write_yaml(half / results.CONFIG, cfg.to_dict())
    results.atomic_write_json(half / results.METRICS, {"status": "interrupted", "completed_tasks": 1, "num_tasks": 2})
    results.atomic_write_bytes(results.checkpoint_path(half, 0), b"task 1's checkpoint")
    assert cli.main(["evaluate", str(half), "--out", str(tmp_path / "e")]) == 2
    assert _error(capsys) == (f"cilab: error: cannot evaluate from {half}: it holds a run that stopped "
                              "(interrupted), 1 of 2 tasks done, not a complete run; finish it first with "
                              "`cilab run ... --resume` (or `cilab reproduce`, which resumes it)")
    from cilab import runlock

    results.atomic_write_json(half / results.METRICS, {"status": "running", "completed_tasks": 1, "num_tasks": 2})
    with runlock.RunLock(half):  # a run still training: resuming it is not the advice, waiting is
        assert cli.main(["evaluate", str(half), "--out", str(tmp_path / "e")]) == 2
        err = _error(capsys)
    assert err.startswith(f"cilab: error: cannot evaluate from {half}: it holds a run in progress (pid ")
    assert err.endswith("1 of 2 tasks done; wait for it to finish")


def test_an_unknown_option_says_where_the_options_are(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "icarl", "--out", str(tmp_path / "r"), "--ovewrite"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("cilab run: error: unrecognized arguments: --ovewrite (`cilab run --help` lists the options; "
                    "config overrides are key=value)")


@pytest.mark.parametrize("argv,command", [
    (["run", "icarl", "--out", "r", "--ovewrite"], "cilab run"),
    (["report", "x", "--out", "r", "--bogus"], "cilab report"),
    (["bench", "protocol", "--out", "b.json", "--bogus"], "cilab bench protocol"),
])
def test_an_unknown_option_shows_the_usage_of_its_command(argv, command, capsys):
    """Not `cilab [-h] COMMAND ...`: the usage a user needs is the one of the command they typed."""
    with pytest.raises(SystemExit):
        cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"usage: {command} [-h]")
    assert lines[-1].startswith(f"{command}: error: unrecognized arguments: --")


def test_a_preset_files_mistakes_name_the_file(tmp_path):
    """A preset that extends a misspelt one, or holds a misspelt key: the error names the file it is in."""
    bad_parent = tmp_path / "mine.yaml"
    bad_parent.write_text("extends: icrl\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        build_config(str(bad_parent))
    assert str(e.value).startswith(f"preset '{bad_parent}' extends 'icrl': unknown preset 'icrl'. Did you mean 'icarl'?")
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("extends: icarl\ntrian:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as e:
        build_config(str(bad_key))
    assert str(e.value).startswith(f"preset '{bad_key}': ") and "trian" in str(e.value)
    # an override that mends the file's bad value is taken, as before
    mended = tmp_path / "mended.yaml"
    mended.write_text("extends: icarl\ntrain:\n  epochs: many\n")
    assert build_config(str(mended), ["train.epochs=3", "train.milestones=[]"]).train.epochs == 3
    # a misspelt override is the user's, not the preset's
    with pytest.raises(ConfigError) as e:
        build_config("icarl", ["trian.epochs=3"])
    assert not str(e.value).startswith("preset")


@pytest.mark.parametrize("bench", ["throughput", "concurrency", "batched"])
def test_a_benchmark_refuses_overrides_it_would_ignore(capsys, bench):
    """They train random CIFAR-shaped data: data.name=digits was accepted and changed nothing."""
    assert cli.main(["bench", bench, "data.name=digits", "train.batch_size=8", "memory.size=10"]) == 2
    assert _error(capsys) == ("cilab: error: data.name, memory.size: this benchmark trains random CIFAR-shaped data "
                              "and reads only train.*, model.*, loss.* overrides; leave the others out")


def test_a_dry_run_plans_a_study_it_may_not_write_and_the_real_run_is_refused(tmp_path, capsys, npz, monkeypatch):
    """A dry run only looks (a colleague's study on a read-only mount); running refuses in one line."""
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    study = tmp_path / "study"
    study.mkdir()
    argv = ["reproduce", "classifiers", "--out", str(study), "--seeds", "0", *npz_overrides(npz, tasks=2)]
    assert cli.main(argv + ["--dry-run"]) == 0
    assert "icarl-classifiers-s0" in capsys.readouterr().out
    assert cli.main(argv) == 2
    assert "Read-only file system" in _error(capsys)
    assert list(study.iterdir()) == []


@pytest.mark.parametrize("option", [["--confusion", "icarl-s9"], ["--tsne", "icarl-s9"], ["--exemplars", "icarl-s9"],
                                    ["--exemplar-task", "0"]])
def test_a_reports_misnamed_run_is_refused_before_the_previous_report_is_replaced(tmp_path, capsys, option):
    from helpers import fake_metrics, write_run

    runs = tmp_path / "runs"
    write_run(runs / "icarl-s0", fake_metrics("icarl", 0, [], {"nme": [80.0, 60.0]}))
    out = tmp_path / "report"
    assert cli.main(["report", str(runs), "--out", str(out), "--no-tsne"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(["report", str(runs), "--out", str(out), "--no-tsne", *option]) == 2
    err = _error(capsys)
    assert err.startswith(f"cilab: error: {option[0]}") and option[1] in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the last report, whole


def test_a_dry_run_downloads_nothing_and_says_the_data_is_still_to_come(tmp_path, capsys, monkeypatch):
    """`cilab reproduce all --dry-run` on a fresh machine tried to download CIFAR-100 (and without
    internet failed): a plan must not fetch 160 MB. It shows the plan and says the split is checked
    once the run has the data; where the run could not get it either (data.download=false), it refuses."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", lambda self: pytest.fail("downloaded"))
    root = tmp_path / "data"
    argv = ["reproduce", "baselines", "--out", str(tmp_path / "o"), "--seeds", "0", "--dry-run", f"data.root={root}"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("new ") for line in out) == 4  # finetune, joint, lwf, icarl
    assert out[-1] == "4 runs: 4 new"
    notes = [line for line in out if line.startswith("note: ")]
    assert notes == [f"note: CIFAR-100 is not in {root / 'cifar-100-python'} yet: the runs download it "
                     "(data.download=true), and check their task split on it then"]
    assert not root.exists()
    assert cli.main(argv + ["data.download=false"]) == 2
    assert _error(capsys).startswith(f"cilab: error: CIFAR-100 not found in {root / 'cifar-100-python'}.")


def test_a_classifier_that_answers_one_class_is_named_after_the_run_and_in_its_report(tmp_path, capsys, npz,
                                                                                        monkeypatch):
    """Its accuracy is 1 / classes seen, a curve like any other: a run and a report say what it is."""
    import torch

    from cilab.classifiers import FCClassifier

    monkeypatch.setattr(FCClassifier, "predict", lambda self, f: torch.full((len(f),), 1, dtype=torch.long))
    out = tmp_path / "r1"
    assert cli.main(["run", "icarl", "--out", str(out), "--quiet", *npz_overrides(npz, tasks=2)]) == 0
    printed = capsys.readouterr().out
    note = ("note: fc gave every test image one class after tasks 1 (class 1) and 2 (class 1): it has not "
            "learned to tell the classes apart (too few training steps, or a learning rate too large for "
            "the data: README, 'Why the FC head missed the newest classes on digits')")
    assert note in printed.splitlines()
    assert "nme gave" not in printed
    rep = tmp_path / "rep"
    assert cli.main(["report", str(out), "--out", str(rep), "--no-tsne"]) == 0
    assert f"r1: {note[len('note: '):]}" in (rep / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["evaluate", str(out), "--out", str(tmp_path / "r2"), "eval.classifiers=[fc,nme]"]) == 0
    assert note in capsys.readouterr().out.splitlines()  # an evaluation says it too


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "3"], "--tasks 3 does not divide the 100 classes; choose one of 1, 2, 4, 5, 10, 20, 25, 50, 100"),
    (["scenario.num_tasks=4"], "bench protocol sets scenario.num_tasks with --tasks; pass --tasks instead"),
    (["train.epochs=2"], "bench protocol sets train.epochs with --epochs; pass --epochs instead"),
])
def test_bench_protocol_takes_its_tasks_and_epochs_from_its_options_only(tmp_path, capsys, monkeypatch, argv, message):
    """An override of them won over the options while the JSON reported the options' values."""
    from cilab import experiment

    monkeypatch.setattr(experiment, "run", lambda *a, **k: pytest.fail("ran before checking"))
    assert cli.main(["bench", "protocol", "--out", str(tmp_path / "p.json"), "--quiet", *argv]) == 2
    assert _error(capsys) == f"cilab: error: {message}"


# -- cilab demo: never loses a run's results, checks every run before training any -------------

_QUICK_DEMO = ["scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]", "train.batch_size=64"]


def test_demo_refuses_a_folder_holding_another_runs_results_and_keeps_them(tmp_path, capsys):
    """`cilab demo` ran every run with overwrite: a finished run in DIR/finetune (a second demo with
    another seed, a run copied there) lost its metrics and checkpoints. It is refused, before any
    training, and --overwrite replaces it."""
    from cilab import cli

    out = tmp_path / "demo"
    other = ["data.name=digits", "model.name=resnet20", *_QUICK_DEMO, "seed=5"]
    assert cli.main(["run", "finetune", "--out", str(out / "finetune"), "--quiet", *other]) == 0
    saved = sorted(p.name for p in (out / "finetune").iterdir())
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(out), "--quiet", *_QUICK_DEMO]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'finetune'} holds another run than the demo's (its config differs (seed: 5 saved, 0 now" in err
    assert "pass --overwrite to replace it, or choose another --out" in err
    assert sorted(p.name for p in (out / "finetune").iterdir()) == saved  # its results are all there
    assert sorted(p.name for p in out.iterdir()) == ["finetune"]  # and nothing else was trained
    assert cli.main(["demo", "--out", str(out), "--quiet", "--overwrite", *_QUICK_DEMO]) == 0
    assert json.loads((out / "finetune" / "metrics.json").read_text())["seed"] == 0  # the demo's own run now
    done = {m: (out / m / "metrics.json").read_text() for m in ("finetune", "joint", "lwf", "icarl")}
    assert cli.main(["demo", "--out", str(out), "--quiet", "--overwrite", *_QUICK_DEMO]) == 0
    assert {m: (out / m / "metrics.json").read_text() for m in done} == done  # its own runs are kept, not retrained


def test_demo_checks_every_runs_overrides_before_training_any(tmp_path, capsys):
    """`cilab demo method=lwf` trained the first run (an lwf run in DIR/finetune), then stopped at
    joint, whose preset sets method_args.warm_start, which lwf has not."""
    from cilab import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quiet", *_QUICK_DEMO, "method=lwf"]) == 2
    assert "method lwf has no setting 'method_args.warm_start'" in capsys.readouterr().err
    assert not out.exists()


def test_a_memory_smaller_than_the_classes_is_refused_before_training(tmp_path, capsys):
    """K // classes seen exemplars a class: memory.size=5 on digits' 10 classes kept none once 6 were
    seen, so NME guessed (and the one-class note blamed the learning rate) and an SVM failed at that
    task, after the training of every task before it."""
    from cilab import cli

    out = tmp_path / "small"
    assert cli.main(["run", "icarl", "--out", str(out), "--quiet", "data.name=digits", "memory.size=5",
                     "eval.classifiers=[nme,svm]", *_QUICK_DEMO]) == 2
    assert ("memory.size=5 keeps no exemplar of a class once more than 5 of the 10 classes are seen "
            "(memory.size // classes seen each); choose memory.size >= 10") in capsys.readouterr().err
    assert not out.exists()


def test_a_broken_plugin_file_is_named_in_one_line_by_every_command(tmp_path):
    """A method file with a syntax error (or a name registered twice) in cilab's plugin folders broke
    every command, `cilab --help` included, with a traceback from deep in the package's import."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(Path(__file__).resolve().parents[1] / "src" / "cilab", tmp_path / "cilab", ignore=shutil.ignore_patterns("__pycache__"))
    broken = tmp_path / "cilab" / "methods" / "mine.py"
    broken.write_text("from .base import Method, register\n\n@register('mine')\nclass Mine(Method)\n    pass\n")
    argv = [sys.executable, "-c", "import sys; from cilab.console import main; sys.exit(main())", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"cilab: error: the plugin {broken} does not import (SyntaxError: expected ':' (mine.py, line 4)); "
        f"fix it, or move it out of {broken.parent}"]
    broken.write_text("from .base import Method, register\n\n@register('icarl')\nclass Mine(Method):\n    pass\n")
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.stderr.splitlines() == [
        f"cilab: error: the plugin {broken} does not import (KeyError: \"method 'icarl' registered twice\"); "
        f"fix it, or move it out of {broken.parent}"]


def test_methods_from_outside_cilab_through_cilab_plugins_in_every_command(tmp_path):
    """A method registered in the user's own file was known to the Python API only: `cilab run`,
    `cilab evaluate` (and reproduce's workers) could not read its run folder. $CILAB_PLUGINS names it."""
    import os
    import subprocess
    import sys

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("from cilab.methods import Method, register\n\n@register('env-plug')\nclass EnvPlug(Method):\n"
                      "    pass\n")
    env = {**os.environ, "CILAB_PLUGINS": f"json, {plugin}"}  # a module name and a file
    cilab = [sys.executable, "-c", "import sys; from cilab.console import main; sys.exit(main())"]
    quick = ["data.name=digits", *_QUICK_DEMO, "train.val_split=0", "train.keep_best=false"]
    done = subprocess.run([*cilab, "run", "finetune", "method=env-plug", "--out", str(tmp_path / "r"), "--quiet",
                           *quick], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["method"] == "env-plug"
    done = subprocess.run([*cilab, "evaluate", str(tmp_path / "r"), "--out", str(tmp_path / "e"), "eval.fc_scope=seen"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["method"] == "env-plug"
    env["CILAB_PLUGINS"] = str(tmp_path / "missing.py")
    done = subprocess.run([*cilab, "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"cilab: error: CILAB_PLUGINS: {tmp_path / 'missing.py'} does not import (FileNotFoundError: [Errno 2] No "
        f"such file or directory: '{tmp_path / 'missing.py'}'); fix it, or take it out of CILAB_PLUGINS"]


def test_knn_asking_more_neighbours_than_the_exemplars_after_some_task_is_refused_before_training(tmp_path, capsys):
    """k <= memory.size is not enough: 100 exemplars over 6 digits are 16 a class, 96 in all, and kNN
    with k = 100 failed at task 6, after the training of every task before it."""
    from cilab import cli

    out = tmp_path / "knn"
    assert cli.main(["run", "icarl", "--out", str(out), "--quiet", "data.name=digits", "memory.size=100",
                     "scenario.num_tasks=10", "eval.classifiers=[nme,knn]", "eval.knn.k=100", "train.epochs=1",
                     "train.milestones=[]"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cilab: error: eval.knn.k=100 neighbours vote among the exemplars, and after task 6 there are 96 "
        "(memory.size=100 // 6 classes = 16 a class, fewer where a class has fewer images); choose eval.knn.k <= 96")
    assert not out.exists()


def test_a_finished_runs_small_memory_still_gives_its_split_to_reports_and_evaluations():
    """The memory.size refusal is for runs about to train: a run an older cilab finished with
    memory.size=5 on digits still has its task split, which report figures and evaluations read."""
    from cilab.config import DataConfig
    from cilab.data import Scenario, load_dataset
    from cilab.workload import exemplar_problem

    cfg = build_config("icarl", ["data.name=digits", "memory.size=5", "scenario.num_tasks=5"])
    data = load_dataset(DataConfig(name="digits"))
    scenario = Scenario.for_run(cfg, data)
    assert scenario.tasks[0] == scenario.class_order[:2]
    assert exemplar_problem(cfg, scenario, data.y_train, training=False) is None
    assert exemplar_problem(cfg, scenario, data.y_train).startswith("memory.size=5 keeps no exemplar")


def test_a_ctrl_c_prints_the_command_that_goes_on(tmp_path, capsys, monkeypatch):
    """`cilab run` and `cilab demo` cut short: what is saved, and the command that continues, quoted
    for the shell (the demo's keeps --overwrite, which replaces only other runs' folders)."""
    from cilab import experiment

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", stopped)
    out = tmp_path / "my runs"
    assert cli.main(["run", "icarl", "--out", str(out / "r"), "train.milestones=[2, 3]", "train.epochs=4"]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "interrupted; no task was completed yet. Continue with:",
        f"  cilab run icarl 'train.milestones=[2, 3]' train.epochs=4 --out '{out / 'r'}' --resume"]
    assert cli.main(["demo", "--out", str(out), "--overwrite", "seed=3"]) == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [
        f"interrupted; the completed tasks are saved in {out}. Continue with:",
        f"  cilab demo --out '{out}' seed=3 --overwrite"]
