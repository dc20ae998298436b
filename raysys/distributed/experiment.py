"""Pretrain, then score the encoder by linear evaluation beside random-init and majority baselines."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from raysys.config import PretrainConfig
from raysys.data.sources import data_sources
from raysys.distributed.console import LOG_FILE, quiet_console, say
from raysys.distributed.runtime import publish_run
from raysys.distributed.trainer import pretrain
from raysys.eval.linear import evaluate
from raysys.models import ContrastiveModel
from raysys.models.io import load_model
from raysys.reporting.html import write_report


def evaluate_run(run: dict, cfg: PretrainConfig) -> list[dict]:
    """Linear evaluation of the pretrained encoder and of the same architecture at random init."""
    out = Path(run["out"])
    pretrained = load_model(out)
    torch.manual_seed(cfg.seed)
    random_init = ContrastiveModel.from_spec(pretrained.spec)  # fresh weights, same architecture
    rows = []
    for name, root in sorted(run["benchmarks"].items()):
        for encoder, model in (("pretrained", pretrained), ("random-init", random_init)):
            tag = name if encoder == "pretrained" else f"{name}-random-init"
            result = evaluate(model, root, out, tag, cfg.image_size, hidden=cfg.eval_hidden, activation=cfg.eval_activation,
                              epochs=cfg.eval_epochs, seed=cfg.seed, cache_dir=out / "feature-cache")
            metrics = result["metrics"]
            rows.append({"benchmark": name, "encoder": encoder, "accuracy": metrics["accuracy"],
                         "balanced_accuracy": metrics["balanced_accuracy"]})
        majority = result["majority"]
        rows.append({"benchmark": name, "encoder": "majority class", "accuracy": majority["accuracy"],
                     "balanced_accuracy": majority["balanced_accuracy"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'benchmark':<10} {'encoder':<15} {'accuracy':>9} {'balanced':>9}"]
    lines += [f"{r['benchmark']:<10} {r['encoder']:<15} {100 * r['accuracy']:>8.1f}% "
              f"{100 * r['balanced_accuracy']:>8.1f}%" for r in rows]
    return "\n".join(lines)


def pretrain_and_evaluate(cfg: PretrainConfig, run_eval: bool = True, verbose: bool = False) -> dict:
    """The pretraining demo: pretrain (one line per epoch on the console; Ray's own output in the run folder's
    log unless ``verbose``), evaluate, print and save the table (``summary.json``)."""
    with quiet_console(cfg.out, verbose):
        say(f"[raysys] pretraining into {Path(cfg.out).resolve()}; Ray's own output in {LOG_FILE} there "
            "(--verbose shows it here)")
        sources = data_sources(cfg)
        for line in sources.lines:
            say(f"[raysys] {line}")
        run = pretrain(cfg, sources.manifest, sources.benchmarks, progress=True)
        metrics = run["metrics"] or {}
        say(f"pretraining finished: step {metrics.get('step')} (epoch {metrics.get('epoch', 0):.2f} of the pool), loss "
            f"{metrics.get('loss', float('nan')):.4f}, {metrics.get('images_per_s', 0):.0f} images/s; run folder {run['out']}")
        if run_eval:
            say(f"[raysys] linear evaluation on {', '.join(sorted(run['benchmarks'])) or 'no benchmark'} "
                "(pretrained, random-init, majority class)")
        rows = evaluate_run(run, cfg) if run_eval else []
        if rows:
            say(format_table(rows))
        summary = {"metrics": metrics, "linear_eval": rows, "skipped_files": run["skipped_files"],
                   "command": " ".join(["python", *map(shlex.quote, sys.argv)])}  # shown by report.html
        (Path(run["out"]) / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"report: {write_report(run['out'])}")
        publish_run(Path(run["out"]), cfg.storage)  # the evaluations and the report join the run in shared storage
    return summary
