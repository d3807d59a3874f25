import pytest

from cilab.config import ConfigError, build_config, preset_names


def test_presets_carry_the_study_settings():
    for name in ("finetune", "joint", "lwf", "icarl"):
        assert name in preset_names()
    cfg = build_config("finetune")
    assert cfg.data.name == "cifar100" and cfg.scenario.num_tasks == 10 and cfg.model.name == "resnet32"
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.milestones, t.gamma, t.momentum, t.weight_decay) == (
        70, 128, 2.0, [49, 63], 0.2, 0.9, 1e-5)
    assert cfg.loss.classification == "bce" and cfg.memory.size == 0
    assert build_config("joint").method == "joint"
    icarl = build_config("icarl")
    assert icarl.memory.size == 2000 and icarl.memory.selection == "herding" and icarl.eval.classifiers == ["nme", "fc"]
    assert build_config("icarl-noaug").train.augment is False
    assert build_config("icarl-random").memory.selection == "random"


def test_overrides_are_typed():
    cfg = build_config("icarl", ["seed=3", "train.epochs=5", "train.milestones=[2,4]", "train.lr=1",
                                 "eval.classifiers=nme", "data.name=digits"])
    assert cfg.seed == 3 and cfg.train.epochs == 5 and cfg.train.milestones == [2, 4]
    assert isinstance(cfg.train.lr, float) and cfg.eval.classifiers == ["nme"]
    assert build_config("icarl", ["train.weight_decay=1e-4"]).train.weight_decay == 1e-4  # YAML reads "1e-4" as text


@pytest.mark.parametrize("override, message", [
    ("train.epoch=5", "Did you mean 'train.epochs'"),
    ("trian.epochs=5", "Did you mean 'train.epochs'"),
    ("train.epochs=five", "must be an integer"),
    ("train.augment=maybe", "must be true or false"),
    ("train.milestones=[80]", "outside 1..69"),
    ("memory.size=-1", "'memory.size' must be >= 0"),
    ("method=icarll", "Did you mean 'icarl'"),
    ("loss.classification=hinge", "not one of: bce, ce, mse"),
    ("loss.distillation=kl", "not one of: bce, mse, none"),
    ("memory.kind=gan", "'memory.kind'"),
    ("eval.classifiers=[nme,rf]", "eval.classifiers[1]"),
    ("train.device=tpu", "auto, cpu, cuda"),
    ("memory.size=0", "needs exemplars"),
    ("data=digits", "is a section"),
    ("nonsense", "key=value"),
])
def test_bad_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        build_config("icarl", [override])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="does not distill"):
        build_config("finetune", ["loss.distillation=bce"])
    with pytest.raises(ConfigError, match="keeps no exemplars"):
        build_config("lwf", ["memory.size=2000"])
    with pytest.raises(ConfigError, match="fitted on exemplars"):
        build_config("lwf", ["eval.classifiers=[nme]"])
    with pytest.raises(ConfigError, match="unknown preset 'icarl-hybrid'"):
        build_config("icarl-hybrid")
