"""Where the data is: the one place that finds the pretraining pool, the labeled benchmarks beside it,
the held-out traverses and the cluster tables, for every command and layer above.

A data root is the built-in simulated data (written once per preset, ``raysys.data.simulate``) or a
``--data`` folder: datasets side by side (``formats.discover``) or one dataset of any format. Configs
are passed in as :class:`raysys.config.PretrainConfig` objects (read here, never imported: the config
layer sits above the data layer).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.data import formats
from raysys.data.mixing import mix_domains
from raysys.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HOLDOUT_FILE = "holdout-traverses.txt"


def builtin_roots(builtin_dir, sim_preset: str, sim_seed: int) -> dict[str, Path]:
    """The built-in datasets of one preset (written on first use): ``{"msl", "hirise", "rover", "diverse"}``."""
    from raysys.data.simulate import simulate

    return {k: Path(v) for k, v in simulate(builtin_dir, preset=sim_preset, seed=sim_seed).items()}


def data_roots(cfg) -> dict[str, Path]:
    """The datasets a config names: its ``--data`` folder's, else the built-in data of its ``sim_preset``."""
    if cfg.data is None:
        return builtin_roots(cfg.builtin_dir, cfg.sim_preset, cfg.sim_seed)
    return {k: Path(v) for k, v in formats.discover(cfg.data).items()}


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
    """The pretraining manifest and the labeled benchmarks found beside it.

    ``cfg.data`` None: the built-in simulated datasets (written once under ``cfg.builtin_dir``).
    A folder holding datasets side by side: its rover pool is pretrained on, its benchmarks evaluated.
    Any other folder: read as one dataset (auto-detected format) and pretrained on.
    With ``cfg.mix_ratio`` > 0 that fraction of the pool is replaced by out-of-domain images; with
    ``cfg.cluster_ids`` the cluster table is attached.
    """
    roots = data_roots(cfg)
    pool_root = roots.get("rover", Path(cfg.data) if cfg.data else None)
    split = pool_split(cfg, roots)
    # Held-out traverses ("unfamiliar environments") are never pretrained on: place recognition uses them.
    manifest = split[0] if split else formats.read_manifest(pool_root)
    if cfg.max_images is not None and manifest.num_rows > cfg.max_images:
        rows = np.random.default_rng(cfg.seed).choice(manifest.num_rows, cfg.max_images, replace=False)
        manifest = manifest.take(np.sort(rows))
    if cfg.mix_ratio > 0:
        manifest = mix_domains(manifest, formats.read_imagefolder(_mix_root(cfg, roots)), cfg.mix_ratio,
                               seed=cfg.seed)
    if cfg.cluster_ids:
        manifest = attach_cluster_file(manifest, cfg.cluster_ids)
    if manifest.num_rows < cfg.batch_size:
        raise ConfigError(
            f"the pretraining pool at {pool_root} has {manifest.num_rows} images, fewer than one batch "
            f"({cfg.batch_size}); lower --batch-size or add images"
        )
    benchmarks = {k: v for k, v in roots.items() if k in cfg.eval_benchmarks}
    return manifest, benchmarks


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
    """``(pretrain, held-out)`` rows of the data's rover pool, None when it has none. Hidden labels are read
    for the built-in data only (diagnostics such as the false-negative count)."""
    if "rover" not in roots:
        return None
    pool = formats.read_folder(roots["rover"], hidden_labels=cfg.data is None)
    return holdout_split(pool, read_holdout(roots["rover"]))


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
