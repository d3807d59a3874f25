"""Wall time of a whole iCaRL run, split into training / memory / evaluation; JSON out.

    python benchmarks/protocol.py [--tasks 10] [--epochs 70] [--out FILE] [key=value ...]

Same as `cilab bench protocol`; see src/cilab/bench/wholerun.py and the README (Speed).
"""
import sys

from cilab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "protocol", *sys.argv[1:]]))
