"""The temperature sweep: SimCLR (or cluster-aware with ``--k``) for each InfoNCE temperature.

    python experiments/sweep_temperature.py                 # demo preset, built-in data
    python experiments/sweep_temperature.py --preset smoke
    python experiments/sweep_temperature.py --temperatures 0.05 0.1 0.2 0.5 1.0 --k 40
"""

import sys

from raysys.distributed.sweep import main, variant


def configure(parser):
    parser.add_argument("--temperatures", type=float, nargs="+",
                        help="temperatures to try (default: the preset's grid; paper preset: 0.05 0.1 0.2 0.5 1.0)")
    parser.add_argument("--k", type=int, help="sweep cluster-aware learning with this K instead of the baseline")
    parser.add_argument("--encoder", default="self", help="clustering encoder for --k (see sweep_k.py; default self)")

    def build(args, preset):
        method, params = ("cluster", {"k": args.k}) if args.k else ("baseline", {})
        variants = [variant(method, temperature=t, **params) for t in args.temperatures or preset["temperatures"]]
        return dict(variants=variants, encoder=args.encoder, param="temperature", swept=[method])

    return build


if __name__ == "__main__":
    sys.exit(main("sweep_temperature", __doc__.splitlines()[0], configure))
