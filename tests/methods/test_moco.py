"""MoCo pieces against independent references: the queue against a slot-by-slot ring simulation (one
process and two gloo processes), the loss against a loop over queries and candidates, the momentum
update against its formula, shuffle-BN against its inverse, and the 2-process loss/gradients against one
process."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import ddp_mean_grads, gloo_group, run_ranks
from torch import nn

from raysys.methods.moco import (
    KeyQueue,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    clamp_queue_size,
    forward_keys,
    make_key_encoder,
    moco_false_negative_stats,
    moco_loss,
    momentum_update,
    queue_columns,
)
from raysys.methods.pairs import make_rule

torch.set_num_threads(1)

NAN = float("nan")
COLS = ("image_id", "x", "y", "label")


def _batch(n: int, start: int, dim: int = 3, seed: int = 0):
    """n keys and metadata of images start..start+n-1 (deterministic in (start, seed))."""
    g = torch.Generator().manual_seed(1000 * seed + start)
    keys = torch.randn(n, dim, generator=g, dtype=torch.float64)
    meta = {"image_id": torch.arange(start, start + n), "x": torch.rand(n, generator=g) * 6,
            "y": torch.rand(n, generator=g) * 6, "label": torch.randint(-1, 3, (n,), generator=g),
            "domain": torch.zeros(n, dtype=torch.int64)}  # a batch column the queue does not store
    return keys, meta


class RingReference:
    """The queue by definition: entries written one at a time into slot ptr, ptr advancing modulo size."""

    def __init__(self, size):
        self.size, self.slots, self.ptr = size, [None] * size, 0

    def push_batch(self, keys, meta):
        for i in range(len(keys)):
            self.slots[self.ptr] = (F.normalize(keys[i].float(), dim=0).tolist(),
                                    {c: meta[c][i].item() for c in COLS})
            self.ptr = (self.ptr + 1) % self.size

    def check(self, queue: KeyQueue):
        filled = [s for s in self.slots if s is not None]
        assert (queue.ptr, queue.filled, len(queue)) == (self.ptr, len(filled), len(filled))
        keys, meta = queue.entries()
        assert keys.shape == (len(filled), queue.dim)
        for slot, (k, m) in enumerate(filled):
            torch.testing.assert_close(keys[slot], torch.tensor(k), rtol=0, atol=0)
            for c in COLS:
                assert meta[c][slot].item() == pytest.approx(m[c], rel=1e-7), (slot, c)


SIZES = [3, 2, 4, 9, 1, 7]  # fills, wraps inside a batch, then a batch larger than the queue (9 > 7)


def test_queue_ring_buffer_equals_reference():
    queue, ref = KeyQueue(7, 3, COLS), RingReference(7)
    assert len(queue.entries()[0]) == 0  # an empty queue offers no (zero) keys as negatives
    start = 0
    for n in SIZES:
        keys, meta = _batch(n, start)
        queue.enqueue(keys, meta)
        ref.push_batch(keys, meta)
        ref.check(queue)
        start += n
    assert queue.keys.dtype == torch.float32
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(7))


def test_queue_state_round_trip_continues_the_ring(tmp_path):
    queue, ref = KeyQueue(7, 3, COLS), RingReference(7)
    for n, start in ((3, 0), (2, 3)):  # not yet full: ptr 5, filled 5
        queue.enqueue(*_batch(n, start))
        ref.push_batch(*_batch(n, start))
    torch.save(queue.state_dict(), tmp_path / "queue.pt")
    restored = KeyQueue(7, 3, COLS)
    restored.load_state_dict(torch.load(tmp_path / "queue.pt", weights_only=True))
    ref.check(restored)
    for n, start in ((4, 5), (3, 9)):  # continues at the saved pointer and wraps
        for q in (queue, restored):
            q.enqueue(*_batch(n, start))
        ref.push_batch(*_batch(n, start))
        ref.check(restored)
    assert torch.equal(restored.keys, queue.keys)
    with pytest.raises(ValueError, match="saved size"):
        KeyQueue(8, 3, COLS).load_state_dict(queue.state_dict())
    with pytest.raises(ValueError, match="saved size"):
        KeyQueue(7, 3, ("image_id",)).load_state_dict(queue.state_dict())


def test_relabel_gives_queued_keys_the_new_cluster_ids():
    queue = KeyQueue(6, 3, ("image_id", "cluster_id"))
    for start, n in ((0, 4), (10, 3)):  # wraps: slot 0 holds image 12, slots 4-5 images 10-11, 1-3 images 1-3
        keys, meta = _batch(n, start)
        queue.enqueue(keys, {**meta, "cluster_id": torch.full((n,), 7)})
    new_ids = {i: i % 3 for i in (1, 2, 3, 10, 11)}  # image 12 is not in the new table
    queue.relabel("cluster_id", lambda ids: torch.tensor([new_ids.get(i, -1) for i in ids.tolist()]))
    _, meta = queue.entries()
    assert meta["image_id"].tolist() == [12, 1, 2, 3, 10, 11]
    assert meta["cluster_id"].tolist() == [-1, 1, 2, 0, 1, 2]
    half = KeyQueue(6, 3, ("image_id", "cluster_id"))
    half.enqueue(*_batch(2, 0)[:1], {"image_id": torch.arange(2), "cluster_id": torch.zeros(2, dtype=torch.int64)})
    half.relabel("cluster_id", lambda ids: ids + 5)
    assert half.meta["cluster_id"].tolist() == [5, 6, -1, -1, -1, -1]  # empty slots stay unknown
    with pytest.raises(ValueError, match="relabelable"):
        half.relabel("image_id", lambda ids: ids)


def test_queue_errors():
    with pytest.raises(ValueError, match="image_id"):
        KeyQueue(4, 3, ("x", "y"))
    with pytest.raises(ValueError, match="come from"):
        KeyQueue(4, 3, ("image_id", "colour"))
    q = KeyQueue(4, 3, ("image_id", "x"))
    with pytest.raises(ValueError, match=r"\['x'\]"):
        q.enqueue(torch.randn(2, 3), {"image_id": torch.arange(2)})
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        q.enqueue(torch.randn(2, 4), {"image_id": torch.arange(2), "x": torch.zeros(2)})
    assert queue_columns(make_rule("ess-mw", r=1.0), extra=("label", "image_id")) == ("image_id", "x", "y", "label")
    assert queue_columns(make_rule("cluster")) == ("image_id", "cluster_id")


def test_clamp_queue_size():
    assert clamp_queue_size(4096, 10000, 256) == (4096, None)
    size, warning = clamp_queue_size(65536, 10000, 256)
    assert size == 9744 and "65536" in warning and "9744" in warning
    assert clamp_queue_size(500, 500) == (500, None)
    with pytest.raises(ValueError, match="no more than one global batch"):
        clamp_queue_size(100, 256, 256)
    with pytest.raises(ValueError, match=">= 1"):
        clamp_queue_size(0, 100)


def test_momentum_update_formula():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    key = make_key_encoder(query)
    assert all(not p.requires_grad for p in key.parameters())
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(key.parameters(), query.parameters()))
    with torch.no_grad():  # move both away from each other, and give the key its own BN statistics
        for p in query.parameters():
            p.add_(torch.randn_like(p))
        key[1].running_mean.fill_(5.0)
    before = [p.clone() for p in key.parameters()]
    momentum_update(key, query, m=0.9)
    for old, new, q in zip(before, key.parameters(), query.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * q, rtol=1e-6, atol=1e-7)
    assert torch.equal(key[1].running_mean, torch.full((3,), 5.0))  # buffers stay the key encoder's own
    momentum_update(key, query, m=0.0)
    assert all(torch.equal(a, b) for a, b in zip(key.parameters(), query.parameters()))
    with pytest.raises(ValueError, match="make_key_encoder"):
        momentum_update(nn.Linear(4, 2), query)
    with pytest.raises(ValueError, match="0.999"):
        momentum_update(key, query, m=1.5)


def _brute_moco(q, k, meta, queue_keys, queue_meta, tau, r=None):
    """Loop over queries i and candidates j in [keys; queue]: weight 1 for the same image_id, 1 for a
    candidate within r (ESS-MB; positions compared in float64), else a negative; mean over queries."""
    cand_keys = k.tolist() + queue_keys.tolist()
    cand = {c: meta[c].tolist() + queue_meta[c].tolist() for c in ("image_id", "x", "y")}
    total = 0.0
    for i, qi in enumerate(q.tolist()):
        s, pos = [], []
        for j, kj in enumerate(cand_keys):
            s.append(sum(a * b for a, b in zip(qi, kj)) / math.sqrt(sum(a * a for a in qi) * sum(b * b for b in kj)) / tau)
            d2 = (float(meta["x"][i]) - cand["x"][j]) ** 2 + (float(meta["y"][i]) - cand["y"][j]) ** 2
            pos.append(meta["image_id"][i].item() == cand["image_id"][j] or (r is not None and d2 <= r * r))
        log_den = math.log(sum(math.exp(v) for v in s))  # every candidate is a positive or a negative
        total += -sum(s[j] - log_den for j in range(len(s)) if pos[j]) / sum(pos)
    return total / len(q)


@pytest.mark.parametrize("rule,r", [("instance", None), ("ess-mb", 1.5)])
def test_moco_loss_equals_brute_force(rule, r):
    queue = KeyQueue(16, 3, COLS)
    queue.enqueue(*_batch(9, 0, seed=1))
    queue.enqueue(*_batch(4, 20, seed=1))  # 13 of 16 slots filled
    k, meta = _batch(5, 6, seed=2)  # images 6..8 are also in the queue: their older keys are positives
    q = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = {} if r is None else {"r": r}
    loss, pm, gmeta = moco_loss(q, k, meta, queue, make_rule(rule, **kw), 0.2)
    qk, qm = queue.entries()
    assert pm.pos.shape == (5, 5 + 13) and gmeta.keys() == meta.keys()
    assert loss.item() == pytest.approx(_brute_moco(q, k, meta, qk, qm, 0.2, r), rel=1e-5)
    if rule == "ess-mb":
        assert (pm.pos.sum(1) > 2).any()  # spatial positives beyond the instance ones
    # diagnostics against hidden labels: the instance baseline's false negatives, counted by loop
    labels = meta["label"].tolist()
    cand_labels = meta["label"].tolist() + qm["label"].tolist()
    cand_ids = meta["image_id"].tolist() + qm["image_id"].tolist()
    pairs = [(i, j) for i in range(5) for j in range(len(cand_ids))
             if cand_ids[j] != meta["image_id"][i].item() and labels[i] >= 0 and cand_labels[j] >= 0]
    base_fn = [(i, j) for i, j in pairs if labels[i] == cand_labels[j]]
    kept = [(i, j) for i, j in pairs if pm.neg[i, j]]
    stats = moco_false_negative_stats(pm, gmeta, queue)
    assert stats["fn_fraction"] == pytest.approx(sum(labels[i] == cand_labels[j] for i, j in kept) / len(kept))
    assert stats["n_removed_pairs"] == len(pairs) - len(kept)
    if rule == "instance":
        assert stats["fn_fraction"] == pytest.approx(len(base_fn) / len(pairs)) and stats["n_removed_pairs"] == 0
    queue.enqueue(k, meta)
    with pytest.raises(ValueError, match="before queue.enqueue"):
        moco_false_negative_stats(pm, gmeta, queue)


def test_moco_loss_errors():
    queue = KeyQueue(8, 3, ("image_id",))
    k, meta = _batch(4, 0)
    with pytest.raises(ValueError, match="queue_columns"):
        moco_loss(k, k, meta, queue, make_rule("ess-mb", r=1.0), 0.2)
    with pytest.raises(ValueError, match="one shape"):
        moco_loss(k[:3], k, meta, queue, "instance", 0.2)
    with pytest.raises(ValueError, match="rectangular"):
        moco_loss(k, k, meta, queue, lambda m: None, 0.2)
    with pytest.raises(ValueError, match="lacks metadata"):
        moco_loss(k, k, {"image_id": meta["image_id"]}, KeyQueue(8, 3, COLS), "instance", 0.2)


def test_shuffle_bn_single_process():
    torch.manual_seed(4)
    x = torch.randn(8, 3)
    shuffled, idx = batch_shuffle_ddp(x)
    assert not torch.equal(shuffled, x)  # it does permute (seeded: not the identity)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, x.tolist()))
    assert torch.equal(batch_unshuffle_ddp(shuffled, idx), x)
    seen = []

    def center(v):  # a BN-like encoder: output depends on the sub-batch it is computed with
        seen.append(v.clone())
        return v - v.mean(dim=0)

    out = forward_keys(center, x, sub_batches=2)
    assert [len(v) for v in seen] == [4, 4]
    for i in range(8):  # row i was normalized with the statistics of the piece that held it
        piece = next(v for v in seen if any(torch.equal(row, x[i]) for row in v))
        torch.testing.assert_close(out[i], x[i] - piece.mean(dim=0))
    with pytest.raises(ValueError, match="sub_batches"):
        forward_keys(center, x, sub_batches=9)


# ---------------------------------------------------------------- two gloo processes

WORLD = 2
TAU = 0.2
LOCAL_SIZES = [2, 1, 3, 5, 4]  # global 4, 2, 6, 10 (> 7: wraps past the whole queue), 8


def _global_batches():
    batches, start = [], 0
    for n in LOCAL_SIZES:
        batches.append(_batch(WORLD * n, start))
        start += WORLD * n
    return batches


def _loss_problem():
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(8, 4, dtype=torch.float64, generator=g), torch.randn(8, 4, dtype=torch.float64, generator=g)
    lin = nn.Linear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, dtype=torch.float64, generator=g))
        lin.bias.copy_(torch.randn(3, dtype=torch.float64, generator=g))
    key_lin = make_key_encoder(lin)
    _, meta = _batch(8, 2)  # images 2..9: some also in the queue
    return x1, x2, meta, lin, key_lin


def _slice(meta: dict, part: slice) -> dict:
    return {c: v[part] for c, v in meta.items()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, port, WORLD):
        results = {"queues": []}
        queue = KeyQueue(7, 3, COLS)
        for (keys, meta), n in zip(_global_batches(), LOCAL_SIZES):
            mine = slice(rank * n, (rank + 1) * n)
            queue.enqueue(keys[mine], _slice(meta, mine))
            results["queues"].append(queue.state_dict())

        x1, x2, meta, lin, key_lin = _loss_problem()
        mine = slice(rank * 4, (rank + 1) * 4)
        for name, rule in (("instance", make_rule("instance")), ("ess-mb", make_rule("ess-mb", r=2.0))):
            lin.zero_grad()
            with torch.no_grad():
                k = key_lin(x2[mine])
            loss, pm, gmeta = moco_loss(lin(x1[mine]), k, _slice(meta, mine), queue, rule, TAU)
            loss.backward()
            results[name] = {"loss": gather_loss(loss), "grads": ddp_mean_grads(lin, WORLD),
                             "pos": pm.pos, "neg": pm.neg}

        torch.manual_seed(rank)  # ranks draw different permutations: rank 0's must win
        x = torch.arange(16, dtype=torch.float64).view(8, 2)[mine]
        shuffled, idx = batch_shuffle_ddp(x)
        results["shuffled"], results["unshuffled"] = shuffled, batch_unshuffle_ddp(shuffled, idx)
        seen = []
        results["centered"] = forward_keys(lambda v: seen.append(v.clone()) or v - v.mean(dim=0), x)
        results["share"] = seen[0]  # this rank's shuffled rows, as the encoder saw them
        try:  # unequal local batches must fail on every rank, not hang
            queue.enqueue(torch.randn(2 + rank, 3), _batch(2 + rank, 0)[1])
            results["unequal"] = "no error"
        except ValueError as e:
            results["unequal"] = str(e)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def gather_loss(loss):
    parts = [torch.empty_like(loss[None]) for _ in range(WORLD)]
    dist.all_gather(parts, loss.detach()[None])
    return torch.cat(parts).mean()


def test_two_processes_hold_one_queue_and_match_one_process(tmp_path):
    per_rank = run_ranks(_ddp_worker, WORLD, tmp_path)

    # queue: both ranks equal the reference ring fed the global batches in rank order, after every step
    ref, single = RingReference(7), KeyQueue(7, 3, COLS)
    for step, (keys, meta) in enumerate(_global_batches()):
        ref.push_batch(keys, meta)
        single.enqueue(keys, meta)
        for res in per_rank:
            restored = KeyQueue(7, 3, COLS)
            restored.load_state_dict(res["queues"][step])
            ref.check(restored)

    # loss and gradients: equal to one process holding the whole batch of 8 queries
    x1, x2, meta, lin, key_lin = _loss_problem()
    for name, rule in (("instance", make_rule("instance")), ("ess-mb", make_rule("ess-mb", r=2.0))):
        lin.zero_grad()
        with torch.no_grad():
            k = key_lin(x2)
        loss, pm, _ = moco_loss(lin(x1), k, meta, single, rule, TAU)
        loss.backward()
        for rank, res in enumerate(per_rank):
            assert torch.equal(res[name]["pos"], pm.pos[rank * 4:(rank + 1) * 4]), name
            assert torch.equal(res[name]["neg"], pm.neg[rank * 4:(rank + 1) * 4]), name
            torch.testing.assert_close(res[name]["loss"], loss.detach(), rtol=1e-10, atol=1e-12, msg=name)
            for got, p in zip(res[name]["grads"], lin.parameters()):
                torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12, msg=name)

    # shuffle-BN: the ranks' shares form one permutation of the global batch, mixed across ranks, undone exactly
    x = torch.arange(16, dtype=torch.float64).view(8, 2)
    shares = torch.cat([res["shuffled"] for res in per_rank])
    assert sorted(shares[:, 0].tolist()) == x[:, 0].tolist()
    assert not torch.equal(shares, x)
    assert sorted(torch.cat([res["share"] for res in per_rank])[:, 0].tolist()) == x[:, 0].tolist()
    for rank, res in enumerate(per_rank):
        assert torch.equal(res["unshuffled"], x[rank * 4:(rank + 1) * 4])
        # forward_keys: each row was centered with the mean of the rank share that held it (a new permutation)
        for i, row in enumerate(x[rank * 4:(rank + 1) * 4]):
            share = next(r["share"] for r in per_rank if any(torch.equal(row, v) for v in r["share"]))
            torch.testing.assert_close(res["centered"][i], row - share.mean(dim=0))
    assert all("ranks disagree" in res["unequal"] for res in per_rank)
