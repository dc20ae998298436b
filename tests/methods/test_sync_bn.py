"""Synchronized (global) batch norm: 2 gloo ranks give the single-process loss, gradients and running
statistics of the whole batch; per-rank batch norm does not. When the config turns it on."""

import copy
from pathlib import Path

import pytest
import torch
from helpers import ddp_mean_grads, gloo_group, run_ranks
from torch import nn

from raysys.config import make_config
from raysys.errors import ConfigError
from raysys.methods.losses import contrastive_loss, gather_no_grad
from raysys.models.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

WORLD, TAU = 2, 0.5
torch.set_num_threads(1)


def _problem():
    """Two views of a global batch of 8 images (4 per rank) and a conv net with 2-d and 1-d batch norm."""
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=g)
    x2 = torch.randn(8, 3, 6, 6, dtype=torch.float64, generator=g) * 2 + 1
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    return x1, x2, {"image_id": torch.arange(8)}, model


def _step(model, x1, x2, meta):
    """SimCLR's step: both views in one forward, NT-Xent over the (gathered) batch, backward."""
    model.zero_grad()
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)
    loss = contrastive_loss(z1, z2, meta, "instance", TAU)[0]
    loss.backward()
    return loss


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, WORLD):
        x1, x2, meta, model = _problem()
        mine = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for name, net in {"sync": convert_sync_batchnorm(copy.deepcopy(model), torch.device("cpu")),
                          "per_rank": model}.items():
            loss = _step(net, x1[mine], x2[mine], {k: v[mine] for k, v in meta.items()})
            results[name] = {"loss": gather_no_grad(loss.detach()[None]).mean(), "grads": ddp_mean_grads(net, WORLD),
                             "buffers": [b.clone() for b in net.buffers()],
                             "converted": sum(isinstance(m, GlobalBatchNorm) for m in net.modules())}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_with_sync_bn_equal_one_process(tmp_path):
    per_rank = run_ranks(_ddp_worker, WORLD, tmp_path)
    x1, x2, meta, model = _problem()
    loss = _step(model, x1, x2, meta)
    for res in per_rank:
        sync, per_rank_bn = res["sync"], res["per_rank"]
        assert sync["converted"] == 2 and per_rank_bn["converted"] == 0
        torch.testing.assert_close(sync["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        for got, p in zip(sync["grads"], model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)
        for got, b in zip(sync["buffers"], model.buffers()):  # running mean/var (unbiased), batches tracked
            torch.testing.assert_close(got, b, rtol=1e-9, atol=1e-12)
        # The check can fail: per-rank statistics give another loss and other gradients.
        assert abs(per_rank_bn["loss"] - loss.detach()) > 1e-3
        assert max((g - p.grad).abs().max() for g, p in zip(per_rank_bn["grads"], model.parameters())) > 1e-3


def test_global_batch_norm_is_batch_norm_in_one_process_and_in_eval():
    x1, x2, _, model = _problem()
    converted = convert_sync_batchnorm(copy.deepcopy(model), torch.device("cpu"))
    x = torch.cat([x1, x2])
    torch.testing.assert_close(converted(x), model(x))
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))


@pytest.mark.parametrize("overrides, on", [
    (dict(workers=2), True), (dict(workers=1), False), (dict(workers=2, sync_bn="off"), False),
    (dict(workers=2, framework="moco"), False),
])
def test_sync_bn_is_on_for_simclr_with_several_workers(overrides, on):
    assert make_config("smoke", **overrides).validate().synchronized_bn is on


def test_sync_bn_on_with_moco_is_refused():
    with pytest.raises(ConfigError, match="shuffle-BN"):
        make_config("smoke", framework="moco", sync_bn="on").validate()
