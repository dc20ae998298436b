"""The mixed-domain ratio sweep (paper Sec. 4.3 / 5.3, Table 2): pretrain on the Mars pool with a
fraction ``mix_ratio`` replaced by a diverse domain (total held constant), for each ratio.

    python experiments/sweep_mix_ratio.py                   # demo preset, built-in data
    python experiments/sweep_mix_ratio.py --preset smoke
    python experiments/sweep_mix_ratio.py --preset paper --data /data/mars --mix-data /data/imagenet/train \\
        --max-images 100000 --gpus-per-worker 1

Ratio 0 is the SimCLR baseline (Mars only), ratio 1 pretrains on the diverse domain alone.
"""

import sys

from raysys.distributed.sweep import main, variant


def configure(parser):
    parser.add_argument("--ratios", type=float, nargs="+",
                        help="out-of-domain fractions to try (default: the preset's grid; paper: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--mix-data", help="out-of-domain ImageFolder (default: the built-in diverse/ dataset)")
    parser.add_argument("--max-images", type=int,
                        help="pool size held constant across ratios (default: the preset's, which the "
                             "diverse domain can fill at ratio 1)")

    def build(args, preset):
        variants = [variant("mixed", mix_ratio=r) for r in args.ratios or preset["mix_ratios"]]
        pretrain = {"max_images": args.max_images or preset["mix_images"], "mix_data": args.mix_data}
        return dict(variants=variants, pretrain=pretrain, param="mix_ratio", swept=["mixed"])

    return build


if __name__ == "__main__":
    sys.exit(main("sweep_mix_ratio", __doc__.splitlines()[0], configure))
