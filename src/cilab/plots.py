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
