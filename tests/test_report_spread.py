"""The spread over seeds in reports: which standard deviation, said in every table and legend.

Three runs of one variant with hand-picked accuracies; the expected numbers are
worked out by hand below, not with numpy or the report code.
"""

import csv

import pytest

from cilab import cli, plots
from cilab.aggregate import find_run_folders, format_summary_table, group_runs, load_run, summarize_variants

from helpers import fake_metrics, write_run

# final accuracies 60, 62, 67: mean 63, squared deviations 9 + 1 + 16 = 26
#   ddof=1: sqrt(26 / 2) = 3.6056;  ddof=0 (the study): sqrt(26 / 3) = 2.9439
# average incremental accuracies 70, 71, 73.5: mean 71.5, squares 2.25 + 0.25 + 4 = 6.5
#   ddof=1: sqrt(6.5 / 2) = 1.8028;  ddof=0: sqrt(6.5 / 3) = 1.4720
ACCS = {0: [80.0, 60.0], 1: [80.0, 62.0], 2: [80.0, 67.0]}


@pytest.fixture
def runs(tmp_path):
    for seed, acc in ACCS.items():
        write_run(tmp_path / "runs" / f"icarl-s{seed}", fake_metrics("icarl", seed, [], {"nme": acc}))
    return tmp_path / "runs"


@pytest.mark.parametrize("ddof, final_std, aia_std", [(1, "3.61", "1.80"), (0, "2.94", "1.47")])
def test_tables_give_the_hand_computed_std_and_say_which(runs, tmp_path, capsys, ddof, final_std, aia_std):
    out = tmp_path / "report"
    assert cli.main(["report", str(runs), "--out", str(out), "--no-tsne", "--ddof", str(ddof)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    for text in (printed, md):
        assert f"63.00 ± {final_std}" in text and f"71.50 ± {aia_std}" in text
        assert f"mean ± std (ddof={ddof})" in text
    assert "n - %d" % ddof in md  # the formula, spelled out
    with open(out / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert row["std_ddof"] == str(ddof) and float(row["final_acc_std"]) == pytest.approx(float(final_std), abs=5e-3)
    with open(out / "curves.csv") as f:
        last = list(csv.DictReader(f))[-1]  # after task 2: the final accuracies again
    assert last["std_ddof"] == str(ddof) and float(last["accuracy_std"]) == pytest.approx(float(final_std), abs=5e-3)


def test_every_legend_names_the_spread_and_the_number_of_seeds(runs, tmp_path, monkeypatch):
    drawn = []
    real = plots.plot_curves
    monkeypatch.setattr(plots, "plot_curves", lambda curves, path, **kw: drawn.append((curves, kw)) or real(curves, path, **kw))
    assert cli.main(["report", str(runs), "--out", str(tmp_path / "r"), "--no-tsne", "--ddof", "0"]) == 0
    assert len(drawn) == 2  # accuracy and current-task accuracy
    for curves, kw in drawn:
        assert all("mean ± std (ddof=0, n=3 seeds)" in c["label"] for c in curves)
        assert "ddof=0" in kw["title"]
    acc_curve = drawn[0][0][0]
    assert acc_curve["std"][-1] == pytest.approx(26 ** 0.5 / 3 ** 0.5)  # error bar after the last task, ddof=0


def test_the_plain_text_table_header_says_the_default_is_the_sample_std(runs):
    rows = summarize_variants(group_runs([load_run(p) for p in find_run_folders([runs])]))
    assert "mean ± std (ddof=1)" in format_summary_table(rows).splitlines()[0]


def test_a_ddof_other_than_0_or_1_is_refused(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", str(runs), "--out", str(tmp_path / "r"), "--ddof", "2"])
    assert "--ddof" in capsys.readouterr().err
