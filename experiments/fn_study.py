"""Does false-negative elimination pay? Accuracy against optimizer steps, arm by arm, with paired seeds.

The arms of a seed start from the same weights and see the same batches and views (paired batches); every
--eval-every steps each scores kNN accuracy on pool images it never pretrained on (hidden labels), and at the
end the linear probe runs on MSL and HiRISE. Simulated data only: oracle and supcon read the hidden labels.
Arms: simclr (Eq. 1), oracle-elim (true false negatives out of the negatives, positive kept), eq2-printed
(also the positive out of the denominator: Eq. 2 as printed), decoupled (DCL), supcon (labels as positives:
the positive control); label-free detectors: self-clusters (the model's own K clusters, re-made every epoch),
ifnd (only the images most confident in those clusters, a growing share), fnc-elim / fnc-attract (each
anchor's most similar images of the batch, removed from its negatives / made its positives).

    python experiments/fn_study.py                    # demo: 9 arms x 3 seeds x 600 steps (~2 h, 2 fast cores)
    python experiments/fn_study.py --preset smoke     # tests
    python experiments/fn_study.py --preset gpu       # 5 seeds x 1,000 steps, six trials sharing one GPU
"""

import sys

from raysys.config import ConfigError
from raysys.config.presets import FN_STUDY_PRESETS
from raysys.distributed.sweep import add_budget_arguments, main, study_budget, variant

ARMS = {
    "simclr": dict(method="baseline", decoupled=False),  # explicit: the reading is the arm, not --decoupled
    "oracle-elim": dict(method="cluster", encoder="oracle", noise=0.0, decoupled=False),
    "eq2-printed": dict(method="cluster", encoder="oracle", noise=0.0, decoupled=True),
    "decoupled": dict(method="baseline", decoupled=True),
    "supcon": dict(method="label", decoupled=False),
    "self-clusters": dict(method="cluster", encoder="self", decoupled=False),
    "ifnd": dict(method="cluster", encoder="self-confident", decoupled=False),
    "fnc-elim": dict(method="fnc", cluster_mode="eliminate", decoupled=False),
    "fnc-attract": dict(method="fnc", cluster_mode="attract", decoupled=False),
}
CLUSTERED = ("self-clusters", "ifnd")  # the arms that cluster the pool into --k


def configure(parser):
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms to run; simclr, the baseline of every gap, is always added (default: all)")
    add_budget_arguments(parser)
    parser.add_argument("--k", type=int, help="self-clusters and ifnd arms: K (default: the preset's)")

    def build(args, preset):
        if args.decoupled:
            raise ConfigError("each arm carries its own loss reading (the decoupled and eq2-printed arms): "
                              "drop --decoupled")
        pretrain = study_budget(args)
        arms = ["simclr", *[a for a in dict.fromkeys(args.arms) if a != "simclr"]]
        k = args.k or FN_STUDY_PRESETS[args.preset]["k"]
        variants = [variant(**ARMS[a], arm=a, **({"k": k} if a in CLUSTERED else {})) for a in arms]
        return dict(variants=variants, encoder="oracle", param="arm", swept=arms, plot="steps", pretrain=pretrain,
                    supervised=False)

    return build


if __name__ == "__main__":
    sys.exit(main("fn_study", __doc__.splitlines()[0], configure))
