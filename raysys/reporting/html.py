"""One self-contained HTML page per experiment folder: ``raysys report DIR`` writes ``DIR/report.html``.

The page opens offline and from anywhere: figures are embedded as ``data:image/png;base64`` URIs, the
style sheet is inline, there is no script. Every text taken from the folder is HTML-escaped. It reads
top-down, figures first, each table once:

* how to reproduce the experiment: the ``command`` of ``sweep.json`` (:class:`raysys.distributed.sweep.SweepSpec`)
  and any top-level ``command`` key of the folder's other JSON files;
* the figures: every ``*.png`` of the experiment (see :func:`find_figures` for which folders are left out),
  then the training curves (loss and kNN accuracy of every run, from its ``tb/`` scalars) and the confusion
  matrices (of the run, or of a sweep's best trial), drawn here by :mod:`raysys.reporting.run_figures`; each
  captioned with its one-line reading where the PNG holds one (:func:`raysys.reporting.plots.save_figure`);
* the best trial of ``results.csv`` (highest MSL accuracy of a pretrained encoder, balanced where MSL is imbalanced);
* the results: mean ± std over seeds (:func:`raysys.reporting.results.group` / :func:`raysys.reporting.results.results_table`)
  and one row per trial;
* the linear evaluations of the folder (``eval-*.json``) and the record tables of its other JSON files;
* every other table at the top of the folder: ``*.csv`` / ``*.tsv`` as tables, ``*.md`` through a small
  markdown converter (tables, headings, lists, paragraphs). A sweep's ``summary.md`` is left out: it repeats
  the results table and the figures;
* the configuration: ``sweep.json``, ``config.json`` and every other top-level JSON file.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import re
import time
from pathlib import Path

from raysys.errors import ConfigError
from raysys.reporting import plots
from raysys.reporting import results as report
from raysys.reporting import run_figures

REPORT_FILE = "report.html"
REFERENCES = ("random-init", "supervised", "supervised-transfer")  # trials that pretrain nothing
MAX_TABLE_ROWS = 500  # a longer CSV is cut, with a note: the page must stay light enough to open
# Folders that hold run internals, not figures of the experiment (see find_figures).
SKIPPED_DIRS = frozenset({"ray", "tb", "cache", "feature-cache", "projector", "checkpoints"})
TUNE_MARKERS = ("tuner.pkl", "experiment_state-*.json")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
/* A table wider or longer than the page scrolls inside its own box, its scroll bars on screen, with its header
   row and first column held in view; long texts and header names wrap. The box is at most about a laptop screen
   high, in em not vh: a page as tall as its content (a full-page screenshot) lays it out as a laptop window does. */
.wide { overflow: auto; width: fit-content; max-width: 100%; max-height: 48em; margin: .8em 0; border: 1px solid #bbb; }
.wide table { margin: 0; }
/* Scroll bars always drawn (WebKit, Blink), also where the system hides them until scrolled: a cut table shows it. */
.wide::-webkit-scrollbar { width: 10px; height: 10px; }
.wide::-webkit-scrollbar-thumb { background: #999; border-radius: 5px; }
.wide::-webkit-scrollbar-track { background: #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td { white-space: nowrap; background: inherit; }
td.text { white-space: normal; min-width: 14em; max-width: 36em; overflow-wrap: anywhere; }
th { background: #f0f0f0; min-width: 3em; vertical-align: bottom; }
tr { background: #fff; }
.wide thead th { position: sticky; top: 0; z-index: 2; }
.wide td:first-child, .wide th:first-child { position: sticky; left: 0; z-index: 1; box-shadow: inset -2px 0 #bbb; }
.wide thead th:first-child { z-index: 3; }
tr.best { background: #fff3c4; }
tr.best td { font-weight: bold; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
code { background: #f0f0f0; padding: 0 .2em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 90%; }
.note { color: #666; font-style: italic; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ----------------------------------------------------------------------------- what the folder holds


def _is_tune_experiment(folder: Path) -> bool:
    return any(any(folder.glob(marker)) for marker in TUNE_MARKERS)


def find_figures(root: str | Path) -> list[Path]:
    """Every ``*.png`` of the experiment under ``root`` (recursively), sorted: the top folder's first, then
    by path. Left out are folders of run internals: hidden ones (``.*``), ``ray/`` (Ray Train / Tune
    storage), ``tb/`` (TensorBoard logs), ``cache/`` and ``feature-cache/``, ``projector/`` (its
    ``sprite.png`` is a TensorBoard sprite sheet, not a figure), ``checkpoints/`` and ``checkpoint_*``,
    and Tune experiment folders (holding ``tuner.pkl`` or ``experiment_state-*.json``)."""
    root = Path(root)
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                skip = (entry.name in SKIPPED_DIRS or entry.name.startswith("checkpoint_")
                        or _is_tune_experiment(entry))
                if not skip:
                    stack.append(entry)
            elif entry.suffix.lower() == ".png" and entry.is_file():
                found.append(entry)
    return sorted(found, key=lambda p: (len(p.relative_to(root).parts) > 1, str(p.relative_to(root))))


def _summary_order(figures: list[Path], root: Path) -> list[Path]:
    """``figures`` in the order the folder's ``summary.md`` shows them (a sweep's summary leads an imbalanced
    benchmark with its balanced-accuracy figure), those it does not show after, in their own order."""
    summary = root / "summary.md"
    listed = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", summary.read_text(errors="replace")) if summary.is_file() else []
    rank = {name: i for i, name in enumerate(listed)}
    return sorted(figures, key=lambda p: rank.get(p.relative_to(root).as_posix(), len(rank)))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable JSON: {exc}"}


def _commands(jsons: dict[str, object]) -> list[tuple[str, str]]:
    """``(file, command)`` of every top-level JSON file with a ``command`` string (sweep.json first)."""
    ordered = sorted(jsons, key=lambda name: (name != "sweep.json", name))
    return [(name, jsons[name]["command"]) for name in ordered
            if isinstance(jsons[name], dict) and isinstance(jsons[name].get("command"), str) and jsons[name]["command"]]


# ----------------------------------------------------------------------------- HTML pieces


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "–" if value is None or value == "" else str(value)


LONG_CELL = 40  # characters: a longer cell wraps (td.text) instead of widening its column


def _td(value) -> str:
    text = _cell(value)
    return f'<td class="text">{_e(text)}</td>' if len(text) > LONG_CELL else f"<td>{_e(text)}</td>"


def _th(name) -> str:
    """A header cell that may wrap after each underscore of a column name (``hirise_knn_balanced_acc``)."""
    return f"<th>{_e(name).replace('_', '_<wbr>')}</th>"


def html_table(header: list, rows: list[list], row_classes: list[str] | None = None) -> str:
    """An HTML table of already-formatted cell values (escaped here), in a box of its own (see STYLE)."""
    head = "".join(_th(h) for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_e(row_classes[i])}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(_td(v) for v in row) + "</tr>")
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _inline_md(text: str) -> str:
    """Escape, then the inline markdown the project writes: `code`, **bold**, and image references
    turned into links to the embedded figure (the figure itself is shown once, under Figures)."""
    out = _e(text)
    out = re.sub(r"!\[([^\]]*)\]\(([^)]*)\)", lambda m: f'<a href="#fig-{_anchor(html.unescape(m.group(2)))}">'
                 f"figure: {m.group(1)}</a>", out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _md_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """A small markdown converter for the project's own files: pipe tables, ``#`` headings, ``-`` lists,
    paragraphs, inline code and bold. Everything else is shown as escaped text."""
    out, paragraph, items = [], [], []
    lines = text.splitlines()

    def flush():
        if paragraph:
            out.append("<p>" + " ".join(_inline_md(p) for p in paragraph) + "</p>")
            paragraph.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in items) + "</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            flush()
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(_md_row(lines[i]))
                i += 1
            body = [r for r in block[1:] if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            head = "".join(f"<th>{_inline_md(c)}</th>" for c in block[0])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", line)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + 2)  # under the page's own h1/h2
            out.append(f"<h{level}>{_inline_md(heading.group(2))}</h{level}>")
        elif line.startswith(("- ", "* ")):
            if paragraph:
                flush()
            items.append(line[2:])
        elif not line:
            flush()
        else:
            if items:
                flush()
            paragraph.append(line)
        i += 1
    flush()
    return "\n".join(out)


def _anchor(relpath: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", relpath)


def _embedded(name: str, png: bytes) -> str:
    """The figure, its caption the name and, where the PNG holds one, its one-line reading."""
    data = base64.b64encode(png).decode("ascii")
    reading = plots.figure_reading(png)
    caption = f"<code>{_e(name)}</code>" + (f": {_e(reading)}" if reading else "")
    return (f'<figure id="fig-{_e(_anchor(name))}"><img alt="{_e(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _figure(path: Path, root: Path) -> str:
    return _embedded(path.relative_to(root).as_posix(), path.read_bytes())


def _drawn_figures(root: Path, best: dict | None, evals: dict[str, dict]) -> list[tuple[str, bytes]]:
    """``(caption, PNG)`` of the training curves of every run under ``root`` (the folder's own ``tb/``, or each
    sweep trial's) and the confusion matrices of the run's ``evals`` (a sweep: its best trial's files)."""
    runs = {"run": root / "tb"} if (root / "tb").is_dir() else {
        p.parent.name: p for p in sorted((root / "trials").glob("*/tb")) if p.is_dir()}
    drawn = []
    curves = run_figures.training_curves_png({name: run_figures.read_scalars(tb) for name, tb in runs.items()},
                                             *_monitor([tb.parent for tb in runs.values()]))
    if curves:
        drawn.append(("training curves (loss and kNN accuracy per run)", curves))
    if best is not None:
        evals = {p.name: _read_json(p) for p in sorted((root / "trials" / str(best["trial"])).glob("eval-*.json"))}
    # the pretrained encoder's matrices first, then the untrained reference's (eval-*-random-init.json)
    for name, evaluation in sorted(evals.items(), key=lambda item: (item[0].endswith("-random-init.json"), item[0])):
        title = f"{Path(name).stem[5:]} confusion matrix" + (f" ({best['trial']})" if best is not None else "")
        png = run_figures.confusion_png(evaluation, title) if isinstance(evaluation, dict) else None
        if png:
            drawn.append((title, png))
    return drawn


def _monitor(run_dirs: list[Path]) -> tuple[str, tuple[float, float] | None]:
    """The kNN monitor's benchmark of the runs (``knn_monitor`` in each run's ``config.json``) as the papers write
    it (several are listed; none known is said so), and, for a single one, its majority-class and chance shares
    (:func:`raysys.reporting.run_figures.monitor_floor`) from the first run's ``eval-<benchmark>.json``."""
    configs = [_read_json(run / "config.json") for run in run_dirs]
    monitors = sorted({c["knn_monitor"] for c in configs if isinstance(c, dict) and c.get("knn_monitor")})
    name = " / ".join(map(plots.bench_name, monitors)) or "the kNN monitor's benchmark"
    if len(monitors) != 1:
        return name, None
    files = [run / f"eval-{monitors[0]}.json" for run in run_dirs if (run / f"eval-{monitors[0]}.json").is_file()]
    evaluation = _read_json(files[0]) if files else None
    return name, run_figures.monitor_floor(evaluation) if isinstance(evaluation, dict) else None


def _delimited_table(path: Path) -> str:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        return f'<p class="note">{_e(path.name)} could not be read: {_e(exc)}</p>'
    if not rows:
        return f'<p class="note">{_e(path.name)} is empty.</p>'
    body = rows[1 : MAX_TABLE_ROWS + 1]
    cut = len(rows) - 1 - len(body)
    note = f'<p class="note">first {MAX_TABLE_ROWS} of {len(rows) - 1} rows shown</p>' if cut else ""
    return html_table(rows[0], body) + note


# ----------------------------------------------------------------------------- sections


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _reproduce_section(commands: list[tuple[str, str]]) -> str:
    if not commands:
        return '<p class="note">No command is recorded in this folder\'s JSON files.</p>'
    return "\n".join(f"<p>From <code>{_e(name)}</code>:</p><pre>{_e(cmd)}</pre>" for name, cmd in commands)


def best_trial(rows: list[dict]) -> dict | None:
    """The pretrained encoder's row with the highest MSL accuracy that MSL is judged by (:func:`plots.lead_metric`:
    balanced accuracy where MSL is imbalanced; None when no row has it): the references (the untrained encoder,
    the supervised runs) are what it is compared with, never the best trial."""
    metric = plots.lead_metric(rows, "msl")
    scored = [r for r in rows if isinstance(r.get(metric), (int, float)) and r.get("method") not in REFERENCES]
    return max(scored, key=lambda r: r[metric], default=None)


def _in_percent(column: str) -> str:
    """A results.csv column's name as the report's tables head it: the shares in % say so."""
    return f"{column} (%)" if column in report.PERCENT_COLUMNS else column


def _percent_cells(columns: list[str], row: dict) -> list:
    """The row's values of ``columns``, the shares (:data:`~raysys.reporting.results.PERCENT_COLUMNS`) in %, as
    every figure and the grouped tables show them."""
    return [report.pct(row[c]) if c in report.PERCENT_COLUMNS and isinstance(row.get(c), (int, float)) else row.get(c)
            for c in columns]


def _best_section(best: dict, root: Path, commands: list[tuple[str, str]]) -> str:
    keys = [k for k in report.RESULT_COLUMNS if best.get(k) not in (None, "")]
    parts = [html_table(["results.csv column", "value"],
                        [[_in_percent(k), value] for k, value in zip(keys, _percent_cells(keys, best))])]
    trial_dir = root / "trials" / str(best["trial"])
    if trial_dir.is_dir():
        parts.append(f"<p>Its run folder: <code>{_e(trial_dir)}</code> (settings in <code>config.json</code>).</p>")
    if commands:
        parts.append("<p>Reproduce it: this command reruns the experiment, this trial included "
                     f"(from <code>{_e(commands[0][0])}</code>):</p><pre>{_e(commands[0][1])}</pre>")
    return "\n".join(parts)


def _results_section(rows: list[dict], best: dict | None, sweep: dict, root: Path) -> str:
    """The grouped table as the sweep drew it (``param``/``swept``/``plot`` of sweep.json; a K sweep when
    absent), then one row per trial with the best one marked."""
    if sweep.get("plot") == "steps":  # a study of steps: its summary holds the table and the reading
        summary = root / "summary.md"
        head = markdown_to_html(summary.read_text()) if summary.is_file() else ""
        columns = [c for c in rows[0] if any(r.get(c) not in (None, "") for r in rows)]
        return (f"{head}<h3>Every arm, seed and evaluation step (<code>results.csv</code>)</h3>"
                f"{html_table(columns, [[r.get(c) for c in columns] for r in rows])}")
    groups = report.group(rows)
    table = report.grouped_table(groups, sweep.get("plot") or "line", sweep.get("param") or "k",
                                 tuple(sweep.get("swept") or ("cluster",)), bool(sweep.get("place_recognition")), rows)
    known = list(report.RESULT_COLUMNS) + sorted({k for r in rows for k in r} - set(report.RESULT_COLUMNS))
    columns = [c for c in known if any(r.get(c) not in (None, "") for r in rows)]  # no all-empty columns
    classes = ["best" if best is not None and r is best else "" for r in rows]
    per_trial = html_table([_in_percent(c) for c in columns], [_percent_cells(columns, r) for r in rows], classes)
    readings = "".join(f"<p>{_e(plots.precision_reading(groups, bench))}</p>" for bench in ("msl", "hirise")
                       if sweep.get("plot") == "precision")
    floors = plots.floor_note(groups)
    spread = "Mean ± std over seeds" if any(g["n"] > 1 for g in groups) else "One seed per configuration, no spread"
    return (f"<h3>{spread} (accuracies in %)</h3>{markdown_to_html(table)}"
            + (f"<p>{_e(floors)}</p>" if floors else "") + readings
            + f"<h3>Every trial (<code>results.csv</code>, shares in %)</h3>{per_trial}")


def _eval_section(evals: dict[str, dict]) -> str:
    """One row per ``eval-*.json``: the probe's scores beside what a model that learned nothing gets (always the
    majority train class; chance, one over the classes), all in %."""
    header = ["file", "benchmark", "accuracy (%)", "balanced accuracy (%)", "macro-F1 (%)",
              "majority class: accuracy (%)", "majority class: balanced accuracy (%)", "chance (%)", "test images",
              "feature dim"]
    rows = []
    for name, r in sorted(evals.items()):
        metrics, majority, classes = r.get("metrics") or {}, r.get("majority") or {}, r.get("class_names")
        shares = [metrics.get("accuracy"), metrics.get("balanced_accuracy"), metrics.get("macro_f1"),
                  majority.get("accuracy"), majority.get("balanced_accuracy"), 1 / len(classes) if classes else None]
        rows.append([name, r.get("benchmark"), *map(report.pct, shares), metrics.get("n_test"), r.get("feature_dim")])
    return html_table(header, rows)


def _record_tables(name: str, data, skip=()) -> str:
    """Every top-level list of flat records in a JSON file as a table (e.g. summary.json's linear_eval), but the
    keys in ``skip``."""
    parts = []
    for key, value in data.items() if isinstance(data, dict) else []:
        if key not in skip and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            parts.append(f"<h3>{_e(name)}: {_e(key)}</h3>" + html_table(columns, [[v.get(c) for c in columns] for v in value]))
    return "\n".join(parts)


def _flatten(data: dict, prefix: str = "") -> list[list]:
    """``[[dotted key, value]]`` of a JSON object, nested objects spelled out (``base.epochs``)."""
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", value])
    return rows


def _config_section(jsons: dict[str, object]) -> str:
    """Each JSON file as a key/value table (when it is a modest object) and its raw text, folded."""
    ordered = sorted(jsons, key=lambda n: (n not in ("sweep.json", "config.json"), n))
    parts = []
    for name in ordered:
        data = jsons[name]
        flat = _flatten(data) if isinstance(data, dict) else []
        table = html_table(["key", "value"], flat) if 0 < len(flat) <= 200 and len(json.dumps(data)) < 20000 else ""
        open_attr = " open" if name in ("sweep.json", "config.json") else ""
        parts.append(f"<details{open_attr}><summary><code>{_e(name)}</code></summary>{table}"
                     f"<details><summary>raw JSON</summary><pre>{_e(json.dumps(data, indent=2, sort_keys=True))}</pre>"
                     "</details></details>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the page


def render_report(root: str | Path) -> str:
    """The report page of folder ``root`` as an HTML string (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"report: {root} is not a folder; pass an experiment or run folder (e.g. runs/sweep_k)")
    jsons = {p.name: _read_json(p) for p in sorted(root.glob("*.json"))}
    sweep = jsons.get("sweep.json") if isinstance(jsons.get("sweep.json"), dict) else {}
    title = f"raysys report: {sweep.get('name') or root.resolve().name}"
    commands = _commands(jsons)
    rows = report.read_results_csv(root / "results.csv")
    best = best_trial(rows)
    evals = {n: d for n, d in jsons.items() if n.startswith("eval-") and isinstance(d, dict)}
    repeated = {"results.csv", "summary.md"} if rows else {"results.csv"}  # the Results section shows them
    tables = [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".md")
              and p.name not in repeated]
    figures = _summary_order(find_figures(root), root)
    drawn = _drawn_figures(root, best, evals)

    figure_body = ("\n".join([_figure(p, root) for p in figures] + [_embedded(name, png) for name, png in drawn])
                   or '<p class="note">No figures (*.png) found.</p>')
    sections = [_section("Reproduce", _reproduce_section(commands), "reproduce"),
                _section(f"Figures ({len(figures) + len(drawn)})", figure_body, "figures")]
    if best is not None:
        sections.append(_section(f"Best trial: {best['trial']}", _best_section(best, root, commands), "best"))
    if rows:
        sections.append(_section("Results", _results_section(rows, best, sweep, root), "results"))
    if evals:
        sections.append(_section("Linear evaluation", _eval_section(evals), "linear-eval"))
    skip = ("linear_eval",) if evals else ()  # a run's summary.json repeats its eval-*.json files
    records = "\n".join(_record_tables(n, d, skip) for n, d in jsons.items()
                        if not n.startswith("eval-") and n != "sweep.json")  # sweep.json is the configuration
    if records.strip():
        sections.append(_section("Summaries", records, "summaries"))
    for path in tables:
        body = markdown_to_html(path.read_text(errors="replace")) if path.suffix.lower() == ".md" else _delimited_table(path)
        sections.append(_section(path.name, body, f"table-{_anchor(path.name)}"))
    sections.append(_section("Configuration", _config_section(jsons) or '<p class="note">No JSON files.</p>', "config"))
    if not (rows or evals or jsons or tables or figures):
        sections.insert(0, '<p class="note">This folder holds none of results.csv, *.json, *.csv, *.md, *.png.</p>')

    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{_e(title)}</h1>\n"
            f'<p class="note">Folder <code>{_e(root.resolve())}</code>, generated {_e(generated)}.</p>\n'
            + "\n".join(sections) + "\n</body></html>\n")


def write_report(root: str | Path) -> Path:
    """Write ``root/report.html`` (atomically) and return its path. A missing folder raises
    :class:`~raysys.config.ConfigError`."""
    page = render_report(root)
    path = Path(root) / REPORT_FILE
    report.write_atomic(path, page)
    path.chmod(0o644)  # the temporary file it was renamed from is private; a report is meant to be shared
    return path


# ----------------------------------------------------------------------------- command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys report``."""
    p.add_argument("dir", help="experiment folder (a sweep's --out, or a pretraining run folder)")
    return p


def run(args: argparse.Namespace) -> int:
    """``raysys report DIR``: write DIR/report.html (a missing folder is a :class:`ConfigError`)."""
    print(f"report: {write_report(args.dir)}")
    return 0
