"""Forcing the reference's discrete decisions into the port, and counting what forcing changed.

A train-mode forward makes discrete decisions: the encoder's top-k query selection, the
Hungarian matches of every decoder output, and at every kink of a piecewise function the side
an element lies on (ReLU gates, the bilinear cell a deformable-attention point samples from,
the sign of an L1 box difference, the element of a max-pool window that takes its gradient).
Where two fp32 implementations tie, rounding decides; so that rounding cannot send the two
sides down different branches, the reference records its decisions (:meth:`Forcing.recording`,
around the torch forward) and the port then takes the reference's side where the two tie
(:meth:`Forcing.forcing`, around the Jittor forward).

Every decision is a counted ``decision`` row: how many were compared, how many the port put
on the other side (``flipped``), how many of those were replaced by the reference's
(``forced``) and the band that decided what counts as a tie. A row fails on a flip outside
its band, on more forced flips than the ``decision.forced`` cap, and on a band wider than the
``decision.band`` share of the quantity's own scale: forcing may only settle ties.

One mechanism does all of it: an instance attribute shadowing a method (:func:`override`),
removed afterwards; the float64 replay (:mod:`parity.replay`) uses the same.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import jittor as jt
import numpy as np
import torch

import jittor_impl._kernels as jittor_kernels
import jittor_impl.backbone as jittor_backbone
import jittor_impl.decoder as jittor_decoder
import torch_ref.backbone as torch_backbone
import torch_ref.decoder as torch_decoder
from jittor_impl.nn import named_modules

from .check import ScoreCapture, decision_comparison
from .compare import Comparison
from .decisions import MatchCosts, compare_matches, matcher_costs
from .models import ModelPair, to_torch
from .tolerances import tolerance

# The robust statistic of the reference's own fp32 error that sets a tie band.
ERROR_QUANTILE = 0.999


@contextlib.contextmanager
def override(targets: list[tuple[Any, str, Callable]]) -> Iterator[None]:
    """Shadows ``obj.name`` by ``fn`` (an instance attribute) for each target, then removes it."""
    done = []
    try:
        for obj, name, fn in targets:
            if name in vars(obj):
                raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden")
            setattr(obj, name, fn)
            done.append((obj, name))
        yield
    finally:
        for obj, name in done:
            delattr(obj, name)


def robust_error(test: np.ndarray, reference: np.ndarray) -> float:
    """The :data:`ERROR_QUANTILE` quantile of ``|test - reference|`` (0 for empty arrays)."""
    diff = np.abs(np.asarray(test, np.float64) - np.asarray(reference, np.float64)).ravel()
    return float(np.quantile(diff, ERROR_QUANTILE)) if diff.size else 0.0


def allowed_forced(path: str, compared: int) -> float:
    """How many forced flips a decision row accepts: the ``decision.forced`` entry's count or
    share of the compared decisions, whichever is larger."""
    cap = tolerance("decision.forced", path)
    return max(cap.atol, cap.rtol * compared)


def judge_counts(c: Comparison, unforced: int = 0) -> Comparison:
    """Sets a counted decision row's verdict: no flip outside the band, forced flips within
    :func:`allowed_forced`; ``c.reason`` says which limit failed."""
    allowed = allowed_forced(c.path, c.compared or 0)
    failures = []
    if unforced:
        failures.append(f"{unforced} flips outside the band {c.band:.3g}")
    if (c.forced or 0) > allowed:
        failures.append(f"{c.forced} forced flips of {c.compared} exceed the cap {allowed:g}")
    c.passed = not failures and c.passed is not False
    counts = f"{c.flipped} of {c.compared} flipped, {c.forced} forced"
    c.reason = "; ".join([counts, *failures] + ([c.reason] if c.reason else []))
    return c


@dataclass
class Decisions:
    """The reference's discrete decisions of one forward, to force into another run.

    Attributes:
        rng_state: The torch model's shared stream before the forward (denoising noise).
        topk: Encoder top-k indices ``[bs, num_queries]``.
        matches: ``SetCriterion.last_indices`` of the reference criterion.
        ties: Kink path -> the reference's fp32 input of each call, in call order.
        scores: The encoder's class scores (max over classes) the top-k was chosen from.
        costs: Per match key, the cost matrices of each image the matches were chosen from.
    """

    rng_state: dict
    topk: np.ndarray
    matches: dict
    ties: dict[str, list[np.ndarray]]
    scores: np.ndarray | None = None
    costs: dict[str, list[np.ndarray]] = field(default_factory=dict)


class _Kinks(abc.ABC):
    """Forces the reference's side of a kink into the port where the two sides tie.

    Base of :class:`ReluGates`, :class:`L1Signs`, :class:`SampleCells` (which passes the
    cells to the port's own sampling instead) and :class:`MaxPoolArgmax` (which passes the
    windows' argmax to the port's own pooling backward). Each kinked call
    ``y = x * branch(x)`` is recorded on the reference side by name, in call order; the port's
    call of the same name and index returns its own result (its own kernel, forward and
    backward), except within the name's tie band (:meth:`band`), where it returns ``x`` times
    the reference's branch. The band is the decision entry's ``atol``, widened to the
    ``noise`` factor times the reference's own fp32 error at that name's inputs (its
    :data:`ERROR_QUANTILE` quantile) when the float64 replay has measured it.

    Attributes:
        reference: ``path -> [reference fp32 input of each call]``.
        test: ``path -> [the port's input of each call]``.
        flips: ``path -> count`` of elements on the other side, set by :meth:`decisions`.
        reference_error: ``path -> robust |fp32 - float64|`` of the reference's inputs.
    """

    prefix = ""
    what = ""
    # The quantity's own scale where it has a natural unit (pixels for cells); otherwise the
    # RMS of the reference's inputs.
    unit: float | None = None

    def __init__(self) -> None:
        self.reference: dict[str, list[np.ndarray]] = {}
        self.test: dict[str, list[jt.Var]] = {}
        self.flips: dict[str, int] = {}
        self.reference_error: dict[str, float] = {}

    @staticmethod
    @abc.abstractmethod
    def branch(x: np.ndarray) -> np.ndarray:
        """The side of the kink of each element (numpy)."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every kink name a decision row is reported for."""

    @abc.abstractmethod
    def _recorders(self) -> list[tuple[Any, str, Callable]]:
        """The reference-side overrides that record each call."""

    @abc.abstractmethod
    def _forcers(self) -> list[tuple[Any, str, Callable]]:
        """The port-side overrides that force ties."""

    @classmethod
    def path(cls, name: str) -> str:
        """The decision path of kink ``name``."""
        return f"{cls.prefix}.{name}"

    def recording(self) -> contextlib.AbstractContextManager:
        """Records the reference's calls (forgetting earlier ones)."""
        self.reference.clear()
        return override(self._recorders())

    def forcing(self) -> contextlib.AbstractContextManager:
        """Forces ties into the port's calls (forgetting earlier ones)."""
        self.test.clear()
        return override(self._forcers())

    def set_reference_error(self, errors: dict[str, float] | None) -> None:
        """Per path, the reference's robust fp32 error (from :class:`~parity.replay.
        Float64Replay`); widens :meth:`band`. Call before the port runs."""
        self.reference_error = dict(errors or {})

    def band(self, path: str) -> float:
        """``|x|`` up to which an element is a tie (forced to the reference's side)."""
        band = tolerance("decision", path).atol
        if path in self.reference_error:
            band = max(band, tolerance("noise", path).atol * self.reference_error[path])
        return band

    def scale(self, path: str) -> float:
        """The quantity's own scale: :attr:`unit`, else the RMS of the reference's inputs."""
        if self.unit is not None:
            return self.unit
        calls = self.reference.get(path, [])
        n = sum(r.size for r in calls)
        return float(np.sqrt(sum(float(np.sum(np.square(r, dtype=np.float64))) for r in calls)
                             / n)) if n else 0.0

    def _record(self, name: str, x: np.ndarray) -> None:
        self.reference.setdefault(self.path(name), []).append(x)

    def _force(self, name: str, x: jt.Var, own: jt.Var) -> jt.Var:
        """The port's kinked call: its own result ``own`` (forward and gradient), except at
        the ties, where it is ``x`` times the reference's branch."""
        reference = self._take_call(name, x)
        tie = self._ties(name, reference)
        if not tie.any():
            return own
        forced = jt.array(np.where(tie, self.branch(reference), 0).astype(np.float32))
        return own * jt.array((~tie).astype(np.float32)) + x * forced

    def _ties(self, name: str, reference: np.ndarray) -> np.ndarray:
        return np.abs(reference) <= self.band(self.path(name))

    def _take_call(self, name: str, x: jt.Var) -> np.ndarray:
        """Records the port's next call of ``name``; returns the reference's input of it."""
        path = self.path(name)
        calls = self.test.setdefault(path, [])
        recorded = self.reference.get(path, [])
        if len(calls) >= len(recorded):
            raise ValueError(f"Jittor {self.what} {name!r} called {len(calls) + 1} times, the "
                             f"reference's only {len(recorded)} times")
        reference = recorded[len(calls)]
        if tuple(x.shape) != reference.shape:
            raise ValueError(f"Jittor {self.what} {name!r} call {len(calls)}: input shape "
                             f"{tuple(x.shape)} != reference {reference.shape}")
        calls.append(x)
        return reference

    def _flipped(self, reference: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Which elements the port put on the other side of the kink than the reference."""
        return self.branch(reference) != self.branch(test)

    def _flip_gaps(self, path: str, reference: list[np.ndarray],
                   test: list[np.ndarray]) -> list[np.ndarray]:
        """Per call, the reference's distance from the kink of every flipped decision."""
        return [np.abs(r[self._flipped(r, t)]) for r, t in zip(reference, test)]

    @staticmethod
    def _compared(reference: list[np.ndarray]) -> int:
        """How many decisions the reference's calls made."""
        return sum(r.size for r in reference)

    @staticmethod
    def _errors(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
        """``|port - reference|`` of every input element of a call."""
        return np.abs(np.asarray(test, np.float64) - np.asarray(reference, np.float64))

    def port_error(self, reference: list[np.ndarray], test: list[np.ndarray]) -> float:
        """The port's robust error at the kink's inputs: the :data:`ERROR_QUANTILE` quantile
        of :meth:`_errors` over every call (the statistic the band is made of)."""
        errors = [self._errors(r, t).ravel() for r, t in zip(reference, test)]
        errors = np.concatenate(errors) if errors else np.zeros(0)
        return float(np.quantile(errors, ERROR_QUANTILE)) if errors.size else 0.0

    def decisions(self) -> list[Comparison]:
        """One counted ``decision`` row per kink name, all its calls pooled.

        ``max_abs`` is the largest reference ``|x|`` among the flipped elements. The row
        fails on forced flips beyond :func:`allowed_forced`, on a band wider than the
        ``decision.band`` share of :meth:`scale`, and on flips outside the band, unless they
        are the tail the band's own statistic leaves: the band is the noise factor times a
        quantile of the reference's error, so a share ``1 - ERROR_QUANTILE`` of a correct
        port's errors may exceed it. Flips outside the band are accepted when the port's
        error at the kink's inputs, at that quantile (:meth:`port_error`), lies within the
        band, and they are no more than :func:`allowed_forced` (at least that share).
        """
        rows = []
        for name in self.names():
            path = self.path(name)
            ref = self.reference.get(path, [])
            test = [x.numpy() for x in self.test.get(path, [])]
            size = sum(r.size for r in ref)
            c = Comparison(path, (size,), (sum(t.size for t in test),), "bool", "bool",
                           compared=size, band=self.band(path))
            if len(ref) != len(test):
                c.reason = f"called {len(test)} times in Jittor, {len(ref)} times in torch"
                rows.append(c)
                continue
            flipped = self._flip_gaps(path, ref, test)
            c.compared = size = self._compared(ref)
            c.flipped = self.flips[path] = sum(f.size for f in flipped)
            c.forced = sum(int(np.sum(f <= c.band)) for f in flipped)
            c.max_abs = max((float(f.max()) for f in flipped if f.size), default=0.0)
            c.within = 1.0 - c.flipped / max(size, 1)
            scale, share = self.scale(path), tolerance("decision.band", path).atol
            c.passed = None
            if size and c.band > share * scale:
                c.passed = False
                c.reason = (f"band {c.band:.3g} exceeds {share:g} of the quantity's scale "
                            f"{scale:.3g}: forcing there is not settling ties")
            unforced = c.flipped - c.forced
            if unforced:
                error = self.port_error(ref, test)
                if error <= c.band and unforced <= allowed_forced(path, size):
                    tail = (f"{unforced} flips outside the band: its quantile's tail (the "
                            f"port's error at that quantile {error:.3g} is within it)")
                    c.reason = "; ".join(filter(None, [c.reason, tail]))
                    unforced = 0
            rows.append(judge_counts(c, unforced=unforced))
        return rows

    @classmethod
    def replay(cls, path: str, x: torch.Tensor, reference: np.ndarray,
               band: float | None = None) -> torch.Tensor:
        """A replay's kinked call: the fp32 reference's side within ``band`` (default the
        decision entry's ``atol``), its own elsewhere."""
        tie = np.abs(reference) <= (tolerance("decision", path).atol if band is None else band)
        own = x.detach().numpy()
        return x * torch.from_numpy(np.where(tie, cls.branch(reference), cls.branch(own)))

    @classmethod
    def replay_flips(cls, x: torch.Tensor, reference: np.ndarray) -> np.ndarray:
        """``|reference|`` where a replay's own side differs from the fp32 reference's."""
        own = x.detach().numpy()
        return np.abs(reference[cls.branch(reference) != cls.branch(own)])


class ReluGates(_Kinks):
    """ReLU gates: every ``ReLU`` module of the torch model records its inputs in call order
    (a module called several times records each call); the same-named ``ReLU`` of the Jittor
    model runs its own ReLU, with the reference's gate at the ties. Paths are ``train.relu_gate.<module name>``.

    Raises:
        ValueError: When the two models' ReLU modules have different names.
    """

    prefix = "train.relu_gate"
    what = "ReLU"

    def __init__(self, pair: ModelPair) -> None:
        super().__init__()
        self.torch_modules = {name: m for name, m in pair.torch_model.named_modules()
                              if isinstance(m, torch.nn.ReLU)}
        self.jittor_modules = {name: m for name, m in named_modules(pair.jittor_model)
                               if isinstance(m, jt.nn.ReLU)}
        _same_names(self.torch_modules, self.jittor_modules, "ReLU modules")

    @staticmethod
    def branch(x: np.ndarray) -> np.ndarray:
        return x > 0

    def names(self) -> list[str]:
        return list(self.torch_modules)

    def _recorders(self) -> list:
        def record(name: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            self._record(name, x.detach().numpy().copy())
            return type(m).forward(m, x)
        return [(m, "forward", lambda x, name=name, m=m: record(name, m, x))
                for name, m in self.torch_modules.items()]

    def _forcers(self) -> list:
        return [(m, "execute", lambda x, name=name, m=m: self._force(name, x, type(m).execute(m, x)))
                for name, m in self.jittor_modules.items()]


class L1Signs(_Kinks):
    """Signs of the L1 box-loss differences (gradient ``sign(pred - target)``), computed by
    both criteria through ``SetCriterion.l1_distance``: the torch criterion records each
    call, the Jittor one computes its own, with the reference's sign at the ties. The
    path is ``train.l1_sign.loss_bbox``.
    """

    prefix = "train.l1_sign"
    what = "L1 box loss"
    name = "loss_bbox"

    def __init__(self, torch_criterion: torch.nn.Module, jittor_criterion: Any) -> None:
        super().__init__()
        self.criteria = (torch_criterion, jittor_criterion)

    @staticmethod
    def branch(x: np.ndarray) -> np.ndarray:
        return np.sign(x)

    def names(self) -> list[str]:
        return [self.name]

    def _recorders(self) -> list:
        criterion = self.criteria[0]

        def record(src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self._record(self.name, (src - target).detach().numpy().copy())
            return type(criterion).l1_distance(criterion, src, target)
        return [(criterion, "l1_distance", record)]

    def _forcers(self) -> list:
        criterion = self.criteria[1]
        return [(criterion, "l1_distance", lambda src, target: self._force(
            self.name, src - target, type(criterion).l1_distance(criterion, src, target)))]


def corner_giou(boxes1: Any, boxes2: Any, upper: Any, clamp: Callable[[Any], Any]) -> Any:
    """Pairwise generalized IoU ``[N, M]`` of ``xyxy`` boxes with each corner's choice given:
    ``upper`` (``[N, M, 4]``, 1 where ``boxes1``'s coordinate is the larger) picks the side of
    every ``max`` / ``min`` of the intersection and the enclosing box, and so which box the
    gradient reaches. The same arithmetic for torch tensors and Jittor Vars (``clamp``: the
    framework's clamp at 0)."""
    a, b = boxes1[:, None, :], boxes2[None, :, :]
    high = upper * a + (1 - upper) * b  # max of each coordinate pair
    low = (1 - upper) * a + upper * b  # min
    inter_wh = clamp(low[:, :, 2:] - high[:, :, :2])
    inter = inter_wh[:, :, 0] * inter_wh[:, :, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1[:, None] + area2[None, :] - inter
    enclosing_wh = clamp(high[:, :, 2:] - low[:, :, :2])
    enclosing = enclosing_wh[:, :, 0] * enclosing_wh[:, :, 1]
    return inter / union - (enclosing - union) / enclosing


class GiouCorners(_Kinks):
    """Corners of the GIoU box loss: each ``max`` / ``min`` of a coordinate pair (intersection
    and enclosing box) sends the gradient to one of the two boxes, decided by the sign of
    ``boxes1 - boxes2``. Both criteria compute the GIoU matrix of the matched predictions
    and targets through ``SetCriterion.generalized_iou`` and use its diagonal, so the
    decisions are those of the matched pairs: the torch criterion records each call's
    ``boxes1[i] - boxes2[i]``, the Jittor one computes its own GIoU and, where a difference
    ties, takes the gradient of the reference's corners (:func:`corner_giou`; the other pairs
    keep their own). A ``max`` is continuous at its kink, so the value stays the port's own
    and forcing moves the gradient only (forcing the value as well would, within the wide
    bands of a drifted trajectory, swap corners whole box gaps apart). The path is
    ``train.giou_corner.loss_giou``.
    """

    prefix = "train.giou_corner"
    what = "GIoU box loss"
    name = "loss_giou"

    def __init__(self, torch_criterion: torch.nn.Module, jittor_criterion: Any) -> None:
        super().__init__()
        self.criteria = (torch_criterion, jittor_criterion)

    @staticmethod
    def branch(x: np.ndarray) -> np.ndarray:
        return x > 0

    @staticmethod
    def differences(boxes1: Any, boxes2: Any) -> Any:
        """``boxes1[i] - boxes2[i]`` of the matched pairs, ``[N, 4]``.

        Raises:
            ValueError: If the two sets differ in size (no matched pairs).
        """
        if tuple(boxes1.shape) != tuple(boxes2.shape):
            raise ValueError(f"GIoU of matched pairs needs boxes of one shape, got "
                             f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
        return boxes1 - boxes2

    @classmethod
    def corners(cls, boxes1: np.ndarray, boxes2: np.ndarray, matched: np.ndarray) -> np.ndarray:
        """The ``upper`` of :func:`corner_giou` (bool ``[N, N, 4]``): every pair's own
        corners, the matched pairs' (the diagonal) taken from ``matched`` (``[N, 4]`` bool),
        except where those would leave the pair's enclosing box empty (a tie band as wide as
        the boxes' gap): there the pair keeps its own."""
        upper = cls.branch(boxes1[:, None, :] - boxes2[None, :, :])
        index = np.arange(len(matched))
        high = np.where(matched, boxes1, boxes2)
        low = np.where(matched, boxes2, boxes1)
        empty = np.any(high[:, 2:] - low[:, :2] <= 0, axis=1)
        upper[index, index] = np.where(empty[:, None], upper[index, index], matched)
        return upper

    def names(self) -> list[str]:
        return [self.name]

    def _recorders(self) -> list:
        criterion = self.criteria[0]

        def record(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
            self._record(self.name, self.differences(boxes1, boxes2).detach().numpy().copy())
            return type(criterion).generalized_iou(criterion, boxes1, boxes2)
        return [(criterion, "generalized_iou", record)]

    def _forcers(self) -> list:
        criterion = self.criteria[1]

        def force(boxes1: jt.Var, boxes2: jt.Var) -> jt.Var:
            own = type(criterion).generalized_iou(criterion, boxes1, boxes2)
            d = self.differences(boxes1, boxes2)
            reference = self._take_call(self.name, d)
            tie = self._ties(self.name, reference)
            if not tie.any():
                return own
            matched = np.where(tie, self.branch(reference), self.branch(d.numpy()))
            upper = self.corners(boxes1.numpy(), boxes2.numpy(), matched)
            forced = corner_giou(boxes1, boxes2, jt.array(upper.astype(np.float32)),
                                 lambda x: x.clamp(min_v=0))
            return own.detach() + (forced - forced.detach())  # own value, forced gradient
        return [(criterion, "generalized_iou", force)]

    @classmethod
    def replay_giou(cls, path: str, boxes1: torch.Tensor, boxes2: torch.Tensor,
                    reference: np.ndarray, band: float | None = None) -> torch.Tensor:
        """A replay's GIoU: its own value, with the gradient of the fp32 reference's corners
        within ``band`` (default the decision entry's ``atol``) and of its own elsewhere."""
        own = cls.differences(boxes1, boxes2).detach().numpy()
        tie = np.abs(reference) <= (tolerance("decision", path).atol if band is None else band)
        matched = np.where(tie, cls.branch(reference), cls.branch(own))
        a, b = boxes1.detach().numpy(), boxes2.detach().numpy()
        clamp = lambda x: x.clamp(min=0)  # noqa: E731
        value = corner_giou(boxes1, boxes2, torch.from_numpy(cls.corners(a, b, cls.branch(own))
                                                             .astype(own.dtype)), clamp)
        forced = corner_giou(boxes1, boxes2,
                             torch.from_numpy(cls.corners(a, b, matched).astype(own.dtype)), clamp)
        return value.detach() + (forced - forced.detach())


def cell_offsets(locations: np.ndarray,
                 spatial_shapes: list) -> tuple[np.ndarray, np.ndarray]:
    """Where each deformable-attention sampling point lies against the nearest cell edge.

    The pixel coordinate is computed as torch's ``grid_sample`` computes it
    (``align_corners=False``) from the grid ``2 * loc - 1``, in the locations' own precision:
    ``pos = ((grid + 1) * size - 1) / 2``; its ``floor`` picks the bilinear cell.

    Args:
        locations: ``[bs, len_q, n_head, n_levels, n_points, 2]`` normalised ``(x, y)``.
        spatial_shapes: ``[(h, w), ...]`` of the levels.

    Returns:
        ``pos - edge`` and ``edge = round(pos)``: the cell is ``edge`` where the offset is
        ``>= 0``, ``edge - 1`` where it is negative.
    """
    dtype = locations.dtype.type
    sizes = np.array([[w, h] for h, w in spatial_shapes], dtype=dtype)  # [n_levels, 2]
    sizes = sizes.reshape(1, 1, 1, len(spatial_shapes), 1, 2)
    grid = dtype(2) * locations - dtype(1)
    pos = ((grid + dtype(1)) * sizes - dtype(1)) / dtype(2)
    edge = np.round(pos)
    return pos - edge, edge


class SampleCells(_Kinks):
    """Bilinear sampling cells of the deformable attention, in pixels of the point's level.

    Every ``MSDeformableAttention.sample`` of the torch model records the offsets of its
    points from the nearest edge (:func:`cell_offsets`); the same-named Jittor module samples
    with explicit cells: the reference's within the band, its own elsewhere, with the
    bilinear weights of its own coordinate. Offsets are from each side's own nearest edge, so
    the reference's cell is taken from the reference's edge (:meth:`_reference_edge`). Paths
    are ``train.sample_cell.<module name>``.

    Raises:
        ValueError: When the two models' deformable-attention modules have different names.
    """

    prefix = "train.sample_cell"
    what = "deformable attention"
    unit = 1.0

    def __init__(self, pair: ModelPair) -> None:
        super().__init__()
        self.torch_modules = {name: m for name, m in pair.torch_model.named_modules()
                              if isinstance(m, torch_decoder.MSDeformableAttention)}
        self.jittor_modules = {name: m for name, m in named_modules(pair.jittor_model)
                               if isinstance(m, jittor_decoder.MSDeformableAttention)}
        _same_names(self.torch_modules, self.jittor_modules, "deformable attention modules")

    @staticmethod
    def branch(x: np.ndarray) -> np.ndarray:
        return x >= 0

    def names(self) -> list[str]:
        return list(self.torch_modules)

    @staticmethod
    def _reference_edge(reference: np.ndarray, offsets: np.ndarray, edge: np.ndarray) -> np.ndarray:
        """The reference's nearest edge, from the port's (the positions differ by far less
        than half a pixel, the nearest edges by at most one)."""
        return edge + np.round(offsets - reference)

    @staticmethod
    def _errors(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Distance between the two sides' points, each offset from its own nearest edge."""
        d = np.asarray(test, np.float64) - np.asarray(reference, np.float64)
        return np.abs(d - np.round(d))

    def _flipped(self, reference: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Other cell: ``edge - 1 + branch`` differs, each from its own nearest edge."""
        return np.round(test - reference) + self.branch(reference) != self.branch(test)

    def _recorders(self) -> list:
        def record(name: str, m: torch.nn.Module, value, shapes, locations, weights):
            self._record(name, cell_offsets(locations.detach().numpy(), shapes)[0])
            return type(m).sample(m, value, shapes, locations, weights)
        return [(m, "sample", lambda v, s, loc, w, name=name, m=m: record(name, m, v, s, loc, w))
                for name, m in self.torch_modules.items()]

    def _jittor_sample(self, name: str, m: Any, value: jt.Var, shapes: list,
                       locations: jt.Var, weights: jt.Var) -> jt.Var:
        offsets, edge = cell_offsets(locations.numpy(), shapes)
        reference = self._take_call(name, jt.array(offsets))
        tie = self._ties(name, reference)
        cells = np.where(tie, self._reference_edge(reference, offsets, edge) - 1 + self.branch(reference),
                         edge - 1 + self.branch(offsets))
        return type(m).sample(m, value, shapes, locations, weights, jt.array(cells.astype(np.int32)))

    def _forcers(self) -> list:
        return [(m, "sample", lambda v, s, loc, w, name=name, m=m: self._jittor_sample(name, m, v, s, loc, w))
                for name, m in self.jittor_modules.items()]

    @classmethod
    def replay_locations(cls, path: str, locations: torch.Tensor, shapes: list,
                         reference: np.ndarray, band: float | None = None) -> tuple[torch.Tensor, float]:
        """A replay's locations: within ``band`` (default the decision entry's ``atol``) of an edge, a
        point on the other side than the fp32 reference's is moved across it (the gradient is
        unchanged: the shift is a constant) by a nudge its dtype resolves: 8 epsilons of the
        largest level side in pixels, at least 1e-9 px; elsewhere they are its own.

        Returns:
            The locations to sample, the robust distance between their pixel coordinates
            and the fp32 reference's (the reference's own error at this path), and
            ``|reference|`` (the distance to the edge) of every point on the other side.
        """
        offsets, edge = cell_offsets(locations.detach().numpy(), shapes)
        reference_edge = cls._reference_edge(reference, offsets, edge)
        position = offsets + edge
        own = position - reference_edge
        tie = np.abs(reference) <= (tolerance("decision", path).atol if band is None else band)
        other = cls.branch(reference) != cls.branch(own)
        wrong = tie & other
        nudge = max(1e-9, 8 * float(torch.finfo(locations.dtype).eps) * max(max(s) for s in shapes))
        target = reference_edge + np.where(cls.branch(reference), nudge, -nudge)
        sizes = np.array([[w, h] for h, w in shapes], np.float64).reshape(1, 1, 1, len(shapes), 1, 2)
        shift = np.where(wrong, (target - position) / sizes, 0.0)
        return (locations + torch.from_numpy(shift).to(locations.dtype), robust_error(own, reference),
                np.abs(reference[other]))


class _ForcedMaxPool2d(jittor_kernels._MaxPool2d):
    """The port's max-pool kernel (its own maxima) whose backward sends each window's gradient
    to the element ``choose(own argmax)`` returns."""

    def execute(self, x: jt.Var, header: str, shape: tuple, choose: Callable) -> jt.Var:
        y = super().execute(x, header, shape)
        size, own, header = self.saved
        self.saved = (size, jt.array(choose(own.numpy())), header)
        return y

    def grad(self, grad_y: jt.Var) -> tuple:
        return (*super().grad(grad_y), None)


class MaxPoolArgmax(_Kinks):
    """The element of each window of the backbone's stem max pooling that takes the window's
    gradient (its first maximum).

    Every ``PResNet.stem_pool`` of the torch model records its input in call order; the
    same-named Jittor backbone pools with its own kernel (its own maxima, so its forward values
    are its own) and sends each window's gradient to its own argmax, except where the
    reference's values at the reference's argmax and at the port's differ by no more than the
    band: there it sends it to the reference's. A window's distance from the kink is that gap
    on the reference's input (0 where the two agree). Paths are
    ``train.maxpool_argmax.<module name>``.

    Attributes:
        own: ``path -> [the port's own argmax of each call]``.

    Raises:
        ValueError: When the two models' backbones have different names.
    """

    prefix = "train.maxpool_argmax"
    what = "stem max pool"

    def __init__(self, pair: ModelPair) -> None:
        super().__init__()
        self.own: dict[str, list[np.ndarray]] = {}
        self.torch_modules = {name: m for name, m in pair.torch_model.named_modules()
                              if isinstance(m, torch_backbone.PResNet)}
        self.jittor_modules = {name: m for name, m in named_modules(pair.jittor_model)
                               if isinstance(m, jittor_backbone.PResNet)}
        _same_names(self.torch_modules, self.jittor_modules, "PResNet backbones")

    @staticmethod
    def branch(x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Each window's first maximum (torch's rule), a flat index into its plane."""
        x = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        return torch.nn.functional.max_pool2d(x, **torch_backbone.PResNet.STEM_POOL,
                                              return_indices=True)[1].numpy()

    @staticmethod
    def gap(reference: np.ndarray, chosen: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Per window, ``reference`` at index ``chosen`` minus at ``other`` (flat plane indices)."""
        b, c = reference.shape[:2]
        planes = np.asarray(reference, np.float64).reshape(b, c, -1)
        at = [np.take_along_axis(planes, i.reshape(b, c, -1), 2).reshape(i.shape) for i in (chosen, other)]
        return at[0] - at[1]

    def names(self) -> list[str]:
        return list(self.torch_modules)

    def forcing(self) -> contextlib.AbstractContextManager:
        self.own.clear()
        return super().forcing()

    def _recorders(self) -> list:
        def record(name: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            self._record(name, x.detach().numpy().copy())
            return type(m).stem_pool(m, x)
        return [(m, "stem_pool", lambda x, name=name, m=m: record(name, m, x))
                for name, m in self.torch_modules.items()]

    def _jittor_pool(self, name: str, m: Any, x: jt.Var) -> jt.Var:
        if jt.flags.use_cuda:
            raise RuntimeError("forcing the max-pool argmax needs the port's CPU kernel; "
                               "run the training checks on CPU")
        path = self.path(name)
        reference = self._take_call(name, x)
        chosen = self.branch(reference)

        def choose(own: np.ndarray) -> np.ndarray:
            self.own.setdefault(path, []).append(own.copy())
            tie = self.gap(reference, chosen, own) <= self.band(path)
            return np.where(tie, chosen, own).astype(np.int32)
        header, shape = jittor_kernels._pool_geometry("max_pool2d", x, ceil_mode=False, **m.STEM_POOL)
        return _ForcedMaxPool2d.apply(x, header, shape, choose)

    def _forcers(self) -> list:
        return [(m, "stem_pool", lambda x, name=name, m=m: self._jittor_pool(name, m, x))
                for name, m in self.jittor_modules.items()]

    def _flip_gaps(self, path: str, reference: list[np.ndarray],
                   test: list[np.ndarray]) -> list[np.ndarray]:
        gaps = []
        for r, own in zip(reference, self.own.get(path, [])):
            chosen = self.branch(r)
            gaps.append(self.gap(r, chosen, own)[chosen != own])
        return gaps

    @classmethod
    def _compared(cls, reference: list[np.ndarray]) -> int:
        return sum(cls.branch(r).size for r in reference)

    @classmethod
    def replay(cls, path: str, x: torch.Tensor, reference: np.ndarray,
               band: float | None = None) -> torch.Tensor:
        """A replay's pooling: each window's value at the fp32 reference's argmax where the
        reference's gap to the replay's own is within ``band`` (default the decision entry's
        ``atol``), at its own elsewhere."""
        own, chosen = cls.branch(x), cls.branch(reference)
        tie = cls.gap(reference, chosen, own) <= (tolerance("decision", path).atol if band is None else band)
        index = torch.from_numpy(np.where(tie, chosen, own))
        return x.flatten(2).gather(2, index.flatten(2)).view(index.shape)

    @classmethod
    def replay_flips(cls, x: torch.Tensor, reference: np.ndarray) -> np.ndarray:
        """The reference's gap of every window whose argmax in the replay differs from the
        fp32 reference's."""
        own, chosen = cls.branch(x), cls.branch(reference)
        return cls.gap(reference, chosen, own)[chosen != own]


def _same_names(torch_modules: dict, jittor_modules: dict, what: str) -> None:
    if set(torch_modules) != set(jittor_modules):
        only_t = sorted(set(torch_modules) - set(jittor_modules))
        only_j = sorted(set(jittor_modules) - set(torch_modules))
        raise ValueError(f"{what} differ: torch only {only_t}, Jittor only {only_j}")


class TopkSelection:
    """The encoder's top-k query selection: the reference's is forced into the port, and the
    port's own choice (its ``_select_topk`` run unforced on its own scores) is counted
    against it as the ``train.decoder.topk_ind`` row (score gaps on the reference's scores).
    """

    path = "train.decoder.topk_ind"

    def __init__(self, pair: ModelPair) -> None:
        self.torch_model = pair.torch_model
        self.decoders = (pair.torch_model.decoder, pair.jittor_model.decoder)
        self.reference: np.ndarray | None = None
        self.scores: np.ndarray | None = None
        self.own: list[np.ndarray] = []
        self.reference_error = 0.0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Records the reference's scores and choice around its forward."""
        capture = ScoreCapture(self.torch_model)
        try:
            yield
        finally:
            capture.close()
        self.scores = capture.scores
        self.reference = self.decoders[0].last_topk_ind.numpy().copy()

    def forcing(self) -> contextlib.AbstractContextManager:
        """Forces the reference's choice into the port, keeping the port's own."""
        decoder = self.decoders[1]
        self.own = []

        def select(enc_outputs_class: jt.Var) -> jt.Var:
            decoder.forced_topk_ind = None
            self.own.append(type(decoder)._select_topk(decoder, enc_outputs_class).numpy())
            decoder.forced_topk_ind = jt.array(self.reference).int64()
            try:
                return type(decoder)._select_topk(decoder, enc_outputs_class)
            finally:
                decoder.forced_topk_ind = None
        return override([(decoder, "_select_topk", select)])

    def set_reference_error(self, errors: dict[str, float] | None) -> None:
        """The reference's robust fp32 error of the scores widens the tie band."""
        self.reference_error = (errors or {}).get(self.path, 0.0)

    def band(self) -> float:
        """Score gap up to which a differing choice is a tie."""
        return max(tolerance("decision", self.path).atol,
                   tolerance("noise", self.path).atol * self.reference_error)

    def decisions(self) -> list[Comparison]:
        """The counted top-k row: set members the port chose differently, judged by the
        reference-score gap of every differing position against :meth:`band`."""
        if len(self.own) != 1:
            return [Comparison(self.path, (), (), "", "",
                               reason=f"the port selected queries {len(self.own)} times, once expected")]
        own, ref = self.own[0], self.reference
        c = decision_comparison(self.path, own, ref, self.scores)
        flipped = sum(len(set(r) - set(o)) for o, r in zip(own, ref))
        c.compared, c.flipped, c.forced = int(ref.size), int(flipped), int(flipped)
        c.band = self.band()
        if not np.array_equal(own, ref) and math.isfinite(c.max_abs):
            c.passed = c.max_abs <= c.band
            c.reason += f" (band {c.band:.3g})"
        return [judge_counts(c)]


def match_flips(own: dict[str, list], reference: dict[str, list]) -> int:
    """(query, target) pairs of ``reference``'s matches that ``own`` does not make, summed over
    the keys and images both hold."""
    flips = 0
    for key in own.keys() & reference.keys():
        for (src, tgt), (ref_src, ref_tgt) in zip(own[key], reference[key]):
            pairs = set(zip(np.asarray(src).tolist(), np.asarray(tgt).tolist()))
            flips += len(set(zip(np.asarray(ref_src).tolist(), np.asarray(ref_tgt).tolist()))
                         - pairs)
    return flips



class Matches:
    """Hungarian matches of every decoder output: the reference's are forced into the port's
    criterion, and the port's own (its matcher on its own outputs) are counted against them
    as ``train.match.<key>`` rows, cost gaps measured on the reference's costs."""

    prefix = "train.match"

    def __init__(self, torch_criterion: torch.nn.Module, jittor_criterion: Any) -> None:
        self.criteria = (torch_criterion, jittor_criterion)
        self.reference: dict = {}
        self.costs: dict[str, list[np.ndarray]] = {}
        self.own: dict = {}
        self.reference_error: dict[str, float] = {}

    def record(self, outputs: dict, targets: list[dict]) -> None:
        """Takes the reference criterion's decisions and cost matrices after its forward."""
        criterion = self.criteria[0]
        self.reference = dict(criterion.last_indices)
        self.costs = matcher_costs(criterion.matcher, outputs, to_torch(targets), list(self.reference))

    def forcing(self) -> contextlib.AbstractContextManager:
        """Forces the reference's matches into the port's criterion, keeping its own."""
        criterion = self.criteria[1]
        self.own = {}
        criterion.forced_indices = self.reference

        def decide(key, layer_outputs, targets, decide, num_copies=1):
            self.own[key] = [(s.numpy(), t.numpy()) for s, t in decide()]
            return type(criterion)._decide(criterion, key, layer_outputs, targets, decide, num_copies)
        return override([(criterion, "_decide", decide)])

    def set_reference_error(self, errors: dict[str, float] | None) -> None:
        """The reference's robust fp32 error of each key's costs widens its tie band."""
        self.reference_error = {k: v for k, v in (errors or {}).items() if k.startswith(self.prefix)}

    def band(self, path: str) -> float:
        """Cost gap up to which a differing assignment is a tie."""
        return max(tolerance("decision", path).atol,
                   tolerance("noise", path).atol * self.reference_error.get(path, 0.0))

    def decisions(self) -> list[Comparison]:
        """One counted row per match key: pairs the port matched differently, judged by the
        reference-cost gap of every differing image against :meth:`band`."""
        rows = compare_matches(self.own, self.reference, MatchCosts(reference=self.costs),
                               prefix=self.prefix)
        for c in rows:
            key = c.path[len(self.prefix) + 1:]
            c.band = self.band(c.path)
            if not c.passed and math.isfinite(c.max_abs) and key in self.costs:
                c.passed = c.max_abs <= c.band
                c.reason += f" (band {c.band:.3g})"
            c.compared = sum(len(src) for src, _ in self.reference.get(key, []))
            c.flipped = c.forced = match_flips({key: self.own.get(key, [])},
                                               {key: self.reference.get(key, [])})
            judge_counts(c)
        return rows


class Forcing:
    """Every forced decision of a training pass: top-k, matches, ReLU gates, sampling cells,
    L1 signs, GIoU corners and the stem max-pool's argmax, recorded around the reference's forward and forced
    around the port's.

    Args:
        pair: The model pair.
        torch_criterion: The reference's criterion of the pass.
        jittor_criterion: The port's criterion of the pass.
    """

    def __init__(self, pair: ModelPair, torch_criterion: torch.nn.Module,
                 jittor_criterion: Any) -> None:
        self.topk = TopkSelection(pair)
        self.matches = Matches(torch_criterion, jittor_criterion)
        self.kinks = (ReluGates(pair), SampleCells(pair), L1Signs(torch_criterion, jittor_criterion),
                      GiouCorners(torch_criterion, jittor_criterion), MaxPoolArgmax(pair))

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Around the reference's forward (and backward); call :meth:`record_matches` after
        its criterion ran."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.topk.recording())
            for kink in self.kinks:
                stack.enter_context(kink.recording())
            yield

    def record_matches(self, outputs: dict, targets: list[dict]) -> None:
        """See :meth:`Matches.record`."""
        self.matches.record(outputs, targets)

    @contextlib.contextmanager
    def forcing(self) -> Iterator[None]:
        """Around the port's forward and backward."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.topk.forcing())
            stack.enter_context(self.matches.forcing())
            for kink in self.kinks:
                stack.enter_context(kink.forcing())
            yield

    @property
    def reference(self) -> dict[str, list[np.ndarray]]:
        """Every kink's recorded reference inputs, by path."""
        return {k: v for kink in self.kinks for k, v in kink.reference.items()}

    @property
    def flips(self) -> dict[str, int]:
        """Every kink's flip count, by path (after :meth:`decisions`)."""
        return {k: v for kink in self.kinks for k, v in kink.flips.items()}

    def set_reference_error(self, errors: dict[str, float] | None) -> None:
        """The reference's robust fp32 errors by path (:attr:`~parity.replay.Float64Replay.
        tie_errors`): every decision's band widens with its own."""
        for part in (self.topk, self.matches, *self.kinks):
            part.set_reference_error(errors)

    def recorded(self, rng_state: dict) -> Decisions:
        """The reference's recorded decisions (for a float64 replay)."""
        return Decisions(rng_state, self.topk.reference, dict(self.matches.reference),
                         self.reference, self.topk.scores, self.matches.costs)

    def decisions(self) -> list[Comparison]:
        """Every counted ``decision`` row."""
        return (self.topk.decisions() + self.matches.decisions()
                + [row for kink in self.kinks for row in kink.decisions()])
