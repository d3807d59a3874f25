"""A run evaluated from another run's checkpoints (cilab.reevaluate) against the same run trained.

Runs whose configs differ only in their classifiers train the same network: the
evaluated run must hold exactly what training it would have written.
"""

import numpy as np
import pytest
import torch
import yaml

from cilab import cli, experiment, results, runfolder
from cilab.classifiers import CLASSIFIERS, FitData, build_classifier
from cilab.config import ConfigError, build_config
from cilab.reevaluate import evaluate_run, trains_like

from helpers import npz_overrides, tiny_npz


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: trained with nme and fc; B: the same training with fc and kNN (k=3)."""
    root = tmp_path_factory.mktemp("reevaluate")
    npz = tiny_npz(root / "tiny.npz", test_per_class=8)
    base = npz_overrides(npz, tasks=5) + ["train.epochs=2"]
    a = build_config("icarl", base)
    b = build_config("icarl", base + ["eval.classifiers=[fc,knn]", "eval.knn.k=3"])
    experiment.run(a, root / "a", progress=False)
    experiment.run(b, root / "b", progress=False, meta={"preset": "icarl", "overrides": ["eval.classifiers=[fc,knn]"]})
    return root, a, b


def test_evaluated_from_checkpoints_equals_the_run_trained(runs):
    root, a, b = runs
    got = evaluate_run(b, root / "a", root / "c", meta={"preset": "icarl", "overrides": ["eval.classifiers=[fc,knn]"]})
    trained = results.read_metrics(root / "b")
    assert got == results.read_metrics(root / "c")
    assert got["classifiers"] == ["fc", "knn"] and "nme" not in got
    assert got["knn"]["accuracy"] != got["fc"]["accuracy"]  # two classifiers that disagree: a mix-up would show
    for c in ("fc", "knn"):
        assert got[c] == trained[c], c  # every task's accuracies, the accuracy matrix, the summaries
    assert got["overrides"] == trained["overrides"] and got["evaluated_from"] == str(root / "a")
    assert got["memory_total"] == trained["memory_total"] and got["status"] == "complete"
    with np.load(root / "c" / results.CONFUSION) as c, np.load(root / "b" / results.CONFUSION) as t:
        assert sorted(c.files) == sorted(t.files)
        for k in t.files:
            assert np.array_equal(c[k], t[k]), k
    # each checkpoint: the training state of A, the metrics B had after that task
    for t in range(5):
        mine, theirs, direct = (torch.load(results.checkpoint_path(root / f, t), weights_only=False, map_location="cpu")
                                for f in "cab")
        for k, v in theirs["model"].items():
            assert torch.equal(mine["model"][k], v) and torch.equal(direct["model"][k], v), (t, k)
        assert all(mine["metrics"][c] == direct["metrics"][c] for c in ("fc", "knn"))
        assert mine["metrics"]["completed_tasks"] == t + 1
    # a folder of b's config, as `cilab run --resume` and `cilab reproduce` see it
    assert runfolder.config_conflict(root / "c", b) is None
    assert yaml.safe_load((root / "c" / results.CONFIG).read_text())["eval"]["classifiers"] == ["fc", "knn"]


# Methods whose trained network is more than a backbone and a linear head: DER's grown
# extractors, BiC's bias layer, LUCIR's and PODNet's cosine heads, WA's aligned weights.
@pytest.mark.parametrize("method, extra", [
    ("der", []), ("bic", ["method_args.val_fraction=0.2"]), ("lucir", ["method_args.K=20"]),
    ("podnet", ["method_args.finetune_epochs=1"]), ("wa", []),
])
def test_evaluated_from_checkpoints_equals_the_run_trained_for_grown_and_corrected_networks(
        runs, tmp_path, method, extra):
    root, _, _ = runs
    base = npz_overrides(root / "tiny.npz", tasks=2) + extra
    a = build_config(method, base + ["eval.classifiers=[nme]"])
    b = build_config(method, base + ["eval.classifiers=[fc,knn]", "eval.knn.k=3"])
    experiment.run(a, tmp_path / "a", progress=False)
    trained = experiment.run(b, tmp_path / "b", progress=False)
    got = evaluate_run(b, tmp_path / "a", tmp_path / "c")
    for c in ("fc", "knn"):
        assert got[c] == trained[c], c
    with np.load(tmp_path / "c" / results.CONFUSION) as c, np.load(tmp_path / "b" / results.CONFUSION) as t:
        for k in t.files:
            assert np.array_equal(c[k], t[k]), k


def test_cilab_evaluate_on_the_command_line(runs, capsys):
    root, a, b = runs
    assert cli.main(["evaluate", str(root / "a"), "--out", str(root / "d"), "eval.classifiers=[fc,knn]",
                     "eval.knn.k=3"]) == 0
    got, trained = results.read_metrics(root / "d"), results.read_metrics(root / "b")
    assert got["fc"] == trained["fc"] and got["knn"] == trained["knn"]
    out = capsys.readouterr().out
    # the per-task table `cilab run` prints, so the two read side by side: the trained run's numbers
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith("d ")}
    for c in ("fc", "knn"):
        m = trained[c]
        assert rows[c] == [f"{a:.1f}" for a in m["accuracy"]] + [f"{m['average_incremental_accuracy']:.1f}",
                                                                 f"{m['final_accuracy']:.1f}"]
    # a key that changes training (or tracking, which an evaluation does not start): one line, nothing written
    for bad in ("train.lr=0.5", "log.tensorboard=true"):
        assert cli.main(["evaluate", str(root / "a"), "--out", str(root / "e"), bad]) == 2
        err = capsys.readouterr().err
        assert err == f"cilab: error: cilab evaluate takes eval.* overrides only (the rest is the run's), got {bad}\n"
    assert not (root / "e").exists()
    assert cli.main(["evaluate", str(root), "--out", str(root / "e")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_only_a_config_that_trains_alike_is_evaluated_and_nothing_is_written_otherwise(runs, tmp_path):
    root, a, b = runs
    assert trains_like(b, a) and trains_like(a, b)
    assert not trains_like(build_config("icarl", ["eval.batch_size=8"]), build_config("icarl"))  # herding reads it
    other = build_config("icarl", [o for o in npz_overrides(root / "tiny.npz", tasks=5)] + ["train.epochs=3"])
    with pytest.raises(ConfigError, match=r"its training differs \(train.epochs: 2 saved, 3 now\); only eval.classifiers"):
        evaluate_run(other, root / "a", tmp_path / "x")
    # another method: its own settings differ too, named, not a KeyError
    with pytest.raises(ConfigError, match=r"its training differs \(method: 'icarl' saved, 'wa' now; "
                                          r"method_args.T: '\(not set\)' saved, 2.0 now"):
        evaluate_run(build_config("wa", npz_overrides(root / "tiny.npz", tasks=5) + ["train.epochs=2"]),
                     root / "a", tmp_path / "x")
    (tmp_path / "half").mkdir()
    with pytest.raises(results.RunFolderError, match="it is empty; give a complete run's folder"):
        evaluate_run(b, tmp_path / "half", tmp_path / "y")
    with pytest.raises(results.RunFolderError, match="it does not exist"):
        evaluate_run(b, tmp_path / "nowhere", tmp_path / "y")
    with pytest.raises(results.RunFolderError, match="into itself"):
        evaluate_run(b, root / "a", root / "a")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt(), "interrupted"), (RuntimeError("boom"), "failed: boom")])
def test_an_evaluation_cut_short_says_so_and_keeps_its_evaluated_tasks(runs, tmp_path, monkeypatch, stop, status):
    """As a run does: metrics.json, from the last task saved, says why it stopped (not "running"),
    and the tasks evaluated so far stay."""
    from cilab.experiment import Protocol

    root, a, b = runs
    real, calls = Protocol.evaluate, []

    def evaluate(self, t, n_seen):
        calls.append(t)
        if t == 3:
            raise stop
        return real(self, t, n_seen)

    monkeypatch.setattr(Protocol, "evaluate", evaluate)
    with pytest.raises(type(stop)):
        evaluate_run(b, root / "a", tmp_path / "cut")
    m = results.read_metrics(tmp_path / "cut")
    assert calls == [0, 1, 2, 3] and m["status"] == status and m["completed_tasks"] == 3
    assert m["fc"]["accuracy"] == results.read_metrics(root / "b")["fc"]["accuracy"][:3]
    assert results.last_checkpoint(tmp_path / "cut")[0] == 2
    monkeypatch.setattr(Protocol, "evaluate", real)
    with pytest.raises(results.RunFolderError) as e:  # evaluated again only when asked; there is no --resume
        evaluate_run(b, root / "a", tmp_path / "cut")
    assert f"(a run that stopped ({status}), 3 of 5 tasks done); pass --overwrite to start again" in str(e.value)
    assert evaluate_run(b, root / "a", tmp_path / "cut", overwrite=True)["fc"] == results.read_metrics(root / "b")["fc"]


def test_the_classifiers_draw_nothing_from_torchs_random_streams():
    """Training goes on from torch's random streams after each evaluation: a classifier that drew
    from them would make a run that only adds it train differently from one without it."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 4)
    data = FitData(torch.randn(24, 6, generator=g), torch.arange(24) % 4, head, 4, seed=3,
                   flipped_features=torch.randn(24, 6, generator=g))
    cfg = build_config("icarl").eval
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for name in CLASSIFIERS:
        clf = build_classifier(name, cfg)
        clf.fit(data)
        clf.predict(torch.randn(5, 6, generator=g))
        assert torch.equal(torch.get_rng_state(), before), name
    assert len(list(CLASSIFIERS)) >= 5
