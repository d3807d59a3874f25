"""LUCIR and PODNet (issue 18): hand-worked losses and heads, stage outputs, digits runs, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from cilab import experiment
from cilab.config import ConfigError, build_config
from cilab.methods.lucir import (CosineHead, imprint, less_forget_loss, less_forget_weight,
                                 margin_ranking_loss)
from cilab.methods.podnet import (LocalSimilarityHead, nca_loss, pod_embedding, pod_flat_loss,
                                  pod_spatial_loss)
from cilab.models import create_model
from cilab.results import load_checkpoint
from helpers import interrupted_and_resumed

# resnet20 and one epoch: the run tests must stay cheap on a shared CPU
B0 = ["model.name=resnet20", "data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]", "train.batch_size=64",
      "memory.size=40"]
B50 = ["model.name=resnet20", "data.name=digits", "scenario.num_tasks=4", "scenario.first_task_classes=4", "train.epochs=1",
       "train.milestones=[]", "train.batch_size=64", "memory.size=40"]
FAST = {"lucir": ["method_args.cbf_epochs=1"], "podnet": ["method_args.finetune_epochs=1", "method_args.proxies=3"]}


# -- the backbone: stage outputs, last ReLU -------------------------------------------------------


# stage maps of a 32x32 batch of 2, by the architectures: ResNet-20, 3 stages of 16/32/64 channels,
# stride 2 from the second; ResNet-18 with the CIFAR stem (stride 1, no pooling), 4 stages of
# 64/128/256/512 channels, stride 2 from the second
STAGE_SHAPES = {
    "resnet20": [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)],
    "resnet18": [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)],
}


@pytest.mark.parametrize("name", sorted(STAGE_SHAPES))
def test_stages_end_in_the_features_and_the_plain_forward_keeps_none(name):
    torch.manual_seed(0)
    model = create_model(build_config(None, [f"model.name={name}"]).model, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.stages(x)
    assert [tuple(m.shape) for m in maps] == STAGE_SHAPES[name]
    assert torch.allclose(maps[-1].mean(dim=(2, 3)), model.features(x), atol=1e-6)
    out = model(x, with_features=True)
    assert out.stages == ()  # the plain step carries no stage maps
    model.return_stages = True
    out = model(x, with_features=True)
    assert len(out.stages) == len(STAGE_SHAPES[name])
    assert torch.allclose(out.logits, model.head(model.features(x)), atol=1e-6)


@pytest.mark.parametrize("name", sorted(STAGE_SHAPES))
def test_last_relu_off_leaves_signed_features(name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    on = create_model(build_config(None, [f"model.name={name}"]).model, 10).eval()
    off = create_model(build_config(None, [f"model.name={name}", "model.last_relu=false"]).model, 10).eval()
    off.load_state_dict(on.state_dict())  # same weights: only the last ReLU differs
    assert (on.features(x) >= 0).all()
    assert (off.features(x) < 0).any()
    assert torch.allclose(torch.relu(off.stages(x)[-1]).mean(dim=(2, 3)), on.features(x), atol=1e-6)


def test_podnet_and_lucir_build_on_resnet18_as_their_papers_ran_imagenet():
    from cilab.methods import METHODS

    for name in ("podnet", "lucir"):  # their presets: model.last_relu=false
        cfg = build_config(name, ["model.name=resnet18"])
        model = METHODS[name](METHODS[name].parse_args(cfg.method_args)).build_model(cfg.model, 10)
        out = model(torch.randn(2, 3, 32, 32), with_features=True)
        assert out.logits.shape == (2, 10) and (out.features < 0).any()
        assert len(out.stages) == (4 if name == "podnet" else 0)


# -- LUCIR --------------------------------------------------------------------------------------


def test_cosine_head_is_sigma_times_the_cosine_by_hand():
    head = CosineHead(2, 2, sigma=3.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # f = (3, 4) has cosine 0.6 with (1, 0) and 0.8 with (0, 2); times sigma 3
    assert torch.allclose(head(torch.tensor([[3.0, 4.0]])), torch.tensor([[1.8, 2.4]]))


def test_imprinting_gives_the_normalised_mean_of_normalised_features_at_the_old_norm():
    head = CosineHead(2, 4)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 4.0], [9.0, 9.0], [9.0, 9.0]]))
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -3.0]])
    labels = torch.tensor([2, 2, 3])
    imprint(head, feats, labels, range(2, 4), n_old=2)
    # class 2: normalised features (1,0), (0,1), mean (0.5, 0.5), direction (1,1)/sqrt2 (the raw mean
    # (1, 0.5) would point elsewhere); class 3: (0,-1). Scale: the old rows' mean norm (2+4)/2 = 3.
    r = 3 / math.sqrt(2)
    assert torch.allclose(head.weight, torch.tensor([[2.0, 0.0], [0.0, 4.0], [r, r], [0.0, -3.0]]))


def test_less_forget_weight_and_loss_by_hand():
    assert less_forget_weight(5.0, 50, 10) == pytest.approx(5 * math.sqrt(5))
    assert less_forget_weight(5.0, 4, 2) == pytest.approx(5 * math.sqrt(2))
    assert less_forget_weight(5.0, 4, 2, adaptive=False) == 5.0
    # orthogonal features: 1 - 0; parallel ones of another length: 1 - 1
    f, f_old = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert less_forget_loss(f, f_old).item() == pytest.approx(0.5)


def test_margin_ranking_loss_by_hand():
    cos = torch.tensor([[0.9, 0.1, 0.6, 0.2, 0.7],   # old class 0: hard negatives 0.7, 0.6
                        [0.0, 0.8, 0.1, 0.2, 0.0],   # old class 1: 0.2, 0.1, both beyond the margin
                        [0.0, 0.0, 0.0, 0.1, 0.9]])  # a new-class sample: not counted
    y = torch.tensor([0, 1, 3])
    # (max(0, .5-.9+.7) + max(0, .5-.9+.6) + 0 + 0) / (2 old samples * K=2) = (0.3 + 0.2) / 4
    assert margin_ranking_loss(cos, y, n_old=2, K=2, margin=0.5).item() == pytest.approx(0.125)
    assert margin_ranking_loss(cos[2:], y[2:], n_old=2, K=2, margin=0.5).item() == 0.0
    # K larger than the new classes: all three new classes are the negatives
    assert margin_ranking_loss(cos[:1], y[:1], n_old=2, K=5, margin=0.5).item() == pytest.approx((0.3 + 0.2) / 3)


def test_lucir_settings_are_checked():
    with pytest.raises(ConfigError, match="'method_args.K' must be > 0"):
        build_config("lucir", ["method_args.K=0"])
    with pytest.raises(ConfigError, match="no setting 'method_args.lamda'"):
        build_config("lucir", ["method_args.lamda=5"])


# -- PODNet -------------------------------------------------------------------------------------


def test_pod_spatial_embedding_and_distance_by_hand():
    h = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])  # B=1, C=1, 2x2
    # squared (1, 4 / 0, 0): width-pooled rows (5, 0), height-pooled columns (1, 4), over sqrt(42)
    assert torch.allclose(pod_embedding(h), torch.tensor([[5.0, 0.0, 1.0, 4.0]]) / math.sqrt(42))
    # the paper's formula, unsquared: rows (3, 0), columns (1, 2), over sqrt(14)
    assert torch.allclose(pod_embedding(h, square=False), torch.tensor([[3.0, 0.0, 1.0, 2.0]]) / math.sqrt(14))
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1,0,1,0)/sqrt2
    b = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])  # (0,1,0,1)/sqrt2: distance sqrt(4 * 1/2)
    assert pod_spatial_loss([a], [b]).item() == pytest.approx(math.sqrt(2))
    # two stages: the mean (authors' code) or the sum (paper) of sqrt2 and 0
    assert pod_spatial_loss([a, a], [b, a]).item() == pytest.approx(math.sqrt(2) / 2)
    assert pod_spatial_loss([a, a], [b, a], reduce="sum").item() == pytest.approx(math.sqrt(2))
    assert pod_flat_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(1.0)


def test_pod_spatial_loss_is_zero_for_identical_models_and_grows_with_drift():
    torch.manual_seed(0)
    old = create_model(build_config(None, ["model.name=resnet20"]).model, 10).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = old.stages(x)
        assert pod_spatial_loss(ref, old.stages(x)).item() == 0.0
        direction = [torch.randn_like(p) for p in old.parameters()]
        losses = []
        for eps in (0.01, 0.05, 0.2):
            new = create_model(build_config(None, ["model.name=resnet20"]).model, 10).eval()
            new.load_state_dict(old.state_dict())
            for p, d in zip(new.parameters(), direction):
                p.add_(eps * d * p.abs().mean())
            losses.append(pod_spatial_loss(ref, new.stages(x)).item())
    assert 0 < losses[0] < losses[1] < losses[2]


def test_local_similarity_classifier_by_hand():
    head = LocalSimilarityHead(2, 2, proxies=2, scale=2.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -1.0]]))
    # h = (5, 0): class 0's proxies have cosines (1, 0), class 1's (-1, 0)
    # yhat_0 = (e*1 + 1*0)/(e + 1) = e/(e+1);  yhat_1 = (e^-1*(-1) + 1*0)/(e^-1 + 1) = -1/(1+e); times eta 2
    e = math.e
    assert torch.allclose(head(torch.tensor([[5.0, 0.0]])), torch.tensor([[2 * e / (e + 1), -2 / (1 + e)]]))


def test_nca_loss_with_margin_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    lse = math.log(math.e + 1)  # log(e^1 + e^0), the denominator of sample 1 (excludes its target)
    # sample 1: lse - (2 - 1) = lse - 1; sample 2: log(e^2 + e^1) - (0 - 1) = 1 + lse + 1
    assert nca_loss(z, y, margin=1.0).item() == pytest.approx(((lse - 1) + (lse + 2)) / 2, rel=1e-6)
    assert nca_loss(z[:1], y[:1], margin=0.5).item() == 0.0  # beyond the margin: hinged at 0


def test_podnet_settings_are_checked():
    with pytest.raises(ConfigError, match="'method_args.stage_reduce' is 'max', which is not one of: mean, sum"):
        build_config("podnet", ["method_args.stage_reduce=max"])
    with pytest.raises(ConfigError, match="'method_args.proxies' must be > 0"):
        build_config("podnet", ["method_args.proxies=0"])


# -- digits runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lucir", "podnet"])
def test_runs_a_b50_split_on_digits_with_balanced_finetuning(method, tmp_path):
    out = tmp_path / method
    m = experiment.run(build_config(method, B50 + FAST[method]), out, progress=False)
    assert m["status"] == "complete"
    assert m["classes_seen"] == [4, 6, 8, 10] and [len(t) for t in m["tasks"]] == [4, 2, 2, 2]
    heads = [load_checkpoint(out / "checkpoints" / f"task_{t:02d}.pt")["model"]["head.weight"]
             for t in (1, 2)]
    rows = 4 * (1 if method == "lucir" else 3)  # the first task's classes (times the proxies)
    # LUCIR holds the old rows fixed while the task trains; its balanced fine-tuning then moves them
    assert not torch.equal(heads[0][:rows], heads[1][:rows])
    # the report (t-SNE) rebuilds the method's network and the B50 class order from the run folder
    from cilab.checkpoint_figures import RunState
    from cilab.aggregate import load_run

    model, _ = RunState(load_run(out), "cpu", {}).load(2)
    assert type(model.head) is type(experiment.METHODS[method]().build_model(build_config(method).model, 10).head)


@pytest.mark.parametrize("method", ["lucir", "podnet"])
def test_b0_resume_after_an_interrupt_equals_the_uninterrupted_run(method, tmp_path, monkeypatch):
    """Also the B0 run of each method; LUCIR without balanced fine-tuning keeps its old rows bit for bit."""
    cfg = build_config(method, B0 + (FAST[method] if method == "podnet" else []))
    whole, resumed = interrupted_and_resumed(cfg, tmp_path, monkeypatch)
    assert whole["classes_seen"] == [2, 4, 6, 8, 10]
    for c in whole["classifiers"]:
        assert resumed[c]["accuracy_matrix"] == whole[c]["accuracy_matrix"], c
    final = [load_checkpoint(tmp_path / d / "checkpoints" / "task_05.pt")["model"] for d in ("whole", "cut")]
    for k, v in final[0].items():
        assert torch.equal(v, final[1][k]), k
    if method == "lucir":
        heads = [load_checkpoint(tmp_path / "whole" / "checkpoints" / f"task_{t:02d}.pt")["model"]
                 ["head.weight"] for t in range(1, 6)]
        for t in range(1, 5):
            assert torch.equal(heads[t][: 2 * t], heads[t - 1][: 2 * t]), t  # old rows bit for bit
            assert not torch.equal(heads[t][2 * t: 2 * t + 2], heads[t - 1][2 * t: 2 * t + 2])  # new rows trained


def test_presets_and_the_strong_baselines_group():
    from cilab.studyplan import load_groups

    for name in ("lucir", "podnet"):
        cfg = build_config(name)
        assert (cfg.method, cfg.memory.size, cfg.model.last_relu, cfg.train.lr) == (name, 2000, False, 0.1)
    runs = load_groups()["strong-baselines"]["runs"]
    got = {(r["preset"], r.get("tag")): (r["seeds"], r.get("overrides", [])) for r in runs}
    b50 = ["scenario.num_tasks=11", "scenario.first_task_classes=50"]
    for name in ("lucir", "podnet"):
        assert got[(name, None)] == ([0, 1, 2], [])
        assert got[(name, "b50")] == ([0, 1, 2], b50)


def test_podnet_margin_on_the_scaled_logit_or_as_the_paper_writes():
    from types import SimpleNamespace

    from cilab.methods.podnet import PODNet, PODNetArgs
    from cilab.models import Outputs

    z, y = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0])
    ctx = SimpleNamespace(n_seen=3, model=SimpleNamespace(head=SimpleNamespace(scale=torch.tensor(2.0))))
    out = Outputs(z, torch.zeros(1, 4))
    # the authors' code: log(e^1 + e^0) - (1 - 0.5) (without the margin it would be log(e + 1) - 1)
    code = PODNet(PODNetArgs(nca_margin=0.5)).loss(z, y, out, None, ctx).item()
    assert code == pytest.approx(math.log(math.e + 1) - 0.5, rel=1e-6)
    # the paper, eta (yhat_y - delta) with eta = 2: z_y - 2 x 0.5 = 0, loss log(e + 1)
    paper = PODNet(PODNetArgs(nca_margin=0.5, margin_scaled=True)).loss(z, y, out, None, ctx).item()
    assert paper == pytest.approx(math.log(math.e + 1), rel=1e-6)


@pytest.mark.parametrize("method", ["lucir", "podnet"])
def test_balanced_finetuning_trains_the_head_alone(method, tmp_path, monkeypatch):
    seen, real = [], experiment.train_task

    def spy(model, *a, **k):  # what takes a gradient in each loop the protocol runs
        seen.append((k.get("desc") or "", sorted(n for n, p in model.named_parameters() if p.requires_grad)))
        return real(model, *a, **k)

    monkeypatch.setattr(experiment, "train_task", spy)
    m = experiment.run(build_config(method, B50 + FAST[method] + ["scenario.num_tasks=3", "scenario.first_task_classes=8"]),
                       tmp_path / method, progress=False)
    assert m["status"] == "complete"
    stages = [names for desc, names in seen if "balanced" in desc]
    tasks = [names for desc, names in seen if "balanced" not in desc]
    assert len(stages) == 2 and len(tasks) == 3  # after tasks 2 and 3
    heads = {n for n in tasks[0] if n.startswith("head.")}
    assert heads and all(set(names) == heads for names in stages), stages  # no backward through the backbone
    # the task after a stage trains the whole network again: the freeze ends with its loop
    assert len(tasks[2]) > len(heads) and set(tasks[2]) == set(tasks[0])
