"""Benchmark: the pretraining loop on one GPU against the bare train step, ResNet-50 at 224 px with AMP.

(a) bare: the train step alone (both views in one forward, NT-Xent, backward, fused Adam) under bf16
    autocast, channels_last, on views made once and kept on the GPU -- the ceiling of any loop;
(b) ``raysys pretrain`` with one GPU worker, views made by Ray Data's CPU tasks (``--augment-on data``);
(c) the same with the views made on the GPU by the worker (``--augment-on worker``).

Images come from the built-in demo data (decoded and resized to the image size). The loops' figure is
the mean of the epochs after the first, read back from the runs' TensorBoard files. The last line is
``data/bare=R1 worker/bare=R2``. Sized for a few minutes on one GPU (it has not run on one yet);
``--device cpu`` with a small model checks the script itself on a machine without a GPU:

    python bench/gpu_step.py
    python bench/gpu_step.py --device cpu --backbone resnet18 --width 0.25 --small-stem --image-size 32 \
        --images 512 --epochs 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def bare_step_rate(args, images: np.ndarray, device: torch.device) -> float:
    """Images/s of the bare step on one preloaded pair of views (5 warm-up steps untimed)."""
    from raysys.data.augment import AugmentConfig, two_views
    from raysys.models import ContrastiveModel

    torch.manual_seed(0)
    batch = torch.from_numpy(images[: args.batch_size]).to(device)
    v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in two_views(batch, AugmentConfig(size=args.image_size)))
    model = ContrastiveModel(args.backbone, args.width, args.small_stem).to(device, memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, **fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # time finished work only
    for i in range(args.steps + 5):
        if i == 5:
            sync()
            start = time.perf_counter()
        with autocast:
            _, z = model(torch.cat([v1, v2]))
            loss = nt_xent(*z.chunk(2), 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def loop_rate(cfg, manifest, out: Path) -> float:
    """``pretrain`` itself: the mean images/s of the epochs after the first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raysys.distributed.trainer import pretrain

    pretrain(cfg.replace(out=str(out)), manifest, {})
    events = EventAccumulator(str(out / "tb")).Reload()
    return float(np.mean([e.value for e in events.Scalars("train/images_per_s")][1:]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=4096, help="pool size (built-in demo data)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each loop; the first is not timed")
    p.add_argument("--steps", type=int, default=30, help="timed steps of the bare step")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step.py: no CUDA device here; pass --device cpu to check the script on CPU")
    import ray

    from raysys.config import make_config
    from raysys.data.decode import load_images
    from raysys.data.sources import resolve_data

    gpu = args.device == "cuda"
    cfg = make_config("demo", backbone=args.backbone, width=args.width, small_stem=args.small_stem,
                      image_size=args.image_size, batch_size=args.batch_size, max_images=args.images,
                      epochs=args.epochs, schedule="constant", warmup_epochs=0, gpus_per_worker=1 if gpu else 0,
                      amp="bf16").replace(knn_monitor=None)
    manifest, _ = resolve_data(cfg)
    images = load_images(manifest.column("path").to_pylist()[: args.batch_size], args.image_size)[0]
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}: {args.backbone} x{args.width}, {args.image_size} px, batch {args.batch_size}, "
          f"{manifest.num_rows} images, bf16 autocast on GPU, channels_last", flush=True)
    bare = bare_step_rate(args, images, torch.device(args.device))
    print(f"{'(a) bare train step:':35s}{bare:8.1f} images/s", flush=True)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for where in ("data", "worker"):
            rates[where] = loop_rate(cfg.replace(augment_on=where), manifest, Path(tmp) / where)
            label = "(b) pretrain, views in Ray Data:" if where == "data" else "(c) pretrain, views on the device:"
            print(f"{label:35s}{rates[where]:8.1f} images/s", flush=True)
    ray.shutdown()
    print(f"data/bare={rates['data'] / bare:.2f} worker/bare={rates['worker'] / bare:.2f}")


if __name__ == "__main__":
    main()
