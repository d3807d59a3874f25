"""Issue 17: one side stream for CUDA-graph warm-up and capture, train.deterministic, the
concurrency benchmark, benchmarks/gpu.sh.

The CPU parts run everywhere; the tests marked ``cuda`` need a CUDA GPU and are
skipped without one (benchmarks/gpu.sh runs them on a GPU machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cilab import trainer

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- CudaGraphs: warm-up and capture on one side stream ----------------------------------------


class _FakeStream:
    """Stands for a torch.cuda.Stream: records what waits on what."""

    def __init__(self, name):
        self.name, self.waited_on = name, []

    def wait_stream(self, other):
        self.waited_on.append(other)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph calls replaced by recorders, so CudaGraphs' use of
    streams can be checked on a CPU: which stream each warm-up runs on, which one the
    capture is given."""
    log = {"streams": [], "entered": [], "graph_streams": []}
    current = _FakeStream("current")

    def new_stream(device=None, *a, **k):
        s = _FakeStream(f"side{len(log['streams'])}")
        log["streams"].append(s)
        return s

    @contextlib.contextmanager
    def use_stream(s):
        log["entered"].append(s)
        yield

    class FakeGraph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, **k):
        log["graph_streams"].append(stream)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    log["current"] = current
    return log


def test_warmups_and_captures_share_one_side_stream(fake_cuda):
    # Issue 17 item 5: the warm-up ran on a fresh side stream each time and the
    # capture on torch.cuda.graph's own stream, so the parameters' AccumulateGrad
    # nodes (and the gradients and momentum buffers) were made on one stream and
    # used from another: torch's "AccumulateGrad node's stream does not match".
    backend = trainer.CudaGraphs(torch.device("cuda"))
    for _ in range(3):
        with backend.warmup():
            pass
    backend.capture(lambda: torch.zeros(()))
    with backend.warmup():  # the other batch shape warms up after the first capture
        pass
    backend.capture(lambda: torch.zeros(()))
    assert len(fake_cuda["streams"]) == 1, "a new stream was made after the first"
    side = fake_cuda["streams"][0]
    assert fake_cuda["entered"] == [side] * 4
    assert fake_cuda["graph_streams"] == [side, side]
    # the side stream joins the caller's stream before each warm-up and capture, and back after
    assert side.waited_on.count(fake_cuda["current"]) == 6
    assert fake_cuda["current"].waited_on.count(side) == 6


# -- train.deterministic ---------------------------------------------------------------------

TINY = ["data.name=npz", "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]", "train.batch_size=8",
        "memory.size=8", "eval.classifiers=[nme]"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 classes of 6 random 32x32 images: a whole run in a second."""
    import numpy as np

    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y_train=np.arange(24) % 4,
             x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=np.arange(8) % 4)
    return TINY + [f"data.path={path}"]


def _global_state() -> dict:
    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


@pytest.fixture
def torch_state(monkeypatch):
    """Records torch's global settings as train_task sees them; puts back what the test changed."""
    from cilab import experiment

    before = _global_state()
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    seen = []
    real = experiment.train_task

    def recording(*a, **k):
        seen.append({**_global_state(), "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
        return real(*a, **k)

    monkeypatch.setattr(experiment, "train_task", recording)
    yield seen
    torch.use_deterministic_algorithms(before["algorithms"])
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_deterministic_sets_torch_for_the_run_records_it_and_puts_torch_back(torch_state, tiny_data, tmp_path,
                                                                            monkeypatch):
    from cilab.config import build_config
    from cilab.experiment import run

    # a caller's own settings, which the run must change while it trains and give back after
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    m = run(build_config("icarl", tiny_data + ["train.deterministic=true"]), tmp_path / "det", progress=False)
    assert m["deterministic"] is True
    assert json.loads((tmp_path / "det" / "metrics.json").read_text())["deterministic"] is True
    assert torch_state == [{"algorithms": True, "cudnn_deterministic": True, "cudnn_benchmark": False,
                            "cublas": ":4096:8"}] * 2  # both tasks
    assert _global_state() == {"algorithms": False, "cudnn_deterministic": False, "cudnn_benchmark": True}
    # cuBLAS reads its workspace setting once, when it starts: it stays set for the process
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"

    torch_state.clear()
    m = run(build_config("icarl", tiny_data), tmp_path / "default", progress=False)
    assert m["deterministic"] is False  # the default leaves torch's determinism settings alone
    # train.cudnn_benchmark=auto: off for a CUDA run, the caller's setting on a CPU
    assert [{k: v for k, v in s.items() if k != "cublas"} for s in torch_state] == [
        {"algorithms": False, "cudnn_deterministic": False, "cudnn_benchmark": not torch.cuda.is_available()}] * 2


def test_deterministic_settings_are_put_back_when_a_run_fails(torch_state, tiny_data, tmp_path, monkeypatch):
    from cilab import experiment
    from cilab.config import build_config

    def failing(*a, **k):
        assert torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("out of memory")

    monkeypatch.setattr(experiment, "train_task", failing)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    with pytest.raises(RuntimeError, match="out of memory"):
        experiment.run(build_config("icarl", tiny_data + ["train.deterministic=true"]), tmp_path / "run", progress=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_an_existing_deterministic_cublas_setting_is_kept(torch_state, tiny_data, tmp_path, monkeypatch):
    from cilab.config import build_config
    from cilab.experiment import run

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other setting cuBLAS documents as deterministic
    run(build_config("icarl", tiny_data + ["train.deterministic=true"]), tmp_path / "run", progress=False)
    assert [s["cublas"] for s in torch_state] == [":16:8"] * 2


@pytest.mark.parametrize("setting, callers, during", [("on", False, True), ("off", True, False),
                                                      ("auto", True, True), ("auto", False, False)])
def test_cudnn_benchmark_is_set_for_the_run_recorded_and_put_back(torch_state, tiny_data, tmp_path,
                                                                  setting, callers, during):
    from cilab.config import build_config
    from cilab.experiment import run

    torch.backends.cudnn.benchmark = callers
    m = run(build_config("icarl", tiny_data + ["train.device=cpu", f"train.cudnn_benchmark={setting}"]),
            tmp_path / "run", progress=False)  # on the CPU auto leaves torch's setting; the GPU case is below
    assert [s["cudnn_benchmark"] for s in torch_state] == [during] * 2  # both tasks
    assert m["cudnn_benchmark"] is during
    assert torch.backends.cudnn.benchmark is callers


def test_cudnn_benchmark_auto_is_off_for_cuda():
    """A whole iCaRL run (10 x 30) on the H100 took 93.9 s with autotuning, 81.2 s without (README)."""
    from cilab.config import build_config
    from cilab.runtime import resolve_cudnn_benchmark

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_cudnn_benchmark(build_config("icarl").train, cuda) is False
    assert resolve_cudnn_benchmark(build_config("icarl", ["train.deterministic=true"]).train, cuda) is False
    assert resolve_cudnn_benchmark(build_config("icarl").train, cpu) is None  # nothing to pick on a CPU
    assert resolve_cudnn_benchmark(build_config("icarl", ["train.cudnn_benchmark=off"]).train, cuda) is False
    assert resolve_cudnn_benchmark(build_config("icarl", ["train.cudnn_benchmark=on"]).train, cpu) is True


def test_cudnn_benchmark_on_is_refused_with_deterministic():
    from cilab.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="train.cudnn_benchmark=on .* train.deterministic=true forbids that"):
        build_config("icarl", ["train.deterministic=true", "train.cudnn_benchmark=on"])
    # deterministic turns benchmarking off itself; auto and off are fine with it
    assert build_config("icarl", ["train.deterministic=true", "train.cudnn_benchmark=off"]).train.deterministic


def test_deterministic_must_be_a_boolean():
    from cilab.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="'train.deterministic' must be true or false"):
        build_config("icarl", ["train.deterministic=maybe"])


# -- cilab bench concurrency ---------------------------------------------------------------------

# Hand-worked training images of one run at the study's settings (CIFAR-100: 100 classes of
# 500 training images, 10 tasks of 10 classes, 70 epochs, K = 2000):
#   LwF: 10 tasks x 5000 images = 50,000 per epoch -> 3,500,000
#   fine-tuning: 10% of each task held out (the study's validation split): 4500 x 10 x 70 -> 3,150,000
#   joint: 5000 x (1 + 2 + ... + 10) = 275,000 per epoch -> 19,250,000
#   iCaRL: 50,000 + exemplars before tasks 2..10, 10t classes x (2000 // 10t) each:
#     2000 + 2000 + 1980 + 2000 + 2000 + 1980 + 1960 + 2000 + 1980 = 17,900 -> 67,900 x 70 = 4,753,000
#   collage kinds: at most 500 // 4 = 125 collages a class, so task 2 has 10 x 125 = 1250, not 2000:
#     17,150 -> 67,150 x 70 = 4,700,500
STUDY_RUN_IMAGES = {"finetune": 3_150_000, "lwf": 3_500_000, "joint": 19_250_000, "icarl": 4_753_000,
                    "collage": 4_700_500}


def test_study_images_per_run_from_the_groups_and_the_scenario():
    from cilab.bench import study_images
    from cilab.studyplan import load_groups

    study = {name: g for name, g in load_groups().items() if name != "strong-baselines"}
    runs = study_images(study)
    assert len(study_images()) == len(runs) + 30  # strong-baselines: 10 runs x 3 seeds
    by_name = {(r["group"], r["name"]): r["images"] for r in runs}
    assert by_name[("baselines", "finetune-s2")] == STUDY_RUN_IMAGES["finetune"]
    assert by_name[("baselines", "lwf-s0")] == STUDY_RUN_IMAGES["lwf"]
    assert by_name[("baselines", "joint-s1")] == STUDY_RUN_IMAGES["joint"]  # 3 seeds for every run, joint too
    assert by_name[("losses", "icarl-ce-mse-s0")] == STUDY_RUN_IMAGES["icarl"]
    assert by_name[("collage", "collage-resized-s1")] == STUDY_RUN_IMAGES["collage"]
    # plain iCaRL is in five groups (baselines, icarl-variants, losses, collage, deepinversion):
    # baselines trains it, the four others copy it, seed by seed
    copies = {(r["group"], r["name"]): r["copy_of"] for r in runs if r["copy_of"]}
    assert copies == {(g, f"icarl-s{seed}"): f"baselines/icarl-s{seed}"
                      for g in ("icarl-variants", "losses", "collage", "deepinversion") for seed in (0, 1, 2)}
    assert by_name[("baselines", "icarl-s1")] == STUDY_RUN_IMAGES["icarl"] and by_name[("losses", "icarl-s1")] == 0
    # hybrid1 and the classifier ablation train as plain iCaRL does: evaluated from its checkpoints
    evaluated = {(r["group"], r["name"]): r["evaluated_from"] for r in runs if r["evaluated_from"]}
    assert evaluated == {(g, f"icarl-{tag}-s{seed}"): f"baselines/icarl-s{seed}"
                         for g, tag in (("icarl-variants", "hybrid1"), ("classifiers", "classifiers"))
                         for seed in (0, 1, 2)}
    assert by_name[("classifiers", "icarl-classifiers-s0")] == 0
    # the bundled groups: 22 runs (baselines 4, variants 4, losses 5, classifiers 1, collage 4,
    # deepinversion 4) x 3 seeds, of which 48 trained; 3 collage runs' worth of exemplars short of all-iCaRL
    assert len(runs) == 66
    n_collage, trained = 3 * 3, 66 - 12 - 6
    expected = 3 * (3_150_000 + 3_500_000 + 19_250_000) + (trained - 9 - n_collage) * 4_753_000 \
        + n_collage * 4_700_500
    assert sum(r["images"] for r in runs) == expected == 262_594_500


def test_study_images_follow_the_config_of_each_run():
    from cilab.bench import study_images

    groups = {"g": {"runs": [{"preset": "icarl", "seeds": [0], "overrides": ["scenario.num_tasks=5",
                                                                          "train.epochs=2", "train.milestones=[1]",
                                                                          "memory.size=300"]},
                             {"preset": "joint", "seeds": [0, 1]}]}}
    runs = study_images(groups, seeds=None, overrides=["train.epochs=3", "train.milestones=[]"], classes=10,
                        per_class=50)
    # icarl (epochs=3 from the command line, after the run's own): 5 tasks of 2 classes, 100 images a task;
    # exemplars before task t+1: 2t classes x min(300 // 2t, 50): 2 x 50, 4 x 50, 6 x 50, 8 x 37
    assert runs[0]["images"] == 3 * (5 * 100 + 100 + 200 + 300 + 296)
    # joint with the default 10 tasks of 1 class: 50 x (1 + ... + 10) = 2750 an epoch
    assert [r["images"] for r in runs[1:]] == [3 * 2750] * 2 and [r["name"] for r in runs[1:]] == ["joint-s0", "joint-s1"]


def test_concurrency_benchmark_json_adds_up(tmp_path):
    from cilab import cli

    out = tmp_path / "concurrency.json"
    groups = tmp_path / "groups.yaml"
    groups.write_text("g:\n  runs:\n    - {preset: finetune, seeds: [0]}\n    - {preset: joint, seeds: [0]}\n")
    assert cli.main(["bench", "concurrency", "--jobs", "1,2", "--images", "40", "--epochs", "2", "--warmup-epochs",
                     "0", "--threads", "1", "--study-seeds", "0,1", "--groups-file", str(groups), "--out", str(out),
                     "train.batch_size=32", "train.device=cpu"]) == 0
    d = json.loads(out.read_text())
    assert [r["jobs"] for r in d["results"]] == [1, 2] and not any("error" in r for r in d["results"])
    for r in d["results"]:
        assert len(r["runs"]) == r["jobs"]
        assert all(run["images"] == 2 * 40 for run in r["runs"])  # every image of every timed epoch
        wall = max(run["end"] for run in r["runs"]) - min(run["start"] for run in r["runs"])
        assert r["wall_s"] == pytest.approx(wall)
        assert r["images"] == 80 * r["jobs"]
        assert r["aggregate_images_per_s"] == pytest.approx(80 * r["jobs"] / wall)
        for run in r["runs"]:
            assert run["images_per_s"] == pytest.approx(80 / (run["end"] - run["start"]))
    one, two = (r["aggregate_images_per_s"] for r in d["results"])
    assert d["results"][1]["speedup_over_one_run"] == pytest.approx(two / one)
    s = d["study"]
    # finetune and joint, seeds 0 and 1, 10 tasks of 5,000 images, 70 epochs:
    #   finetune keeps 10% of each task for validation (its preset): 10 x 4,500 x 70 = 3,150,000
    #   joint trains on every class seen so far: (1 + ... + 10) x 5,000 x 70 = 19,250,000
    # 2 x (3,150,000 + 19,250,000) = 44,800,000
    assert s["runs"] == 4 and s["train_images"] == 44_800_000
    best = max(one, two)
    assert s["best_jobs"] == (1 if one >= two else 2) and s["best_aggregate_images_per_s"] == best
    assert s["projected_train_s_at_best"] == pytest.approx(44_800_000 / best)
    assert s["longest_run_s_at_best"] == pytest.approx(19_250_000 / (best / s["best_jobs"]))
    assert s["projected_wall_s"] == pytest.approx(max(44_800_000 / best, 19_250_000 * s["best_jobs"] / best))
    assert s["projected_wall_s_one_at_a_time"] == pytest.approx(44_800_000 / one)


def test_batched_benchmark_json_adds_up(tmp_path):
    from cilab import cli

    out = tmp_path / "batched.json"
    groups = tmp_path / "groups.yaml"
    groups.write_text("g:\n  runs:\n    - {preset: finetune, seeds: [0]}\n")
    assert cli.main(["bench", "batched", "--models", "1,3", "--steps", "2", "--study-seeds", "0,1", "--groups-file",
                     str(groups), "--out", str(out), "train.batch_size=4", "model.name=resnet20",
                     "train.device=cpu"]) == 0
    d = json.loads(out.read_text())
    assert [(r["models"], r["images"]) for r in d["results"]] == [(1, 2 * 4), (3, 2 * 4 * 3)]  # steps x batch x N
    assert not any(r["graphed"] for r in d["results"])  # no CUDA graphs on a CPU
    assert d["cuda_graphs"] == "off" and d["amp"] == "off" and d["model"] == "resnet20" and d["compile"] is False
    for r in d["results"]:
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    one, three = (r["images_per_s"] for r in d["results"])
    assert d["results"][1]["speedup_over_one_model"] == pytest.approx(three / one)
    # finetune, seeds 0 and 1: 2 x 3,150,000 images (see test_concurrency_benchmark_json_adds_up)
    assert d["study_train_images"] == 6_300_000
    assert d["projected_study_train_s_at_best"] == pytest.approx(6_300_000 / max(one, three))


def test_batched_benchmark_in_several_processes_adds_up(tmp_path):
    """--processes P: P processes each train the fused network at once (fused networks under MPS,
    the combination issue 17 left unmeasured); each process's images are steps x batch x N, and the
    aggregate is all images over the span from the first start to the last end, on one clock."""
    from cilab import cli
    from cilab.executors import cpu_count

    out = tmp_path / "batched.json"
    groups = tmp_path / "groups.yaml"
    groups.write_text("g:\n  runs:\n    - {preset: finetune, seeds: [0]}\n")
    assert cli.main(["bench", "batched", "--models", "1,2", "--processes", "2", "--steps", "2", "--study-seeds", "0",
                     "--groups-file",
                     str(groups), "--out", str(out), "train.batch_size=4", "model.name=resnet20",
                     "train.device=cpu"]) == 0
    d = json.loads(out.read_text())
    assert d["processes"] == 2
    for r, n in zip(d["results"], (1, 2)):
        assert r["models"] == n and "error" not in r, r
        assert [run["images"] for run in r["runs"]] == [2 * 4 * n] * 2  # each process: steps x batch x N
        assert r["images"] == 2 * 2 * 4 * n
        span = max(run["end"] for run in r["runs"]) - min(run["start"] for run in r["runs"])
        assert r["seconds"] == pytest.approx(span) and r["images_per_s"] == pytest.approx(r["images"] / span)
        assert all(run["threads"] == max(1, cpu_count() // 2) for run in r["runs"])  # reproduce --jobs 2's share
    one, two = (r["images_per_s"] for r in d["results"])
    assert d["results"][1]["speedup_over_one_model"] == pytest.approx(two / one)
    assert d["projected_study_train_s_at_best"] == pytest.approx(3_150_000 / max(one, two))


@pytest.mark.parametrize("bench", ["batched", "concurrency"])
def test_a_benchmark_cut_off_at_its_timeout_keeps_the_ns_it_finished(tmp_path, monkeypatch, bench):
    """gpu.sh kills a step at its timeout: the JSON, written at the end, was lost with every N already
    timed. It is written after each N, marked partial until the benchmark ends."""
    from cilab import cli
    from cilab.bench import fused, sharing

    out = tmp_path / "b.json"
    seen = []

    def fake(*a, **k):  # each N: what --out holds when it starts
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        return {"images": 8, "start": 0.0, "end": 1.0, "graphed": False}

    if bench == "batched":
        monkeypatch.setattr(fused, "_fused_steps", lambda *a, **k: fake())
        argv = ["batched", "--models", "1,2,4", "train.device=cpu"]
    else:
        monkeypatch.setattr(sharing, "concurrent_runs", lambda n, *a: fake() and {
            "jobs": n, "runs": [], "wall_s": 1.0, "images": 8 * n, "aggregate_images_per_s": 8.0 * n})
        argv = ["concurrency", "--jobs", "1,2,4", "train.device=cpu"]
    assert cli.main(["bench", *argv, "--out", str(out)]) == 0
    assert seen[0] is None
    n = "models" if bench == "batched" else "jobs"
    assert [(d["partial"], [r[n] for r in d["results"]]) for d in seen[1:]] == [(True, [1]), (True, [1, 2])]
    assert "partial" not in json.loads(out.read_text())


def _dies_or_waits(conn, barrier, i: int, threads: int) -> None:
    """A spawn_together target: process 1 dies at once without a word (as one killed for memory), the
    others wait for it at the barrier."""
    import os
    import threading

    if i == 1:
        os._exit(9)
    try:
        barrier.wait(timeout=90)
        conn.send({"images": 1, "start": 0.0, "end": 1.0})
    except threading.BrokenBarrierError:
        conn.send({"error": "the barrier was broken"})


def test_a_process_that_dies_silently_does_not_keep_the_others_waiting():
    """They waited at the barrier for its timeout (600 s), past gpu.sh's step timeout, whose JSON was then lost."""
    import time

    from cilab.bench.common import spawn_together

    start = time.monotonic()
    got = spawn_together(3, _dies_or_waits, (), threads=1)
    assert time.monotonic() - start < 45  # the spawns take seconds; waiting out the barrier 90
    assert [r.get("error") for r in got["runs"]] == [
        "the barrier was broken", "the process died without a word (exit code 9; out of memory?)",
        "the barrier was broken"]


def test_throughput_benchmark_runs_on_the_cpu_and_records_what_it_trained_under(tmp_path):
    """a, b and c for two rounds on the CPU; the medians are those of the rounds, and the JSON
    records torch's cuDNN autotuning flag during the benchmark, as metrics.json does: with
    train.cudnn_benchmark=auto a CPU run leaves the caller's flag alone, so that is what it
    trained under (it was once recorded as null, the resolved request)."""
    from cilab import cli

    out = tmp_path / "throughput.json"
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        assert cli.main(["bench", "throughput", "--rounds", "2", "--images", "48", "--exemplars", "16", "--workers",
                         "0", "--out", str(out), "train.batch_size=32", "model.name=resnet20",
                         "train.device=cpu"]) == 0
        assert torch.backends.cudnn.benchmark is True  # the caller's flag, left as it was
    finally:
        torch.backends.cudnn.benchmark = before
    d = json.loads(out.read_text())
    assert d["cudnn_benchmark"] is True and d["amp"] == "off" and d["cuda_graphs"] == "off"
    assert d["compile"] is False and d["model"] == "resnet20" and d["deterministic"] is False
    assert d["warnings"] == []  # nothing fell back (a failed capture would be listed: see the protocol's test)
    assert d["images_per_epoch"] == 64 and d["epochs_per_round"] == 1  # a round is one epoch on the CPU
    for key, k in (("a_bare_step_img_s", "a"), ("b_cilab_trainer_img_s", "b"), ("c_reference_dataloader_img_s", "c")):
        rounds = d["all_rounds_img_s"][k]
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
        assert d[key] == pytest.approx((rounds[0] + rounds[1]) / 2)  # the median of two
    assert d["b_over_a"] == pytest.approx(d["b_cilab_trainer_img_s"] / d["a_bare_step_img_s"])


def test_a_protocol_cut_off_at_its_timeout_keeps_the_tasks_it_finished(tmp_path, monkeypatch):
    """gpu.sh kills protocol 10 x 70 at its step's timeout: the JSON, written at the end, was lost with
    every task already timed. It is written after each task, marked partial until the run ends."""
    from cilab import cli, experiment

    out = tmp_path / "protocol.json"
    seen = []
    real_task = experiment.Protocol.run_task

    def run_task(self, t):  # each task: what --out holds when it starts
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        if t == 0:  # a capture that failed in task 1 made every later figure an eager one
            warnings.warn("CUDA-graph capture failed (stand-in)", RuntimeWarning)
        return real_task(self, t)

    monkeypatch.setattr(experiment.Protocol, "run_task", run_task)
    assert cli.main(["bench", "protocol", "--tasks", "4", "--epochs", "1", "--train-per-class", "2", "--quiet",
                     "--out", str(out), "train.batch_size=32", "memory.size=100", "model.name=resnet20",
                     "train.device=cpu"]) == 0
    assert seen[0] is None
    assert [(d["partial"], d["completed_tasks"], len(d["per_task"])) for d in seen[1:]] == \
        [(True, 1, 1), (True, 2, 2), (True, 3, 3)]
    one = seen[1]  # a partial JSON's figures are those of the tasks done: task 1's train and eval times
    assert one["train_s"] == pytest.approx(one["per_task"][0]["train_s"])
    assert one["eval_s"] == pytest.approx(one["per_task"][0]["eval_s"])
    assert one["warnings"] == ["RuntimeWarning: CUDA-graph capture failed (stand-in)"]
    final = json.loads(out.read_text())
    assert "partial" not in final and final["completed_tasks"] == 4 and len(final["per_task"]) == 4
    assert final["train_s"] == pytest.approx(sum(p["train_s"] for p in final["per_task"]))


def test_protocol_benchmark_records_the_warnings_of_its_run(tmp_path, monkeypatch):
    """A CUDA-graph capture that fails under train.cuda_graphs=auto warns and trains on eagerly: the
    benchmark's figure is then an eager one (a torch.compile variant, say), and its JSON must say so."""
    from cilab import cli, experiment

    real_run = experiment.run

    def run(*a, **kw):
        warnings.warn("CUDA-graph capture of the training step failed (stand-in); training on with eager steps",
                      RuntimeWarning)
        return real_run(*a, **kw)

    monkeypatch.setattr(experiment, "run", run)
    out = tmp_path / "protocol.json"
    assert cli.main(["bench", "protocol", "--tasks", "2", "--epochs", "1", "--train-per-class", "2", "--quiet",
                     "--out", str(out), "train.batch_size=32", "memory.size=100", "model.name=resnet20",
                     "train.device=cpu"]) == 0
    d = json.loads(out.read_text())
    assert d["tasks"] == 2 and d["epochs"] == 1 and d["data"].startswith("random CIFAR-shaped")
    assert d["warnings"] == ["RuntimeWarning: CUDA-graph capture of the training step failed (stand-in); "
                             "training on with eager steps"]


def test_batched_benchmark_refuses_what_it_cannot_fuse(capsys):
    from cilab import cli

    assert cli.main(["bench", "batched", "model.name=resnet18"]) == 2
    assert "bench batched fuses cilab's CIFAR ResNets (resnet20, resnet32), not model.name=resnet18" in \
        capsys.readouterr().err
    assert cli.main(["bench", "batched", "--models", "0,2"]) == 2
    assert "--models must be comma-separated integers >= 1" in capsys.readouterr().err


def test_concurrency_benchmark_refuses_bad_jobs(capsys):
    from cilab import cli

    assert cli.main(["bench", "concurrency", "--jobs", "0,2"]) == 2
    assert "--jobs must be comma-separated integers >= 1" in capsys.readouterr().err


# -- on a GPU ----------------------------------------------------------------------------------

_GRAPHED_TRAINING = """
import copy, torch
from cilab.config import build_config
from cilab.data import BatchLoader
from cilab.data.loader import Normalizer
from cilab.determinism import deterministic_algorithms
from cilab.losses import Criterion
from cilab.models import create_model
from cilab.trainer import train_task

dev = torch.device("cuda")
x = torch.randint(0, 256, (600, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).to(dev)
cfg = build_config("icarl", ["train.epochs=3", "train.milestones=[2]", "train.lr=0.5"]).train

def train():
    torch.manual_seed(0)
    model = create_model(build_config("icarl").model, 10).to(dev, memory_format=torch.channels_last)
    old = copy.deepcopy(model).eval().requires_grad_(False)
    # 4 batches of 128 and one of 88: two shapes, each warmed up and captured, an lr cut
    loader = BatchLoader(x, (torch.arange(600) % 10).to(dev), 128, Normalizer(torch.full((3,), 0.5),
                         torch.full((3,), 0.25)).to(dev), True, torch.Generator(device=dev).manual_seed(0), True)
    train_task(model, loader, cfg, Criterion("bce", "bce", 5, 10), old, 1, dev, "bf16", progress=False, graphs="on")
    return torch.cat([p.detach().flatten() for p in model.parameters()])

with deterministic_algorithms(DETERMINISTIC):
    a, b = train(), train()
print("IDENTICAL" if torch.equal(a, b) else "DIFFERENT")
"""


def _graphed_training(deterministic: bool) -> subprocess.CompletedProcess:
    # A fresh process: torch prints a C++ warning once per process, so an earlier
    # test must not have used it up; and cuBLAS starts after CUBLAS_WORKSPACE_CONFIG.
    code = _GRAPHED_TRAINING.replace("DETERMINISTIC", str(deterministic))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


@cuda
def test_graphed_training_gives_no_accumulate_grad_stream_warning():
    res = _graphed_training(False)
    assert res.returncode == 0, res.stderr
    assert "AccumulateGrad" not in res.stderr, res.stderr
    assert "stream" not in res.stderr.lower(), res.stderr


@cuda
def test_deterministic_graphed_training_repeats_bit_for_bit():
    res = _graphed_training(True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("IDENTICAL"), res.stdout + res.stderr


@cuda
def test_concurrency_benchmark_on_the_gpu(tmp_path):
    from cilab import cli

    out = tmp_path / "c.json"
    assert cli.main(["bench", "concurrency", "--jobs", "1,2", "--images", "512", "--epochs", "2", "--out",
                     str(out)]) == 0
    d = json.loads(out.read_text())
    assert not any("error" in r for r in d["results"]), d["results"]
    assert d["device"].startswith("cuda") and d["cuda_graphs"] == "try"
    assert all(run["images"] == 1024 for r in d["results"] for run in r["runs"])


@cuda
def test_batched_benchmark_on_the_gpu(tmp_path):
    from cilab import cli

    out = tmp_path / "b.json"
    assert cli.main(["bench", "batched", "--models", "1,2", "--steps", "5", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["device"].startswith("cuda") and d["cuda_graphs"] == "try" and d["model"] == "resnet32"
    assert [(r["models"], r["images"]) for r in d["results"]] == [(1, 5 * 128), (2, 2 * 5 * 128)]
    assert all(r["graphed"] for r in d["results"])  # the fused step is captured like any other


@cuda
def test_cudnn_benchmark_auto_is_off_in_a_cuda_run_and_put_back(torch_state, tiny_data, tmp_path):
    from cilab.config import build_config
    from cilab.experiment import run

    torch.backends.cudnn.benchmark = True  # the caller's setting, not the run's
    m = run(build_config("icarl", tiny_data + ["train.device=cuda"]), tmp_path / "run", progress=False)
    assert [s["cudnn_benchmark"] for s in torch_state] == [False] * 2 and m["cudnn_benchmark"] is False
    assert torch.backends.cudnn.benchmark is True


def test_a_benchmark_keeps_the_warnings_of_a_block_that_failed():
    """A capture that failed and then a crash: the warning may be why, and the JSON's error entry keeps it."""
    from cilab.bench.common import warnings_into

    seen = []
    with pytest.raises(RuntimeError), pytest.warns(RuntimeWarning, match="capture failed"):
        with warnings_into(seen):
            warnings.warn("capture failed", RuntimeWarning)
            raise RuntimeError("the step blew up")
    assert seen == ["RuntimeWarning: capture failed"]
