"""raysys report: a self-contained report.html whose embedded figures decode back to the files, with the
results (per trial and mean ± std computed by hand), the best trial, the reproduce command, the other
tables, escaped text, and partial or missing folders."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from raysys.config import ConfigError
from raysys.distributed.sweep import SweepSpec
from raysys.errors import run_command
from raysys.reporting import html as hr
from raysys.reporting import results as report
from raysys.reporting.run_figures import read_scalars

EVIL = "<script>alert(1)</script>"
COMMAND = "python experiments/sweep_k.py --out 'runs/a b' --seeds 2 && echo \"<done>\""


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def put(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


ROWS = [  # msl_acc by hand: baseline 0.60 / 0.70 -> 65.0 ± 7.1; the best trial is cluster-k10-t0.5-s1 (0.80)
    {"trial": "baseline-t0.5-s0", "method": "baseline", "k": 0, "temperature": 0.5, "seed": 0, "msl_acc": 0.60, "hirise_acc": 0.81},
    {"trial": "baseline-t0.5-s1", "method": "baseline", "k": 0, "temperature": 0.5, "seed": 1, "msl_acc": 0.70, "hirise_acc": 0.83},
    {"trial": "cluster-k10-t0.5-s0", "method": "cluster", "k": 10, "temperature": 0.5, "seed": 0, "msl_acc": 0.75},
    {"trial": "cluster-k10-t0.5-s1", "method": "cluster", "k": 10, "temperature": 0.5, "seed": 1, "msl_acc": 0.80},
    {"trial": EVIL, "method": "cluster", "k": 40, "temperature": 0.5, "seed": 0, "msl_acc": 0.50},
]


@pytest.fixture
def sweep_dir(tmp_path):
    """A sweep folder as run_sweep leaves it, plus figures where the report must and must not look."""
    spec = SweepSpec(name="sweep_k", out=str(tmp_path), base={"epochs": 8}, command=COMMAND)
    put(tmp_path / "sweep.json", json.dumps(asdict(spec)))
    report.write_results_csv(ROWS, tmp_path / "results.csv")
    put(tmp_path / "summary.md", "# sweep_k\n\nBest: **x**\n\n![sweep_k-msl.png](sweep_k-msl.png)\n")
    put(tmp_path / "label-fraction.md", "| fraction | MSL acc |\n| --- | --- |\n| 0.1 | 50.0 |\n| 1.0 | <b>71.5</b> |\n"
                                        "\n![sweep_k-msl.png](sweep_k-msl.png)\n")
    put(tmp_path / "fn-simulation.csv", "k,fn_fraction\n10,0.131\n40,0.148\n")
    figures = {
        "sweep_k-msl.png": png_bytes(0),
        "sweep_k-hirise.png": png_bytes(1),
        "trials/cluster-k10-t0.5-s1/visualize/tsne.png": png_bytes(2),
    }
    for rel, data in figures.items():
        put(tmp_path / rel, data)
    for rel in ("trials/cluster-k10-t0.5-s1/tb/plot.png", "trials/cluster-k10-t0.5-s1/ray/run/x.png",
                "trials/cluster-k10-t0.5-s1/visualize/projector/00000/features/sprite.png",
                "trials/baseline-t0.5-s0/checkpoint_000001/x.png", "cache/features/y.png", ".hidden/z.png",
                "sweep_k/run_trial_0/w.png"):
        put(tmp_path / rel, png_bytes(9))
    put(tmp_path / "sweep_k" / "tuner.pkl", b"tune")
    put(tmp_path / "trials" / "cluster-k10-t0.5-s1" / "config.json", "{}")
    return tmp_path, figures


def embedded_figures(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    return {html.unescape(alt): base64.b64decode(data) for alt, data in found}


def test_figures_embedded_and_decode_to_the_files(sweep_dir):
    root, figures = sweep_dir
    path = hr.write_report(root)
    assert path == root / "report.html"
    page = path.read_text()
    assert page.count("data:image/png;base64,") == len(figures) == 3
    embedded = embedded_figures(page)
    assert embedded == {rel: data for rel, data in figures.items()}  # byte for byte
    assert [p.relative_to(root).as_posix() for p in hr.find_figures(root)] == [
        "sweep_k-hirise.png", "sweep_k-msl.png", "trials/cluster-k10-t0.5-s1/visualize/tsne.png"]
    # A markdown image reference links to the embedded figure instead of loading the file.
    assert '<a href="#fig-sweep_k-msl.png">' in page and 'id="fig-sweep_k-msl.png"' in page
    assert "Best: <strong>x</strong>" not in page  # summary.md repeats the results: not shown a second time


def test_results_best_trial_and_command(sweep_dir):
    root, _ = sweep_dir
    page = hr.write_report(root).read_text()
    for row in ROWS:
        assert f"<td>{html.escape(row['trial'])}</td>" in page
        assert f"<td>{100 * row['msl_acc']:.1f}</td>" in page  # in %, as in every figure
    assert "<th>msl_<wbr>acc (%)</th>" in page
    assert "<td>65.0 ± 7.1</td>" in page  # baseline MSL mean ± std over its two seeds, in %
    assert "<td>77.5 ± 3.5</td>" in page  # cluster K=10
    assert "Best trial: cluster-k10-t0.5-s1" in page
    best_rows = re.findall(r'<tr class="best">(.*?)</tr>', page)
    assert len(best_rows) == 1 and "<td>cluster-k10-t0.5-s1</td>" in best_rows[0]
    assert f"<pre>{html.escape(COMMAND)}</pre>" in page
    assert "<td>0.1</td><td>50.0</td>" in page  # label-fraction.md as a table
    assert "<td>40</td><td>0.148</td>" in page  # fn-simulation.csv as a table
    assert "<td>name</td><td>sweep_k</td>" in page and "<td>base.epochs</td><td>8</td>" in page  # sweep.json


def test_everything_escaped_and_self_contained(sweep_dir):
    root, _ = sweep_dir
    page = hr.write_report(root).read_text()
    assert "<script" not in page.lower()
    assert html.escape(EVIL) in page
    assert "<b>71.5</b>" not in page and "&lt;b&gt;71.5&lt;/b&gt;" in page
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing to fetch
    assert "<link" not in page.lower() and "@import" not in page


def test_partial_run_folder(tmp_path):
    """A pretraining run folder: config.json, eval-*.json, summary.json with a command; no results.csv."""
    put(tmp_path / "config.json", json.dumps({"epochs": 15, "augment": {"size": 32}}))
    put(tmp_path / "eval-msl.json", json.dumps({"benchmark": "/data/msl", "feature_dim": 128,
                                                 "metrics": {"accuracy": 0.7532, "balanced_accuracy": 0.3418, "n_test": 158},
                                                 "majority": {"accuracy": 0.3101}}))
    put(tmp_path / "summary.json", json.dumps({"command": "python experiments/pretrain.py --preset demo",
                                               "linear_eval": [{"benchmark": "msl", "encoder": "pretrained", "accuracy": 0.7532}]}))
    page = hr.write_report(tmp_path).read_text()
    # in %; no majority balanced accuracy, no class names (chance) recorded
    assert ("<td>eval-msl.json</td><td>/data/msl</td><td>75.3</td><td>34.2</td><td>–</td><td>31.0</td><td>–</td>"
            "<td>–</td><td>158</td><td>128</td>") in page
    assert "<pre>python experiments/pretrain.py --preset demo</pre>" in page
    assert "<td>augment.size</td><td>32</td>" in page
    assert "Figures (0)" in page and "Best trial" not in page and "data:image/png" not in page
    # summary.json's linear_eval repeats the eval files: shown only where they are missing
    assert "<td>msl</td><td>pretrained</td><td>0.7532</td>" not in page
    (tmp_path / "eval-msl.json").unlink()
    page = hr.write_report(tmp_path).read_text()
    assert "<td>msl</td><td>pretrained</td><td>0.7532</td>" in page and "summary.json: linear_eval" in page


def test_empty_folder(tmp_path):
    page = hr.write_report(tmp_path).read_text()
    assert "No command is recorded" in page and "No figures" in page


def test_missing_folder_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is not a folder"):
        hr.write_report(tmp_path / "nope")
    put(tmp_path / "file.txt", "x")
    with pytest.raises(ConfigError):
        hr.write_report(tmp_path / "file.txt")
    args = hr.configure_parser(argparse.ArgumentParser()).parse_args([str(tmp_path / "nope")])
    assert run_command("raysys report", hr.run, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysys report: error:") and "\n" not in err


def test_markdown_converter():
    out = hr.markdown_to_html("## Title `x<y`\n\n- one\n- **two**\n\ntext & more\n\n| a | b |\n| :---: | --- |\n| <i>1</i> | 2 |\n")
    assert "<h4>Title <code>x&lt;y</code></h4>" in out
    assert "<ul><li>one</li><li><strong>two</strong></li></ul>" in out
    assert "<p>text &amp; more</p>" in out
    assert "<thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>&lt;i&gt;1&lt;/i&gt;</td><td>2</td></tr></tbody>" in out


def _log_curves(tb_dir, losses, accs):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb_dir)) as writer:
        for step, (loss, acc) in enumerate(zip(losses, accs), 1):
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/knn_acc", acc, step)


def test_sweep_page_leads_with_figures_and_shows_each_table_once(sweep_dir):
    root, figures = sweep_dir
    for trial, losses in (("baseline-t0.5-s0", [5.0, 4.5, 4.2]), ("cluster-k10-t0.5-s1", [5.1, 4.4, 4.0])):
        _log_curves(root / "trials" / trial / "tb", losses, [0.3, 0.35, 0.4])
    assert read_scalars(root / "trials" / "baseline-t0.5-s0" / "tb")["train/loss"] == [
        (1, 5.0), (2, 4.5), (3, pytest.approx(4.2))]  # float32 in the event file
    confusion = [[3, 1], [0, 2]]
    put(root / "trials" / "cluster-k10-t0.5-s1" / "eval-msl.json",
        json.dumps({"class_names": ["rock", "sand"], "metrics": {"confusion_matrix": confusion}}))
    page = hr.write_report(root).read_text()
    embedded = embedded_figures(page)
    assert len(embedded) == len(figures) + 2
    for caption in ("training curves (loss and kNN accuracy per run)", "msl confusion matrix (cluster-k10-t0.5-s1)"):
        assert Image.open(io.BytesIO(embedded[caption])).size[0] > 300  # a real drawing, not a placeholder
    order = [page.index(f'id="{anchor}"') for anchor in ("reproduce", "figures", "best", "results", "config")]
    assert order == sorted(order), "reproduce, figures, best trial, results, configuration: top-down"
    assert page.count("Mean ± std over seeds") == 1 and page.count("<td>65.0 ± 7.1</td>") == 1
    assert "sweep.json: variants" not in page


def test_run_page_has_its_curves_and_confusion_matrix(tmp_path):
    put(tmp_path / "config.json", json.dumps({"epochs": 3}))
    _log_curves(tmp_path / "tb", [5.0, 4.0, 3.5], [0.2, 0.3, 0.5])
    put(tmp_path / "eval-hirise.json", json.dumps({"metrics": {"accuracy": 0.5, "confusion_matrix": [[1, 1], [1, 1]]}}))
    embedded = embedded_figures(hr.write_report(tmp_path).read_text())
    assert sorted(embedded) == ["hirise confusion matrix", "training curves (loss and kNN accuracy per run)"]
    put(tmp_path / "eval-hirise-random-init.json", json.dumps({"metrics": {"confusion_matrix": [[2, 0], [2, 0]]}}))
    put(tmp_path / "eval-msl.json", json.dumps({"metrics": {"confusion_matrix": [[1, 0], [0, 1]]}}))
    embedded = embedded_figures(hr.write_report(tmp_path).read_text())  # in page order
    assert list(embedded)[1:] == ["hirise confusion matrix", "msl confusion matrix", "hirise-random-init confusion matrix"]
