"""Typed configuration: dataclass defaults, YAML presets, ``key=value`` overrides.

Resolution order: dataclass defaults (the study's iCaRL settings) <- preset YAML
(which may ``extends:`` another preset) <- command-line overrides. Everything is
validated before any data is loaded or any training starts, and every error
names the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


from .errors import ConfigError, OlderRunError  # noqa: F401  (re-exported: cilab.config.ConfigError is public)
from .classifiers import CLASSIFIERS, FC_SCOPES
from .data.datasets import DATASETS
from .losses import CE_BCE_INPUTS, CLASSIFICATIONS, DISTILLATIONS, LOSS_PAIRS, UNSEEN_OUTPUTS
from .memory import EXEMPLAR_BUILDERS, SELECTIONS
from .methods import METHODS
from .models import MODELS, check_image_size, factory_options
from .registry import import_user_plugins
from .schema import from_dict
from .tracking import check_installed

# $CILAB_PLUGINS: a user's methods, backbones, ... from outside cilab, registered before any config
# is built, in every process (the command line, reproduce's workers, a script).
import_user_plugins()


SEED_LIMIT = 2**32  # scikit-learn's random_state (svm, mlp classifiers) takes seeds below 2**32


@dataclass
class DataConfig:
    name: str = "cifar100"  # cifar100 | cifar10 | digits | npz | imagefolder
    root: str = "~/.cache/cilab"  # where datasets are found or downloaded (and image-folder caches kept)
    path: str | None = None  # npz file with x_train, y_train, x_test, y_test; or the image folder (train/, val/)
    download: bool = True
    image_size: int = 32  # imagefolder: images are decoded once to image_size x image_size
    resize: str = "center-crop"  # imagefolder: center-crop (shorter side to image_size, centre cut) | squash
    cache: bool = True  # imagefolder: keep the decoded tensors in data.root, so the next run starts at once
    placement: str = "auto"  # auto (on the GPU when it fits, else pinned host memory) | device | host


@dataclass
class ScenarioConfig:
    num_tasks: int = 10  # tasks in all; classes split evenly in the seeded order
    # B50-style protocols: this many classes in the first task, the rest split
    # evenly over the other num_tasks - 1 tasks (null: all tasks the same size)
    first_task_classes: int | None = None


@dataclass
class ModelConfig:
    name: str = "resnet32"
    last_relu: bool = True  # false: no ReLU after the last block (LUCIR, PODNet: signed features for cosine heads)


@dataclass
class FirstTaskConfig:
    """The first task's own schedule (most papers train it longer); null = as the ``train`` section."""

    epochs: int | None = None
    lr: float | None = None
    milestones: list[int] | None = None


@dataclass
class TrainConfig:
    epochs: int = 70
    batch_size: int = 128
    lr: float = 2.0
    milestones: list[int] = field(default_factory=lambda: [49, 63])
    gamma: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1.0e-5
    augment: bool = True
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on cuda, off on cpu) | bf16 | off
    channels_last: str = "auto"  # auto (= on; faster on CUDA and CPU) | on | off
    compile: bool = False  # torch.compile the model
    cuda_graphs: str = "auto"  # auto (on CUDA; falls back to eager if capture fails) | on | off
    # cuDNN picks each convolution's algorithm by timing the candidates (torch.backends.cudnn.benchmark)
    cudnn_benchmark: str = "auto"  # auto (off for CUDA: slower over a whole run; a CPU is left alone) | on | off
    log_every: int = 4  # progress-bar loss reads per epoch (each is one host sync)
    # The study's fine-tuning holds out a fraction of each task's training data
    # and keeps the epoch with the best accuracy on it (0 = train on everything).
    val_split: float = 0.0
    keep_best: bool = False  # needs val_split > 0
    first_task: FirstTaskConfig = field(default_factory=FirstTaskConfig)
    deterministic: bool = False  # deterministic torch/cuDNN/cuBLAS algorithms: CUDA runs repeat bit for bit (determinism.py)


@dataclass
class LossConfig:
    # The pair classification-distillation is one of the study's (losses.LOSS_PAIRS):
    # bce-bce, ce-mse, bce-mse, mse-mse, ce-bce, or x-none without distillation.
    classification: str = "bce"  # bce | ce | mse
    distillation: str = "bce"  # bce | mse | none
    ce_bce_input: str = "softmax"  # ce-bce distillation fed softmax (the study) | logits (iCaRL's BCE)
    unseen_outputs: str = "train"  # train (the study: outputs of future classes trained to 0) | ignore


@dataclass
class DeepInversionConfig:
    init: str = "noise"  # noise | random | herding
    adaptive: bool = False
    iterations: int = 300
    lr: float = 0.05
    alpha_tv: float = 2.5e-5
    alpha_l2: float = 1.0e-8
    alpha_f: float = 5.0
    alpha_c: float = 10.0
    # The weights above are the study's text (5.2.1); its notebooks ran alpha_tv=2e-5, alpha_l2=3e-8,
    # alpha_f=1.0, alpha_c=10, which the icarl-di-* presets use (README, "DeepInversion").
    # the competition term's divergence: code (Yin et al.'s clamped code, the study's notebooks) | paper (eq. 10's JS)
    js: str = "code"
    jitter: int = 2  # each step rolls the images by up to this many pixels in y and x (Yin et al.); 0 = off
    batch_size: int = 667  # images synthesised at once (a chunk); fixed, so the images do not depend on the device


@dataclass
class MemoryConfig:
    size: int = 2000  # K, total exemplars; 0 = no exemplars
    selection: str = "herding"  # herding | random
    kind: str = "real"  # real | collage-resized | collage-random-crop | collage-center-crop | deepinversion
    deepinversion: DeepInversionConfig = field(default_factory=DeepInversionConfig)


@dataclass
class KNNConfig:
    k: int = 5


@dataclass
class SVMConfig:
    kernel: str = "rbf"
    C: float = 1.0


@dataclass
class MLPConfig:
    hidden: int = 100
    lr: float = 1.0e-3
    epochs: int = 200


@dataclass
class EvalConfig:
    classifiers: list[str] = field(default_factory=lambda: ["nme", "fc"])
    knn: KNNConfig = field(default_factory=KNNConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    batch_size: int = 1024  # feature extraction batch
    fc_scope: str = "all"  # fc's arg-max over: all (the study: every output) | seen (outputs of the classes seen)


@dataclass
class LogConfig:
    tensorboard: bool = False  # scalars into <run folder>/tensorboard (needs the 'tb' extra)
    wandb: bool = False  # the same scalars to Weights & Biases (needs the 'wandb' extra)
    wandb_project: str = "cilab"


@dataclass
class Config:
    method: str = "icarl"  # any registered method: finetune | joint | lwf | icarl | er | wa | ewc | ...
    method_args: dict[str, Any] = field(default_factory=dict)  # the method's own settings (its Args dataclass)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=5`` -> ("train.epochs", 5); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------
# presets


def preset_names() -> list[str]:
    files = resources.files("cilab") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml") and p.name != "groups.yaml")


def _read_preset_file(path: Path) -> str:
    """A preset file's text; ConfigError (one line) for a folder, a missing or unreadable file, non-UTF-8 bytes."""
    if path.is_dir():
        raise ConfigError(f"preset '{path}' is a folder; give a preset name ({', '.join(preset_names())}) "
                          "or a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"preset file '{path}' not found; give a preset name or an existing YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read preset '{path}': {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"preset '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None


def load_preset_dict(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset by name (``icarl``) or a YAML file path; ``extends:`` chains are followed."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"a preset must be named by a string, got {name_or_path!r}")
    path = Path(name_or_path)
    # A path: a YAML suffix, a folder separator, or an existing folder (refused as such below).
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path or path.is_dir():
        text = _read_preset_file(path)
    else:
        res = resources.files("cilab") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file() or name_or_path == "groups":
            close = difflib.get_close_matches(name_or_path, preset_names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown preset '{name_or_path}'.{hint} Available: {', '.join(preset_names())}; "
                "or pass a path to a YAML file."
            )
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset '{name_or_path}' is not valid YAML{yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name_or_path}' must be a YAML mapping of config keys")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"preset '{name_or_path}': 'extends' must be one preset name or YAML path, "
                          f"got {type(parent).__name__} {parent!r}")
    if parent:
        if parent in _seen:
            raise ConfigError(f"preset '{name_or_path}' extends itself through {' -> '.join(_seen)}")
        try:
            inherited = load_preset_dict(parent, _seen + (name_or_path,))
        except ConfigError as e:  # name the file the mistake is in
            raise ConfigError(f"preset '{name_or_path}' extends '{parent}': {e}") from None
        data = deep_merge(inherited, data)
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what a YAML parse error is, on one line: ' at line L, column C: problem'
    (str(e) quotes the offending text over several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(e, 'problem', None) or type(e).__name__}"


def build_config(preset: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- preset <- overrides, validated."""
    own = data = load_preset_dict(preset) if preset else {}
    extra = {}
    if isinstance(overrides, str):  # else each character is taken for an override
        raise ConfigError(f"overrides must be a list of 'key=value' strings (or a mapping), got the string "
                          f"{overrides!r}; pass [{overrides!r}]")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else overrides_to_dict(list(overrides))
        data = deep_merge(data, extra)
    try:
        cfg = from_dict(Config, data)
    except ConfigError as e:
        if preset and _fails_alone(own, e):  # a misspelt key or a wrong type in the preset file: say which file
            raise ConfigError(f"preset '{preset}': {e}") from None
        raise
    _refuse_unread_loss_settings(cfg, extra.get("loss"))  # first: the loss pair's own checks do not apply
    validate(cfg)
    return cfg


def _fails_alone(preset_data: dict, error: ConfigError) -> bool:
    """Whether the preset's own mapping fails as the merged one did (the mistake is the file's,
    not an override's; an override may also mend a bad value of the file)."""
    try:
        from_dict(Config, preset_data)
    except ConfigError as alone:
        return str(alone) == str(error)
    return False


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


# -- run folders written by an older cilab --------------------------------------------------
# A run folder's config.yaml holds every key (to_dict; method_args completed by validate), so a
# key it lacks was added to cilab after the run was written. Where the run computed what one
# value of the new key computes, it is read with that value (a method's own keys:
# Method.absent_means), not the new default. Where no value does, the folder is refused: its
# metrics.json still says what it computed, but it is not a run this cilab can resume, copy or
# evaluate again. Evidence of such a folder: (test on the saved mapping, the evidence in words,
# the key that gives it away).
# What such a folder still gives is its network and its exemplars, which the figures drawn from
# its checkpoints (t-SNE, exemplar grids) read. ``network_only`` reads it with that key at this
# cilab's default: the key is about evaluation or synthesis, which no figure does again.
_OLDER_THAN_EVERY_SETTING = (
    # before ead4b93: NME's class means without the flipped exemplars, the fc's arg-max over
    # the seen classes, features in the autocast dtype
    (lambda d: isinstance(d.get("eval"), dict) and "fc_scope" not in d["eval"], "it has no eval.fc_scope",
     ("eval", "fc_scope")),
    # before 0f89dea: DeepInversion's objective otherwise, and (older still) the loss pairs' scales
    (lambda d: isinstance(d.get("memory"), dict) and isinstance(d["memory"].get("deepinversion"), dict)
     and d["memory"]["deepinversion"].get("batch_size") == 0, "memory.deepinversion.batch_size is 0",
     ("memory", "deepinversion", "batch_size")),
)


def saved_config(data: dict[str, Any], *, network_only: bool = False) -> Config:
    """A run folder's saved config (its config.yaml as a mapping) -> the config the run computed
    with; OlderRunError for one that no setting of this cilab reproduces (see above),
    ConfigError for an invalid one.

    ``network_only``: for what reads only the run's network, exemplars and data (the figures
    drawn from its checkpoints): such a folder is read too, the key that gives it away at this
    cilab's default; evaluating or synthesising by that config would not compute what it did."""
    data = copy.deepcopy(data)
    for written_before, evidence, key in _OLDER_THAN_EVERY_SETTING:
        if not written_before(data):
            continue
        if not network_only:
            raise OlderRunError(
                f"an older cilab wrote it ({evidence}), one that computed NME, the fc classifier, the loss "
                "pairs or DeepInversion otherwise; no setting of this one reproduces its numbers (its "
                "metrics.json still reports them), so it cannot be resumed, copied or evaluated again")
        *parents, last = key
        holder = data
        for name in parents:
            holder = holder[name]
        holder.pop(last, None)  # absent: the default fills it
    method = METHODS[data["method"]] if data.get("method") in METHODS else None
    if method is not None and method.absent_means and isinstance(data.get("method_args", {}), dict):
        data["method_args"] = {**method.absent_means, **data.get("method_args", {})}
    return config_from_dict(data)


# ---------------------------------------------------------------------------
# validation: everything that can be checked without loading data


def _choice(key: str, value: str, allowed) -> None:
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'{key}' is '{value}', which is not one of: {', '.join(allowed)}.{hint}")


def _positive(key: str, value, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"'{key}' must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _check_milestones(section: str, epochs: int, milestones: list[int]) -> None:
    for m in milestones:
        if 0 < m < epochs:
            continue
        if epochs < 2:
            raise ConfigError(f"'{section}.milestones' has {m}, but {section}.epochs={epochs} leaves no epoch to "
                              f"lower the learning rate after; pass {section}.milestones=[]")
        # the study's first milestone sits at 70% of the epochs (49 of 70): one that fits these epochs
        fits = min(epochs - 1, max(1, round(0.7 * epochs)))
        raise ConfigError(f"'{section}.milestones' has {m}, outside 1..{epochs - 1} ({section}.epochs={epochs}); "
                          f"lower the milestones, e.g. {section}.milestones=[] or {section}.milestones=[{fits}]")
    if any(a >= b for a, b in zip(milestones, milestones[1:])):  # a repeat lowers the lr twice at that epoch
        raise ConfigError(f"'{section}.milestones' must be strictly increasing, got {milestones}")


def task_train_config(train_cfg: TrainConfig, t: int) -> TrainConfig:
    """The ``train`` section as it applies to task ``t``: the first task's own schedule resolved."""
    ft = train_cfg.first_task
    if t > 0 or (ft.epochs is None and ft.lr is None and ft.milestones is None):
        return train_cfg
    return dataclasses.replace(
        train_cfg,
        epochs=train_cfg.epochs if ft.epochs is None else ft.epochs,
        lr=train_cfg.lr if ft.lr is None else ft.lr,
        milestones=list(train_cfg.milestones if ft.milestones is None else ft.milestones),
    )
def _check_image_data(cfg: Config) -> None:
    """The image-folder keys, and whether the backbone can take the image size."""
    d = cfg.data
    _choice("data.resize", d.resize, ["center-crop", "squash"])
    _choice("data.placement", d.placement, ["auto", "device", "host"])
    if d.name == "imagefolder" and not d.path:
        raise ConfigError("data.name=imagefolder needs data.path=DIR, the folder that holds train/<class>/ and val/<class>/")
    if d.name != "imagefolder" and d.image_size != 32:
        raise ConfigError(f"data.image_size={d.image_size} only applies to data.name=imagefolder; "
                          f"{d.name} images are 32x32: leave data.image_size at 32")
    _positive("data.image_size", d.image_size)
    problem = check_image_size(cfg.model.name, d.image_size)
    if problem:
        raise ConfigError(f"model.name={cfg.model.name} cannot take data.image_size={d.image_size}: {problem}")
    if not cfg.model.last_relu and "last_relu" not in factory_options(cfg.model.name):
        # LUCIR's and PODNet's presets drop the last ReLU; a user's factory without the option cannot
        raise ConfigError(f"model.last_relu=false, but model.name={cfg.model.name}'s factory takes no last_relu; "
                          "give it a last_relu argument, or pass model.last_relu=true")
    if cfg.memory.kind == "deepinversion" and d.image_size != 32:
        raise ConfigError(f"memory.kind=deepinversion synthesises 32x32 images, but data.image_size={d.image_size}; "
                          "use data.image_size=32 or another memory.kind")

    check_installed(cfg.log)


def validate(cfg: Config) -> None:

    _choice("method", cfg.method, METHODS)
    # Normalised to the method's full settings, so config.yaml shows every value used.
    cfg.method_args = dataclasses.asdict(METHODS[cfg.method].parse_args(cfg.method_args))
    _choice("data.name", cfg.data.name, DATASETS)
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError("data.name=npz needs data.path=/path/to/file.npz (arrays x_train, y_train, x_test, y_test)")
    _choice("model.name", cfg.model.name, MODELS)
    _check_image_data(cfg)
    _positive("scenario.num_tasks", cfg.scenario.num_tasks)
    if cfg.scenario.first_task_classes is not None:
        _positive("scenario.first_task_classes", cfg.scenario.first_task_classes)
        if cfg.scenario.num_tasks < 2:
            raise ConfigError("scenario.first_task_classes needs scenario.num_tasks >= 2 (the first task and the rest)")
    _positive("seed", cfg.seed, zero_ok=True)
    if cfg.seed >= SEED_LIMIT:
        raise ConfigError(f"'seed' is {cfg.seed}; it must be below 2**32 = {SEED_LIMIT} (scikit-learn's limit)")

    t = cfg.train
    _positive("train.epochs", t.epochs)
    _positive("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr)
    _positive("train.gamma", t.gamma)
    _positive("train.momentum", t.momentum, zero_ok=True)
    _positive("train.weight_decay", t.weight_decay, zero_ok=True)
    _positive("train.log_every", t.log_every)
    _check_milestones("train", t.epochs, t.milestones)
    ft = t.first_task
    if ft.epochs is not None:
        _positive("train.first_task.epochs", ft.epochs)
    if ft.lr is not None:
        _positive("train.first_task.lr", ft.lr)
    if ft.epochs is not None or ft.milestones is not None:
        epochs = t.epochs if ft.epochs is None else ft.epochs
        _check_milestones("train.first_task", epochs, t.milestones if ft.milestones is None else ft.milestones)
    if not 0.0 <= t.val_split < 1.0:
        raise ConfigError(f"'train.val_split' must be in [0, 1) (the study's fine-tuning uses 0.1), got {t.val_split}")
    if t.keep_best and t.val_split == 0:
        raise ConfigError("train.keep_best=true needs a validation split: set train.val_split (e.g. 0.1)")
    _choice("train.device", t.device, ["auto", "cpu", "cuda"])
    _choice("train.amp", t.amp, ["auto", "bf16", "off"])
    _choice("train.channels_last", t.channels_last, ["auto", "on", "off"])
    _choice("train.cuda_graphs", t.cuda_graphs, ["auto", "on", "off"])
    _choice("train.cudnn_benchmark", t.cudnn_benchmark, ["auto", "on", "off"])
    if t.deterministic and t.cudnn_benchmark == "on":
        raise ConfigError("train.cudnn_benchmark=on picks convolution algorithms by timing, so runs can differ, "
                          "and train.deterministic=true forbids that; set one of them off")

    loss = cfg.loss
    _choice("loss.classification", loss.classification, CLASSIFICATIONS)
    _choice("loss.distillation", loss.distillation, DISTILLATIONS)
    pair = f"{loss.classification}-{loss.distillation}"
    if pair not in LOSS_PAIRS:
        raise ConfigError(
            f"loss.classification={loss.classification} with loss.distillation={loss.distillation}: '{pair}' is not "
            f"one of the study's pairs ({', '.join(LOSS_PAIRS)}); pick one of those"
        )
    _choice("loss.ce_bce_input", loss.ce_bce_input, CE_BCE_INPUTS)
    if loss.ce_bce_input != "softmax" and pair != "ce-bce":
        raise ConfigError(
            f"loss.ce_bce_input={loss.ce_bce_input} only applies to the ce-bce pair, not {pair}; "
            "drop it, or set loss.classification=ce loss.distillation=bce"
        )
    _choice("loss.unseen_outputs", loss.unseen_outputs, UNSEEN_OUTPUTS)

    mem = cfg.memory
    _positive("memory.size", mem.size, zero_ok=True)
    _choice("memory.selection", mem.selection, SELECTIONS)
    _choice("memory.kind", mem.kind, EXEMPLAR_BUILDERS)
    di = mem.deepinversion
    _choice("memory.deepinversion.init", di.init, ["noise", "random", "herding"])
    _choice("memory.deepinversion.js", di.js, ["code", "paper"])
    _positive("memory.deepinversion.iterations", di.iterations)
    _positive("memory.deepinversion.lr", di.lr)
    for k in ("alpha_tv", "alpha_l2", "alpha_f", "alpha_c"):
        _positive(f"memory.deepinversion.{k}", getattr(di, k), zero_ok=True)
    _positive("memory.deepinversion.jitter", di.jitter, zero_ok=True)
    if di.batch_size <= 0:
        raise ConfigError(
            f"'memory.deepinversion.batch_size' must be > 0 (images per chunk), got {di.batch_size}; "
            "chunks are no longer sized to free device memory: set e.g. memory.deepinversion.batch_size=667"
        )

    ev = cfg.eval
    if not ev.classifiers:
        raise ConfigError("'eval.classifiers' is empty; choose any of: " + ", ".join(CLASSIFIERS))
    for i, c in enumerate(ev.classifiers):
        _choice(f"eval.classifiers[{i}]", c, CLASSIFIERS)
    if len(set(ev.classifiers)) != len(ev.classifiers):
        raise ConfigError(f"'eval.classifiers' lists a classifier twice: {ev.classifiers}")
    _positive("eval.knn.k", ev.knn.k)
    _positive("eval.svm.C", ev.svm.C)
    _choice("eval.svm.kernel", ev.svm.kernel, ["rbf", "linear", "poly", "sigmoid"])
    _positive("eval.mlp.hidden", ev.mlp.hidden)
    _positive("eval.mlp.lr", ev.mlp.lr)
    _positive("eval.mlp.epochs", ev.mlp.epochs)
    _positive("eval.batch_size", ev.batch_size)
    _choice("eval.fc_scope", ev.fc_scope, FC_SCOPES)

    # Combinations: the method decides which parts of the config make sense.
    METHODS[cfg.method].check(cfg)
    needs_memory = [c for c in ev.classifiers if CLASSIFIERS[c].needs_memory]
    if needs_memory and mem.size == 0:
        raise ConfigError(
            f"classifiers {needs_memory} are fitted on exemplars but memory.size=0; "
            "use eval.classifiers=[fc] or a method with memory (icarl)"
        )


def _refuse_unread_loss_settings(cfg: Config, asked: dict | None) -> None:
    """A ``loss.*`` override for a method whose loss is its own would change nothing: say so.

    Only what the caller asked for is refused; a preset's own ``loss`` section
    (inherited from the preset it extends) is left as it is, unused.
    """
    if asked and cfg.method in METHODS and METHODS[cfg.method].own_loss:  # a bad name: validate says so
        keys = ", ".join(f"loss.{k}" for k in asked) if isinstance(asked, dict) else "loss"
        raise ConfigError(f"method {cfg.method} has a loss of its own and does not read the loss section; "
                          f"drop {keys} (its own settings are under method_args)")
