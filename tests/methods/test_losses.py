"""Multi-positive InfoNCE against brute-force loops and a reference NT-Xent; numerical safety in low
precision; exact equivalence of the 2-process (gloo) loss and gradients with one process."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ddp_mean_grads, gloo_group, run_ranks
from torch import nn

from raysys.methods.losses import (
    contrastive_loss,
    gather_no_grad,
    gather_with_grad,
    info_nce_qk,
    multi_positive_info_nce,
    scored_anchors,
)
from raysys.methods.pairs import ClusterRule, InstanceRule, PairMatrix, make_rule

torch.set_num_threads(1)


def _instance(b: int) -> PairMatrix:
    return InstanceRule()({"image_id": torch.arange(b)})


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _brute_eq1(z: torch.Tensor, tau: float) -> float:
    """Paper Eq. 1 pair by pair: positive = the other view (i +- B), denominator all k != i; mean over views."""
    rows = z.tolist()
    n, b = len(rows), len(rows) // 2
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        den = sum(math.exp(_cos(rows[i], rows[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(_cos(rows[i], rows[j]) / tau) / den)
    return total / n


def _brute_general(z, pos, neg, tau, rows=None) -> float:
    """L_i = -sum_j w_ij (s_ij - log sum_{k: pos_ik > 0 or neg_ik} exp s_ik), w = pos normalized;
    summed over the given rows with positives, scaled N/len(rows) / (#anchors with positives)."""
    zl, pl, nl = z.tolist(), pos.tolist(), neg.tolist()
    n = len(zl)
    rows = list(range(n)) if rows is None else rows
    s = [[_cos(zl[i], zl[k]) / tau for k in range(n)] for i in range(n)]
    n_anchors = sum(1 for i in range(n) if sum(pl[i]) > 0)
    total = 0.0
    for i in rows:
        wsum = sum(pl[i])
        if wsum == 0:
            continue
        log_den = math.log(sum(math.exp(s[i][k]) for k in range(n) if pl[i][k] > 0 or nl[i][k]))
        total += -sum(pl[i][j] / wsum * (s[i][j] - log_den) for j in range(n) if pl[i][j] > 0)
    return total * (n / len(rows)) / n_anchors


def _reference_nt_xent(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Textbook SimCLR NT-Xent: cross-entropy over cosine logits, self-similarity masked, target = other view."""
    n = z.shape[0]
    zn = F.normalize(z, dim=1)
    logits = (zn @ zn.T / tau).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, (torch.arange(n) + n // 2) % n)


def _random_pair_matrix(n: int, g: torch.Generator) -> PairMatrix:
    eye = torch.eye(n, dtype=torch.bool)
    pos = torch.rand(n, n, generator=g, dtype=torch.float64) * (torch.rand(n, n, generator=g) < 0.3)
    pos = pos.masked_fill(eye, 0)
    pos[0] = 0  # an anchor without positives: skipped
    neg = (torch.rand(n, n, generator=g) < 0.5) & ~eye & (pos == 0)
    neg[1] = False  # an anchor whose denominator holds only its positives
    return PairMatrix(pos, neg)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_instance_loss_equals_eq1_brute_force(tau):
    z = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = multi_positive_info_nce(z, _instance(5), tau)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_brute_eq1(z, tau), rel=1e-12)


def test_general_loss_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(12, 5, dtype=torch.float64, generator=g)
        pm = _random_pair_matrix(12, g)
        assert multi_positive_info_nce(z, pm, 0.3).item() == pytest.approx(_brute_general(z, pm.pos, pm.neg, 0.3),
                                                                           rel=1e-12)
        rows = [2, 3, 7, 11, 0, 5]
        got = multi_positive_info_nce(z, pm, 0.3, rows=torch.tensor(rows)).item()
        assert got == pytest.approx(_brute_general(z, pm.pos, pm.neg, 0.3, rows), rel=1e-12)


def _brute_qk(q, k, pos, neg, tau) -> float:
    """Rectangular definition: mean over anchors with a positive of
    -sum_j w_ij (s_ij - log sum_{m: pos_im > 0 or neg_im} exp s_im), s = cos(q_i, k_j) / tau, w = pos normalized."""
    ql, kl, pl, nl = q.tolist(), k.tolist(), pos.tolist(), neg.tolist()
    losses = []
    for i in range(len(ql)):
        wsum = sum(pl[i])
        if wsum == 0:
            continue
        s = [_cos(ql[i], kl[m]) / tau for m in range(len(kl))]
        log_den = math.log(sum(math.exp(s[m]) for m in range(len(kl)) if pl[i][m] > 0 or nl[i][m]))
        losses.append(-sum(pl[i][j] / wsum * (s[j] - log_den) for j in range(len(kl)) if pl[i][j] > 0))
    return sum(losses) / len(losses)


def test_rectangular_loss_equals_brute_force():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(11, 4, dtype=torch.float64, generator=g)
    pos = torch.rand(5, 11, generator=g, dtype=torch.float64) * (torch.rand(5, 11, generator=g) < 0.3)
    pos[:, 0] = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    pos[2] = 0  # an anchor without positives: skipped
    neg = (torch.rand(5, 11, generator=g) < 0.6) & (pos == 0)
    neg[4] = False  # an anchor whose denominator holds only its positive
    pm = PairMatrix(pos, neg)
    loss = info_nce_qk(q, k, pm, 0.3)
    assert loss.item() == pytest.approx(_brute_qk(q, k, pos, neg, 0.3), rel=1e-12)
    # an explicit denominator replaces the count of anchors with a positive (4 here)
    assert info_nce_qk(q, k, pm, 0.3, denominator=2.0).item() == pytest.approx(2 * loss.item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda t: info_nce_qk(t, k, pm, 0.3), (q,))
    with pytest.raises(ValueError, match="5 anchors and 10 candidates"):
        info_nce_qk(q, k[:10], pm, 0.3)


def test_square_loss_is_rectangular_loss_of_views_against_themselves():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(12, 5, dtype=torch.float64, generator=g)
    pm = _random_pair_matrix(12, g)
    torch.testing.assert_close(multi_positive_info_nce(z, pm, 0.4), info_nce_qk(z, z, pm, 0.4), rtol=1e-12, atol=0)
    assert multi_positive_info_nce(z, pm, 0.4).item() == pytest.approx(_brute_qk(z, z, pm.pos, pm.neg, 0.4), rel=1e-12)


def test_row_blocks_average_to_full_loss():
    """Equal-size row blocks (what ranks hold) average to the full loss, even with anchors lacking positives."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(12, 5, dtype=torch.float64, generator=g)
    pm = _random_pair_matrix(12, g)
    full = multi_positive_info_nce(z, pm, 0.2)
    halves = [multi_positive_info_nce(z, pm, 0.2, rows=slice(0, 6)),
              multi_positive_info_nce(z, pm, 0.2, rows=torch.arange(6, 12))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tau", [0.5, 0.07])
def test_instance_loss_equals_reference_nt_xent(tau):
    z = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ours = multi_positive_info_nce(z, _instance(8), tau)
    (g_ours,) = torch.autograd.grad(ours, z)
    ref = _reference_nt_xent(z, tau)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_with_masks():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, 3, dtype=torch.float64, generator=g, requires_grad=True)
    pm = _random_pair_matrix(8, g)
    assert torch.autograd.gradcheck(lambda t: multi_positive_info_nce(t, pm, 0.2), (z,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite_at_small_temperature(dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 16, generator=g)
    base[1] = base[0]  # identical embeddings: the largest possible logit, 1 / tau = 20
    base[5] = -base[0]
    z = base.to(dtype).requires_grad_()
    pm = make_rule("cluster", mode="attract")({"image_id": torch.arange(4), "cluster_id": torch.tensor([0, 0, 1, 2])})
    neg = pm.neg.clone()
    neg[[2, 6]] = False  # these anchors' denominators hold only their single positive
    pm = PairMatrix(pm.pos, neg)
    loss = multi_positive_info_nce(z, pm, 0.05)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(z.grad.float()).all()
    # computed in float32 from the upcast inputs: same value as float64 on the same numbers
    ref = multi_positive_info_nce(z.detach().double(), pm, 0.05)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = multi_positive_info_nce(z.detach(), pm, 0.05)
    assert inside.dtype == torch.float32 and inside.item() == pytest.approx(loss.item(), rel=1e-6)


def test_no_anchor_with_positive_gives_zero_with_graph():
    z = torch.randn(4, 3, requires_grad=True)
    pm = PairMatrix(torch.zeros(4, 4), ~torch.eye(4, dtype=torch.bool))
    loss = multi_positive_info_nce(z, pm, 0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_loss_errors():
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match="temperature"):
        multi_positive_info_nce(z, _instance(3), 0.0)
    with pytest.raises(ValueError, match="6 views"):
        multi_positive_info_nce(z, _instance(4), 0.5)
    with pytest.raises(ValueError, match="z1 and z2"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), {"image_id": torch.arange(3)}, "instance", 0.5)
    with pytest.raises(ValueError, match="offending entries"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), {"image_id": torch.arange(4)}, "instance", 0.5)


def test_single_process_contrastive_loss_is_plain_loss():
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    meta = {"image_id": torch.arange(5), "cluster_id": torch.tensor([0, 1, 0, 2, 1])}
    assert gather_with_grad(z1) is z1 and gather_no_grad(z1) is z1
    loss, pm, gmeta = contrastive_loss(z1, z2, meta, ClusterRule("attract"), 0.5)
    expected_pm = ClusterRule("attract")(meta)
    assert torch.equal(pm.pos, expected_pm.pos) and torch.equal(pm.neg, expected_pm.neg)
    assert gmeta.keys() == meta.keys() and all(torch.equal(gmeta[k], meta[k]) for k in meta)
    torch.testing.assert_close(loss, multi_positive_info_nce(torch.cat([z1, z2]), expected_pm, 0.5))


# ---------------------------------------------------------------- DDP equivalence (2 gloo processes)

TAU = 0.2
WORLD = 2


def _no_positive_for_unlabeled(meta: dict) -> PairMatrix:
    """A rule leaving unlabeled images' anchors without positives (exercises the skipped-anchor scaling)."""
    pm = InstanceRule()(meta)
    return PairMatrix(pm.pos * (meta["label"] >= 0).repeat(2).to(pm.pos.dtype)[:, None], pm.neg)


DDP_RULES = {"instance": "instance", "eliminate": ClusterRule("eliminate"), "attract": ClusterRule("attract"),
             "label": make_rule("label"), "no_pos_unlabeled": _no_positive_for_unlabeled}


def _problem():
    """A global batch of 8 images (4 per rank) and a tiny linear 'model'; image 6 repeats image 1 across ranks."""
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(8, 5, dtype=torch.float64, generator=g)
    x2 = torch.randn(8, 5, dtype=torch.float64, generator=g)
    meta = {"image_id": torch.tensor([0, 1, 2, 3, 4, 5, 1, 7]),
            "cluster_id": torch.tensor([0, 1, 0, -1, 1, 2, 1, 0]),
            "label": torch.tensor([3, 1, 3, -1, 1, 0, 1, -1])}
    lin = nn.Linear(5, 4, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 5, dtype=torch.float64, generator=g))
        lin.bias.copy_(torch.randn(4, dtype=torch.float64, generator=g))
    return x1, x2, meta, lin


def _rank_results(rank: int, problem, readings: dict) -> dict:
    """On one of the WORLD gloo ranks, holding its share of ``problem``'s batch: each reading's (name -> (rule,
    decoupled)) loss averaged over ranks, DDP-averaged gradients, and the global pair matrix and metadata."""
    x1, x2, meta, lin = problem
    b = x1.shape[0] // WORLD
    mine = slice(rank * b, (rank + 1) * b)
    results = {}
    for name, (rule, decoupled) in readings.items():
        lin.zero_grad()
        loss, pm, gmeta = contrastive_loss(lin(x1[mine]), lin(x2[mine]), {k: v[mine] for k, v in meta.items()},
                                           rule, TAU, decoupled=decoupled)
        loss.backward()
        results[name] = {"loss": gather_no_grad(loss.detach()[None]).mean(), "grads": ddp_mean_grads(lin, WORLD),
                         "pos": pm.pos, "neg": pm.neg, "meta": gmeta}
    return results


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, port, WORLD):
        x1, x2, meta, lin = _problem()
        results = _rank_results(rank, (x1, x2, meta, lin), {name: (rule, False) for name, rule in DDP_RULES.items()})
        try:  # unequal local batch sizes must fail on every rank, not hang
            contrastive_loss(lin(x1[: 3 + rank]), lin(x2[: 3 + rank]), {"image_id": meta["image_id"][: 3 + rank]},
                             "instance", TAU)
            results["unequal"] = "no error"
        except ValueError as e:
            results["unequal"] = str(e)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_two_processes_equal_single_process(tmp_path):
    per_rank = run_ranks(_ddp_worker, WORLD, tmp_path)

    x1, x2, meta, lin = _problem()
    for name, rule in DDP_RULES.items():
        rule = make_rule(rule) if isinstance(rule, str) else rule
        lin.zero_grad()
        pm = rule(meta)
        loss = multi_positive_info_nce(torch.cat([lin(x1), lin(x2)]), pm, TAU)
        loss.backward()
        for res in (r[name] for r in per_rank):
            assert torch.equal(res["pos"], pm.pos) and torch.equal(res["neg"], pm.neg), name
            assert all(torch.equal(res["meta"][k], meta[k]) for k in meta), name
            torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-10, atol=1e-12, msg=name)
            for got, p in zip(res["grads"], lin.parameters()):
                torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert all("ranks disagree" in r["unequal"] for r in per_rank)


# ---------------------------------------------------------------- decoupled denominators, elimination, SupCon

def _same(meta: dict, key: str, i: int, k: int) -> bool:
    """Images i and k share a known (>= 0) value of ``key``."""
    a, c = int(meta[key][i]), int(meta[key][k])
    return a == c and a >= 0


def _brute_reading(z, meta, tau, rule: str, decoupled: bool) -> float:
    """The paper's readings by loops over views v (image v % B), from the metadata alone:
    P(i) = other views of the same image_id (and, rule 'label', of the same label); negatives = other views
    not in P(i) (rule 'cluster': nor in i's cluster); denominator D(i) = negatives, plus P(i) unless decoupled.
    L_i = -(1/|P(i)|) sum_{p in P(i)} log(exp s_ip / sum_{k in D(i)} exp s_ik); anchors with empty D(i) are
    skipped; mean over the rest (0 if none). Instance: Eq. 1 / DCL; cluster: elimination / Eq. 2; label: SupCon."""
    zl = z.tolist()
    n = len(zl)
    b = n // 2
    ids = meta["image_id"].tolist() if "image_id" in meta else list(range(b))
    losses = []
    for i in range(n):
        others = [k for k in range(n) if k != i]
        pos = [k for k in others
               if ids[k % b] == ids[i % b] or (rule == "label" and _same(meta, "label", i % b, k % b))]
        neg = [k for k in others
               if k not in pos and not (rule == "cluster" and _same(meta, "cluster_id", i % b, k % b))]
        den = neg if decoupled else pos + neg
        if not den:
            continue
        s = {k: _cos(zl[i], zl[k]) / tau for k in others}
        log_den = math.log(sum(math.exp(s[k]) for k in den))
        losses.append(-sum(s[p] - log_den for p in pos) / len(pos))
    return sum(losses) / len(losses) if losses else 0.0


def _reading_batches():
    """(z [2B, 5] float64, meta) of a few batches: random clusters / labels with unknowns (-1); one cluster
    covering every image (every decoupled cluster anchor has an empty denominator); and image 5 repeating
    image 0's id while sharing a cluster with images 1..4, so only image 5's views have no negative."""
    g = torch.Generator().manual_seed(11)
    metas = []
    for b in (8, 7):
        metas.append({"image_id": torch.arange(b), "cluster_id": torch.randint(-1, 3, (b,), generator=g),
                      "label": torch.randint(-1, 3, (b,), generator=g)})
    metas.append({"image_id": torch.arange(6), "cluster_id": torch.full((6,), 4),
                  "label": torch.zeros(6, dtype=torch.long)})
    metas.append({"image_id": torch.tensor([0, 1, 2, 3, 4, 0]), "cluster_id": torch.tensor([1, 0, 0, 0, 0, 0]),
                  "label": torch.tensor([2, 2, -1, 1, 1, 0])})
    return [(torch.randn(2 * len(m["image_id"]), 5, dtype=torch.float64, generator=g), m) for m in metas]


READINGS = {"eq1": ("instance", False), "eq2_printed": ("cluster", True), "eliminate_keep_positive": ("cluster", False),
            "dcl": ("instance", True), "supcon": ("label", False)}


@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("reading", list(READINGS))
def test_readings_equal_brute_force(reading, tau):
    """Eq. 1, Eq. 2 as printed, elimination keeping the positive, DCL and SupCon against _brute_reading's loops."""
    rule_name, decoupled = READINGS[reading]
    rule = make_rule(rule_name)
    gaps = []  # how far the other `decoupled` value's reading is: ignoring the flag must fail somewhere
    for z, meta in _reading_batches():
        b = len(meta["image_id"])
        expected = _brute_reading(z, meta, tau, rule_name, decoupled)
        gaps.append(abs(expected - _brute_reading(z, meta, tau, rule_name, not decoupled)))
        got = multi_positive_info_nce(z, rule(meta), tau, decoupled=decoupled)
        assert abs(got.item() - expected) <= 1e-6, reading
        loss, _, _ = contrastive_loss(z[:b], z[b:], meta, rule, tau, decoupled=decoupled)
        assert abs(loss.item() - expected) <= 1e-6, reading
    assert max(gaps) > 1e-2, reading
    # the last batch: only image 5's views are skipped by the decoupled cluster reading
    scored = scored_anchors(make_rule("cluster")(meta), decoupled=True)
    assert scored.tolist() == [True] * 5 + [False] + [True] * 5 + [False]


def test_decoupled_without_negatives_gives_zero_with_graph():
    """No anchor has a negative: the decoupled loss is exactly 0 (nothing scored) and still backpropagates."""
    z = torch.randn(6, 3, requires_grad=True)
    loss = multi_positive_info_nce(z, PairMatrix(_instance(3).pos, torch.zeros(6, 6, dtype=torch.bool)), 0.5,
                                   decoupled=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    z1, z2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    loss, _, _ = contrastive_loss(z1, z2, {"image_id": torch.arange(3), "cluster_id": torch.zeros(3, dtype=torch.long)},
                                  "cluster", 0.5, decoupled=True)  # one cluster holds every image
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z1.grad, torch.zeros_like(z1))


def _brute_qk_decoupled(q, k, pos, neg, tau) -> float:
    """Rectangular DCL by loops: mean over anchors with a positive and a negative of
    -sum_j w_ij (s_ij - log sum_{m: neg_im} exp s_im), s = cos(q_i, k_j) / tau, w = pos normalized."""
    ql, kl, pl, nl = q.tolist(), k.tolist(), pos.tolist(), neg.tolist()
    losses = []
    for i in range(len(ql)):
        wsum = sum(pl[i])
        if wsum == 0 or not any(nl[i]):
            continue
        s = [_cos(ql[i], kl[m]) / tau for m in range(len(kl))]
        log_den = math.log(sum(math.exp(s[m]) for m in range(len(kl)) if nl[i][m]))
        losses.append(-sum(pl[i][j] / wsum * (s[j] - log_den) for j in range(len(kl)) if pl[i][j] > 0))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_rectangular_decoupled_loss_equals_brute_force(tau):
    """info_nce_qk(decoupled=True) against _brute_qk_decoupled's loops; some anchors lack a positive or a negative."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(6, 4, dtype=torch.float64, generator=g)
    k = torch.randn(11, 4, dtype=torch.float64, generator=g)
    pos = torch.rand(6, 11, generator=g, dtype=torch.float64) * (torch.rand(6, 11, generator=g) < 0.3)
    pos[:, 0] = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    neg = (torch.rand(6, 11, generator=g) < 0.6) & (pos == 0)
    neg[4] = False  # positives only: skipped when decoupled
    pm = PairMatrix(pos, neg)
    got = info_nce_qk(q, k, pm, tau, decoupled=True).item()
    expected = _brute_qk_decoupled(q, k, pos, neg, tau)
    assert abs(got - expected) <= 1e-6
    assert abs(expected - _brute_qk(q, k, pos, neg, tau)) > 1e-3


@pytest.mark.parametrize("rule", ["instance", "cluster"])
def test_moco_loss_decoupled_equals_brute_force(rule):
    """moco_loss(decoupled=True) against loops over queries x [keys; queue]: positives share image_id, negatives
    are the rest (cluster rule: outside the query's cluster), denominator = negatives only."""
    from raysys.methods.moco import KeyQueue, moco_loss

    g = torch.Generator().manual_seed(13)
    cols = ("image_id", "cluster_id")
    queue = KeyQueue(12, 5, cols)
    queue.enqueue(torch.randn(9, 5, generator=g), {"image_id": torch.arange(9),
                                                   "cluster_id": torch.tensor([0, 1, 2, 0, 1, 2, 0, -1, 1])})
    meta = {"image_id": torch.tensor([3, 4, 9, 10, 11]), "cluster_id": torch.tensor([0, 1, 0, -1, 2])}
    q = torch.randn(5, 5, dtype=torch.float64, generator=g)
    k = torch.randn(5, 5, generator=g)
    loss, pm, _ = moco_loss(q, k, meta, queue, rule, 0.2, decoupled=True)
    q_keys, q_meta = queue.entries()
    cand = torch.cat([F.normalize(k, dim=1), q_keys]).tolist()  # the keys as MoCo scores them (unit, float32)
    cand_meta = {c: meta[c].tolist() + q_meta[c].tolist() for c in cols}
    losses = []
    for i, qi in enumerate(q.tolist()):
        s = [_cos(qi, kj) / 0.2 for kj in cand]
        pos = [j for j in range(len(cand)) if cand_meta["image_id"][j] == meta["image_id"][i]]
        c_i = int(meta["cluster_id"][i])
        neg = [j for j in range(len(cand)) if j not in pos
               and not (rule == "cluster" and c_i >= 0 and cand_meta["cluster_id"][j] == c_i)]
        log_den = math.log(sum(math.exp(s[j]) for j in neg))
        losses.append(-sum(s[p] - log_den for p in pos) / len(pos))
    expected = sum(losses) / len(losses)
    assert abs(loss.item() - expected) <= 1e-6
    assert abs(expected - moco_loss(q, k, meta, queue, rule, 0.2)[0].item()) > 1e-3


DDP_READINGS = {"eq1": ("instance", False), "eq2_printed": ("cluster", True), "dcl": ("instance", True),
                "supcon": ("label", False)}


def _decoupled_problem():
    """_problem's inputs and model with metadata where image 7 repeats image 0's id and shares a cluster with
    images 1..6: its views (both on rank 1) have no negative, so the decoupled cluster reading skips them."""
    x1, x2, _, lin = _problem()
    meta = {"image_id": torch.tensor([0, 1, 2, 3, 4, 5, 6, 0]), "cluster_id": torch.tensor([1, 0, 0, 0, 0, 0, 0, 0]),
            "label": torch.tensor([3, 1, 3, -1, 1, 0, 1, -1])}
    return x1, x2, meta, lin


def _ddp_readings_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, port, WORLD):
        torch.save(_rank_results(rank, _decoupled_problem(), DDP_READINGS), Path(out_dir) / f"rank{rank}.pt")


def test_ddp_readings_two_processes_equal_single_process(tmp_path):
    """Eq. 1, Eq. 2 as printed, DCL, SupCon: 2 gloo ranks' mean loss and DDP-averaged gradients against one
    process's contrastive_loss (whose loss is also checked against _brute_reading)."""
    per_rank = run_ranks(_ddp_readings_worker, WORLD, tmp_path)
    x1, x2, meta, lin = _decoupled_problem()
    assert not scored_anchors(make_rule("cluster")(meta), decoupled=True).all()
    for name, (rule, decoupled) in DDP_READINGS.items():
        lin.zero_grad()
        loss, _, _ = contrastive_loss(lin(x1), lin(x2), meta, rule, TAU, decoupled=decoupled)
        loss.backward()
        z = torch.cat([lin(x1), lin(x2)]).detach()
        assert abs(loss.item() - _brute_reading(z, meta, TAU, rule, decoupled)) <= 1e-6, name
        for res in (r[name] for r in per_rank):
            torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-10, atol=1e-12, msg=name)
            for got, p in zip(res["grads"], lin.parameters()):
                torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12, msg=name)
