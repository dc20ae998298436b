"""Benchmark: the pretraining loop against the bare train step and lightly's SimCLR loop, in one run.

Same model, images, batch and image size for all three:

(a) bare: the train step alone (forward of both views, NT-Xent, backward, Adam) on views made once
    and kept in memory -- the ceiling any loop can reach with plain eager PyTorch;
(b) raysys: ``raysys pretrain`` itself (Ray Data decode + augment, a Ray Train worker), kNN monitor off;
    its steady state is the mean of the epochs after the first, read from the run's TensorBoard files;
(c) lightly: lightly's SimCLR recipe (DataLoader with 2 workers + SimCLRTransform + NTXentLoss), run
    by a virtualenv of its own that the bench creates once under ``bench/.lightly-env``
    (``--no-lightly`` skips it; so does a failed install, said on stdout).

Figures are images/s (each image is two views). The last line is ``raysys/bare=R1 raysys/lightly=R2``.

    python bench/train_loop.py                              # demo model, 1,920 images, ~5 min
    python bench/train_loop.py --width 1 --images 960       # full ResNet-18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
LIGHTLY_ENV = HERE / ".lightly-env"
LIGHTLY_PACKAGES = ["lightly==1.6.0", "torch", "torchvision"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent in its usual eager form (the bare step's loss)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def bare_step_rate(args, images: np.ndarray, steps: int) -> float:
    """Images/s of the bare train step on one preloaded pair of views (3 warm-up steps untimed)."""
    from raysys.data.augment import AugmentConfig, two_views
    from raysys.distributed.runtime import torch_threads
    from raysys.models import ContrastiveModel

    torch.set_num_threads(torch_threads(1))
    torch.manual_seed(0)
    v1, v2 = two_views(torch.from_numpy(images[: args.batch_size]), AugmentConfig(size=args.image_size))
    model = ContrastiveModel(args.backbone, args.width, args.small_stem).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        _, z = model(torch.cat([v1, v2]))
        loss = nt_xent(*z.chunk(2), 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * args.batch_size / (time.perf_counter() - start)


def raysys_loop_rate(args, cfg, manifest, out: Path) -> dict:
    """``pretrain`` itself: steady-state images/s (epochs after the first) and the run's fixed cost."""
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raysys.distributed.trainer import pretrain

    run = pretrain(cfg.replace(out=str(out)), manifest, {})
    ray.shutdown()  # its idle daemons would slow the second bare measurement
    events = EventAccumulator(str(out / "tb")).Reload()
    rates = [e.value for e in events.Scalars("train/images_per_s")][1:]
    return {"images_per_s": float(np.mean(rates)), "epochs_timed": len(rates), "timing": run["timing"]}


def ensure_lightly_env() -> Path | None:
    """The lightly virtualenv's python, installed on first use; None (said) when that fails."""
    python, installed = LIGHTLY_ENV / "bin" / "python", LIGHTLY_ENV / "installed"
    if not installed.exists():  # a marker, not the interpreter: an interrupted install is redone
        print(f"installing {' '.join(LIGHTLY_PACKAGES)} into {LIGHTLY_ENV} (once, ~2 min)", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(LIGHTLY_ENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *LIGHTLY_PACKAGES], check=True, stdout=subprocess.DEVNULL)
            installed.touch()
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"lightly: install failed ({exc}); skipping (c)")
            return None
    return python


def lightly_loop_rate(args, images: np.ndarray, tmp: Path) -> float | None:
    """lightly's SimCLR loop in its own environment (``bench/lightly_loop.py``); None when unavailable."""
    python = ensure_lightly_env()
    if python is None:
        return None
    np.save(tmp / "images.npy", images)
    cmd = [str(python), str(HERE / "lightly_loop.py"), str(tmp / "images.npy"), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--backbone", args.backbone, "--width", str(args.width),
           "--image-size", str(args.image_size)] + (["--small-stem"] if args.small_stem else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if done.returncode:
        print(f"lightly: the loop failed; skipping (c)\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--no-small-stem", dest="small_stem", action="store_false")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=1920, help="pool size (built-in demo data)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of (b) and (c); the first is not timed")
    p.add_argument("--no-lightly", action="store_true", help="skip (c)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from raysys.config import make_config
    from raysys.data.decode import load_images
    from raysys.data.sources import resolve_data

    cfg = make_config("demo", backbone=args.backbone, width=args.width, small_stem=args.small_stem,
                      image_size=args.image_size, batch_size=args.batch_size, max_images=args.images,
                      epochs=args.epochs, schedule="constant", warmup_epochs=0).replace(knn_monitor=None)
    manifest, _ = resolve_data(cfg)
    images = load_images(manifest.column("path").to_pylist(), args.image_size)[0]
    steps = max(10, (len(images) // args.batch_size) * (args.epochs - 1))
    print(f"model {args.backbone} x{args.width} ({'small' if args.small_stem else 'ImageNet'} stem), "
          f"{args.image_size} px, batch {args.batch_size}, {len(images)} images, {os.cpu_count()} cores", flush=True)
    before = bare_step_rate(args, images, steps)
    print(f"(a) bare train step:   {before:8.1f} images/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        lightly = None if args.no_lightly else lightly_loop_rate(args, images, Path(tmp))
        if lightly:
            print(f"(c) lightly SimCLR:    {lightly:8.1f} images/s", flush=True)
        loop = raysys_loop_rate(args, cfg, manifest, Path(tmp) / "run")
    print(f"(b) raysys pretrain:   {loop['images_per_s']:8.1f} images/s (mean of {loop['epochs_timed']} epochs)")
    # These machines drift in speed over minutes: (a) again after the others, and the mean of both is the reference.
    after = bare_step_rate(args, images, steps)
    bare = (before + after) / 2
    print(f"(a) bare, again:       {after:8.1f} images/s (reference: the mean, {bare:.1f})")
    print("    (b)'s wall time: " + ", ".join(f"{key} {seconds:.1f} s" for key, seconds in loop["timing"].items()))
    ratios = f"raysys/bare={loop['images_per_s'] / bare:.2f}"
    ratios += f" raysys/lightly={loop['images_per_s'] / lightly:.2f}" if lightly else " raysys/lightly=n/a"
    print(ratios)


if __name__ == "__main__":
    main()
