"""Benchmark: ``raysys embed`` throughput in images/s on this machine, for the demo preset's encoder (ResNet-18
x0.25, small stem, 32 px) and a full ResNet-18 (standard stem) at 64 px, both on the built-in demo rover pool.

Per encoder: the end-to-end rate of ``embed_images`` on the whole pool (Ray already running; decoding, the
actor pool's start, inference and the Parquet writes all counted); the steady rate once the pool is up, from
the time the whole pool takes beyond a run on its first :data:`SMALL` images (the fixed start-up cancels);
and the encoder alone on pre-decoded images in this process with every core (the ceiling the pipeline works
towards). Weights are random: the rate does not depend on them.

    python bench/embed_throughput.py [--data data/builtin/demo/rover-unlabeled]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from raysys.data.augment import to_float
from raysys.data.decode import load_images
from raysys.distributed.embed import embed_images, read_images
from raysys.distributed.runtime import init_ray
from raysys.models import ContrastiveModel
from raysys.models.io import save_model

SMALL = 500  # images of the short run whose time is the fixed start-up cost
ENCODERS = {  # name -> (model spec, image size)
    "demo (ResNet-18 x0.25, small stem, 32 px)": (dict(backbone_name="resnet18", width=0.25, small_stem=True), 32),
    "ResNet-18 (standard stem, 64 px)": (dict(backbone_name="resnet18"), 64),
}


def encoder_only(model, paths: list[str], size: int, batch: int = 256) -> float:
    """Images/s of ``model.features`` alone on images decoded beforehand (all cores, no Ray)."""
    images, _, _ = load_images(paths, size)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with torch.inference_mode():
        model.features(to_float(images[:batch], size))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            model.features(to_float(images[i:i + batch], size))
    return len(images) / (time.perf_counter() - start)


def timed_embed(run: Path, data, out: Path) -> tuple[int, float]:
    start = time.perf_counter()
    result = embed_images(run, data, out, progress=False)
    return result["embedded"], time.perf_counter() - start


def first_images(paths: list[str], folder: Path) -> Path:
    """A folder of links to the first :data:`SMALL` images."""
    folder.mkdir()
    for path in paths[:SMALL]:
        (folder / Path(path).name).symlink_to(path)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/builtin/demo/rover-unlabeled")
    args = p.parse_args()
    paths = read_images(args.data).column("path").to_pylist()
    init_ray()
    print(f"{len(paths)} images of {args.data}; {len(os.sched_getaffinity(0))} CPU cores, "
          f"{torch.cuda.device_count()} GPUs")
    for name, (spec, size) in ENCODERS.items():
        torch.manual_seed(0)
        model = ContrastiveModel(**spec).eval()
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp, "run")
            save_model(run / "model.pt", model.state_dict(), model.spec, {"image_size": size})
            n_small, t_small = timed_embed(run, first_images(paths, Path(tmp, "small")), Path(tmp, "small.parquet"))
            n, wall = timed_embed(run, args.data, Path(tmp, "emb.parquet"))
        alone = encoder_only(model, paths, size)
        print(f"{name}: raysys embed {n / wall:,.0f} images/s end to end ({n} in {wall:.1f} s; {n_small} in "
              f"{t_small:.1f} s), {(n - n_small) / (wall - t_small):,.0f} images/s steady; "
              f"encoder alone {alone:,.0f} images/s")


if __name__ == "__main__":
    main()
