"""THE training loop. Every method goes through it; methods differ in the data
that goes in, the parameters it updates and the loss (``methods.Method``), never in the loop.

iCaRL's schedule (the study, section 2.4): SGD, batch 128, lr 2.0 multiplied
by 0.2 at epochs 49 and 63, 70 epochs, a fresh optimiser for every task.

On CUDA the step (forward, loss, backward, SGD update) is captured as a CUDA
graph and replayed for every batch (``train.cuda_graphs``, ``GraphedStep``): a
ResNet-32 step on a batch of 128 is some thousand small kernels, whose launches
cost more than their arithmetic on a large GPU; one replay launches them all.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from typing import Callable

import torch
from tqdm.auto import tqdm

from .losses import Criterion

# loss(x, y, out, old_out, *per_sample) -> scalar tensor; out / old_out are ``methods.Outputs`` (logits,
# features); per_sample: the batch's rows of the extra per-image tensors the training data came with, if any
LossFn = Callable[[torch.Tensor, torch.Tensor, tuple, "tuple | None"], torch.Tensor]


def logits_loss(criterion: Criterion) -> LossFn:
    """A ``Criterion`` (a function of logits) as a loss of the step's outputs."""

    def loss(x, y, out, old):
        return criterion(out[0], y, None if old is None else old[0])

    return loss


class NonFiniteLossError(RuntimeError):
    def __init__(self, task: int, epoch: int, lr: float, value: float):
        super().__init__(
            f"the loss became {value} in task {task + 1}, epoch {epoch + 1} at learning rate {lr:g}; "
            "completed tasks are saved. Lower train.lr or check the data, then rerun."
        )
        self.task, self.epoch, self.lr = task, epoch, lr


class GraphCaptureError(RuntimeError):
    pass


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``amp`` is bf16 (``train.amp``, resolved), else nothing.

    The weight-cast cache is off: it cannot be used inside a CUDA-graph capture
    (PyTorch's CUDA-graph notes), and it saves nothing here, since every weight
    is used once per forward pass.
    """
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, cfg, params=None):
    """SGD + MultiStepLR from the ``train`` section over ``params`` (default: all of the model's)."""
    params = model.parameters() if params is None else params
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return opt, sched


def train_task(model: torch.nn.Module, loader, cfg, loss: "Criterion | LossFn", old_model: torch.nn.Module | None,
               task: int, device: torch.device, amp: str = "off", progress: bool = True, position: int = 0,
               graphs: str = "off", capture: "GraphBackend | None" = None, params=None,
               after_step: Callable[[], None] | None = None, epoch_end: Callable[[int], None] | None = None,
               desc: str | None = None, on_log: Callable[[int, float], None] | None = None) -> int:
    """Train ``model`` in place on ``loader`` for ``cfg.epochs`` (``cfg`` is the ``train`` section).

    ``loss`` is a ``Criterion`` (logits only) or a ``LossFn`` of the step's
    outputs; ``old_model``, when given, runs on every batch without gradient
    and its outputs go to the loss. ``params`` (default: all) are what SGD
    updates. ``after_step()`` runs after every step, ``epoch_end(epoch)``
    after every epoch (validation, keeping the best epoch).

    ``graphs`` is the resolved ``train.cuda_graphs``: "off", "on" (a failed
    capture is an error) or "try" (a failed capture falls back to eager steps
    with a warning). ``capture`` replaces the CUDA-graph backend (tests).

    The running loss stays on the device; it is read (one host sync) only
    ``cfg.log_every`` times per epoch for the progress bar and the finiteness
    check. ``on_log(step, loss)`` (tracking) gets each value read, ``step``
    counting the task's optimiser steps from 1. Returns the number of images trained on.
    """
    step, opt, sched = build_step(model, cfg, loss, old_model, device, amp, graphs, capture, params)
    n_batches = len(loader)
    read_at = {max(1, round(n_batches * (k + 1) / cfg.log_every)) for k in range(cfg.log_every)}
    bar = tqdm(total=cfg.epochs * n_batches, desc=desc or f"task {task + 1}", unit="batch", leave=False,
               disable=not progress, position=position, dynamic_ncols=True)
    images = 0
    model.train()
    try:
        for epoch in range(cfg.epochs):
            loss_sum = torch.zeros((), device=device)
            seen, last_read = 0, 0
            for i, batch in enumerate(loader, 1):  # (x, y) or (x, y, *per_sample)
                # A graphed step returns its static loss tensor, overwritten by
                # the next replay: it is added here, before the next step.
                loss_sum += step(*batch).detach() * len(batch[1])
                if after_step is not None:
                    after_step()
                seen += len(batch[1])
                if i in read_at:
                    value = (loss_sum / seen).item()  # the only host sync: a few per epoch
                    if not math.isfinite(value):
                        raise NonFiniteLossError(task, epoch, opt.param_groups[0]["lr"], value)
                    if on_log is not None:
                        on_log(epoch * n_batches + i, value)
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{value:.4f}", refresh=False)
                    bar.update(i - last_read)
                    last_read = i
            images += seen
            sched.step()
            if epoch_end is not None:
                epoch_end(epoch)
    finally:
        bar.close()
    return images


def build_step(model, cfg, loss: "Criterion | LossFn", old_model, device: torch.device, amp: str = "off",
               graphs: str = "off", capture: "GraphBackend | None" = None, params=None):
    """The step the loop calls, with its optimiser and schedule: (step, opt, sched).

    Shared by ``train_task`` and the benchmarks, so that the bare step and the
    reference pipeline they compare against run exactly the trainer's step.
    """
    opt, sched = make_optimizer(model, cfg, params)
    loss_fn = logits_loss(loss) if isinstance(loss, Criterion) else loss
    step = make_step(model, opt, loss_fn, old_model, autocast_for(device, amp))
    if graphs != "off":
        step = GraphedStep(step, opt, capture or CudaGraphs(device), strict=graphs == "on")
    return step, opt, sched


def make_step(model, opt, loss_fn: LossFn, old_model, autocast) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One SGD step on a batch; returns the loss tensor (not synchronised).

    Nothing in it reads a value back to the host or branches on data, so it
    can be captured as a CUDA graph. Gradients are set to None rather than
    zeroed: under capture, backward then allocates them from the graph's own
    memory pool, where they stay put for every replay.
    """

    def step(x: torch.Tensor, y: torch.Tensor, *per_sample: torch.Tensor) -> torch.Tensor:
        with autocast:
            out = model(x, with_features=True)
            if old_model is not None:
                with torch.no_grad():
                    old = old_model(x, with_features=True)
            else:
                old = None
        loss = loss_fn(x, y, out, old, *per_sample)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


class GraphBackend:
    """How a step is warmed up and captured; ``CudaGraphs`` is the real one."""

    def warmup(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """Record ``fn`` without running it; returns (replay, the output tensor that replay refills)."""
        raise NotImplementedError


class CudaGraphs(GraphBackend):
    """torch.cuda.graph capture, following PyTorch's whole-network recipe.

    Warm-up steps and captures all run on one side stream, made once per
    backend (one per task): the recipe's warm-up on a side stream keeps lazy
    initialisation (cuBLAS/cuDNN handles and workspaces, the momentum
    buffers) off the stream being captured, and capturing on that same stream
    (``torch.cuda.graph(stream=...)``) means the parameters' AccumulateGrad
    nodes, the gradients and the momentum buffers all belong to the stream
    that uses them. With a fresh stream per warm-up and torch.cuda.graph's own
    capture stream, a node made on one stream (kept alive by the captured
    graph's loss) was used from another, and torch warned that "the
    AccumulateGrad node's stream does not match" on every run (issue 17).

    The capture forbids unsafe CUDA calls in the capturing thread only
    (``CAPTURE_MODE``): in CUDA's default, global mode, any other thread of
    the process that pins or frees memory meanwhile (a DataLoader's
    pin-memory thread: the reference pipeline of ``cilab bench throughput``,
    a user's own loader in a notebook) breaks the capture with "operation
    not permitted when stream is capturing". Seen on an H200.
    """

    CAPTURE_MODE = "thread_local"

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def _on_side_stream(self):
        # The side stream waits for the work queued before it (the batch copies)
        # and the caller's stream waits for it after, so the order of work stays
        # that of eager training.
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            yield
        finally:
            current.wait_stream(self.stream)

    @contextlib.contextmanager
    def warmup(self):
        with self._on_side_stream(), torch.cuda.stream(self.stream):
            yield

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        with self._on_side_stream(), torch.cuda.graph(graph, stream=self.stream,
                                                        capture_error_mode=self.CAPTURE_MODE):
            out = fn()
        return graph.replay, out


class GraphedStep:
    """A training step captured once per batch shape and learning rate, and replayed.

    Each shape (the full batches, and the shorter last batch of an epoch) runs
    ``warmup`` eager steps first, then the next batch of that shape is copied
    into static input tensors, the step is captured reading from them, and the
    graph is replayed for that batch and every later one. The warm-up steps
    are ordinary training steps on real batches and capture runs nothing, so
    training sees exactly the batches and updates that eager training sees.

    SGD's learning rate is a Python float, which a capture freezes into the
    graph as a kernel argument; when the schedule changes it (at each of
    ``train.milestones``) the graphs are dropped and captured again, without
    a new warm-up. That is a few captures per task, and it leaves the
    optimiser exactly as in eager training (a tensor lr would need the fused
    SGD kernel, whose rounding differs).
    """

    WARMUP = 3  # PyTorch's CUDA-graph examples warm up with 3 iterations

    def __init__(self, step, opt, backend: GraphBackend, strict: bool, warmup: int = WARMUP):
        self.step, self.opt, self.backend, self.strict, self.warmup = step, opt, backend, strict, warmup
        self.graphs: dict[tuple, tuple] = {}
        self.lrs: tuple = ()  # the learning rates the graphs in self.graphs were captured with
        self.eager_steps: Counter = Counter()
        self.failed = False  # a capture failed in "try" mode: eager from then on

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *per_sample: torch.Tensor) -> torch.Tensor:
        inputs = (x, y, *per_sample)  # per-sample tensors (DER++'s stored logits) are static inputs too
        if self.failed:
            return self.step(*inputs)
        lrs = tuple(group["lr"] for group in self.opt.param_groups)
        if lrs != self.lrs:
            self.graphs.clear()  # captured with the old learning rate
            self.lrs = lrs
        key = tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs)
        graph = self.graphs.get(key)
        if graph is None:
            if self.eager_steps[key] < self.warmup:
                self.eager_steps[key] += 1
                with self.backend.warmup():
                    return self.step(*inputs)
            graph = self._capture(key, inputs)
            if graph is None:
                return self.step(*inputs)
        replay, static_inputs, static_loss = graph
        for static, t in zip(static_inputs, inputs):
            static.copy_(t)
        replay()
        return static_loss

    def _capture(self, key, inputs):
        static_inputs = tuple(t.clone() for t in inputs)  # clone keeps the memory format (channels_last)
        try:
            replay, static_loss = self.backend.capture(lambda: self.step(*static_inputs))
        except Exception as e:
            if self.strict:
                raise GraphCaptureError(
                    f"CUDA-graph capture of the training step failed ({type(e).__name__}: {e}); "
                    "set train.cuda_graphs=off (or auto, which falls back to eager steps)"
                ) from e
            warnings.warn(f"CUDA-graph capture of the training step failed ({type(e).__name__}: {e}); "
                          "training on with eager steps. train.cuda_graphs=off skips the attempt.",
                          RuntimeWarning, stacklevel=3)
            self.failed = True
            # Eager from now on, on the caller's stream: drop the graphs captured
            # so far, whose losses keep autograd nodes of the side stream alive.
            self.graphs.clear()
            return None
        self.graphs[key] = (replay, static_inputs, static_loss)
        return self.graphs[key]
