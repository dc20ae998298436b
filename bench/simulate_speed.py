"""Benchmark: simulator throughput (render + JPEG encode + write), images per second, one process.

    PYTHONPATH=. python bench/simulate_speed.py --size 64 --count 2000

Times each dataset writer on ``--count`` files into a temporary folder and prints images/s per
dataset. The target is >= 500 images/s at 64 px on one core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, as specified
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from raysys.data import simulate as sim  # noqa: E402


class _Counter:
    """A progress sink that counts written files."""

    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--count", type=int, default=2000, help="approximate files per dataset")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    writers = {
        "msl": lambda root, bar: sim.write_msl(root, a.count, a.size, a.seed, bar),
        # about 6 files per HiRISE original (the copies are cheap: no rendering)
        "hirise": lambda root, bar: sim.write_hirise(root, max(24, a.count // 6), a.size, a.seed, bar),
        "rover": lambda root, bar: sim.write_rover(root, a.count, a.size, a.seed, bar),
        "diverse": lambda root, bar: sim.write_diverse(root, 100, max(1, a.count // 100), a.size, a.seed, bar),
    }
    total_n, total_t = 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for key, write in writers.items():
            bar = _Counter()
            t0 = time.perf_counter()
            write(Path(tmp) / key, bar)
            dt = time.perf_counter() - t0
            total_n, total_t = total_n + bar.n, total_t + dt
            print(f"{key:8s} {bar.n:7d} files {dt:7.2f} s {bar.n / dt:8.0f} images/s at {a.size} px")
    print(f"{'all':8s} {total_n:7d} files {total_t:7.2f} s {total_n / total_t:8.0f} images/s at {a.size} px")


if __name__ == "__main__":
    main()
