"""The neutral part of a training checkpoint: where a run stands and what it was.

A training checkpoint holds, beside each framework's weights and optimizer, ``train_state``:
its format and version, the framework, the whole :class:`~rtdetr_common.train_config.TrainConfig`,
the :class:`Progress` counters, the data loader's position, the model's shared random stream
and the categories, all plain Python values, so a resumed run can refuse a changed config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .train_config import TrainConfig

CHECKPOINT_FORMAT = "rtdetr-parity-train"
CHECKPOINT_VERSION = 1


@dataclass
class Progress:
    """Where a run stands: the next batch to train is batch ``iteration`` of ``epoch``.

    Attributes:
        epoch: 0-based epoch in progress (``cfg.epochs`` once training is complete).
        iteration: Batches of ``epoch`` already trained.
        global_step: Iterations trained since the start.
    """

    epoch: int = 0
    iteration: int = 0
    global_step: int = 0

    def to_dict(self) -> dict:
        """The counters as a dict."""
        return dataclasses.asdict(self)


def train_state(cfg: TrainConfig, progress: Progress, loader_state: dict, rng_state: dict,
                framework: str, categories: list[dict]) -> dict:
    """The framework-neutral part of a training checkpoint (plain Python values only)."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "framework": framework,
            "config": cfg.to_dict(), "progress": progress.to_dict(), "loader": dict(loader_state),
            "rng": rng_state, "categories": categories}


def check_train_state(state: object, source: str, framework: str) -> dict:
    """Validates the neutral part of a training checkpoint read back from ``source``.

    Raises:
        ValueError: If it is not a training checkpoint of this format and framework.
    """
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source}: not an rtdetr-parity training checkpoint (no 'train_state' "
                         f"of format {CHECKPOINT_FORMAT!r}); it holds weights only")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{source}: training checkpoint version {state.get('version')!r}, "
                         f"this code reads {CHECKPOINT_VERSION}")
    if state.get("framework") != framework:
        raise ValueError(f"{source}: written by the {state.get('framework')} trainer, cannot "
                         f"resume it with the {framework} trainer")
    missing = [k for k in ("config", "progress", "loader", "rng", "categories") if k not in state]
    if missing:
        raise ValueError(f"{source}: training checkpoint lacks {missing}")
    return state


def checkpoint_path(cfg: TrainConfig, suffix: str) -> Path:
    """``<output_dir>/last<suffix>``, the checkpoint a run writes and resumes from."""
    return Path(cfg.output_dir) / f"last{suffix}"


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` did.

    Attributes:
        progress: Where the run stands at return.
        checkpoint: The checkpoint written last.
        interrupted: Name of the signal that stopped the run, or empty if it completed.
        resumed_from: The checkpoint the run resumed from, or None.
        metrics: The last evaluation's metrics, if any.
    """

    progress: Progress
    checkpoint: Path
    interrupted: str = ""
    resumed_from: Path | None = None
    metrics: dict | None = None


def categories_of(names: Iterable[str], category_ids: Iterable[int]) -> list[dict]:
    """``[{"id", "name"}]`` of a category map, in label order (stored in checkpoints)."""
    return [{"id": int(c), "name": str(n)} for c, n in zip(category_ids, names)]
