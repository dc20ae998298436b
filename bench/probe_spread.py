"""Benchmark: how much the linear probe alone moves a result, holding the encoder fixed.

One encoder's features are extracted once per benchmark; then the probe is fitted with ``--seeds`` seeds (its
initial weights and batch order) for each variant: the default linear layer, the paper's 128-unit dense layer
(linear) and its ReLU variant, all with Appendix A's optimiser. Printed per benchmark and variant: accuracy and
balanced accuracy, mean ± std over the probe seeds. A difference between encoders smaller than this spread is
not the encoders'.

    python bench/probe_spread.py --model runs/pretrain                 # the demo's pretrained encoder
    python bench/probe_spread.py --model runs/pretrain --seeds 10 --benchmark PATH
"""

from __future__ import annotations

import argparse

import numpy as np

from raysys.config import PretrainConfig
from raysys.data.sources import data_roots
from raysys.eval.features import benchmark_features
from raysys.eval.linear import linear_probe, load_benchmark
from raysys.models.io import load_saved

VARIANTS = {"linear": dict(hidden=0), "dense-128": dict(hidden=128), "dense-128-relu": dict(hidden=128, activation="relu")}


def spread(model, root, image_size: int, seeds: int, epochs: int) -> dict:
    """``{variant: (accuracies, balanced accuracies)}`` over probe seeds 0..seeds-1 on fixed features."""
    manifest, names = load_benchmark(root)
    data = benchmark_features(model, manifest, image_size, progress=False)
    (x, y), (tx, ty) = ((data[s]["x"], data[s]["y"]) for s in ("train", "test"))
    out = {}
    for variant, kw in VARIANTS.items():
        runs = [linear_probe(x, y, tx, ty, len(names), epochs=epochs, seed=s, **kw) for s in range(seeds)]
        out[variant] = (np.array([r["accuracy"] for r in runs]), np.array([r["balanced_accuracy"] for r in runs]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="run folder, checkpoint directory or model file")
    p.add_argument("--benchmark", action="append", help="labeled benchmark folder; repeatable (default: built-in MSL and HiRISE)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, help="probe epochs (default: the run's eval_epochs)")
    args = p.parse_args()
    model, cfg = load_saved(args.model)
    epochs = args.epochs or int(cfg.get("eval_epochs", 100))
    roots = args.benchmark or [str(r) for k, r in data_roots(PretrainConfig.from_dict(cfg)).items() if k in ("msl", "hirise")]
    print(f"probe spread over {args.seeds} seeds, {epochs} epochs, encoder fixed ({args.model})")
    print(f"{'benchmark':<30} {'probe':<15} {'accuracy':>14} {'balanced':>14}")
    for root in roots:
        for variant, (acc, bal) in spread(model, root, int(cfg.get("image_size", 32)), args.seeds, epochs).items():
            print(f"{root.rstrip('/').split('/')[-1]:<30} {variant:<15} {100 * acc.mean():6.1f} ± {100 * acc.std(ddof=1):4.1f}"
                  f" {100 * bal.mean():6.1f} ± {100 * bal.std(ddof=1):4.1f}")


if __name__ == "__main__":
    main()
