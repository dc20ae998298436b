"""The K sweep (paper Sec. 6.2, Fig. 5): cluster-aware contrastive learning for each K, beside the
SimCLR baseline and a supervised baseline, on Ray Tune.

    python experiments/sweep_k.py                       # demo preset: 600 steps a trial (~25 min on 2 fast cores)
    python experiments/sweep_k.py --epochs 2            # the Quickstart's 32 steps (~5 min): the pipeline, not the effect
    python experiments/sweep_k.py --preset smoke        # a minute or two
    ray job submit --working-dir . -- python experiments/sweep_k.py --preset paper --data /data/mars \\
        --gpus-per-worker 1
"""

import argparse
import sys

from raysys.distributed.clustering import add_texture_arguments, texture_settings
from raysys.distributed.sweep import main, variant


def configure(parser):
    parser.add_argument("--k", type=int, nargs="+", help="numbers of clusters K (default: the preset's grid)")
    parser.add_argument("--encoder", default="self",
                        help="clustering encoder: self (default: each trial re-clusters the pool from its own "
                             "features during training, as IFND); texture (the paper's deep texture clustering); baseline "
                             "(two stages: each seed's SimCLR baseline clusters the pool for its cluster trials); "
                             "a raysys model/run folder; or oracle (true labels; simulated data diagnostics only)")
    parser.add_argument("--self-warmup", type=int, help="--encoder self: epochs of plain SimCLR before the first "
                        "clustering (default 1)")
    parser.add_argument("--self-every", type=int, help="--encoder self: re-cluster every this many epochs (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the SimCLR baseline runs")
    parser.add_argument("--random-init", action=argparse.BooleanOptionalAction, help="add (or skip) the untrained "
                        "encoder, evaluated like the rest: the figures' reference line (default: the preset's)")
    add_texture_arguments(parser)

    def build(args, preset):
        variants = [] if args.no_baseline else [variant("baseline")]
        variants += [variant("cluster", k=k) for k in args.k or preset["ks"]]
        if preset.get("random_init") if args.random_init is None else args.random_init:
            variants.append(variant("random-init"))
        schedule = dict(self_cluster_warmup=args.self_warmup, self_cluster_every=args.self_every,
                        max_steps=None if args.epochs else preset.get("k_steps"))  # the study's budget
        return dict(variants=variants, encoder=args.encoder, param="k", swept=["cluster"],
                    pretrain={k: v for k, v in schedule.items() if v is not None}, texture=texture_settings(args))

    return build


if __name__ == "__main__":
    sys.exit(main("sweep_k", __doc__.splitlines()[0], configure))
