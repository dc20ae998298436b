"""The label-fraction experiment (``experiments/label_fraction.py``): label-fraction curves of saved
encoders -- or of one pretrained here first on Ray Train -- beside random-init encoders of the same spec,
on the MSL and HiRISE benchmarks. The curves are :mod:`raysys.eval.label_fraction`; the files
:mod:`raysys.reporting.label_fraction`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raysys.config import make_config
from raysys.config.presets import LABEL_FRACTION_PRESETS
from raysys.data.sampling import check_fractions, check_seeds
from raysys.data.sources import data_roots
from raysys.distributed.console import LOG_FILE, quiet_console, say
from raysys.distributed.trainer import pretrain
from raysys.errors import ConfigError, ModelFileError, run_command
from raysys.eval.label_fraction import (
    evaluate_label_fractions,
    load_encoders,
)
from raysys.models.io import MODEL_FILE, resolve_model_file
from raysys.reporting.html import write_report
from raysys.reporting.label_fraction import write_results

BENCHMARKS = ("msl", "hirise")


def _benchmarks(data, preset: str) -> dict[str, Path]:
    found = {k: v for k, v in data_roots(make_config(preset, data=data)).items() if k in BENCHMARKS}
    if not found:
        raise ConfigError(f"--data {data} holds no MSL or HiRISE benchmark; pass a folder holding them")
    return found


def _pretrain(out: Path, preset: str, data) -> str:
    """Pretrain an encoder with the preset (Ray Train) into ``out/pretrain``; reuse a finished one."""
    run_dir = out / "pretrain"
    if not (run_dir / MODEL_FILE).is_file():
        with quiet_console(run_dir):  # Ray's own output in the run's log; one line per epoch here
            say(f"[raysys] pretraining an encoder into {run_dir.resolve()}; Ray's own output in {LOG_FILE} there")
            pretrain(make_config(preset, out=str(run_dir), data=data).validate(), progress=True)
    return str(run_dir)


def run_experiment(
    models: list[str] | None, preset: str = "demo", out="runs/label_fraction", data=None, fractions=None,
    seeds: int | None = None, probe_epochs: int | None = None, device=None, progress: bool = True,
) -> dict:
    """Label-fraction curves of each saved encoder and of a random-init one of the same spec on the MSL
    and HiRISE benchmarks (built-in data of ``preset`` unless ``data``); without ``models`` an encoder is
    pretrained first. Writes :func:`write_results` into ``out``; returns their paths, the rows and summary."""
    if preset not in LABEL_FRACTION_PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; choose one of {sorted(LABEL_FRACTION_PRESETS)}")
    settings = LABEL_FRACTION_PRESETS[preset]
    fractions = check_fractions(settings["fractions"] if fractions is None else fractions)
    seeds = check_seeds(settings["seeds"] if seeds is None else seeds)
    probe_epochs = make_config(preset).eval_epochs if probe_epochs is None else probe_epochs
    if probe_epochs < 1:
        raise ConfigError(f"--probe-epochs must be at least 1 (got {probe_epochs})")
    if data is not None and not Path(data).is_dir():
        raise ConfigError(f"--data {data} is not a folder; pass the folder holding the benchmarks")
    for path in models or []:
        try:
            resolve_model_file(path)
        except ModelFileError as exc:
            raise ConfigError(f"--model: {exc}") from None
    out = Path(out)
    benchmarks = _benchmarks(data, preset)
    models = list(models or [_pretrain(out, preset, data)])
    encoders = load_encoders(models, make_config(preset).image_size)

    rows, majority = [], {}
    for benchmark, root in sorted(benchmarks.items()):
        for name, model, size in encoders:
            result = evaluate_label_fractions(model, root, size, fractions, seeds, probe_epochs,
                                              cache_dir=out / "feature-cache", device=device, progress=progress,
                                              desc=f"{benchmark} {name}")
            rows += [{**row, "encoder": name, "benchmark": benchmark} for row in result["rows"]]
            majority[benchmark] = result["majority"]
    files = write_results(rows, out, majority)
    return {**files, "rows": rows, "majority": majority, "encoders": [e[0] for e in encoders]}


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``experiments/label_fraction.py``."""
    p.add_argument("--model", action="append", help="run folder, checkpoint dir or model.pt of a pretrained "
                   "encoder; repeatable (default: pretrain one with --preset first)")
    p.add_argument("--preset", default="demo", choices=sorted(LABEL_FRACTION_PRESETS),
                   help="smoke: fractions 10/50/100 %%, 2 seeds; demo: 5..100 %% in steps of 5, 3 seeds "
                        "(default: %(default)s)")
    p.add_argument("--out", default="runs/label_fraction", help="output folder (default: %(default)s)")
    p.add_argument("--data", help="folder holding the MSL/HiRISE benchmarks (default: the preset's built-in data)")
    p.add_argument("--fractions", type=float, nargs="+", help="label fractions in (0, 1] (default: the preset's)")
    p.add_argument("--seeds", type=int, help="seeds per fraction (default: the preset's)")
    p.add_argument("--probe-epochs", type=int, help="probe epochs at 100 %% labels (default: the preset's eval_epochs)")
    p.add_argument("--device", help="torch device for feature extraction (default: cuda if available)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the experiment, print its table and where the files went."""
    result = run_experiment(args.model, args.preset, args.out, args.data, args.fractions, args.seeds,
                            args.probe_epochs, args.device)
    print(Path(result["table"]).read_text())
    print(f"results: {result['csv']}, {result['table']}, "
          + ", ".join(str(p) for p in result["plots"].values()))
    print(f"report: {write_report(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python experiments/label_fraction.py``: see :func:`run_experiment`; bad input exits 2 with one line."""
    parser = configure_parser(argparse.ArgumentParser(prog="label_fraction", description=__doc__.splitlines()[0]))
    return run_command("label_fraction", run, parser.parse_args(argv))
