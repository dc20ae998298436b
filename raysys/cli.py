"""The ``raysys`` command: ``simulate``, ``pretrain``, ``cluster``, ``linear-eval``, ``fn-sim``, ``positions``,
``visualize``, ``report``.

Only the named subcommand's module is imported, so ``raysys --help`` and the light commands never load
Ray, and arguments are validated before any Ray start. Bad input (a :class:`raysys.errors.RaysysError`)
prints one line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from raysys.config import add_pretrain_arguments, config_from_args
from raysys.errors import run_command

# name -> (module with configure_parser(p) and run(args), help); ``pretrain`` takes the config's own flags.
COMMANDS = {
    "simulate": ("raysys.data.simulate", "write the built-in Mars-like datasets in the real formats"),
    "pretrain": (None, "contrastive pretraining on Ray Train, then linear evaluation"),
    "cluster": ("raysys.distributed.cluster_command",
                "unsupervised clusters of the pretraining pool (k-means on encoder features)"),
    "linear-eval": ("raysys.eval.linear", "linear evaluation of a saved encoder on labeled benchmarks"),
    "fn-sim": ("raysys.eval.fnsim", "simulate false-negative view pairs per batch (paper Appendix B)"),
    "positions": ("raysys.data.positions", "build the positions.csv sidecar from NASA raw-image metadata"),
    "visualize": ("raysys.reporting.visualize",
                  "t-SNE of an encoder's features drawn with image thumbnails, and a TensorBoard projector"),
    "report": ("raysys.reporting.html", "write DIR/report.html: one self-contained page of an experiment"),
    "export": ("raysys.models.export", "write a run's encoder (no projection head) as torchvision, safetensors, "
                                       "ONNX or TorchScript"),
    "embed": ("raysys.distributed.embed", "embed every image of a dataset into a Parquet file (Ray Data batch inference)"),
    "search": ("raysys.eval.search", "nearest neighbours of an image in an embeddings file (cosine similarity)"),
}


def _pretrain(args) -> int:
    cfg = config_from_args(args)  # validated before the distributed layer (and Ray) is imported
    from raysys.distributed.experiment import pretrain_and_evaluate

    pretrain_and_evaluate(cfg, run_eval=not args.no_eval, verbose=args.verbose)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed and ``command``'s options added (its module imported)."""
    parser = argparse.ArgumentParser(prog="raysys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name != command:
            continue
        if module_name is None:
            add_pretrain_arguments(p)
            p.add_argument("--verbose", action="store_true", help="show Ray's own output (Data progress, Train "
                           "reports, actor logs) on the console; default: in the run folder's ray-output.log")
            p.set_defaults(func=_pretrain)
        else:
            module = importlib.import_module(module_name)
            module.configure_parser(p)
            p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return run_command(f"raysys {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
