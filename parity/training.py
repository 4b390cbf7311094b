"""Training-side parity of one step: losses, gradients, the optimizer step, EMA and BatchNorm.

Each check runs in two halves. The reference half (:func:`reference_pass`,
:func:`reference_step`) runs the torch model, records its decisions (:mod:`parity.forcing`)
and replays it in float64 (:mod:`parity.replay`) for its precision floor; the port half
(:func:`port_pass`, :func:`port_step`) runs the Jittor model with the reference's decisions
forced in and compares. A reference serves any number of port runs (the fault catalogue runs
one per injected fault). Losses are summed as the official engine sums them.

Every cross-framework metric may exceed its fixed entry by the ``noise`` factor times the
reference's own fp32 error against the float64 replay; rows note when that allowance was used.
A gradient that is zero in exact arithmetic (its float64 norm at float64 rounding) is judged as
noise in every row it reaches: the port's must stay at the reference's fp32 noise level.
"""

from __future__ import annotations

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
import jittor_impl.engine as jittor_engine
import jittor_impl.trainer as jittor_trainer
import torch_ref
import torch_ref.engine as torch_engine
from jittor_impl.nn import named_buffers, trainable_parameters

from .check import CheckResult
from .compare import Comparison, Tolerance, compare_arrays, compare_tree
from .forcing import Forcing, allowed_forced, override, robust_error
from .arrays import to_numpy
from .models import ModelPair, to_jittor, to_torch
from .ports import official_parameters
from .replay import (Decisions, Float64Replay, build_emas, grads_of, zero_torch_ema, numpy_params,
                     snapshot, trainable)
from .tolerances import loss_tolerance, tolerance

def jittor_gradients(loss: jt.Var, named: list[tuple[str, jt.Var]]) -> dict[str, np.ndarray | None]:
    """Gradients of ``loss`` with respect to named Jittor Vars, ``None`` where there is none
    (:func:`jittor_impl.engine.gradient_probe` tells Jittor's zeros of an unreached Var apart)."""
    with jittor_engine.gradient_probe([var for _, var in named]) as missing:
        grads = jt.grad(loss, [var for _, var in named], retain_graph=False)
    jt.sync(grads)
    return {name: None if i in missing else grads[i].numpy()
            for i, (name, _) in enumerate(named)}


def _rel_l2(test: np.ndarray, ref: np.ndarray) -> float:
    """``||test - ref|| / ||ref||`` in float64 (0 when both are zero, inf when only ref is)."""
    diff = float(np.linalg.norm(np.asarray(test, np.float64) - np.asarray(ref, np.float64)))
    norm = float(np.linalg.norm(np.asarray(ref, np.float64)))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _global_norm(grads: dict[str, np.ndarray | None]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2))
                             for g in grads.values() if g is not None)))


def _check_batch(images: np.ndarray, what: str) -> None:
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"{what} checks need images [bs >= 2, 3, h, w] (torch's CPU BatchNorm "
                         f"backward is wrong for a batch of 1), got shape {images.shape}")


def noise_aware(c: Comparison, floor: float, what: str) -> Comparison:
    """Lets a comparison that failed only on ``rel_l2``/``cosine`` pass within the ``noise``
    factor of the reference's own fp32 error ``floor`` (relative L2 against its float64
    replay); the cosine limit follows as ``1 - (factor * floor) ** 2 / 2``. Records ``floor``
    on the row."""
    if math.isfinite(floor):
        c.floor = floor
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


def analytically_zero(float64_grads: dict[str, np.ndarray | None]) -> set[str]:
    """Parameters whose float64 gradient is at float64 rounding: zero in exact arithmetic (a
    bias whose shift a following train-mode BatchNorm removes). Below the ``grad.zero64``
    entry's ``atol`` times the whole float64 gradient's norm."""
    floor = tolerance("grad.zero64", "grad").atol * _global_norm(float64_grads)
    return {name for name, g in float64_grads.items()
            if g is not None and float(np.linalg.norm(g)) <= floor}


def _zero_row(path: str, test: np.ndarray, ref: np.ndarray, floor: float) -> Comparison:
    """A gradient that is zero in exact arithmetic: both sides are fp32 noise, and the port's
    passes when its norm stays within the ``noise`` factor of the reference's (or ``floor``)."""
    c = compare_arrays(test, ref, Tolerance(atol=math.inf), path)
    norms = float(np.linalg.norm(ref)), float(np.linalg.norm(test))
    factor = tolerance("noise.zero", path).atol
    limit = max(factor * norms[0], floor)
    c.passed = c.shape_ref == c.shape_test and norms[1] <= limit
    c.reason = (f"zero in exact arithmetic (float64 replay): norms {norms[0]:.3g} torch, "
                f"{norms[1]:.3g} Jittor, noise limit {limit:.3g}")
    return c


def _one_sided(path: str, side: str, what: str) -> Comparison:
    return Comparison(path, (), (), "", "", reason=f"{what} on the {side} side only")


# ---------------------------------------------------------------------------------------------
# One forward and backward
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainReference:
    """The reference half of a train pass: what the port is compared with and forced to.

    Attributes:
        images, targets: The batch.
        forcing: The recorded decisions (forced into the port by :func:`port_pass`).
        criterion: The port's criterion the decisions are forced into.
        decisions: The reference's decisions (for a float64 replay).
        losses: Every weighted loss term and ``loss``, fp32 reference.
        grads: ``name -> gradient`` or ``None``, trainable parameters only.
        float64_losses, float64_grads: The float64 replay's (empty without one).
        tie_errors: The replay's robust error of every decision's inputs, by path.
        seconds: Wall time of the reference forward + backward and of the replay.
    """

    images: np.ndarray
    targets: list[dict]
    forcing: Forcing
    criterion: Any
    decisions: Decisions
    losses: dict[str, float]
    grads: dict[str, np.ndarray | None]
    float64_losses: dict[str, float] = field(default_factory=dict)
    float64_grads: dict[str, np.ndarray | None] = field(default_factory=dict)
    tie_errors: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainPass:
    """One train-mode forward and backward of both models on the same batch.

    Attributes:
        torch_losses / jittor_losses: Every weighted loss term and ``loss``.
        torch_grads / jittor_grads: ``name -> gradient`` or ``None``.
        float64_losses / float64_grads: The reference's float64 replay (empty when not run).
        decisions: The reference's decisions, forced into the port.
        gates: The counted ``decision`` rows of every forced decision.
        seconds: Wall time of each side (and of the replay).
    """

    torch_losses: dict[str, float]
    jittor_losses: dict[str, float]
    torch_grads: dict[str, np.ndarray | None]
    jittor_grads: dict[str, np.ndarray | None]
    float64_losses: dict[str, float]
    float64_grads: dict[str, np.ndarray | None]
    decisions: Decisions
    gates: list[Comparison] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _capture_outputs(criterion: torch.nn.Module, sink: list) -> list:
    """An override of ``criterion.forward`` that keeps the outputs it is called with."""
    def forward(outputs, targets):
        sink.append(outputs)
        return type(criterion).forward(criterion, outputs, targets)
    return [(criterion, "forward", forward)]


def reference_pass(pair: ModelPair, images: np.ndarray, targets: list[dict],
                   float64: bool = True) -> TrainReference:
    """The reference's train-mode forward, official loss sum and backward, its decisions
    recorded, and (with ``float64``) its float64 replay. The torch ``.grad`` fields are
    cleared afterwards; BatchNorm running statistics advance once."""
    pair.train()
    model = pair.torch_model
    named = trainable(model)
    for _, p in named:
        p.grad = None
    replay = Float64Replay(pair) if float64 else None
    rng_state = model.rng.state_dict()
    criterion_t = torch_ref.build_criterion(pair.cfg)
    criterion_j = jittor_impl.build_criterion(pair.cfg)
    forcing = Forcing(pair, criterion_t, criterion_j)
    start = time.perf_counter()
    outputs: list = []
    with forcing.recording(), override(_capture_outputs(criterion_t, outputs)):
        targets_t = to_torch(targets)
        losses_t = criterion_t(model(torch.from_numpy(images), targets_t), targets_t)
        loss_t = sum(losses_t.values())
        loss_t.backward()
    forcing.record_matches(outputs[0], targets)
    grads = grads_of(named)
    for _, p in named:
        p.grad = None
    seconds = {"torch": time.perf_counter() - start}
    decisions = forcing.recorded(rng_state)
    losses = {k: float(v.detach()) for k, v in losses_t.items()} | {"loss": float(loss_t.detach())}
    ref = TrainReference(images, targets, forcing, criterion_j, decisions, losses, grads,
                         seconds=seconds)
    if replay is not None:
        start = time.perf_counter()
        ref.float64_grads = replay.gradients(images, targets, decisions)
        ref.float64_losses = dict(replay.losses)
        ref.tie_errors = dict(replay.tie_errors)
        forcing.set_reference_error(replay.tie_errors)
        seconds["float64"] = time.perf_counter() - start
    return ref


def port_pass(pair: ModelPair, ref: TrainReference) -> TrainPass:
    """The port's train-mode forward and backward on the reference's batch, its decisions
    forced in; the Jittor model's shared stream starts where the reference's did."""
    pair.train()
    pair.jittor_model.rng.load_state_dict(ref.decisions.rng_state)
    start = time.perf_counter()
    with ref.forcing.forcing():
        targets_j = to_jittor(ref.targets)
        losses_j = ref.criterion(pair.jittor_model(jt.array(ref.images), targets_j), targets_j)
        loss_j = sum(losses_j.values())
        grads = jittor_gradients(loss_j, trainable_parameters(pair.jittor_model))
        losses = {k: float(v.numpy().reshape(())) for k, v in losses_j.items()}
        losses["loss"] = float(loss_j.numpy().reshape(()))
    seconds = dict(ref.seconds, jittor=time.perf_counter() - start)
    return TrainPass(ref.losses, losses, ref.grads, grads, ref.float64_losses, ref.float64_grads,
                     ref.decisions, ref.forcing.decisions(), seconds)


def train_pass(pair: ModelPair, images: np.ndarray, targets: list[dict],
               float64: bool = True) -> TrainPass:
    """:func:`reference_pass` then :func:`port_pass`."""
    return port_pass(pair, reference_pass(pair, images, targets, float64))


def compare_losses(tp: TrainPass) -> list[Comparison]:
    """One ``train_loss.<term>`` row per loss term and the total, each against its own fp32
    floor (its gap to the float64 replay) through :func:`~parity.tolerances.loss_tolerance`."""
    rows = []
    for term, ref in tp.torch_losses.items():
        path = f"train_loss.{term}"
        if term not in tp.jittor_losses:
            rows.append(_one_sided(path, "torch", "loss term"))
            continue
        exact = tp.float64_losses.get(term)
        floor = abs(ref - exact) / max(abs(exact), 1e-12) if exact is not None else 0.0
        c = compare_arrays(np.float64(tp.jittor_losses[term]), np.float64(ref),
                           loss_tolerance(path, floor), path)
        if floor:
            c.reason = (c.reason + "; " if c.reason else "") + f"fp32 floor {floor:.3g}"
        rows.append(c)
    rows += [_one_sided(f"train_loss.{t}", "Jittor", "loss term")
             for t in tp.jittor_losses if t not in tp.torch_losses]
    return rows


def compare_gradients(tp: TrainPass) -> list[Comparison]:
    """One ``grad.<param>`` row per trainable parameter (PyTorch convention).

    A parameter trainable on one side only, or with a gradient on one side only, fails by
    name; without a gradient on both sides it passes with that noted. With a float64 replay a
    gradient may differ by the ``noise`` factor times the reference's own fp32 error, and one
    that is zero in exact arithmetic (:func:`analytically_zero`) is judged as noise. Without a
    replay, gradients below the ``grad.zero`` floor on both sides pass as numerically zero.
    """
    floor = tolerance("grad.zero", "grad").atol * _global_norm(tp.torch_grads)
    zero = analytically_zero(tp.float64_grads)
    rows = []
    names = list(tp.torch_grads) + [n for n in tp.jittor_grads if n not in tp.torch_grads]
    for name in names:
        path = f"grad.{name}"
        if name not in tp.jittor_grads or name not in tp.torch_grads:
            rows.append(_one_sided(path, "torch" if name in tp.torch_grads else "Jittor",
                                   "trainable parameter"))
            continue
        ref, test = tp.torch_grads[name], tp.jittor_grads[name]
        if ref is None and test is None:
            rows.append(Comparison(path, (), (), "", "", passed=True,
                                   reason="no gradient on either side"))
            continue
        if ref is None or test is None:
            rows.append(_one_sided(path, "torch" if test is None else "Jittor", "gradient"))
            continue
        if name in zero:
            rows.append(_zero_row(path, test, ref, floor))
            continue
        c = compare_arrays(test, ref, tolerance("grad", path), path)
        norms = float(np.linalg.norm(ref)), float(np.linalg.norm(test))
        if tp.float64_grads.get(name) is not None:
            c = noise_aware(c, _rel_l2(ref, tp.float64_grads[name]), "gradient")
        elif not c.passed and max(norms) <= floor:
            c.passed = True
            c.reason = (f"numerically zero on both sides (norms {norms[0]:.3g} torch, "
                        f"{norms[1]:.3g} Jittor <= {floor:.3g})")
        rows.append(c)
    return rows


def check_gradients(pair: ModelPair, images: np.ndarray, targets: list[dict]) -> list[Comparison]:
    """Every loss term, the gradient of every trainable parameter and every forced decision of
    one train-mode backward (see :func:`compare_losses`, :func:`compare_gradients`,
    :class:`~parity.forcing.Forcing`)."""
    _check_batch(images, "gradient")
    return gradient_rows(train_pass(pair, images, targets))


def gradient_rows(tp: TrainPass) -> list[Comparison]:
    """The rows of :func:`check_gradients` from a finished pass."""
    return compare_losses(tp) + compare_gradients(tp) + tp.gates


def port_trainable(pair: ModelPair) -> list[tuple[str, jt.Var]]:
    """Another port's trainable Vars under the official names: its parameters
    (:func:`~parity.ports.official_parameters`) that are not ``stop_grad``."""
    return [(name, var) for name, var in official_parameters(
        pair.torch_model, pair.jittor_model, pair.port.key_map) if not var.is_stop_grad()]


def port_gradient_pass(pair: ModelPair, images: np.ndarray, targets: list[dict]) -> TrainPass:
    """Another port's train-mode forward, criterion and backward against the reference's, on
    the same batch and the same denoising noise (the port's ``rng`` rewound to the reference's
    state), with the reference's float64 copy run the same way for each term's and gradient's
    fp32 floor. No decision is forced: the port has no hooks for it."""
    pair.train()
    model = pair.torch_model
    named_t = trainable(model)
    for _, p in named_t:
        p.grad = None
    rng_state = model.rng.state_dict()
    start = time.perf_counter()
    targets_t = to_torch(targets)
    losses_t = torch_ref.build_criterion(pair.cfg)(model(torch.from_numpy(images), targets_t), targets_t)
    loss_t = sum(losses_t.values())
    loss_t.backward()
    torch_grads = grads_of(named_t)
    for _, p in named_t:
        p.grad = None
    seconds = {"torch": time.perf_counter() - start}

    model64 = copy.deepcopy(model).double().train()
    model64.rng.load_state_dict(rng_state)
    targets64 = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in targets_t]
    losses64 = torch_ref.build_criterion(pair.cfg).double()(
        model64(torch.from_numpy(images).double(), targets64), targets64)
    loss64 = sum(losses64.values())
    loss64.backward()
    float64_grads = grads_of(trainable(model64))
    del model64

    start = time.perf_counter()
    pair.jittor_model.rng.load_state_dict(rng_state)
    targets_j = to_jittor(targets)
    losses_j = pair.port_parts.criterion(pair.jittor_model(jt.array(images), targets_j), targets_j)
    loss_j = sum(losses_j.values())
    jittor_grads = jittor_gradients(loss_j, port_trainable(pair))
    seconds["jittor"] = time.perf_counter() - start

    def floats(losses: dict, total: Any) -> dict[str, float]:
        return {k: float(to_numpy(v).reshape(())) for k, v in losses.items()} | {
            "loss": float(to_numpy(total).reshape(()))}

    def detached(losses: dict) -> dict:
        return {k: v.detach() for k, v in losses.items()}

    return TrainPass(floats(detached(losses_t), loss_t.detach()), floats(losses_j, loss_j),
                     torch_grads, jittor_grads, floats(detached(losses64), loss64.detach()),
                     float64_grads,
                     decisions=None, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------

def _torch_optimizer_state(optimizer: torch.optim.Optimizer, named: list, copy: bool = True) -> dict:
    """AdamW's per-parameter state by name (parameters torch skipped have none): copies, or
    with ``copy=False`` views of the moments of an optimizer that steps no more."""
    take = np.array if copy else np.asarray
    state = {}
    for name, p in named:
        if p in optimizer.state:
            s = optimizer.state[p]
            state[name] = {"exp_avg": take(s["exp_avg"].numpy()),
                           "exp_avg_sq": take(s["exp_avg_sq"].numpy()),
                           "step": np.int64(int(s["step"]))}
    return state


def _jittor_optimizer_state(optimizer: jittor_engine.AdamW, named: list) -> dict:
    """AdamW's per-parameter state by name, as torch's (``m``, ``values``, ``steps``)."""
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
    """The gradients Jittor's optimizer holds after clipping, None where not reached."""
    names = {id(var): name for name, var in named}
    return {names[id(var)]: g.numpy() if reached else None
            for group in optimizer.param_groups
            for var, g, reached in zip(group["params"], group["grads"], group["reached"])}


def _same_grad_update(groups: list[dict], before: dict[str, np.ndarray],
                      grads: dict[str, np.ndarray | None],
                      state: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """What ``torch.optim.AdamW`` (a fresh one with the hyper-parameters of each of the
    reference's ``groups``, holding ``state``'s moments and counts by name when given) does
    in one step from ``before`` with the port's ``grads``.

    Returns:
        ``name -> {"update": after - before (float64), "exp_avg", "exp_avg_sq"}``.
    """
    copies, torch_groups = {}, []
    for group in groups:
        params = []
        for name in group["names"]:
            copies[name] = torch.tensor(before[name], dtype=torch.float32, requires_grad=True)
            if grads.get(name) is not None:
                copies[name].grad = torch.from_numpy(np.ascontiguousarray(grads[name], np.float32))
            params.append(copies[name])
        torch_groups.append({**{k: v for k, v in group.items() if k != "names"}, "params": params})
    reference = torch.optim.AdamW(torch_groups)
    for name, held in (state or {}).items():
        reference.state[copies[name]] = {
            "step": torch.tensor(float(held["step"])),
            "exp_avg": torch.tensor(held["exp_avg"], dtype=torch.float32),
            "exp_avg_sq": torch.tensor(held["exp_avg_sq"], dtype=torch.float32)}
    reference.step()
    return {name: {"update": t.detach().numpy().astype(np.float64) - before[name],
                   **{key: value.numpy() for key, value in reference.state[t].items()
                      if key in ("exp_avg", "exp_avg_sq")}}
            for name, t in copies.items()}


def _rounding_floor(change: np.ndarray, value: np.ndarray, path: str) -> float:
    """The ``update.rounding`` entry's ulps of fp32 ``value`` per element, relative to the
    norm of ``change``: how far two exact fp32 computations of ``value + change`` may part."""
    ulps = tolerance("update.rounding", path).atol
    spacing = np.spacing(np.abs(value).astype(np.float32)).astype(np.float64)
    norm = float(np.linalg.norm(change))
    return ulps * float(np.linalg.norm(spacing)) / norm if norm > 0 else math.inf


def rounding_limited(test: np.ndarray, ref: np.ndarray, value: np.ndarray,
                     path: str) -> Comparison:
    """The port's change of fp32 values against the reference formula's on the same inputs.

    Both are ``after - before`` of fp32 values, so the values' rounding (the
    ``update.rounding`` entry's ulps of ``value`` per element) is part of the limit where the
    change is small against the value; otherwise the ``step`` entry applies.
    """
    tol = tolerance("step", path)
    ulps = tolerance("update.rounding", path).atol
    floor = _rounding_floor(ref, value, path)
    limit = max(tol.max_rel_l2, floor)
    c = compare_arrays(test, ref, Tolerance(atol=tol.atol, rtol=tol.rtol, max_rel_l2=limit,
                                            min_cosine=tol.min_cosine), path)
    if c.passed and c.rel_l2 > tol.max_rel_l2:
        c.reason = (f"rel L2 {c.rel_l2:.3g} within the values' fp32 rounding: {ulps:g} ulps "
                    f"per element = {floor:.3g} of this change")
    return c


def cross_update(test: np.ndarray, ref: np.ndarray, before: np.ndarray,
                 grad_ref: np.ndarray | None, grad_64: np.ndarray | None, group: dict,
                 path: str) -> Comparison:
    """The port's first AdamW update against the reference's, element by element.

    A first step moves an element by ``-lr * (phi(g) + wd * w)`` with ``phi(g) = g / (|g| +
    eps)``: ``~lr * sign(g)`` where ``|g| >> eps``, but steep where ``|g|`` is near ``eps``
    and a sign flip where ``g`` is within its noise of 0. The gradient's noise band ``B`` is
    the ``noise`` factor times the reference's own robust fp32 gradient error (against the
    float64 replay); each element may differ by what a gradient error of ``B`` does to
    ``phi`` (``lr * max |phi(g +- B) - phi(g)|``) plus the ``update.rounding`` ulps of its
    weight and of the update (each side computes both in fp32). The bound rests on a
    quantile of the noise, so up to the ``decision.forced`` cap of elements may exceed it. Elements that moved in opposite directions are counted and capped like forced
    decisions. The optimizer itself is checked exactly by the
    ``update_same_grad`` rows; this row checks that the gradients' difference explains the
    updates'.
    """
    c = compare_arrays(test, ref, Tolerance(atol=math.inf), path)
    c.compared, c.flipped, c.forced = int(ref.size), 0, 0
    if c.shape_ref != c.shape_test or grad_ref is None:
        c.passed = c.shape_ref == c.shape_test and c.max_abs == 0.0
        c.reason = c.reason or ("" if c.passed else "the reference has no gradient")
        return c
    lr, eps = float(group["lr"]), float(group["eps"])
    g = np.asarray(grad_ref, np.float64)
    band = (tolerance("noise", path).atol * robust_error(grad_ref, grad_64)
            if grad_64 is not None else 0.0)

    def phi(x: np.ndarray) -> np.ndarray:
        return x / (np.abs(x) + eps)
    at_g = phi(g)
    spread = np.maximum(np.abs(phi(g + band) - at_g), np.abs(phi(g - band) - at_g))
    rounding = tolerance("update.rounding", path)
    bound = (lr * spread
             + rounding.atol * np.spacing(np.abs(before).astype(np.float32)).astype(np.float64)
             + rounding.rtol * np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64))
    diff = np.abs(np.asarray(test, np.float64) - np.asarray(ref, np.float64))
    outside = diff > bound
    flipped = (np.sign(test) != np.sign(ref)) & (np.abs(ref) > lr / 2) & (np.abs(test) > lr / 2)
    c.flipped, c.band = int(flipped.sum()), band
    c.forced = int((flipped & ~outside).sum())
    allowed = allowed_forced(path, c.compared)
    ratio = float((diff / np.maximum(bound, 1e-300)).max(initial=0.0))
    beyond = int(outside.sum())
    failures = []
    if beyond > allowed:
        failures.append(f"more than the cap {allowed:g}")
    if c.forced > allowed:
        failures.append(f"{c.forced} sign flips exceed the cap {allowed:g}")
    c.passed = not failures
    worst = ""
    if beyond:
        i = int(np.argmax(diff - bound))
        worst = (f" (worst {diff.flat[i]:.3g} > {bound.flat[i]:.3g} at gradient "
                 f"{g.flat[i]:.3g}, band {band:.3g})")
    c.reason = "; ".join([f"{c.flipped} of {c.compared} elements flipped sign; {beyond} beyond "
                          f"the gradient-noise bound{worst}, largest {ratio:.3g}x", *failures])
    return c


# The row kind of a path of this module's checks: the first prefix that matches.
_KINDS = (("grad.", "grad"), ("train_loss.", "loss"), ("train.", "decision"), ("optimizer.", "step"),
          ("ema", "ema"), ("buffer", "buffer.step"), ("trajectory.", "trajectory"), ("", "step"))


def row_kind(path: str) -> str:
    """The kind (tolerance-table and report kind) of a comparison made by this module."""
    return next(kind for prefix, kind in _KINDS if path.startswith(prefix))


def add_rows(result: CheckResult, comparisons: list[Comparison]) -> None:
    """Adds this module's comparisons to a check result, each under its :func:`row_kind`."""
    for c in comparisons:
        result.add(row_kind(c.path), [c])


def _tolerance(path: str) -> Tolerance:
    return tolerance(row_kind(path), path)


def ema_updates(cfg) -> tuple[int, int]:
    """The EMA update counts one step is checked at: one warm-up period in (the ramp visibly
    mixes old and new) and twenty (the decay at its asymptote). Both sides take the
    reference's counts, so a port whose warm-up or decay differs moves differently."""
    warmups = cfg.ema.warmups
    return warmups, 20 * warmups


@dataclass
class StepStart:
    """A training run's state to take one step from, in place of a fresh optimizer and EMA.

    Attributes:
        optimizer: The reference AdamW's ``state_dict`` (moments and per-parameter step
            counts; the groups as the run's optimizer holds them).
        lrs: Each parameter group's rate for the step (the run's schedule at that step).
        ema: The reference ``ModelEMA``'s ``state_dict`` (``module``, ``updates``), or None
            for a run without an EMA.
    """

    optimizer: dict
    lrs: list[float]
    ema: dict | None


@dataclass
class StepReference:
    """The reference half of one official training step (see :func:`reference_step`).

    Attributes:
        images, targets, forcing, criterion, decisions: As :class:`TrainReference`'s.
        port_state: The reference's state before the step (loaded into the port by
            :func:`port_step`, so both sides start alike).
        before: Trainable weights before the step (float64).
        after, after64: After the step: fp32 reference and float64 replay.
        grads, grads64: Clipped gradients the optimizers saw: reference and replay.
        zero: Parameters whose gradient is zero in exact arithmetic.
        groups: The reference optimizer's groups (hyper-parameters and parameter names).
        state, state64: AdamW state per parameter: reference and replay.
        ema_before / ema_after / ema_after64: Per EMA update count, the EMA state.
        buffers_before / buffers_after / buffers_after64: BatchNorm buffers.
        loss, loss64: Total losses.
        seconds: Wall time of the reference step and the replay.
        start: The run's state the step was taken from (None: a fresh optimizer and EMAs).
        state_before: With ``start``, AdamW's state per parameter before the step.
    """

    images: np.ndarray
    targets: list[dict]
    forcing: Forcing
    criterion: Any
    decisions: Decisions
    port_state: dict[str, np.ndarray]
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    after64: dict[str, np.ndarray]
    grads: dict[str, np.ndarray | None]
    grads64: dict[str, np.ndarray | None]
    zero: set[str]
    groups: list[dict]
    state: dict
    state64: dict
    ema_before: dict[int, dict[str, np.ndarray]]
    ema_after: dict[int, dict[str, np.ndarray]]
    ema_after64: dict[int, dict[str, np.ndarray]]
    buffers_before: dict[str, np.ndarray]
    buffers_after: dict[str, np.ndarray]
    buffers_after64: dict[str, np.ndarray]
    loss: float
    loss64: float
    seconds: dict[str, float] = field(default_factory=dict)
    start: StepStart | None = None
    state_before: dict = field(default_factory=dict)


def _zero_jittor_ema(ema) -> None:
    """Clears a Jittor EMA's floating-point state."""
    with jt.no_grad():
        for v in ema.module.state_dict().values():
            if v.dtype.is_float():
                v.update(jt.zeros_like(v))


def _recorded_step(pair: ModelPair, optimizer: torch.optim.Optimizer, images: np.ndarray,
                   targets: list[dict], ema: Any = None) -> tuple[float, Forcing, Any, dict]:
    """One ``torch_ref.engine.train_step`` of the reference with its decisions recorded.

    Returns:
        The total loss, the recorded :class:`~parity.forcing.Forcing`, the port's criterion
        it forces, and the model's shared stream before the step.
    """
    cfg = pair.cfg
    rng_state = pair.torch_model.rng.state_dict()
    criterion_t = torch_ref.build_criterion(cfg)
    criterion_j = jittor_impl.build_criterion(cfg)
    forcing = Forcing(pair, criterion_t, criterion_j)
    outputs: list = []
    with forcing.recording(), override(_capture_outputs(criterion_t, outputs)):
        loss = torch_engine.train_step(pair.torch_model, criterion_t, optimizer,
                                       torch.from_numpy(images), to_torch(targets),
                                       cfg.schedule.clip_max_norm, ema)["loss"]
    forcing.record_matches(outputs[0], targets)
    return loss, forcing, criterion_j, rng_state


def _start_torch(model: torch.nn.Module, cfg,
                 start: StepStart) -> tuple[torch.optim.Optimizer, list]:
    """The official AdamW and EMA of ``model`` holding copies of a run's state (any float
    dtype: the moments and averages are cast to the model's), at the step's rates. (torch's
    ``load_state_dict`` keeps the given step-count and same-dtype moment tensors themselves,
    which the step would then advance in the run's own optimizer: hence the copy.)"""
    optimizer = torch_ref.build_optimizer(model, cfg)
    optimizer.load_state_dict(copy.deepcopy(start.optimizer))
    if len(start.lrs) != len(optimizer.param_groups):
        raise ValueError(f"StepStart has {len(start.lrs)} rates for "
                         f"{len(optimizer.param_groups)} parameter groups")
    for group, lr in zip(optimizer.param_groups, start.lrs):
        group["lr"] = float(lr)
    emas = []
    if start.ema is not None:
        emas.append(torch_ref.build_ema(model, cfg))
        emas[0].load_state_dict(start.ema)
    return optimizer, emas


def reference_step(pair: ModelPair, images: np.ndarray, targets: list[dict],
                   start: StepStart | None = None) -> StepReference:
    """One official step of the reference (``torch_ref.engine.train_step``: forward, loss sum,
    backward, clipping at ``clip_max_norm``, AdamW over the official groups, EMA update), its
    decisions recorded, and the same step replayed in float64. The torch model takes the step.

    Without ``start`` the optimizer is fresh and two EMAs are updated, at the counts of
    :func:`ema_updates`. With ``start`` (a run's state: the torch model must hold its weights,
    buffers and shared stream) the optimizer, the float64 replay's and the run's one EMA
    continue from it."""
    _check_batch(images, "optimizer-step")
    pair.train()
    cfg, model = pair.cfg, pair.torch_model
    named = trainable(model)
    port_state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    before = numpy_params(named)
    buffers_before = snapshot(model.named_buffers())
    replay = Float64Replay(pair)
    state_before = {}
    if start is None:
        counts = ema_updates(cfg)
        optimizer = torch_ref.build_optimizer(model, cfg)
        emas = build_emas(model, cfg, counts, torch_ref.build_ema, zero_torch_ema)
    else:
        optimizer, emas = _start_torch(model, cfg, start)
        replay.optimizer, replay.emas = _start_torch(replay.model, cfg, start)
        counts = tuple(int(e.updates) for e in emas)
        state_before = _torch_optimizer_state(optimizer, named)
    ema_before = {u: snapshot(e.module.state_dict()) for u, e in zip(counts, emas)}
    start_time = time.perf_counter()
    loss, forcing, criterion_j, rng_state = _recorded_step(pair, optimizer, images, targets,
                                                           emas[0] if emas else None)
    for ema in emas[1:]:
        ema.update(model)
    seconds = {"torch": time.perf_counter() - start_time}
    decisions = forcing.recorded(rng_state)
    start_time = time.perf_counter()
    loss64 = replay.train_step(images, targets, decisions, cfg.schedule.clip_max_norm, counts)["loss"]
    forcing.set_reference_error(replay.tie_errors)
    seconds["float64"] = time.perf_counter() - start_time
    names = {id(p): n for n, p in named}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "names": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    return StepReference(
        images=images, targets=targets, forcing=forcing, criterion=criterion_j,
        decisions=decisions, port_state=port_state, before=before, after=numpy_params(named),
        after64=replay.weights(), grads=grads_of(named), grads64=replay.clipped,
        zero=analytically_zero(replay.grads), groups=groups,
        # this step's optimizers, EMAs and replay are not used again: their views suffice
        state=_torch_optimizer_state(optimizer, named, copy=False),
        state64=_torch_optimizer_state(replay.optimizer, trainable(replay.model), copy=False),
        ema_before=ema_before,
        ema_after={u: snapshot(e.module.state_dict(), copy=False) for u, e in zip(counts, emas)},
        ema_after64={u: snapshot(e.module.state_dict(), copy=False) for u, e in zip(counts, replay.emas)},
        buffers_before=buffers_before, buffers_after=snapshot(model.named_buffers()),
        buffers_after64=snapshot(replay.model.named_buffers(), copy=False),
        loss=loss, loss64=loss64, seconds=seconds, start=start, state_before=state_before)


_HYPERPARAMETERS = ("lr", "weight_decay", "eps", "betas")


def _group_rows(groups: list[dict], optimizer: jittor_engine.AdamW, named: list) -> list[Comparison]:
    """One ``optimizer.group[i]`` row per parameter group: the same parameters and the same
    hyper-parameters (exactly: a weight decay or eps of the wrong group moves one step by far
    less than its rounding, yet compounds over a run)."""
    names = {id(var): name for name, var in named}
    port = [{"names": [names[id(p)] for p in g["params"]],
             **{k: g.get(k, getattr(optimizer, k)) for k in _HYPERPARAMETERS}}
            for g in optimizer.param_groups]
    rows = []
    for i in range(max(len(groups), len(port))):
        path = f"optimizer.group[{i}]"
        if i >= len(groups) or i >= len(port):
            rows.append(_one_sided(path, "torch" if i < len(groups) else "Jittor", "parameter group"))
            continue
        ref, test = groups[i], port[i]
        differ = [f"{k} {test[k]} != {ref[k]}" for k in _HYPERPARAMETERS
                  if tuple(np.atleast_1d(test[k])) != tuple(np.atleast_1d(ref[k]))]
        if test["names"] != ref["names"]:
            differ.append(f"parameters differ ({len(set(test['names']) ^ set(ref['names']))} "
                          f"not in both)")
        rows.append(Comparison(path, (len(ref["names"]),), (len(test["names"]),), "", "",
                               passed=not differ, reason="; ".join(differ)))
    return rows


def _decay(cfg, updates: int) -> float:
    """The official EMA decay at update ``updates`` (the reference's formula)."""
    return cfg.ema.decay * (1 - math.exp(-updates / cfg.ema.warmups))


def _start_jittor(model: Any, cfg, named: list,
                  ref: StepReference) -> tuple[jittor_engine.AdamW, list]:
    """The port's AdamW and EMA holding the reference's starting state (``ref.start``): the
    moments and counts by parameter name, the step's rates, the EMA's averages and count."""
    optimizer = jittor_impl.build_optimizer(model, cfg)
    names = {id(var): name for name, var in named}
    groups = []
    for group, lr in zip(optimizer.param_groups, ref.start.lrs):
        held = [ref.state_before.get(names[id(var)]) for var in group["params"]]
        groups.append({"lr": float(lr),
                       "steps": [0 if s is None else int(s["step"]) for s in held],
                       **{key: [np.zeros(tuple(var.shape), np.float32) if s is None else s[src]
                                for var, s in zip(group["params"], held)]
                          for key, src in (("m", "exp_avg"), ("values", "exp_avg_sq"))}})
    if len(groups) != len(ref.start.lrs) or len(groups) != len(ref.groups):
        raise ValueError(f"the port has {len(optimizer.param_groups)} parameter groups, the "
                         f"reference {len(ref.groups)}")
    steps = max((n for g in groups for n in g["steps"]), default=0)
    jittor_trainer.load_optimizer_state(optimizer, {"n_step": steps, "groups": groups},
                                        "the reference's optimizer state")
    emas = []
    for updates, state in ref.ema_before.items():
        emas.append(jittor_impl.build_ema(model, cfg))
        emas[-1].load_state_dict({"module": state, "updates": updates})
    return optimizer, emas


def port_step(pair: ModelPair, ref: StepReference, gradients: bool = False) -> list[Comparison]:
    """The port's official step (``jittor_impl.engine.train_step``) from the reference's
    starting state with its decisions forced in, then everything the step changed.

    With ``gradients`` the clipped gradients the two optimizers saw are compared too
    (:func:`compare_gradients`, ``grad.<param>`` rows). A reference taken from a run's state
    (``ref.start``) starts the port's optimizer and EMA from the same state; there the
    ``update`` row of a parameter with AdamW moments already (not its first step: the update
    ``lr * m_hat / (sqrt(v_hat) + eps)`` is smooth in the gradient, no ``sign``) is judged as
    the moments are: relative L2 within the ``step`` entry or within the ``noise`` factor of
    the reference's own fp32 update error (float64 replay).

    Rows (paths): ``update.<param>`` (after - before against the reference's, AdamW sign flips
    counted, see :func:`cross_update`), ``update_same_grad.<param>`` (against
    ``torch.optim.AdamW`` on the port's own clipped gradients: the optimizer alone),
    ``param.<param>`` (after; judged as the update that produced it), ``exp_avg.<param>`` /
    ``exp_avg_sq.<param>`` and their ``_same_grad`` rows, ``step_count.<param>``,
    ``ema.<key>`` (values), ``ema_delta[<updates>].<key>`` (after minus before, against the
    reference's) and ``ema_same_weights[<updates>].<key>`` (against the reference's formula
    on the port's own weights: the averaging alone), ``buffer.<key>`` and
    ``buffer_delta.<key>`` (BatchNorm running statistics and counts), ``frozen.<key>`` (a
    parameter no optimizer group holds, e.g. a frozen backbone stem: unchanged), the step's loss
    (``train_loss.step``), and every forced decision.
    """
    cfg, jm = pair.cfg, pair.jittor_model
    jt_checkpoint.load_state_dict_strict(jm, ref.port_state, "port_step: the state before the step")
    pair.train()
    jm.rng.load_state_dict(ref.decisions.rng_state)
    named = trainable_parameters(jm)
    before = numpy_params(named)
    buffers_before = snapshot(named_buffers(jm))
    counts = tuple(ref.ema_before)
    if ref.start is None:
        optimizer = jittor_impl.build_optimizer(jm, cfg)
        emas = build_emas(jm, cfg, counts, jittor_impl.build_ema, _zero_jittor_ema)
    else:
        optimizer, emas = _start_jittor(jm, cfg, named, ref)
    ema_before = {u: snapshot(e.module.state_dict()) for u, e in zip(counts, emas)}
    with ref.forcing.forcing():
        loss = jittor_engine.train_step(jm, ref.criterion, optimizer, jt.array(ref.images),
                                        to_jittor(ref.targets), cfg.schedule.clip_max_norm,
                                        emas[0] if emas else None)["loss"]
    for ema in emas[1:]:
        ema.update(jm)
    rows = ref.forcing.decisions() + _group_rows(ref.groups, optimizer, named)
    c = compare_arrays(np.float64(loss), np.float64(ref.loss),
                       loss_tolerance("train_loss.step", abs(ref.loss - ref.loss64) / abs(ref.loss64)),
                       "train_loss.step")
    rows.append(c)
    after = numpy_params(named)
    names = list(ref.before)
    if names != [n for n, _ in named]:
        only_t = sorted(set(names) - set(before))
        only_j = sorted(set(before) - set(names))
        rows.append(Comparison("param.names", (), (), "", "",
                               reason=f"trainable parameters differ: torch only {only_t[:5]}, "
                                      f"Jittor only {only_j[:5]}"))
        names = [n for n in names if n in before]
    clipped = _jittor_clipped_grads(optimizer, named)
    if gradients:
        rows += compare_gradients(TrainPass({}, {}, ref.grads, clipped, {}, ref.grads64,
                                            ref.decisions))
    same_grad = _same_grad_update(ref.groups, before, clipped, ref.state_before)
    state = _jittor_optimizer_state(optimizer, named)
    noise_floor = tolerance("grad.zero", "step").atol * _global_norm(ref.grads)
    groups = {n: g for g in ref.groups for n in g["names"]}
    for name in names:
        update_ref = ref.after[name] - ref.before[name]
        update = after[name] - before[name]
        zero = name in ref.zero
        if zero:
            port_grad = clipped[name] if clipped[name] is not None else np.zeros_like(ref.grads[name])
            grad_row = _zero_row(f"update.{name}", port_grad, ref.grads[name], noise_floor)
        if name in ref.state_before:  # a later step: smooth in the gradient
            upd = compare_arrays(update, update_ref, _tolerance(f"update.{name}"), f"update.{name}")
            upd = noise_aware(upd, _rel_l2(update_ref, ref.after64[name] - ref.before[name]),
                              "update")
        else:
            upd = cross_update(update, update_ref, before[name], ref.grads[name],
                               ref.grads64.get(name), groups[name], f"update.{name}")
        if zero and not upd.passed:
            upd.passed, upd.reason = grad_row.passed, f"update of {grad_row.reason}"
        rows.append(upd)
        rows.append(rounding_limited(update, same_grad[name]["update"], before[name],
                                     f"update_same_grad.{name}"))
        path = f"param.{name}"
        c = compare_arrays(after[name], ref.after[name], _tolerance(path), path)
        if not c.passed and np.array_equal(before[name], ref.before[name]):
            c.passed = upd.passed
            c.reason = f"{c.reason}; the same start: judged as update.{name} ({'passed' if upd.passed else 'failed'})"
        rows.append(c)
        held = (name in ref.state, name in state)
        if held != (True, True):
            sides = {(False, False): "neither side (no gradient: both skipped the parameter)",
                     (False, True): "the Jittor side only (torch skipped it: no gradient)",
                     (True, False): "the torch side only (Jittor skipped it)"}
            rows.append(Comparison(f"exp_avg.{name}", (), (), "", "", passed=not any(held),
                                   reason=f"AdamW state on {sides[held]}"))
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            path = f"{key}.{name}"
            c = compare_arrays(state[name][key], ref.state[name][key], _tolerance(path), path)
            if zero and not c.passed:
                c.passed, c.reason = grad_row.passed, f"moment of a {grad_row.reason}"
            else:
                c = noise_aware(c, _rel_l2(ref.state[name][key], ref.state64[name][key]), key)
            rows.append(c)
            path = f"{key}_same_grad.{name}"
            rows.append(compare_arrays(state[name][key], same_grad[name][key], _tolerance(path), path))
        path = f"step_count.{name}"
        rows.append(compare_arrays(state[name]["step"], ref.state[name]["step"], _tolerance(path), path))
    rows += _buffer_rows(ref, buffers_before, to_numpy(dict(named_buffers(jm))))
    model_state = to_numpy(jm.state_dict())
    for key in sorted(ref.port_state.keys() - set(before) - set(buffers_before)):
        path = f"frozen.{key}"  # a parameter neither side trains (frozen) must not move
        if key in model_state and np.asarray(ref.port_state[key]).dtype.kind == "f":
            rows.append(compare_arrays(model_state[key], ref.port_state[key], Tolerance(atol=0.0), path))
    verdicts = {c.path: c.passed for c in rows}
    rows += _ema_rows(cfg, ref, emas, ema_before, counts, model_state, verdicts)
    return rows


def _ema_rows(cfg, ref: StepReference, emas: list, ema_before: dict, counts: tuple,
              model_state: dict[str, np.ndarray], verdicts: dict[str, bool]) -> list[Comparison]:
    """EMA values after the step (the first count), and per count the change against the
    reference's formula on the port's own weights (``ema_same_weights``: the averaging
    alone) and against the reference's change (``ema_delta``). The change is ``(1 - d)`` times
    the model's, so a cross row beyond its noise allowance is judged as the change of the
    model it averages (``update.<key>``, ``buffer_delta.<key>`` or ``frozen.<key>``,
    ``verdicts``) when the averaging itself agreed."""
    rows = []
    if not counts:
        return rows
    first = counts[0]
    after = to_numpy(emas[0].module.state_dict())
    for c in compare_tree({"ema": after}, {"ema": ref.ema_after[first]}, _tolerance):
        key = c.path[len("ema."):]
        reference = ref.ema_after[first][key]
        floor = _rel_l2(reference, ref.ema_after64[first][key]) if reference.dtype.kind == "f" else 0.0
        rows.append(noise_aware(c, floor, "EMA"))
    for updates, ema in zip(counts, emas):
        tag = f"[{updates}]"
        after = to_numpy(ema.module.state_dict())
        decay = _decay(cfg, updates + 1)
        for key, value in after.items():
            start, ref_start = ema_before[updates][key], ref.ema_before[updates][key]
            if value.dtype.kind != "f":
                rows.append(compare_arrays(value, ref.ema_after[updates][key], Tolerance(atol=0.0),
                                           f"ema_delta{tag}.{key}"))
                continue
            delta = value.astype(np.float64) - start
            ref_delta = ref.ema_after[updates][key].astype(np.float64) - ref_start
            expected = (1.0 - decay) * (model_state[key].astype(np.float64) - start)
            same = rounding_limited(delta, expected, value, f"ema_same_weights{tag}.{key}")
            path = f"ema_delta{tag}.{key}"
            c = compare_arrays(delta, ref_delta, _tolerance(path), path)
            c = noise_aware(c, _rel_l2(ref_delta, ref.ema_after64[updates][key] - ref_start),
                            "EMA change")
            source = next((p for p in (f"update.{key}", f"buffer_delta.{key}", f"frozen.{key}")
                           if p in verdicts), None)
            if not c.passed and same.passed and source is not None:
                c.passed = verdicts[source]
                c.reason += f"; judged as {source}, whose change it averages"
            rows += [c, same]
    return rows


def _buffer_rows(ref: StepReference, before: dict[str, np.ndarray],
                 after: dict[str, np.ndarray]) -> list[Comparison]:
    """BatchNorm buffers after the step, and their change against the reference's."""
    rows = compare_tree({"buffer": after}, {"buffer": ref.buffers_after}, _tolerance)
    for key, value in after.items():
        path = f"buffer_delta.{key}"
        if key not in ref.buffers_after:
            continue
        delta = value.astype(np.float64) - before[key]
        ref_delta = ref.buffers_after[key].astype(np.float64) - ref.buffers_before[key]
        c = compare_arrays(delta, ref_delta, _tolerance(path), path)
        if value.dtype.kind == "f":
            c = noise_aware(c, _rel_l2(ref_delta, ref.buffers_after64[key] - ref.buffers_before[key]),
                            "buffer change")
        rows.append(c)
    return rows


def check_optimizer_step(pair: ModelPair, images: np.ndarray, targets: list[dict]) -> list[Comparison]:
    """:func:`reference_step` then :func:`port_step`: both models take one step."""
    return port_step(pair, reference_step(pair, images, targets))


class TwoSteps:
    """Official training steps of both sides (and the float64 replay), decisions forced, with
    optimizers kept across calls (a trajectory).

    Attributes:
        seconds: ``(torch, Jittor)`` wall time of the last step.
        flips: Kink flips per path of the last step.
        rows: The counted decision rows of the last step.
    """

    def __init__(self, pair: ModelPair, replay: Float64Replay | None) -> None:
        cfg = pair.cfg
        self.pair = pair
        self.replay = replay
        self.clip = cfg.schedule.clip_max_norm
        self.optimizers = (torch_ref.build_optimizer(pair.torch_model, cfg),
                           jittor_impl.build_optimizer(pair.jittor_model, cfg))
        self.seconds = (math.nan, math.nan)
        self.flips: dict[str, int] = {}
        self.rows: list[Comparison] = []

    def __call__(self, images: np.ndarray, targets: list[dict]) -> tuple[float, float, float]:
        """Returns the total losses (torch, Jittor, float64 replay or nan)."""
        pair = self.pair
        pair.jittor_model.rng.load_state_dict(pair.torch_model.rng.state_dict())
        start = time.perf_counter()
        loss_t, forcing, criterion_j, rng_state = _recorded_step(pair, self.optimizers[0], images,
                                                                 targets)
        middle = time.perf_counter()
        loss_64 = math.nan
        if self.replay is not None:
            decisions = forcing.recorded(rng_state)
            loss_64 = self.replay.train_step(images, targets, decisions, self.clip)["loss"]
            forcing.set_reference_error(self.replay.tie_errors)
        start_j = time.perf_counter()
        with forcing.forcing():
            loss_j = jittor_engine.train_step(pair.jittor_model, criterion_j, self.optimizers[1],
                                              jt.array(images), to_jittor(targets), self.clip)["loss"]
        self.seconds = (middle - start, time.perf_counter() - start_j)
        self.rows = forcing.decisions()
        self.flips = forcing.flips
        return loss_t, loss_j, loss_64
