"""Benchmark: images/s of the Ray Data two-view pipeline next to a torch DataLoader, in one run.

Both read the same JPEG files, decode and resize them to ``--decode-size`` and emit two augmented
views at ``--size`` per image. The DataLoader uses ``num_workers`` = cores and per-image torchvision
transforms (the usual recipe); the Ray pipeline uses batched tensor augmentation. Printed: images/s
of each, and the ratio Ray / DataLoader, streaming (decode every epoch) and with the decoded images
cached in the object store (what the smoke/demo presets train with).

    python bench/data_pipeline.py                 # 2,000 simulated 64 px images -> 32 px views
    python bench/data_pipeline.py --data DIR      # any folder of images
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
            image = torch.from_numpy(decode_image(f.read(), self.decode_size)).permute(2, 0, 1)
        return self.transform(image), self.transform(image)


def time_epochs(make_iter, epochs: int) -> float:
    """Images/s over ``epochs`` passes, after one untimed warm-up pass."""
    for _ in make_iter():
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for v1, _ in make_iter():
            count += len(v1)
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder of images (default: simulate 2,000 images)")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--decode-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()

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
    print(f"{len(paths)} images, decode {args.decode_size} px -> views {args.size} px, {cores} cores")

    loader = DataLoader(PerImageViews(paths, args.decode_size, cfg), batch_size=args.batch_size,
                        num_workers=cores, persistent_workers=True)
    dataloader_rate = time_epochs(lambda: iter(loader), args.epochs)
    print(f"torch DataLoader, per-image transforms, {cores} workers: {dataloader_rate:8.0f} images/s")

    import ray

    from raysys.distributed.pipeline import decoded_dataset, two_view_dataset

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    for name, cache in (("streaming", False), ("cached decode", True)):
        ds = two_view_dataset(decoded_dataset(manifest, args.decode_size, cache=cache), cfg)

        def batches(ds=ds):
            return ((b["view1"], b["view2"]) for b in ds.iter_torch_batches(batch_size=args.batch_size))

        results[name] = time_epochs(batches, args.epochs)
        print(f"Ray Data, batched augmentation, {name}: {results[name]:8.0f} images/s   "
              f"ratio {results[name] / dataloader_rate:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
