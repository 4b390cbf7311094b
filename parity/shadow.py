"""Shadow training: the one-step training checks at points along a real reference run.

The one-step checks (:func:`parity.training.reference_step` / :func:`~parity.training.port_step`)
start from fresh optimizer and EMA state. Shadow training takes them along the trajectory of a
real torch training run instead: the run's stored configuration is trained again with the torch
trainer (deterministic, so the same trajectory; the re-run's final checkpoint must equal the
run's bit for bit, and its losses the run's log), and before each chosen step the trainer's
exact state (weights, BatchNorm buffers, AdamW moments and per-parameter counts, the step's
rates, the EMA and its update count, the shared random stream of the denoising noise) is
loaded into a model pair. Both sides then take that ONE step on the trainer's batch, the
reference's decisions forced into the port, and every row of the one-step check is judged as
usual: loss, clipped gradients, updates, moments, EMA and BatchNorm buffers, each against the
reference's own fp32 error (its gap to a float64 replay of the same step). A correct port stays
at that floor at every point of a run; a bug that compounds shows as a growing ratio.

Outputs (``--out``): ``shadow.csv`` (per point and quantity kind: the row with the largest
error / floor ratio, the kind's verdict), ``shadow_failures.csv`` (every failing row),
``summary.json`` and ``shadow.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

import jittor_impl  # noqa: F401  (prepares Jittor before the jittor imports below)
import jittor as jt
import torch_ref.trainer as torch_trainer
from jittor_impl import build_model as build_jittor
from rtdetr_common.pipeline.loader import Batch
from rtdetr_common.run_log import read_log
from rtdetr_common.run_state import check_train_state
from rtdetr_common.train_config import TrainConfig
from rtdetr_common.weights import atomic_write
from torch_ref import build_model as build_torch

from .compare import Comparison
from .faults import applied, catalogue
from .models import ModelPair
from .tolerances import tolerance
from .training import StepReference, StepStart, _rel_l2, port_step, reference_step

# Row kinds of a shadow point, by path prefix (the first match wins).
KINDS = (("train_loss.", "loss"), ("grad.", "grad"), ("update", "update"), ("param.", "update"),
         ("frozen.", "update"),
         ("exp_avg", "moment"), ("step_count.", "moment"), ("optimizer.", "moment"),
         ("ema", "ema"), ("buffer", "buffer"), ("train.", "decision"))
# The kinds the plot draws (largest error / floor ratio per point).
PLOTTED = ("grad", "update", "moment", "ema", "buffer")
CHECKPOINT = "last" + torch_trainer.CHECKPOINT_SUFFIX


def row_kind(path: str) -> str:
    """The shadow kind of a one-step row: loss, grad, update, moment, ema, buffer, decision."""
    return next((kind for prefix, kind in KINDS if path.startswith(prefix)), "other")


def shadow_steps(total: int, every: int | None) -> list[int]:
    """The 0-based steps shadowed in a run of ``total`` steps: the first of every window of
    ``every`` steps (default: ten windows, ``ceil(total / 10)``), so each window has one.

    Raises:
        ValueError: If ``total`` or ``every`` is below 1.
    """
    if total < 1:
        raise ValueError(f"the run has {total} training steps; nothing to shadow")
    if every is None:
        every = math.ceil(total / 10)
    if every < 1:
        raise ValueError(f"--every must be at least 1, got {every}")
    return list(range(0, total, every))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise ValueError(f"{path}: cannot be read as a training checkpoint: {exc}") from exc


def read_run(run_dir: str | Path) -> tuple[TrainConfig, dict, dict]:
    """The configuration, the ``train_state`` and the checkpoint of a finished torch run.

    Raises:
        FileNotFoundError: If the folder or its ``last.pth`` is missing.
        ValueError: If the checkpoint is not a torch training checkpoint or the run stopped
            before its last epoch (finish it with the same ``train`` command first).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    path = run / CHECKPOINT
    if not path.is_file():
        other = " (it holds a Jittor run's last.pkl: shadow follows a torch run)" \
            if (run / "last.pkl").is_file() else ""
        raise FileNotFoundError(f"{run} is not a torch training run: no {CHECKPOINT}{other}")
    obj = _load_checkpoint(path)
    state = check_train_state(obj.get("train_state") if isinstance(obj, dict) else None,
                              str(path), torch_trainer.FRAMEWORK)
    fields = TrainConfig.__dataclass_fields__
    unknown = sorted(set(state["config"]) - set(fields))
    if unknown:
        raise ValueError(f"{path}: its config has fields this code does not know: {unknown}")
    cfg = TrainConfig(**state["config"])
    progress = state["progress"]
    if progress["epoch"] < cfg.epochs or progress["iteration"] != 0:
        raise ValueError(f"{path}: the run stopped at epoch {progress['epoch'] + 1} of "
                         f"{cfg.epochs}, batch {progress['iteration']}; finish it with the same "
                         f"`rtdetr-parity train` command before shadowing it")
    return cfg, state, obj


def _tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor and plain value of a nested checkpoint, by path."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def checkpoint_differences(test: dict, reference: dict) -> list[str]:
    """Where two training checkpoints differ (weights, EMA, optimizer and train state compared
    exactly; the output folder and the settings that do not change the run are ignored)."""
    ignored = tuple(f"train_state.config.{k}" for k in ("output_dir", "eval_every", "log_every",
                                                         "num_workers", "eval_batch_size"))
    a, b = _tensors(test), _tensors(reference)
    problems = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(ignored):
            continue
        if key not in a or key not in b:
            problems.append(f"{key}: only in the {'run' if key in b else 're-run'}")
            continue
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            if not same:
                diff = ((x.double() - y.double()).abs().max().item()
                        if x.shape == y.shape and x.numel() else math.nan)
                problems.append(f"{key}: differs (max abs {diff:.3g})")
        elif x != y:
            problems.append(f"{key}: {x!r} != {y!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# One shadow point
# ---------------------------------------------------------------------------------------------

def _floor_of(ref: StepReference, path: str) -> float:
    """The reference's own fp32 error (relative L2 against its float64 replay) of the quantity
    a one-step row compares; NaN for rows without one (decisions, integer counts, the
    optimizer-alone and averaging-alone rows)."""
    head, _, name = path.partition(".")
    if path == "train_loss.step":
        return abs(ref.loss - ref.loss64) / max(abs(ref.loss64), 1e-30)
    if head == "grad" and ref.grads.get(name) is not None and ref.grads64.get(name) is not None:
        return _rel_l2(ref.grads[name], ref.grads64[name])
    if head == "update" and name in ref.after:
        return _rel_l2(ref.after[name] - ref.before[name], ref.after64[name] - ref.before[name])
    if head == "param" and name in ref.after:
        return _rel_l2(ref.after[name], ref.after64[name])
    if head in ("exp_avg", "exp_avg_sq") and name in ref.state and name in ref.state64:
        return _rel_l2(ref.state[name][head], ref.state64[name][head])
    if head in ("buffer", "buffer_delta") and name in ref.buffers_after:
        after, before = ref.buffers_after[name], ref.buffers_before[name]
        if after.dtype.kind != "f":
            return math.nan
        after64 = ref.buffers_after64[name]
        if head == "buffer":
            return _rel_l2(after, after64)
        return _rel_l2(after.astype(np.float64) - before, after64 - before)
    if head == "ema" and ref.ema_after:
        first = next(iter(ref.ema_after))
        value = ref.ema_after[first].get(name)
        if value is None or value.dtype.kind != "f":
            return math.nan
        return _rel_l2(value, ref.ema_after64[first][name])
    if head.startswith("ema_delta["):
        updates = int(head[len("ema_delta["):-1])
        value = ref.ema_after[updates].get(name)
        if value is None or value.dtype.kind != "f":
            return math.nan
        start = ref.ema_before[updates][name].astype(np.float64)
        return _rel_l2(value.astype(np.float64) - start, ref.ema_after64[updates][name] - start)
    return math.nan


def _ratio(error: float, floor: float) -> float:
    if not (math.isfinite(floor) and math.isfinite(error)):
        return math.nan if math.isnan(floor) else math.inf
    if floor > 0:
        return error / floor
    return 0.0 if error == 0 else math.inf


@dataclass
class ShadowPoint:
    """One shadowed step: every one-step row and what the summary needs of the reference.

    Attributes:
        step: 0-based step of the run (the state before it was loaded).
        epoch: Its epoch.
        rows: The one-step rows (:func:`parity.training.port_step` with gradients).
        floors: The reference's own fp32 error per row path (NaN where none applies).
        zero: Parameters whose gradient is zero in exact arithmetic (noise rows, no ratio).
        torch_loss / float64_loss: The reference's total loss of the step and its replay's.
        loss_rel_diff: ``|Jittor - torch| / |torch|`` of the total loss (the loss row's).
        rerun_loss: The re-run trainer's own loss of the step (the same state and batch).
        logged_loss: The run's ``log.jsonl`` loss of the step (NaN when not logged).
        lr: The default group's rate of the step.
        ema_updates: The EMA's update count before the step (-1 without an EMA).
        size: ``(h, w)`` of the batch.
        seconds: Wall time of the reference step (``torch``), its float64 replay, the port's
            step with every comparison (``port``) and the whole point (``total``).
    """

    step: int
    epoch: int
    rows: list[Comparison]
    floors: dict[str, float]
    zero: set[str]
    torch_loss: float
    float64_loss: float
    loss_rel_diff: float
    rerun_loss: float = math.nan
    logged_loss: float = math.nan
    lr: float = math.nan
    ema_updates: int = -1
    size: tuple[int, int] = (0, 0)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every row passed."""
        return all(c.passed for c in self.rows)

    def kind_rows(self) -> list[dict]:
        """One dict per kind: row and failure counts, the row with the largest error / floor
        ratio (error: the row's relative L2; parameters of :attr:`zero` and rows without a
        floor take no part) and the kind's verdict."""
        out = []
        kinds: dict[str, list[Comparison]] = {}
        for c in self.rows:
            kinds.setdefault(row_kind(c.path), []).append(c)
        for kind, rows in kinds.items():
            failed = [c for c in rows if not c.passed]
            worst, worst_ratio = None, -1.0
            for c in rows:
                if c.path.partition(".")[2] in self.zero:
                    continue
                ratio = _ratio(c.rel_l2, self.floors.get(c.path, math.nan))
                if not math.isnan(ratio) and ratio > worst_ratio:
                    worst, worst_ratio = c, ratio
            out.append({
                "step": self.step, "epoch": self.epoch, "kind": kind, "rows": len(rows),
                "failed": len(failed), "passed": not failed,
                "worst_path": worst.path if worst else "",
                "error": worst.rel_l2 if worst else math.nan,
                "floor": self.floors.get(worst.path, math.nan) if worst else math.nan,
                "ratio": worst_ratio if worst else math.nan,
                "worst_passed": worst.passed if worst else True,
                "first_failure": f"{failed[0].path}: {failed[0].reason}" if failed else ""})
        return out

    def loss_row(self) -> dict:
        """The step's losses: torch, Jittor, float64 replay, the re-run's and the log's."""
        floor = abs(self.torch_loss - self.float64_loss) / max(abs(self.float64_loss), 1e-30)
        return {"step": self.step, "epoch": self.epoch, "size": f"{self.size[0]}x{self.size[1]}",
                "lr": self.lr, "ema_updates": self.ema_updates, "torch_loss": self.torch_loss,
                "float64_loss": self.float64_loss, "loss_rel_diff": self.loss_rel_diff,
                "loss_floor": floor, "rerun_loss": self.rerun_loss,
                "logged_loss": self.logged_loss, "passed": self.passed,
                **{f"seconds_{k}": round(v, 2) for k, v in self.seconds.items()}}


def _targets(batch: Batch) -> list[dict]:
    """A loader batch's targets as the model takes them (``labels``, ``boxes``)."""
    return [{"labels": t["labels"], "boxes": t["boxes"]} for t in batch.targets]


def shadow_step(pair: ModelPair, trainer: torch_trainer.Trainer, batch: Batch,
                fault_id: str | None = None) -> ShadowPoint:
    """Loads the trainer's state (before its next step) into ``pair`` and runs the one-step
    checks on the trainer's batch; the trainer is not touched.

    Args:
        pair: The model pair built from the trainer's variant config.
        trainer: The torch trainer, its rates set for the step (``set_lr``).
        batch: The batch the trainer is about to train on.
        fault_id: A fault of :mod:`parity.faults` applied to the port's step (a fire drill).
    """
    model = trainer.model
    pair.torch_model.load_state_dict(model.state_dict())
    pair.torch_model.rng.load_state_dict(model.rng.state_dict())
    start = StepStart(optimizer=trainer.optimizer.state_dict(),
                      lrs=[float(g["lr"]) for g in trainer.optimizer.param_groups],
                      ema=None if trainer.ema is None else trainer.ema.state_dict())
    began = time.perf_counter()
    ref = reference_step(pair, batch.images, _targets(batch), start)
    began_port = time.perf_counter()
    context = applied(catalogue([fault_id])[0]) if fault_id else contextlib.nullcontext()
    with context:
        rows = port_step(pair, ref, gradients=True)
    seconds = dict(ref.seconds, port=time.perf_counter() - began_port,
                   total=time.perf_counter() - began)
    loss_row = next(c for c in rows if c.path == "train_loss.step")
    return ShadowPoint(
        step=trainer.progress.global_step, epoch=trainer.progress.epoch, rows=rows,
        floors={c.path: _floor_of(ref, c.path) for c in rows}, zero=set(ref.zero),
        torch_loss=ref.loss, float64_loss=ref.loss64, loss_rel_diff=loss_row.rel_l2,
        lr=float(trainer.optimizer.param_groups[-1]["lr"]),
        ema_updates=-1 if trainer.ema is None else int(trainer.ema.updates),
        size=tuple(int(s) for s in batch.images.shape[-2:]), seconds=seconds)


class _ShadowTrainer(torch_trainer.Trainer):
    """The torch trainer re-running a run; before each shadowed step it hands its state and
    batch to ``visit`` and keeps every step's loss."""

    def __init__(self, cfg: TrainConfig, steps: list[int],
                 visit: Callable[["_ShadowTrainer", Batch], ShadowPoint]) -> None:
        super().__init__(cfg)
        self.shadowed = set(steps)
        self.visit = visit
        self.points: list[ShadowPoint] = []
        self.losses: dict[int, float] = {}

    def step(self, batch: Batch) -> dict[str, float]:
        """A shadow point first when this step is one, then the trainer's own step."""
        step = self.progress.global_step
        point = self.visit(self, batch) if step in self.shadowed else None
        losses = super().step(batch)
        self.losses[step] = float(losses["loss"])
        if point is not None:
            point.rerun_loss = self.losses[step]
            self.points.append(point)
        return losses


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------

@dataclass
class ShadowResult:
    """A shadowed run: its points, the re-run's fidelity, and where it was written."""

    run_dir: Path
    steps: list[int]
    every: int | None
    points: list[ShadowPoint]
    total_steps: int
    rerun_problems: list[str]
    loss_mismatches: list[int]
    fault: str | None
    seconds: float
    written: list[Path] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every point passed and the re-run followed the run exactly."""
        return all(p.passed for p in self.points) and not self.rerun_problems \
            and not self.loss_mismatches

    @property
    def first_failing_step(self) -> int | None:
        """The first shadowed step with a failing row, or None."""
        return next((p.step for p in self.points if not p.passed), None)

    def table(self) -> pd.DataFrame:
        """``shadow.csv``: one row per point and kind."""
        return pd.DataFrame([r for p in self.points for r in p.kind_rows()])

    def failures(self) -> pd.DataFrame:
        """``shadow_failures.csv``: every failing row of every point."""
        rows = [{"step": p.step, "kind": row_kind(c.path), "path": c.path, "rel_l2": c.rel_l2,
                 "floor": p.floors.get(c.path, math.nan), "reason": c.reason}
                for p in self.points for c in p.rows if not c.passed]
        return pd.DataFrame(rows, columns=["step", "kind", "path", "rel_l2", "floor", "reason"])

    def losses(self) -> pd.DataFrame:
        """One row per point: the step's losses on both sides and its verdict."""
        return pd.DataFrame([p.loss_row() for p in self.points])

    def summary(self, command: list[str]) -> dict:
        """``summary.json``'s content."""
        table = self.table()
        worst = {}
        for kind, rows in table.groupby("kind"):
            ratios = rows["ratio"].replace([np.inf], np.nan)
            finite = rows[ratios.notna()]
            if finite.empty and not (rows["ratio"] == np.inf).any():
                worst[kind] = {"passed": bool(rows["passed"].all()), "ratio": None}
                continue
            top = rows.loc[rows["ratio"].idxmax()]
            worst[kind] = {"ratio": float(top["ratio"]), "step": int(top["step"]),
                           "path": top["worst_path"], "error": float(top["error"]),
                           "floor": float(top["floor"]), "passed": bool(rows["passed"].all()),
                           "failed_rows": int(rows["failed"].sum())}
        first = self.first_failing_step
        first_row = None
        if first is not None:
            point = next(p for p in self.points if p.step == first)
            c = next(c for c in point.rows if not c.passed)
            first_row = {"path": c.path, "kind": row_kind(c.path), "rel_l2": c.rel_l2,
                         "floor": point.floors.get(c.path, math.nan), "reason": c.reason}
        losses = self.losses()
        return {
            "run_dir": str(self.run_dir), "passed": self.passed, "fault": self.fault,
            "total_steps": self.total_steps, "points": len(self.points),
            "steps": [p.step for p in self.points],
            "every": self.every,
            "first_failing_step": first, "first_failing_row": first_row,
            "failed_points": [p.step for p in self.points if not p.passed],
            "worst_ratio": worst,
            "loss": {"max_rel_diff": float(losses["loss_rel_diff"].max()),
                     "max_floor": float(losses["loss_floor"].max())},
            "rerun": {"matches_run": not self.rerun_problems and not self.loss_mismatches,
                      "final_checkpoint_differences": self.rerun_problems[:20],
                      "steps_whose_loss_differs_from_the_log": self.loss_mismatches[:20],
                      "shadow_reference_loss_equals_rerun":
                          bool((losses["torch_loss"] == losses["rerun_loss"]).all())},
            "command": command, "versions": versions(), "seconds": round(self.seconds, 1),
            "per_point": losses.to_dict(orient="records")}


def versions() -> dict[str, str]:
    """The software the measurements were made with."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "jittor": jt.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "platform": platform.platform(), "commit": commit or "unknown"}


def run_shadow(run_dir: str | Path, every: int | None = None, fault: str | None = None,
               steps: list[int] | None = None, stream: Any = None) -> ShadowResult:
    """Re-runs a finished torch run and shadows it at :func:`shadow_steps` (or ``steps``).

    Args:
        run_dir: A folder written by ``rtdetr-parity train --framework torch``.
        every: Shadow every ``every``-th step (default: a tenth of the run).
        fault: A fault id of :mod:`parity.faults` applied to the port's steps.
        steps: Explicit 0-based steps to shadow instead.
        stream: Where the trainer's progress bar and the point lines go (stderr by default).

    Raises:
        FileNotFoundError / ValueError: See :func:`read_run`; an unknown fault or bad step.
    """
    began = time.perf_counter()
    run_dir = Path(run_dir)
    out_stream = stream if stream is not None else sys.stderr
    cfg, state, obj = read_run(run_dir)
    logged = {int(e["step"]): float(e["loss"]) for e in _read_log(run_dir)}
    if fault is not None:
        catalogue([fault])  # an unknown id fails before any training
    total = int(state["progress"]["global_step"])
    chosen = shadow_steps(total, every) if steps is None else sorted(set(steps))
    bad = [s for s in chosen if not 0 <= s < total]
    if bad or not chosen:
        raise ValueError(f"steps to shadow must lie in [0, {total}), got {bad or chosen}")
    work = Path(tempfile.mkdtemp(prefix="rtdetr-shadow-rerun-"))  # the re-run's checkpoints
    pair_box: list[ModelPair] = []

    def visit(trainer: _ShadowTrainer, batch: Batch) -> ShadowPoint:
        if not pair_box:
            rng = torch.get_rng_state()  # building the pair must not move the run's stream
            variant = trainer.variant
            pair_box.append(ModelPair(
                variant, build_torch(variant, multi_scale=False, seed=cfg.seed),
                build_jittor(variant, multi_scale=False, seed=cfg.seed), str(run_dir), "model"))
            torch.set_rng_state(rng)
        point = shadow_step(pair_box[0], trainer, batch, fault)
        failed = sum(not c.passed for c in point.rows)
        out_stream.write(f"\nshadow step {point.step}: {'ok' if point.passed else 'FAIL'} "
                         f"({len(point.rows)} rows, {failed} failed, "
                         f"{point.seconds['total']:.1f}s)\n")
        out_stream.flush()
        return point

    try:
        trainer = _ShadowTrainer(replace(cfg, output_dir=str(work), eval_every=0), chosen, visit)
        result = trainer.train(out_stream)
        if result.interrupted:
            raise KeyboardInterrupt(f"shadow re-run stopped by {result.interrupted}")
        rerun = _load_checkpoint(work / CHECKPOINT)
        problems = checkpoint_differences(rerun, obj)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mismatches = [s for s, loss in sorted(trainer.losses.items())
                  if s in logged and loss != logged[s]]
    for point in trainer.points:
        point.logged_loss = logged.get(point.step, math.nan)
    every = (every or math.ceil(total / 10)) if steps is None else None
    return ShadowResult(run_dir, chosen, every, trainer.points, total, problems, mismatches,
                        fault, time.perf_counter() - began)


def _read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [e for e in read_log(path) if e.get("kind") == "train" and "loss" in e]


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def _write_frame(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def plot(result: ShadowResult, path: Path) -> None:
    """``shadow.png``: per point the largest error / floor ratio of the gradients, updates,
    moments, EMA and buffers (log scale), and the loss difference next to its floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.table()
    losses = result.losses()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for kind in PLOTTED:
        rows = table[table["kind"] == kind]
        if rows.empty:
            continue
        ratios = rows["ratio"].astype(float).clip(lower=1e-3, upper=1e12)  # inf: a zero floor
        top.plot(rows["step"], ratios, marker="o", label=kind)
    factor = tolerance("noise", "grad.").atol
    top.axhline(factor, color="grey", linestyle="--", linewidth=1,
                label=f"gradients' noise factor ({factor:g})")
    top.axhline(1.0, color="black", linestyle=":", linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("largest error / fp32 floor")
    title = f"shadow of {result.run_dir.name}"
    if result.fault:
        title += f" with fault {result.fault}"
    failed = [p.step for p in result.points if not p.passed]
    if failed:
        for step in failed:
            top.axvline(step, color="red", alpha=0.25)
        title += f" (failing points: {len(failed)}, first step {failed[0]})"
    top.set_title(title)
    top.legend(fontsize=8)
    bottom.plot(losses["step"], losses["loss_rel_diff"].clip(lower=1e-12), marker="o",
                label="|loss Jittor - torch| / torch")
    bottom.plot(losses["step"], losses["loss_floor"].clip(lower=1e-12), marker="x",
                label="|loss torch - float64| / float64")
    bottom.set_yscale("log")
    bottom.set_xlabel("training step (state before it)")
    bottom.set_ylabel("relative loss difference")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_outputs(result: ShadowResult, out: str | Path, command: list[str]) -> list[Path]:
    """Writes ``shadow.csv``, ``shadow_failures.csv``, ``shadow_losses.csv``,
    ``summary.json`` and ``shadow.png`` into ``out`` (created), each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "shadow.csv", out / "shadow_failures.csv", out / "shadow_losses.csv",
               out / "summary.json", out / "shadow.png"]
    _write_frame(result.table(), written[0])
    _write_frame(result.failures(), written[1])
    _write_frame(result.losses(), written[2])
    text = json.dumps(result.summary(command), indent=1, default=_json_value) + "\n"
    atomic_write(written[3], lambda tmp: tmp.write_text(text))
    plot(result, written[4])
    result.written = written
    return written


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    return str(value)


def format_result(result: ShadowResult) -> str:
    """A short console table (pandas): per point the loss error and its fp32 floor, the
    largest error / floor ratio of each plotted kind, and the verdict with the first failure."""
    from .tables import text_table

    table = result.table()
    lines = []
    for point in result.points:
        rows = table[table["step"] == point.step].set_index("kind")
        loss = point.loss_row()
        verdict = "ok" if point.passed else "FAIL: " + next(
            f"{c.path}: {c.reason}" for c in point.rows if not c.passed)
        lines.append({"step": point.step, "loss rel": loss["loss_rel_diff"],
                      "floor": loss["loss_floor"],
                      **{k: rows.loc[k, "ratio"] if k in rows.index else None for k in PLOTTED},
                      "verdict": verdict})
    frame = pd.DataFrame(lines, columns=["step", "loss rel", "floor", *PLOTTED, "verdict"])
    return text_table(frame, {"step": "d", "loss rel": ".2g", "floor": ".2g",
                              **{k: ".3g" for k in PLOTTED}})


def cmd_shadow(args: Any) -> int:
    """``rtdetr-parity shadow``: non-zero when a point fails or the re-run left the run's
    trajectory."""
    run_dir = Path(args.run_dir)
    default = f"shadow-{args.fault}" if args.fault else "shadow"
    out = Path(args.out) if args.out else run_dir / default
    print(f"rtdetr-parity shadow: {run_dir}" + (f", fault {args.fault}" if args.fault else ""),
          flush=True)
    command = ["rtdetr-parity", "shadow", str(run_dir), "--out", str(out)]
    if args.every is not None:
        command += ["--every", str(args.every)]
    if args.fault:
        command += ["--fault", args.fault]
    result = run_shadow(run_dir, args.every, args.fault)
    written = write_outputs(result, out, command)
    print(format_result(result))
    print("ratio: the kind's largest relative-L2 error over the reference's own fp32 error "
          "(float64 replay) at that point")
    for problem in result.rerun_problems[:10]:
        print(f"FAIL: the re-run's final checkpoint differs from the run's: {problem}")
    if result.loss_mismatches:
        print(f"FAIL: the re-run's loss differs from the run's log at steps "
              f"{result.loss_mismatches[:10]}")
    first = result.first_failing_step
    print(f"{len(result.points)} points over {result.total_steps} steps; "
          + ("all passed" if first is None else f"first failing step {first}")
          + f" (results: {', '.join(map(str, written))})")
    return 0 if result.passed else 1
