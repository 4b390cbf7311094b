"""Training in several processes (Jittor under ``mpirun``, OpenMPI) or in one.

Differences from torch_ref/distributed.py:
- Jittor joins MPI when it is imported under ``mpirun`` (``jt.in_mpi``); :func:`init` has nothing to do.
- Gradients are averaged by Jittor's optimizer itself under MPI; :func:`parallel` returns the model unchanged.
- The collectives are ``Var.mpi_all_reduce('add')``, differentiable like ``torch.distributed.nn``'s.
"""

from __future__ import annotations

from typing import Sequence

import jittor as jt
import numpy as np
from jittor import nn

from rtdetr_common import distributed as common

from .nn import BatchNorm2d, named_children, set_child


def init(device: str = "cpu") -> None:
    """Joins the process group when launched as one of several processes (Jittor joined MPI
    at import, on either ``device``)."""


def is_distributed() -> bool:
    """Whether this process is one of several."""
    return bool(jt.in_mpi) and jt.world_size > 1


def world_size() -> int:
    """The number of processes."""
    return jt.world_size if is_distributed() else 1


def rank() -> int:
    """This process's rank."""
    return jt.rank if is_distributed() else 0


def all_reduce(array: np.ndarray) -> np.ndarray:
    """The float64 sum over processes of ``array``."""
    total = np.array(array, np.float64)
    if is_distributed():
        total = jt.array(total).mpi_all_reduce("add").numpy()
    return total


def barrier() -> None:
    """Waits until every process arrives here."""
    if is_distributed():
        all_reduce(np.zeros(1))


def gather_counts(counts: Sequence[int]) -> tuple[list[int], int]:
    """The global batch's per-image counts and where this process's images begin."""
    return common.gather_counts(counts, rank(), world_size(), all_reduce)


class SyncBatchNorm(BatchNorm2d):
    """torch.nn.SyncBatchNorm on any device: in training across processes, the statistics of
    the global batch (float64 sums, all-reduced with their gradients); otherwise BatchNorm2d."""

    def execute(self, x: jt.Var) -> jt.Var:
        if not (self.training and is_distributed()):
            return super().execute(x)
        c = x.shape[1]
        x64 = x.float64()
        local = jt.concat([x64.sum([0, 2, 3]), (x64 * x64).sum([0, 2, 3]),
                           jt.full((1,), x.numel() // c, "float64")])
        total = local.mpi_all_reduce("add")
        n = total[2 * c]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean * mean
        with jt.no_grad():
            m = self.momentum
            self.running_mean.update((1.0 - m) * self.running_mean + m * mean.float32())
            self.running_var.update((1.0 - m) * self.running_var + m * (var * n / (n - 1)).float32())
            self.num_batches_tracked.update(self.num_batches_tracked + 1)
        scale = self.weight.float64() * jt.rsqrt(var + self.eps)
        shift = self.bias.float64() - mean * scale
        return (x64 * scale.reshape(1, c, 1, 1) + shift.reshape(1, c, 1, 1)).float32()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d below ``module`` by a :class:`SyncBatchNorm` with its state."""
    for name, child in named_children(module):
        if type(child) is BatchNorm2d:
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.load_state_dict(child.state_dict())
            if not child.training:
                sync.eval()
            set_child(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def parallel(model: nn.Module) -> nn.Module:
    """The model as the training step calls it (Jittor's optimizer averages the gradients)."""
    return model
