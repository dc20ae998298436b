"""``raysys search``: the nearest neighbours of an image among the rows of an embeddings file (written by
``raysys embed``) by cosine similarity -- scikit-learn's exact (brute-force) ``NearestNeighbors`` -- printed
as a table (labels by class name where the layout has names) and drawn as a small self-contained HTML strip
of thumbnails.

The similarity is taken between features centred on the archive's mean embedding: pooled ReLU features all
lie in one orthant, so raw cosines crowd towards 1 (two random demo images: 0.54 for a trained encoder, 0.99
untrained); centred, unrelated images score about 0 and the neighbours' scores spread out, while the order
barely changes (``bench/search_traverse.py``). ``raysys embed`` stores each part's sum, hence the mean of
every row (:func:`stored_mean`); for older files it is computed from the rows read.

The query is a row of the file (``--id``, or ``--image`` naming a file it holds) or any other image, embedded
with the encoder that wrote the file (its path is in the file's metadata) or ``--model``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from raysys.data import formats
from raysys.data.augment import to_float
from raysys.data.decode import decode_image
from raysys.errors import ConfigError, DecodeError
from raysys.models.export import load_encoder

META_IMAGE_SIZE = b"raysys.image_size"  # written by raysys.distributed.embed
META_MODEL = b"raysys.model"
META_SUM = b"raysys.embedding_sum"  # each part's embeddings summed
SHOWN_COLUMNS = ("traverse", "label", "split")  # printed beside each neighbour where the file has them
THUMB = 96


def read_embeddings(path) -> tuple[pa.Table, np.ndarray]:
    """The file's rows without the embedding column, and the embeddings ``float32 [N, D]``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--embeddings {path} does not exist; write it with `raysys embed --out {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"--embeddings {path} is not a readable Parquet dataset ({exc})") from None
    if not {"image_id", "embedding"} <= set(table.column_names) or not table.num_rows:
        raise ConfigError(f"--embeddings {path} holds no image_id/embedding rows; write it with `raysys embed`")
    column = table.column("embedding").combine_chunks()
    emb = column.flatten().to_numpy().astype(np.float32, copy=False).reshape(table.num_rows, column.type.list_size)
    return table.drop_columns(["embedding"]), emb


def stored_mean(path) -> np.ndarray | None:
    """The mean embedding of every row, from the sums ``raysys embed`` keeps in each part's footer (only the
    footers are read); None where a part has no sum (written by an older ``raysys embed``)."""
    total, rows = 0.0, 0
    for part in pads.dataset(path, format="parquet").files:
        footer = pq.read_metadata(part)
        meta = footer.metadata or {}
        if META_SUM not in meta:
            return None
        total, rows = total + np.asarray(json.loads(meta[META_SUM]), dtype=np.float64), rows + footer.num_rows
    return (total / rows).astype(np.float32) if rows else None


def archive_mean(path, emb: np.ndarray) -> np.ndarray:
    """The stored mean of the embeddings at ``path``; else the mean of ``emb`` (its rows), saying so."""
    mean = stored_mean(path)
    if mean is None:
        mean = emb.mean(axis=0)
        print(f"[raysys] {path} stores no mean embedding (written by an older raysys embed): centring on the mean "
              f"of its {len(emb)} rows, computed now")
    return mean


def row_of_id(table: pa.Table, image_id: str) -> int:
    ids = table.column("image_id").to_pylist()
    if image_id not in ids:
        raise ConfigError(f"--id {image_id!r} is not in the embeddings ({len(ids)} images, e.g. "
                          f"{', '.join(ids[:3])}); pass an image_id from the file or --image PATH")
    return ids.index(image_id)


def embed_file(path, model, image_size: int | None) -> np.ndarray:
    """The embedding of one image file by ``model`` (run folder or exported encoder): ``float32 [D]``."""
    encoder, pre = load_encoder(model)
    size = image_size or pre.image_size
    pre = dataclasses.replace(pre, image_size=size)  # --image-size wins: preprocess would resize back
    try:
        image = decode_image(Path(path).read_bytes(), size)
    except (DecodeError, OSError) as exc:
        raise ConfigError(f"--image {path} cannot be read ({exc}); pass an image file") from None
    with torch.inference_mode():
        return encoder(pre(to_float(image[None], size)))[0].float().numpy()


def query(table: pa.Table, emb: np.ndarray, image_id: str | None = None, image=None,
          model=None) -> tuple[np.ndarray, str]:
    """The query's embedding and name: a row's (by id, or by the path of a file the table holds), else the
    image embedded by ``model`` (default: the encoder recorded in the file)."""
    if image_id is not None:
        return emb[row_of_id(table, image_id)], image_id
    image = Path(image)
    paths = [str(Path(p).resolve()) for p in table.column("path").to_pylist()]
    if str(image.resolve()) in paths:
        row = paths.index(str(image.resolve()))
        return emb[row], table.column("image_id")[row].as_py()
    meta = table.schema.metadata or {}
    model = model or (meta[META_MODEL].decode() if META_MODEL in meta else None)
    if model is None:
        raise ConfigError(f"--image {image} is not in the embeddings and they record no model; pass --model")
    size = int(meta[META_IMAGE_SIZE]) if META_IMAGE_SIZE in meta else None
    return embed_file(image, model, size), image.stem


def nearest(emb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``k`` embeddings most cosine-similar to ``q``, best first, and their similarities."""
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    index = NearestNeighbors(n_neighbors=min(k, len(emb)), metric="cosine", algorithm="brute").fit(emb)
    dist, rows = index.kneighbors(q.reshape(1, -1))
    return rows[0], 1.0 - dist[0]


def neighbour_rows(table: pa.Table, rows: np.ndarray, sims: np.ndarray) -> list[dict]:
    """One dict per neighbour: rank, similarity, image_id, the shown columns the file has (the label as its
    class name where the file records names), path."""
    shown = [c for c in SHOWN_COLUMNS if c in table.column_names]
    names = formats.class_names(table)
    picked = table.take(rows).to_pylist()
    for row in picked:
        if names and "label" in row and 0 <= row["label"] < len(names):
            row["label"] = names[row["label"]]
    return [{"rank": r + 1, "similarity": float(s), "image_id": row["image_id"], **{c: row[c] for c in shown},
             "path": row["path"]} for r, (row, s) in enumerate(zip(picked, sims))]


def same_group_rate(emb: np.ndarray, groups: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Over every row as the query: the share whose first hit is the query itself, and the share with a row
    of the same group (e.g. traverse) among the next ``k`` neighbours."""
    index = NearestNeighbors(n_neighbors=min(k + 1, len(emb)), metric="cosine", algorithm="brute").fit(emb)
    rows = index.kneighbors(emb, return_distance=False)
    self_first = rows[:, 0] == np.arange(len(emb))
    same = (groups[rows[:, 1:]] == groups[:, None]).any(axis=1)
    return float(self_first.mean()), float(same.mean())


def format_table(rows: list[dict]) -> str:
    """The neighbours as an aligned text table."""
    header = list(rows[0])
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [header] + cells
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _thumbnail(path: str) -> str:
    """A PNG data URI of the image at most :data:`THUMB` px on a side; empty when unreadable."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, "PNG")
    except OSError:
        return ""
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_strip(out, query_name: str, query_path: str | None, rows: list[dict]) -> Path:
    """A self-contained HTML page: the query's thumbnail, then each neighbour's with its rank and similarity."""
    def figure(src: str, caption: str, css: str = "") -> str:
        img = f'<img src="{src}" width="{THUMB}">' if src else f'<div style="width:{THUMB}px">(unreadable)</div>'
        return f'<figure style="margin:4px;{css}">{img}<figcaption>{caption}</figcaption></figure>'

    extra = [c for c in SHOWN_COLUMNS if rows and c in rows[0]]
    items = [figure(_thumbnail(query_path) if query_path else "", f"query<br>{html.escape(query_name)}",
                    "outline:3px solid #c60;")]
    for r in rows:
        text = f"#{r['rank']} {r['similarity']:.3f}<br>{html.escape(str(r['image_id']))}" + "".join(
            f"<br>{c} {html.escape(str(r[c]))}" for c in extra)
        items.append(figure(_thumbnail(r["path"]), text))
    page = (f"<!doctype html><meta charset='utf-8'><title>raysys search: {html.escape(query_name)}</title>"
            f"<body style='font:12px sans-serif'><div style='display:flex;flex-wrap:wrap;align-items:flex-start'>"
            + "".join(items) + "</div></body>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


# ----------------------------------------------------------------------------- command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys search``."""
    p.add_argument("--embeddings", required=True, help="the Parquet dataset written by raysys embed")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="an image_id of the embeddings")
    which.add_argument("--image", help="an image file (one of the embeddings' or any other)")
    p.add_argument("-k", type=int, default=10, help="neighbours to show (the query itself is the first)")
    p.add_argument("--model", help="encoder for an --image outside the embeddings (default: the one that wrote them)")
    p.add_argument("--html", help="thumbnail strip to write (default: search-<query>.html here)")
    return p


def run(args: argparse.Namespace) -> int:
    """``raysys search``: print the neighbours and write the strip."""
    table, emb = read_embeddings(args.embeddings)
    q, name = query(table, emb, args.id, args.image, args.model)
    mean = archive_mean(args.embeddings, emb)
    rows = neighbour_rows(table, *nearest(emb - mean, q - mean, args.k))
    print(format_table(rows))
    query_path = args.image or table.column("path")[row_of_id(table, args.id)].as_py()
    out = write_strip(args.html or f"search-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.html", name, query_path, rows)
    print(f"thumbnails: {out}")
    return 0
