"""Figures: PNG, titled, labelled axes, legends, readable size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files
import matplotlib.pyplot as plt  # noqa: E402


def classes_seen(metrics: dict) -> list[int]:
    cpt = metrics["classes_per_task"]
    return [cpt * (t + 1) for t in range(len(metrics[metrics["classifiers"][0]]["accuracy"]))]


def plot_run_accuracy(metrics: dict, path: Path) -> Path:
    """Accuracy on all seen classes after each task, one line per classifier."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    x = classes_seen(metrics)
    for c in metrics["classifiers"]:
        ax.plot(x, metrics[c]["accuracy"], marker="o", label=f"{c} (avg {metrics[c]['average_incremental_accuracy']:.1f}%)")
    ax.set(title=f"{metrics.get('preset') or metrics['method']} on {metrics['dataset']}, seed {metrics['seed']}",
           xlabel="number of classes seen", ylabel="accuracy on seen classes (%)", ylim=(0, 100), xticks=x)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_comparison(runs: dict[str, dict], path: Path, title: str) -> Path:
    """One accuracy curve per run (label -> metrics), each with its first classifier."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, m in runs.items():
        c = m["classifiers"][0]
        ax.plot(classes_seen(m), m[c]["accuracy"], marker="o", label=f"{label} ({c})")
    first = next(iter(runs.values()))
    ax.set(title=title, xlabel="number of classes seen", ylabel="accuracy on seen classes (%)", ylim=(0, 100),
           xticks=classes_seen(first))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# -- report figures ----------------------------------------------------------------------
#
# Every figure has a fixed size in inches at DPI (no ``bbox_inches="tight"``), so
# a figure's pixel size is known in advance: FIGSIZE at DPI is 960 x 600 pixels.

DPI = 120
FIGSIZE = (8.0, 5.0)
CONFUSION_FIGSIZE = (8.0, 6.8)
TSNE_PANEL_IN = (4.0, 3.6)  # width, height of one t-SNE panel
TSNE_EXTRA_IN = 1.1  # height above and below the panels: title (up to two lines) and legend
GRID_CELL_IN = 0.6  # exemplar grid: inches per image


def exemplar_grid_size(rows: int, cols: int) -> tuple[float, float]:
    """Figure size (inches) of an exemplar grid: room for the row labels, title and axis label."""
    return max(5.0, cols * GRID_CELL_IN + 2.0), rows * GRID_CELL_IN + 1.3


def _line_styles(n: int) -> list[dict]:
    """Distinct colour + marker per line: tab10, then tab20 beyond 10 lines."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    markers = "osD^vP*Xh<>"
    return [{"color": cmap(i % cmap.N), "marker": markers[i % len(markers)]} for i in range(n)]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_curves(curves: list[dict], path: Path, *, title: str, xlabel: str, ylabel: str,
                xticks: list | None = None, ylim: tuple = (0, 100)) -> Path:
    """Lines of means with +- std error bars.

    ``curves``: dicts with ``label``, ``x``, ``mean`` and ``std`` (a list, or
    None when there is a single seed: then no error bars are drawn).
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    # Error bars of different lines at the same x are shifted a little apart so each stays readable.
    xs = sorted({x for c in curves for x in c["x"]})
    step = min(np.diff(xs)) if len(xs) > 1 else 1.0
    barred = {id(c): i for i, c in enumerate(c for c in curves if c.get("std") is not None and any(s > 0 for s in c["std"]))}
    for c, style in zip(curves, _line_styles(len(curves))):
        has_bars = id(c) in barred
        shift = (barred[id(c)] - (len(barred) - 1) / 2) * 0.04 * step if has_bars and len(barred) > 1 else 0.0
        # errorbar for every line (yerr=None draws none) keeps the legend in drawing order
        ax.errorbar([x + shift for x in c["x"]], c["mean"], yerr=c["std"] if has_bars else None,
                    capsize=3, elinewidth=1, linewidth=1.6, markersize=5, label=c["label"], **style)
    if xticks is not None:
        if len(xticks) > 20:  # keep tick labels legible
            step = -(-len(xticks) // 20)
            xticks = list(xticks)[::step]
        ax.set_xticks(xticks)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=ylim)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix, path: Path, *, title: str, classes_per_task: int | None = None,
                   class_names: list[str] | None = None) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), classes in the learned order.

    Each row is normalised to the percentage of that class's test images, and
    the colour scale is a square root so that scattered errors stay visible
    next to the diagonal. Thin lines separate the tasks. An n x (n + 1)
    matrix (``eval.fc_scope=all``) has a last column for the predictions of a
    class not seen yet, drawn after a thick line and labelled "unseen".
    """
    import numpy as np
    from matplotlib.colors import PowerNorm

    m = np.asarray(matrix, dtype=float)
    n = m.shape[0]
    unseen = m.shape[1] == n + 1
    pct = 100.0 * m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=CONFUSION_FIGSIZE, dpi=DPI)
    im = ax.imshow(pct, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=100), interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("% of the true class's test images")
    if classes_per_task and n // classes_per_task > 1:
        for b in range(classes_per_task, n, classes_per_task):
            ax.axhline(b - 0.5, color="white", linewidth=0.4, alpha=0.6)
            ax.axvline(b - 0.5, color="white", linewidth=0.4, alpha=0.6)
    if unseen:
        ax.axvline(n - 0.5, color="white", linewidth=1.5)
    extra = ["unseen"] if unseen else []
    if class_names is not None and n <= 20:
        names = list(class_names[:n]) + extra
        ax.set_xticks(range(len(names)), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        ax.set_yticks(range(n), class_names[:n], fontsize=8)
    else:
        step = classes_per_task if classes_per_task and n // classes_per_task <= 20 else max(1, n // 10)
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks + [n] * unseen, [str(t) for t in ticks] + extra)
        ax.set_yticks(ticks)
    ax.set(title=title, xlabel="predicted class (learned order)", ylabel="true class (learned order)")
    fig.tight_layout()
    return _save(fig, path)


def _lighten(color, amount: float = 0.6):
    r, g, b, *_ = matplotlib.colors.to_rgba(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _darken(color, amount: float = 0.25):
    r, g, b, *_ = matplotlib.colors.to_rgba(color)
    return (r * (1 - amount), g * (1 - amount), b * (1 - amount))


def plot_tsne(rows: list[dict], path: Path, *, title: str, class_names: list[str] | None = None) -> Path:
    """t-SNE panels: one row per run, one column per task (figures 4 and 9 of the study).

    ``rows``: dicts with ``label`` and ``panels``; a panel has ``title``,
    ``xy`` (N x 2), ``labels`` (N class indices 0..C-1 among the drawn classes)
    and ``exemplar`` (N bools). Training images are drawn small and light,
    exemplars large and deep, in the same hue per class.
    """
    import numpy as np
    from matplotlib.lines import Line2D

    ncols = max(len(r["panels"]) for r in rows)
    nrows = len(rows)
    w, h = TSNE_PANEL_IN
    height = h * nrows + TSNE_EXTRA_IN
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, height), dpi=DPI, squeeze=False)
    cmap = plt.get_cmap("tab10")
    n_classes = 0
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(row["panels"]):
                ax.axis("off")
                continue
            p = row["panels"][j]
            xy, labels, ex = np.asarray(p["xy"]), np.asarray(p["labels"]), np.asarray(p["exemplar"], dtype=bool)
            n_classes = max(n_classes, int(labels.max()) + 1 if len(labels) else 0)
            for c in np.unique(labels):
                base = cmap(int(c) % 10)
                sel = labels == c
                ax.scatter(*xy[sel & ~ex].T, s=6, color=_lighten(base), linewidths=0, zorder=1)
                ax.scatter(*xy[sel & ex].T, s=22, color=_darken(base), edgecolors="black", linewidths=0.3, zorder=2)
            ax.set_title(f"{row['label']}: {p['title']}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel("t-SNE 2")
            if i == nrows - 1:
                ax.set_xlabel("t-SNE 1")
    names = [f"class {n}" for n in class_names] if class_names else [f"class #{c + 1} of task 1" for c in range(n_classes)]
    handles = [Line2D([], [], linestyle="", marker="o", color=cmap(c % 10), label=names[c])
               for c in range(n_classes)]
    handles += [Line2D([], [], linestyle="", marker="o", markersize=4, color="0.75", label="training images (light)"),
                Line2D([], [], linestyle="", marker="o", markersize=7, color="0.2", label="exemplars (deep)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, width=int(11 * w * ncols)) or [""]))
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1))  # keep the bottom 0.45 in for the legend
    return _save(fig, path)


def plot_exemplar_grid(images: list, row_labels: list[str], path: Path, *, title: str, per_class: int) -> Path:
    """Exemplar images: one row per class, up to ``per_class`` images each (uint8 N x 3 x H x W)."""
    import numpy as np

    rows = len(images)
    per_class = max(1, min(per_class, max((len(im) for im in images), default=1)))  # no empty columns
    hw = max((im.shape[-1] for im in images if len(im)), default=32)
    pad = 2
    cell = hw + pad
    mosaic = np.ones((rows * cell + pad, per_class * cell + pad, 3), dtype=np.uint8) * 255
    for r, ims in enumerate(images):
        ims = np.asarray(ims)[:per_class]
        for k, im in enumerate(ims):
            y, x = pad + r * cell, pad + k * cell
            mosaic[y: y + im.shape[1], x: x + im.shape[2]] = np.transpose(im, (1, 2, 0))
    fig, ax = plt.subplots(figsize=exemplar_grid_size(rows, per_class), dpi=DPI)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + r * cell + hw / 2 for r in range(rows)], row_labels, fontsize=8)
    ax.set_xticks([pad + k * cell + hw / 2 for k in range(per_class)], [str(k + 1) for k in range(per_class)], fontsize=8)
    ax.set(title=title, xlabel="exemplar, in memory order (cutting keeps the first)", ylabel="class")
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)
