"""Files of the false-negative simulation experiment (``experiments/fn_simulation.py``): the Fig. 6 panels
and Table 2's column 2, simulated by :mod:`raysys.eval.fnsim`, as plots, ``results.json``,
``fn-simulation.md`` and ``report.html``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from raysys.config.presets import FN_SIMULATION_PRESETS
from raysys.errors import run_command
from raysys.eval.fnsim import (
    FIG6_DESCRIPTION,
    PAPER_BATCH_SIZE,
    REPRODUCES_WITHIN,
    TABLE2_DATASET_SIZE,
    check_params,
    simulate_fig6,
    simulate_table2,
)
from raysys.reporting.html import write_report
from raysys.reporting.plots import pyplot, save_figure
from raysys.storage import write_text_atomic


def plot_panel(rows: list[dict], x_key: str, path: Path, xlabel: str, title: str, log_y: bool = False) -> None:
    """Simulated mean ± standard error (markers) and the exact expectation (dashed); one line per class
    count unless the class count is the x axis."""
    series = [None] if x_key == "classes" else sorted({r["classes"] for r in rows})
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for c in series:
        pts = sorted((r for r in rows if c is None or r["classes"] == c), key=lambda r: r[x_key])
        xs = [r[x_key] for r in pts]
        label = "" if c is None else f"C = {c}"
        bars = ax.errorbar(xs, [100 * r["simulated_mean"] for r in pts], yerr=[100 * r["simulated_sem"] for r in pts],
                           marker="o", ms=3, capsize=2, linestyle="none", label=f"simulated ± s.e. {label}".strip())
        ax.plot(xs, [100 * r["analytic"] for r in pts], "--", color=bars[0].get_color(), lw=1,
                label=f"exact {label}".strip())
    ax.set_xscale("log")
    if log_y:  # classes 10 to 1,000 span two decades; zeros (N < C) are left out
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("false-negative view pairs (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, agreement_reading(rows))


def agreement_reading(rows: list[dict]) -> str:
    """One line: at how many points the simulated mean lies within two standard errors of the exact expectation."""
    close = [abs(r["simulated_mean"] - r["analytic"]) <= 2 * r["simulated_sem"] for r in rows]
    worst = max(rows, key=lambda r: abs(r["simulated_mean"] - r["analytic"]))
    return (f"The simulation agrees with the exact expectation within 2 standard errors at {sum(close)} of "
            f"{len(rows)} points (largest gap {100 * abs(worst['simulated_mean'] - worst['analytic']):.3g} points).")


def plot_fig6(panels: dict[str, list[dict]], out: Path) -> list[Path]:
    """``fn_vs_classes.png``, ``fn_vs_batch_size.png`` and ``fn_vs_dataset_size.png`` in ``out``."""
    b = PAPER_BATCH_SIZE
    specs = [("classes", "number of classes (balanced)", f"FN view pairs vs classes (B = {b})", False),
             ("batch_size", "batch size (images)", "FN view pairs vs batch size", True),
             ("dataset_size", "dataset size (images)",
              f"FN view pairs vs dataset size (B = {b}, no replacement)", True)]
    paths = []
    for key, xlabel, title, log_y in specs:
        paths.append(out / f"fn_vs_{key}.png")
        plot_panel(panels[key], key, paths[-1], xlabel, title, log_y=log_y)
    return paths


def _pct(x: float, digits: int = 3) -> str:
    return f"{100 * x:.{digits}f}"


def _verdict(row: dict) -> str:
    ratio = 100 * row["simulated_mean"] / row["paper_percent"]
    return "yes" if abs(ratio - 1) <= REPRODUCES_WITHIN else f"no ({ratio:.3g} x the paper's)"


def _panel_table(rows: list[dict], x_key: str) -> str:
    keys = list(dict.fromkeys(["classes", x_key]))
    lines = [f"| {' | '.join(keys)} | simulated % (± std) | s.e. % | exact % |", "|" + " --- |" * (len(keys) + 3)]
    for r in sorted(rows, key=lambda r: [r[k] for k in keys]):
        lines.append(f"| {' | '.join(f'{r[k]:,}' for k in keys)} | {_pct(r['simulated_mean'])} ± "
                     f"{_pct(r['simulated_std'])} | {_pct(r['simulated_sem'], 4)} | {_pct(r['analytic'])} |")
    return "\n".join(lines)


def _table2_table(rows2: list[dict]) -> str:
    """Table 2 column 2 in markdown: simulated, exact (finite and i.i.d.) and the paper's value per row."""
    lines = [("| training set | distribution | drawn from N | simulated % (± std) | s.e. % | exact % (N) "
              "| exact % (i.i.d.) | paper % | reproduces |"), "|" + " --- |" * 9]
    for r in rows2:
        lines.append(f"| {r['training_set']} | {r['distribution']} | {r['dataset_size']:,} | "
                     f"{_pct(r['simulated_mean'])} ± "
                     f"{_pct(r['simulated_std'])} | {_pct(r['simulated_sem'], 4)} | {_pct(r['analytic'])} "
                     f"| {_pct(r['analytic_iid'])} | {r['paper_percent']} | {_verdict(r)} |")
    return "\n".join(lines)


def _markdown_definition(preset: str, batches: int) -> str:
    """Title, preset line and the definition paragraph of ``fn-simulation.md``."""
    return f"""# False-negative view pairs: Appendix B / Fig. 6 and Table 2 column 2

Preset `{preset}`: {batches:,} batches per point, batch size {PAPER_BATCH_SIZE} unless swept.

**Definition.** A batch holds B distinct images with two views each; of its 2B(2B-1) ordered view pairs
(a view with itself excluded), a false negative is a pair of views of two *different* images of the same
class (the baseline SimCLR rule calls every such pair a negative). Counted per batch with
`raysys.methods.pairs.count_false_negative_view_pairs`, the trainer's counting. Exact expectation:
2(B-1)q/(2B-1), with q = Σ p_c² for i.i.d. sampling, or q = Σ K_c(K_c-1)/(N(N-1)) for batches drawn
without replacement from N images with K_c of class c. Fig. 6 uses balanced datasets (the paper's caption);
"dataset size" is N. Table 2 rows are drawn from N = {TABLE2_DATASET_SIZE:,} images (the paper's 100K),
Curiosity with the MSL v2.1 train class distribution (as the paper does), ImageNet as 1,000 balanced classes,
the mix with disjoint classes.
"""


def _markdown_findings(panels: dict[str, list[dict]], rows2: list[dict]) -> str:
    """The "What reproduces and what does not" list of ``fn-simulation.md``, with the measured numbers."""
    msl, imnet, mixed, pooled = rows2
    b = PAPER_BATCH_SIZE
    floor_1000 = 2 * (b - 1) / (2 * b - 1) / 1000
    at_10 = next(r['analytic'] for r in panels['classes'] if r['classes'] == 10)
    return f"""- **Curiosity (MSL v2.1 distribution)**: {_pct(msl['simulated_mean'], 2)} % vs the paper's 15.0 %
  (Σ p² = {msl['sum_p2']:.4f}). Reproduces.
- **ImageNet (1,000 balanced classes)**: {_pct(imnet['simulated_mean'], 3)} % vs 0.08 %. Not reproduced:
  since Σ p² ≥ 1/C, no 1,000-class distribution drawn i.i.d. goes below {_pct(floor_1000, 4)} % at B = {b}
  under this definition (ImageNet's real, slightly imbalanced classes only raise it). The floor holds for
  i.i.d. draws only: without replacement from N balanced images the rate is 1/C short by the relative
  (C-1)/(N-1), and 0.08 % would take a 1,000-class set of only about 5,000 images.
- **50/50 mix**: {_pct(mixed['simulated_mean'], 2)} % vs 0.30 %. Not reproduced: q = (1-r)² Σp²_Curiosity +
  r² Σp²_ImageNet, so the Curiosity half alone contributes 0.25 × {_pct(msl['analytic_iid'], 1)} % =
  {_pct(0.25 * msl['analytic_iid'], 2)} % whatever the other half is. (A class-count-weighted average of the
  two rows, (19 × 15.0 + 1000 × 0.08) / 1019 = 0.36 %, is the closest simple reading of the paper's
  "diversity-weighted average"; we do not use it, since it is not the rate of any batch.)
- **50/50 row, pooled reading**: {_pct(pooled['simulated_mean'], 3)} % vs 0.30 % (exact
  {_pct(pooled['analytic'], 3)} %). Reproduces if the two halves are not 50K + 50K images but the labelled
  sets themselves, pooled: MSL v2.1's 6,820 images with ImageNet's 50,000 validation labels, every batch
  drawn from the {pooled['dataset_size']:,}-image pool. The Curiosity share is then 12 %, not 50 %, and its
  squared share weighs Σp² by 0.014 instead of 0.25. It is a reading of how the paper may have computed the
  number; the training sets Table 2 describes are the 50K + 50K of the row above.
- **Fig. 6**: reproduces in shape. At 10 balanced classes the rate is {_pct(at_10, 2)} %
  (the paper's "decreases from 10 %"), falling as 1/C towards 0 % by 1,000 classes; at 1 class every
  pair of different images is a false negative ({_pct(panels['classes'][0]['analytic'], 1)} %). It is flat in
  batch size beyond about ten images (the factor 2(B-1)/(2B-1) = 1 - 1/(2B-1) is within 5 % of 1 from B = 11)
  and in dataset size once N ≫ C (balanced: q = (N-C)/(C(N-1)), 1/C short by the relative (C-1)/(N-1)); the
  dip at small N is the paper's "initial point".
"""


def fig6_markdown(panels: dict[str, list[dict]], rows2: list[dict], preset: str, batches: int) -> str:
    """``fn-simulation.md``: definition, Table 2 column 2 beside the paper, what reproduces, the Fig. 6 tables."""
    b = PAPER_BATCH_SIZE
    return f"""{_markdown_definition(preset, batches)}
## Table 2, column 2

{_table2_table(rows2)}

## What reproduces and what does not

{_markdown_findings(panels, rows2)}
## Fig. 6: vs number of classes (B = {b}, i.i.d.) — `fn_vs_classes.png`

{_panel_table(panels['classes'], 'classes')}

## Fig. 6: vs batch size (i.i.d.) — `fn_vs_batch_size.png`

{_panel_table(panels['batch_size'], 'batch_size')}

## Fig. 6: vs dataset size (B = {b}, without replacement) — `fn_vs_dataset_size.png`

{_panel_table(panels['dataset_size'], 'dataset_size')}
"""


def write_fig6(out: Path, panels: dict[str, list[dict]], rows2: list[dict], preset: str, seed: int,
               batches: int) -> list[Path]:
    """``results.json`` (the command line, settings, every point and row) and ``fn-simulation.md`` in ``out``."""
    results = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "preset": preset, "seed": seed,
               "batches": batches, "batch_size": PAPER_BATCH_SIZE, "panels": panels, "table2": rows2}
    write_text_atomic(str(out / "results.json"), json.dumps(results, indent=1))
    write_text_atomic(str(out / "fn-simulation.md"), fig6_markdown(panels, rows2, preset, batches))
    return [out / "results.json", out / "fn-simulation.md"]


def configure_fig6_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``experiments/fn_simulation.py``."""
    p.add_argument("--preset", choices=sorted(FN_SIMULATION_PRESETS), default="default")
    p.add_argument("--batches", type=int, help="batches per point (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fn_simulation")
    return p


def run_fig6(args: argparse.Namespace) -> int:
    """Simulate the Fig. 6 grid and Table 2 column 2, write their plots, ``results.json``,
    ``fn-simulation.md`` and ``report.html`` into ``args.out``. Bad input raises :class:`ConfigError`
    before any simulation or file."""
    batches = FN_SIMULATION_PRESETS[args.preset]["batches"] if args.batches is None else args.batches
    check_params(PAPER_BATCH_SIZE, batches, None)
    preset = {**FN_SIMULATION_PRESETS[args.preset], "batches": batches}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    panels = simulate_fig6(preset, args.seed)
    rows2 = simulate_table2(batches, args.seed)
    plot_fig6(panels, out)
    write_fig6(out, panels, rows2, args.preset, args.seed, batches)
    print(f"wrote {out}/fn-simulation.md, results.json and 3 plots; report: {write_report(out)}")
    return 0


def fig6_main(argv: list[str] | None = None) -> int:
    """``python experiments/fn_simulation.py``: see :func:`run_fig6`; bad input prints one line, exit code 2."""
    parser = configure_fig6_parser(argparse.ArgumentParser(description=FIG6_DESCRIPTION))
    return run_command(parser.prog, run_fig6, parser.parse_args(argv))
