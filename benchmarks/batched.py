"""Training img/s of N ResNets fused into one grouped network (N = 1,2,4,8 on CUDA), and the
study's training time at the best N; JSON out.

    python benchmarks/batched.py [--models 1,2,4,8] [--steps S] [--out FILE] [key=value ...]

Same as `cilab bench batched`; see src/cilab/bench/fused.py, src/cilab/models/grouped.py and the README (Speed).
"""
import sys

from cilab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "batched", *sys.argv[1:]]))
