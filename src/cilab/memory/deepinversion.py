"""Synthetic exemplars by DeepInversion and Adaptive DeepInversion (``memory.kind=deepinversion``).

The study, section 5.2 (after Yin et al., "Dreaming to Distill: Data-free
Knowledge Transfer via DeepInversion", CVPR 2020): after a task is trained, a
frozen copy of the network (the *teacher*) is inverted. The exemplar images
themselves are the parameters; the network is not trained. Eq. 3 and 8:

    min_x  L(x, y) + R(x),
    R(x) = alpha_tv R_TV(x) + alpha_l2 R_l2(x) + alpha_f R_feature(x) + alpha_c R_A(x)

computed, at every Adam step, on a chunk of B images shifted by a random jitter
(see below):

- ``L``: the teacher's cross-entropy towards the target class y, mean over the chunk;
- ``R_TV`` (:func:`total_variation`) and ``R_l2`` (:func:`l2`): the image prior
  of Deep Dreaming (eq. 4), in the form of Yin et al.'s code: L2 norms taken
  over the whole chunk;
- ``R_feature`` (eq. 5-6): at every BatchNorm layer, the distance between the
  statistics of the chunk at the layer's input and the running statistics the
  layer stored while training, see :class:`BNStatsHook`;
- ``R_A`` (eq. 9-10, Adaptive DeepInversion, only with ``adaptive: true``):
  one minus the teacher/student divergence, see :func:`competition`.

Each step first rolls the whole chunk by the same random offset of up to
``jitter`` = 2 pixels in y and x (``torch.roll``, as Yin et al. do, offsets from
the run's generator), so the images cannot fit the networks pixel-exactly.

The student (Adaptive DI). The study: "we first train our standard network ...
and then use a copy of it as a teacher, and another ResNet32 (randomly
initialized) as a student"; it is not distilled ("we will not exploit this
functionality"), only used for the competition term. So the student here is a
fresh network of the teacher's architecture (:func:`make_student`, drawn from
the run's generator), not the model that goes on to the next task. It runs in
TRAINING mode, as in the study: its BatchNorm layers normalise with the
chunk's own statistics. (A fresh network in eval mode normalises with running
statistics 0 / 1 that do not match its activations; a ResNet-32 then predicts
one class for every image with near certainty, and the competition term pulls
every image of that class away from it, against the cross-entropy.) Its
parameters get no gradient; the gradient flows through its output to the
images, as in Yin et al.

Images start from Gaussian noise, from m random training images of the class,
or from its m herding exemplars (``memory.deepinversion.init``; the study's
three settings, section 5.2.1), are optimised with Adam in the normalised input
space, clipped after every step to the normalised image of [0, 255] (a cilab
addition: what is optimised is what survives the conversion to uint8), and are
stored as uint8 images like real exemplars, so cutting, the NME classifier and
image grids work unchanged.

Chunks. All new classes of a task are synthesised in chunks of at most
``batch_size`` images (default 667), the classes interleaved so each chunk
holds all of them equally (the study: "We had to split the synthetization
phase in 3 chunks, with the classes are equally distributed among them";
with K = 2000 that is 2000, 1000 and 660 images in 3, 2 and 1 chunks at tasks
1-3, which chunks of <= 667 reproduce). The chunk size is fixed, never sized to
the free device memory: R_feature and R_TV are chunk statistics, so the chunks
change the images, and the same seed must give the same images on any device.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .selection import EXEMPLAR_BUILDERS, SELECTIONS, BuildContext

PROGRESS_READS = 4  # loss reads (host syncs) per chunk for the progress bar
# Yin et al.'s competition term: the temperature of the softmaxes, and the range the
# probabilities are clamped to (it bounds log P and log Q, so the divergence is finite).
COMPETITION_TEMPERATURE = 3.0
PROB_CLAMP = (0.01, 0.99)


# ---------------------------------------------------------------------------
# loss terms: small pure functions, tested against hand-worked values


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Total variation R_TV of a batch as Yin et al. compute it (their ``loss_var_l2``).

        R_TV(x) = ||D_right x||_2 + ||D_down x||_2 + ||D_diag x||_2 + ||D_anti x||_2

    where each D is the map of differences between every pixel and one
    neighbour, over all images and channels of the batch at once:
    ``x[..., :, :-1] - x[..., :, 1:]`` (right), ``x[..., :-1, :] - x[..., 1:, :]``
    (down), ``x[..., :-1, :-1] - x[..., 1:, 1:]`` (diagonal) and
    ``x[..., 1:, :-1] - x[..., :-1, 1:]`` (anti-diagonal), and ||.||_2 the
    Euclidean norm of the whole map (not squared, not averaged over images: the
    term grows like sqrt(B), as in the study's generator).
    """
    right = x[:, :, :, :-1] - x[:, :, :, 1:]
    down = x[:, :, :-1, :] - x[:, :, 1:, :]
    diag = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    anti = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (right, down, diag, anti))


def l2(x: torch.Tensor) -> torch.Tensor:
    """R_l2: the Euclidean norm of the whole batch, ||x||_2 = sqrt(sum_{b,c,i,j} x[b,c,i,j]^2).

    As in Yin et al.'s CIFAR code (``torch.norm(inputs_jit, 2)``); in normalised
    input space, so it pulls pixels towards the data mean.
    """
    return torch.linalg.vector_norm(x)


def competition(logits_t: torch.Tensor, logits_s: torch.Tensor, temperature: float = COMPETITION_TEMPERATURE,
                form: str = "code") -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive DeepInversion's competition term R_A and the divergence it is made of.

    ``form="code"`` (``memory.deepinversion.js=code``, the default): as in Yin
    et al.'s code, which the study's generator follows, with
    P = softmax(z_S / T), Q = softmax(z_T / T), T = 3, M = (P + Q) / 2 (from the
    unclamped P, Q), then P, Q and M each clamped to [0.01, 0.99]:

        JS  = 1/B sum_b [ 1/2 KL(M_b || P_b) + 1/2 KL(M_b || Q_b) ],
              KL(M || P) = sum_k M_k (ln M_k - ln P_k)
        R_A = 1 - clamp(JS, 0, 1)

    (the KL terms are ``KLDivLoss(log P, M)`` with batch-mean reduction, so the
    divergence is measured from M, and the clamp is on the chunk's mean).
    The study's eq. 10 writes KL(p_T, M); both directions are 0 for equal
    distributions and grow as they part. R_A is 1 where teacher and student
    agree and falls as they disagree, so minimising it seeks images on which
    they disagree (the study: "enhance a teacher/student disagreement, that
    implies diversity"). Returns ``(R_A, JS)``.

    ``form="paper"``: the Jensen-Shannon divergence as eq. 10 of the study (and
    Yin et al.'s paper) write it, with no clamp:

        JS  = 1/B sum_b [ 1/2 KL(P_b || M_b) + 1/2 KL(Q_b || M_b) ]  (at most ln 2)
        R_A = 1 - JS

    The code's clamps change the term a great deal with many outputs: over 100
    classes most probabilities sit below 0.01 and are raised to it, which
    flattens the divergence; confident disagreement gives JS > 1 and R_A = 0 in
    the code's form, ln 2 and 1 - ln 2 in the paper's. A named option so that a
    user can check whether this matters for the exemplars.
    """
    p = F.softmax(logits_s.float() / temperature, dim=1)
    q = F.softmax(logits_t.float() / temperature, dim=1)
    if form == "paper":
        m = 0.5 * (p + q)
        # x ln(x / m) with 0 ln 0 = 0 (a probability that underflowed to 0 adds nothing)
        kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum() / len(m)
        kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum() / len(m)
        js = 0.5 * kl_pm + 0.5 * kl_qm
        return 1.0 - js, js
    lo, hi = PROB_CLAMP
    m = (0.5 * (p + q)).clamp(lo, hi)
    p, q = p.clamp(lo, hi), q.clamp(lo, hi)
    kl_mp = (m * (m.log() - p.log())).sum() / len(m)
    kl_mq = (m * (m.log() - q.log())).sum() / len(m)
    js = 0.5 * kl_mp + 0.5 * kl_mq
    return 1.0 - js.clamp(0.0, 1.0), js


class BNStatsHook:
    """Forward hook on a BatchNorm layer that reads the statistics of the batch at its INPUT.

    With the layer's input h (B x C x H x W), per channel c:

        mean_c = 1/(B H W) sum_{b,i,j} h[b,c,i,j]
        var_c  = 1/(B H W) sum_{b,i,j} (h[b,c,i,j] - mean_c)^2      (biased, as BN normalises)

    and :meth:`distance` is this layer's term of R_feature (the study's eq. 5-6,
    the expectations over the training data being the layer's running statistics):

        ||mean - running_mean||_2 + ||var - running_var||_2

    The statistics keep the autograd graph, so the distance can be minimised
    with respect to the images.
    """

    def __init__(self, module: nn.modules.batchnorm._BatchNorm):
        self.module = module
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        h = inputs[0].float()
        dims = [0] + list(range(2, h.dim()))  # all but the channel dimension
        self.mean = h.mean(dim=dims)
        self.var = h.var(dim=dims, unbiased=False)

    def distance(self) -> torch.Tensor:
        m = self.module
        return (torch.linalg.vector_norm(self.mean - m.running_mean.float())
                + torch.linalg.vector_norm(self.var - m.running_var.float()))

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------
# the student: same architecture, fresh parameters from the run's generator


@torch.no_grad()
def reinitialise_(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draw every parameter of ``net`` afresh from ``generator`` (in place); returns ``net``.

    Convolutions: Kaiming normal, fan-out, ReLU gain (as the ResNet's own
    initialisation); linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight
    and bias (PyTorch's default); BatchNorm: weight 1, bias 0, running mean 0,
    running variance 1. Any other parameter: U(-1/sqrt(fan_in), ..) if it is a
    matrix, 0 if it is a vector.
    """
    dev = generator.device

    def normal(shape, std, like):
        return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype) * std

    def uniform(shape, bound, like):
        return (torch.rand(shape, generator=generator, device=dev, dtype=like.dtype) * 2 - 1) * bound

    done: set[int] = set()
    for mod in net.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            w = mod.weight
            fan_out = w.shape[0] * w[0, 0].numel()
            w.copy_(normal(w.shape, math.sqrt(2.0 / fan_out), w))
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Linear):
            bound = 1.0 / math.sqrt(mod.in_features)
            mod.weight.copy_(uniform(mod.weight.shape, bound, mod.weight))
            if mod.bias is not None:
                mod.bias.copy_(uniform(mod.bias.shape, bound, mod.bias))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_parameters()  # deterministic: no random draw
        else:
            continue
        done.update(id(p) for p in mod.parameters(recurse=False))
    for p in net.parameters():
        if id(p) not in done:
            if p.dim() >= 2:
                p.copy_(uniform(p.shape, 1.0 / math.sqrt(p[0].numel()), p))
            else:
                p.zero_()
    return net


def make_student(teacher: nn.Module, generator: torch.Generator) -> nn.Module:
    """The Adaptive-DI student: a freshly initialised network of the teacher's architecture.

    In training mode (BatchNorm normalises with the batch's statistics, as the
    study's student did), parameters frozen (no gradient to it). BatchNorm
    momentum 0 so forwards leave its running statistics (which training mode
    never reads) untouched.
    """
    student = copy.deepcopy(teacher)
    for mod in student.modules():  # a copy would carry the teacher's hooks
        mod._forward_hooks.clear()
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.momentum = 0.0
    return reinitialise_(student, generator).train().requires_grad_(False)


# ---------------------------------------------------------------------------
# the objective and its optimisation


class DeepInversion:
    """The objective of eq. 3 / 8 for a frozen ``teacher`` (and ``student`` when adaptive).

    ``cfg`` is the ``memory.deepinversion`` section; ``n_out`` the number of
    outputs the cross-entropy and the distributions are taken over (the classes
    seen so far: the outputs of classes not yet seen are untrained). Use as a
    context manager (or call :meth:`close`) so the BatchNorm hooks are removed.
    """

    def __init__(self, teacher: nn.Module, cfg, n_out: int, student: nn.Module | None = None):
        self.teacher, self.student, self.cfg, self.n_out = teacher, student, cfg, n_out
        self.hooks = [BNStatsHook(m) for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.hooks:
            raise ValueError("DeepInversion needs a network with BatchNorm layers (their running statistics)")

    def __enter__(self) -> "DeepInversion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of the loss for images ``x`` (normalised, already jittered) and targets ``y``.

            total = CE(z_T, y) + alpha_tv R_TV(x) + alpha_l2 ||x||_2
                    + alpha_f sum_l (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)
                    [+ alpha_c R_A(z_T, z_S)   when adaptive]

        with z_T, z_S the teacher's and student's logits over the first ``n_out``
        outputs, CE the mean over the chunk, R_TV, ||x||_2 and R_A over the whole
        chunk (see :func:`total_variation`, :func:`l2`, :func:`competition`).
        """
        c = self.cfg
        z_t = self.teacher(x)[:, : self.n_out].float()
        out = {
            "ce": F.cross_entropy(z_t, y),
            "tv": total_variation(x),
            "l2": l2(x),
            "feature": torch.stack([h.distance() for h in self.hooks]).sum(),
        }
        total = out["ce"] + c.alpha_tv * out["tv"] + c.alpha_l2 * out["l2"] + c.alpha_f * out["feature"]
        if self.student is not None:
            z_s = self.student(x)[:, : self.n_out].float()
            out["competition"], out["js"] = competition(z_t, z_s, form=c.js)
            total = total + c.alpha_c * out["competition"]
        out["total"] = total
        return out

    def optimise(self, x0: torch.Tensor, y: torch.Tensor, iterations: int, lo: torch.Tensor, hi: torch.Tensor,
                 generator: torch.Generator, bar=None) -> torch.Tensor:
        """Adam on the images from ``x0`` for ``iterations`` steps; returns the optimised images (detached).

        Each step evaluates :meth:`terms` on the chunk rolled by (dy, dx), each
        drawn uniformly from {-jitter, ..., jitter} by ``generator`` (all the
        step's offsets in one draw per chunk, so there is no host sync per step).
        After every step the images are clipped to [lo, hi], the normalised
        image of [0, 255] per channel, so what is optimised is what survives the
        conversion to uint8. The loss is read (one host sync) only
        ``PROGRESS_READS`` times, for the progress bar.
        """
        j = self.cfg.jitter
        shifts = torch.randint(-j, j + 1, (iterations, 2), generator=generator, device=generator.device).tolist()
        x = x0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.cfg.lr)
        reads = {max(1, round(iterations * (k + 1) / PROGRESS_READS)) for k in range(PROGRESS_READS)}
        last = 0
        for it, (dy, dx) in enumerate(shifts, start=1):
            opt.zero_grad(set_to_none=True)
            x_jit = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
            loss = self.terms(x_jit, y)["total"]
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch.maximum(x, lo, out=x)
                torch.minimum(x, hi, out=x)
            if bar is not None and not bar.disable and it in reads:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(it - last)
                last = it
        for h in self.hooks:  # do not keep the last graph alive through the hooks
            h.mean = h.var = None
        return x.detach()


# ---------------------------------------------------------------------------
# the builder


def _memory_format(net: nn.Module) -> torch.memory_format:
    """channels_last if the network's first 4-d weight is stored so (as ``train.channels_last`` does)."""
    w = next((p for p in net.parameters() if p.dim() == 4), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def chunks(total: int, batch_size: int) -> tuple[int, int]:
    """(number of chunks, images per chunk): the fewest chunks of <= ``batch_size``, as equal as possible."""
    n = -(-total // batch_size)
    return n, -(-total // n)


def initial_images(ctx: BuildContext, labels: list[int], class_images: dict[int, torch.Tensor], m: int
                   ) -> list[torch.Tensor]:
    """The starting uint8 (or, for noise, normalised float) images of every class, per ``init``.

    ``noise``: m images of N(0, 1) noise in the normalised space (Yin et al.);
    ``random``: m training images of the class drawn without replacement;
    ``herding``: the class's m herding exemplars, in herding order (so cutting
    the synthesised exemplars later keeps the ones grown from the best).
    With fewer than m training images, ``random`` and ``herding`` start from all
    of them (a copy of a start would be optimised into the same image).
    """
    init = ctx.cfg.deepinversion.init
    g = ctx.generator
    if init == "noise":
        return [torch.randn((m, 3, 32, 32), generator=g, device=g.device) for _ in labels]
    if init == "random":
        picks = [torch.randperm(len(class_images[c]), generator=g, device=g.device)[:m] for c in labels]
    elif init == "herding":
        picks = SELECTIONS["herding"]([ctx.features(class_images[c]) for c in labels], m, ctx.generator)
    else:
        raise ValueError(f"memory.deepinversion.init is '{init}', not one of: noise, random, herding")
    return [ctx.normalizer(class_images[c][idx]) for c, idx in zip(labels, picks)]


@EXEMPLAR_BUILDERS.register("deepinversion")
def build_deepinversion(ctx: BuildContext, class_images: dict[int, torch.Tensor], m: int) -> dict[int, torch.Tensor]:
    """m images per new class synthesised by (Adaptive) DeepInversion from the just-trained network.

    The new classes' labels are output indices; as classes arrive in output
    order, the outputs seen so far are ``[0, max(label) + 1)``, over which the
    teacher's cross-entropy and the teacher/student distributions are taken.
    """
    cfg = ctx.cfg.deepinversion
    labels = sorted(class_images)
    if m <= 0 or not labels:
        return {c: class_images[c][:0] for c in labels}
    t0 = time.perf_counter()
    dev = class_images[labels[0]].device
    teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)
    fmt = _memory_format(teacher)
    student = make_student(teacher, ctx.generator) if cfg.adaptive else None
    starts = initial_images(ctx, labels, class_images, m)
    counts = [len(s) for s in starts]

    # Interleave the classes (rank-major: image 0 of every class, then image 1, ...)
    # so any contiguous chunk holds the classes in equal shares.
    x0 = torch.cat(starts)
    y = torch.cat([torch.full((n,), c, dtype=torch.long, device=dev) for c, n in zip(labels, counts)])
    rank = torch.cat([torch.arange(n, device=dev) for n in counts])
    order = torch.argsort(rank * len(labels) + torch.repeat_interleave(torch.arange(len(labels), device=dev),
                                                                      torch.tensor(counts, device=dev)))
    x0, y = x0[order], y[order]
    total = len(y)

    scale, shift = ctx.normalizer.scale.to(dev), ctx.normalizer.shift.to(dev)
    lo, hi = shift.expand(1, 3, 1, 1), (255.0 * scale + shift).expand(1, 3, 1, 1)
    x0 = torch.minimum(torch.maximum(x0, lo), hi)  # noise starts inside the valid range too

    with DeepInversion(teacher, cfg, max(labels) + 1, student) as objective:
        n_chunks, size = chunks(total, cfg.batch_size)
        bar = tqdm(total=n_chunks * cfg.iterations, desc="deepinversion", unit="it", leave=False,
                   disable=None if ctx.progress else True, dynamic_ncols=True)
        try:
            out = []
            for i in range(0, total, size):
                xc = x0[i: i + size].contiguous(memory_format=fmt)
                out.append(objective.optimise(xc, y[i: i + size], cfg.iterations, lo, hi, ctx.generator, bar))
        finally:
            bar.close()
        x = torch.cat(out)
    images = ((x - shift) / scale).round_().clamp_(0, 255).to(torch.uint8).contiguous()

    with torch.no_grad():  # how well the teacher recognises what it dreamt, after uint8 conversion
        hits = (teacher(ctx.normalizer(images).contiguous(memory_format=fmt))[:, : max(labels) + 1].argmax(1) == y)
    acc = 100.0 * hits.float().mean().item()  # the one host sync after the loop
    ctx.log(f"deepinversion: {total} images of {len(labels)} classes (init {cfg.init}"
            f"{', adaptive' if cfg.adaptive else ''}, {cfg.iterations} iterations, {n_chunks} chunk(s) of <= {size}) "
            f"in {time.perf_counter() - t0:.1f}s; teacher accuracy on them {acc:.1f}%")

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=dev)
    images = images[inverse]  # back to class-major, each class in its start order
    return {c: part for c, part in zip(labels, images.split(counts))}
