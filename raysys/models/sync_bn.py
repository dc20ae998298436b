"""Synchronized batch norm: SimCLR's global BN, statistics over the global batch of every rank.

With per-rank BN, each rank normalizes its own slice, and a contrastive model can tell its positives
apart from other ranks' images by those statistics alone (SimCLR, Sec. B.9). :func:`convert_sync_batchnorm`
swaps every ``BatchNorm1d/2d`` of a model for :class:`GlobalBatchNorm`: on CUDA torch's own
``SyncBatchNorm`` (its fused kernels), elsewhere this module's, because torch's accepts only
accelerator tensors and Ray Train's CPU workers run gloo. Outside a process group of several ranks, and
in eval mode, both are the ordinary batch norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _several_ranks() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks: every rank's loss depends on every
    rank's statistics, so each rank's inputs receive the gradient of all losses."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()  # all_reduce is in place; autograd owns grad
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the inputs of every rank (any ``[N, C, ...]`` input); plain batch norm otherwise."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims [N, C, ...], got {x.dim()}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _several_ranks()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        count = x.new_full((1,), x.numel() // channels)
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)  # biased: normalizing divides by n
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every batch norm synchronized over the process group (weights and running
    statistics kept): torch's ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=module.weight.device if module.affine else None,
                              dtype=module.weight.dtype if module.affine else None)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module
