"""How cost grows with the pool: the main job's method (cluster-aware, self-clustering every round) at the demo
size on built-in pools of several sizes, each with the same step budget, side by side in one run.

Per pool size it prints the time from the call to the first optimizer step, steps/s once running, the driver's
and the Train worker's peak memory, the fit's seconds outside the steps (Ray Train's start, re-clustering,
checkpoints), and ``raysys embed``'s images/s over the whole pool with the trained encoder. Each size runs in a
fresh process (its own Ray), so the peak memories are its own.

    python bench/pool_growth.py                                  # pools of 5,000 and 50,000, 40 steps each
    python bench/pool_growth.py --sizes 5000 50000 200000 --steps 40 --root /tmp/pools
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONE_SIZE = """
import json, resource, sys, time
from pathlib import Path
import pyarrow.parquet as pq
from raysys.config import make_config
from raysys.data.simulate import simulate
from raysys.distributed.trainer import pretrain

size, steps, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
data = Path(simulate(work / f"pool-{size}", preset="demo", count=size, progress=False)["rover"]).parent
cfg = make_config("demo", data=str(data), out=str(work / f"run-{size}"), max_images=size, max_steps=steps,
                  pair_rule="cluster", self_cluster_k=20, knn_monitor="").validate()
run = pretrain(cfg)
m = run["metrics"]
began = time.perf_counter()
from raysys.cli import main as raysys_main
assert raysys_main(["embed", "--model", str(work / f"run-{size}"), "--data", str(data / "rover-unlabeled"),
                    "--out", str(work / f"embed-{size}.parquet")]) == 0
embed_s = time.perf_counter() - began
print("RESULT " + json.dumps({
    "pool": pq.read_metadata(work / f"run-{size}" / "pretrain-images.parquet").num_rows, "rounds": m["rounds"], "steps": m["step"],
    "to_first_step_s": run["timing"].get("to_first_step"), "steps_per_s": m["step"] / m["step_seconds"],
    "fit_outside_steps_s": run["timing"]["fit_outside_steps"], "worker_peak_mb": m["peak_rss_mb"],
    "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "embed_s": embed_s}))
"""


def one_size(size: int, steps: int, root: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", ONE_SIZE, str(size), str(steps), str(root)], capture_output=True,
                         text=True)
    if run.returncode:
        raise SystemExit(f"pool of {size}: {run.stderr[-2000:]}")
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--root", help="where the pools and runs go (kept: a rerun reuses the simulated pools)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="pool-growth-"))
    print("| pool images | pretrained on | rounds | to first step (s) | steps/s | fit outside steps (s) | driver peak (GB) "
          "| worker peak (GB) | embed images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        began = time.perf_counter()
        r = one_size(size, args.steps, root)
        print(f"| {size:,} | {r['pool']:,} | {r['rounds']} | {r['to_first_step_s']:.1f} | {r['steps_per_s']:.2f} | "
              f"{r['fit_outside_steps_s']:.1f} | {r['driver_peak_mb'] / 1024:.2f} | {r['worker_peak_mb'] / 1024:.2f} | "
              f"{size / r['embed_s']:.0f} |", flush=True)
        print(f"  ({time.perf_counter() - began:.0f} s with simulation)", file=sys.stderr)


if __name__ == "__main__":
    main()
