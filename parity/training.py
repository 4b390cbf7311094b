"""Training-side parity: gradients, one optimizer step, and an N-step trajectory.

Both models see the same images and targets and draw the same denoising noise (the Jittor
model's shared stream is set to the torch model's state before every pass). The reference's
discrete decisions are forced into the port, so that rounding cannot send the two sides down
different branches: the encoder top-k (``decoder.forced_topk_ind``), every Hungarian match
(``SetCriterion.forced_indices``; :mod:`parity.check` compares both decisions), and every
ReLU gate, L1 box-loss sign and bilinear sampling cell within the forward's noise of its kink
(:class:`ForcedTies`, reported as ``decision`` rows). Losses are summed as the
official engine sums them (``sum(losses.values())``).

Train-mode forwards of random-weight models are ill-conditioned: BatchNorm batch statistics
and the decoder's bilinear sampling of rough feature maps amplify fp32 rounding, more at
larger sizes. So every cross-framework metric is also measured for the reference itself: a
float64 copy of the torch model replays the same step with the same decisions
(:class:`Float64Replay`), and the reference's own fp32 error against it (its precision floor)
may be exceeded by the port by the ``noise`` entry's factor, as :func:`~parity.tolerances.
loss_tolerance` does for loss terms. Rows note when that allowance was used.

- :func:`check_gradients`: the gradient of every trainable parameter (kind ``grad``).
- :func:`check_optimizer_step`: one official step (AdamW over the official parameter groups,
  global-norm clipping, EMA update) through both engines' ``train_step``: updates, weights,
  AdamW moments and step counts (kind ``step``), the EMA (``ema``), BatchNorm buffers
  (``buffer.step``).
- :func:`run_trajectory`: N steps on a small fixed set of batches; losses and weight drift per
  step (``trajectory``).
- :func:`run_training_checks`: all three as :class:`~parity.check.CheckResult` rows.
"""

from __future__ import annotations

import abc
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import jittor as jt
import numpy as np
import torch

import jittor_impl
import jittor_impl.checkpoint as jt_checkpoint
import jittor_impl.decoder as jittor_decoder
import jittor_impl.engine as jittor_engine
import torch_ref
import torch_ref.decoder as torch_decoder
import torch_ref.engine as torch_engine
from jittor_impl.common import named_buffers, named_modules, trainable_parameters
from rtdetr_common.seeded import seeded_images, seeded_targets

from .check import CheckResult
from .compare import Comparison, Tolerance, compare_arrays, compare_tree
from .models import ModelPair, to_jittor, to_numpy, to_torch
from .tolerances import tolerance

# Target counts of the images of the fixed training batches; batch i starts at offset 3 * i,
# so the first batch of two images is (4, 0): one image without any target.
_COUNTS = (4, 0, 7, 2, 1, 5, 3, 6)


def torch_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters torch's optimizer updates (``requires_grad``), in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def jittor_gradients(loss: jt.Var, named: list[tuple[str, jt.Var]]) -> dict[str, np.ndarray | None]:
    """Gradients of ``loss`` with respect to named Jittor Vars, ``None`` where there is none.

    PyTorch leaves ``p.grad`` at ``None`` for a parameter the loss does not depend on; Jittor
    returns zeros. :func:`jittor_impl.engine.gradient_probe` tells the two apart around the
    same ``jt.grad`` call the optimizer's ``backward`` makes over the same Vars.

    Args:
        loss: Scalar loss ([1]).
        named: ``(name, Var)`` pairs, e.g. :func:`jittor_impl.common.trainable_parameters`.

    Returns:
        ``name -> gradient`` (numpy, computed) or ``None`` (the loss does not reach the Var).
    """
    with jittor_engine.gradient_probe([var for _, var in named]) as missing:
        grads = jt.grad(loss, [var for _, var in named], retain_graph=False)
    jt.sync(grads)
    return {name: None if i in missing else grads[i].numpy()
            for i, (name, _) in enumerate(named)}


class _ForcedTopk:
    """Sets the Jittor decoder's ``forced_topk_ind`` for the duration of a ``with`` block."""

    def __init__(self, pair: ModelPair, topk: np.ndarray) -> None:
        self.decoder = pair.jittor_model.decoder
        self.topk = topk

    def __enter__(self) -> None:
        self.decoder.forced_topk_ind = jt.array(self.topk).int64()

    def __exit__(self, *exc) -> None:
        self.decoder.forced_topk_ind = None


class _ForcedTies(abc.ABC):
    """Forces the reference's side of a kink into the port where the two sides tie.

    Base of :class:`ForcedGates` (ReLU), :class:`ForcedL1Signs` (``|d|`` of the L1 box
    loss) and :class:`ForcedCells` (the cell of a bilinear sample, which applies the branch
    its own way). Each kinked call ``y = x * branch(x)`` (``branch`` is ``x > 0`` for a ReLU,
    ``sign(x)`` for ``|x|``) is recorded on the reference side by name, in call order; the
    port's call of the same name and index returns ``x * b`` where ``b`` is the reference's
    ``branch`` within the name's tie band (:meth:`band`) of the kink and the port's own
    ``branch(x)`` elsewhere, so that ``x * b`` is exactly the plain function there (and a
    port that drifted away from the reference, as over a trajectory, keeps its own
    decisions). Same gradient rule; the forward differs only at forced elements, by less
    than ``2 |x|``. :meth:`decisions` reports per name how many elements the port put (or,
    where forced, would have put) on the other side, and the largest reference ``|x|`` among
    them (a ``decision`` row: flips are allowed only within the band, which is also where
    they are forced).

    The band is the decision entry's ``atol``, widened to the ``noise`` factor times the
    reference's own fp32 error at that name's inputs when the reference's float64 replay has
    measured it (:meth:`set_reference_error`, before the port runs): an element that the
    decision row accepts as a tie must also be forced, or its gradient is charged to the port.

    Attributes:
        reference: ``path -> [reference fp32 input of each call]`` (paths are ``prefix.name``).
        flips: ``path -> count`` of elements on the other side, set by :meth:`decisions`.
        reference_error: ``path -> largest |fp32 - float64|`` of the reference's inputs.
    """

    prefix = ""
    what = ""

    def __init__(self) -> None:
        self.reference: dict[str, list[np.ndarray]] = {}
        self.test: dict[str, list[jt.Var]] = {}
        self.flips: dict[str, int] = {}
        self.reference_error: dict[str, float] = {}

    @staticmethod
    @abc.abstractmethod
    def branch(x: np.ndarray) -> np.ndarray:
        """The side of the kink of each element (numpy)."""

    @staticmethod
    @abc.abstractmethod
    def jittor_branch(x: jt.Var) -> jt.Var:
        """:meth:`branch` of a Jittor Var, as float32."""

    @classmethod
    def path(cls, name: str) -> str:
        """The decision path of kink ``name``."""
        return f"{cls.prefix}.{name}"

    def set_reference_error(self, errors: dict[str, float] | None) -> None:
        """Per path, the reference's largest ``|fp32 - float64|`` input
        (:attr:`Float64Replay.tie_errors`); widens :meth:`band`. Call before the port runs."""
        self.reference_error = dict(errors or {})

    def band(self, path: str) -> float:
        """The tie band of ``path``: ``|x|`` up to which an element is a tie (forced to the
        reference's side, and a flip of it accepted)."""
        band = tolerance("decision", path).atol
        if path in self.reference_error:
            band = max(band, tolerance("noise", path).atol * self.reference_error[path])
        return band

    def _clear(self) -> None:
        """Forgets the calls of an earlier block."""
        self.reference.clear()
        self.test.clear()

    def _record(self, name: str, x: np.ndarray) -> None:
        self.reference.setdefault(self.path(name), []).append(x)

    def _force(self, name: str, x: jt.Var) -> jt.Var:
        """The port's kinked call: ``x`` times :meth:`_forced_branch`."""
        return x * self._forced_branch(name, x)

    def _forced_branch(self, name: str, x: jt.Var) -> jt.Var:
        """The branch of each element of the port's call: the reference's within the band,
        the port's own elsewhere (float32); records ``x`` for :meth:`decisions`."""
        reference = self._take_call(name, x)
        tie = self._ties(name, reference)
        forced = jt.array(np.where(tie, self.branch(reference), 0).astype(np.float32))
        own = jt.array((~tie).astype(np.float32)) * self.jittor_branch(x)
        return forced + own

    def _ties(self, name: str, reference: np.ndarray) -> np.ndarray:
        """Which elements of a reference call lie within the band of kink ``name``."""
        return np.abs(reference) <= self.band(self.path(name))

    def _take_call(self, name: str, x: jt.Var) -> np.ndarray:
        """Records the port's next call of kink ``name`` and returns the reference's input
        of the same call."""
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

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every kink name a decision row is reported for."""

    def _flipped(self, reference: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Which elements the port put on the other side of the kink than the reference."""
        return self.branch(reference) != self.branch(test)

    def decisions(self) -> list[Comparison]:
        """One ``decision`` row per kink name (``prefix.name``), all its calls pooled.

        ``max_abs`` is the largest reference ``|x|`` among the elements the port put on the
        other side (0 when none); the row passes when it is within the :meth:`band`: an
        element that close to the kink is one the reference's own rounding could flip. The
        number of flipped elements per path is left in :attr:`flips`.
        """
        rows = []
        for name in self.names():
            path = self.path(name)
            ref = self.reference.get(path, [])
            test = [x.numpy() for x in self.test.get(path, [])]
            size = sum(r.size for r in ref)
            c = Comparison(path, (size,), (sum(t.size for t in test),), "bool", "bool")
            if len(ref) != len(test):
                c.reason = f"called {len(test)} times in Jittor, {len(ref)} times in torch"
                rows.append(c)
                continue
            flipped = [np.abs(r[self._flipped(r, t)]) for r, t in zip(ref, test)]
            count = sum(f.size for f in flipped)
            self.flips[path] = count
            c.max_abs = max((float(f.max()) for f in flipped if f.size), default=0.0)
            limit = self.band(path)
            c.passed = c.max_abs <= limit
            c.within = 1.0 - count / max(size, 1)
            verdict = "ties within" if c.passed else "exceeds"
            c.reason = "" if not count else (f"{count} of {size} elements differ in side; "
                                             f"largest reference |x| {c.max_abs:.3g} {verdict} "
                                             f"{limit:.3g} (reference's side forced)")
            rows.append(c)
        return rows

    @classmethod
    def replay(cls, path: str, x: torch.Tensor, reference: np.ndarray) -> torch.Tensor:
        """The float64 replay's kinked call: the fp32 reference's side within the decision
        entry's ``atol`` (the replay's own error is not known before it runs), its own
        elsewhere."""
        tie = np.abs(reference) <= tolerance("decision", path).atol
        own = x.detach().numpy()
        return x * torch.from_numpy(np.where(tie, cls.branch(reference), cls.branch(own)))


class ForcedGates(_ForcedTies):
    """Forces the reference's ReLU decisions into the port, as the top-k decision is forced.

    A ReLU's gradient is a step function of its input: an element whose pre-activation lies
    closer to zero than the fp32 noise of the forward (train-mode BatchNorm batch statistics
    put it at ~1e-4 in the decoder of a random-weight model) can be open on one side and shut
    on the other. Few elements flip (a handful of ~1e6), but in the decoder the loss gradient
    is concentrated on the few matched queries, so one flipped element of such a query
    changes the gradient of everything upstream by percents (measured: r18vd at 256, one
    flip at decoder layer 0's FFN with pre-activation -2e-5 moved the gradients of that layer,
    the encoder and the backbone by 1.5-4% relative L2, while every parameter downstream of
    it agreed within 3e-4). That is a tie decided by rounding, not a difference of the port.
    Deep in the decoder of a 6-layer model at 640 the reference's own fp32 error reaches ~0.2
    at the pre-activations (measured r50vd, seeded weights, last decoder FFN), so the band
    widens with it (see :class:`_ForcedTies`): forcing only within the fixed ``atol`` left
    702 flips there, which moved gradients of the layers above by up to 22x the reference's
    own error.

    Inside the ``with`` block every ``ReLU`` module of the torch model records its inputs
    (forward hooks, in call order; a module called several times, such as an MLP's shared
    activation, records each call), and the same-named ``ReLU`` of the Jittor model, called
    afterwards, returns ``x * gate`` (see :class:`_ForcedTies`). Paths are
    ``train.relu_gate.<module name>``.

    Args:
        pair: The model pair; the torch forward must run before the Jittor one inside the
            block, and each side exactly once.

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
        if set(self.torch_modules) != set(self.jittor_modules):
            only_t = sorted(set(self.torch_modules) - set(self.jittor_modules))
            only_j = sorted(set(self.jittor_modules) - set(self.torch_modules))
            raise ValueError(f"ReLU modules differ: torch only {only_t}, Jittor only {only_j}")
        self._handles: list = []

    @staticmethod
    def branch(x: np.ndarray) -> np.ndarray:
        return x > 0

    @staticmethod
    def jittor_branch(x: jt.Var) -> jt.Var:
        return (x > 0).float32()

    def names(self) -> list[str]:
        return list(self.torch_modules)

    def __enter__(self) -> "ForcedGates":
        self._clear()
        for name, module in self.torch_modules.items():
            self._handles.append(module.register_forward_hook(
                lambda m, inputs, output, name=name:
                self._record(name, inputs[0].detach().numpy().copy())))
        for name, module in self.jittor_modules.items():
            module.execute = lambda x, name=name: self._force(name, x)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.jittor_modules.values():
            del module.execute


class ForcedL1Signs(_ForcedTies):
    """Forces the reference's sign of each L1 box-loss difference into the port at ties.

    The L1 box loss ``|pred - target|`` has gradient ``sign(pred - target)``: a matched box
    coordinate that lies within the forward's rounding of its target gets ``+1`` on one side
    and ``-1`` on the other. Denoising queries start at their (noised) targets, so such
    coordinates occur (measured r50vd at 640, seeded weights: a denoising query of decoder
    layer 3 at ``+1.1e-5`` in torch, ``-1.0e-5`` in Jittor, which alone put that layer's box
    head gradients 65x the reference's own error apart). Both criteria compute the difference
    through ``SetCriterion.l1_distance``; inside the ``with`` block the torch criterion's
    records ``pred - target`` of each call (one per output: final, auxiliary, denoising) and
    the Jittor criterion's returns ``d * sign`` with the reference's sign within the band
    (see :class:`_ForcedTies`). The path is ``train.l1_sign.loss_bbox``.

    Args:
        torch_criterion: The reference's ``SetCriterion``; it must run before the port's.
        jittor_criterion: The port's ``SetCriterion``.
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

    @staticmethod
    def jittor_branch(x: jt.Var) -> jt.Var:
        return (x > 0).float32() - (x < 0).float32()

    def names(self) -> list[str]:
        return [self.name]

    def _torch_l1(self, src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._record(self.name, (src - target).detach().numpy().copy())
        return type(self.criteria[0]).l1_distance(self.criteria[0], src, target)

    def __enter__(self) -> "ForcedL1Signs":
        self._clear()
        self.criteria[0].l1_distance = self._torch_l1
        self.criteria[1].l1_distance = lambda src, target: self._force(self.name, src - target)
        return self

    def __exit__(self, *exc) -> None:
        for criterion in self.criteria:
            del criterion.l1_distance


def cell_offsets(locations: np.ndarray,
                 spatial_shapes: list) -> tuple[np.ndarray, np.ndarray]:
    """Where each deformable-attention sampling point lies against the nearest cell edge.

    The pixel coordinate is computed as torch's ``grid_sample`` computes it
    (``align_corners=False``) from the grid ``2 * loc - 1`` the reference builds, in the
    locations' own precision: ``pos = ((grid + 1) * size - 1) / 2`` (checked against
    ``grid_sample``'s own cell choice in ``parity/test_training.py``). Its ``floor`` picks the
    bilinear cell, so the gradient with respect to the location jumps at integer ``pos``.

    Args:
        locations: ``[bs, len_q, n_head, n_levels, n_points, 2]`` normalised ``(x, y)``.
        spatial_shapes: ``[(h, w), ...]`` of the levels.

    Returns:
        ``pos - edge`` and ``edge = round(pos)`` (same shape as ``locations``): the cell is
        ``edge`` where the offset is ``>= 0``, ``edge - 1`` where it is negative.
    """
    dtype = locations.dtype.type
    sizes = np.array([[w, h] for h, w in spatial_shapes], dtype=dtype)  # [n_levels, 2]
    sizes = sizes.reshape(1, 1, 1, len(spatial_shapes), 1, 2)
    grid = dtype(2) * locations - dtype(1)
    pos = ((grid + dtype(1)) * sizes - dtype(1)) / dtype(2)
    edge = np.round(pos)
    return pos - edge, edge


class ForcedCells(_ForcedTies):
    """Forces the reference's bilinear sampling cells into the port at cell edges.

    Deformable attention samples each point bilinearly from the four pixels around it; the
    cell is ``floor`` of its pixel coordinate, and the gradient with respect to the location
    is the slope within that cell, so it jumps at a cell edge while the sampled value is
    continuous there. Locations are outputs of a deep train-mode forward, so a point within
    the fp32 noise of an edge can sit in one cell in torch and the next in Jittor (measured
    r18vd at 256, seeded weights: 13 such points over 3 decoder layers, up to 1.3e-3 px from
    the edge, which put the last layer's ``sampling_offsets`` gradients 12x the reference's
    own error apart; forcing them brought every gradient within it).

    Inside the ``with`` block every ``MSDeformableAttention.sample`` of the torch model
    records the offsets of its points from the nearest edge (:func:`cell_offsets`), and the
    same-named module of the Jittor model, called afterwards, samples with explicit cells:
    the reference's cell within the band (see :class:`_ForcedTies`), its own elsewhere, with
    the bilinear weights of its own coordinate (so a forced sample is the reference cell's
    bilinear plane extended past its edge by the port's offset, as a forced ReLU extends its
    branch). Offsets are from each side's own nearest edge, so the reference's cell is taken
    from the reference's edge (:meth:`_reference_edge`): the band reaches 0.6 px in r50vd's
    last decoder layer at 640, where a point near a pixel centre is "within the band" of
    both its edges. Paths are ``train.sample_cell.<module name>``; the offsets are in
    pixels of the point's level.

    Args:
        pair: The model pair; the torch forward must run before the Jittor one inside the
            block, and each side exactly once.

    Raises:
        ValueError: When the two models' deformable-attention modules have different names.
    """

    prefix = "train.sample_cell"
    what = "deformable attention"

    def __init__(self, pair: ModelPair) -> None:
        super().__init__()
        self.torch_modules = {name: m for name, m in pair.torch_model.named_modules()
                              if isinstance(m, torch_decoder.MSDeformableAttention)}
        self.jittor_modules = {name: m for name, m in named_modules(pair.jittor_model)
                               if isinstance(m, jittor_decoder.MSDeformableAttention)}
        if set(self.torch_modules) != set(self.jittor_modules):
            only_t = sorted(set(self.torch_modules) - set(self.jittor_modules))
            only_j = sorted(set(self.jittor_modules) - set(self.torch_modules))
            raise ValueError(f"deformable attention modules differ: torch only {only_t}, "
                             f"Jittor only {only_j}")

    @staticmethod
    def branch(x: np.ndarray) -> np.ndarray:
        return x >= 0

    @staticmethod
    def jittor_branch(x: jt.Var) -> jt.Var:
        return (x >= 0).float32()

    def names(self) -> list[str]:
        return list(self.torch_modules)

    @staticmethod
    def _reference_edge(reference: np.ndarray, offsets: np.ndarray, edge: np.ndarray) -> np.ndarray:
        """The reference's nearest edge, from the port's: offsets are from each side's own
        nearest edge, and a point near a pixel centre has offset ~+0.5 on one side and ~-0.5
        on the other, nearest edges one apart (the positions themselves differ by far less
        than half a pixel)."""
        return edge + np.round(offsets - reference)

    def _flipped(self, reference: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Other cell: ``edge - 1 + branch`` differs, each from its own nearest edge."""
        return np.round(test - reference) + self.branch(reference) != self.branch(test)

    def _torch_sample(self, name: str, module: torch.nn.Module, value: torch.Tensor,
                      shapes: list, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._record(name, cell_offsets(locations.detach().numpy(), shapes)[0])
        return type(module).sample(module, value, shapes, locations, weights)

    def _jittor_sample(self, name: str, module: Any, value: jt.Var, shapes: list,
                       locations: jt.Var, weights: jt.Var) -> jt.Var:
        offsets, edge = cell_offsets(locations.numpy(), shapes)
        reference = self._take_call(name, jt.array(offsets))
        tie = self._ties(name, reference)
        # The cell is edge - 1 + branch: the reference's within the band, the port's own elsewhere.
        cells = np.where(tie, self._reference_edge(reference, offsets, edge) - 1 + self.branch(reference),
                         edge - 1 + self.branch(offsets))
        cells = jt.array(cells.astype(np.int32))
        return type(module).sample(module, value, shapes, locations, weights, cells)

    def __enter__(self) -> "ForcedCells":
        self._clear()
        for name, module in self.torch_modules.items():
            module.sample = (lambda value, shapes, loc, weights, name=name, m=module:
                             self._torch_sample(name, m, value, shapes, loc, weights))
        for name, module in self.jittor_modules.items():
            module.sample = (lambda value, shapes, loc, weights, name=name, m=module:
                             self._jittor_sample(name, m, value, shapes, loc, weights))
        return self

    def __exit__(self, *exc) -> None:
        for module in [*self.torch_modules.values(), *self.jittor_modules.values()]:
            del module.sample

    @classmethod
    def replay_locations(cls, path: str, locations: torch.Tensor, shapes: list,
                         reference: np.ndarray) -> tuple[torch.Tensor, float]:
        """The float64 replay's locations: within the decision entry's ``atol`` of an edge,
        a point on the other side than the fp32 reference's is moved 1e-9 px across it
        (the gradient is unchanged: the shift is a constant); elsewhere they are its own.

        Returns:
            The locations to sample, and the largest distance between their pixel
            coordinates and the fp32 reference's (the reference's own error at this path).
        """
        offsets, edge = cell_offsets(locations.detach().numpy(), shapes)
        reference_edge = cls._reference_edge(reference, offsets, edge)
        position = offsets + edge
        own = position - reference_edge  # this replay's offset from the reference's edge
        error = float(np.abs(own - reference).max(initial=0.0))
        tie = np.abs(reference) <= tolerance("decision", path).atol
        wrong = tie & (cls.branch(reference) != cls.branch(own))
        target = reference_edge + np.where(cls.branch(reference), 1e-9, -1e-9)
        sizes = np.array([[w, h] for h, w in shapes], np.float64).reshape(1, 1, 1, len(shapes), 1, 2)
        shift = np.where(wrong, (target - position) / sizes, 0.0)  # position = loc * size - 1/2
        return locations + torch.from_numpy(shift), error


class ForcedTies:
    """Every tie forcing of a training pass, as one ``with`` block: :class:`ForcedGates` and
    :class:`ForcedCells` over the models and :class:`ForcedL1Signs` over the two criteria (same
    interface, merged).

    Args:
        pair: The model pair.
        torch_criterion: The reference's criterion of the pass.
        jittor_criterion: The port's criterion of the pass.
    """

    def __init__(self, pair: ModelPair, torch_criterion: torch.nn.Module,
                 jittor_criterion: Any) -> None:
        self.parts = (ForcedGates(pair), ForcedCells(pair),
                      ForcedL1Signs(torch_criterion, jittor_criterion))

    def __enter__(self) -> "ForcedTies":
        for part in self.parts:
            part.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for part in self.parts:
            part.__exit__(*exc)

    @property
    def reference(self) -> dict[str, list[np.ndarray]]:
        """Every part's :attr:`_ForcedTies.reference`, merged (paths are distinct)."""
        return {k: v for part in self.parts for k, v in part.reference.items()}

    @property
    def flips(self) -> dict[str, int]:
        """Every part's :attr:`_ForcedTies.flips`, merged."""
        return {k: v for part in self.parts for k, v in part.flips.items()}

    def set_reference_error(self, errors: dict[str, float] | None) -> None:
        """See :meth:`_ForcedTies.set_reference_error`."""
        for part in self.parts:
            part.set_reference_error(errors)

    def decisions(self) -> list[Comparison]:
        """Every part's ``decision`` rows."""
        return [row for part in self.parts for row in part.decisions()]


def _align_streams(pair: ModelPair) -> None:
    """Sets the Jittor model's shared random stream to the torch model's state.

    Both streams are seeded alike and draw alike, so this only matters after a check that
    re-ran one side; it guarantees both draw the same denoising noise next.
    """
    pair.jittor_model.rng.load_state_dict(pair.torch_model.rng.state_dict())


def _numpy_params(named: list) -> dict[str, np.ndarray]:
    """``name -> float64 copy`` of torch Parameters or Jittor Vars."""
    return {name: to_numpy(p).astype(np.float64) for name, p in named}


def _rel_l2(test: np.ndarray, ref: np.ndarray) -> float:
    """``||test - ref|| / ||ref||`` in float64 (0 when both are zero, inf when only ref is)."""
    diff = float(np.linalg.norm(np.asarray(test, np.float64) - np.asarray(ref, np.float64)))
    norm = float(np.linalg.norm(np.asarray(ref, np.float64)))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


@dataclass
class Decisions:
    """The reference's discrete decisions of one forward, to force into another run.

    Attributes:
        rng_state: The torch model's shared stream before the forward (denoising noise).
        topk: Encoder top-k indices ``[bs, num_queries]``.
        matches: ``SetCriterion.last_indices`` of the reference criterion.
        ties: Kink path (``train.relu_gate.<module>``, ``train.sample_cell.<module>``,
            ``train.l1_sign.loss_bbox``) -> the reference's fp32 input of each call, in call order (see :class:`_ForcedTies`).
    """

    rng_state: dict
    topk: np.ndarray
    matches: dict
    ties: dict[str, list[np.ndarray]]


class Float64Replay:
    """A float64 copy of the reference model that replays the fp32 reference's steps.

    Same weights (copied when the replay is created), same denoising noise, and the fp32
    run's decisions forced in (top-k, matches, and the sides of the ReLU gates, sampling
    cells and L1 signs within their decision entries' ``atol``; outside it the replay decides itself, and the
    ``tie_errors`` it measures then widen the port's bands, see :class:`_ForcedTies`), so
    the only difference from the fp32 reference is rounding: comparing the two gives the
    reference's precision floor, and over a trajectory how far its own rounding carries it.

    Args:
        pair: The model pair; its torch model is copied now (before any step to replay).

    Attributes:
        tie_errors: Per kink path, the largest ``|float64 - fp32|`` of the reference's
            inputs to it (pre-activations, box differences) in the last replayed forward.
    """

    def __init__(self, pair: ModelPair) -> None:
        self.cfg = pair.cfg
        self.model = copy.deepcopy(pair.torch_model).double().train()
        self.criterion = torch_ref.build_criterion(pair.cfg).double()
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: torch_ref.ema.ModelEMA | None = None
        self.tie_errors: dict[str, float] = {}
        self._calls: dict[str, Any] = {}

    def _forced(self, path: str, kind: type[_ForcedTies], x: torch.Tensor) -> torch.Tensor:
        reference = next(self._calls[path])
        error = float(np.abs(x.detach().numpy() - reference).max(initial=0.0))
        self.tie_errors[path] = max(self.tie_errors.get(path, 0.0), error)
        return kind.replay(path, x, reference)

    def _forced_locations(self, path: str, shapes: list, locations: torch.Tensor) -> torch.Tensor:
        forced, error = ForcedCells.replay_locations(path, locations, shapes, next(self._calls[path]))
        self.tie_errors[path] = max(self.tie_errors.get(path, 0.0), error)
        return forced

    def _forward_backward(self, images: np.ndarray, targets: list[dict],
                          decisions: Decisions) -> dict[str, float]:
        model = self.model
        model.rng.load_state_dict(decisions.rng_state)
        model.decoder.forced_topk_ind = torch.from_numpy(decisions.topk)
        self._calls = {path: iter(calls) for path, calls in decisions.ties.items()}
        self.tie_errors = {}
        handles = [module.register_forward_hook(
            lambda m, inputs, output, path=ForcedGates.path(name):
            self._forced(path, ForcedGates, inputs[0]))
            for name, module in model.named_modules() if isinstance(module, torch.nn.ReLU)]
        self.criterion.l1_distance = lambda src, target: self._forced(
            ForcedL1Signs.path(ForcedL1Signs.name), ForcedL1Signs, src - target)
        samplers = {name: module for name, module in model.named_modules()
                    if isinstance(module, torch_decoder.MSDeformableAttention)}
        for name, module in samplers.items():
            module.sample = (lambda value, shapes, loc, weights, path=ForcedCells.path(name), m=module:
                             type(m).sample(m, value, shapes, self._forced_locations(path, shapes, loc),
                                            weights))
        try:
            tg = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in to_torch(targets)]
            out = model(torch.from_numpy(images).double(), tg)
            self.criterion.forced_indices = decisions.matches
            losses = self.criterion(out, tg)
        finally:
            for handle in handles:
                handle.remove()
            for module in samplers.values():
                del module.sample
            del self.criterion.l1_distance
            model.decoder.forced_topk_ind = None
        loss = sum(losses.values())
        model.zero_grad(set_to_none=True)
        loss.backward()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        return values

    def gradients(self, images: np.ndarray, targets: list[dict],
                  decisions: Decisions) -> dict[str, np.ndarray | None]:
        """Float64 gradients of the official loss sum (``None`` where torch has none)."""
        self._forward_backward(images, targets, decisions)
        return {name: None if p.grad is None else p.grad.numpy().copy()
                for name, p in torch_trainable(self.model)}

    def train_step(self, images: np.ndarray, targets: list[dict], decisions: Decisions,
                   clip_max_norm: float, ema: bool = False) -> dict[str, float]:
        """One official step in float64 (as ``torch_ref.engine.train_step``), decisions forced.

        The optimizer (official groups) is created at the first call and kept; with ``ema``
        an EMA built like :func:`check_optimizer_step`'s (one warm-up period in) is too.
        """
        if self.optimizer is None:
            self.optimizer = torch_ref.build_optimizer(self.model, self.cfg)
        if ema and self.ema is None:
            self.ema = torch_ref.build_ema(self.model, self.cfg)
            self.ema.updates = self.ema.warmups
        values = self._forward_backward(images, targets, decisions)
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_max_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return values

    def weights(self) -> dict[str, np.ndarray]:
        """The trainable weights, float64."""
        return _numpy_params(torch_trainable(self.model))


def _noise_aware(c: Comparison, floor: float, what: str) -> Comparison:
    """Lets a comparison pass within the ``noise`` factor of the reference's own error.

    ``floor`` is the reference's fp32 error against its float64 replay (relative L2, same
    normalisation as ``c.rel_l2``). A comparison that failed only on ``rel_l2``/``cosine``
    passes when ``rel_l2 <= factor * floor``; the cosine limit follows as
    ``1 - (factor * floor) ** 2 / 2`` (the cosine of two vectors that far apart).
    """
    if c.passed or not math.isfinite(floor) or c.within < 1.0 or c.shape_ref != c.shape_test:
        return c
    factor = tolerance("noise", c.path).atol
    limit = factor * floor
    if c.rel_l2 <= limit and c.cosine >= 1.0 - limit ** 2 / 2:
        c.passed = True
        c.reason = (f"rel L2 {c.rel_l2:.3g}, cosine {c.cosine:.8f}: within {factor:g}x the "
                    f"reference's own fp32 {what} error {floor:.3g} (float64 replay)")
    else:
        c.reason += f"; reference's own fp32 {what} error {floor:.3g} (allowed {factor:g}x)"
    return c


@dataclass
class TrainPass:
    """One train-mode forward and backward of both models on the same batch.

    Attributes:
        torch_losses: Every weighted loss term and ``loss`` (their sum), reference.
        jittor_losses: The same, port.
        torch_grads: ``name -> gradient`` or ``None`` (``p.grad is None``), trainable only.
        jittor_grads: ``name -> gradient`` or ``None`` (see :func:`jittor_gradients`).
        float64_grads: The reference's float64 replay's gradients (empty when not run).
        decisions: The reference's decisions, forced into the port.
        gates: ``decision`` rows of the forced ties (ReLU gates, sampling cells, L1 signs).
        seconds: Wall time of each side's forward + backward (and of the replay).
    """

    torch_losses: dict[str, np.ndarray]
    jittor_losses: dict[str, np.ndarray]
    torch_grads: dict[str, np.ndarray | None]
    jittor_grads: dict[str, np.ndarray | None]
    float64_grads: dict[str, np.ndarray | None]
    decisions: Decisions
    gates: list[Comparison] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def train_pass(pair: ModelPair, images: np.ndarray, targets: list[dict],
               float64: bool = True) -> TrainPass:
    """Train-mode forward, official loss sum and backward on both sides.

    Args:
        pair: The model pair (put in train mode; BatchNorm running statistics advance once
            on both sides, as in any training forward).
        images: [bs, 3, h, w] float32 in [0, 1].
        targets: Per-image ``labels`` (int64 [n]) and ``boxes`` (float32 [n, 4] cxcywh).
        float64: Also replay the reference in float64 for its precision floor.

    Returns:
        Losses and gradients of both sides; torch's ``.grad`` fields are cleared afterwards.
    """
    pair.train()
    _align_streams(pair)
    model = pair.torch_model
    trainable = torch_trainable(model)
    for _, p in trainable:
        p.grad = None
    replay = Float64Replay(pair) if float64 else None
    rng_state = model.rng.state_dict()
    criterion_t = torch_ref.build_criterion(pair.cfg)
    criterion_j = jittor_impl.build_criterion(pair.cfg)
    with ForcedTies(pair, criterion_t, criterion_j) as ties:
        start = time.perf_counter()
        targets_t = to_torch(targets)
        out_t = model(torch.from_numpy(images), targets_t)
        losses_t = criterion_t(out_t, targets_t)
        loss_t = sum(losses_t.values())
        loss_t.backward()
        grads_t = {name: None if p.grad is None else p.grad.numpy().copy()
                   for name, p in trainable}
        seconds = {"torch": time.perf_counter() - start}
        for _, p in trainable:
            p.grad = None
        topk = model.decoder.last_topk_ind.numpy()
        matches = dict(criterion_t.last_indices)
        decisions = Decisions(rng_state, topk, matches, ties.reference)
        float64_grads = {}
        if replay is not None:
            start = time.perf_counter()
            float64_grads = replay.gradients(images, targets, decisions)
            ties.set_reference_error(replay.tie_errors)
            seconds["float64"] = time.perf_counter() - start

        start = time.perf_counter()
        targets_j = to_jittor(targets)
        with _ForcedTopk(pair, topk):
            out_j = pair.jittor_model(jt.array(images), targets_j)
        criterion_j.forced_indices = matches
        losses_j = criterion_j(out_j, targets_j)
        loss_j = sum(losses_j.values())
        grads_j = jittor_gradients(loss_j, trainable_parameters(pair.jittor_model))
        jittor_losses = to_numpy({**losses_j, "loss": loss_j})
        seconds["jittor"] = time.perf_counter() - start
    return TrainPass(
        torch_losses=to_numpy({**losses_t, "loss": loss_t}), jittor_losses=jittor_losses,
        torch_grads=grads_t, jittor_grads=grads_j, float64_grads=float64_grads,
        decisions=decisions, gates=ties.decisions(), seconds=seconds)


def _one_sided(path: str, side: str, what: str) -> Comparison:
    return Comparison(path, (), (), "", "", reason=f"{what} on the {side} side only")


def _global_norm(grads: dict[str, np.ndarray | None]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2))
                             for g in grads.values() if g is not None)))


def compare_gradients(tp: TrainPass) -> list[Comparison]:
    """One ``grad`` row per trainable parameter (PyTorch convention, frozen ones excluded).

    A parameter trainable on one side only, or with a gradient on one side only, fails by
    name. A parameter without a gradient on both sides passes with that noted (both sides
    agree the loss does not reach it). With a float64 replay, a gradient may differ from the
    reference's by the ``noise`` factor times the reference's own fp32 error.

    Some gradients are zero in exact arithmetic and rounding noise in fp32: a per-channel
    shift followed by a 1x1 convolution and train-mode BatchNorm (which removes any constant
    per-channel shift) has no effect on the loss, e.g. the BatchNorm bias of the hybrid
    encoder's input projections (float64 norm ~1e-15, fp32 norms ~1e-6 on either side,
    against ~1e3 for the whole gradient). Relative metrics of two noise vectors mean
    nothing; when both sides' norms are below ``grad.zero``'s ``atol`` times the norm of the
    whole reference gradient, the row passes as numerically zero, with both norms reported.
    A gradient that is real on one side only stays above that floor and is compared.
    """
    floor = tolerance("grad.zero", "grad").atol * _global_norm(tp.torch_grads)
    rows = []
    names = list(tp.torch_grads) + [n for n in tp.jittor_grads if n not in tp.torch_grads]
    for name in names:
        path = f"grad.{name}"
        if name not in tp.jittor_grads or name not in tp.torch_grads:
            side = "torch" if name in tp.torch_grads else "Jittor"
            rows.append(_one_sided(path, side, "trainable parameter"))
            continue
        ref, test = tp.torch_grads[name], tp.jittor_grads[name]
        if ref is None and test is None:
            rows.append(Comparison(path, (), (), "", "", passed=True,
                                   reason="no gradient on either side"))
            continue
        if ref is None or test is None:
            rows.append(_one_sided(path, "torch" if test is None else "Jittor", "gradient"))
            continue
        c = compare_arrays(test, ref, tolerance("grad", path), path)
        norms = float(np.linalg.norm(ref)), float(np.linalg.norm(test))
        if not c.passed and max(norms) <= floor:
            c.passed = True
            c.reason = (f"numerically zero on both sides (norms {norms[0]:.3g} torch, "
                        f"{norms[1]:.3g} Jittor <= {floor:.3g})")
        elif tp.float64_grads.get(name) is not None:
            c = _noise_aware(c, _rel_l2(ref, tp.float64_grads[name]), "gradient")
        rows.append(c)
    return rows


def _check_batch(images: np.ndarray, what: str) -> None:
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"{what} checks need images [bs >= 2, 3, h, w] (torch's CPU BatchNorm "
                         f"backward is wrong for a batch of 1), got shape {images.shape}")


def check_gradients(pair: ModelPair, images: np.ndarray, targets: list[dict]) -> list[Comparison]:
    """Compares the gradient of every trainable parameter after one train-mode backward.

    Same inputs, denoising noise and decisions (top-k, matches, ReLU gates, sampling cells,
    L1 signs) on
    both sides; the loss is the official sum of all weighted terms. Each gradient must
    satisfy the ``grad`` tolerance (relative L2 and cosine), or stay within the ``noise``
    factor of the reference's own fp32 error; a gradient present on one side only fails
    naming the parameter.

    Args:
        pair: The model pair.
        images: [bs, 3, h, w] float32, bs >= 2 (torch's CPU BatchNorm backward is wrong for 1).
        targets: Per-image targets (numpy).

    Returns:
        One ``grad.<param>`` row per trainable parameter in torch registration order, then one
        ``train.relu_gate.<module>`` decision row per ReLU module, a
        ``train.sample_cell.<module>`` row per deformable attention module and the
        ``train.l1_sign.loss_bbox`` row (see :func:`row_kind`).
    """
    _check_batch(images, "gradient")
    tp = train_pass(pair, images, targets)
    return compare_gradients(tp) + tp.gates


def _torch_optimizer_state(optimizer: torch.optim.Optimizer, named: list) -> dict:
    """AdamW's per-parameter state by name (parameters torch skipped have none)."""
    state = {}
    for name, p in named:
        if p in optimizer.state:
            s = optimizer.state[p]
            state[name] = {"exp_avg": s["exp_avg"].numpy().copy(),
                           "exp_avg_sq": s["exp_avg_sq"].numpy().copy(),
                           "step": np.int64(int(s["step"]))}
    return state


def _jittor_optimizer_state(optimizer: jittor_engine.AdamW, named: list) -> dict:
    """AdamW's per-parameter state by name, as torch's: Jittor keeps ``m`` (exp_avg),
    ``values`` (exp_avg_sq) and ``steps`` per group; a parameter never updated has none."""
    names = {id(var): name for name, var in named}
    state = {}
    for group in optimizer.param_groups:
        for var, m, v, steps in zip(group["params"], group["m"], group["values"], group["steps"]):
            if steps:
                state[names[id(var)]] = {"exp_avg": m.numpy(), "exp_avg_sq": v.numpy(),
                                         "step": np.int64(steps)}
    return state


def _jittor_clipped_grads(optimizer: jittor_engine.AdamW,
                          named: list) -> dict[str, np.ndarray | None]:
    """The gradients Jittor's optimizer holds after clipping by parameter name, None for a
    parameter the backward did not reach (torch's ``grad is None``)."""
    names = {id(var): name for name, var in named}
    return {names[id(var)]: g.numpy() if reached else None
            for group in optimizer.param_groups
            for var, g, reached in zip(group["params"], group["grads"], group["reached"])}


def _numerically_zero(ref: dict[str, np.ndarray | None],
                      test: dict[str, np.ndarray]) -> dict[str, str]:
    """Parameters whose clipped gradients are below the ``grad.zero`` floor on both sides.

    Returns:
        ``name -> description of both norms and the floor`` for each such parameter.
    """
    floor = tolerance("grad.zero", "step").atol * _global_norm(ref)
    zero = {}
    for name, g in ref.items():
        if g is None or test.get(name) is None:
            continue
        norms = float(np.linalg.norm(g)), float(np.linalg.norm(test[name]))
        if max(norms) <= floor:
            zero[name] = (f"norms {norms[0]:.3g} torch, {norms[1]:.3g} Jittor <= {floor:.3g} "
                          "after clipping")
    return zero


def _reference_update(optimizer: torch.optim.Optimizer, named: list,
                      before: dict[str, np.ndarray],
                      grads: dict[str, np.ndarray | None]) -> dict[str, dict[str, np.ndarray]]:
    """What the reference optimizer does with the port's gradients, per parameter.

    A fresh ``torch.optim.AdamW`` with the hyper-parameters of each group of ``optimizer``
    (fresh: its state starts empty, as the step checked is a first step) takes one step on
    fp32 copies of ``before`` whose ``.grad`` are ``grads`` (left None where ``grads`` has
    None: torch then skips the parameter).

    Returns:
        ``name -> {"update": after - before (float64), "exp_avg": ..., "exp_avg_sq": ...}``
        (no moments for a skipped parameter).
    """
    names = {id(p): name for name, p in named}
    copies, groups = {}, []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = names[id(p)]
            copies[name] = torch.tensor(before[name], dtype=torch.float32, requires_grad=True)
            if grads[name] is not None:
                copies[name].grad = torch.from_numpy(np.ascontiguousarray(grads[name], np.float32))
            params.append(copies[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    reference = torch.optim.AdamW(groups)
    reference.step()
    return {name: {"update": t.detach().numpy().astype(np.float64) - before[name],
                   **{key: value.numpy() for key, value in reference.state[t].items()
                      if key in ("exp_avg", "exp_avg_sq")}}
            for name, t in copies.items()}


def _same_grad_update(test: np.ndarray, ref: np.ndarray, before: np.ndarray,
                      path: str) -> Comparison:
    """The port's update against the reference optimizer's on the same gradient.

    Both are ``after - before`` of fp32 weights, each side rounding the weight at least twice
    (AdamW's decay, then its step). Where the update is small against the weight, that
    rounding is a visible share of it: a backbone BatchNorm weight of ~1 moves by ~lr = 1e-5,
    about 80 units in the last place, so two exact implementations differ by a few percent
    of the update there. The relative-L2 limit is the larger of the ``step`` entry's and
    ``update.rounding``'s ``atol`` ulps of the weight per element; the row notes when the
    rounding limit applied.
    """
    tol = tolerance("step", path)
    ulps = tolerance("update.rounding", path).atol
    spacing = np.spacing(np.abs(before).astype(np.float32)).astype(np.float64)
    ref_norm = float(np.linalg.norm(ref))
    floor = ulps * float(np.linalg.norm(spacing)) / ref_norm if ref_norm > 0 else math.inf
    limit = max(tol.max_rel_l2, floor)
    c = compare_arrays(test, ref, Tolerance(atol=tol.atol, rtol=tol.rtol, max_rel_l2=limit,
                                            min_cosine=tol.min_cosine), path)
    if c.passed and c.rel_l2 > tol.max_rel_l2:
        c.reason = (f"rel L2 {c.rel_l2:.3g} within the weights' fp32 rounding: {ulps:g} ulps "
                    f"per element = {floor:.3g} of this update")
    return c


def _zero_or_noise_aware(c: Comparison, zero: str | None, floor: float, what: str) -> Comparison:
    """A failed row of a parameter whose gradient is numerically zero on both sides passes
    (``zero`` describes the norms); any other goes through :func:`_noise_aware` (a nan
    ``floor``: no allowance)."""
    if not c.passed and zero is not None:
        c.passed = True
        c.reason = f"gradient numerically zero on both sides ({zero})"
        return c
    return _noise_aware(c, floor, what)


def _cross_update(test: np.ndarray, ref: np.ndarray, zero: str | None, floor: float,
                  path: str) -> Comparison:
    """The port's update against the reference's, allowing AdamW's sign flips.

    AdamW's first step moves each element by ``~lr * g / (|g| + eps)``: ``~lr * sign(g)``
    unless ``|g|`` is near ``eps`` (1e-8; the clipped gradients are ~1e-5 of the raw ones).
    An element whose gradient is within the two sides' gradient noise of 0 can move by
    ``+lr`` on one side and ``-lr`` on the other: ``2 lr`` against an update norm of
    ``~lr * sqrt(n)``, i.e. ``2 / sqrt(n)`` relative L2 per flipped element, 0.25 for a
    64-channel BatchNorm bias (measured: r18vd at 640, seeded weights,
    ``backbone.res_layers.0.blocks.0.branch2a.norm.bias`` 0.245 with its gradient within
    3x of the reference's own fp32 error). The limit is the largest of the ``step`` entry,
    the ``noise`` factor times the reference's own fp32 update error (``floor``), and
    ``2 * sqrt(k / n)`` for ``k = max(atol, rtol * n)`` flips of the ``update.flips`` entry;
    the row reports the flips it counted (elements moving by more than ``lr / 2`` in
    opposite directions).
    """
    c = compare_arrays(test, ref, _tolerance(path), path)
    if c.passed or c.shape_ref != c.shape_test:
        return c
    if zero is not None:
        return _zero_or_noise_aware(c, zero, floor, "update")
    n = max(ref.size, 1)
    flips_tol = tolerance("update.flips", path)
    allowed = max(flips_tol.atol, flips_tol.rtol * n)
    scale = float(np.abs(ref).max(initial=0.0))
    flipped = int(np.sum((np.abs(test) > scale / 4) & (np.abs(ref) > scale / 4)
                         & (np.sign(test) != np.sign(ref))))
    limits = {"step entry": _tolerance(path).max_rel_l2,
              f"{tolerance('noise', path).atol:g}x the reference's own fp32 error {floor:.3g}":
                  tolerance("noise", path).atol * floor if math.isfinite(floor) else 0.0,
              f"{allowed:g} AdamW sign flips of {n}": 2.0 * math.sqrt(allowed / n)}
    reason, limit = max(limits.items(), key=lambda kv: kv[1])
    c.passed = c.rel_l2 <= limit and c.within == 1.0
    verdict = "within" if c.passed else "exceeds"
    c.reason = (f"rel L2 {c.rel_l2:.3g} {verdict} {limit:.3g} ({reason}); {flipped} elements "
                f"moved in opposite directions")
    return c


# The row kind of a path of this module's checks: the first prefix that matches.
_KINDS = (("grad.", "grad"), ("train.relu_gate.", "decision"), ("train.l1_sign.", "decision"),
          ("train.sample_cell.", "decision"),
          ("ema.", "ema"),
          ("buffer.", "buffer.step"), ("trajectory.", "trajectory"), ("", "step"))


def row_kind(path: str) -> str:
    """The kind (tolerance-table and report kind) of a comparison made by this module."""
    return next(kind for prefix, kind in _KINDS if path.startswith(prefix))


def add_rows(result: CheckResult, comparisons: list[Comparison]) -> None:
    """Adds this module's comparisons to a check result, each under its :func:`row_kind`."""
    for c in comparisons:
        result.add(row_kind(c.path), [c])


def _tolerance(path: str) -> Tolerance:
    return tolerance(row_kind(path), path)


class _TwoSteps:
    """One official training step of both sides (and the float64 replay), decisions forced.

    Both engines' ``train_step`` run with the official clipping; the reference's top-k,
    matches, ReLU gates, sampling cells and L1 signs are forced into the port, and, when a
    replay is given,
    into it.

    Attributes:
        optimizers: ``(torch AdamW, Jittor AdamW)`` over the official groups.
        emas: ``(torch EMA, Jittor EMA)`` or ``(None, None)``.
        seconds: ``(torch, Jittor)`` wall time of the last step.
        flips: ReLU gates and sampling cells per module and L1 signs the port set differently
            in the last step.
    """

    def __init__(self, pair: ModelPair, replay: Float64Replay | None, ema: bool) -> None:
        cfg = pair.cfg
        self.pair = pair
        self.replay = replay
        self.clip = cfg.schedule.clip_max_norm
        self.optimizers = (torch_ref.build_optimizer(pair.torch_model, cfg),
                           jittor_impl.build_optimizer(pair.jittor_model, cfg))
        self.emas = (None, None)
        if ema:
            self.emas = (torch_ref.build_ema(pair.torch_model, cfg),
                         jittor_impl.build_ema(pair.jittor_model, cfg))
            for e in self.emas:
                e.updates = e.warmups
        self.ema = ema
        self.seconds = (math.nan, math.nan)
        self.flips: dict[str, int] = {}

    def __call__(self, images: np.ndarray, targets: list[dict]) -> tuple[float, float, float,
                                                                          list[Comparison]]:
        """Returns the total losses (torch, Jittor, float64 replay or nan) and the tie rows."""
        pair, cfg = self.pair, self.pair.cfg
        _align_streams(pair)
        rng_state = pair.torch_model.rng.state_dict()
        criterion_t = torch_ref.build_criterion(cfg)
        criterion_j = jittor_impl.build_criterion(cfg)
        with ForcedTies(pair, criterion_t, criterion_j) as ties:
            start = time.perf_counter()
            loss_t = torch_engine.train_step(pair.torch_model, criterion_t, self.optimizers[0],
                                             torch.from_numpy(images), to_torch(targets),
                                             self.clip, self.emas[0])["loss"]
            middle = time.perf_counter()
            topk = pair.torch_model.decoder.last_topk_ind.numpy()
            matches = dict(criterion_t.last_indices)
            loss_64 = math.nan
            if self.replay is not None:
                decisions = Decisions(rng_state, topk, matches, ties.reference)
                loss_64 = self.replay.train_step(images, targets, decisions, self.clip,
                                                 self.ema)["loss"]
                ties.set_reference_error(self.replay.tie_errors)
            criterion_j.forced_indices = matches
            start_j = time.perf_counter()
            with _ForcedTopk(pair, topk):
                loss_j = jittor_engine.train_step(pair.jittor_model, criterion_j,
                                                  self.optimizers[1], jt.array(images),
                                                  to_jittor(targets), self.clip,
                                                  self.emas[1])["loss"]
            self.seconds = (middle - start, time.perf_counter() - start_j)
        tie_rows = ties.decisions()
        self.flips = ties.flips
        return loss_t, loss_j, loss_64, tie_rows


def check_optimizer_step(pair: ModelPair, images: np.ndarray, targets: list[dict]) -> list[Comparison]:
    """One official training step on both sides, then everything the step changed.

    The step is each framework's ``engine.train_step``: forward, ``sum`` of the weighted
    losses, backward, global-norm clipping at the variant's ``clip_max_norm`` (0.1), AdamW
    over the official parameter groups (``build_optimizer``), EMA update (``build_ema``). A
    float64 replay of the reference takes the same step (precision floors).

    The EMA is built with the official decay and warm-up, but its update count is set to one
    warm-up period (``updates = warmups``): a fresh EMA's first decay is
    ``0.9999 * (1 - exp(-1 / 2000)) ~ 5e-4``, so the average would be the new weights and the
    averaging itself would go unchecked; one period in, the decay is
    ``0.9999 * (1 - exp(-(w + 1) / w)) ~ 0.63`` and the average visibly mixes old and new.

    Rows (paths): ``update.<param>`` (after - before, against the reference's, within the
    ``noise`` factor of the reference's own fp32 update error), ``update_same_grad.<param>``
    (the port's update against ``torch.optim.AdamW`` stepping from the same weights with the
    port's own clipped gradients: the optimizer alone), ``param.<param>`` (after),
    ``exp_avg.<param>`` / ``exp_avg_sq.<param>`` (AdamW moments, noise-aware like the
    gradients they hold), ``exp_avg_same_grad.<param>`` / ``exp_avg_sq_same_grad.<param>``,
    ``step_count.<param>``, ``ema.<key>`` (every EMA state entry), ``buffer.<key>``
    (BatchNorm running statistics and ``num_batches_tracked``), and the tie decisions
    (``train.relu_gate.<module>``, ``train.sample_cell.<module>``, ``train.l1_sign.loss_bbox``).
    :func:`row_kind` gives each row's kind.

    Args:
        pair: The model pair; both models take one step (their weights change).
        images: [bs, 3, h, w] float32, bs >= 2.
        targets: Per-image targets (numpy).

    Returns:
        The comparisons.
    """
    _check_batch(images, "optimizer-step")
    pair.train()
    named_t = torch_trainable(pair.torch_model)
    named_j = trainable_parameters(pair.jittor_model)
    before_t, before_j = _numpy_params(named_t), _numpy_params(named_j)
    replay = Float64Replay(pair)
    step = _TwoSteps(pair, replay, ema=True)
    tie_rows = step(images, targets)[3]
    opt_t, opt_j = step.optimizers

    after_t, after_j = _numpy_params(named_t), _numpy_params(named_j)
    after_64 = replay.weights()
    rows = []
    names = [n for n, _ in named_t]
    if names != [n for n, _ in named_j]:
        only_t = sorted(set(names) - set(before_j))
        only_j = sorted(set(before_j) - set(names))
        rows.append(Comparison("param.names", (), (), "", "",
                               reason=f"trainable parameters differ: torch only {only_t[:5]}, "
                                      f"Jittor only {only_j[:5]}"))
        names = [n for n in names if n in before_j]
    clipped_j = _jittor_clipped_grads(opt_j, named_j)
    zero = _numerically_zero({n: None if p.grad is None else p.grad.numpy() for n, p in named_t},
                             clipped_j)
    same_grad = _reference_update(opt_t, named_t, before_j, clipped_j)
    state_t = _torch_optimizer_state(opt_t, named_t)
    state_j = _jittor_optimizer_state(opt_j, named_j)
    state_64 = _torch_optimizer_state(replay.optimizer, torch_trainable(replay.model))
    for name in names:
        ref = after_t[name] - before_t[name]
        rows.append(_cross_update(after_j[name] - before_j[name], ref, zero.get(name),
                                  _rel_l2(ref, after_64[name] - before_t[name]), f"update.{name}"))
        path = f"update_same_grad.{name}"
        rows.append(_zero_or_noise_aware(
            _same_grad_update(after_j[name] - before_j[name], same_grad[name]["update"],
                              before_j[name], path), zero.get(name), math.nan, "update"))
        path = f"param.{name}"
        rows.append(compare_arrays(after_j[name], after_t[name], _tolerance(path), path))
        held = (name in state_t, name in state_j)
        if held != (True, True):
            sides = {(False, False): "neither side (no gradient: both skipped the parameter)",
                     (False, True): "the Jittor side only (torch skipped it: no gradient)",
                     (True, False): "the torch side only (Jittor skipped it)"}
            rows.append(Comparison(f"exp_avg.{name}", (), (), "", "", passed=not any(held),
                                   reason=f"AdamW state on {sides[held]}"))
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            path = f"{key}.{name}"
            c = compare_arrays(state_j[name][key], state_t[name][key], _tolerance(path), path)
            rows.append(_zero_or_noise_aware(
                c, zero.get(name), _rel_l2(state_t[name][key], state_64[name][key]), key))
            path = f"{key}_same_grad.{name}"
            rows.append(_zero_or_noise_aware(
                compare_arrays(state_j[name][key], same_grad[name][key], _tolerance(path), path),
                zero.get(name), math.nan, key))
        path = f"step_count.{name}"
        rows.append(compare_arrays(state_j[name]["step"], state_t[name]["step"],
                                   _tolerance(path), path))
    ema_64 = to_numpy(replay.ema.module.state_dict())
    for c in compare_tree({"ema": to_numpy(step.emas[1].module.state_dict())},
                          {"ema": to_numpy(step.emas[0].module.state_dict())}, _tolerance):
        ref = to_numpy(step.emas[0].module.state_dict())[c.path[len("ema."):]]
        floor = _rel_l2(ref, ema_64[c.path[len("ema."):]]) if ref.dtype.kind == "f" else 0.0
        rows.append(_noise_aware(c, floor, "EMA"))
    rows += compare_tree({"buffer": to_numpy(dict(named_buffers(pair.jittor_model)))},
                         {"buffer": to_numpy(dict(pair.torch_model.named_buffers()))},
                         _tolerance)
    return rows + tie_rows


def training_batches(num_classes: int, size: int, batch: int = 2,
                     count: int = 2) -> list[tuple[np.ndarray, list[dict]]]:
    """A small fixed set of seeded batches for trajectories.

    Args:
        num_classes: Class count of the targets.
        size: Square image size.
        batch: Images per batch (>= 2).
        count: Number of distinct batches.

    Returns:
        ``count`` pairs ``(images [batch, 3, size, size], targets)``; image ``j`` of batch
        ``i`` has ``_COUNTS[(3 * i + j) % 8]`` targets.
    """
    batches = []
    for i in range(count):
        counts = [_COUNTS[(3 * i + j) % len(_COUNTS)] for j in range(batch)]
        batches.append((seeded_images(batch, size, seed=20 + i),
                        seeded_targets(counts, num_classes, seed=40 + i)))
    return batches


@dataclass
class TrajectoryStep:
    """Both sides (and the float64 replay of the reference) after one training step.

    Attributes:
        step: 1-based step number.
        torch_loss: Reference total loss of the step's forward.
        jittor_loss: Port total loss.
        float64_loss: The float64 replay's total loss.
        loss_rel_diff: ``|jittor - torch| / |torch|``.
        loss_floor: ``|torch - float64| / |float64|``: the reference's own fp32 error.
        weights_rel_l2: ``||w_j - w_t|| / ||w_t||`` over all trainable parameters.
        max_param_rel_l2: Largest per-parameter relative L2 between the sides.
        max_param: Which parameter that is.
        max_param_floor: That parameter's reference fp32 error (against the replay).
        worst_excess: Largest ratio of a parameter's drift to its floor among the parameters
            whose drift exceeds the ``trajectory.weights`` entry (0 when none): the ``noise``
            factor bounds it.
        tie_flips: ReLU gates, sampling cells and L1 signs of the step's forward the port set
            differently
            (forced to the reference's, see :class:`ForcedTies`).
        tie_max_gap: Largest reference ``|x|`` among them (0 when none).
        seconds_torch: Wall time of the reference step.
        seconds_jittor: Wall time of the port step.
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
    tie_max_gap: float
    seconds_torch: float
    seconds_jittor: float


@dataclass
class Trajectory:
    """An N-step training run of both sides on fixed batches."""

    variant: str
    size: int
    batch: int
    steps: list[TrajectoryStep] = field(default_factory=list)
    drift: list[dict[str, tuple[float, float]]] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One flat dict per step (for a table or CSV)."""
        return [dict(vars(s)) for s in self.steps]

    def comparisons(self) -> list[Comparison]:
        """``trajectory`` rows: each step's total loss and weight drift.

        A step's loss passes within the ``trajectory.loss`` entry or the ``noise`` factor of
        the reference's own fp32 loss error at that step; its weights pass when every
        parameter's drift (relative L2 between the sides) is within the ``trajectory.weights``
        entry or the ``noise`` factor of that parameter's reference fp32 error.

        The ReLU gate, sampling cell and L1 sign flips of each step are in the table (:meth:`rows`), not judged: after
        the first step the two sides' weights differ by that step's rounding, the forwards
        drift apart and the gaps of flipped gates grow with them; the trajectory replays the
        reference's decisions on purpose, to measure how the continuous part of training
        drifts.
        """
        rows = []
        for s, drift in zip(self.steps, self.drift):
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
        return rows


def run_trajectory(pair: ModelPair, batches: list[tuple[np.ndarray, list[dict]]],
                   steps: int = 10) -> Trajectory:
    """Trains both sides for ``steps`` official steps on ``batches`` (cycled).

    Both sides start from the reference's state (loaded into the Jittor model, buffers
    included), so that earlier checks on the pair leave no head start. Each step is the
    engines' ``train_step`` with the official AdamW groups and clipping (no EMA: it does not
    feed back into training and :func:`check_optimizer_step` covers it); the reference's
    decisions of each step are forced into the port and into a float64 replay of the
    reference, which gives the reference's own fp32 drift per step.

    Args:
        pair: The model pair; the Jittor model takes the torch model's state, then both are
            trained (their weights change).
        batches: ``(images, targets)`` pairs, e.g. :func:`training_batches`.
        steps: Number of steps.

    Returns:
        The per-step losses and drift.
    """
    if not batches:
        raise ValueError("run_trajectory needs at least one batch")
    for images, _ in batches:
        _check_batch(images, "trajectory")
    pair.train()
    jt_checkpoint.load_state_dict_strict(
        pair.jittor_model, {k: v.numpy() for k, v in pair.torch_model.state_dict().items()},
        "run_trajectory: the reference's state")
    named_t = torch_trainable(pair.torch_model)
    named_j = trainable_parameters(pair.jittor_model)
    replay = Float64Replay(pair)
    two_steps = _TwoSteps(pair, replay, ema=False)
    traj = Trajectory(pair.cfg.name, int(batches[0][0].shape[-1]), int(batches[0][0].shape[0]))
    for i in range(steps):
        images, targets = batches[i % len(batches)]
        loss_t, loss_j, loss_64, tie_rows = two_steps(images, targets)
        w_t, w_j, w_64 = _numpy_params(named_t), _numpy_params(named_j), replay.weights()
        drift = {n: (_rel_l2(w_j[n], w_t[n]), _rel_l2(w_t[n], w_64[n])) for n in w_t}
        worst = max(drift, key=lambda n: drift[n][0])
        diff2 = sum(float(np.sum((w_j[n] - w_t[n]) ** 2)) for n in w_t)
        norm2 = sum(float(np.sum(w_t[n] ** 2)) for n in w_t)
        traj.drift.append(drift)
        traj.steps.append(TrajectoryStep(
            step=i + 1, torch_loss=loss_t, jittor_loss=loss_j, float64_loss=loss_64,
            loss_rel_diff=abs(loss_j - loss_t) / max(abs(loss_t), 1e-30),
            loss_floor=abs(loss_t - loss_64) / max(abs(loss_64), 1e-30),
            weights_rel_l2=math.sqrt(diff2 / norm2), max_param_rel_l2=drift[worst][0],
            max_param=worst, max_param_floor=drift[worst][1],
            worst_excess=max((d / max(f, 1e-300) for d, f in drift.values()
                              if d > tolerance("trajectory", "weights").max_rel_l2), default=0.0),
            tie_flips=sum(two_steps.flips.values()),
            tie_max_gap=max((c.max_abs for c in tie_rows), default=0.0),
            seconds_torch=two_steps.seconds[0], seconds_jittor=two_steps.seconds[1]))
    return traj


def run_training_checks(pair: ModelPair, size: int, batch: int = 2,
                        steps: int = 10) -> tuple[CheckResult, Trajectory]:
    """Gradients, one optimizer step and an N-step trajectory of one model pair.

    The three parts run in that order on the same pair, each from where the previous one
    left the weights (both sides hold the same state up to rounding).

    Args:
        pair: The model pair (trained in place).
        size: Square image size of every batch.
        batch: Images per batch (>= 2).
        steps: Trajectory length.

    Returns:
        The rows (kinds ``grad``, ``decision``, ``step``, ``ema``, ``buffer.step``,
        ``trajectory``) with timings, and the trajectory itself (its :meth:`Trajectory.rows`
        make the table).
    """
    result = CheckResult(pair.cfg.name, pair.weights_source, size)
    batches = training_batches(pair.cfg.num_classes, size, batch)
    images, targets = batches[0]
    start = time.perf_counter()
    add_rows(result, check_gradients(pair, images, targets))
    result.seconds["gradients"] = time.perf_counter() - start
    start = time.perf_counter()
    add_rows(result, check_optimizer_step(pair, images, targets))
    result.seconds["optimizer_step"] = time.perf_counter() - start
    start = time.perf_counter()
    trajectory = run_trajectory(pair, batches, steps)
    add_rows(result, trajectory.comparisons())
    result.seconds["trajectory"] = time.perf_counter() - start
    return result, trajectory
