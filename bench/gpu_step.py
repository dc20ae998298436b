"""Benchmark: the pretraining loop on one GPU against the bare train step, ResNet-50 at 224 px with AMP.

(a) bare: the train step alone (both views in one forward, NT-Xent, backward, fused Adam) under bf16
    autocast, channels_last, on views made once and kept on the GPU -- the ceiling of any loop;
(b) ``raysys pretrain`` with one GPU worker, views made by Ray Data's CPU tasks (``--augment-on data``);
(c) the same with the views made on the GPU by the worker (``--augment-on worker``, what auto picks there);
(d) the paper preset (batch 128, no decode cache) for ``--paper-steps`` steps, at the model and size given
    (the defaults are the paper's: ResNet-50, 224 px).

Images come from the built-in demo data. Each loop is time-boxed (``--loop-seconds``, Ray Train's start
included): one cut short reports the rate it reached. A loop's rate is read back from its TensorBoard
file, between the first and the last step logged (the first epoch's start is not in it). The last line is
``worker/bare=R1 data/bare=R2 paper_preset_images_per_s=X``. Sized for under 4 minutes on one GPU with
Ray's start; ``--device cpu`` with a small model checks the script on a machine without a GPU:

    python bench/gpu_step.py
    python bench/gpu_step.py --device cpu --backbone resnet18 --width 0.25 --small-stem --image-size 32 \
        --images 512 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
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
    """Images/s of the bare step on one preloaded pair of views (5 warm-up steps untimed), stopping early at
    ``--loop-seconds``."""
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
    steps, deadline = 0, time.perf_counter() + args.loop_seconds
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
        steps += i >= 5
        if i >= 5 and time.perf_counter() > deadline:
            break
    sync()
    return steps * args.batch_size / (time.perf_counter() - start)


def logged_rate(tb_dir: Path, batch_size: int) -> float:
    """Images/s between the first and the last optimizer step the run logged (per-step loss every few steps,
    the epoch scalars at each epoch's end): NaN with fewer than two."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return float("nan")
    events = EventAccumulator(str(tb_dir)).Reload()
    tags = [t for t in ("train/loss_step", "train/loss") if t in events.Tags()["scalars"]]
    points = sorted({e.step: e.wall_time for tag in tags for e in events.Scalars(tag)}.items())
    if len(points) < 2:
        return float("nan")
    (first, t0), (last, t1) = points[0], points[-1]
    return (last - first) * batch_size / (t1 - t0)


def boxed_rate(cfg, manifest, out: Path, seconds: float) -> tuple[float, bool]:
    """``pretrain`` itself, stopped after ``seconds`` as Ctrl-C stops it (Ray Train's SIGINT handler aborts the
    run; the run may then end, fail or exit): its logged rate, and whether it was cut short."""
    import ray

    from raysys.distributed.trainer import pretrain

    fired = threading.Event()

    def stop() -> None:
        fired.set()
        os.kill(os.getpid(), signal.SIGINT)

    timer, handler = threading.Timer(seconds, stop), signal.getsignal(signal.SIGINT)
    timer.start()
    try:
        pretrain(cfg.replace(out=str(out)), manifest, {})
    except (Exception, KeyboardInterrupt, SystemExit):
        if not fired.is_set():
            raise
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, handler)  # Ray Train leaves its handler behind
    if fired.is_set():
        ray.shutdown()  # whatever the aborted run left; the next pretrain starts Ray again
    return logged_rate(out / "tb", cfg.batch_size), fired.is_set()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=4096, help="pool size (built-in demo data)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of loops (b) and (c)")
    p.add_argument("--steps", type=int, default=30, help="timed steps of the bare step")
    p.add_argument("--paper-steps", type=int, default=40, help="optimizer steps of the paper preset's run (d)")
    p.add_argument("--loop-seconds", type=float, default=50.0, help="time box of each loop, its start included")
    return p.parse_args(argv)


def loops(args, manifest, gpu: bool) -> dict:
    """Loops (b), (c) and (d): each one's rate and whether it was cut short."""
    from raysys.config import make_config

    model = dict(backbone=args.backbone, width=args.width, small_stem=args.small_stem, image_size=args.image_size,
                 gpus_per_worker=1 if gpu else 0, amp="bf16", max_images=args.images)
    demo = make_config("demo", **model, batch_size=args.batch_size, epochs=args.epochs, schedule="constant",
                       warmup_epochs=0)
    paper = make_config("paper", **model, max_steps=args.paper_steps)
    demo = demo.replace(knn_monitor=None)
    runs = {"data": demo.replace(augment_on="data"), "worker": demo.replace(augment_on="worker"),
            "paper": paper.replace(knn_monitor=None)}
    labels = {"data": "(b) pretrain, views in Ray Data:", "worker": "(c) pretrain, views on the device:",
              "paper": f"(d) paper preset, {args.paper_steps} steps:"}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in runs.items():
            rates[name], cut = boxed_rate(cfg, manifest, Path(tmp) / name, args.loop_seconds)
            note = f" (cut at {args.loop_seconds:.0f} s: the rate reached)" if cut else ""
            print(f"{labels[name]:38s}{rates[name]:8.1f} images/s{note}", flush=True)
    return rates


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_step.py: no CUDA device here; pass --device cpu to check the script on CPU")
    import ray

    from raysys.config import make_config
    from raysys.data.decode import load_images
    from raysys.data.sources import resolve_data

    start = time.perf_counter()
    gpu = args.device == "cuda"
    manifest, _ = resolve_data(make_config("demo", max_images=args.images, batch_size=args.batch_size))
    images = load_images(manifest.column("path").to_pylist()[: args.batch_size], args.image_size)[0]
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}: {args.backbone} x{args.width}, {args.image_size} px, batch {args.batch_size}, "
          f"{manifest.num_rows} images, bf16 autocast on GPU, channels_last", flush=True)
    bare = bare_step_rate(args, images, torch.device(args.device))
    print(f"{'(a) bare train step:':38s}{bare:8.1f} images/s", flush=True)
    rates = loops(args, manifest, gpu)
    ray.shutdown()
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    print(f"worker/bare={rates['worker'] / bare:.2f} data/bare={rates['data'] / bare:.2f} "
          f"paper_preset_images_per_s={rates['paper']:.1f}")


if __name__ == "__main__":
    main()
