import pytest

from cilab.config import Config, ConfigError, build_config, config_from_dict, preset_names


def flat(cfg) -> dict:
    """A config as {dotted key: value}."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v
    walk(cfg.to_dict(), "")
    return out


def differences(a, b) -> dict:
    fa, fb = flat(a), flat(b)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


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


def test_the_dataclass_defaults_are_the_icarl_preset():
    # config.py promises the defaults are the study's iCaRL settings: a preset or a default drifting apart is a bug
    assert differences(Config(), build_config("icarl")) == {}
    assert differences(build_config(), build_config("icarl")) == {}


@pytest.mark.parametrize("preset, changed", [
    ("icarl-hybrid1", {"eval.classifiers": (["nme", "fc"], ["fc"])}),
    ("icarl-noaug", {"train.augment": (True, False)}),
    ("icarl-random", {"memory.selection": ("herding", "random")}),
])
def test_a_preset_that_extends_icarl_changes_only_what_it_says(preset, changed):
    # a merge that replaced a whole section (eval: {classifiers: [fc]} dropping eval.knn, ...) would show here
    assert differences(build_config("icarl"), build_config(preset)) == changed


@pytest.mark.parametrize("preset, cls, dist", [
    ("icarl-ce-mse", "ce", "mse"), ("icarl-bce-mse", "bce", "mse"), ("icarl-mse-mse", "mse", "mse"),
    ("icarl-ce-bce", "ce", "bce"),
])
def test_loss_pair_presets_change_only_the_loss(preset, cls, dist):
    d = differences(build_config("icarl"), build_config(preset))
    assert all(k.startswith("loss.") for k in d), d
    cfg = build_config(preset)
    assert (cfg.loss.classification, cfg.loss.distillation) == (cls, dist)


def test_an_override_changes_one_key_and_keeps_its_siblings():
    base = build_config("icarl")
    assert differences(base, build_config("icarl", ["train.lr=0.5"])) == {"train.lr": (2.0, 0.5)}
    assert differences(base, build_config("icarl", ["eval.knn.k=3"])) == {"eval.knn.k": (5, 3)}
    # the later of two overrides of one key wins
    assert build_config("icarl", ["train.lr=0.5", "train.lr=0.25"]).train.lr == 0.25


def test_every_study_preset_takes_the_fc_argmax_over_all_outputs_as_the_study():
    for name in preset_names():
        assert build_config(name).eval.fc_scope == "all", name
    assert build_config("icarl", ["eval.fc_scope=seen"]).eval.fc_scope == "seen"
    with pytest.raises(ConfigError, match="'eval.fc_scope' is 'new', which is not one of: all, seen"):
        build_config("icarl", ["eval.fc_scope=new"])


def test_a_saved_config_loads_back_to_the_same_config_and_refuses_a_bad_one():
    cfg = build_config("icarl", ["train.lr=0.5", "eval.fc_scope=seen", "seed=4"])
    assert differences(config_from_dict(cfg.to_dict()), cfg) == {}
    d = cfg.to_dict()
    d["train"]["lr"] = -1
    with pytest.raises(ConfigError, match="'train.lr' must be > 0"):
        config_from_dict(d)


def _saved(tmp_path, name: str, data: dict):
    import yaml

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    return folder


@pytest.mark.parametrize("preset, key, before, now", [
    ("derpp", "store_logits", "eval", "train"),  # eval-mode logits until d2e94f8
    ("ewc", "normalize_fisher", False, True),  # the raw Fisher until fec3475
    ("ewc", "fisher_estimator", "batch", "per_sample"),  # the Fisher from mini-batch gradients until then
])
def test_a_saved_config_without_a_key_added_since_is_read_as_the_run_computed_it(tmp_path, preset, key, before, now):
    """config.yaml holds every key, so one it lacks was added to cilab after the run: the run
    computed what the key's old value computes, not its new default (a resume would change method
    in mid-run, reproduce would take it for a run of today's preset)."""
    from cilab import runfolder

    cfg = build_config(preset)
    assert cfg.method_args[key] == now
    data = cfg.to_dict()
    del data["method_args"][key]
    folder = _saved(tmp_path, preset, data)
    assert runfolder.read_config(folder).method_args[key] == before
    conflict = runfolder.config_conflict(folder, cfg)
    assert str(conflict) == f"its config differs (method_args.{key}: {before!r} saved, {now!r} now)"
    assert conflict.differs  # readable and another: the same preset and overrides would resume it
    assert runfolder.config_conflict(folder, build_config(preset, [f"method_args.{key}={before}"])) is None
    # a key the saved config has is its own value, whatever the old default
    data["method_args"][key] = now
    assert runfolder.read_config(_saved(tmp_path, preset + "-new", data)).method_args[key] == now


@pytest.mark.parametrize("change", ["no fc_scope", "di batch 0"])
def test_a_saved_config_that_no_setting_reproduces_is_refused_naming_why(tmp_path, change):
    """Written before NME took flipped exemplars (no eval.fc_scope) or before DeepInversion's
    fixed chunks (memory.deepinversion.batch_size=0): not a run this cilab can resume or evaluate."""
    from cilab import reevaluate, runfolder

    cfg = build_config("icarl")
    data = cfg.to_dict()
    if change == "no fc_scope":
        del data["eval"]["fc_scope"]
        evidence = "it has no eval.fc_scope"
    else:
        data["memory"]["deepinversion"]["batch_size"] = 0
        evidence = "memory.deepinversion.batch_size is 0"
    folder = _saved(tmp_path, "old", data)
    conflict = runfolder.config_conflict(folder, cfg)
    assert not conflict.differs  # only --overwrite resolves it
    problem = str(conflict)
    assert problem.startswith(f"an older cilab wrote it ({evidence}), one that computed")
    assert "no setting of this one reproduces its numbers" in problem
    with pytest.raises(ConfigError, match=f"^cannot evaluate from {folder}: an older cilab wrote it"):
        reevaluate.source_config(folder)
    runfolder.write_marker(folder)
    with pytest.raises(runfolder.RunFolderError, match=r"cannot resume .*an older cilab wrote it .* evaluated again; "
                                                        r"start it again with --overwrite, or choose another --out$"):
        runfolder.check(folder, cfg, True, False)


def test_absent_means_must_name_settings_of_the_method():
    from cilab.methods.base import Method, register

    with pytest.raises(TypeError, match=r"method bad-absent: absent_means names \['nope'\], not settings of its Args"):
        @register("bad-absent")
        class Bad(Method):
            absent_means = {"nope": 1}


def test_an_older_folders_config_read_for_its_network_keeps_its_own_settings():
    """network_only sets the key that gives the folder away to today's default, nothing else: the run's
    own eval.batch_size (read by the figures' feature passes) and a run without exemplars stay readable."""
    from cilab.config import DeepInversionConfig, saved_config

    data = build_config("finetune").to_dict()
    del data["eval"]["fc_scope"]
    data["eval"]["batch_size"] = 77
    cfg = saved_config(data, network_only=True)
    assert cfg.eval.batch_size == 77 and cfg.memory.size == 0 and cfg.eval.classifiers == ["fc"]
    di = build_config("icarl-di-noise", ["memory.deepinversion.iterations=11"]).to_dict()
    di["memory"]["deepinversion"]["batch_size"] = 0
    cfg = saved_config(di, network_only=True)
    assert cfg.memory.deepinversion.iterations == 11 and cfg.memory.deepinversion.alpha_f == 1.0
    assert cfg.memory.deepinversion.batch_size == DeepInversionConfig().batch_size


def test_repeated_milestones_and_a_string_of_overrides_are_refused_in_one_line():
    # [1, 1] passed as increasing, and the scheduler lowered the learning rate twice at epoch 1
    with pytest.raises(ConfigError, match=r"'train.milestones' must be strictly increasing, got \[1, 1\]"):
        build_config("icarl", ["train.epochs=3", "train.milestones=[1,1]"])
    # a string, not a list: its characters were read as overrides ("override 't' is not of the form key=value")
    with pytest.raises(ConfigError, match=r"overrides must be a list of 'key=value' strings \(or a mapping\), got "
                                          r"the string 'train.epochs=3'; pass \['train.epochs=3'\]"):
        build_config("icarl", "train.epochs=3")


def test_a_groups_file_that_is_not_yaml_is_refused_in_one_line_like_a_preset(tmp_path):
    from cilab.studyplan import load_groups

    bad = tmp_path / "groups.yaml"
    bad.write_text("mine:\n  runs: [{preset: icarl\n")
    with pytest.raises(ConfigError) as e:
        load_groups(bad)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{bad} is not valid YAML at line 3, column 1: ")
