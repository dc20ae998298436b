"""Benchmark: can a benchmark tell encoders apart at all? Frozen-feature separability per encoder.

For each encoder (untrained ResNets of the demo shape and wider, and any saved models), a multinomial
logistic regression (scikit-learn, to convergence, so no probe schedule is in play) is fitted on the
standardized frozen features of the train split. Printed per encoder: train accuracy (can the features
separate the classes at all?), test accuracy and balanced accuracy, and balanced accuracy of the majority
class against the rest (HiRISE: "other" against the seven landforms). When the train accuracy is near the
majority share for every encoder, the benchmark measures the features' failure, not the pretraining.

    python bench/benchmark_separability.py --benchmark data/builtin/demo/hirise-map-proj-v3_2 --model runs/pretrain
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from raysys.eval.features import benchmark_features
from raysys.eval.linear import load_benchmark
from raysys.models import ContrastiveModel
from raysys.models.io import load_saved


def encoders(widths: list[float], models: list[str]):
    """(name, model, image size): seeded untrained demo-shape backbones, then the saved models."""
    for w in widths:
        torch.manual_seed(0)
        yield f"random-init x{w:g}", ContrastiveModel("resnet18", w, True), 32
    for path in models:
        model, cfg = load_saved(path)
        yield path, model, int(cfg.get("image_size", 32))


def separability(x, y, tx, ty) -> dict:
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, tx = (x - mu) / sd, (tx - mu) / sd
    fit = LogisticRegression(max_iter=3000).fit(x, y)
    majority = np.bincount(y).argmax()
    rest = LogisticRegression(max_iter=3000).fit(x, y == majority)
    return {"train": float(np.mean(fit.predict(x) == y)), "test": float(np.mean(fit.predict(tx) == ty)),
            "balanced": balanced_accuracy_score(ty, fit.predict(tx)),
            "majority_vs_rest": balanced_accuracy_score(ty == majority, rest.predict(tx)),
            "majority_share": float(np.mean(y == majority))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", required=True, help="labeled benchmark folder (MSL v2.1 or HiRISE v3.2 layout)")
    p.add_argument("--model", action="append", default=[], help="saved model or run folder; repeatable")
    p.add_argument("--widths", type=float, nargs="*", default=[0.25, 1.0], help="untrained backbone widths")
    args = p.parse_args()
    manifest, names = load_benchmark(args.benchmark)
    print(f"{'encoder':<34} {'dim':>4} {'train acc':>9} {'test acc':>8} {'balanced':>8} {'majority vs rest':>16}")
    for name, model, size in encoders(args.widths, args.model):
        d = benchmark_features(model, manifest, size, progress=False)
        r = separability(d["train"]["x"], d["train"]["y"], d["test"]["x"], d["test"]["y"])
        print(f"{name:<34} {d['train']['x'].shape[1]:>4} {100 * r['train']:>8.1f}% {100 * r['test']:>7.1f}% "
              f"{100 * r['balanced']:>7.1f}% {100 * r['majority_vs_rest']:>15.1f}%", flush=True)
    print(f"majority share of train: {100 * r['majority_share']:.1f} %; chance balanced accuracy "
          f"{100 / len(names):.1f} % ({len(names)} classes), majority vs rest 50 %")


if __name__ == "__main__":
    main()
