"""t-SNE embeddings for the report's figures, several at once.

Each embedding uses one thread. scikit-learn's Barnes-Hut t-SNE sums its
gradient over OpenMP threads, so its result depends on how many there are
(1,500 points: up to 45 units apart between 1 and 2 threads); with one, a
figure is the same on every machine. Several embeddings run in a pool of
processes, one a core, where there are enough points for the pool's start (a
few seconds: each worker imports scikit-learn) to pay back; fewer are made
here, one after another, with the same result.

Only numpy at import: a worker process starts without torch.
"""

from __future__ import annotations

import numpy as np

# Below this many points in all, embed here: a CIFAR-100 panel is 2,600-4,500
# points, 10-30 s on one core; a pool costs a few seconds to start.
POOL_MIN_POINTS = 5_000


def tsne(perplexity: float, seed: int):
    """The reports' t-SNE: 2-D, PCA initialisation, automatic learning rate."""
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)


def embed(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """The 2-D t-SNE embedding of ``features`` (:func:`tsne`), one thread."""
    from threadpoolctl import threadpool_limits

    # Built before the limit: threadpoolctl limits only the thread pools already loaded, and in a
    # fresh pool worker scikit-learn's OpenMP runtime loads with its import.
    model = tsne(perplexity, seed)
    with threadpool_limits(1):
        return model.fit_transform(features)


def embed_all(inputs: list[tuple[np.ndarray, float, int]], workers: int) -> list[np.ndarray]:
    """``embed(*i)`` for each of ``inputs`` (features, perplexity, seed), in order; in a pool of up to
    ``workers`` processes when there are several and enough points (``POOL_MIN_POINTS``)."""
    n = min(workers, len(inputs))
    if n < 2 or sum(len(f) for f, _, _ in inputs) < POOL_MIN_POINTS:
        return [embed(*i) for i in inputs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawned, not forked: a fork of a process with torch's and OpenMP's thread pools can hang
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(embed, *zip(*inputs)))
