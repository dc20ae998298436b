"""The ``raysys`` command: ``simulate``, ``pretrain``, ``cluster``, ``linear-eval``, ``fn-sim``, ``positions``,
``visualize``, ``report``.

Arguments are validated before any heavy import or Ray start, so a bad value costs a second, not a
cluster start; such errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from raysys.config import ConfigError, add_pretrain_arguments, config_from_args
from raysys.data.formats import DataError


def _pretrain(args) -> int:
    cfg = config_from_args(args)
    from raysys.distributed.experiment import pretrain_and_evaluate  # imports Ray: only after validation

    pretrain_and_evaluate(cfg, run_eval=not args.no_eval)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from raysys.distributed import clustering
    from raysys.eval import linear as evaluate
    from raysys.eval import fnsim
    from raysys.reporting import html as html_report
    from raysys.data import positions
    from raysys.reporting import visualize
    from raysys.data import simulate

    parser = argparse.ArgumentParser(prog="raysys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="contrastive pretraining on Ray Train, then linear evaluation")
    add_pretrain_arguments(p)
    p.set_defaults(func=_pretrain)
    # Subcommands whose module brings its own configure_parser(p) and run(args).
    for name, module, text in (
        ("simulate", simulate, "write the built-in Mars-like datasets in the real formats"),
        ("cluster", clustering, "unsupervised clusters of the pretraining pool (k-means on encoder features)"),
        ("linear-eval", evaluate, "linear evaluation of a saved encoder on labeled benchmarks"),
        ("fn-sim", fnsim, "simulate false-negative view pairs per batch (paper Appendix B)"),
        ("positions", positions, "build the positions.csv sidecar from NASA raw-image metadata"),
        ("visualize", visualize, "t-SNE of an encoder's features drawn with image thumbnails, and a TensorBoard projector"),
        ("report", html_report, "write DIR/report.html: one self-contained page of an experiment"),
    ):
        p = sub.add_parser(name, help=text)
        module.configure_parser(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"raysys {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
