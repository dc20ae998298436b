"""The K sweep (paper Sec. 6.2, Fig. 5): cluster-aware contrastive learning for each K, beside the
SimCLR baseline and a supervised baseline, on Ray Tune.

    python experiments/sweep_k.py                       # demo preset on built-in data (~10 min on 2 cores)
    python experiments/sweep_k.py --preset smoke        # a minute or two
    ray job submit --working-dir . -- python experiments/sweep_k.py --preset paper --data /data/mars \\
        --gpus-per-worker 1
"""

import sys

from raysys.distributed.sweep import main, variant


def configure(parser):
    parser.add_argument("--k", type=int, nargs="+", help="numbers of clusters K (default: the preset's grid)")
    parser.add_argument("--encoder", default="texture",
                        help="clustering encoder: texture (the paper's deep texture clustering), a raysys "
                             "model/run folder, or oracle (true labels; simulated data diagnostics only)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the SimCLR baseline runs")

    def build(args, preset):
        variants = [] if args.no_baseline else [variant("baseline")]
        variants += [variant("cluster", k=k) for k in args.k or preset["ks"]]
        return dict(variants=variants, encoder=args.encoder, param="k", swept=["cluster"])

    return build


if __name__ == "__main__":
    sys.exit(main("sweep_k", __doc__.splitlines()[0], configure))
