"""Does false-negative elimination pay? Accuracy against optimizer steps, arm by arm, with paired seeds.

The arms of a seed start from the same weights and see the same batches and views (paired batches); every
--eval-every steps each scores kNN accuracy on pool images it never pretrained on (hidden labels), and at the
end the linear probe runs on MSL and HiRISE. Simulated data only: oracle and supcon read the hidden labels.
Arms: simclr (Eq. 1), oracle-elim (true false negatives out of the negatives, positive kept), eq2-printed
(also the positive out of the denominator: Eq. 2 as printed), decoupled (DCL), supcon (labels as positives:
the positive control), self-clusters (label-free: the model's own K clusters, re-made every epoch).

    python experiments/fn_study.py                    # demo: 6 arms x 3 seeds x 600 steps (~90 min, 2 fast cores)
    python experiments/fn_study.py --preset smoke     # tests
    python experiments/fn_study.py --preset gpu       # 5 seeds x 1,000 steps, six trials sharing one GPU
"""

import sys

from raysys.config import ConfigError
from raysys.config.presets import FN_STUDY_PRESETS
from raysys.distributed.sweep import main, variant

ARMS = {
    "simclr": dict(method="baseline", decoupled=False),  # explicit: the reading is the arm, not --decoupled
    "oracle-elim": dict(method="cluster", encoder="oracle", noise=0.0, decoupled=False),
    "eq2-printed": dict(method="cluster", encoder="oracle", noise=0.0, decoupled=True),
    "decoupled": dict(method="baseline", decoupled=True),
    "supcon": dict(method="label", decoupled=False),
    "self-clusters": dict(method="cluster", encoder="self", decoupled=False),
}


def configure(parser):
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms to run; simclr, the baseline of every gap, is always added (default: all)")
    parser.add_argument("--steps", type=int, help="optimizer steps per trial (default: the preset's)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluation points (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    parser.add_argument("--k", type=int, help="self-clusters arm: K (default: the preset's)")

    def build(args, preset):
        size = FN_STUDY_PRESETS[args.preset]
        steps, every = (size[key] if value is None else value for key, value in
                        (("steps", args.steps), ("eval_every", args.eval_every)))
        if steps < 1 or every < 1 or args.decoupled:
            raise ConfigError(f"--steps and --eval-every must be at least 1 (got {steps}, {every}), and each arm "
                              "carries its own loss reading (the decoupled and eq2-printed arms): drop --decoupled")
        args.seeds = size["seeds"] if args.seeds is None else args.seeds
        args.gpus_per_worker = size.get("gpus_per_worker") if args.gpus_per_worker is None else args.gpus_per_worker
        arms = ["simclr", *[a for a in dict.fromkeys(args.arms) if a != "simclr"]]
        variants = [variant(**ARMS[a], arm=a, **({"k": args.k or size["k"]} if a == "self-clusters" else {}))
                    for a in arms]
        pretrain = dict(max_steps=steps, eval_every=every, paired_batches=True, batch_size=args.batch_size or
                        size["batch_size"], max_images=size["max_images"], schedule="constant", warmup_epochs=0)
        return dict(variants=variants, encoder="oracle", param="arm", swept=arms, plot="steps", pretrain=pretrain,
                    supervised=False)

    return build


if __name__ == "__main__":
    sys.exit(main("fn_study", __doc__.splitlines()[0], configure))
