"""Two training runs compared from their logs: per-step total loss and per-epoch COCO AP.

The nightly train-both-and-compare job trains the same configuration (same data, seed and
initial weights) once with each trainer and compares the two ``log.jsonl`` files: the total
loss of the first steps (where fp32 rounding has not yet compounded, the two runs must agree
closely) and the AP after every evaluated epoch (the final APs must agree within a point).

A third, optional *control* run is the reference framework again with something that must
not matter changed (the thread count, hence the order of fp32 sums). Its distance from the
reference is the reference's own run-to-run spread: decisions made on near-ties (Hungarian
matches, top-k query selection) flip on rounding alone, so free-running trajectories part
after a few steps even within one framework. It is printed beside the targets, never
instead of them: the verdict stays the stated loss and AP targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rtdetr_common.run_log import read_log

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass
class RunComparison:
    """What :func:`compare_runs` measured.

    Attributes:
        reference: Folder of the reference (torch) run.
        test: Folder of the compared (Jittor) run.
        steps: Per logged step: ``step``, ``reference`` and ``test`` total loss, ``rel_diff``.
        epochs: Per epoch evaluated by both: ``epoch`` and ``<metric>_reference`` /
            ``<metric>_test`` for each of :data:`METRICS` (fractions, not points).
        train_seconds: Summed wall time of the common steps in each run (``reference``,
            ``test``).
        control: Folder of the control run, or None. With one, ``steps`` rows also hold
            ``control`` and ``control_rel_diff`` (control against reference), ``epochs`` rows
            ``<metric>_control``, and only steps and epochs all three runs share are kept.
    """

    reference: str
    test: str
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    train_seconds: dict[str, float] = field(default_factory=dict)
    control: str | None = None

    def max_loss_rel_diff(self, first: int) -> float:
        """Largest relative total-loss difference over the first ``first`` steps."""
        return max(s["rel_diff"] for s in self.steps[:first])

    def final_ap_points(self, run: str = "test") -> float:
        """``|AP_run - AP_reference|`` of the last common evaluation, in AP points.

        Args:
            run: ``test``, or ``control`` for the reference's own spread.
        """
        last = self.epochs[-1]
        return 100 * abs(last[f"AP_{run}"] - last["AP_reference"])

    def control_spread(self, first: int) -> str:
        """The control run against the reference, in the targets' terms (empty without one)."""
        if self.control is None:
            return ""
        worst = max(self.steps[:first], key=lambda s: s["control_rel_diff"])
        over = sum(s["control_rel_diff"] > s["rel_diff"] for s in self.steps[:first])
        text = (f"reference's own spread (control {self.control}): first {first} steps' worst "
                f"total-loss rel diff {worst['control_rel_diff']:.2e} at step {worst['step']} "
                f"(larger than the test's at {over} of {min(first, len(self.steps))} steps)")
        if self.epochs:
            text += f", final AP {self.final_ap_points('control'):.2f} points from the reference"
        return text

    def problems(self, first: int, loss_rtol: float, ap_points: float) -> list[str]:
        """What breaks the targets: loss agreement over the first steps, final AP gap."""
        out = []
        if len(self.steps) < first:
            out.append(f"only {len(self.steps)} common steps logged, {first} compared")
        elif self.max_loss_rel_diff(first) > loss_rtol:
            bad = [s["step"] for s in self.steps[:first] if s["rel_diff"] > loss_rtol]
            out.append(f"total loss differs by more than {loss_rtol:g} relative at steps {bad}")
        if not self.epochs:
            out.append("no epoch evaluated by both runs")
        elif self.final_ap_points() > ap_points:
            out.append(f"final AP differs by {self.final_ap_points():.2f} points > {ap_points:g}")
        return out


def _split(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"training log not found: {path}")
    entries = read_log(path)
    train = {e["step"]: e for e in entries if e.get("kind") == "train"}
    evals = {e["epoch"]: e for e in entries if e.get("kind") == "eval"}
    return train, evals


def _rel(value: float, reference: float) -> float:
    if reference:
        return abs(value - reference) / abs(reference)
    return 0.0 if value == reference else math.inf


def compare_runs(reference: str | Path, test: str | Path,
                 control: str | Path | None = None) -> RunComparison:
    """Reads ``log.jsonl`` of the run folders and pairs their steps and evaluations.

    Args:
        reference: The reference (torch) run.
        test: The compared (Jittor) run.
        control: Optional second reference run (see the module docstring).

    Raises:
        FileNotFoundError: If a folder has no ``log.jsonl``.
        ValueError: If the runs share no logged step.
    """
    names = {"reference": reference, "test": test} | ({} if control is None else
                                                        {"control": control})
    logs = {name: _split(Path(d) / "log.jsonl") for name, d in names.items()}
    common = sorted(set.intersection(*(set(train) for train, _ in logs.values())))
    if not common:
        raise ValueError(f"{' and '.join(str(d) for d in names.values())} share no logged "
                         "training step")
    result = RunComparison(str(reference), str(test),
                           control=None if control is None else str(control))
    for step in common:
        row = {"step": step, **{name: train[step]["loss"] for name, (train, _) in logs.items()}}
        row["rel_diff"] = _rel(row["test"], row["reference"])
        if control is not None:
            row["control_rel_diff"] = _rel(row["control"], row["reference"])
        result.steps.append(row)
    for epoch in sorted(set.intersection(*(set(evals) for _, evals in logs.values()))):
        result.epochs.append({"epoch": epoch, **{f"{m}_{name}": evals[epoch][m]
                                                 for name, (_, evals) in logs.items()
                                                 for m in METRICS}})
    ref_train, test_train = logs["reference"][0], logs["test"][0]
    result.train_seconds = {"reference": sum(ref_train[s]["seconds"] for s in common),
                            "test": sum(test_train[s]["seconds"] for s in common)}
    return result


def format_comparison(c: RunComparison, first: int) -> str:
    """The first steps' losses, every common evaluation, the summed step times and, with a
    control run, the reference's own spread (pandas tables)."""
    import pandas as pd

    from .tables import text_table

    runs = ["reference", "test"] + ([] if c.control is None else ["control"])
    head = f"reference {c.reference}  vs  test {c.test}"
    steps = pd.DataFrame({"step": [s["step"] for s in c.steps[:first]],
                          "reference loss": [s["reference"] for s in c.steps[:first]],
                          "test loss": [s["test"] for s in c.steps[:first]],
                          "rel diff": [s["rel_diff"] for s in c.steps[:first]]})
    if c.control is not None:
        steps["control loss"] = [s["control"] for s in c.steps[:first]]
        steps["control rel diff"] = [s["control_rel_diff"] for s in c.steps[:first]]
    label = "/".join({"reference": "ref"}.get(r, r) for r in runs)
    epochs = pd.DataFrame({"epoch": [e["epoch"] + 1 for e in c.epochs],
                           **{f"{m} {label}": ["/".join(f"{100 * e[f'{m}_{r}']:.2f}" for r in runs)
                                               for e in c.epochs] for m in METRICS}})
    lines = [head if c.control is None else f"{head}  (control {c.control})",
             text_table(steps, {"step": "d", "reference loss": ".6f", "test loss": ".6f",
                                "rel diff": ".2e", "control loss": ".6f",
                                "control rel diff": ".2e"}),
             text_table(epochs, {"epoch": "d"})]
    seconds = c.train_seconds
    lines.append(f"step time summed over the {len(c.steps)} common steps: reference "
                 f"{seconds['reference']:.0f} s, test {seconds['test']:.0f} s "
                 f"(test / reference {seconds['test'] / max(seconds['reference'], 1e-9):.2f})")
    if c.control is not None:
        lines.append(c.control_spread(first))
    return "\n".join(lines)
