"""Benchmark: views/s of the Ray Data two-view pipeline next to a torch DataLoader, in one run.

Both read the same JPEG files, decode and resize them to ``--decode-size`` and emit two augmented
views at ``--size`` per image. The DataLoader uses ``num_workers`` = ``--logical-cpus`` and per-image
torchvision transforms (the usual recipe); the Ray pipeline (``pretrain_dataset``, as training builds it)
uses batched tensor augmentation on a Ray started with that many logical CPUs. Printed: views/s of each
and the ratio Ray / DataLoader, streaming (decode every epoch) and with the decoded images cached in
the object store (what the smoke/demo presets train with); then how many augment tasks ran at once
(Ray Data's own stats, last cached epoch): ``augment tasks at once: N of CPUS``.

    python bench/data_pipeline.py                    # 2,000 simulated 64 px images -> 32 px views
    python bench/data_pipeline.py --logical-cpus 8   # Ray and the DataLoader as on 8 CPUs
    python bench/data_pipeline.py --data DIR         # any folder of images
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset

from raysys.data.augment import AugmentConfig, per_image_transform
from raysys.data.decode import decode_image
from raysys.data.formats import read_folder


class PerImageViews(Dataset):
    """The DataLoader reference: decode one file, then two per-image torchvision views."""

    def __init__(self, paths, decode_size, cfg):
        self.paths, self.decode_size, self.transform = paths, decode_size, per_image_transform(cfg)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            image = torch.from_numpy(decode_image(f.read(), self.decode_size).copy()).permute(2, 0, 1)
        return self.transform(image), self.transform(image)


def time_epochs(make_iter, epochs: int) -> float:
    """Views/s (two per image) over ``epochs`` passes, after one untimed warm-up pass."""
    for _ in make_iter():
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for v1, _ in make_iter():
            count += 2 * len(v1)
    return count / (time.perf_counter() - start)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder of images (default: simulate --count images)")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--decode-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--logical-cpus", type=int, help="Ray's CPUs and the DataLoader's workers (default: the cores)")
    return p.parse_args(argv)


def ray_rates(manifest, cfg: AugmentConfig, args, cpus: int) -> dict:
    """Views/s of the training pipeline, streaming and cached, and the augment tasks at once (cached)."""
    import ray

    from raysys.distributed.pipeline import peak_tasks, pretrain_dataset

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    for name, cache in (("streaming", False), ("cached decode", True)):
        ds = pretrain_dataset(manifest, cfg, args.size, cache=cache, decode_size=args.decode_size)

        def batches(ds=ds):
            return ((b["view1"], b["view2"]) for b in ds.iter_torch_batches(batch_size=args.batch_size))

        results[name] = time_epochs(batches, args.epochs)
    results["at once"] = peak_tasks(ds, "two_views_batch")
    ray.shutdown()
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.data is None:
        from raysys.data.simulate import simulate

        root = simulate(tempfile.mkdtemp(prefix="raysys-bench-"), preset="smoke", size=args.decode_size,
                        count=args.count, progress=False)["rover"]
    else:
        root = args.data
    manifest = read_folder(root)
    paths = manifest.column("path").to_pylist()
    cfg = AugmentConfig(size=args.size)
    cores = len(os.sched_getaffinity(0))
    cpus = args.logical_cpus or cores
    print(f"{len(paths)} images, decode {args.decode_size} px -> views {args.size} px, {cores} cores, "
          f"{cpus} logical CPUs for Ray and the DataLoader", flush=True)

    loader = DataLoader(PerImageViews(paths, args.decode_size, cfg), batch_size=args.batch_size,
                        num_workers=cpus, persistent_workers=True)
    dataloader_rate = time_epochs(lambda: iter(loader), args.epochs)
    del loader  # its worker processes: gone before Ray's start
    print(f"torch DataLoader, per-image transforms, {cpus} workers: {dataloader_rate:8.0f} views/s", flush=True)
    results = ray_rates(manifest, cfg, args, cpus)
    for name in ("streaming", "cached decode"):
        print(f"Ray Data, batched augmentation, {name}: {results[name]:8.0f} views/s   "
              f"ratio {results[name] / dataloader_rate:.2f}x")
    print(f"augment tasks at once: {results['at once']} of {cpus}")


if __name__ == "__main__":
    main()
