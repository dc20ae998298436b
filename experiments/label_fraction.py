"""Label efficiency (paper Fig. 4): linear-probe accuracy vs the fraction of train labels, per benchmark.

    python experiments/label_fraction.py --model runs/pretrain            # demo grid: 5..100 %, 3 seeds
    python experiments/label_fraction.py --model runs/a --model runs/b --preset smoke
    python experiments/label_fraction.py --preset smoke                   # pretrains an encoder first (Ray)

Each encoder is compared with a random-init encoder of the same architecture; features are extracted
once per encoder and benchmark. Writes label-fraction.csv, label-fraction.md and one PNG per benchmark
into --out (default runs/label_fraction).
"""

import sys

from raysys.distributed.label_fraction import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
