"""t-SNE map of a trained encoder's frozen features, drawn with the images themselves (paper, App. D, Fig. 8).

``raysys visualize RUN`` picks N images of a dataset (default: the run's MSL benchmark), embeds them with
the run's backbone, reduces the features to 2-d with scikit-learn's t-SNE and draws every image's
thumbnail at its point, framed in the colour of its label or of its cluster id. It writes, under
``--out`` (default ``RUN/visualize``):

* ``tsne.png``: the thumbnail map;
* ``tsne.csv``: one row per image (image_id, path, label, class, cluster_id, domain, x, y);
* ``projector/``: a TensorBoard embedding-projector entry (the raw features, a thumbnail sprite and the
  metadata columns), explored interactively with ``tensorboard --logdir <out>/projector``.

Images are sampled per colour group (label or cluster) in proportion to the group sizes (every group keeps
at least one image when N allows), with a seed. Augmented copies (MSL's ``-fh``/``-r90``..., HiRISE's repeated rows) would show up
as near-identical neighbours, so only one image per ``group_id`` is eligible, the original when present.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.data import formats
from raysys.data.decode import load_images
from raysys.data.schema import SPLITS, UNLABELED
from raysys.data.simulate import apportion
from raysys.data.sources import builtin_roots, has_hidden_labels
from raysys.errors import ConfigError, ModelFileError
from raysys.eval.features import extract_features
from raysys.eval.linear import DEFAULT_IMAGE_SIZE
from raysys.models.io import load_saved, resolve_model_file, run_folder
from raysys.reporting.plots import READING_KEY

COLOR_MODES = ("label", "cluster")
DEFAULT_N = 500
MIN_IMAGES = 5  # t-SNE on fewer points shows nothing
DEFAULT_PERPLEXITY = 30.0
DEFAULT_THUMB = 32
MAX_LEGEND = 30  # more entries than this make an unreadable legend
METADATA_HEADER = ["image_id", "label", "class", "cluster_id", "domain"]
UNKNOWN_COLOR = (0.6, 0.6, 0.6, 1.0)


# ----------------------------------------------------------------------------- inputs


def read_clusters(path: str | Path) -> dict[str, int]:
    """``{image_id: cluster_id}`` from a Parquet or CSV table with ``image_id`` and ``cluster_id`` columns
    (as written by ``raysys cluster``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--clusters {path} is not a file; pass the .parquet (or .csv) written by raysys cluster")
    try:
        if path.suffix.lower() == ".csv":
            from pyarrow import csv

            types = {"image_id": pa.string(), "cluster_id": pa.int64()}  # ids like "0001" stay strings
            table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types=types))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"--clusters {path} is not a readable table ({str(exc).splitlines()[0]})") from None
    missing = {"image_id", "cluster_id"} - set(table.column_names)
    if missing:
        raise ConfigError(f"--clusters {path} lacks columns {sorted(missing)}; it needs image_id and cluster_id")
    return dict(zip(table.column("image_id").cast(pa.string()).to_pylist(),
                    table.column("cluster_id").cast(pa.int64()).to_pylist()))


def read_dataset(root: str | Path) -> pa.Table:
    """A dataset's manifest (any layout :func:`raysys.data.formats.read_manifest` reads); a plain folder's
    hidden labels (the simulator's pretraining pool) are read when present, for colouring only."""
    fmt = formats.detect_format(root)
    root = Path(root)
    hidden = fmt == "folder" and has_hidden_labels(root)
    return formats.read_manifest(root, format=fmt, **({"hidden_labels": True} if hidden else {}))


def default_dataset(run_dir: Path, config: dict) -> Path:
    """The run's MSL benchmark: the one its linear evaluation used (``eval-msl.json``), the one a supervised
    run trained on (``supervised.json``), else the MSL folder of the run's ``--data`` or built-in data."""
    for name in ("eval-msl.json", "supervised.json"):
        file = run_dir / name
        if file.is_file():
            benchmark = json.loads(file.read_text()).get("benchmark")
            if benchmark and Path(benchmark).is_dir():
                return Path(benchmark)
    if config.get("data"):
        roots = formats.discover(config["data"])
    elif "sim_preset" in config:  # a pretraining run on the built-in data: the trainer's own folder and seed
        roots = builtin_roots(Path(config.get("builtin_root") or "data/builtin") / config["sim_preset"],
                              config["sim_preset"], config.get("sim_seed", 0))
    else:
        roots = {}
    if "msl" not in roots:
        raise ConfigError(f"cannot tell which MSL benchmark {run_dir} was evaluated on; pass --data DATASET")
    return Path(roots["msl"])


def one_per_group(manifest: pa.Table) -> np.ndarray:
    """Row indices with one row per ``group_id`` (augmented copies and repeated rows dropped), the
    original preferred, in manifest order."""
    groups = np.asarray(manifest.column("group_id").to_pylist(), dtype=object)
    copies = np.asarray(pc.not_equal(manifest.column("image_id"), manifest.column("group_id")).to_pylist())
    order = np.argsort(copies, kind="stable")  # originals first, so np.unique keeps them
    _, first = np.unique(groups[order].astype(str), return_index=True)
    return np.sort(order[first])


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` items drawn per label in proportion to the label counts (largest remainder;
    every label keeps at least one item when ``n`` is at least the number of labels), sorted."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    values, sizes = np.unique(labels, return_counts=True)
    counts = apportion(n, sizes, minimum=1 if n >= len(values) else 0)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == v), c, replace=False) for v, c in zip(values, counts)]
    return np.sort(np.concatenate(chosen))


def _check_options(n: int, color: str, perplexity: float, image_size: int | None, thumb_size: int, clusters) -> None:
    """Every argument check that needs no file read: fail before any heavy work."""
    if color not in COLOR_MODES:
        raise ConfigError(f"--color {color!r} is unknown; choose one of {list(COLOR_MODES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < MIN_IMAGES:
        raise ConfigError(f"-n must be an integer of at least {MIN_IMAGES} (got {n!r}): t-SNE of fewer points shows nothing")
    if not perplexity > 0:
        raise ConfigError(f"--perplexity must be > 0 (got {perplexity}); 5-50 is usual")
    if image_size is not None and image_size < 8:
        raise ConfigError(f"--image-size must be at least 8 pixels (got {image_size})")
    if thumb_size < 8:
        raise ConfigError(f"--thumb-size must be at least 8 pixels (got {thumb_size})")
    if color == "cluster" and clusters is None:
        raise ConfigError("--color cluster needs --clusters FILE (the Parquet written by raysys cluster)")


# ----------------------------------------------------------------------------- t-SNE and drawing


def tsne_2d(features: np.ndarray, perplexity: float, seed: int, verbose: bool = True) -> tuple[np.ndarray, float]:
    """2-d t-SNE coordinates of ``features`` and the perplexity used: scikit-learn needs it below the
    number of points, so it is clamped to ``(N - 1) / 3`` (the neighbour count t-SNE uses is 3x it)."""
    from sklearn.manifold import TSNE

    n = len(features)
    used = min(float(perplexity), (n - 1) / 3)
    if used < perplexity:
        print(f"t-SNE: perplexity {perplexity:g} clamped to {used:.3g} for {n} images (it must stay below N)")
    print(f"t-SNE: {n} x {features.shape[1]} features, perplexity {used:.3g}, seed {seed}")
    tsne = TSNE(n_components=2, perplexity=used, init="pca", random_state=seed, verbose=2 if verbose else 0)
    return tsne.fit_transform(features.astype(np.float32)).astype(np.float32), used


def palette(groups) -> dict[int, tuple]:
    """A distinct RGBA colour per group id >= 0 (tab10/tab20, evenly spaced hues beyond 20, shuffled so
    neighbouring ids differ); grey for -1 (unknown)."""
    from matplotlib import colormaps

    known = sorted({int(g) for g in groups if g >= 0})
    if len(known) <= 10:
        colours = [colormaps["tab10"](i) for i in range(len(known))]
    elif len(known) <= 20:
        colours = [colormaps["tab20"](i) for i in range(len(known))]
    else:
        hues = np.random.default_rng(0).permutation(len(known)) / len(known)
        colours = [colormaps["hsv"](h) for h in hues]
    return {**{g: tuple(c) for g, c in zip(known, colours)}, UNLABELED: UNKNOWN_COLOR}


def plot_thumbnails(coords: np.ndarray, thumbs: np.ndarray, groups: np.ndarray, names: dict[int, str],
                    path: str | Path, title: str, dpi: int = 100) -> Path:
    """Each image's thumbnail at its 2-d point, framed in its group's colour; a legend of the groups
    (with counts) when there are at most :data:`MAX_LEGEND`. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from matplotlib.patches import Patch

    n = len(coords)
    side = min(24.0, max(8.0, 0.6 * math.sqrt(n) + 4))  # inches; thumbnails fill about half of each axis
    target_px = side * dpi / (2.0 * math.sqrt(n))
    zoom = min(2.0, max(0.4, target_px / thumbs.shape[1])) * 72 / dpi  # OffsetImage scales pixels by dpi/72
    colours = palette(groups)
    fig, ax = plt.subplots(figsize=(side, side), dpi=dpi)
    ax.scatter(coords[:, 0], coords[:, 1], s=2, c=[colours[int(g)] for g in groups])  # sets the data limits
    for (x, y), thumb, g in zip(coords, thumbs, groups):
        box = AnnotationBbox(OffsetImage(thumb, zoom=zoom), (x, y), frameon=True, pad=0.15,
                             bboxprops={"edgecolor": colours[int(g)], "linewidth": 2.0})
        ax.add_artist(box)
    ax.margins(0.06)
    ax.set_axis_off()
    present, counts = np.unique(groups, return_counts=True)
    if len(present) <= MAX_LEGEND:
        handles = [Patch(facecolor=colours[int(g)], label=f"{names[int(g)]} ({c})") for g, c in zip(present, counts)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    else:
        title += f" ({len(present)} groups: legend omitted)"
    ax.set_title(title, fontsize=12)
    fig.savefig(path, bbox_inches="tight", metadata={READING_KEY: map_reading(coords, groups)})
    plt.close(fig)
    return Path(path)


def map_reading(coords: np.ndarray, groups: np.ndarray) -> str:
    """One line: how often an image's nearest neighbour in the 2-d map is of its own group, beside the share
    two images drawn at random would (what a map without group structure scores); unlabeled images left out."""
    known = groups != UNLABELED
    coords, groups = coords[known], groups[known]
    if len(groups) < 2:
        return f"{len(groups)} labelled image(s): too few to read group structure from."
    from scipy.spatial import cKDTree

    nearest = cKDTree(coords).query(coords, k=2)[1][:, 1]  # the first is the image itself
    same = float(np.mean(groups[nearest] == groups))
    counts = np.unique(groups, return_counts=True)[1]
    chance = float((counts * (counts - 1)).sum() / (len(groups) * (len(groups) - 1)))
    return (f"{100 * same:.0f} % of the {len(groups)} labelled images have a nearest neighbour in the map of their "
            f"own group ({len(counts)} groups; two images at random: {100 * chance:.0f} %).")


def _tsv_cell(value) -> str:
    return " ".join(str(value).split())  # tabs or newlines would break the projector's metadata.tsv


def write_projector(log_dir: str | Path, features: np.ndarray, thumbs: np.ndarray, metadata: list[list]) -> Path:
    """A TensorBoard projector entry in ``log_dir`` (replaced if present): ``features`` as the tensor,
    ``thumbs`` (uint8 ``[N, S, S, 3]``) as the sprite, ``metadata`` rows under :data:`METADATA_HEADER`."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    if log_dir.is_dir():  # a rerun: stale event files and embeddings would otherwise pile up
        shutil.rmtree(log_dir)
    label_img = torch.from_numpy(thumbs).permute(0, 3, 1, 2).float() / 255
    rows = [[_tsv_cell(v) for v in row] for row in metadata]
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_embedding(features, metadata=rows, label_img=label_img, tag="features",
                             metadata_header=METADATA_HEADER)
    return log_dir


# ----------------------------------------------------------------------------- the whole step


def _names(groups: np.ndarray, color: str, classes: list[str]) -> dict[int, str]:
    def name(g: int) -> str:
        if g < 0:
            return "unknown" if color == "label" else "no cluster"
        if color == "cluster":
            return f"cluster {g}"
        return classes[g] if g < len(classes) else f"class {g}"

    return {int(g): name(int(g)) for g in np.unique(groups)}


def _write_csv(path: Path, metadata: list[list], paths: list[str], coords: np.ndarray) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*METADATA_HEADER, "path", "x", "y"])
        for row, p, (x, y) in zip(metadata, paths, coords):
            writer.writerow([*row, p, f"{x:.5f}", f"{y:.5f}"])


def _load_run(run: str | Path) -> tuple:
    """The run's saved-model file, model and config. A missing or unreadable model is an error in the RUN
    argument, so it is reported as a :class:`~raysys.errors.ConfigError` that names it."""
    try:
        model_file = resolve_model_file(run)
        model, config = load_saved(model_file)
    except ModelFileError as exc:  # no saved model there, or not a readable one
        raise ConfigError(f"RUN: {exc}") from None
    return model_file, model, config


def _sample_rows(data: Path, split: str | None, cluster_of: dict[str, int], color: str, clusters, n: int,
                 seed: int) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """The eligible manifest (``split`` only, one image per group), its labels and cluster ids, and the
    sampled row indices; fails before any decoding when there is nothing to colour by or too few images."""
    manifest = read_dataset(data)
    if split is not None:
        manifest = manifest.filter(pc.equal(manifest.column("split"), split))
    manifest = manifest.take(one_per_group(manifest))
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=np.int64)
    ids = manifest.column("image_id").to_pylist()
    cluster_ids = np.asarray([cluster_of.get(i, UNLABELED) for i in ids], dtype=np.int64)
    if color == "label" and not (labels >= 0).any():
        raise ConfigError(f"{data} has no labels to colour by; use --color cluster --clusters FILE")
    if clusters is not None and not (cluster_ids >= 0).any():
        raise ConfigError(f"no image of {data} has a cluster id in {clusters}; pass the dataset the clusters "
                          "were computed on with --data")
    if manifest.num_rows < MIN_IMAGES:
        raise ConfigError(f"{data} has {manifest.num_rows} distinct images{'' if split is None else ' in ' + split}; "
                          f"t-SNE needs at least {MIN_IMAGES}")
    if n > manifest.num_rows:
        print(f"{data} has {manifest.num_rows} distinct images; using all of them (asked for {n})")
    rows = stratified_sample(labels if color == "label" else cluster_ids, n, seed)
    return manifest, labels, cluster_ids, rows


def _decode_sample(manifest: pa.Table, rows: np.ndarray, data: Path, image_size: int, thumb_size: int):
    """Decode the sampled images at ``image_size`` (for the model) and ``thumb_size`` (for the map); an
    undecodable file is reported on stderr and dropped. Returns (rows, paths, images, thumbs, skipped)."""
    paths = [manifest.column("path")[int(r)].as_py() for r in rows]
    print(f"decoding {len(rows)} images of {data} at {image_size} px")
    images, kept, bad = load_images(paths, image_size)
    for path, reason in bad:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(kept) < MIN_IMAGES:
        raise ConfigError(f"only {len(kept)} of {len(rows)} sampled images could be decoded; t-SNE needs {MIN_IMAGES}")
    paths = [paths[k] for k in kept]
    thumbs = images if thumb_size == image_size else load_images(paths, thumb_size)[0]
    return rows[kept], paths, images, thumbs, bad


def _metadata(manifest: pa.Table, rows: np.ndarray, labels: np.ndarray, cluster_ids: np.ndarray,
              classes: list[str]) -> list[list]:
    """One row per drawn image under :data:`METADATA_HEADER`, shared by tsne.csv and the projector."""
    ids = manifest.column("image_id").to_pylist()
    domains = manifest.column("domain").to_pylist()
    class_of = _names(labels[rows], "label", classes)
    return [[ids[r], labels[r], class_of[int(labels[r])], cluster_ids[r], domains[r]] for r in rows]


def visualize(
    run: str | Path, out: str | Path | None = None, data: str | Path | None = None, n: int = DEFAULT_N,
    seed: int = 0, color: str = "label", clusters: str | Path | None = None, split: str | None = None,
    image_size: int | None = None, thumb_size: int = DEFAULT_THUMB, perplexity: float = DEFAULT_PERPLEXITY,
    device=None, progress: bool = True,
) -> dict:
    """t-SNE thumbnail map and TensorBoard projector of ``n`` images of ``data`` embedded by ``run``.

    Returns ``{"png", "csv", "projector", "n", "feature_dim", "perplexity", "data", "skipped"}``. Bad
    arguments raise a one-line :class:`~raysys.errors.ConfigError` before any image is decoded.
    """
    _check_options(n, color, perplexity, image_size, thumb_size, clusters)
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split {split!r} is unknown; choose one of {list(SPLITS)}")
    model_file, model, config = _load_run(run)
    cluster_of = read_clusters(clusters) if clusters is not None else {}
    run_dir = run_folder(model_file)
    if data is None:
        data = default_dataset(run_dir, config)
        print(f"dataset: {data} (the run's MSL benchmark; pass --data for another)")
    data = Path(data)
    out = Path(out) if out is not None else run_dir / "visualize"
    image_size = image_size or int(config.get("image_size") or DEFAULT_IMAGE_SIZE)

    manifest, labels, cluster_ids, rows = _sample_rows(data, split, cluster_of, color, clusters, n, seed)
    rows, paths, images, thumbs, bad = _decode_sample(manifest, rows, data, image_size, thumb_size)
    features = extract_features(model, images, device=device, progress=progress)
    coords, used = tsne_2d(features, perplexity, seed, verbose=progress)

    classes = formats.class_names(manifest)
    groups = labels[rows] if color == "label" else cluster_ids[rows]
    metadata = _metadata(manifest, rows, labels, cluster_ids, classes)
    out.mkdir(parents=True, exist_ok=True)
    what = "label" if color == "label" else f"cluster ({Path(clusters).name})"
    title = f"t-SNE of {run_dir.name} features: {len(rows)} images of {data.name}, framed by {what}"
    png = plot_thumbnails(coords, thumbs, groups, _names(groups, color, classes), out / "tsne.png", title)
    _write_csv(out / "tsne.csv", metadata, paths, coords)
    projector = write_projector(out / "projector", features, thumbs, metadata)
    return {"png": png, "csv": out / "tsne.csv", "projector": projector, "n": len(rows),
            "feature_dim": int(features.shape[1]), "perplexity": used, "data": data, "skipped": bad}


# ----------------------------------------------------------------------------- command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys visualize``."""
    p.add_argument("run", help="run folder (model.pt), checkpoint directory (state.pt) or the saved file")
    p.add_argument("--data", help="dataset folder to embed (any layout raysys reads, incl. the pretraining pool); "
                                  "default: the run's MSL benchmark")
    p.add_argument("-n", "--num-images", dest="n", type=int, default=DEFAULT_N,
                   help="images to draw, sampled per label or cluster (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling and t-SNE seed")
    p.add_argument("--color", default="label", help=f"frame colour: {' or '.join(COLOR_MODES)} (default: %(default)s)")
    p.add_argument("--clusters", help="image_id,cluster_id table (.parquet from raysys cluster, or .csv)")
    p.add_argument("--split", help=f"only this split ({', '.join(SPLITS)}); default: all")
    p.add_argument("--out", help="output folder (default: RUN/visualize)")
    p.add_argument("--image-size", type=int, help=f"pixels fed to the model (default: the run's, else {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--thumb-size", type=int, default=DEFAULT_THUMB, help="thumbnail pixels (default: %(default)s)")
    p.add_argument("--perplexity", type=float, default=DEFAULT_PERPLEXITY, help="t-SNE perplexity (default: %(default)s)")
    p.add_argument("--device", help="torch device for the features (default: cuda if available, else cpu)")
    return p


def run(args: argparse.Namespace) -> int:
    """``raysys visualize``: write tsne.png, tsne.csv and the projector entry. Bad input raises a
    :class:`~raysys.errors.RaysysError`, which the ``raysys`` command prints as one line and exits 2."""
    result = visualize(args.run, out=args.out, data=args.data, n=args.n, seed=args.seed, color=args.color,
                       clusters=args.clusters, split=args.split, image_size=args.image_size,
                       thumb_size=args.thumb_size, perplexity=args.perplexity, device=args.device)
    print(f"t-SNE map: {result['png']}\ncoordinates: {result['csv']}\n"
          f"projector: tensorboard --logdir {result['projector']}")
    return 0
