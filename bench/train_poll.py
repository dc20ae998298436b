"""What Ray Train's controller poll costs a short fit: three smoke pretraining fits in one Ray, with the default
2 s health-check interval and with 0.25 s (what tests/conftest.py sets), each in its own process.

    python bench/train_poll.py            # prints the seconds of each fit and the mean saving
"""

import os
import statistics
import subprocess
import sys
import tempfile

FITS = """
import sys, tempfile, time
import ray
ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
from raysys.config import make_config
from raysys.distributed.trainer import pretrain
for _ in range(3):
    began = time.perf_counter()
    pretrain(make_config("smoke", builtin_root=sys.argv[1], out=tempfile.mkdtemp(), knn_monitor="").validate())
    print("fit", round(time.perf_counter() - began, 1))
"""


def fits(interval: str | None, root: str) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    if interval:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    run = subprocess.run([sys.executable, "-c", FITS, root], env=env, capture_output=True, text=True, check=True)
    return [float(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("fit ")]


def main() -> None:
    root = tempfile.mkdtemp(prefix="train-poll-")
    default, fast = fits(None, root), fits("0.25", root)
    print(f"poll 2 s (default): {default} s")
    print(f"poll 0.25 s:        {fast} s")
    print(f"saved per fit: {statistics.mean(default) - statistics.mean(fast):.1f} s "
          f"(ratio {statistics.mean(fast) / statistics.mean(default):.2f})")


if __name__ == "__main__":
    main()
