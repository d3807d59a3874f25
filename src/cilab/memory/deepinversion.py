"""Synthetic exemplars by DeepInversion and Adaptive DeepInversion (``memory.kind=deepinversion``).

The study, section 5.2 (after Yin et al., "Dreaming to Distill: Data-free
Knowledge Transfer via DeepInversion", CVPR 2020): after a task is trained, a
frozen copy of the network (the *teacher*) is inverted. The exemplar images
themselves are the parameters; the network is not trained. Eq. 3 and 8:

    min_x  L(x, y) + R(x),
    R(x) = alpha_tv R_TV(x) + alpha_l2 R_l2(x) + alpha_f R_feature(x) + alpha_c R_A(x)

- ``L``: the teacher's cross-entropy towards the target class y;
- ``R_TV``, ``R_l2``: the Deep Dreaming image prior (eq. 4), see
  :func:`total_variation` and :func:`l2`;
- ``R_feature`` (eq. 5-6): at every BatchNorm layer, the distance between the
  statistics of the synthesised batch at the layer's input and the running
  statistics the layer stored while training, see :class:`BNStatsHook`;
- ``R_A`` (eq. 9-10, Adaptive DeepInversion, only with ``adaptive: true``):
  1 - JS(p_teacher, p_student), which rewards images on which the teacher and
  a freshly initialised student disagree ("when creating the images, the
  student allows the algorithm to try to enhance a teacher/student
  disagreement, that implies diversity"), see :func:`js_divergence`.
  The student is frozen (the study uses it only for this term, not for
  distillation), so its preferences do not move: for a class the random
  student already favours, alpha_c (1 - JS) pulls the teacher away from that
  class, against the cross-entropy (ten times its weight with the study's
  alpha_c = 10). Expect fewer of those images to keep their class.

Images start from Gaussian noise, from m random training images of the class,
or from its m herding exemplars (``memory.deepinversion.init``; the study's
three settings, section 5.2.1), are optimised with Adam in the normalised input
space, and are stored as uint8 images like real exemplars, so cutting, the NME
classifier and image grids work unchanged.

Every new class of the task is synthesised in one batched run on the device,
in chunks that fit its memory, the classes interleaved so each chunk holds
all of them equally (the study: "We had to split the synthetization phase in
3 chunks, with the classes are equally distributed among them, to not incur
in CUDA memory errors"). Since R_feature compares *batch* statistics with the
running statistics of the whole (mixed-class) training data, a batch mixing
the classes is also what eq. 5 assumes.
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

CPU_CHUNK = 256  # images optimised at once on the CPU (memory is not the limit there, time is)
CUDA_MEMORY_FRACTION = 0.5  # of the free device memory one chunk may take
PROBE_IMAGES = 16  # images of the probe pass that measures the memory one image needs
PROGRESS_READS = 4  # loss reads (host syncs) per chunk for the progress bar


# ---------------------------------------------------------------------------
# loss terms: small pure functions, tested against direct computations


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation R_TV, averaged over the images of the batch.

        R_TV(x) = 1/B sum_b sum_{c,i,j} ( |x[b,c,i+1,j] - x[b,c,i,j]| + |x[b,c,i,j+1] - x[b,c,i,j]| )

    i.e. the L1 norm of the differences between vertically and horizontally
    adjacent pixels of each channel: it penalises the high-frequency noise that
    plain inversion produces (Deep Dreaming prior, the study's eq. 4).
    """
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum()
    return (dh + dw) / x.shape[0]


def l2(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of the images R_l2, averaged over the batch.

        R_l2(x) = 1/B sum_b ||x_b||_2^2 = 1/B sum_{b,c,i,j} x[b,c,i,j]^2

    (in normalised input space, so it pulls pixels towards the data mean).
    """
    return x.pow(2).sum() / x.shape[0]


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between softmax(logits_p) and softmax(logits_q), per row.

        JS(p, q) = 1/2 KL(p || M) + 1/2 KL(q || M),   M = (p + q) / 2,
        KL(p || M) = sum_k p_k (ln p_k - ln M_k)

    (the study's eq. 10) with the natural log, so 0 <= JS <= ln 2: 0 for equal
    distributions, ln 2 for distributions with disjoint support. Symmetric.
    Computed from log-probabilities (log-softmax, log M by logsumexp) so it is
    stable for confident predictions; terms with p_k = 0 count 0 (0 ln 0 = 0).
    Log-probabilities may be passed as logits (log-softmax leaves them unchanged).
    Returns a tensor of shape ``logits_p.shape[:-1]``.
    """
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)
    p, q = logp.exp(), logq.exp()
    kl_pm = torch.where(p > 0, p * (logp - logm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq - logm), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


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
    """A freshly initialised network of the teacher's architecture, frozen, in eval mode."""
    student = copy.deepcopy(teacher)
    for mod in student.modules():  # a copy would carry the teacher's hooks
        mod._forward_hooks.clear()
    return reinitialise_(student, generator).eval().requires_grad_(False)


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
        """Every term of the loss for images ``x`` (normalised) and targets ``y``, and their weighted ``total``.

            total = CE(teacher(x), y) + alpha_tv R_TV(x) + alpha_l2 R_l2(x)
                    + alpha_f sum_l (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)
                    [+ alpha_c mean_b (1 - JS(p_T(x_b), p_S(x_b)))   when adaptive]

        CE and R_A are means over the batch, R_TV and R_l2 per-image sums averaged
        over the batch (so the balance does not depend on the chunk size).
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
            out["competition"] = (1.0 - js_divergence(z_t, z_s)).mean()
            total = total + c.alpha_c * out["competition"]
        out["total"] = total
        return out

    def optimise(self, x0: torch.Tensor, y: torch.Tensor, iterations: int, lo: torch.Tensor, hi: torch.Tensor,
                 bar=None) -> torch.Tensor:
        """Adam on the images from ``x0`` for ``iterations`` steps; returns the optimised images (detached).

        After every step the images are clipped to [lo, hi], the normalised image
        of [0, 255] per channel (Yin et al. clip to the valid range too), so what
        is optimised is what survives the conversion to uint8. The loss is read
        (one host sync) only ``PROGRESS_READS`` times, for the progress bar.
        """
        x = x0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.cfg.lr)
        reads = {max(1, round(iterations * (k + 1) / PROGRESS_READS)) for k in range(PROGRESS_READS)}
        last = 0
        for it in range(1, iterations + 1):
            opt.zero_grad(set_to_none=True)
            loss = self.terms(x, y)["total"]
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


def chunk_size(objective: DeepInversion, sample: torch.Tensor, y: torch.Tensor, total: int, cfg) -> int:
    """Images optimised at once: ``cfg.batch_size`` if > 0, else what fits the device.

    On CUDA a probe pass measures the memory the autograd graph holds per image
    (teacher and student), and a chunk may use ``CUDA_MEMORY_FRACTION`` of the
    free memory (``torch.cuda.mem_get_info`` plus PyTorch's unused cache),
    rounded down to a power of two so that small changes of the free memory do
    not change the chunks (and with them the images). On the CPU: ``CPU_CHUNK``.
    """
    if cfg.batch_size > 0:
        return min(total, cfg.batch_size)
    dev = sample.device
    if dev.type != "cuda":
        return min(total, CPU_CHUNK)
    n = min(PROBE_IMAGES, len(sample))
    before = torch.cuda.memory_allocated(dev)
    probe = sample[:n].detach().clone().requires_grad_(True)
    loss = objective.terms(probe, y[:n])["total"]
    held = torch.cuda.memory_allocated(dev) - before
    loss.backward()
    del loss, probe
    for h in objective.hooks:
        h.mean = h.var = None
    per_image = 2.5 * max(held, 1) / n  # the graph, plus the gradients the backward pass allocates
    free, _ = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    fit = int(CUDA_MEMORY_FRACTION * free / per_image)
    fit = 2 ** int(math.log2(fit)) if fit >= 1 else 1
    return max(1, min(total, fit))


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
        size = chunk_size(objective, x0.contiguous(memory_format=fmt), y, total, cfg)
        n_chunks = -(-total // size)
        size = -(-total // n_chunks)  # equal chunks
        bar = tqdm(total=n_chunks * cfg.iterations, desc="deepinversion", unit="it", leave=False,
                   disable=None if ctx.progress else True, dynamic_ncols=True)
        try:
            out = []
            for i in range(0, total, size):
                xc = x0[i: i + size].contiguous(memory_format=fmt)
                out.append(objective.optimise(xc, y[i: i + size], cfg.iterations, lo, hi, bar))
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
