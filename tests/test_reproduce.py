"""cilab reproduce: validation before any run, skipping, resuming, failures, the report at the end.

A test-only group (two tiny real runs on a digits subset) is passed as a
mapping or a --groups-file; the bundled groups.yaml is only checked for shape.
"""

import csv
import json
import re

import pytest
import yaml

from cilab import cli, experiment, results, runfolder, runlock
from cilab.config import ConfigError, build_config, preset_names
from cilab.data import DatasetError
from cilab.reproduce import reproduce, run_one
from cilab.studyplan import load_groups, plan

from helpers import npz_overrides, tiny_npz

GROUPS = {
    "tiny": {"description": "test group", "runs": [
        {"preset": "icarl", "seeds": [0]},
        {"preset": "finetune", "seeds": [0]},
    ]},
}


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def no_training(*args, **kwargs):
    raise AssertionError("experiment.run was called")


def test_bundled_groups_match_the_study():
    groups = load_groups()
    assert {"baselines", "icarl-variants", "losses", "classifiers", "collage", "deepinversion"} <= set(groups)
    base = {r["preset"]: r["seeds"] for r in groups["baselines"]["runs"]}
    assert base == {"finetune": [0, 1, 2], "lwf": [0, 1, 2], "icarl": [0, 1, 2], "joint": [0]}
    clf = groups["classifiers"]["runs"]
    assert len(clf) == 1 and clf[0]["preset"] == "icarl"  # one training for every classifier
    assert "eval.classifiers=[nme,fc,knn,svm,mlp]" in clf[0]["overrides"]
    assert "groups" not in preset_names()
    for g in ("baselines", "icarl-variants", "losses", "classifiers"):  # presets of the first issues exist
        assert all(r["preset"] in preset_names() for r in groups[g]["runs"]), g


def test_plan_validates_everything_before_any_run(tmp_path, npz, monkeypatch):
    monkeypatch.setattr(experiment, "run", no_training)
    ov = npz_overrides(npz)
    specs = plan("tiny", tmp_path, ov, groups=GROUPS)
    assert [s.name for s in specs] == ["icarl-s0", "finetune-s0"]
    assert specs[0].cfg.memory.size == 20 and specs[1].cfg.memory.size == 0
    assert any("memory.size=20 not applied to finetune-s0" in n for n in specs[1].notes)
    assert specs[1].overrides[-1] == "seed=0" and "memory.size=20" not in specs[1].overrides

    # one bad run stops the whole group before anything runs, naming the run
    bad = {"tiny": {"runs": GROUPS["tiny"]["runs"] + [{"preset": "lwf", "seeds": [3], "overrides": ["train.epochs=0"]}]}}
    with pytest.raises(ConfigError, match=r"lwf-s3: 'train.epochs' must be > 0"):
        reproduce("tiny", tmp_path, ov, groups=bad, progress=False)
    missing = {"future": {"runs": [{"preset": "icarl", "seeds": [0]}, {"preset": "collage-nowhere", "seeds": [0]}]}}
    with pytest.raises(ConfigError, match="needs presets that do not exist.*collage-nowhere"):
        plan("future", tmp_path, ov, groups=missing)
    with pytest.raises(ConfigError, match="--seeds"):
        plan("tiny", tmp_path, ov + ["seed=3"], groups=GROUPS)
    with pytest.raises(DatasetError, match="not found"):  # data checked once, before any run
        plan("tiny", tmp_path, ov + [f"data.path={tmp_path / 'nope.npz'}"], groups=GROUPS)
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").iterdir())


def test_plan_checks_a_b50_split_against_the_data_before_any_run(tmp_path, npz, monkeypatch):
    """The bundled strong-baselines group's lucir-b50 (first task of 50 classes) cannot split the
    10 digits: the plan must say so before the first run, as experiment.run would at that run's start."""
    monkeypatch.setattr(experiment, "run", no_training)
    groups = {"b50": {"runs": [{"preset": "icarl", "seeds": [0]},
                               {"preset": "lucir", "tag": "b50", "seeds": [0],
                                "overrides": ["scenario.num_tasks=11", "scenario.first_task_classes=50"]}]}}
    ov = npz_overrides(npz)  # scenario.num_tasks=5, after the run's own 11: 5 tasks divide 10 classes, a first of 50 cannot
    with pytest.raises(ConfigError, match="lucir-b50-s0: scenario.first_task_classes=50 must be below the 10 classes"):
        reproduce("b50", tmp_path, ov, groups=groups, progress=False)


def test_an_override_of_what_the_group_varies_is_refused_naming_it(tmp_path, npz, monkeypatch):
    """collage's runs differ only in memory.kind: memory.kind=real for the whole group would train
    one run four times and report it under four names. The plan says so, and names the override."""
    monkeypatch.setattr(experiment, "run", no_training)
    groups = {"kinds": {"runs": [{"preset": "icarl", "seeds": [0, 1]},
                                 {"preset": "icarl", "tag": "collage", "seeds": [0, 1],
                                  "overrides": ["memory.kind=collage-resized"]}]}}
    ov = npz_overrides(npz)
    assert len(plan("kinds", tmp_path, ov, groups=groups)) == 4  # the group as written is fine
    with pytest.raises(ConfigError) as e:
        plan("kinds", tmp_path, ov + ["memory.kind=real"], groups=groups)
    assert str(e.value) == ("group 'kinds': icarl-s0 and icarl-collage-s0 are the same run once memory.kind=real "
                            "applies (so are icarl-s1 and icarl-collage-s1): it sets what the group's runs differ "
                            "in (memory.kind); drop it, or run one of them with cilab run")
    # a group whose own runs are the same (a user's groups file) is refused too, naming the file's fix
    twins = {"twins": {"runs": [{"preset": "icarl", "seeds": [0]},
                                {"preset": "icarl", "tag": "again", "seeds": [0], "overrides": ["memory.size=2000"]}]}}
    with pytest.raises(ConfigError, match=r"^group 'twins': icarl-s0 and icarl-again-s0 have the same config; "
                                          r"give each run of the group settings of its own$"):
        plan("twins", tmp_path, [o for o in ov if not o.startswith("memory.size")], groups=twins)
    assert not (tmp_path / "kinds").exists() and not (tmp_path / "twins").exists()


def test_runs_that_would_share_a_folder_are_refused(tmp_path, npz, capsys):
    ov = npz_overrides(npz)
    same_name = {"g": {"runs": [{"preset": "icarl", "seeds": [0]},
                                {"preset": "icarl", "seeds": [0], "overrides": ["memory.size=30"]}]}}
    with pytest.raises(ConfigError, match=r"group 'g': runs 1 and 2 are both named icarl .*give one a 'tag'"):
        plan("g", tmp_path, ov, groups=same_name)
    for tag in (5, "../../elsewhere", ""):  # a tag is part of a folder's name: it must not lead out of --out
        with pytest.raises(ConfigError, match=rf"run 2 \(icarl\): 'tag' names the run's folders: letters, digits, "
                                              rf"'.', '_' and '-', got {re.escape(repr(tag))}$"):
            plan("g", tmp_path, ov, groups={"g": {"runs": [{"preset": "icarl"}, {"preset": "icarl", "tag": tag}]}})
    with pytest.raises(ConfigError, match=r"run 1 \(icarl\): 'seeds' lists 0 twice"):
        plan("g", tmp_path, ov, groups={"g": {"runs": [{"preset": "icarl", "seeds": [0, 1, 0]}]}})
    assert cli.main(["reproduce", "baselines", "--seeds", "0,1,1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "cilab: error: --seeds lists 1 twice; give each seed once (e.g. 0,1)\n"
    assert not any(tmp_path.iterdir())


def test_a_loss_override_is_left_out_of_the_runs_of_methods_with_their_own_loss(tmp_path, npz):
    from cilab.reproduce import dropped_notes

    groups = {"mixed": {"runs": [{"preset": "icarl", "seeds": [0]}, {"preset": "wa", "seeds": [0]}]}}
    specs = plan("mixed", tmp_path, npz_overrides(npz) + ["loss.classification=ce", "loss.distillation=mse"],
                 groups=groups)
    icarl, wa = specs
    assert (icarl.cfg.loss.classification, icarl.cfg.loss.distillation) == ("ce", "mse")
    assert (wa.cfg.loss.classification, wa.cfg.loss.distillation) == ("bce", "bce")  # icarl's preset, unused by wa
    assert dropped_notes(specs) == [f"{o} not applied to wa-s0: their method has a loss of its own"
                                    for o in ("loss.classification=ce", "loss.distillation=mse")]
    # a whole section at once is left out the same way
    specs = plan("mixed", tmp_path, npz_overrides(npz) + ["loss={classification: ce, distillation: mse}"],
                 groups=groups)
    assert specs[0].cfg.loss.classification == "ce" and specs[1].cfg.loss.classification == "bce"
    assert [o for o, _ in specs[1].dropped] == ["loss={classification: ce, distillation: mse}"]


def test_reproduce_runs_skips_resumes_and_reports(tmp_path, npz, monkeypatch, capsys):
    ov = npz_overrides(npz, tasks=2)  # two tiny trainings + one resumed task
    gfile = tmp_path / "groups.yaml"
    gfile.write_text(yaml.safe_dump(GROUPS))
    out = tmp_path / "rep"
    argv = ["reproduce", "tiny", "--out", str(out), "--groups-file", str(gfile), "--quiet", "--no-tsne",
            "--set", ov[0], *ov[1:]]
    assert cli.main(argv) == 0
    icarl, ft = out / "tiny" / "icarl-s0", out / "tiny" / "finetune-s0"
    assert results.is_complete(icarl) and results.is_complete(ft)
    m = results.read_metrics(icarl)
    assert m["preset"] == "icarl" and m["overrides"] == ov + ["seed=0"]
    # what each run folder's config.yaml says it ran, against the settings written out by hand
    # (the group's overrides on the preset; finetune keeps no exemplars, so memory.size=20 is not applied)
    for folder, method, memory in ((icarl, "icarl", 20), (ft, "finetune", 0)):
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["method"] == method and saved["seed"] == 0 and saved["memory"]["size"] == memory
        assert (saved["train"]["epochs"], saved["train"]["batch_size"], saved["model"]["name"]) == (1, 64, "resnet20")
        assert saved["data"]["path"] == str(npz) and saved["scenario"]["num_tasks"] == 2
        assert (saved["train"]["lr"], saved["loss"]["classification"]) == (2.0, "bce")  # from the preset, untouched
    printed = capsys.readouterr().out
    assert "avg incremental acc" in printed and "2 done" in printed
    rows = (out / "tiny" / "report" / "summary.csv").read_text()
    acc = m["nme"]["accuracy"]
    assert f"{(acc[0] + acc[1]) / 2:.6f}" in rows  # one seed: the mean of its 2 task accuracies
    assert (out / "tiny" / "report" / "accuracy.png").exists()

    # second invocation: nothing retrains, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "report" not in p.parts}
    monkeypatch.setattr(experiment, "run", no_training)
    assert cli.main(argv) == 0
    assert "2 skipped" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    # an interrupted run (its last task lost) is resumed from its last checkpoint
    (icarl / "checkpoints" / "task_02.pt").unlink()
    m["status"], m["completed_tasks"] = "interrupted", 1
    results.atomic_write_json(icarl / results.METRICS, m)
    first_ckpt = (icarl / "checkpoints" / "task_01.pt").stat().st_mtime_ns
    calls = []
    monkeypatch.undo()
    real_run = experiment.run

    def spy(cfg, folder, **kw):
        calls.append((folder.name, kw["resume"]))
        return real_run(cfg, folder, **kw)

    monkeypatch.setattr(experiment, "run", spy)
    res, rep = reproduce("tiny", out, ov, groups=GROUPS, progress=False, draw_tsne=False)
    assert calls == [("icarl-s0", True)]
    assert [r.status for r in res] == ["resumed", "skipped"]
    assert results.is_complete(icarl) and (icarl / "checkpoints" / "task_02.pt").exists()
    assert (icarl / "checkpoints" / "task_01.pt").stat().st_mtime_ns == first_ckpt  # task 1 not retrained
    assert len(results.read_metrics(icarl)["nme"]["accuracy"]) == 2
    assert {r["variant"] for r in rep.rows} == {"icarl", "finetune"}


def fake_run(fail: set):
    """Stands for experiment.run: writes a complete run folder, or raises for the runs in ``fail``."""
    def run(cfg, folder, *, resume=False, overwrite=False, progress=True, position=0, meta=None, log=None):
        folder.mkdir(parents=True, exist_ok=True)
        runfolder.write_marker(folder)  # as experiment.run marks its folders
        results.atomic_write_yaml(folder / results.CONFIG, cfg.to_dict())
        if folder.name in fail:
            raise RuntimeError(f"injected failure in {folder.name}")
        acc = [90.0 - 10 * t - cfg.seed for t in range(5)]
        m = {"method": cfg.method, "seed": cfg.seed, "status": "complete", "classes_per_task": 2, "num_tasks": 5,
             "classifiers": ["fc"], "dataset": cfg.data.name, "memory_total": [0] * 5, **(meta or {}),
             "fc": {"accuracy": acc, "current_task_accuracy": acc, "accuracy_matrix": [],
                    "average_incremental_accuracy": sum(acc) / 5, "final_accuracy": acc[-1], "forgetting": 1.0}}
        results.atomic_write_json(folder / results.METRICS, m)
        return m
    return run


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, npz, monkeypatch, capsys):
    groups = {"three": {"runs": [{"preset": "finetune", "seeds": [0, 1, 2]}]}}
    gfile = tmp_path / "groups.yaml"
    gfile.write_text(yaml.safe_dump(groups))
    monkeypatch.setattr(experiment, "run", fake_run({"finetune-s1"}))
    out = tmp_path / "rep"
    rc = cli.main(["reproduce", "three", "--out", str(out), "--groups-file", str(gfile), "--quiet", *npz_overrides(npz)])
    assert rc == 1
    io = capsys.readouterr()
    assert "FAILED finetune-s1" in io.err and "injected failure" in io.err
    assert results.is_complete(out / "three" / "finetune-s0") and results.is_complete(out / "three" / "finetune-s2")
    summary = (out / "three" / "report" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and ",2,0 2," in summary[1]  # two seeds aggregated: 0 and 2
    # fake accuracies 90 - 10 t - seed over 5 tasks: average incremental 70 (seed 0) and 68 (seed 2),
    # mean 69, sample std sqrt((1 + 1) / 1) = 1.414214; final 50 and 48: 49 +- 1.414214
    row = next(csv.DictReader((out / "three" / "report" / "summary.csv").open()))
    assert (row["avg_inc_acc_mean"], row["avg_inc_acc_std"]) == ("69.000000", "1.414214")
    assert (row["final_acc_mean"], row["final_acc_std"]) == ("49.000000", "1.414214")
    assert "finetune-s1" in (out / "three" / "report" / "report.md").read_text()

    # next time only the failed run is run again (resumed: same config, not complete)
    monkeypatch.setattr(experiment, "run", fake_run(set()))
    specs = plan("three", out, npz_overrides(npz), groups=groups)
    assert [s.action for s in specs] == ["skip", "resume", "skip"]
    assert run_one(specs[1], progress=False).status == "resumed"


def test_a_folder_with_another_config_is_refused_unless_overwrite(tmp_path, npz, monkeypatch):
    groups = {"one": {"runs": [{"preset": "finetune", "seeds": [0]}]}}
    monkeypatch.setattr(experiment, "run", fake_run(set()))
    ov = npz_overrides(npz)
    reproduce("one", tmp_path, ov, groups=groups, progress=False, report=False)
    with pytest.raises(ConfigError, match=r"train.lr: 2.0 saved, 0.5 now") as e:
        plan("one", tmp_path, ov + ["train.lr=0.5"], groups=groups)
    assert "--overwrite" in str(e.value)
    specs = plan("one", tmp_path, ov + ["train.lr=0.5"], groups=groups, overwrite=True)
    assert specs[0].action == "overwrite"
    res, _ = reproduce("one", tmp_path, ov + ["train.lr=0.5"], groups=groups, overwrite=True, progress=False, report=False)
    assert res[0].status == "done"
    assert json.loads((tmp_path / "one" / "finetune-s0" / "metrics.json").read_text())["overrides"][-2] == "train.lr=0.5"


def test_tracking_switched_on_is_the_same_run_for_reproduce_as_for_run_resume(tmp_path, npz, monkeypatch):
    # `cilab run --resume ... log.tensorboard=true` continues a run; reproduce must agree (one comparison)
    groups = {"one": {"runs": [{"preset": "finetune", "seeds": [0]}]}}
    monkeypatch.setattr(experiment, "run", fake_run(set()))
    ov = npz_overrides(npz)
    reproduce("one", tmp_path, ov, groups=groups, progress=False, report=False)
    assert [s.action for s in plan("one", tmp_path, ov + ["log.tensorboard=true"], groups=groups)] == ["skip"]


def test_help_lists_the_groups(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("baselines", "icarl-variants", "losses", "classifiers", "collage", "deepinversion", "--seeds",
                 "--groups-file", "--set", "--overwrite"):
        assert word in text


# -- several groups as one study -------------------------------------------------------------

TWO_GROUPS = {
    "first": {"runs": [{"preset": "icarl", "seeds": [0]}, {"preset": "finetune", "seeds": [0]}]},
    "second": {"runs": [{"preset": "icarl", "seeds": [0]}, {"preset": "icarl", "tag": "lr", "seeds": [0],
                                                            "overrides": ["train.lr=0.5"]}]},
}


def test_several_groups_train_a_shared_run_once_and_copy_it(tmp_path, npz, monkeypatch, capsys):
    """icarl-s0 is in both groups with one config: it trains once (in the first group, the first
    to have it) and the second group's folder is a byte-for-byte copy; each group gets its report;
    the same command again skips all four."""
    gfile = tmp_path / "groups.yaml"
    gfile.write_text(yaml.safe_dump(TWO_GROUPS))
    out = tmp_path / "study"
    trained = []
    real_run = experiment.run

    def spy(cfg, folder, **kw):
        trained.append(f"{folder.parent.name}/{folder.name}")
        return real_run(cfg, folder, **kw)

    monkeypatch.setattr(experiment, "run", spy)
    argv = ["reproduce", "all", "--out", str(out), "--groups-file", str(gfile), "--quiet", "--no-tsne",
            *npz_overrides(npz, tasks=2)]
    assert cli.main(argv) == 0
    assert sorted(trained) == ["first/finetune-s0", "first/icarl-s0", "second/icarl-lr-s0"]
    io = capsys.readouterr()
    assert "second/icarl-s0: copied from first/icarl-s0" in io.out
    assert "1 copied from an identical run of another group" in io.out and "3 done, 1 copied" in io.out
    a, b = out / "first" / "icarl-s0", out / "second" / "icarl-s0"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {"metrics.json", "config.yaml", "confusion.npz"} <= {str(f) for f in files}
    assert "checkpoints/task_02.pt" in {str(f) for f in files} and runlock.LOCK not in {f.name for f in files}
    assert sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) == files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for g, variants in (("first", {"icarl", "finetune"}), ("second", {"icarl", "icarl-lr"})):
        rows = list(csv.DictReader((out / g / "report" / "summary.csv").open()))
        assert {r["variant"] for r in rows} == variants, g

    monkeypatch.setattr(experiment, "run", no_training)
    assert cli.main(argv) == 0
    assert "4 skipped" in capsys.readouterr().out


def test_a_copy_waits_for_its_run_and_fails_with_it(tmp_path, npz, monkeypatch):
    monkeypatch.setattr(experiment, "run", fake_run({"icarl-s0"}))
    res, reports = reproduce("first,second", tmp_path, npz_overrides(npz), groups=TWO_GROUPS, progress=False,
                             report=False)
    status = {r.spec.label: (r.status, r.error) for r in res}
    assert status["first/icarl-s0"][0] == "failed"
    assert status["second/icarl-s0"] == ("failed", "not copied: first/icarl-s0 failed")
    assert status["first/finetune-s0"][0] == status["second/icarl-lr-s0"][0] == "done"
    assert not (tmp_path / "second" / "icarl-s0").exists()


def test_a_group_alone_trains_its_own_copy_and_a_complete_folder_is_not_copied_over(tmp_path, npz, monkeypatch):
    from cilab.studyplan import plan_study

    monkeypatch.setattr(experiment, "run", fake_run(set()))
    ov = npz_overrides(npz)
    assert [s.action for s in plan_study(["second"], tmp_path, ov, groups=TWO_GROUPS)] == ["new", "new"]
    reproduce("second", tmp_path, ov, groups=TWO_GROUPS, progress=False, report=False)
    # the second group's icarl-s0 is complete already: skipped, not replaced by the first group's,
    # and the first group's copies it instead of training it again
    specs = plan_study(["first", "second"], tmp_path, ov, groups=TWO_GROUPS)
    assert [(s.label, s.action, s.source.label if s.source else None) for s in specs] == [
        ("first/icarl-s0", "copy", "second/icarl-s0"), ("first/finetune-s0", "new", None),
        ("second/icarl-s0", "skip", None), ("second/icarl-lr-s0", "skip", None)]


def test_a_run_that_differs_in_its_classifiers_alone_is_evaluated_not_trained(tmp_path, npz, monkeypatch, capsys):
    """iCaRL's hybrid1 (the FC head alone) trains as iCaRL does: one training, and the hybrid's
    folder holds iCaRL's fc numbers, evaluated from iCaRL's checkpoints; a kNN variant too, across groups."""
    groups = {"variants": {"runs": [{"preset": "icarl", "seeds": [0]},
                                    {"preset": "icarl", "tag": "hybrid1", "seeds": [0],
                                     "overrides": ["eval.classifiers=[fc]"]}]},
              "classifiers": {"runs": [{"preset": "icarl", "tag": "knn", "seeds": [0],
                                        "overrides": ["eval.classifiers=[nme,knn]"]}]}}
    trained = []
    real_run = experiment.run
    monkeypatch.setattr(experiment, "run", lambda cfg, folder, **kw: trained.append(folder.name)
                        or real_run(cfg, folder, **kw))
    res, _ = reproduce("all", tmp_path, npz_overrides(npz, tasks=2), groups=groups, progress=False, report=False)
    assert trained == ["icarl-s0"]
    assert [(r.spec.label, r.status) for r in res] == [
        ("variants/icarl-s0", "done"), ("variants/icarl-hybrid1-s0", "evaluated"), ("classifiers/icarl-knn-s0", "evaluated")]
    icarl, hybrid, knn = (results.read_metrics(r.spec.folder) for r in res)
    assert hybrid["classifiers"] == ["fc"] and hybrid["fc"] == icarl["fc"]
    assert knn["classifiers"] == ["nme", "knn"] and knn["nme"] == icarl["nme"]
    assert hybrid["evaluated_from"] == str(tmp_path / "variants" / "icarl-s0")
    assert hybrid["overrides"] == ["eval.classifiers=[fc]", *npz_overrides(npz, tasks=2), "seed=0"]
    out = capsys.readouterr().out
    assert "group variants: 2 runs" in out and "1 evaluated from the checkpoints of a run that trains alike" in out

    # an evaluation cut short (a half-written folder) is evaluated again, not trained on
    hybrid_folder = tmp_path / "variants" / "icarl-hybrid1-s0"
    (hybrid_folder / results.METRICS).unlink()
    results.checkpoint_path(hybrid_folder, 1).unlink()
    trained.clear()
    res, _ = reproduce("all", tmp_path, npz_overrides(npz, tasks=2), groups=groups, progress=False, report=False)
    assert trained == [] and [r.status for r in res] == ["skipped", "evaluated", "skipped"]
    again = results.read_metrics(hybrid_folder)
    assert again["fc"] == hybrid["fc"] and again["status"] == "complete" and again["completed_tasks"] == 2

    # the trainer fails: both runs evaluated from it are reported failed, naming it
    monkeypatch.setattr(experiment, "run", fake_run({"icarl-s0"}))
    res, _ = reproduce("all", tmp_path / "again", npz_overrides(npz, tasks=2), groups=groups, progress=False,
                       report=False)
    assert [(r.spec.label, r.status, r.error) for r in res][1:] == [
        ("variants/icarl-hybrid1-s0", "failed", "not evaluated: variants/icarl-s0 failed"),
        ("classifiers/icarl-knn-s0", "failed", "not evaluated: variants/icarl-s0 failed")]


def test_a_copy_or_evaluation_never_replaces_a_complete_run_written_after_the_plan(tmp_path, npz, monkeypatch):
    """The plan found their folders new; hours later, another command has completed runs there:
    they are reported failed, naming why, and those runs stay as they are."""
    from cilab.reproduce import run_all
    from cilab.studyplan import plan_study

    groups = {"a": {"runs": [{"preset": "icarl", "seeds": [0]},
                             {"preset": "icarl", "tag": "hybrid1", "seeds": [0], "overrides": ["eval.classifiers=[fc]"]}]},
              "b": {"runs": [{"preset": "icarl", "seeds": [0]}]}}
    ov = npz_overrides(npz)
    specs = plan_study(["a", "b"], tmp_path, ov, groups=groups)
    assert [s.action for s in specs] == ["new", "evaluate", "copy"]
    theirs = fake_run(set())
    for s in specs[1:]:  # another command, meanwhile
        theirs(s.cfg, s.folder, meta={"by": "another command"})
        results.atomic_write_bytes(results.checkpoint_path(s.folder, 4), b"its last task")
    before = {s.label: (s.folder / results.METRICS).read_bytes() for s in specs[1:]}
    monkeypatch.setattr(experiment, "run", fake_run(set()))
    res = run_all(specs, progress=False, log=lambda _: None)
    assert [r.status for r in res] == ["done", "failed", "failed"]
    for r in res[1:]:
        assert "holds a run the plan did not see (a complete run); pass --overwrite to replace it" in r.error
    assert before == {s.label: (s.folder / results.METRICS).read_bytes() for s in specs[1:]}

    # the same with runs of another config cut short there: not the half-done runs the plan would remake
    specs = plan_study(["a", "b"], tmp_path / "again", ov, groups=groups)
    for s in specs[1:]:
        theirs(build_config("icarl", ov + ["train.lr=1.0"]), s.folder)
        m = results.read_metrics(s.folder)
        results.atomic_write_json(s.folder / results.METRICS, {**m, "status": "interrupted"})
        results.atomic_write_bytes(results.checkpoint_path(s.folder, 1), b"its second task")
    before = {s.label: sorted(p.name for p in s.folder.rglob("*")) for s in specs[1:]}
    res = run_all(specs, progress=False, log=lambda _: None)
    assert [r.status for r in res] == ["done", "failed", "failed"]
    for r in res[1:]:
        assert "holds a run the plan did not see (another run: its config differs (train.lr: 1.0 saved, 2.0 now" \
            in r.error
    assert before == {s.label: sorted(p.name for p in s.folder.rglob("*")) for s in specs[1:]}


def test_a_tsne_is_computed_once_for_one_network_across_the_reports_of_a_study(tmp_path, npz, monkeypatch):
    """Plain iCaRL in two groups (a copy) and its hybrid (evaluated from its checkpoints) are one network:
    its t-SNE (tens of seconds a panel on CIFAR-100) is fitted once for the three report rows that show it.
    The reports' figures also load the dataset once, not once a group."""
    import inspect

    from sklearn.manifold import TSNE

    import cilab.data

    loads, real_load = [], cilab.data.load_dataset

    def counting_load(cfg):
        if any(f.filename.endswith("checkpoint_figures.py") for f in inspect.stack()):
            loads.append(cfg.name)  # a load for the reports' figures
        return real_load(cfg)

    monkeypatch.setattr(cilab.data, "load_dataset", counting_load)
    groups = {"a": {"runs": [{"preset": "icarl", "seeds": [0]},
                             {"preset": "icarl", "tag": "hybrid1", "seeds": [0], "overrides": ["eval.classifiers=[fc]"]}]},
              "b": {"runs": [{"preset": "icarl", "seeds": [0]}]}}
    fitted, real = [], TSNE.fit_transform
    monkeypatch.setattr(TSNE, "fit_transform", lambda self, x, *a, **k: fitted.append(len(x)) or real(self, x, *a, **k))
    reproduce("all", tmp_path, npz_overrides(npz, tasks=2), groups=groups, progress=False, log=lambda _: None)
    assert len(fitted) == 2  # after task 1 and task 2, not 2 x 3
    assert loads == ["npz"]  # one dataset for both groups' figures
    for g in ("a", "b"):
        assert (tmp_path / g / "report" / "tsne.png").exists()
    # a network trained otherwise gets its own
    fitted.clear()
    groups["b"]["runs"][0]["overrides"] = ["train.lr=1.0"]
    reproduce("all", tmp_path / "other", npz_overrides(npz, tasks=2), groups=groups, progress=False, log=lambda _: None)
    assert len(fitted) == 4


def test_the_command_line_embeds_the_reports_tsne_with_a_process_a_core_and_python_with_one(tmp_path, monkeypatch):
    """Spawned processes re-import a script's main module: only the commands ask for them by default."""
    import inspect

    from cilab import report as report_mod, reproduce as rp

    assert inspect.signature(rp.reproduce).parameters["tsne_workers"].default == 1
    assert inspect.signature(report_mod.make_report).parameters["tsne_workers"].default == 1
    seen = []
    monkeypatch.setattr(rp, "cpu_count", lambda: 7)
    monkeypatch.setattr(report_mod, "cpu_count", lambda: 7)
    monkeypatch.setattr(rp, "reproduce", lambda *a, **kw: seen.append(kw["tsne_workers"]) or ([], None))
    cli.main(["reproduce", "baselines", "--out", str(tmp_path / "r"), "--no-report"])

    class Stop(Exception):
        pass

    def make_report(*a, **kw):
        seen.append(kw["tsne_workers"])
        raise Stop

    monkeypatch.setattr(report_mod, "make_report", make_report)
    with pytest.raises(Stop):
        cli.main(["report", str(tmp_path), "--out", str(tmp_path / "rep")])
    assert seen == [7, 7]


def test_runs_at_once_start_the_longest_first():
    from cilab.studyplan import longest_first, plan_study

    groups = {"g": {"runs": [{"preset": "finetune", "seeds": [0]}, {"preset": "icarl", "seeds": [0]},
                             {"preset": "joint", "seeds": [0]}, {"preset": "lwf", "seeds": [0]}]}}
    specs = plan_study(["g"], "/nonexistent", [], groups=groups, check_data=False)
    # CIFAR-100 images (README, "The projected study"): joint 19.25M, iCaRL 4.75M, LwF 3.5M, fine-tuning 3.15M
    assert [s.name for s in longest_first(specs)] == ["joint-s0", "icarl-s0", "lwf-s0", "finetune-s0"]


def test_run_all_hands_runs_at_once_to_the_executor_longest_first_and_one_at_a_time_in_plan_order():
    from cilab.reproduce import run_all
    from cilab.studyplan import plan_study
    from cilab.runspec import RunResult

    class Recording:  # an executor that runs nothing and remembers the order it was given
        def __init__(self, in_process):
            self.in_process, self.active, self.order = in_process, "running", []

        def __call__(self, specs, work):
            for spec in specs:
                self.order.append(spec.name)
                yield "start", spec
                yield "end", RunResult(spec, "done")

    groups = {"g": {"runs": [{"preset": "finetune", "seeds": [0]}, {"preset": "joint", "seeds": [0]},
                             {"preset": "icarl", "seeds": [0]}]}}
    specs = plan_study(["g"], "/nonexistent", [], groups=groups, check_data=False)
    for in_process, expected in ((False, ["joint-s0", "icarl-s0", "finetune-s0"]),
                                 (True, ["finetune-s0", "joint-s0", "icarl-s0"])):
        executor = Recording(in_process)
        res = run_all(specs, executor=executor, progress=False, log=lambda _: None)
        assert executor.order == expected, in_process
        assert [r.spec.name for r in res] == ["finetune-s0", "joint-s0", "icarl-s0"]  # results in plan order


def test_evaluations_are_handed_to_the_executor_once_their_trainer_is_over(tmp_path):
    """An evaluation runs where runs run (a worker with its GPU, a Ray task), not in the command's own
    process, and only after the run whose checkpoints it reads; a copy (file work) stays here."""
    from cilab.reproduce import run_all
    from cilab.studyplan import plan_study
    from cilab.runspec import RunResult

    class Recording:  # runs nothing; remembers what it was handed and when
        in_process, active = False, "running"

        def __init__(self):
            self.events = []

        def __call__(self, specs, work):
            for spec in specs:  # run_all appends to specs while this runs
                self.events.append(("start", spec.label))
                yield "start", spec
                self.events.append(("end", spec.label))
                yield "end", RunResult(spec, "evaluated" if spec.action == "evaluate" else "done")

    groups = {"a": {"runs": [{"preset": "icarl", "seeds": [0]}, {"preset": "finetune", "seeds": [0]},
                             {"preset": "icarl", "tag": "hybrid1", "seeds": [0],
                              "overrides": ["eval.classifiers=[fc]"]}]},
              "b": {"runs": [{"preset": "icarl", "seeds": [0]}]}}
    specs = plan_study(["a", "b"], tmp_path, [], groups=groups, check_data=False)
    assert [s.action for s in specs] == ["new", "new", "evaluate", "copy"]
    executor = Recording()
    res = run_all(specs, executor=executor, progress=False, log=lambda _: None)
    assert executor.events == [("start", "a/icarl-s0"), ("end", "a/icarl-s0"), ("start", "a/finetune-s0"),
                               ("end", "a/finetune-s0"), ("start", "a/icarl-hybrid1-s0"),
                               ("end", "a/icarl-hybrid1-s0")]
    assert [r.status for r in res][:3] == ["done", "done", "evaluated"]
    assert res[3].error.startswith("could not copy")  # tried here: the fake trainer wrote nothing to copy


def test_group_names_all_several_and_unknown():
    from cilab.studyplan import group_names

    assert group_names("all", TWO_GROUPS) == ["first", "second"]
    assert group_names("second, first,second", TWO_GROUPS) == ["second", "first"]
    with pytest.raises(ConfigError, match="unknown group 'third'; groups: first, second, or all"):
        group_names("first,third", TWO_GROUPS)


def test_copy_run_replaces_the_run_in_its_target_and_keeps_the_users_files(tmp_path):
    """The copy of a run into a folder that held another run (reproduce --overwrite): afterwards the
    target holds exactly the source's run, none of the old run's checkpoints, the user's file, no lock."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    for folder, tasks, tag in ((src, 1, b"new"), (dst, 2, b"old")):
        folder.mkdir()
        runfolder.write_marker(folder)
        results.atomic_write_json(folder / results.METRICS, {"status": "complete", "tag": tag.decode()})
        for t in range(tasks):
            results.atomic_write_bytes(results.checkpoint_path(folder, t), tag + bytes([t]))
    (dst / "notes.txt").write_text("mine")
    runfolder.copy_run(src, dst)
    files = lambda f: {str(p.relative_to(f)): p.read_bytes() for p in f.rglob("*") if p.is_file()}  # noqa: E731
    assert files(dst) == {**files(src), "notes.txt": b"mine"}
    assert not (dst / "checkpoints" / "task_02.pt").exists() and not (dst / runlock.LOCK).exists()
