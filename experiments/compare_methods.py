"""Methods side by side (paper Fig. 3, Table 2): by default the paper's three -- SimCLR baseline,
mixed-domain (ratio 0.5), cluster-aware (a given K, or the best K of an earlier K sweep) --, the label-free
false-negative detector that measured best in the false-negative study (fnc: per-anchor elimination, docs/results.md)
and the supervised baseline, all on one pool size. ``--methods`` takes any registered method: MoCo v2 (``moco``, temperature
0.2), every pair rule (label, ess-mb, ...), the pretext tasks rotation, relative-position, jigsaw and
colorization, and ``random-init`` (the untrained encoder). A bar chart per
benchmark and a Table 2-style table (false-negative pairs per batch, MSL and HiRISE accuracy and balanced
accuracy by linear probe and by fine-tuning, beside supervised training from scratch).

    python experiments/compare_methods.py                              # demo preset, built-in data
    python experiments/compare_methods.py --k-from runs/sweep_k/results.csv
    python experiments/compare_methods.py --methods baseline rotation relative-position jigsaw colorization random-init
    python experiments/compare_methods.py --preset smoke
"""

import sys

from raysys.config import ConfigError
from raysys.distributed.sweep import METHODS, main, variant
from raysys.reporting import results as report


def best_k(results_csv: str) -> int:
    """The K with the best mean MSL accuracy over seeds in a K sweep's ``results.csv``."""
    groups = [g for g in report.group(report.read_results_csv(results_csv))
              if g["method"] == "cluster" and g["msl_acc"] is not None]
    if not groups:
        raise ConfigError(f"--k-from {results_csv} holds no finished cluster-aware trial; run sweep_k.py first or pass --k")
    return int(max(groups, key=lambda g: g["msl_acc"])["k"])


def configure(parser):
    parser.add_argument("--methods", nargs="+", default=["baseline", "mixed", "cluster", "fnc"],
                        choices=[m for m in METHODS if m != "supervised"], metavar="METHOD",
                        help=f"methods to compare, of {[m for m in METHODS if m != 'supervised']} "
                             "(default: baseline mixed cluster fnc; --supervised adds the supervised reference)")
    k = parser.add_mutually_exclusive_group()
    k.add_argument("--k", type=int, help="K of the cluster-aware method (default: the preset's first K)")
    k.add_argument("--k-from", help="take the best K from this K sweep's results.csv")
    parser.add_argument("--mix-ratio", type=float, default=0.5, help="ratio of the mixed-domain method (default: 0.5)")
    parser.add_argument("--mix-data", help="out-of-domain ImageFolder (default: the built-in diverse/ dataset)")
    parser.add_argument("--encoder", default="self", help="clustering encoder (see sweep_k.py; default self)")
    parser.add_argument("--max-images", type=int, help="pool size of every method (default: the preset's mix size)")

    def build(args, preset):
        k = (best_k(args.k_from) if args.k_from else args.k or preset["ks"][0]) if "cluster" in args.methods else None
        params = {"mixed": {"mix_ratio": args.mix_ratio}, "cluster": {"k": k}, "moco": {"temperature": 0.2}}
        variants = [variant(m, **params.get(m, {})) for m in args.methods]
        pretrain = {"max_images": args.max_images or preset["mix_images"], "mix_data": args.mix_data}
        # Linear, fine-tuned and supervised side by side; fine-tuning gets the supervised baseline's budget.
        return dict(variants=variants, pretrain=pretrain, encoder=args.encoder, param="method", swept=[],
                    plot="bars", fine_tune_epochs=preset["fine_tune_epochs"])

    return build


if __name__ == "__main__":
    sys.exit(main("compare_methods", __doc__.splitlines()[0], configure))
