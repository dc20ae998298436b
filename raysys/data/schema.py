"""The column names that cross module and Ray boundaries, documented in one place.

Manifest (a ``pyarrow.Table``, one row per image file; every reader returns exactly this schema):

=========== ======== ==========================================================================
column      type     meaning
=========== ======== ==========================================================================
path        string   absolute path of the image file
image_id    string   unique id of the file within its dataset: the file name without extension
group_id    string   id of the original an augmented copy was made from (``-fh``, ``-fv``,
                     ``-r90``, ``-r180``, ``-r270``, ``-brt`` stripped); equals image_id otherwise
split       string   ``train`` / ``val`` / ``test`` for labeled benchmarks, ``unlabeled`` otherwise
label       int32    class id, -1 when unknown
domain      string   where the image comes from, e.g. ``msl``, ``hirise``, ``rover``, ``diverse``
x, y        float64  capture position in metres (NaN when unknown)
heading     float64  capture heading in degrees (NaN when unknown)
traverse    int32    traverse (sequence) id, -1 when unknown
frame       int32    frame number within the traverse, -1 when unknown
=========== ======== ==========================================================================

Training batch (a dict of tensors from the Ray Data pipeline; B = batch size, S = image size):

=========== ==================== ===================================================================
column      dtype, shape         meaning
=========== ==================== ===================================================================
view1/view2 float32 [B, 3, S, S] two independent augmentations of the same image, values in [0, 1]
image_id    int64 [B]            :func:`image_key` of the manifest ``image_id`` (stable across runs)
label       int64 [B]            class id, -1 when unknown (diagnostics only, never used for training
                                 unless a pair rule explicitly asks for labels)
domain      int64 [B]            index of the manifest ``domain`` in the pipeline's domain list
x, y        float32 [B]          capture position, NaN when unknown
heading     float32 [B]          capture heading in degrees, NaN when unknown
cluster_id  int64 [B]            cluster id, present only when a cluster table is attached
=========== ==================== ===================================================================
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_id", pa.string()),
        ("group_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("domain", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("heading", pa.float64()),
        ("traverse", pa.int32()),
        ("frame", pa.int32()),
    ]
)

VIEW1, VIEW2 = "view1", "view2"
BATCH_META = ("image_id", "label", "domain", "x", "y", "heading", "cluster_id")

UNLABELED = -1
SPLITS = ("train", "val", "test", "unlabeled")


def image_key(image_id: str) -> int:
    """Stable signed 64-bit key of a string image id (tensors cannot hold strings)."""
    digest = hashlib.blake2b(image_id.encode(), digest_size=8).digest()
    return int(np.frombuffer(digest, dtype="<i8")[0])


def make_manifest(rows: dict) -> pa.Table:
    """Build a manifest from column lists, filling absent optional columns with their 'unknown' value."""
    n = len(rows["path"])
    defaults = {
        "group_id": rows.get("image_id"),
        "split": ["unlabeled"] * n,
        "label": [UNLABELED] * n,
        "x": [float("nan")] * n,
        "y": [float("nan")] * n,
        "heading": [float("nan")] * n,
        "traverse": [-1] * n,
        "frame": [-1] * n,
    }
    cols = {name: rows.get(name, defaults.get(name)) for name in MANIFEST_SCHEMA.names}
    missing = [k for k, v in cols.items() if v is None]
    if missing:
        raise ValueError(f"manifest needs columns {missing}")
    return pa.table(cols, schema=MANIFEST_SCHEMA)
