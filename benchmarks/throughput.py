"""Training throughput: bare step (a), cilab trainer (b), DataLoader+PIL reference (c); JSON out.

    python benchmarks/throughput.py [--out FILE] [--workers N] [key=value ...]

Same as `cilab bench throughput`; see src/cilab/bench/pipeline.py and the README (Speed).
"""
import sys

from cilab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
