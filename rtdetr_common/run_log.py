"""What a training run writes as it goes: ``log.jsonl``, the epoch's progress bar (tqdm) and
the evaluation line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping, TextIO

from tqdm import tqdm

from .run_state import Progress
from .weights import atomic_write

class JsonLog:
    """The run's ``log.jsonl``: one JSON object per line, flushed as written.

    Args:
        path: The log file (appended to).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_to(self, progress: Progress) -> None:
        """Drops lines written after the checkpoint being resumed (they will be redone).

        Keeps training lines with ``step < progress.global_step`` and evaluation lines of
        epochs before ``progress.epoch``; the file is rewritten atomically.
        """
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("kind") == "train" and entry.get("step", math.inf) < progress.global_step:
                kept.append(line)
            elif entry.get("kind") == "eval" and entry.get("epoch", math.inf) < progress.epoch:
                kept.append(line)
        text = "".join(line + "\n" for line in kept)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def write(self, entry: Mapping) -> None:
        """Appends one line."""
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(entry)) + "\n")
            f.flush()


def read_log(path: str | Path) -> list[dict]:
    """The entries of a ``log.jsonl`` (an incomplete last line is skipped)."""
    entries = []
    for line in Path(path).read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def loss_entry(progress: Progress, lr: float, backbone_lr: float, losses: Mapping[str, float],
               seconds: float) -> dict:
    """One training line of ``log.jsonl``.

    ``iter`` is the 1-based batch of the epoch just trained, ``step`` the 0-based iteration
    count since the start, ``lr`` / ``backbone_lr`` the rates it trained with, then every loss
    term, the total ``loss`` and the step's wall time in ``seconds``.
    """
    return {"kind": "train", "epoch": progress.epoch, "iter": progress.iteration,
            "step": progress.global_step, "lr": lr, "backbone_lr": backbone_lr,
            **{k: float(v) for k, v in losses.items()}, "seconds": round(seconds, 4)}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """The metrics on one line, in percent: ``AP 12.34  AP50 ...`` (``n/a`` where missing, -1)."""
    return "  ".join(f"{k} {100 * float(v):.2f}" if float(v) >= 0 else f"{k} n/a"
                     for k, v in metrics.items())


def report_metrics(epoch: int, metrics: Mapping[str, float], stream: TextIO | None = None) -> None:
    """Writes one line with an epoch's evaluation metrics to ``stream`` (stderr by default)."""
    out = stream if stream is not None else sys.stderr
    out.write(f"epoch {epoch + 1} val: {format_metrics(metrics)}\n")
    out.flush()


def epoch_bar(total: int, title: str, stream: TextIO | None = None, done: int = 0,
              disable: bool = False) -> tqdm:
    """A progress bar (tqdm) over an epoch's ``total`` iterations on ``stream`` (stderr by
    default), starting at ``done`` (a resumed epoch); set its position with :func:`advance`.
    A disabled bar shows nothing."""
    return tqdm(total=max(int(total), 1), initial=int(done), desc=title, disable=disable,
                file=stream if stream is not None else sys.stderr, dynamic_ncols=True, leave=True)


def advance(bar: tqdm, done: int, text: str = "") -> None:
    """Moves ``bar`` to ``done`` iterations with ``text`` after it."""
    bar.set_postfix_str(text, refresh=False)
    bar.update(int(done) - bar.n)
