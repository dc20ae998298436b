"""Mixed-domain pretraining pools (paper Sec. 4.3 / 5.3, Table 2).

A fraction ``ratio`` of the pool comes from a diverse out-of-domain dataset (the built-in ``diverse/`` or
a real ImageNet-style ImageFolder), the rest from the in-domain pool, with the total held constant
(Table 2: 100K Mars, 100K ImageNet, 50K + 50K). Rows are shuffled once here, so every block, and so
every batch, carries the ratio in expectation.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysys.data.formats import DataError


def mixed_counts(total: int, ratio: float) -> tuple[int, int]:
    """(in-domain, out-of-domain) image counts for ``total`` images at out-of-domain fraction ``ratio``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mix ratio must be in [0, 1], got {ratio}")
    n_out = int(round(ratio * total))
    return total - n_out, n_out


def _offset_labels(table: pa.Table, offset: int) -> pa.Table:
    """Shift known labels by ``offset`` so the two domains' classes never share an id: a Mars image and
    an ImageNet image are never false negatives of each other in the diagnostics."""
    labels = table.column("label")
    shifted = pc.if_else(pc.greater_equal(labels, 0), pc.add(labels, pa.scalar(offset, pa.int32())), labels)
    return table.set_column(table.schema.get_field_index("label"), "label", shifted)


def mix_domains(in_domain: pa.Table, out_domain: pa.Table, ratio: float, total: int | None = None,
                seed: int = 0) -> pa.Table:
    """A shuffled pool of ``total`` rows (default: the in-domain pool's size), ``ratio`` of them drawn
    without replacement from ``out_domain`` and the rest from ``in_domain``.

    Out-of-domain labels are offset past the in-domain ones (diagnostics only; training never reads them).
    Raises :class:`DataError` when a domain has fewer images than its share.
    """
    total = in_domain.num_rows if total is None else total
    n_in, n_out = mixed_counts(total, ratio)
    for n, table, what, fix in (
        (n_in, in_domain, "in-domain pool", "lower --mix-ratio or --max-images"),
        (n_out, out_domain, "out-of-domain dataset", "raise its size, lower --mix-ratio or lower --max-images"),
    ):
        if n > table.num_rows:
            raise DataError(f"the mix needs {n} images from the {what} but it has {table.num_rows}; {fix}")
    rng = np.random.default_rng(seed)
    known = np.asarray(in_domain.column("label").to_numpy(zero_copy_only=False))
    offset = int(known.max()) + 1 if known.size and known.max() >= 0 else 0
    parts = [
        in_domain.take(np.sort(rng.choice(in_domain.num_rows, n_in, replace=False))),
        _offset_labels(out_domain, offset).take(np.sort(rng.choice(out_domain.num_rows, n_out, replace=False))),
    ]
    mixed = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
    return mixed.take(rng.permutation(mixed.num_rows))
