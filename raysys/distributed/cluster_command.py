"""``raysys cluster``: cluster the pretraining pool for each ``--k`` (k-means on an encoder's features, cached)
and print where the table is, the cluster sizes and, when labels exist, how the clusters match them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysys.config import make_config
from raysys.data.sources import cluster_pool
from raysys.distributed.clustering import (
    DEFAULT_CACHE_DIR,
    DEFAULT_IMAGE_SIZE,
    ENCODERS,
    META_CACHE_FILE,
    META_K,
    META_QUALITY,
    META_USES_LABELS,
    ClusterError,
    add_texture_arguments,
    check_k,
    cluster_assignments,
    manifest_labels,
    texture_settings,
)
from raysys.distributed.runtime import init_ray
from raysys.models import texture


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys cluster``."""
    p.add_argument("--data", help="pretraining pool: a folder of images or datasets side by side "
                                  "(default: the built-in simulated data under --builtin-root)")
    p.add_argument("--pool", help="the folder of images to cluster, when --data holds several beside its benchmarks")
    p.add_argument("--builtin-root", default="data/builtin", help="where the built-in data is written")
    p.add_argument("--preset", default="demo", choices=("smoke", "demo", "paper"), help="built-in data size")
    p.add_argument("--encoder", default="texture",
                   help="texture (deep texture clustering, trained here), oracle (true labels: diagnostics "
                        "on simulated data only) or a saved raysys model (run folder, model.pt, checkpoint)")
    p.add_argument("--k", action="append", help="number of clusters; repeatable or a comma list (e.g. 10,40,70)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--texture-epochs", type=int, help="texture encoder epochs (default: TextureConfig's)")
    add_texture_arguments(p)
    p.add_argument("--out", help="also copy the result to this .parquet file (with several K: FILE-k<K>.parquet)")
    return p


def _parse_ks(values: list[str] | None, encoder: str) -> list[int | None]:
    if not values:
        if encoder == "oracle":
            return [None]  # the oracle has one cluster per label
        raise ClusterError("--k is required (e.g. --k 40 or --k 10,40,70)")
    ks = []
    for value in values:
        for part in value.split(","):
            try:
                ks.append(int(part))
            except ValueError:
                raise ClusterError(f"--k {part!r} is not an integer; pass e.g. --k 10,40,70") from None
    return list(dict.fromkeys(ks))


def _pool_manifest(args) -> pa.Table:
    """Every image of the pool folder (held-out traverses included: a cluster table may cover more than the
    trainer's pool), with hidden labels whenever the simulator left them (for NMI/purity and the oracle)."""
    if args.data is not None and not Path(args.data).exists():
        raise ClusterError(f"--data {args.data} does not exist; pass a folder of images")
    return cluster_pool(make_config(args.preset, data=args.data, pool=args.pool, builtin_root=args.builtin_root))


def _out_file(out: str, k: int, several: bool) -> Path:
    path = Path(out)
    return path.with_name(f"{path.stem}-k{k}{path.suffix}") if several else path


def _checked_args(args) -> tuple[list, pa.Table, dict]:
    """``(ks, pool manifest, encoder settings)``, every bad argument refused before Ray starts."""
    ks = _parse_ks(args.k, args.encoder)
    if args.encoder not in ENCODERS and not Path(args.encoder).exists():
        raise ClusterError(f"--encoder {args.encoder}: no such file or folder; pass texture, oracle or a saved model")
    if args.image_size < 8:
        raise ClusterError(f"--image-size must be at least 8, got {args.image_size}")
    manifest = _pool_manifest(args)
    n_images = len(set(manifest.column("image_id").to_pylist()))
    if args.encoder == "oracle":
        if not (manifest_labels(manifest) >= 0).any():
            raise ClusterError("--encoder oracle needs labels; this pool has none (only simulated data does)")
        ks = ks[:1]
    else:
        for k in ks:
            check_k(k, n_images)
    encoder_kw = texture_settings(args)
    if args.encoder == "texture":
        texture.TextureConfig.from_dict(encoder_kw)
    elif encoder_kw:
        raise ClusterError("--texture-epochs, --texture-colour-invariant and --texture-weights apply only to "
                           "--encoder texture")
    return ks, manifest, encoder_kw


def _print_assignments(table: pa.Table, encoder: str) -> None:
    meta = table.schema.metadata
    sizes = np.bincount(table.column("cluster_id").to_numpy())
    sizes = sizes[sizes > 0]
    label = "oracle (USES TRUE LABELS)" if meta[META_USES_LABELS] == b"true" else encoder
    print(f"{label} K={meta[META_K].decode()}: {meta[META_CACHE_FILE].decode()}")
    print(f"  {len(sizes)} clusters over {table.num_rows} images; size min {sizes.min()}, "
          f"median {np.median(sizes):g}, max {sizes.max()}")
    quality = json.loads(meta[META_QUALITY])
    if quality:
        print(f"  NMI {quality['nmi']:.3f}, purity {quality['purity']:.3f}, same-cluster pairs sharing a class "
              f"{quality.get('pair_precision', float('nan')):.3f}, same-class pairs sharing a cluster "
              f"{quality.get('pair_recall', float('nan')):.3f} ({quality['n_labeled']} labeled images)")


def run(args: argparse.Namespace) -> int:
    """``raysys cluster``: cluster the pool for each ``--k``; prints the Parquet path, cluster sizes and,
    when labels exist, NMI and purity."""
    ks, manifest, encoder_kw = _checked_args(args)
    init_ray()
    for k in ks:
        table = cluster_assignments(manifest, args.encoder, k, seed=args.seed, cache_dir=args.cache_dir,
                                    image_size=args.image_size, **encoder_kw)
        _print_assignments(table, args.encoder)
        if args.out:
            meta = table.schema.metadata
            target = _out_file(args.out, int(meta[META_K]), len(ks) > 1)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(meta[META_CACHE_FILE].decode(), target)
            print(f"  copied to {target}")
    return 0
