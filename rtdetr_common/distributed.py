"""What the processes of one training run share, written once for both frameworks.

Each framework's ``distributed`` module (``torch_ref.distributed``, ``jittor_impl.distributed``)
supplies the collective, a sum over processes of a float64 numpy array (``all_reduce``), and
its process's ``rank`` and the ``world_size``; one process is a world of size 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

AllReduce = Callable[[np.ndarray], np.ndarray]


def gather_counts(counts: Sequence[int], rank: int, world_size: int,
                  all_reduce: AllReduce) -> tuple[list[int], int]:
    """Every process's per-image counts in rank order (the global batch's), and the index at
    which this process's images begin."""
    counts = [int(c) for c in counts]
    if world_size == 1:
        return counts, 0
    sizes = np.zeros(world_size)
    sizes[rank] = len(counts)
    sizes = all_reduce(sizes).astype(np.int64)
    start = int(sizes[:rank].sum())
    everyone = np.zeros(int(sizes.sum()))
    everyone[start:start + len(counts)] = counts
    return all_reduce(everyone).astype(np.int64).tolist(), start


def mean_over_processes(values: dict[str, float], world_size: int,
                        all_reduce: AllReduce) -> dict[str, float]:
    """The mean over processes of each named value (the same names in every process)."""
    if world_size == 1:
        return dict(values)
    names = sorted(values)
    total = all_reduce(np.array([values[k] for k in names], np.float64))
    return {k: float(v) / world_size for k, v in zip(names, total)}


def first_signal(signum: int | None, world_size: int, all_reduce: AllReduce) -> int | None:
    """The lowest signal number any process has received (``signum``: this process's, or
    None), or None; every process gets the same answer."""
    if world_size == 1:
        return signum
    seen = np.zeros(65)
    if signum is not None:
        seen[signum] = 1
    hits = np.flatnonzero(all_reduce(seen))
    return int(hits[0]) if len(hits) else None
