"""Two training runs compared from their logs: per-step total loss and per-epoch COCO AP.

The nightly train-both-and-compare job trains the same configuration (same data, seed and
initial weights) once with each trainer and compares the two ``log.jsonl`` files: the total
loss of the first steps (where fp32 rounding has not yet compounded, the two runs must agree
closely) and the AP after every evaluated epoch (the final APs must agree within a point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from rtdetr_common.train_config import read_log

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
    """

    reference: str
    test: str
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    train_seconds: dict[str, float] = field(default_factory=dict)

    def max_loss_rel_diff(self, first: int) -> float:
        """Largest relative total-loss difference over the first ``first`` steps."""
        return max(s["rel_diff"] for s in self.steps[:first])

    def final_ap_points(self) -> float:
        """``|AP_test - AP_reference|`` of the last common evaluation, in AP points."""
        last = self.epochs[-1]
        return 100 * abs(last["AP_test"] - last["AP_reference"])

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


def compare_runs(reference: str | Path, test: str | Path) -> RunComparison:
    """Reads ``log.jsonl`` of two run folders and pairs their steps and evaluations.

    Raises:
        FileNotFoundError: If a folder has no ``log.jsonl``.
        ValueError: If the runs share no logged step.
    """
    (ref_train, ref_eval), (test_train, test_eval) = (_split(Path(d) / "log.jsonl")
                                                      for d in (reference, test))
    common = sorted(set(ref_train) & set(test_train))
    if not common:
        raise ValueError(f"{reference} and {test} share no logged training step")
    result = RunComparison(str(reference), str(test))
    for step in common:
        r, t = ref_train[step]["loss"], test_train[step]["loss"]
        rel = abs(t - r) / abs(r) if r else (0.0 if t == r else math.inf)
        result.steps.append({"step": step, "reference": r, "test": t, "rel_diff": rel})
    for epoch in sorted(set(ref_eval) & set(test_eval)):
        row = {"epoch": epoch}
        for m in METRICS:
            row[f"{m}_reference"] = ref_eval[epoch][m]
            row[f"{m}_test"] = test_eval[epoch][m]
        result.epochs.append(row)
    result.train_seconds = {"reference": sum(ref_train[s]["seconds"] for s in common),
                            "test": sum(test_train[s]["seconds"] for s in common)}
    return result


def format_comparison(c: RunComparison, first: int) -> str:
    """The first steps' losses, every common evaluation and the summed step times."""
    lines = [f"reference {c.reference}  vs  test {c.test}",
             f"{'step':>5} {'reference loss':>15} {'test loss':>12} {'rel diff':>9}"]
    lines += [f"{s['step']:>5} {s['reference']:>15.6f} {s['test']:>12.6f} {s['rel_diff']:>9.2e}"
              for s in c.steps[:first]]
    lines.append(f"{'epoch':>5} " + " ".join(f"{m + ' ref/test':>17}" for m in METRICS))
    for e in c.epochs:
        lines.append(f"{e['epoch'] + 1:>5} " + " ".join(
            f"{100 * e[m + '_reference']:>8.2f}/{100 * e[m + '_test']:<8.2f}" for m in METRICS))
    seconds = c.train_seconds
    lines.append(f"step time summed over the {len(c.steps)} common steps: reference "
                 f"{seconds['reference']:.0f} s, test {seconds['test']:.0f} s "
                 f"(test / reference {seconds['test'] / max(seconds['reference'], 1e-9):.2f})")
    return "\n".join(lines)
