"""What a run's ``train`` section resolves to on this machine (:class:`Runtime`): the device,
bf16 autocast, channels_last, CUDA graphs, deterministic algorithms and cuDNN autotuning.

Resolved once per run, before any data is loaded: what the machine cannot do
(``train.device=cuda`` without a GPU, ``train.cuda_graphs=on`` without CUDA) is
refused here with a ConfigError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import ConfigError


def resolve_device(train_cfg) -> torch.device:
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu or auto")
    if train_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train_cfg.device)


def resolve_amp(train_cfg, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "off") if train_cfg.amp == "auto" else train_cfg.amp


def resolve_channels_last(train_cfg, device: torch.device) -> bool:
    # auto = on everywhere: NHWC convolutions were faster on CUDA (tensor cores)
    # and on the 2-core CPU too (384 vs 260 img/s for the bare ResNet-32 step).
    return train_cfg.channels_last in ("auto", "on")


def resolve_cuda_graphs(train_cfg, device: torch.device) -> str:
    """``train.cuda_graphs`` for ``device``: "off", "on" (capture failure is an
    error) or "try" (auto on CUDA: capture, fall back to eager steps if it fails)."""
    if train_cfg.cuda_graphs == "on" and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs=on needs a CUDA device, and this run trains on {device.type}; "
                          "use train.cuda_graphs=auto (on where CUDA is) or off")
    if train_cfg.cuda_graphs == "auto":
        return "try" if device.type == "cuda" else "off"
    return train_cfg.cuda_graphs


def resolve_cudnn_benchmark(train_cfg, device: torch.device) -> bool | None:
    """``train.cudnn_benchmark``: True/False to set for the run, None to leave torch's setting.

    auto = off for CUDA runs. Timing cuDNN's algorithms made a fixed-shape ResNet-32
    step 16% faster on an H200 (trainer 33.1k -> 38.4k img/s), but a whole run meets
    many shapes (each task's last batch, every evaluation and exemplar pass) and times
    each once: iCaRL 10 x 30 on an H100 took 93.9 s with it and 81.2 s without
    (README, Speed). On a CPU it does nothing, so auto leaves torch's setting there.
    """
    if train_cfg.cudnn_benchmark == "auto":
        return False if device.type == "cuda" else None
    return train_cfg.cudnn_benchmark == "on"


@dataclass(frozen=True)
class Runtime:
    """What the ``train`` section resolves to on this machine, resolved once per run."""

    device: torch.device
    amp: str  # "bf16" | "off"
    channels_last: bool
    graphs: str  # "off" | "on" | "try", see resolve_cuda_graphs
    deterministic: bool = False  # train.deterministic
    cudnn_benchmark: bool | None = None  # train.cudnn_benchmark; None = torch's setting left as it is

    @classmethod
    def resolve(cls, train_cfg) -> "Runtime":
        """Refuses (ConfigError) what this machine cannot do: cuda without a GPU, cuda_graphs=on without CUDA."""
        device = resolve_device(train_cfg)
        return cls(device, resolve_amp(train_cfg, device), resolve_channels_last(train_cfg, device),
                   resolve_cuda_graphs(train_cfg, device), train_cfg.deterministic,
                   resolve_cudnn_benchmark(train_cfg, device))

    @contextlib.contextmanager
    def applied(self):
        """torch's process-wide settings for the run (train.deterministic, train.cudnn_benchmark),
        put back when it ends, however it ends."""
        from .determinism import cudnn_benchmark, deterministic_algorithms

        with cudnn_benchmark(self.cudnn_benchmark), deterministic_algorithms(self.deterministic):
            yield

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format
