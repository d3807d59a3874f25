"""THE training loop. Every method goes through it; methods differ in the data
that goes in and the loss terms (``losses.Criterion``), never in the loop.

iCaRL's schedule (the study, section 2.4): SGD, batch 128, lr 2.0 multiplied
by 0.2 at epochs 49 and 63, 70 epochs, a fresh optimiser for every task.
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .losses import Criterion


class NonFiniteLossError(RuntimeError):
    def __init__(self, task: int, epoch: int, lr: float, value: float):
        super().__init__(
            f"the loss became {value} in task {task + 1}, epoch {epoch + 1} at learning rate {lr:g}; "
            "completed tasks are saved. Lower train.lr or check the data, then rerun."
        )
        self.task, self.epoch, self.lr = task, epoch, lr


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``amp`` is bf16 (``train.amp``, resolved), else nothing."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_task(model: torch.nn.Module, loader, cfg, criterion: Criterion, old_model: torch.nn.Module | None,
               task: int, device: torch.device, amp: str = "off", progress: bool = True, position: int = 0) -> int:
    """Train ``model`` in place on ``loader`` for ``cfg.epochs`` (``cfg`` is the ``train`` section).

    The running loss stays on the device; it is read (one host sync) only
    ``cfg.log_every`` times per epoch for the progress bar and the finiteness
    check. Returns the number of images trained on.
    """
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    step = make_step(model, opt, criterion, old_model, autocast_for(device, amp))
    n_batches = len(loader)
    read_at = {max(1, round(n_batches * (k + 1) / cfg.log_every)) for k in range(cfg.log_every)}
    bar = tqdm(total=cfg.epochs * n_batches, desc=f"task {task + 1}", unit="batch", leave=False,
               disable=not progress, position=position, dynamic_ncols=True)
    images = 0
    model.train()
    try:
        for epoch in range(cfg.epochs):
            loss_sum = torch.zeros((), device=device)
            seen, last_read = 0, 0
            for i, (x, y) in enumerate(loader, 1):
                loss_sum += step(x, y).detach() * len(y)
                seen += len(y)
                if i in read_at:
                    value = (loss_sum / seen).item()  # the only host sync: a few per epoch
                    if not math.isfinite(value):
                        raise NonFiniteLossError(task, epoch, opt.param_groups[0]["lr"], value)
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{value:.4f}", refresh=False)
                    bar.update(i - last_read)
                    last_read = i
            images += seen
            sched.step()
    finally:
        bar.close()
    return images


def make_step(model, opt, criterion: Criterion, old_model, autocast):
    """One SGD step on a batch; returns the loss tensor (not synchronised)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            z = model(x)
            if criterion.distills:
                with torch.no_grad():
                    z_old = old_model(x)
            else:
                z_old = None
        loss = criterion(z, y, z_old)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step
