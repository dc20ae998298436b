"""Where the data is: the one place that finds the pretraining pool, the labeled benchmarks beside it,
the held-out traverses and the cluster tables, for every command and layer above.

A data root is the built-in simulated data (written once per preset, ``raysys.data.simulate``) or a
``--data`` folder: datasets side by side (``formats.discover``) or one dataset of any format. Configs
are passed in as :class:`raysys.config.PretrainConfig` objects (read here, never imported: the config
layer sits above the data layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.data import formats
from raysys.data.mixing import mix_domains, mixed_counts
from raysys.data.schema import SPLITS
from raysys.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HOLDOUT_FILE = "holdout-traverses.txt"


def builtin_roots(builtin_dir, sim_preset: str, sim_seed: int) -> dict[str, Path]:
    """The built-in datasets of one preset (written on first use): ``{"msl", "hirise", "rover", "diverse"}``."""
    from raysys.data.simulate import simulate

    return {k: Path(v) for k, v in simulate(builtin_dir, preset=sim_preset, seed=sim_seed).items()}


BENCHMARKS = {"msl": "MSL v2.1", "hirise": "HiRISE v3.2"}  # key -> the name a person reads
EVAL_SPLITS = ("val", "test")  # what a benchmark scores encoders on: never pretrained on unless asked


@dataclass(frozen=True)
class Sources:
    """What a run trains and is scored on: the pretraining manifest, the benchmarks it is evaluated on, and one
    line per source saying what it is and how many images it gives (printed before training)."""

    manifest: pa.Table
    benchmarks: dict[str, Path]
    lines: tuple[str, ...]


def data_roots(cfg) -> dict[str, Path]:
    """The datasets a config names: its ``--data`` folder's, else the built-in data of its ``sim_preset``.
    ``rover`` is the pool folder: ``--pool``, else the one folder of images beside the benchmarks; several
    such folders and no ``--pool`` is refused, naming them."""
    if cfg.data is None:
        roots = builtin_roots(cfg.builtin_dir, cfg.sim_preset, cfg.sim_seed)
    else:
        roots = {k: Path(v) for k, v in formats.discover(cfg.data).items()}
    if cfg.pool:
        pool = pool_option(cfg)
        roots = {k: v for k, v in roots.items() if k != "rover"}
        if pool not in roots.values():  # --pool naming a benchmark picks its train split (pool_source)
            roots["rover"] = pool
        return roots
    if "rover" not in roots and cfg.data is not None:
        candidates = formats.pool_folders(cfg.data, roots)
        if len(candidates) > 1:
            names = ", ".join(f"{c.name}/" for c in candidates)
            raise ConfigError(f"--data {cfg.data} holds {len(candidates)} folders of images that could be the "
                              f"pretraining pool ({names}); pass --pool DIR to choose one")
    return roots


def pool_option(cfg) -> Path:
    """The folder ``--pool`` names: relative to ``--data`` when it is there, else to the working directory."""
    path = Path(cfg.pool).expanduser()
    if not path.is_absolute() and cfg.data and (Path(cfg.data) / path).exists():
        path = Path(cfg.data) / path
    if not path.is_dir():
        raise ConfigError(f"--pool {cfg.pool} is not a folder (looked in {cfg.data or '.'} and here); pass the "
                          "folder of images to pretrain on")
    return path.resolve()


def pool_source(cfg, roots: dict[str, Path]) -> tuple[str, Path]:
    """Where the pretraining images come from: ``("folder", dir)`` the pool folder, ``("benchmark", dir)`` a
    benchmark's train split (the data has no pool, or ``--pool`` names it) or ``("dataset", dir)`` the
    ``--data`` folder read as one dataset of any format."""
    if "rover" in roots:
        return "folder", roots["rover"]
    found = [roots[k] for k in BENCHMARKS if k in roots]
    if cfg.pool:
        return "benchmark", pool_option(cfg)
    if len(found) > 1:
        raise ConfigError(f"--data {cfg.data} holds benchmarks but no folder of unlabeled images to pretrain on; "
                          "put one beside them, or pass --pool with a benchmark's folder to pretrain on its train split")
    return ("benchmark", found[0]) if found else ("dataset", Path(cfg.data))


def is_simulated(root) -> bool:
    """Whether a dataset folder was written by the simulator (its stamp file is there), not a real download."""
    from raysys.data.simulate import STAMP

    return (Path(root) / STAMP).is_file()


def has_hidden_labels(root) -> bool:
    """Whether the simulator left its hidden labels in this folder (diagnostics only, never trained on)."""
    root = Path(root)
    return any((d / formats.HIDDEN_LABELS_FILE).is_file() for d in (root, root / formats.IMAGES_SUBDIR))


def read_pool(root) -> pa.Table:
    """A rover pool folder's manifest, with the simulator's hidden labels whenever it left them (for
    diagnostics: false-negative counts, NMI, the oracle)."""
    return formats.read_folder(root, hidden_labels=has_hidden_labels(root))


def resolve_data(cfg) -> tuple[pa.Table, dict[str, Path]]:
    """The pretraining manifest and the benchmarks it is evaluated on (:func:`data_sources`)."""
    sources = data_sources(cfg)
    return sources.manifest, sources.benchmarks


def data_sources(cfg) -> Sources:
    """The pretraining manifest, the labeled benchmarks beside it, and what each gives.

    ``cfg.data`` None: the built-in simulated datasets (written once under ``cfg.builtin_dir``). A folder
    holding datasets side by side: its pool folder is pretrained on (:func:`data_roots`), its benchmarks
    evaluated. Any other folder: read as one dataset (auto-detected format) and pretrained on. Whatever the
    pool, no image of a benchmark's val or test split is pretrained on unless ``cfg.pretrain_on_eval_splits``.
    With ``cfg.mix_ratio`` > 0 that fraction of the pool is replaced by out-of-domain images; with
    ``cfg.cluster_ids`` the cluster table is attached.
    """
    roots = data_roots(cfg)
    kind, pool_root = pool_source(cfg, roots)
    benchmarks = {k: formats.read_manifest(roots[k]) for k in BENCHMARKS if k in roots}
    held = None
    if kind == "folder":  # held-out traverses ("unfamiliar environments") are never pretrained on
        manifest, held = pool_split(cfg, roots)
    else:
        manifest = read_dataset(pool_root)
    found = manifest.num_rows
    manifest, scored = without_eval_images(manifest, benchmarks.values(), cfg.pretrain_on_eval_splits)
    lines = [pool_line(kind, pool_root, manifest, found, held, scored, cfg.pretrain_on_eval_splits)]
    if cfg.max_images is not None and manifest.num_rows > cfg.max_images:
        rows = np.random.default_rng(cfg.seed).choice(manifest.num_rows, cfg.max_images, replace=False)
        manifest = manifest.take(np.sort(rows))
        lines[0] += f"; {cfg.max_images:,} of them drawn (--max-images)"
    if cfg.mix_ratio > 0:
        mix_root = _mix_root(cfg, roots)
        manifest = mix_domains(manifest, formats.read_imagefolder(mix_root), cfg.mix_ratio, seed=cfg.seed)
        lines.append(f"mixed-domain: {mixed_counts(manifest.num_rows, cfg.mix_ratio)[1]:,} of the {manifest.num_rows:,} "
                     f"pretraining images from {mix_root} (--mix-ratio {cfg.mix_ratio:g})")
    if cfg.cluster_ids:
        manifest = attach_cluster_file(manifest, cfg.cluster_ids)
    if manifest.num_rows < cfg.batch_size:
        raise ConfigError(
            f"the pretraining pool at {pool_root} has {manifest.num_rows} images, fewer than one batch "
            f"({cfg.batch_size}); lower --batch-size or add images"
        )
    evaluated = {k: roots[k] for k in benchmarks if k in cfg.eval_benchmarks}
    lines += [benchmark_line(k, roots[k], benchmarks[k], k == cfg.knn_monitor) for k in evaluated]
    return Sources(manifest, evaluated, tuple(lines))


def read_dataset(root) -> pa.Table:
    """One dataset of any format, as a pool: HiRISE's repeated rows (upsampled classes, for the probe) once."""
    fmt = formats.detect_format(root)
    return formats.read_manifest(root, fmt, **({"dedupe": True} if fmt == "hirise" else {}))


def cluster_pool(cfg) -> pa.Table:
    """Every image a cluster table of the pool covers: held-out traverses included (with the simulator's hidden
    labels wherever it left them, for NMI and the oracle), benchmark val/test images left out as in pretraining."""
    roots = data_roots(cfg)
    kind, root = pool_source(cfg, roots)
    if kind == "folder":
        return read_pool(root)
    benchmarks = [formats.read_manifest(roots[k]) for k in BENCHMARKS if k in roots]
    return without_eval_images(read_dataset(root), benchmarks, cfg.pretrain_on_eval_splits)[0]


def without_eval_images(manifest: pa.Table, benchmarks, keep: bool = False) -> tuple[pa.Table, int]:
    """``manifest`` without the images of any benchmark's val and test splits (matched by path), and how many of
    its rows are such images; ``keep`` (--pretrain-on-eval-splits) keeps them."""
    held = [b.filter(pc.is_in(b.column("split"), value_set=pa.array(EVAL_SPLITS))).column("path") for b in benchmarks]
    if not held:
        return manifest, 0
    scored = pc.is_in(manifest.column("path"), value_set=pa.concat_arrays([c.combine_chunks() for c in held]))
    n_scored = pc.sum(scored).as_py() or 0
    return (manifest if keep else manifest.filter(pc.invert(scored))), n_scored


def pool_line(kind: str, root: Path, manifest: pa.Table, found: int, held: pa.Table | None, scored: int,
              kept: bool) -> str:
    """The console's line on the pool: which images it is, how many of them are pretrained on, and why not all."""
    what = {"folder": "the folder", "benchmark": "the benchmark", "dataset": "the dataset"}[kind]
    splits = [s for s in SPLITS if kind == "benchmark" and s in set(manifest.column("split").to_pylist())]
    line = f"pretraining pool: {what} {root}" + (f" ({' + '.join(splits)})" if splits else "")
    line += f", {manifest.num_rows:,} images"
    if held is not None and held.num_rows:
        line += f"; {held.num_rows:,} more in held-out traverses, kept for place recognition"
    if scored and kept:
        line += (f"; {scored:,} of them are benchmark val/test images, pretrained on as --pretrain-on-eval-splits "
                 "asks: probe scores on them overstate")
    elif scored:
        line += (f"; {scored:,} of its {found:,} are benchmark val/test images and left out "
                 "(--pretrain-on-eval-splits keeps them)")
    return line


def benchmark_line(key: str, root: Path, manifest: pa.Table, monitor: bool) -> str:
    """The console's line on a benchmark: where it is, its splits' sizes and what each is used for."""
    counts = {s: pc.sum(pc.equal(manifest.column("split"), s)).as_py() or 0 for s in ("train", "val", "test")}
    sizes = " · ".join(f"{s} {n:,}" for s, n in counts.items() if n)
    uses = "the probe fits on train, is scored on test" + ("; the kNN monitor uses train and val" if monitor else "")
    repeats = int((manifest.schema.metadata or {}).get(b"raysys.duplicates", b"0"))
    kept = f"; {repeats:,} repeated label rows kept as listed" if repeats else ""
    return f"evaluation: {BENCHMARKS[key]} at {root}: {sizes} images ({uses}{kept})"


def unseen_pool(cfg, manifest: pa.Table) -> pa.Table:
    """Rows of the data's rover pool that ``manifest`` (what a run pretrains on) does not hold: the rest of a
    ``max_images`` subset and the held-out traverses, with the simulator's hidden labels where it left them."""
    roots = data_roots(cfg)
    if "rover" not in roots:
        return manifest.slice(0, 0)
    pool = read_pool(roots["rover"])
    return pool.filter(pc.invert(pc.is_in(pool.column("image_id"), value_set=manifest.column("image_id"))))


def attach_cluster_file(manifest: pa.Table, path: str) -> pa.Table:
    """Attach ``image_id,cluster_id`` from a Parquet or CSV file, which must cover every pool image."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    try:
        table = pyarrow.csv.read_csv(path) if str(path).endswith(".csv") else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"--cluster-ids {path} is not a readable Parquet/CSV table ({exc}); "
                          f"write it with `raysys cluster --out FILE.parquet`") from None
    if not {"image_id", "cluster_id"} <= set(table.column_names):
        raise ConfigError(f"--cluster-ids {path} has columns {table.column_names}; it needs image_id and cluster_id")
    table = table.select(["image_id", "cluster_id"]).cast(pa.schema([("image_id", pa.string()), ("cluster_id", pa.int64())]))
    missing = pc.invert(pc.is_in(manifest.column("image_id"), value_set=table.column("image_id")))
    n_missing = pc.sum(missing).as_py() or 0
    if n_missing:
        first = manifest.filter(missing).column("image_id").to_pylist()[:3]
        raise ConfigError(f"--cluster-ids {path} covers {manifest.num_rows - n_missing} of {manifest.num_rows} pool "
                          f"images (missing e.g. {first}); rerun `raysys cluster` on this pool")
    return attach_clusters(manifest, table)


def pool_split(cfg, roots: dict[str, Path]) -> tuple[pa.Table, pa.Table] | None:
    """``(pretrain, held-out)`` rows of the data's rover pool, None when it has none; with the simulator's hidden
    labels wherever it left them (diagnostics such as the false-negative count; a real archive has none)."""
    if "rover" not in roots:
        return None
    return holdout_split(read_pool(roots["rover"]), read_holdout(roots["rover"]))


def heldout_manifest(cfg) -> pa.Table | None:
    """The pool's held-out traverses (``holdout-traverses.txt``), for place recognition; None without a pool."""
    split = pool_split(cfg, data_roots(cfg))
    return split[1] if split else None


def _mix_root(cfg, roots: dict[str, Path]) -> Path:
    if cfg.mix_data:
        return Path(cfg.mix_data)
    if "diverse" not in roots:
        raise ConfigError(f"--mix-ratio {cfg.mix_ratio} needs an out-of-domain dataset but {cfg.data} has no "
                          f"diverse/ folder; pass --mix-data PATH (an ImageFolder such as ImageNet's train/)")
    return roots["diverse"]


def attach_clusters(manifest: pa.Table, assignments: pa.Table) -> pa.Table:
    """``manifest`` with a ``cluster_id`` int64 column joined by ``image_id`` (-1 where none, with a
    warning naming the count); row order and schema metadata are kept, an existing column replaced."""
    index = pc.index_in(manifest.column("image_id"), value_set=assignments.column("image_id"))
    cluster = pc.take(assignments.column("cluster_id").cast(pa.int64()), index).fill_null(-1)
    missing = index.null_count
    if missing:
        log.warning("%d of %d images have no cluster id; they get cluster -1", missing, manifest.num_rows)
    if "cluster_id" in manifest.column_names:
        manifest = manifest.drop_columns(["cluster_id"])
    return manifest.append_column(pa.field("cluster_id", pa.int64()), cluster)




def read_holdout(folder) -> list[int]:
    """Held-out traverse ids from ``<folder>/holdout-traverses.txt`` (also looked for in ``images/``):
    one integer per line, blank lines and ``#`` comments ignored. ``[]`` when the folder has no such file;
    a malformed line raises a one-line :class:`DataError` naming file and line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass the rover image folder that holds {HOLDOUT_FILE}")
    path = next((p for p in (folder / HOLDOUT_FILE, folder / "images" / HOLDOUT_FILE) if p.is_file()), None)
    if path is None:
        return []
    ids = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise DataError(f"{path}:{lineno}: {text!r} is not a traverse id; write one integer per line") from None
    return sorted(set(ids))


def holdout_split(manifest: pa.Table, holdout_traverses) -> tuple[pa.Table, pa.Table]:
    """``(pretrain, heldout)``: rows whose ``traverse`` is in ``holdout_traverses`` go to ``heldout``, all
    others (including rows of unknown traverse, -1) to ``pretrain``; row order is kept in both. Held-out
    ids absent from the manifest are logged, not an error (pretraining cannot leak what is not there)."""
    ids = sorted({int(t) for t in holdout_traverses})
    if any(t < 0 for t in ids):
        raise DataError(f"held-out traverse ids must be >= 0 (-1 means unknown), got {ids}")
    held = pc.is_in(manifest.column("traverse"), value_set=pa.array(ids, pa.int32()))
    absent = sorted(set(ids) - set(pc.unique(manifest.column("traverse")).to_pylist()))
    if absent:
        log.warning("held-out traverses %s have no rows in this manifest", absent)
    return manifest.filter(pc.invert(held)), manifest.filter(held)
