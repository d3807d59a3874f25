"""cilab report: aggregation over seeds checked against numpy, figures checked as PNG files.

Two real iCaRL runs (seeds 0 and 1, 2 tasks) on a tiny subset of the bundled
digits give the numbers and the checkpoints the t-SNE and exemplar figures are
rebuilt from; written metrics.json files add a single-seed run, a failed and an
incomplete one, and exact numbers for the grouping test.
"""

import csv

import matplotlib.image as mpimg
import numpy as np
import pytest

from cilab import cli, results
from cilab.config import build_config
from cilab.experiment import run
from cilab.plots import CONFUSION_FIGSIZE, DPI, FIGSIZE, TSNE_EXTRA_IN, TSNE_PANEL_IN, exemplar_grid_size
from cilab.aggregate import find_run_folders, group_runs, load_run
from cilab.report import make_report
from helpers import fake_metrics, npz_overrides, tiny_npz, write_run


def png_size(path):
    img = mpimg.imread(path)  # raises on anything but a valid PNG
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return img.shape[1], img.shape[0]  # width, height


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Two real iCaRL runs (seeds 0, 1: 2 tasks of 5 digits) beside a finetune, a failed and an incomplete run."""
    root = tmp_path_factory.mktemp("runs")
    npz = tiny_npz(root / "tiny.npz")
    ov = npz_overrides(npz, tasks=2)
    folders = []
    for seed in (0, 1):
        cfg = build_config("icarl", ov + [f"seed={seed}"])
        folder = root / "group" / f"icarl-s{seed}"
        run(cfg, folder, progress=False, meta={"preset": "icarl", "overrides": ov + [f"seed={seed}"]})
        folders.append(folder)
    extra = root / "extra"
    write_run(extra / "finetune-s0", fake_metrics("finetune", 0, ov, {"fc": [90.0, 45.0, 30.0, 22.0, 18.0]}))
    write_run(extra / "lwf-s0", fake_metrics("lwf", 0, ov, {"fc": [90.0, 60.0, 50.0, 40.0, 30.0]},
                                             status="failed: RuntimeError: boom"))
    write_run(extra / "lwf-s1", fake_metrics("lwf", 1, ov, {"fc": [91.0, 61.0, 51.0, 41.0, 31.0]}, status="running"))
    return root, folders


@pytest.fixture(scope="module")
def report(real_runs):
    """One report over all of them (every figure drawn once)."""
    root, _ = real_runs
    out = root / "report"
    rep = make_report([root / "group", root / "extra"], out, tsne_at=(1, 5, 10), exemplars_per_class=6)
    return rep, out


def read_summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_summary_of_real_runs_matches_numpy_and_failed_runs_are_excluded(real_runs, report):
    _, folders = real_runs
    rep, out = report
    rows = read_summary(out / "summary.csv")
    ms = [results.read_metrics(f) for f in folders]
    icarl = {r["classifier"]: r for r in rows if r["preset"] == "icarl"}
    assert set(icarl) == {"nme", "fc"}
    for c, r in icarl.items():
        aia = np.array([np.mean(m[c]["accuracy"]) for m in ms])  # from the raw per-task accuracies
        fin = np.array([m[c]["accuracy"][-1] for m in ms])
        fgt = np.array([m[c]["forgetting"] for m in ms])
        assert int(r["n_seeds"]) == 2 and r["seeds"] == "0 1"
        assert float(r["avg_inc_acc_mean"]) == pytest.approx(aia.mean(), abs=1e-5)
        assert float(r["avg_inc_acc_std"]) == pytest.approx(aia.std(ddof=1), abs=1e-5)
        assert float(r["final_acc_mean"]) == pytest.approx(fin.mean(), abs=1e-5)
        assert float(r["final_acc_std"]) == pytest.approx(fin.std(ddof=1), abs=1e-5)
        assert float(r["forgetting_mean"]) == pytest.approx(fgt.mean(), abs=1e-5)
    ft = [r for r in rows if r["preset"] == "finetune"]
    assert len(ft) == 1 and ft[0]["n_seeds"] == "1" and ft[0]["avg_inc_acc_std"] == ""  # undefined for one seed
    assert float(ft[0]["avg_inc_acc_mean"]) == pytest.approx(41.0)
    assert not [r for r in rows if r["preset"] == "lwf"]  # failed + incomplete: not aggregated

    md = (out / "report.md").read_text()
    assert "failed: RuntimeError: boom" in md and "incomplete: interrupted (process gone), 3/5 tasks done" in md
    assert {r.name for r in rep.excluded} == {"lwf-s0", "lwf-s1"}
    # the accuracy curve table: mean over the seeds after each task
    with open(out / "curves.csv") as f:
        curve = [r for r in csv.DictReader(f) if r["variant"] == "icarl" and r["classifier"] == "nme"]
    assert [int(r["classes_seen"]) for r in curve] == [5, 10]
    np.testing.assert_allclose([float(r["accuracy_mean"]) for r in curve],
                               np.mean([m["nme"]["accuracy"] for m in ms], axis=0), atol=1e-5)


def test_figures_are_pngs_of_the_expected_size(report):
    rep, out = report
    # (one batch a task: the fc head may answer one class, which the other notes say)
    assert [n for n in rep.notes if "gave every test image one class" not in n] == [
        "t-SNE of finetune-s0: skipped, the run keeps no exemplars (memory.size=0)"]
    w, h = int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)
    assert png_size(out / "accuracy.png") == (w, h)
    assert png_size(out / "current_task_accuracy.png") == (w, h)
    cw, ch = int(CONFUSION_FIGSIZE[0] * DPI), int(CONFUSION_FIGSIZE[1] * DPI)
    for c in ("nme", "fc"):  # default: the first run, one matrix per classifier
        assert png_size(out / f"confusion_icarl-s0_{c}.png") == (cw, ch)
    # one row (icarl's first run; finetune has no memory), panels after tasks 1 and 2 (5 and 10 clamped)
    pw, ph = TSNE_PANEL_IN
    assert png_size(out / "tsne.png") == (int(2 * pw * DPI), int((ph + TSNE_EXTRA_IN) * DPI))
    # 10 classes after the last task, 2 exemplars each (K=20): 10 rows, 2 columns (no empty ones)
    gw, gh = exemplar_grid_size(10, 2)
    assert png_size(out / "exemplars_icarl-s0_task02.png") == (int(gw * DPI), int(gh * DPI))
    md = (out / "report.md").read_text()
    assert "keeps no exemplars" in md
    for p in rep.figures:
        assert f"]({p.name})" in md


def test_tsne_reads_the_checkpoints(real_runs):
    from cilab.checkpoint_figures import RunState, tsne_rows

    _, folders = real_runs
    st = RunState(load_run(folders[0]), "cpu", {})
    panels = tsne_rows([st], 5, (1, 5, 10), 0, lambda m: None)[0]["panels"]
    assert len(panels) == 2
    for panel, task, per_class in zip(panels, (1, 2), (4, 2)):  # m = K / classes seen = 20/5, 20/10
        ckpt = results.load_checkpoint(folders[0] / "checkpoints" / f"task_{task:02d}.pt")
        assert all(len(ckpt["memory"]["per_class"][c]) == per_class for c in range(5))
        # the 5 classes of the first task: all their 12 training images each, plus their exemplars
        assert panel["xy"].shape == (5 * 12 + 5 * per_class, 2)
        assert panel["exemplar"].sum() == 5 * per_class
        assert sorted(np.unique(panel["labels"])) == [0, 1, 2, 3, 4]
        assert np.isfinite(panel["xy"]).all() and panel["xy"].std() > 0


@pytest.mark.parametrize("written_before", ["no eval.fc_scope", "deepinversion.batch_size 0"])
def test_a_run_an_older_cilab_wrote_is_reported_from_its_metrics_with_its_checkpoints_figures(real_runs, tmp_path,
                                                                                             written_before):
    """No setting of this cilab reproduces its numbers (an older cilab's config.yaml): they are reported
    as it computed them. The t-SNE and the exemplar grid read only the network, the exemplars and the
    data, which its checkpoints and config still give: they are drawn, the same as for the folder it
    was copied from."""
    import shutil

    import yaml

    from cilab.checkpoint_figures import RunState, tsne_rows

    _, folders = real_runs
    old = tmp_path / "old" / "icarl-s0"
    shutil.copytree(folders[0], old)
    data = yaml.safe_load((old / results.CONFIG).read_text())
    if written_before == "no eval.fc_scope":
        del data["eval"]["fc_scope"]
    else:
        data["memory"]["deepinversion"]["batch_size"] = 0
    (old / results.CONFIG).write_text(yaml.safe_dump(data))
    rep = make_report([old], tmp_path / "report", exemplars_per_class=2)
    m = results.read_metrics(folders[0])
    row = next(r for r in read_summary(tmp_path / "report" / "summary.csv") if r["classifier"] == "nme")
    assert float(row["final_acc_mean"]) == pytest.approx(m["nme"]["accuracy"][-1], abs=1e-5)
    assert not [n for n in rep.notes if "not drawn" in n], rep.notes
    assert (tmp_path / "report" / "tsne.png").exists() and (tmp_path / "report" / "exemplars_icarl-s0_task02.png").exists()
    rows = [tsne_rows([RunState(load_run(f), "cpu", {})], 5, (1, 2), 0, lambda m: None)[0] for f in (folders[0], old)]
    for a, b in zip(*(r["panels"] for r in rows)):
        np.testing.assert_array_equal(a["xy"], b["xy"])
        np.testing.assert_array_equal(a["exemplar"], b["exemplar"])
    # what no setting reproduces is still refused: resuming, copying, evaluating it again
    from cilab import runfolder
    from cilab.config import OlderRunError

    with pytest.raises(OlderRunError, match="an older cilab wrote it"):
        runfolder.read_config(old)


def test_tsne_embeddings_are_the_same_in_a_pool_of_processes_and_with_any_thread_count(monkeypatch):
    """scikit-learn's Barnes-Hut t-SNE can depend on its thread count (1,000 points of 64 features
    differ between 1 and 2 threads on the project's 2-core machine, not on the 16-core GPU machine):
    each embedding uses one thread, so the figure is the same on every machine, and embeddings made
    in a pool (large reports) equal those made here."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from cilab import embedding

    rng = np.random.default_rng(0)
    inputs = [(rng.normal(size=(n, 64)).astype(np.float32), 30.0, 0) for n in (1000, 200, 250)]
    with threadpool_limits(1):
        one_thread = TSNE(n_components=2, perplexity=30.0, init="pca", learning_rate="auto",
                          random_state=0).fit_transform(inputs[0][0])
    with threadpool_limits(2):
        here = embedding.embed_all(inputs, workers=1)
    assert np.array_equal(here[0], one_thread)  # two threads allowed, one used
    monkeypatch.setattr(embedding, "POOL_MIN_POINTS", 0)
    pooled = embedding.embed_all(inputs, workers=2)
    assert [len(x) for x in pooled] == [1000, 200, 250]  # in order
    for a, b in zip(here, pooled):
        assert np.array_equal(a, b)


def test_grouping_ignores_seed_and_override_spelling(tmp_path):
    accs = {0: [80.0, 60.0, 50.0], 1: [82.0, 58.0, 47.0], 2: [79.0, 61.0, 44.0]}
    # the same variant, overrides written in another order and spelling
    spellings = [["train.lr=0.1", "train.epochs=2"], ["train.epochs=2", "train.lr=0.10"], ["train.lr=1e-1", "train.epochs=2"]]
    for seed, ov in zip(accs, spellings):
        write_run(tmp_path / f"icarl-s{seed}", fake_metrics("icarl", seed, ov, {"nme": accs[seed], "fc": accs[seed][::-1]}))
    write_run(tmp_path / "icarl-lr-s0", fake_metrics("icarl", 0, ["train.lr=0.5", "train.epochs=2"], {"nme": [1.0, 2.0, 3.0]}))
    runs = [load_run(p) for p in find_run_folders([tmp_path])]
    variants = group_runs(runs)
    # labels: the common train.epochs=2 dropped
    assert sorted((v.label, len(v.runs)) for v in variants) == [("icarl train.lr=0.1", 3), ("icarl train.lr=0.5", 1)]

    out = tmp_path / "report"
    out.mkdir()
    (out / "tsne.png").write_bytes(b"stale")  # a previous report's figure must not survive
    (out / "notes.txt").write_text("mine")
    assert cli.main(["report", str(tmp_path), "--out", str(out), "--no-tsne"]) == 0
    assert not (out / "tsne.png").exists() and (out / "notes.txt").exists()
    rows = {(r["variant"], r["classifier"]): r for r in read_summary(out / "summary.csv")}
    a = np.array(list(accs.values()))
    r = rows[("icarl train.lr=0.1", "nme")]
    assert float(r["avg_inc_acc_mean"]) == pytest.approx(a.mean(axis=1).mean())
    assert float(r["avg_inc_acc_std"]) == pytest.approx(a.mean(axis=1).std(ddof=1))
    assert float(r["final_acc_mean"]) == pytest.approx(a[:, -1].mean())
    assert float(r["final_acc_std"]) == pytest.approx(a[:, -1].std(ddof=1))
    r = rows[("icarl train.lr=0.1", "fc")]
    assert float(r["final_acc_mean"]) == pytest.approx(a[:, 0].mean())  # fc got the reversed lists
    md = (out / "report.md").read_text()
    assert f"{a.mean(axis=1).mean():.2f} ± {a.mean(axis=1).std(ddof=1):.2f}" in md
    assert "train.epochs=2" in md  # common overrides shown once


def test_grouping_reads_overrides_as_the_config_does(tmp_path):
    """The config reads `eval.classifiers=knn` as [knn] and `train.epochs=2.0` as 2: spelt either way,
    a run is the same variant, not a row of its own."""
    spellings = [["eval.classifiers=knn", "train.epochs=2"], ["eval.classifiers=[knn]", "train.epochs=2.0"]]
    for seed, ov in enumerate(spellings):
        write_run(tmp_path / f"icarl-s{seed}", fake_metrics("icarl", seed, ov, {"knn": [80.0, 60.0 + seed]}))
    write_run(tmp_path / "icarl-other", fake_metrics("icarl", 0, ["eval.classifiers=[knn, nme]", "train.epochs=2"],
                                                      {"knn": [1.0, 2.0]}))
    # keys the config lacks (a run of a newer cilab, method_args) keep the plain comparison
    write_run(tmp_path / "icarl-new", fake_metrics("icarl", 0, ["newer.key=1", "method_args.T=2"], {"knn": [1.0, 2.0]}))
    write_run(tmp_path / "icarl-new2", fake_metrics("icarl", 1, ["newer.key=1.0", "method_args.T=2.0"], {"knn": [1.0, 2.0]}))
    variants = group_runs([load_run(p) for p in find_run_folders([tmp_path])])
    assert sorted(len(v.runs) for v in variants) == [1, 2, 2]
    assert [v.label for v in variants if len(v.runs) == 2 and "knn" in v.label] == ["icarl eval.classifiers=knn train.epochs=2"]


def test_a_seed_counts_once_in_its_variant(tmp_path, capsys):
    """After `cilab reproduce all`, iCaRL's runs are copied into five groups: a report over the
    whole output must average seeds 0 and 1 once each, not the copies as extra seeds."""
    accs = {0: [80.0, 60.0], 1: [70.0, 50.0]}
    for group in ("baselines", "losses", "collage"):
        for seed, acc in accs.items():
            write_run(tmp_path / group / f"icarl-s{seed}", fake_metrics("icarl", seed, [], {"nme": acc}))
    # a rerun of seed 1 elsewhere that came out differently: still seed 1, counted once (the first found)
    write_run(tmp_path / "rerun" / "icarl-s1", fake_metrics("icarl", 1, [], {"nme": [72.0, 40.0]}))
    out = tmp_path / "report"
    assert cli.main(["report", str(tmp_path), "--out", str(out), "--no-tsne"]) == 0
    row = read_summary(out / "summary.csv")[0]
    assert row["n_seeds"] == "2"
    assert float(row["avg_inc_acc_mean"]) == pytest.approx((70.0 + 60.0) / 2)  # (80+60)/2 and (70+50)/2
    assert float(row["avg_inc_acc_std"]) == pytest.approx(np.std([70.0, 60.0], ddof=1))
    md = (out / "report.md").read_text()
    printed = capsys.readouterr().out
    for repeat, kept in [("collage/icarl-s0", "baselines/icarl-s0"), ("losses/icarl-s1", "baselines/icarl-s1")]:
        note = (f"{tmp_path / repeat} repeats {tmp_path / kept} (variant icarl, seed {repeat[-1]}) "
                "with the same numbers: a seed counts once")
        assert note in md and note in printed
    note = (f"{tmp_path / 'rerun/icarl-s1'} repeats {tmp_path / 'baselines/icarl-s1'} (variant icarl, seed 1) "
            "with other numbers (nme average incremental accuracy 56.00 there, 60.00 in the one counted): "
            "a seed counts once")
    assert note in md and note in printed


def test_report_refuses_a_folder_without_runs_and_writing_into_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    run_dir = write_run(tmp_path / "icarl-s0", fake_metrics("icarl", 0, [], {"nme": [50.0, 40.0]}))
    assert cli.main(["report", str(run_dir), "--out", str(run_dir)]) == 2
    assert f"--out {run_dir} holds a run's files (metrics.json" in capsys.readouterr().err
    stray = tmp_path / "mydir"  # only a config.yaml, no marker: not a run folder, but a run's file
    stray.mkdir()
    (stray / "config.yaml").write_text("seed: 0\n")
    assert cli.main(["report", str(run_dir), "--out", str(stray)]) == 2
    assert capsys.readouterr().err.strip() == (f"cilab: error: --out {stray} holds a run's files (config.yaml); "
                                               "write the report into another folder")




def test_a_run_folder_with_only_its_marker_is_listed_not_fatal(tmp_path):
    """A run that died before its config.yaml, or a copy cut short (marker and checkpoints first):
    reproduce hands its folder to the group's report, which then failed whole ('neither a run folder
    nor holds any'). It is a run that has not finished."""
    from cilab import runfolder

    write_run(tmp_path / "icarl-s0", fake_metrics("icarl", 0, [], {"nme": [80.0, 60.0]}))
    half = tmp_path / "icarl-s1"
    half.mkdir()
    runfolder.write_marker(half)
    (half / "checkpoints").mkdir()
    assert find_run_folders([tmp_path]) == [tmp_path / "icarl-s0", half]
    rep = make_report([tmp_path / "icarl-s0", half], tmp_path / "report", draw_tsne=False, log=lambda s: None)
    assert [r.name for r in rep.excluded] == ["icarl-s1"] and rep.rows[0]["n_seeds"] == 1
    assert "icarl-s1" in (tmp_path / "report" / "report.md").read_text()
