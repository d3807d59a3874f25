"""The reports' t-SNE: one row of panels of CIFAR-100's size, made as reports made them and as they do now. JSON out.

A row is three panels (after tasks 1, 5 and 10: 2,500 training images of 5
classes plus 2,000, 200 and 100 exemplars); the features are random
64-dimensional points around 5 class centres (t-SNE's time depends on the
number of points, not on what they are). Three ways, on this machine's cores:

- ``threads``: one embedding after another, scikit-learn's threads (cilab before);
- ``one_thread``: one after another, one thread each (cilab's embeddings, made here);
- ``pool``: one thread each, in a pool of processes, one a core (cilab's, for large reports).

    PYTHONPATH=src python benchmarks/tsne.py --out runs/bench/tsne.json [--rows 1] [--ways threads,one_thread,pool]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def panels(rows: int) -> list[tuple[np.ndarray, float, int]]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 64)) * 3
    out = []
    for r in range(rows):
        for exemplars in (2000, 200, 100):
            n = 2500 + exemplars
            x = centres[np.arange(n) % 5] + rng.normal(size=(n, 64))
            out.append((x.astype(np.float32), 30.0, r))
    return out


def main(argv=None) -> dict:
    from cilab import embedding
    from cilab.executors import cpu_count

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1, help="rows of three panels (default 1)")
    ap.add_argument("--ways", default="threads,one_thread,pool", help="which of the three to time")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    inputs, cores = panels(args.rows), cpu_count()
    ways = {
        "threads": lambda: [embedding.tsne(p, s).fit_transform(f) for f, p, s in inputs],  # scikit-learn's threads
        "one_thread": lambda: embedding.embed_all(inputs, workers=1),
        "pool": lambda: embedding.embed_all(inputs, workers=cores),
    }
    unknown = set(args.ways.split(",")) - set(ways)
    if unknown:
        ap.error(f"--ways: unknown {', '.join(sorted(unknown))}; choose among {', '.join(ways)}")
    seconds = {}
    for name, make in ways.items():
        if name not in args.ways.split(","):
            continue
        t0 = time.perf_counter()
        make()
        seconds[name] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {seconds[name]} s", flush=True)
    result = {"rows": args.rows, "panels": len(inputs), "points": sum(len(f) for f, _, _ in inputs),
              "cores": cores, "machine": platform.processor() or platform.machine(), "seconds": seconds,
              "pool_over_threads": round(seconds["threads"] / seconds["pool"], 2)
              if {"threads", "pool"} <= set(seconds) else None}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
