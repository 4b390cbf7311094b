"""Training in several processes (``torch.distributed``, the gloo backend on CPU) or in one.

A process started by ``torchrun`` (``WORLD_SIZE`` > 1) joins the process group in :func:`init`.
The model's BatchNorm layers then become :class:`SyncBatchNorm` (statistics of the global
batch) and the model is wrapped in ``DistributedDataParallel`` (gradients averaged); the
criterion's box normaliser and the denoising queries (:func:`gather_counts`) see the whole
global batch, so a run equals a one-process run of the same global batch.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as _all_reduce_with_grad

from rtdetr_common import distributed as common


def init(device: str = "cpu") -> None:
    """Joins the process group when launched as one of several processes (``device``
    ``cuda``: the NCCL backend, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")


def is_distributed() -> bool:
    """Whether this process is one of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce(array: np.ndarray) -> np.ndarray:
    """The float64 sum over processes of ``array``."""
    total = torch.from_numpy(np.array(array, np.float64))
    if is_distributed():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            total = total.cuda()
        dist.all_reduce(total)
    return total.cpu().numpy()


def barrier() -> None:
    """Waits until every process arrives here."""
    if is_distributed():
        dist.barrier()


def gather_counts(counts: Sequence[int]) -> tuple[list[int], int]:
    """The global batch's per-image counts and where this process's images begin."""
    return common.gather_counts(counts, rank(), world_size(), all_reduce)


class SyncBatchNorm(nn.BatchNorm2d):
    """torch.nn.SyncBatchNorm on any device: in training across processes, the statistics of
    the global batch (float64 sums, all-reduced with their gradients); otherwise BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        c = x.shape[1]
        x64 = x.double()
        local = torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)),
                           x64.new_full((1,), x.numel() // c)])
        total = _all_reduce_with_grad(local)
        n = total[2 * c]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean * mean
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.float())
            self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).float())
            self.num_batches_tracked.add_(1)
        scale = self.weight.double() * torch.rsqrt(var + self.eps)
        shift = self.bias.double() - mean * scale
        return (x64 * scale[None, :, None, None] + shift[None, :, None, None]).float()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d below ``module`` by a :class:`SyncBatchNorm` with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def parallel(model: nn.Module) -> nn.Module:
    """The model as the training step calls it: gradients averaged over processes."""
    if not is_distributed():
        return model
    first = next(model.parameters())
    ids = [first.device] if first.is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
