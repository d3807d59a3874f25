"""Aggregate training img/s of N runs at once on one device (N = 1,2,4,8 on CUDA), and the
whole study's projected wall time from the best N; JSON out.

    python benchmarks/concurrency.py [--jobs 1,2,4,8] [--epochs E] [--out FILE] [key=value ...]

Same as `cilab bench concurrency`; see src/cilab/bench/sharing.py and the README (Speed).
"""
import sys

from cilab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "concurrency", *sys.argv[1:]]))
