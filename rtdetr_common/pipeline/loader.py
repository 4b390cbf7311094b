"""Deterministic, resumable batching of a :class:`CocoDetection` into numpy batches.

Every random decision is a pure function of ``(seed, epoch, ...)``, never of the order in which
samples happen to be processed:

* the shuffle order of an epoch comes from the stream ``stream_seed("shuffle", seed, epoch)``;
* sample ``index`` is augmented with ``SharedRandom(stream_seed("sample", seed, epoch, index))``;
* with ``multi_scale``, batch ``b`` is resized to a size drawn from
  ``SharedRandom(stream_seed("scale", seed, epoch, b))``.

:func:`stream_seed` feeds ``np.random.SeedSequence(entropy=[seed, *keys], spawn_key=(stream,))``
and takes its first 64-bit word, so the three streams never collide. Hence a whole epoch is
reproducible from ``(seed, epoch)``, worker processes produce byte-identical batches to
in-process loading, and :meth:`DataLoader.state_dict` needs only ``(epoch, position)``.

The multi-scale resize is the official one: RT-DETR v1 resizes the batch inside the model with
``F.interpolate(x, size=[s, s])``, whose default mode is nearest; :func:`resize_nearest`
reproduces PyTorch's nearest source-index rule exactly, so the bytes equal the official resize
of the same batch, and both frameworks receive them already resized.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections import deque
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from ..random import SharedRandom
from .coco_dataset import CocoDetection
from .transforms import image_hw, to_float

logger = logging.getLogger(__name__)

_STREAMS = {"sample": 0, "shuffle": 1, "scale": 2}


def stream_seed(stream: str, seed: int, *keys: int) -> int:
    """A 64-bit seed for one of the loader's random streams.

    Args:
        stream: ``"sample"`` (keys: epoch, index), ``"shuffle"`` (keys: epoch) or ``"scale"``
            (keys: epoch, batch index).
        seed: The loader's seed (>= 0).
        keys: Non-negative integers identifying the draw.

    Returns:
        ``SeedSequence(entropy=[seed, *keys], spawn_key=(stream id,)).generate_state(1, uint64)[0]``.
    """
    sequence = np.random.SeedSequence(entropy=[int(seed), *(int(k) for k in keys)], spawn_key=(_STREAMS[stream],))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def sample_rng(seed: int, epoch: int, index: int) -> SharedRandom:
    """The stream that augments dataset sample ``index`` in ``epoch``."""
    return SharedRandom(stream_seed("sample", seed, epoch, index))


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's nearest source index per output index: floor(i * float32(in/out)), clamped."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(images: np.ndarray, size: int, channels_last: bool = False) -> np.ndarray:
    """``[bs, c, h, w]`` -> ``[bs, c, size, size]`` (``[bs, h, w, c]`` -> ``[bs, size, size, c]``
    with ``channels_last``), as ``torch.nn.functional.interpolate`` (nearest)."""
    if channels_last:
        rows = _nearest_index(images.shape[1], size)
        cols = _nearest_index(images.shape[2], size)
        return np.ascontiguousarray(images[:, rows[:, None], cols[None, :]])  # [bs, size, size, c]
    rows = _nearest_index(images.shape[2], size)
    cols = _nearest_index(images.shape[3], size)
    return np.ascontiguousarray(images[:, :, rows[:, None], cols[None, :]])  # [bs, c, size, size]


class Batch(NamedTuple):
    """One batch: ``images`` float32 ``[bs, 3, S, S]`` in [0, 1] and per-image ``targets``.

    Each target holds ``labels`` int64 ``[n]``, ``boxes`` float32 ``[n, 4]`` normalised cxcywh,
    ``image_id`` int and ``orig_size`` int64 ``[2]`` (w, h of the file's image).
    """

    images: np.ndarray
    targets: list[dict[str, Any]]


class _BatchMaker:
    """Builds batch ``b`` of an epoch from its dataset indices; the same code in every process.

    Where the dataset can leave its float conversion out, batches are made of uint8
    ``[bs, h, w, 3]`` images (a quarter of the bytes to pass between processes) and
    :func:`finish` converts them with the transforms' own :func:`to_float`: the same bytes as
    converting each image first, since the multi-scale resize only selects pixels.
    """

    def __init__(self, dataset: CocoDetection, seed: int, multi_scale: Optional[list[int]]) -> None:
        self.dataset = dataset
        self.seed = seed
        self.multi_scale = multi_scale
        self.uint8 = dataset.can_defer_float()

    def __call__(self, epoch: int, batch_index: int, indices: np.ndarray) -> tuple[Optional[Batch], dict[int, str]]:
        images, targets, skipped = [], [], {}
        for index in indices.tolist():
            sample = self.dataset.get(index, sample_rng(self.seed, epoch, index), uint8=self.uint8)
            if sample is None:
                skipped[index] = self.dataset.skipped[index]
                continue
            image, target = sample
            if self.uint8:
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"the dataset's transforms before ToFloat must leave uint8 "
                                     f"[h, w, 3] images, got {image.dtype} {image.shape} for index {index}")
            elif image.dtype != np.float32 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"the dataset's transforms must end with float32 [3, h, w] images (ToFloat), "
                                 f"got {image.dtype} {image.shape} for index {index}")
            if images and image.shape != images[0].shape:
                raise ValueError(f"images of one batch differ in size ({images[0].shape} vs {image.shape} at "
                                 f"index {index}): the dataset's transforms must resize to a fixed size")
            images.append(image)
            targets.append({"labels": np.asarray(target["labels"], dtype=np.int64),
                            "boxes": np.asarray(target["boxes"], dtype=np.float32),
                            "image_id": int(target["image_id"]),
                            "orig_size": np.asarray(target["orig_size"], dtype=np.int64)})
        if not images:
            return None, skipped
        stacked = np.stack(images)  # [bs, 3, h, w] float32, or [bs, h, w, 3] uint8
        if self.multi_scale:
            size = int(SharedRandom(stream_seed("scale", self.seed, epoch, batch_index)).choice(self.multi_scale))
            if image_hw(images[0]) != (size, size):
                stacked = resize_nearest(stacked, size, channels_last=self.uint8)
        return Batch(stacked, targets), skipped

    def finish(self, batch: Batch) -> Batch:
        """The batch as the loader yields it: float32 ``[bs, 3, h, w]`` images in [0, 1]."""
        return Batch(to_float(batch.images), batch.targets) if self.uint8 else batch


_WORKER_MAKER: Optional[_BatchMaker] = None


def _init_worker(maker: _BatchMaker) -> None:
    """Pool initializer: keeps the batch maker; Ctrl-C is the main process's to handle, and
    SIGTERM (how the pool stops its workers) must not reach a handler inherited from it."""
    global _WORKER_MAKER
    _WORKER_MAKER = maker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_job(job: tuple[int, int, np.ndarray]) -> tuple[Optional[Batch], dict[int, str]]:
    return _WORKER_MAKER(*job)


class DataLoader:
    """Deterministic batches of a dataset, optionally built in worker processes.

    Iterating yields the remaining batches of the current epoch (from :attr:`position`), then
    moves to the next epoch: consecutive ``for`` loops walk consecutive epochs, and a loop after
    :meth:`load_state_dict` resumes at the next unseen batch. Images that cannot be read are left
    out of their batch (the dataset logs and records them; the loader merges the records of its
    workers into ``dataset.skipped``); a batch with no readable image is skipped with a warning.

    Args:
        dataset: A :class:`CocoDetection` whose transforms end in fixed-size float32 images.
        batch_size: Images per batch.
        shuffle: Shuffle the order each epoch (from ``(seed, epoch)``); otherwise index order.
        drop_last: Drop the last incomplete batch.
        num_workers: Worker processes (0: build batches in this process). Workers are forked
            where the platform allows (they run only numpy and Pillow code), spawned otherwise;
            one pool serves every epoch until :meth:`close` (or the loader's end).
        seed: Seed of every random stream (>= 0).
        multi_scale: Sizes; each batch is resized (nearest, as the official model) to one drawn
            from ``(seed, epoch, batch index)``. None or empty keeps the transforms' size.
        rank: This process's rank among ``world_size`` processes: it yields the ``rank``-th
            contiguous shard of every global batch (``batch_size / world_size`` images).
        world_size: Processes sharing each global batch; the global batches, their order,
            augmentations and sizes are the same for every world size.

    Raises:
        ValueError: For a non-positive batch size, negative workers or seed, bad sizes, or a
            batch size that the world size does not divide.
    """

    def __init__(self, dataset: CocoDetection, batch_size: int, *, shuffle: bool, drop_last: bool,
                 num_workers: int = 0, seed: int = 0, multi_scale: Optional[Sequence[int]] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} is not one of world_size={world_size} processes")
        if int(batch_size) % int(world_size) or (int(world_size) > 1 and not drop_last):
            raise ValueError(f"batch_size={batch_size} must be a multiple of world_size={world_size} "
                             f"and, with several processes, every batch complete (drop_last)")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        sizes = [int(s) for s in multi_scale] if multi_scale else None
        if sizes is not None and min(sizes) < 1:
            raise ValueError(f"multi_scale sizes must be positive, got {list(multi_scale)}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.multi_scale = sizes
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.position = 0
        self._maker: Optional[_BatchMaker] = None
        self._pool = None

    def close(self) -> None:
        """Stops the worker pool (a later iteration starts a new one)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Makes ``epoch`` the current epoch; its position restarts at 0 unless it already is current.

        So ``load_state_dict`` followed by ``set_epoch`` of the same epoch still resumes mid-epoch.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``: the next batch to yield is batch ``position`` of ``epoch``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output.

        Raises:
            ValueError: If a key is missing or a value is out of range for this loader.
        """
        missing = [k for k in ("epoch", "position") if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"loader state epoch={epoch}, position={position} is out of range "
                             f"(this loader has {len(self)} batches per epoch)")
        self.epoch, self.position = epoch, position

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the order ``epoch`` visits them, int64 [len(dataset)]."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        keys = SharedRandom(stream_seed("shuffle", self.seed, epoch)).integers(0, 2**62, (n,))
        return np.argsort(keys, kind="stable").astype(np.int64)

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The dataset indices of every batch of ``epoch``."""
        order = self.epoch_order(epoch)
        return [order[start:start + self.batch_size] for start in range(0, len(self) * self.batch_size,
                                                                          self.batch_size)]

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global batch's dataset indices."""
        size = len(indices) // self.world_size
        return indices[self.rank * size:(self.rank + 1) * size]

    def __iter__(self) -> Iterator[Batch]:
        epoch, first = self.epoch, self.position
        plan = self.batch_indices(epoch)
        jobs = [(epoch, b, self.shard(plan[b])) for b in range(first, len(plan))]
        if self._maker is None:
            self._maker = _BatchMaker(self.dataset, self.seed, self.multi_scale)
        maker = self._maker
        if self.num_workers == 0:
            results = self._results_in_process(maker, jobs)
        else:
            results = self._results_in_workers(maker, jobs)
        try:
            for (_, b, _), (batch, skipped) in zip(jobs, results):
                self.position = b + 1
                self.dataset.skipped.update(skipped)
                if batch is None:
                    logger.warning("epoch %d batch %d: none of its %d images could be read; batch skipped",
                                   epoch, b, len(plan[b]))
                    continue
                yield maker.finish(batch)
        finally:
            results.close()
        self.epoch, self.position = epoch + 1, 0

    @staticmethod
    def _results_in_process(maker: _BatchMaker, jobs: list) -> Iterator[tuple[Optional[Batch], dict[int, str]]]:
        for job in jobs:
            yield maker(*job)

    def _results_in_workers(self, maker: _BatchMaker, jobs: list) -> Iterator[tuple[Optional[Batch], dict[int, str]]]:
        """Results in job order from the loader's pool, at most two jobs per worker in flight.

        Leaving the loop early drops the jobs in flight (their results are never read); a
        worker that fails ends the pool, and the next iteration starts a new one.
        """
        if self._pool is None:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = multiprocessing.get_context(method).Pool(
                self.num_workers, initializer=_init_worker, initargs=(maker,))
        pool = self._pool
        pending: deque = deque()
        upcoming = iter(jobs)

        def submit_next() -> None:
            job = next(upcoming, None)
            if job is not None:
                pending.append(pool.apply_async(_run_job, (job,)))

        ok = False
        try:
            for _ in range(2 * self.num_workers):
                submit_next()
            while pending:
                result = pending.popleft().get()
                submit_next()
                yield result
            ok = True
        finally:
            if not ok and pending:  # left early or failed: the pool's queue holds stale jobs
                self.close()
