"""Paired batches: a stream that is a function of the seed alone, split over ranks like one global batch."""

import numpy as np
import torch

from raysys.data.paired import PairedBatches, canonical_order, view_seed


def _pool(n: int = 50) -> dict:
    ids = np.random.default_rng(1).permutation(n).astype(np.int64) * 7
    return {"image_id": ids, "image": np.arange(n * 2, dtype=np.uint8).reshape(n, 2), "label": ids % 3}


def _ids(batches) -> list[list[int]]:
    return [b["image_id"].tolist() for b in batches]


def test_canonical_order_does_not_depend_on_arrival_order():
    pool = _pool()
    shuffled = {k: v[::-1] for k, v in pool.items()}
    a, b = canonical_order(pool), canonical_order(shuffled)
    assert all(np.array_equal(a[k], b[k]) for k in pool) and list(a["image_id"]) == sorted(pool["image_id"])


def test_epochs_repeat_for_a_seed_and_differ_between_epochs_and_seeds():
    pool = canonical_order(_pool())
    one, again = PairedBatches(pool, seed=3), PairedBatches(pool, seed=3)
    assert _ids(one.epoch(0, 8)) == _ids(again.epoch(0, 8))
    assert _ids(one.epoch(0, 8)) != _ids(one.epoch(1, 8))
    assert _ids(one.epoch(0, 8)) != _ids(PairedBatches(pool, seed=4).epoch(0, 8))
    batches = _ids(one.epoch(0, 8))
    assert len(batches) == 50 // 8 and all(len(b) == 8 for b in batches)  # the partial batch dropped
    assert len({i for b in batches for i in b}) == 48, "no image twice in an epoch"


def test_rounds_read_the_epochs_batches_across_an_epoch_boundary():
    """Steps 4..9 at 6 batches an epoch: the last two of epoch 0, then the first four of epoch 1; a resumed run
    reading on from step 4 sees what one reading epochs does, rounds of any length."""
    pool = canonical_order(_pool())
    one = PairedBatches(pool, seed=3)
    epochs = _ids(one.epoch(0, 8)) + _ids(one.epoch(1, 8))
    assert _ids(one.steps(4, 6, 8)) == epochs[4:10]
    assert _ids(one.steps(0, 4, 8)) + _ids(one.steps(4, 3, 8)) + _ids(one.steps(7, 5, 8)) == epochs


def test_ranks_split_each_global_batch_in_rank_order():
    """Two ranks of batch 4 see, concatenated in rank order, the one-rank stream of batch 8."""
    pool = canonical_order(_pool())
    whole = _ids(PairedBatches(pool, 5).epoch(2, 8))
    ranks = [_ids(PairedBatches(pool, 5, rank=r, world=2).epoch(2, 4)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == whole
    for batch in PairedBatches(pool, 5).epoch(2, 8):  # every column follows its row
        assert torch.equal(batch["label"], batch["image_id"] % 3)


def test_embedding_pass_covers_every_row_once_over_ranks():
    pool = canonical_order(_pool())
    seen = [i for r in range(3) for b in PairedBatches(pool, 0, r, 3).iter_torch_batches(batch_size=7) for i in b["image_id"].tolist()]
    assert sorted(seen) == sorted(pool["image_id"].tolist())


def test_view_seeds_differ_by_step_and_rank_and_repeat():
    seeds = {view_seed(0, step, rank) for step in range(20) for rank in range(4)}
    assert len(seeds) == 80 and view_seed(0, 3, 1) == view_seed(0, 3, 1) and 0 <= view_seed(9, 9, 9) < 2**63
