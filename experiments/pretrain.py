"""Pretrain an encoder with SimCLR on Ray Train, then score it by linear evaluation.

    python experiments/pretrain.py                   # demo preset on built-in data
    python experiments/pretrain.py --preset smoke    # ~2 minutes on 2 CPU cores
    ray job submit --working-dir . -- python experiments/pretrain.py --preset paper --data /data/mars
"""

import sys

from raysys.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
