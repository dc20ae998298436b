"""ESS (seed 001): spatial positives on MoCo v2. MoCo v2 (instance positives) vs ESS-MB (every frame
captured within a radius is a positive) vs ESS-MW (positives weighted by exp(-d^2/2 sigma^2)), a Tune
grid over the radius and sigma, beside the untrained encoder (random-init); every encoder is scored by place
recognition on held-out traverses (never pretrained on; each query matched against the other traverses) and
by the linear probe on MSL and HiRISE.

    python experiments/ess.py                          # demo preset, built-in data (positions simulated)
    python experiments/ess.py --preset smoke
    python experiments/ess.py --radii 4 8 16 --sigmas 2 4 --framework simclr
    python experiments/ess.py --preset paper --data /data/mars --gpus-per-worker 1   # needs positions.csv

Radius and sigma default to values derived from the pool's frame spacing (printed at start).
"""

import sys

from raysys.distributed.sweep import main, variant


def configure(parser):
    parser.add_argument("--radii", type=float, nargs="+", help="ESS radii in metres (default: derived)")
    parser.add_argument("--sigmas", type=float, nargs="+", help="ESS-MW sigmas in metres (default: derived)")
    parser.add_argument("--framework", choices=("moco", "simclr"), default="moco",
                        help="moco (MoCo v2, the seed's setting; default) or simclr (SimCLR + ESS)")
    parser.add_argument("--queue-size", type=int, help="MoCo queue length (default: 65536, clamped below the pool)")

    def build(args, preset):
        radii, sigmas = args.radii or [None], args.sigmas or [None]
        variants = [variant("random-init"), variant("baseline")]  # the untrained encoder's recall beside all
        variants += [variant("ess-mb", ess_radius=r) for r in radii]
        variants += [variant("ess-mw", ess_radius=r, ess_sigma=s) for r in radii for s in sigmas]
        pretrain = {"framework": args.framework, "queue_size": args.queue_size}
        return dict(variants=variants, pretrain=pretrain, param="method", swept=[], plot="bars",
                    place_recognition=True, supervised=False)

    return build


if __name__ == "__main__":
    sys.exit(main("ess", __doc__.splitlines()[0], configure))
