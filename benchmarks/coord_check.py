"""muP coordinate check (Tensor Programs V, Figure 5): activation scale vs width under SP and muP.

Runs `nanoseek coord-check` (the same code) and ends with its JSON line: for each parametrization and layer type,
the largest ratio (over the AdamW steps) of mean |activation| at the widest width to that at the narrowest.
Flat (~1x) under muP, growing under SP is the claim.

    python3 benchmarks/coord_check.py                                   # dsv3-tiny, widths 64..512, 4 steps
    python3 benchmarks/coord_check.py --preset gpt2-tiny --widths 128,256,512,1024,2048
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", "out/coord_check"]
    sys.exit(main(["coord-check", *argv]))
