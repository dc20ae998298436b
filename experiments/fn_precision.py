"""When does false-negative elimination pay? The noisy-oracle experiment: cluster ids are the pool's hidden
labels with a fraction ``--noise`` replaced by random ids, trained with cluster-aware elimination (and
attraction) beside the SimCLR baseline on Ray Tune; accuracy is plotted against the removed pairs' measured
precision (each point annotated with their recall), the baseline's mean ± spread as a band, and the summary
says above which precision (if any) elimination beats the baseline. Simulated data only: the oracle reads the
hidden labels. With --steps, every trial runs at the false-negative study's budget (fn_study.py: that step
budget, paired batches, the evaluation curve), and the last point's kNN accuracy on unseen pool images is
plotted too.

    python experiments/fn_precision.py                              # demo preset, 3 seeds, its 32 steps
    python experiments/fn_precision.py --steps 600 --noise 0.5 1 --modes eliminate   # at the study's budget
    python experiments/fn_precision.py --preset smoke --noise 0 1 --seeds 1
"""

import sys

from raysys.config import ConfigError
from raysys.distributed.sweep import add_budget_arguments, main, study_budget, variant

NOISE = (0.0, 0.25, 0.5, 0.75, 1.0)
MODES = ("eliminate", "attract")


def configure(parser):
    parser.add_argument("--noise", type=float, nargs="+", default=list(NOISE),
                        help="fractions of oracle cluster ids replaced by random ids (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="cluster rule modes: eliminate (same-cluster pairs are not negatives) and attract "
                             "(they are positives) (default: both)")
    add_budget_arguments(parser)
    parser.set_defaults(seeds=3)  # a claim about the baseline's spread needs at least 3

    def build(args, preset):
        bad = [n for n in args.noise if not 0 <= n <= 1]
        if bad:
            raise ConfigError(f"--noise {bad} out of range; pass fractions in [0, 1] such as 0 0.5 1")
        study = args.steps is not None or args.eval_every is not None or args.batch_size is not None
        variants = [variant("baseline")] + [variant("cluster", noise=n, cluster_mode=m)
                                            for m in args.modes for n in dict.fromkeys(args.noise)]
        return dict(variants=variants, encoder="oracle", param="noise", swept=["cluster"], plot="precision",
                    pretrain=study_budget(args) if study else None)

    return build


if __name__ == "__main__":
    sys.exit(main("fn_precision", __doc__.splitlines()[0], configure))
