"""log.tensorboard / log.wandb: the scalars written are metrics.json's, read back from the event file."""

import importlib.machinery
import json
import math
import sys
import types

import numpy as np
import pytest
from PIL import Image

from cilab.config import build_config


def tiny_run(tmp_path, *extra):
    """4 classes of 10 train / 2 val 8x8 images, 2 tasks, batches of 4: step counts worked out by hand."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for k in range(4):
        for split, n in (("train", 10), ("val", 2)):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.full((8, 8, 3), 60 * k) + rng.integers(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"c{k}" / f"{i}.png")
    return ["data.name=imagefolder", f"data.path={root}", f"data.root={tmp_path / 'cache'}", "data.image_size=8",
            "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]", "train.batch_size=4", "train.lr=0.1",
            *extra]


def test_tensorboard_scalars_equal_metrics_json(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cilab.experiment import run

    cfg = build_config("icarl", tiny_run(tmp_path, "memory.size=8", "log.tensorboard=true"))
    run(cfg, tmp_path / "out", progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ea = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    ea.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in ea.Scalars(tag)]  # noqa: E731
    for clf in ("nme", "fc"):
        m = metrics[clf]
        assert scalars(f"accuracy/{clf}") == [(t + 1, pytest.approx(a, rel=1e-6)) for t, a in enumerate(m["accuracy"])]
        assert [v for _, v in scalars(f"current_task_accuracy/{clf}")] == pytest.approx(m["current_task_accuracy"], rel=1e-6)
        # after task 1 forgetting is 0 and the average is task 1's accuracy; after task 2, metrics.json's summaries
        assert scalars(f"forgetting/{clf}")[0] == (1, 0.0)
        assert scalars(f"forgetting/{clf}")[1] == (2, pytest.approx(m["forgetting"], rel=1e-6, abs=1e-6))
        assert scalars(f"average_incremental_accuracy/{clf}")[0][1] == pytest.approx(m["accuracy"][0], rel=1e-6)
        assert scalars(f"average_incremental_accuracy/{clf}")[1][1] == pytest.approx(m["average_incremental_accuracy"], rel=1e-6)
    for key in ("train_s", "memory_s", "eval_s"):
        assert [v for _, v in scalars(f"timing/{key}")] == pytest.approx([p[key] for p in metrics["timing"]["per_task"]], rel=1e-6)
    # Loss reads: log_every=4 per epoch, after batch round(n * k / 4), k = 1..4 (Python rounds half to even).
    # Task 1: 20 images = 5 batches -> 1.25, 2.5, 3.75, 5 -> 1, 2, 4, 5.
    # Task 2: 20 images + 8 exemplars = 7 batches -> 1.75, 3.5, 5.25, 7 -> 2, 4, 5, 7, after task 1's 5 steps.
    loss = scalars("train/loss")
    assert [s for s, _ in loss] == [1, 2, 4, 5, 7, 9, 10, 12]
    assert metrics["train_steps"] == 12
    assert all(math.isfinite(v) and v > 0 for _, v in loss)


def test_wandb_gets_the_same_scalars_and_tensorboard_off_writes_nothing(tmp_path, monkeypatch):
    from cilab.experiment import run

    calls = []

    class FakeRun:
        def define_metric(self, *a, **k):
            pass

        def log(self, data):
            calls.append(dict(data))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    cfg = build_config("finetune", tiny_run(tmp_path, "eval.classifiers=[fc]", "log.wandb=true", "log.wandb_project=p"))
    run(cfg, tmp_path / "out", progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["name"] == "out"
    assert calls[0][1]["config"]["log"]["wandb"] is True and calls[-1] == "finish"
    tasks = [c for c in calls if isinstance(c, dict) and "task" in c]
    assert [c["task"] for c in tasks] == [1, 2]
    assert [c["accuracy/fc"] for c in tasks] == metrics["fc"]["accuracy"]
    # finetune: 20 images = 5 batches per task, reads after batches 1, 2, 4, 5 of each
    assert [c["step"] for c in calls if isinstance(c, dict) and "train/loss" in c] == [1, 2, 4, 5, 6, 7, 9, 10]
    assert not (tmp_path / "out" / "tensorboard").exists()


@pytest.mark.parametrize("switch, package, extra", [("wandb", "wandb", "wandb"), ("tensorboard", "tensorboard", "tb")])
def test_log_switch_without_the_package_is_refused(monkeypatch, switch, package, extra):
    from cilab.config import ConfigError

    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=rf"log.{switch}=true needs the {package} package: "
                                          rf"pip install 'cilab\[{extra}\]' \(or set log.{switch}=false\)"):
        build_config("icarl", [f"log.{switch}=true"])
    build_config("icarl", [f"log.{switch}=false"])  # switched off, the package is not needed


def test_a_run_resumes_with_tracking_switched_on(tmp_path):
    from cilab import results, runfolder
    from cilab.results import RunFolderError

    out = tmp_path / "run"
    out.mkdir()
    runfolder.write_marker(out)
    results.atomic_write_yaml(out / results.CONFIG, build_config("icarl").to_dict())
    assert runfolder.check(out, build_config("icarl", ["log.tensorboard=true"]), resume=True, overwrite=False) == "resume"
    with pytest.raises(RunFolderError, match="seed: 0 saved, 1 now"):
        runfolder.check(out, build_config("icarl", ["seed=1"]), resume=True, overwrite=False)
