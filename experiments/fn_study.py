"""Does false-negative elimination pay? Accuracy against optimizer steps, arm by arm, with paired seeds.

Every arm of a seed starts from the same initial weights and sees the same batches and views in the same
order (paired batches), so the gap between an arm and the SimCLR baseline at a step is the loss's doing.
Every --eval-every steps each trial scores kNN accuracy and balanced accuracy on pool images it never
pretrained on (hidden labels; MSL's train split as the bank); at the end the Appendix A linear probe runs on
MSL and HiRISE. Simulated data only: the oracle and supervised-contrastive arms read the hidden labels.

Arms: simclr (Eq. 1), oracle-elim (true same-class pairs removed from the negatives, the positive kept),
eq2-printed (the same, positives also out of the denominator: the paper's Eq. 2 as printed), decoupled
(decoupling alone: DCL), supcon (same-class pairs as positives: the positive control) and self-clusters
(label-free: the model's own K clusters, re-made every epoch).

    python experiments/fn_study.py                    # demo: 3 seeds x 600 steps x 6 arms (~80 min, 2 fast cores)
    python experiments/fn_study.py --preset smoke     # tests
    python experiments/fn_study.py --preset gpu       # 5 seeds x 1,000 steps, the arms sharing one GPU (~10 min)
    python experiments/fn_study.py --arms simclr oracle-elim eq2-printed supcon --seeds 3 --steps 1000
"""

import sys

from raysys.config import ConfigError
from raysys.distributed.sweep import main, variant

ARMS = {
    "simclr": dict(method="baseline"),
    "oracle-elim": dict(method="cluster", encoder="oracle", noise=0.0),
    "eq2-printed": dict(method="cluster", encoder="oracle", noise=0.0, decoupled=True),
    "decoupled": dict(method="baseline", decoupled=True),
    "supcon": dict(method="label"),
    "self-clusters": dict(method="cluster", encoder="self"),
}
# Study sizes per --preset: the step budget, evaluation spacing, global batch, seeds, self-clustering K, pool.
STUDY = {
    "smoke": dict(steps=12, eval_every=4, batch_size=64, seeds=1, k=4, max_images=512),
    "demo": dict(steps=600, eval_every=50, batch_size=128, seeds=3, k=20, max_images=2048),
    "gpu": dict(steps=1000, eval_every=50, batch_size=256, seeds=5, k=20, max_images=2048, gpus_per_worker=1 / 6),
}


def configure(parser):
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="arms to run; simclr, the baseline every gap is measured against, is always added "
                             "(default: all)")
    parser.add_argument("--steps", type=int, help="optimizer steps per trial (default: the preset's)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluation points (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    parser.add_argument("--k", type=int, help="self-clusters arm: K (default: the preset's)")

    def build(args, preset):
        size = STUDY[args.preset if args.preset in STUDY else "demo"]
        steps, every = args.steps or size["steps"], args.eval_every or size["eval_every"]
        if steps < 1 or every < 1:
            raise ConfigError(f"--steps and --eval-every must be at least 1 (got {steps}, {every})")
        if args.seeds is None:
            args.seeds = size["seeds"]
        if args.gpus_per_worker is None and "gpus_per_worker" in size:
            args.gpus_per_worker = size["gpus_per_worker"]
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
