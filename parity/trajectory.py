"""Training trajectories: N official steps of both sides on fixed batches, against the
reference's own fp32 drift from its float64 replay; and the training part of ``check``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from scipy.stats import binom

import jittor_impl.checkpoint as jt_checkpoint
from jittor_impl.nn import trainable_parameters
from rtdetr_common.seeded import seeded_images, seeded_targets

from .check import CheckResult
from .compare import Comparison, compare_arrays
from .models import ModelPair
from .replay import Float64Replay, numpy_params, trainable
from .tolerances import tolerance
from .training import (TwoSteps, _check_batch, _rel_l2, add_rows, check_gradients,
                       check_optimizer_step)

# Target counts of the images of the fixed training batches; batch i starts at offset 3 * i,
# so the first batch of two images is (4, 0): one image without any target.
_COUNTS = (4, 0, 7, 2, 1, 5, 3, 6)
# Decisions judged by count from a trajectory's second step: their rows' path prefixes, and
# the kinds of the float64 replay's counts (Float64Replay.flip_counts).
_COUNTED = {"train.relu_gate.": "relu_gate", "train.sample_cell.": "sample_cell",
            "train.l1_sign": "l1_sign", "train.giou_corner": "giou_corner",
            "train.maxpool_argmax.": "maxpool_argmax",
            "train.decoder.topk_ind": "topk", "train.match.": "match"}
# The counted kinds that are choices among candidates rather than sides of a kink.
_CHOICES = ("topk", "match")


def training_sizes(size: int | tuple[int, int]) -> list[tuple[int, int]]:
    """The batch sizes of the training checks: ``(h, w)`` as given, and for a square size
    its two non-square neighbours (``(s, s + 64)``, ``(s + 64, s)``... alternately, as the
    batches cycle) so that a height/width swap shows in training as well."""
    if not isinstance(size, int):
        return [tuple(size)]
    return [(size, size + 64), (size + 64, size)]


def training_batches(num_classes: int, size: int | tuple[int, int], batch: int = 2,
                     count: int = 2, seed: int = 0) -> list[tuple[np.ndarray, list[dict]]]:
    """A small fixed set of seeded batches for the training checks.

    Args:
        num_classes: Class count of the targets.
        size: One int (batches alternate between the rectangles of :func:`training_sizes`)
            or ``(h, w)``.
        batch: Images per batch (>= 2).
        count: Number of distinct batches.
        seed: Offset of the images' and targets' seeds (0: the checks' own batches).

    Returns:
        ``count`` pairs ``(images [batch, 3, h, w], targets)``; image ``j`` of batch ``i``
        has ``_COUNTS[(3 * i + j) % 8]`` targets.
    """
    sizes = training_sizes(size)
    batches = []
    for i in range(count):
        counts = [_COUNTS[(3 * i + j) % len(_COUNTS)] for j in range(batch)]
        batches.append((seeded_images(batch, sizes[i % len(sizes)], seed=20 + i + 100 * seed),
                        seeded_targets(counts, num_classes, seed=40 + i + 100 * seed)))
    return batches


@dataclass
class TrajectoryStep:
    """Both sides (and the float64 replay of the reference) after one training step.

    Attributes:
        step: 1-based step number.
        torch_loss / jittor_loss / float64_loss: Total losses of the step's forward.
        loss_rel_diff: ``|jittor - torch| / |torch|``.
        loss_floor: ``|torch - float64| / |float64|``: the reference's own fp32 error.
        weights_rel_l2: ``||w_j - w_t|| / ||w_t||`` over all trainable parameters.
        max_param_rel_l2 / max_param / max_param_floor: The parameter drifting most, and its
            reference fp32 drift.
        worst_excess: Largest drift / floor among parameters past the ``trajectory.weights``
            entry (0 when none).
        tie_flips / tie_forced / tie_max_gap: Kink decisions of the step's forward the port
            set differently, how many were forced, and the largest reference ``|x|`` among them.
        tie_floor_flips: Kink decisions the float64 replay would have set differently from the
            fp32 reference in the same step (the reference's own count).
        seconds_torch / seconds_jittor: Wall time of each side's step.
    """

    step: int
    torch_loss: float
    jittor_loss: float
    float64_loss: float
    loss_rel_diff: float
    loss_floor: float
    weights_rel_l2: float
    max_param_rel_l2: float
    max_param: str
    max_param_floor: float
    worst_excess: float
    tie_flips: int
    tie_forced: int
    tie_max_gap: float
    tie_floor_flips: int
    seconds_torch: float
    seconds_jittor: float


@dataclass
class Trajectory:
    """An N-step training run of both sides on fixed batches."""

    variant: str
    size: tuple[int, int]
    batch: int
    steps: list[TrajectoryStep] = field(default_factory=list)
    drift: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    decisions: list[list[Comparison]] = field(default_factory=list)
    floor_flips: list[dict[str, int]] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One flat dict per step (for a table or CSV)."""
        return [dict(vars(s)) for s in self.steps]

    def comparisons(self) -> list[Comparison]:
        """``trajectory`` rows: each step's total loss, weight drift and forced decisions.

        A step's loss passes within the ``trajectory.loss`` entry or the ``noise`` factor of
        the reference's own fp32 loss error at that step; its weights when every parameter's
        drift is within the ``trajectory.weights`` entry or the ``noise`` factor of its
        reference fp32 drift. Decisions: the first step's are judged as in one step (counted,
        capped, banded). From the second step the sides start from states that differ by the
        earlier steps' rounding, so a decision's inputs differ by more than one step's noise
        and its band no longer separates ties; each kind of kink (max-pool argmaxes among
        them), the top-k selection and the Hungarian matches are then one row per step each,
        judged by its count against the float64 replay's own flips of that kind in that step
        (elements within a distance of a kink are as many as the distance is long, so a count
        grows as the drift of the kink's inputs, which the trajectory's ``noise`` factor
        bounds): both counts are samples of rare events, and the row fails when
        :func:`count_p_value` rejects "the port's rate is at most that factor times the
        replay's" at the ``decision.count`` level.
        """
        rows = []
        for s, drift, decisions, floor in zip(self.steps, self.drift, self.decisions,
                                              self.floor_flips):
            path = f"trajectory.step[{s.step}].loss"
            factor = tolerance("noise", path).atol
            c = compare_arrays(np.float64(s.jittor_loss), np.float64(s.torch_loss),
                               tolerance("trajectory", path), path)
            c.rel_l2 = s.loss_rel_diff
            if not c.passed and s.loss_rel_diff <= factor * s.loss_floor:
                c.passed = True
                c.reason = (f"rel diff {s.loss_rel_diff:.3g}: within {factor:g}x the "
                            f"reference's own fp32 loss error {s.loss_floor:.3g}")
            elif not c.passed:
                c.reason += f"; reference's own fp32 loss error {s.loss_floor:.3g}"
            rows.append(c)
            path = f"trajectory.step[{s.step}].weights"
            tol = tolerance("trajectory", path)
            factor = tolerance("noise", path).atol
            bad = {n: (d, f) for n, (d, f) in drift.items()
                   if d > tol.max_rel_l2 and d > factor * f}
            c = Comparison(path, (), (), "float64", "float64", rel_l2=s.max_param_rel_l2,
                           passed=not bad)
            if bad:
                name, (d, f) = max(bad.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-300))
                c.reason = (f"{len(bad)} parameters drift past rel L2 {tol.max_rel_l2:g} and "
                            f"{factor:g}x the reference's own fp32 error; worst {name}: "
                            f"{d:.3g} against {f:.3g}")
            rows.append(c)
            for d in decisions:
                if s.step == 1 or _counted_kind(d.path) is None:
                    rows.append(replace(d, path=f"trajectory.step[{s.step}].{d.path}"))
            if s.step > 1:
                rows += _kink_rows(s.step, decisions, floor)
        return rows


def _counted_kind(path: str) -> str | None:
    """The kind of a decision row judged by count from a trajectory's second step, else None."""
    return next((kind for prefix, kind in _COUNTED.items() if path.startswith(prefix)), None)


def count_p_value(port: int, replay: int, factor: float) -> float:
    """How likely a port count of at least ``port`` is beside a replay count of ``replay`` when
    the port's rate is ``factor`` times the replay's (the largest the rule allows): the exact
    conditional test of two Poisson rates (given both counts' sum, the replay's share is
    binomial with probability ``1 / (1 + factor)``)."""
    if port <= 0:
        return 1.0
    return float(binom.cdf(replay, port + replay, 1.0 / (1.0 + factor)))


def count_allowance(replay: int, factor: float, alpha: float, limit: int) -> int:
    """The largest port count, at most ``limit``, that :func:`count_p_value` does not reject at
    ``alpha`` beside a replay count of ``replay`` (the p-value falls as the port count grows)."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        if count_p_value(mid, replay, factor) >= alpha:
            low = mid
        else:
            high = mid - 1
    return low


def _kink_rows(step: int, decisions: list[Comparison], floor: dict[str, int]) -> list[Comparison]:
    """One counted row per kind of kink, and the top-k and match rows, of a later trajectory
    step (see :meth:`Trajectory.comparisons`); ``floor`` holds the float64 replay's flips per
    kind in this step."""
    rows = []
    for kind in dict.fromkeys(_COUNTED.values()):
        mine = [d for d in decisions if _counted_kind(d.path) == kind]
        if not mine:
            continue
        path = f"trajectory.step[{step}].ties.{kind}"
        compared = sum(d.compared or 0 for d in mine)
        flipped = sum(d.flipped or 0 for d in mine)
        replay = floor.get(kind, 0)
        factor = tolerance("noise", path).atol
        alpha = tolerance("decision.count", path).atol
        p_value = count_p_value(flipped, replay, factor)
        allowed = count_allowance(replay, factor, alpha, compared)
        c = Comparison(path, (compared,), (compared,), "bool", "bool", compared=compared,
                       flipped=flipped, forced=sum(d.forced or 0 for d in mine),
                       band=max((d.band or 0.0) for d in mine),
                       max_abs=max((d.max_abs for d in mine if d.flipped), default=0.0),
                       within=1.0 - flipped / max(compared, 1), passed=p_value >= alpha)
        c.reason = (f"{flipped} of {compared} flipped ({c.forced} forced); the float64 replay "
                    f"{replay}; p = {p_value:.3g} for a port rate {factor:g}x the replay's "
                    f"(fails below {alpha:g}): at most {allowed} pass")
        if allowed >= compared:
            c.reason += ("; saturated: the reference's own flips make every count noise here, "
                         "so this step cannot tell a port by its count")
        if not c.passed:
            worst = max(mine, key=lambda d: d.flipped or 0)
            c.reason += f"; most in {worst.path} ({worst.flipped})"
        rows.append(c)
    return rows


def run_trajectory(pair: ModelPair, batches: list[tuple[np.ndarray, list[dict]]],
                   steps: int = 10, on_step: Callable[[int], None] | None = None) -> Trajectory:
    """Trains both sides for ``steps`` official steps on ``batches`` (cycled).

    Both sides start from the reference's state (loaded into the Jittor model, buffers
    included). Each step is the engines' ``train_step`` with the official AdamW groups and
    clipping (no EMA: it does not feed back into training); the reference's decisions of each
    step are forced into the port and into a float64 replay of the reference, which gives the
    reference's own fp32 drift per step. ``on_step(i)`` is called after step ``i``.

    Raises:
        ValueError: Without batches, or with a batch of fewer than two images.
    """
    if not batches:
        raise ValueError("run_trajectory needs at least one batch")
    for images, _ in batches:
        _check_batch(images, "trajectory")
    pair.train()
    jt_checkpoint.load_state_dict_strict(
        pair.jittor_model, {k: v.numpy() for k, v in pair.torch_model.state_dict().items()},
        "run_trajectory: the reference's state")
    named_t = trainable(pair.torch_model)
    named_j = trainable_parameters(pair.jittor_model)
    replay = Float64Replay(pair)
    two_steps = TwoSteps(pair, replay)
    h, w = batches[0][0].shape[-2:]
    traj = Trajectory(pair.cfg.name, (int(h), int(w)), int(batches[0][0].shape[0]))
    weights_tol = tolerance("trajectory", "weights").max_rel_l2
    for i in range(steps):
        images, targets = batches[i % len(batches)]
        loss_t, loss_j, loss_64 = two_steps(images, targets)
        w_t, w_j, w_64 = numpy_params(named_t), numpy_params(named_j), replay.weights()
        drift = {n: (_rel_l2(w_j[n], w_t[n]), _rel_l2(w_t[n], w_64[n])) for n in w_t}
        worst = max(drift, key=lambda n: drift[n][0])
        diff2 = sum(float(np.sum((w_j[n] - w_t[n]) ** 2)) for n in w_t)
        norm2 = sum(float(np.sum(w_t[n] ** 2)) for n in w_t)
        kinks = [c for c in two_steps.rows if _counted_kind(c.path) not in (None, *_CHOICES)]
        floor = replay.flip_counts()
        traj.drift.append(drift)
        traj.decisions.append(two_steps.rows)
        traj.floor_flips.append(floor)
        traj.steps.append(TrajectoryStep(
            step=i + 1, torch_loss=loss_t, jittor_loss=loss_j, float64_loss=loss_64,
            loss_rel_diff=abs(loss_j - loss_t) / max(abs(loss_t), 1e-30),
            loss_floor=abs(loss_t - loss_64) / max(abs(loss_64), 1e-30),
            weights_rel_l2=math.sqrt(diff2 / norm2), max_param_rel_l2=drift[worst][0],
            max_param=worst, max_param_floor=drift[worst][1],
            worst_excess=max((d / max(f, 1e-300) for d, f in drift.values() if d > weights_tol),
                             default=0.0),
            tie_flips=sum(c.flipped or 0 for c in kinks),
            tie_forced=sum(c.forced or 0 for c in kinks),
            tie_max_gap=max((c.max_abs for c in kinks), default=0.0),
            tie_floor_flips=sum(n for kind, n in floor.items() if kind not in _CHOICES),
            seconds_torch=two_steps.seconds[0], seconds_jittor=two_steps.seconds[1]))
        if on_step is not None:
            on_step(i + 1)
    return traj


def run_training_checks(pair: ModelPair, size: int | tuple[int, int], batch: int = 2,
                        steps: int = 10, on_step: Callable[[int, int], None] | None = None,
                        ) -> tuple[CheckResult, Trajectory]:
    """Gradients, one optimizer step and an N-step trajectory of one model pair, in that
    order on the same pair (each from where the previous one left the weights).

    Args:
        pair: The model pair (trained in place).
        size: One int (rectangles around it, :func:`training_sizes`) or ``(h, w)``.
        batch: Images per batch (>= 2).
        steps: Trajectory length.
        on_step: Called as ``on_step(done, steps + 2)`` after the gradients, the optimizer
            step and each trajectory step.

    Returns:
        The rows and timings, and the trajectory (its :meth:`Trajectory.rows` make the table).
    """
    result = CheckResult(pair.cfg.name, pair.weights_source, size)
    batches = training_batches(pair.cfg.num_classes, size, batch)
    images, targets = batches[0]

    def done(count: int) -> None:
        if on_step is not None:
            on_step(count, steps + 2)

    done(0)
    start = time.perf_counter()
    add_rows(result, check_gradients(pair, images, targets))
    result.seconds["gradients"] = time.perf_counter() - start
    done(1)
    start = time.perf_counter()
    add_rows(result, check_optimizer_step(pair, images, targets))
    result.seconds["optimizer_step"] = time.perf_counter() - start
    done(2)
    start = time.perf_counter()
    trajectory = run_trajectory(pair, batches, steps, on_step=lambda i: done(2 + i))
    add_rows(result, trajectory.comparisons())
    result.seconds["trajectory"] = time.perf_counter() - start
    return result, trajectory
