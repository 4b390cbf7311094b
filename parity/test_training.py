"""Training-side parity: gradients, one optimizer step, a trajectory, and a fault injection.

One table drives the checks: variants x (gradients, optimizer step, trajectory). The default
tier runs r18vd at a reduced size with batch 2 (torch's CPU BatchNorm backward is wrong for a
batch of 1); the large variants run at 640 in the ``slow`` tier (``-m slow``). The fault
injection removes the decoder's detach of the reference points between layers in the Jittor
model and asserts that the gradient check catches it while the forward still agrees.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Optional, Sequence

import jittor as jt
import numpy as np
import pytest
import torch

import jittor_impl
import jittor_impl.decoder
import torch_ref
import torch_ref.decoder
from jittor_impl.box_ops import inverse_sigmoid
from parity.check import CheckResult
from parity.compare import Comparison, compare_tree
from parity.divergences import KnownDivergence, jittor_kernels, unexpected_failures, xfail_reason
from parity.models import ModelPair, build_pair
from parity.tolerances import tolerance
from parity.forcing import GiouCorners, L1Signs, SampleCells, _Kinks, cell_offsets
from parity.training import (add_rows, check_gradients, check_optimizer_step, compare_gradients,
                             row_kind, train_pass)
from parity.trajectory import (Trajectory, TrajectoryStep, count_allowance, count_p_value,
                               run_trajectory, training_batches)
from rtdetr_common.configs import variant_at_size

SLOW = pytest.mark.slow
# r18vd's default-tier size: every gradient meets the issue targets there without the
# float64 allowance (measured worst rel L2 3.2e-4; at 640 the decoder's last layer needs it:
# 2.3e-2, within 3x of the reference's own fp32 error), and a step costs a fraction of the
# 640 one. The default tier's trajectory is short (its float64 replay dominates the time);
# the slow tier runs 10 steps.
DEFAULT_SIZE = 256

# (variant, size, trajectory steps)
CASES = [
    pytest.param("r18vd", DEFAULT_SIZE, 3, id=f"r18vd-{DEFAULT_SIZE}"),
    pytest.param("r18vd", 640, 10, id="r18vd-640", marks=SLOW),
    pytest.param("r50vd", 640, 10, id="r50vd-640", marks=SLOW),
]


def _failures(rows: list) -> list[str]:
    """``kind path: reason`` of every failed comparison (reasons name metric, value, limit)."""
    return [f"{row_kind(c.path)} {c.path}: {c.reason}" for c in rows if not c.passed]


def _run(check: str, pair: ModelPair, size: int, steps: int) -> list:
    batches = training_batches(pair.cfg.num_classes, size, batch=2)
    images, targets = batches[0]
    if check == "gradients":
        return check_gradients(pair, images, targets)
    if check == "step":
        return check_optimizer_step(pair, images, targets)
    return run_trajectory(pair, batches, steps).comparisons()


def _cases() -> list:
    """Every (case, check), the optimizer step strictly xfailed where a known ``train_step``
    divergence applies (parity/known_divergences.json)."""
    params = []
    for case in CASES:
        variant, size, steps = case.values
        for check in ("gradients", "step", "trajectory"):
            marks = list(case.marks)
            reason = (xfail_reason(variant, "train_step", size=size, weights="seeded:0",
                                   jittor_kernels=jittor_kernels()) if check == "step" else None)
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, raises=KnownDivergence, reason=reason))
            params.append(pytest.param(variant, size, steps, check, marks=marks, id=f"{case.id}-{check}"))
    return params


@pytest.mark.parametrize("variant, size, steps, check", _cases())
def test_training_parity(variant: str, size: int, steps: int, check: str) -> None:
    pair = build_pair(variant, size=size)
    rows = _run(check, pair, size, steps)
    assert rows, f"{check} produced no comparisons"
    result = CheckResult(variant, pair.weights_source, size)
    add_rows(result, rows)
    kinds = {r.kind for r in result.rows}
    expected = {"gradients": {"grad", "decision", "loss"}, "trajectory": {"trajectory"},
                "step": {"step", "ema", "buffer.step", "decision", "loss"}}[check]
    assert kinds == expected
    if check != "step":
        assert _failures(rows) == []
        return
    unexpected, known = unexpected_failures(result, check="train_step", size=size)
    assert unexpected == []
    if known:
        raise KnownDivergence("; ".join(known))


def test_every_parameter_gets_a_gradient_on_both_sides_or_neither() -> None:
    """Images without any target: no denoising queries, so the denoising embedding gets no
    gradient in torch (``grad is None``); Jittor must report none as well, not zeros, and no
    parameter may have a gradient on one side only (the values are the other tests' job)."""
    pair = build_pair("r18vd", size=DEFAULT_SIZE)
    images = training_batches(pair.cfg.num_classes, DEFAULT_SIZE)[0][0]
    empty = [{"labels": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32)}] * 2
    tp = train_pass(pair, images, empty, float64=False)
    no_grad = sorted(n for n, g in tp.torch_grads.items() if g is None)
    assert no_grad == ["decoder.denoising_class_embed.weight"]
    assert sorted(n for n, g in tp.jittor_grads.items() if g is None) == no_grad
    rows = compare_gradients(tp)
    assert [f for f in _failures(rows) if "side only" in f] == []
    row = next(c for c in rows if c.path == "grad.decoder.denoising_class_embed.weight")
    assert row.passed and row.reason == "no gradient on either side"


def test_a_parameter_without_gradient_is_not_stepped_on_either_side() -> None:
    """torch's AdamW skips a parameter whose ``grad`` is None: no decay, no moments, no count.
    Jittor's own AdamW would decay and count it (its gradient is zeros); the port's
    ``jittor_impl.engine.AdamW`` must skip it too. (The other rows of this unusual step are
    the step tests' job: without any target the loss is all-negative VFL, whose gradients at
    the decoder's sampling offsets are rounding-sensitive, see the tolerance table.)"""
    pair = build_pair("r18vd", size=DEFAULT_SIZE)
    images = training_batches(pair.cfg.num_classes, DEFAULT_SIZE)[0][0]
    empty = [{"labels": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32)}] * 2
    name = "decoder.denoising_class_embed.weight"
    before = pair.jittor_model.state_dict()[name].numpy().copy()
    rows = check_optimizer_step(pair, images, empty)
    assert np.array_equal(pair.jittor_model.state_dict()[name].numpy(), before)
    assert [f for f in _failures(rows) if name in f or "side only" in f] == []
    row = next(c for c in rows if c.path == f"exp_avg.{name}")
    assert row.reason == "AdamW state on neither side (no gradient: both skipped the parameter)"
    counted = [c.path for c in rows if c.path.startswith("step_count.")]
    assert f"step_count.{name}" not in counted and len(counted) > 100


def _decoder_without_detach(self, tgt: jt.Var, ref_points_unact: jt.Var, memory: jt.Var,
                            memory_spatial_shapes: Sequence[Sequence[int]],
                            memory_level_start_index: Sequence[int], bbox_head, score_head,
                            query_pos_head, attn_mask: Optional[jt.Var] = None,
                            memory_mask: Optional[jt.Var] = None) -> tuple[jt.Var, jt.Var]:
    """``jittor_impl.decoder.TransformerDecoder.execute`` in training, minus one detach.

    The official loop feeds each layer the previous layer's boxes DETACHED as reference
    points (sampling locations and query position embedding) and keeps the non-detached ones
    only for the next layer's box output. Here the next layer gets them non-detached: the
    forward values are the same, the gradients of every layer but the last change.
    """
    output = tgt
    dec_out_bboxes, dec_out_logits = [], []
    ref_points = jt.sigmoid(ref_points_unact)
    for i, layer in enumerate(self.layers):
        # [bs, len_q, 4] -> [bs, len_q, 1, 4]
        output = layer(output, ref_points.unsqueeze(2), memory, memory_spatial_shapes,
                       memory_level_start_index, attn_mask, memory_mask,
                       query_pos_head(ref_points))
        inter_ref_bbox = jt.sigmoid(bbox_head[i](output) + inverse_sigmoid(ref_points))
        dec_out_logits.append(score_head[i](output))
        dec_out_bboxes.append(inter_ref_bbox)
        ref_points = inter_ref_bbox
    return jt.stack(dec_out_bboxes), jt.stack(dec_out_logits)


def test_missing_detach_is_caught_by_gradients_not_by_forward() -> None:
    """Fault injection on the Jittor model instance: its ``decoder.decoder.execute`` is
    replaced by :func:`_decoder_without_detach` (an instance attribute shadowing the class
    method; jittor_impl's source is untouched), then removed again."""
    pair = build_pair("r18vd", size=DEFAULT_SIZE)
    images, targets = training_batches(pair.cfg.num_classes, DEFAULT_SIZE)[0]
    decoder = pair.jittor_model.decoder.decoder
    decoder.execute = types.MethodType(_decoder_without_detach, decoder)
    try:
        tp = train_pass(pair, images, targets)
    finally:
        del decoder.execute
    forward = compare_tree(tp.jittor_losses, tp.torch_losses, lambda p: tolerance("loss", p))
    assert [f"{c.path}: {c.reason}" for c in forward if not c.passed] == []
    assert _failures(tp.gates) == []
    failures = _failures(compare_gradients(tp))
    assert any(f.startswith("grad grad.decoder.decoder.layers.0.") for f in failures), failures
    assert all("rel L2" in f or "cosine" in f for f in failures)
    assert not any(f.startswith("grad grad.decoder.enc_") for f in failures), failures


def _one_box_across_its_target(kink: type, loss: str, gap: float, w_delta: float,
                               cfg) -> tuple[np.ndarray, np.ndarray, Any]:
    """Both criteria on one matched box whose cx lies ``gap`` right of its target's in torch
    and ``gap`` left of it in Jittor (``w_delta`` added to its width), ``kink`` recording
    torch's side and forcing Jittor's. Returns the gradients of ``loss`` on the predicted
    boxes (Jittor, torch) and the kink."""
    target = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    boxes = np.random.default_rng(0).uniform(0.2, 0.8, (1, 3, 4)).astype(np.float32)
    boxes[0, 0] = target[0] + np.array([gap, 0.01, w_delta, 0.03], np.float32)
    logits = np.random.default_rng(1).normal(size=(1, 3, 80)).astype(np.float32)
    torch_boxes = torch.tensor(boxes, requires_grad=True)
    jittor_boxes = boxes.copy()
    jittor_boxes[0, 0, 0] = target[0, 0] - gap
    jittor_boxes = jt.array(jittor_boxes)
    labels = np.array([3], np.int64)
    criterion_t = torch_ref.build_criterion(cfg)
    criterion_j = jittor_impl.build_criterion(cfg)
    ties = kink(criterion_t, criterion_j)
    with ties.recording():
        losses_t = criterion_t({"pred_logits": torch.tensor(logits), "pred_boxes": torch_boxes},
                               [{"labels": torch.tensor(labels), "boxes": torch.tensor(target)}])
    with ties.forcing():
        criterion_j.forced_indices = dict(criterion_t.last_indices)
        losses_j = criterion_j({"pred_logits": jt.array(logits), "pred_boxes": jittor_boxes},
                               [{"labels": jt.array(labels), "boxes": jt.array(target)}])
        grad_j = jt.grad(losses_j[loss], jittor_boxes).numpy()
    losses_t[loss].backward()
    return grad_j, torch_boxes.grad.numpy(), ties


@pytest.mark.parametrize("gap, forced", [(1e-6, True), (1e-3, False)])
def test_l1_sign_ties_are_forced_within_the_band_only(gap: float, forced: bool) -> None:
    """One matched box whose cx lies ``gap`` right of its target in torch and ``gap`` left of
    it in Jittor: within the ``train.l1_sign`` band the port takes the reference's sign (same
    gradient, the decision row passes and counts the flip); beyond it the port keeps its own
    sign (the gradient differs by 2 * weight / num_boxes) and the row fails."""
    cfg = variant_at_size("r18vd", 80, 64)
    grad_j, grad_t, ties = _one_box_across_its_target(L1Signs, "loss_bbox", gap, -0.02, cfg)
    weight = cfg.criterion.weight_dict["loss_bbox"]
    assert grad_t[0, 0, 0] == pytest.approx(weight)
    assert grad_j[0, 0, 0] == pytest.approx(weight if forced else -weight)
    np.testing.assert_allclose(grad_j[0, 0, 1:], grad_t[0, 0, 1:], rtol=1e-6)
    [row] = ties.decisions()
    assert row.path == "train.l1_sign.loss_bbox" and row_kind(row.path) == "decision"
    assert ties.flips == {row.path: 1}
    assert row.max_abs == pytest.approx(gap, rel=5e-2)  # gap rounded at 0.5 in fp32
    assert row.passed is forced


@pytest.mark.parametrize("gap, forced", [(1e-6, True), (1e-3, False)])
def test_giou_corner_ties_are_forced_within_the_band_only(gap: float, forced: bool) -> None:
    """One matched box whose left and right edges lie ``gap`` right of its target's in torch
    and ``gap`` left of them in Jittor: the intersection and the enclosing box take those
    edges from the other box. Within the ``train.giou_corner`` band the port takes the
    reference's corners (its GIoU gradient follows torch's, the decision row passes and counts
    the flips); beyond it the port keeps its own corners, its gradient differs and the row
    fails."""
    cfg = variant_at_size("r18vd", 80, 64)
    grad_j, grad_t, ties = _one_box_across_its_target(GiouCorners, "loss_giou", gap, 0.0, cfg)
    close = np.allclose(grad_j[0, 0], grad_t[0, 0], rtol=1e-2, atol=1e-3)
    assert close is forced, (grad_j[0, 0], grad_t[0, 0])
    [row] = ties.decisions()
    assert row.path == "train.giou_corner.loss_giou" and row_kind(row.path) == "decision"
    assert ties.flips == {row.path: 2}  # x1 and x2 (each decides an intersection and an enclosing edge)
    assert row.max_abs == pytest.approx(gap, rel=5e-2)
    assert row.passed is forced


def test_cell_offsets_pick_grid_samples_own_cells() -> None:
    """``cell_offsets`` must pick the cell torch's ``grid_sample`` samples from, also for
    coordinates a few ulp from a cell edge. The cell is read off ``grid_sample``'s gradient on
    a map ``v[r, c] = c^2``: inside cell ``c0`` the slope ``dv/dx`` is ``2 c0 + 1``."""
    width = 40
    rng = np.random.default_rng(5)
    edges = rng.integers(1, width - 2, 20000).astype(np.float64)
    # Locations that map to pixel coordinates within a few ulp of an edge, both sides.
    loc = ((edges + 0.5) / width).astype(np.float32)
    ulps = rng.integers(-4, 5, loc.shape)
    for step in range(4):
        move = np.abs(ulps) > step
        loc = np.where(move, np.nextafter(loc, np.where(ulps > 0, np.float32(2), np.float32(-2))), loc)
    loc = loc.astype(np.float32)
    locations = np.stack([loc, np.full_like(loc, 0.5)], -1).reshape(1, -1, 1, 1, 1, 2)
    offsets, edge = cell_offsets(locations, [(4, width)])
    cells = (edge - 1 + (offsets >= 0))[..., 0].ravel()
    grid = torch.tensor(2 * locations.reshape(1, 1, -1, 2) - 1, requires_grad=True)
    squares = torch.arange(width, dtype=torch.float32).square().expand(1, 1, 4, width)
    torch.nn.functional.grid_sample(squares, grid, align_corners=False).sum().backward()
    slope = grid.grad[0, 0, :, 0].numpy() / (width / 2)  # d out / d pos = 2 * cell + 1
    np.testing.assert_array_equal(np.round((slope - 1) / 2), cells)
    assert (np.abs(offsets[..., 0]) < 1e-4).all() and len(set(cells - edges.astype(int))) == 2


def _sample_both(torch_x: float, jittor_x: float, reference_error: float = 0.0):
    """One deformable sampling call on each side, point 0's pixel x set per side; returns the
    forcing, both outputs and both location gradients."""
    shapes = [(5, 6)]
    rng = np.random.default_rng(6)
    value = rng.standard_normal((1, 30, 2, 4)).astype(np.float32)
    locations = rng.uniform(0.2, 0.8, (1, 3, 2, 1, 2, 2)).astype(np.float32)
    weights = rng.uniform(0.2, 1.0, (1, 3, 2, 1, 2)).astype(np.float32)
    torch_loc, jittor_loc = locations.copy(), locations.copy()
    torch_loc[0, 0, 0, 0, 0, 0] = (torch_x + 0.5) / 6
    jittor_loc[0, 0, 0, 0, 0, 0] = (jittor_x + 0.5) / 6
    pair = types.SimpleNamespace(torch_model=torch_ref.decoder.MSDeformableAttention(8, 2, 1, 2),
                                 jittor_model=jittor_impl.decoder.MSDeformableAttention(8, 2, 1, 2))
    loc_t = torch.tensor(torch_loc, requires_grad=True)
    loc_j = jt.array(jittor_loc)
    ties = SampleCells(pair)
    ties.set_reference_error({"train.sample_cell.": reference_error})
    with ties.recording():
        out_t = pair.torch_model.sample(torch.tensor(value), shapes, loc_t, torch.tensor(weights))
    with ties.forcing():
        out_j = pair.jittor_model.sample(jt.array(value), shapes, loc_j, jt.array(weights))
        grad_j = jt.grad(out_j.sum(), loc_j).numpy()
    out_t.sum().backward()
    return ties, out_t.detach().numpy(), out_j.numpy(), loc_t.grad.numpy(), grad_j


@pytest.mark.parametrize("gap, forced", [(1e-5, True), (1e-2, False)])
def test_sampling_cells_are_forced_within_the_band_only(gap: float, forced: bool) -> None:
    """One sampling point ``gap`` px right of a cell edge in torch and ``gap`` left of it in
    Jittor: within the ``train.sample_cell`` band the port samples from the reference's cell
    (the location gradient agrees, the decision row passes and counts the flip); beyond it
    the port keeps its own cell (the slope of the cell on the other side) and the row fails."""
    ties, out_t, out_j, grad_t, grad_j = _sample_both(3 + gap, 3 - gap)
    np.testing.assert_allclose(out_j, out_t, rtol=0, atol=10 * gap)
    same = np.isclose(grad_j[0, 0, 0, 0, 0, 0], grad_t[0, 0, 0, 0, 0, 0], rtol=1e-3, atol=1e-4)
    assert same is np.bool_(forced)
    # The point's y gradient moves with its x weights (by ~gap), the other points' not at all.
    grad_j[0, 0, 0, 0, 0] = grad_t[0, 0, 0, 0, 0] = 0
    np.testing.assert_allclose(grad_j, grad_t, rtol=1e-5, atol=1e-5)
    [row] = ties.decisions()
    assert row.path == "train.sample_cell." and row_kind(row.path) == "decision"
    assert ties.flips == {row.path: 1}
    assert row.max_abs == pytest.approx(gap, rel=5e-2)
    assert row.passed is forced


def test_a_wide_band_forces_the_reference_cell_not_the_nearest_edges_side() -> None:
    """With the band wider than half a pixel (the reference's own error large, as in deep
    decoder layers at 640) a point near a pixel centre is a tie of both its edges: x = 3.49 in
    torch (nearest edge 3, offset +0.49) and 3.51 in Jittor (nearest edge 4, offset -0.49)
    sample the same cell 3, and forcing keeps it there (no flip, same gradient); the row
    fails all the same, since a band of half a pixel settles more than ties."""
    ties, out_t, out_j, grad_t, grad_j = _sample_both(3.49, 3.51, reference_error=0.3)
    assert ties.band("train.sample_cell.") > 0.5
    np.testing.assert_allclose(out_j, out_t, rtol=0, atol=0.1)
    # The same cell's slope in x (the y gradient moves with the 0.02 px of x weights).
    assert grad_j[0, 0, 0, 0, 0, 0] == pytest.approx(grad_t[0, 0, 0, 0, 0, 0], rel=1e-4)
    [row] = ties.decisions()
    assert ties.flips == {row.path: 0}
    # ... but a band that wide is no tie band: the row fails on the band cap.
    assert not row.passed and "exceeds 0.25 of the quantity's scale" in row.reason



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_replay_forces_its_own_dtypes_cell(dtype: torch.dtype) -> None:
    """A point a hair (1e-5 px) on the other side of an edge than the reference's is moved
    across it in the replay's own precision, at every edge of levels whose sides are no
    powers of two: in fp32 a nudge below the location's resolution rounds back across the
    edge at some of them, and the replay then takes the other branch."""
    missed = []
    for w in (48, 80, 100):
        for e in range(1, w - 1):
            locations = torch.empty((1, 1, 1, 1, 1, 2), dtype=dtype)
            locations[..., 0] = (e - 1e-5 + 0.5) / w  # just left of edge e (x = (pos + 0.5) / w)
            locations[..., 1] = (3.25 + 0.5) / 8  # inside a cell in y
            reference = np.array([[[[[[1e-5, 0.25]]]]]])  # the reference: just right of it
            forced, _, flips = SampleCells.replay_locations("train.sample_cell.x", locations,
                                                             [(8, w)], reference, band=1e-3)
            offsets, edge = cell_offsets(forced.numpy(), [(8, w)])
            if not (edge[..., 0].item() == e and offsets[..., 0].item() >= 0):
                missed.append((w, e))
            assert flips.size == 1 and flips[0] == pytest.approx(1e-5)
    assert missed == []


def _kink_row(path: str, compared: int, flipped: int, forced: int) -> Comparison:
    return Comparison(path, (compared,), (compared,), "bool", "bool", compared=compared,
                      flipped=flipped, forced=forced, band=0.01, max_abs=0.005, passed=True)


# Per counted kind of a later trajectory step: the path of a decision row of that kind.
_KIND_ROWS = {"relu_gate": "train.relu_gate.a", "match": "train.match.final"}


def _two_step_trajectory(flipped: int, floor: int, kind: str = "relu_gate") -> Trajectory:
    """A hand-made two-step trajectory whose second step flips ``flipped`` decisions of
    ``kind`` against the float64 replay's ``floor``; losses and weights agree exactly."""
    return _trajectory([(0, 0), (flipped, floor)], kind)


def _trajectory(counts: list[tuple[int, int]], kind: str = "relu_gate") -> Trajectory:
    """A hand-made trajectory whose step ``k`` flips ``counts[k - 1] = (port, replay)``
    decisions of ``kind``; losses and weights agree exactly."""
    step = dict(torch_loss=1.0, jittor_loss=1.0, float64_loss=1.0, loss_rel_diff=0.0,
                loss_floor=1e-7, weights_rel_l2=0.0, max_param_rel_l2=0.0, max_param="w",
                max_param_floor=1e-7, worst_excess=0.0, tie_flips=0, tie_forced=0,
                tie_max_gap=0.0, tie_floor_flips=0, seconds_torch=0.0, seconds_jittor=0.0)
    traj = Trajectory("r18vd", (64, 96), 2)
    compared = 10**6 if kind == "relu_gate" else 1000
    for k, (f, fl) in enumerate(counts, 1):
        traj.steps.append(TrajectoryStep(step=k, **step))
        traj.drift.append({"w": (0.0, 1e-7)})
        traj.decisions.append([_kink_row(_KIND_ROWS[kind], compared, f, f),
                               _kink_row("train.sample_cell.b", 10**5, 0, 0)])
        traj.floor_flips.append({kind: fl})
    return traj


def _count_rule(step: int, kind: str) -> tuple[float, float]:
    """The noise factor and the test level of a later step's count row of ``kind``."""
    path = f"trajectory.step[{step}].ties.{kind}"
    return tolerance("noise", path).atol, tolerance("decision.count", path).atol


def test_the_count_test_is_the_exact_conditional_test_of_two_poisson_rates() -> None:
    """Given both counts' sum, the replay's share is binomial with probability 1 / (1 + F) at
    the largest rate ratio allowed: the p-value is that binomial's lower tail, written out
    here; and drawn counts at exactly that ratio are rejected about as often as the level
    says, while a port at three times that ratio is rejected nearly always."""
    factor, alpha = _count_rule(4, "topk")
    q = 1.0 / (1.0 + factor)
    n = 29 + 1
    assert count_p_value(29, 1, factor) == pytest.approx((1 - q) ** n + n * q * (1 - q) ** (n - 1))
    assert count_p_value(0, 0, factor) == 1.0
    allowed = count_allowance(3, factor, alpha, 10**6)
    assert count_p_value(allowed, 3, factor) >= alpha > count_p_value(allowed + 1, 3, factor)
    rng = np.random.default_rng(0)
    replay = rng.poisson(20.0, 20000)
    at_bound = rng.poisson(factor * 20.0, 20000)
    rejected = np.mean([count_p_value(int(a), int(b), factor) < alpha
                        for a, b in zip(at_bound, replay)])
    assert rejected <= 5 * alpha
    beyond = rng.poisson(3 * factor * 20.0, 2000)
    caught = np.mean([count_p_value(int(a), int(b), factor) < alpha
                      for a, b in zip(beyond, replay)])
    assert caught > 0.99


def test_a_later_step_is_judged_against_the_replays_flips_in_that_step() -> None:
    """Each step's count row compares with the replay's count of the same step, whatever an
    earlier step's was; its reason states the p-value and the largest count that passes."""
    factor, alpha = _count_rule(3, "relu_gate")
    allowed = count_allowance(0, factor, alpha, 10**6)
    rows = {c.path: c for c in _trajectory([(0, 0), (5, 50), (allowed + 1, 0)]).comparisons()}
    row = rows["trajectory.step[3].ties.relu_gate"]
    assert not row.passed, row.reason
    assert "the float64 replay 0; p = " in row.reason and f"at most {allowed} pass" in row.reason


@pytest.mark.parametrize("kind", sorted(_KIND_ROWS))
@pytest.mark.parametrize("flipped, floor, passed", [
    (0, 0, True), ("within", 0, True), ("past", 0, False),  # a replay without flips
    ("within", 5, True), ("past", 5, False),  # the largest count the test keeps, and one more
    (150, 50, True),  # an allowance over every match: passes, said to be saturated
])
def test_later_trajectory_steps_judge_counts_against_the_float64_replays(kind, flipped, floor,
                                                                         passed) -> None:
    """From step 2 a kind of kink, and the matches, are one counted row each, judged against
    the float64 replay's own flips in that step by the count test: a port flipping past the
    largest count it keeps fails, whatever the tie band."""
    factor, alpha = _count_rule(2, kind)
    if isinstance(flipped, str):
        limit = 10**6 if kind == "relu_gate" else 1000
        flipped = count_allowance(floor, factor, alpha, limit) + (1 if flipped == "past" else 0)
    rows = {c.path: c for c in _two_step_trajectory(flipped, floor, kind).comparisons()}
    assert f"trajectory.step[1].{_KIND_ROWS[kind]}" in rows  # step 1: the one-step rows
    assert not any(p.startswith(f"trajectory.step[2].{_KIND_ROWS[kind]}") for p in rows)
    row = rows[f"trajectory.step[2].ties.{kind}"]
    assert (row.flipped, row.passed) == (flipped, passed), row.reason
    saturated = count_allowance(floor, factor, alpha, row.compared) >= row.compared
    assert ("saturated" in row.reason) == saturated, row.reason
    assert rows["trajectory.step[2].ties.sample_cell"].passed
    assert row_kind(row.path) == "trajectory"


def test_the_float64_replay_counts_the_matches_its_own_matcher_would_not_make() -> None:
    """The replay's ``match`` count is the reference pairs its own matcher, on its own
    outputs, does not make: none on the reference's own decisions at the same weights, and
    exactly the pairs of a reference assignment with two targets swapped."""
    from parity.replay import Float64Replay
    from parity.training import _recorded_step

    pair = build_pair("r18vd", size=None)
    images, targets = training_batches(pair.cfg.num_classes, (128, 160), batch=2)[1]
    replay = Float64Replay(pair)  # a copy of the weights the decisions are recorded at
    optimizer = torch_ref.build_optimizer(pair.torch_model, pair.cfg)
    _, forcing, _, rng_state = _recorded_step(pair, optimizer, images, targets)
    decisions = forcing.recorded(rng_state)
    replay.gradients(images, targets, decisions)
    assert replay.flip_counts()["match"] == 0
    image = next(i for i, t in enumerate(targets) if len(t["labels"]) >= 2)
    final = [(s.copy(), t.copy()) for s, t in decisions.matches["final"]]
    src, tgt = final[image]
    tgt[[0, 1]] = tgt[[1, 0]]
    swapped = dataclasses.replace(decisions, matches={**decisions.matches, "final": final})
    replay.gradients(images, targets, swapped)
    assert replay.flip_counts()["match"] == 2


def test_a_frozen_stem_is_checked_unchanged_and_its_ema_judged_by_it(monkeypatch) -> None:
    """With the stem frozen (``freeze_at=0``, as r50vd and r101vd officially), no optimizer
    group holds its parameters: each gets a ``frozen`` row (unchanged by the step), and its
    EMA change is judged by that row. A port that moves a frozen parameter fails there (one
    reference step judges the clean port, then the moving one)."""
    import dataclasses

    import parity.models
    import parity.training

    def frozen(*args, **kwargs):
        cfg = variant_at_size(*args, **kwargs)
        return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, freeze_at=0))

    monkeypatch.setattr(parity.models, "variant_at_size", frozen)
    pair = build_pair("r18vd", size=None)
    key = "backbone.conv1.conv1_1.conv.weight"
    assert not dict(pair.torch_model.named_parameters())[key].requires_grad
    images, targets = training_batches(pair.cfg.num_classes, (128, 160), batch=2)[0]
    reference = parity.training.reference_step(pair, images, targets)
    step = parity.training.jittor_engine.train_step

    def moving_train_step(model, *args, **kwargs):
        out = step(model, *args, **kwargs)
        weight = dict(model.named_parameters())[key]
        weight.assign(weight + 1e-3)
        return out

    for moved in (False, True):
        if moved:
            monkeypatch.setattr(parity.training.jittor_engine, "train_step", moving_train_step)
        rows = {c.path: c for c in parity.training.port_step(pair, reference)}
        stem = [p for p in rows if p.startswith("frozen.backbone.conv1.")]
        assert len(stem) == 9  # three ConvNormLayers: a conv weight and a norm weight / bias each
        assert rows[f"frozen.{key}"].passed is not moved
        assert all(rows[p].passed for p in stem if p != f"frozen.{key}")
        emas = [p for p in rows if p.startswith("ema_delta[") and p.endswith(f"].{key}")]
        assert emas and all(rows[p].passed is not moved for p in emas), [rows[p].reason for p in emas]


class _Gates(_Kinks):
    """ReLU-like kinks of hand-made inputs, one name (``x``)."""

    prefix, what = "train.relu_gate", "gate"
    branch = staticmethod(lambda x: x > 0)

    def names(self) -> list[str]:
        return ["x"]

    def _recorders(self) -> list:
        return []

    def _forcers(self) -> list:
        return []


@pytest.mark.parametrize("noise, outside, passed", [
    (1e-4, 1, True),  # one flip past the band, the port's error quantile within it: the tail
    (1e-4, 11, False),  # more flips past the band than the quantile's tail can hold
    (1e-2, 1, False),  # the port's error at the quantile is past the band itself
])
def test_flips_outside_the_band_are_the_tail_only_while_the_port_error_is_within_it(
        noise: float, outside: int, passed: bool) -> None:
    """A band is the noise factor times a quantile of the reference's error, so a correct port
    may flip a few elements just past it; many such flips, or a port whose error at that
    quantile exceeds the band, fail."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=10_000)
    reference = (np.sign(normal) * (0.5 + np.abs(normal))).astype(np.float32)  # none near 0
    test = reference + rng.normal(scale=noise, size=reference.shape).astype(np.float32)
    gates = _Gates()
    path = gates.path("x")
    band = gates.band(path)
    reference[:outside] = 2 * band  # past the band, and the port on the other side
    test[:outside] = -band
    gates.reference[path] = [reference]
    gates.test[path] = [jt.array(test)]
    [row] = gates.decisions()
    assert (row.flipped, row.forced) == (outside, 0)
    assert row.passed is passed, row.reason
    assert "outside the band" in row.reason
