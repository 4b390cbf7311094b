"""The report's plots: matplotlib (Agg), drawn from the report's tables only.

Every plot is written as a PNG without a timestamp or software tag, from figures built
without pyplot's global state, so the same tables give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Fixed drawing settings: the same on every machine that has the pinned matplotlib.
STYLE = {"svg.hashsalt": "rtdetr-parity", "font.family": "DejaVu Sans", "font.size": 9,
         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100, "savefig.dpi": 100,
         "path.simplify": False}
COLORS = {"torch": "#1f77b4", "jittor": "#d62728", "float64": "#2ca02c", "control": "#7f7f7f"}


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _positive(values: pd.Series) -> np.ndarray:
    """The values for a log axis: exact zeros (and missing values) left out as NaN."""
    arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    return np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)


def module_depth(per_module: pd.DataFrame, first_failures: dict[str, str | None],
                 limits: dict[str, dict[str, float]], path: Path) -> None:
    """Error along the network depth, one panel per pass (eval, train): each module's largest
    accumulated and isolated relative L2 in execution order, log scale, with the tolerance
    limits and the first divergence (the first failing module) marked.

    Args:
        per_module: Columns ``pass``, ``order``, ``module``, ``isolated``, ``accumulated``.
        first_failures: Per pass, the first failing module, or None.
        limits: Per pass, ``isolated`` and ``accumulated`` rel-L2 limits (may be missing).
        path: The PNG to write.
    """
    passes = [p for p in ("eval", "train") if (per_module["pass"] == p).any()]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(10, 3.2 * max(len(passes), 1)))
        axes = fig.subplots(max(len(passes), 1), 1, squeeze=False)[:, 0]
        for ax, name in zip(axes, passes):
            rows = per_module[per_module["pass"] == name].sort_values("order")
            x = np.arange(len(rows))
            zeros = int((pd.to_numeric(rows["isolated"], errors="coerce") == 0).sum())
            ax.plot(x, _positive(rows["accumulated"]), color=COLORS["jittor"], lw=1,
                    label="accumulated (fed its own upstream outputs)")
            ax.plot(x, _positive(rows["isolated"]), color=COLORS["torch"], lw=0, marker=".",
                    ms=3, label=f"isolated (fed the reference's inputs; {zeros} exact zeros not drawn)")
            for key, style in (("isolated", ":"), ("accumulated", "--")):
                limit = limits.get(name, {}).get(key)
                if limit is not None and math.isfinite(limit):
                    ax.axhline(limit, color="k", ls=style, lw=0.8, label=f"{key} limit {limit:g}")
            first = first_failures.get(name)
            if first is not None and (rows["module"] == first).any():
                at = int(np.flatnonzero(rows["module"].to_numpy() == first)[0])
                ax.axvline(at, color="#ff7f0e", lw=1.5, label=f"first divergence: {first}")
                title = f"{name}: first divergence at {first}"
            else:
                title = f"{name}: no module diverges"
            ax.set_yscale("log")
            ax.set_xlabel("module call, in execution order (backbone -> encoder -> decoder)")
            ax.set_ylabel("relative L2 error")
            ax.set_title(title)
            ax.legend(loc="upper left", fontsize=7)
        _save(fig, path)


def error_over_floor(ratios: dict[str, tuple[pd.Series, float | None]], what: str,
                     path: Path) -> None:
    """Histograms of error / fp32 floor (log10 bins), one per labelled series, each with its
    allowed noise factor marked."""
    series = {label: pd.to_numeric(r, errors="coerce").to_numpy(dtype=float)
              for label, (r, _) in ratios.items()}
    series = {label: v[np.isfinite(v)] for label, v in series.items()}
    logs = {label: np.log10(v[v > 0]) for label, v in series.items()}
    zeros = sum(int((v == 0).sum()) for v in series.values())
    drawn = [v for v in logs.values() if v.size]
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8, 3.2))
        ax = fig.subplots()
        if drawn:
            low = math.floor(min(v.min() for v in drawn) * 4) / 4
            high = math.ceil(max(v.max() for v in drawn) * 4) / 4 + 0.25
            bins = np.arange(low, high + 0.25, 0.25)
            colors = [COLORS["jittor"], COLORS["torch"], COLORS["control"], COLORS["float64"]]
            for (label, v), color in zip(logs.items(), colors * len(logs)):
                if v.size:
                    ax.hist(v, bins=bins, color=color, alpha=0.55, label=f"{label} ({v.size})")
                factor = ratios[label][1]
                if factor is not None:
                    ax.axvline(math.log10(factor), color=color, ls="--", lw=1,
                               label=f"{label} allowed: {factor:.3g} x the floor")
            ax.legend(loc="upper right", fontsize=7)
        ax.set_xlabel("log10(port error / reference's own fp32 error)")
        ax.set_ylabel("count")
        total = sum(v.size for v in series.values())
        ax.set_title(f"{what}\n({total} values; {zeros} exact zeros not drawn)")
        _save(fig, path)


def trajectory(steps: pd.DataFrame, path: Path) -> None:
    """Per-step total loss of both frameworks and the float64 replay (top), and the relative
    loss difference beside the reference's own fp32 error (bottom, log scale)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(8, 5.5))
        top, bottom = fig.subplots(2, 1, sharex=True)
        for col, name, marker in (("torch_loss", "torch", "o"), ("jittor_loss", "jittor", "x"),
                                  ("float64_loss", "float64", "+")):
            top.plot(steps["step"], steps[col], color=COLORS[name], marker=marker, lw=1,
                     label=f"{name} (fp64 replay of torch)" if name == "float64" else name)
        top.set_ylabel("total loss")
        top.legend(fontsize=7)
        top.set_title("training trajectory: same batches, same start")
        bottom.plot(steps["step"], _positive(steps["loss_rel_diff"]), color=COLORS["jittor"],
                    marker="x", lw=1, label="|jittor - torch| / |torch|")
        bottom.plot(steps["step"], _positive(steps["loss_floor"]), color=COLORS["float64"],
                    marker="+", lw=1, label="|torch - float64| / |float64| (fp32 floor)")
        bottom.plot(steps["step"], _positive(steps["weights_rel_l2"]), color=COLORS["control"],
                    marker=".", lw=1, label="weights rel L2 (jittor vs torch)")
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel("relative difference")
        bottom.legend(fontsize=7)
        _save(fig, path)


def mean_loss(ax: Any, curves: pd.DataFrame, colors: dict[str, str]) -> None:
    """Draws each role's training loss per step, the mean over its seeds."""
    steps = curves[curves["kind"] == "step"]
    for role, group in steps.groupby("role", sort=False):
        mean = group.groupby("step")["loss"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=colors.get(role, colors["control"]), lw=1,
                label=role)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)


def loss_difference(ax: Any, curves: pd.DataFrame, colors: dict[str, str]) -> None:
    """Draws, per step, each role's training loss minus the torch run's of the same seed: the
    mean over seeds as a line, the seeds' range shaded (curves that overlap on a loss plot
    part here, on the scale of their difference)."""
    steps = curves[curves["kind"] == "step"]
    wide = steps.pivot_table(index=["seed", "step"], columns="role", values="loss")
    if "torch" not in wide.columns:
        ax.text(0.5, 0.5, "no torch runs to subtract", ha="center", transform=ax.transAxes)
        return
    for role in [r for r in dict.fromkeys(curves["role"]) if r != "torch" and r in wide.columns]:
        diff = (wide[role] - wide["torch"]).unstack("seed")
        color = colors.get(role, colors["control"])
        ax.plot(diff.index, diff.mean(axis=1).to_numpy(), color=color, lw=1,
                label=f"{role} - torch (mean; shaded: range over {diff.shape[1]} seeds)")
        ax.fill_between(diff.index, diff.min(axis=1).to_numpy(), diff.max(axis=1).to_numpy(),
                        color=color, alpha=0.2, lw=0)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss - torch's (same seed)")
    ax.legend(fontsize=7)


def training_comparison(curves: pd.DataFrame, title: str, path: Path) -> None:
    """Loss per step (mean over seeds), its difference from torch's, and AP per epoch (each
    seed, mean line) of every role."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(14, 3.6))
        left, middle, right = fig.subplots(1, 3)
        roles = list(dict.fromkeys(curves["role"]))
        mean_loss(left, curves, COLORS)
        for role in roles:
            color = COLORS.get(role, COLORS["control"])
            epochs = curves[(curves["role"] == role) & (curves["kind"] == "epoch")]
            if not epochs.empty:
                for _, seed in epochs.groupby("seed"):
                    right.plot(seed["epoch"], seed["AP"], color=color, lw=0.5, alpha=0.4)
                mean = epochs.groupby("epoch")["AP"].mean()
                right.plot(mean.index, mean.to_numpy(), color=color, lw=2, marker="o", label=role)
        loss_difference(middle, curves, COLORS)
        right.set_xlabel("epoch")
        right.set_ylabel("AP (each seed; line: mean)")
        right.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        _save(fig, path)


def bench(rows: pd.DataFrame, path: Path) -> None:
    """Time and peak memory of both frameworks per benchmark task, as bars."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(10, 3.4))
        left, right = fig.subplots(1, 2)
        labels = [f"{r.task} {r.variant}\nbatch {r.batch} @ {r.size}" for r in rows.itertuples()]
        x = np.arange(len(rows))
        for ax, (t, j), unit in ((left, ("torch_min_s", "jittor_min_s"), "best time per run (s)"),
                                 (right, ("torch_peak_mb", "jittor_peak_mb"), "peak RSS (MiB)")):
            ax.bar(x - 0.2, rows[t], 0.4, color=COLORS["torch"], label="torch")
            ax.bar(x + 0.2, rows[j], 0.4, color=COLORS["jittor"], label="jittor")
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_ylabel(unit)
            ax.legend(fontsize=7)
        _save(fig, path)
