"""torch_ref.box_ops: box conversions, IoU / GIoU against hand-computed values, inverse sigmoid."""

from __future__ import annotations

import math

import pytest
import torch

from torch_ref.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    inverse_sigmoid,
)


def _random_cxcywh(shape: tuple[int, ...]) -> torch.Tensor:
    """Random valid boxes in normalised ``cxcywh``.

    Args:
        shape: Leading shape; the result is ``[*shape, 4]``.

    Returns:
        Boxes with centres in ``[0.2, 0.8)`` and sizes in ``[0.05, 0.45)``, float64.
    """
    centre = 0.2 + 0.6 * torch.rand(*shape, 2, dtype=torch.float64)
    size = 0.05 + 0.4 * torch.rand(*shape, 2, dtype=torch.float64)
    return torch.cat([centre, size], dim=-1)


def test_cxcywh_to_xyxy_hand_value() -> None:
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]], dtype=torch.float64)
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box), expected)
    torch.testing.assert_close(box_xyxy_to_cxcywh(expected), box)


@pytest.mark.parametrize("shape", [(7,), (2, 5), (2, 3, 4)])
def test_conversions_round_trip(shape: tuple[int, ...]) -> None:
    cxcywh = _random_cxcywh(shape)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert xyxy.shape == cxcywh.shape
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)


def test_box_area_hand_values() -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 4.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 0.0]))


# (box a, box b, IoU, union, GIoU), all worked out by hand.
PAIR_CASES = {
    "identical": ([0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], 1.0, 4.0, 1.0),
    # Disjoint: intersection 0, union 2, enclosing box 3x3 = 9.
    "disjoint": ([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0], 0.0, 2.0, -7.0 / 9.0),
    # Nested: the inner box is the intersection, the outer box the union and the hull.
    "nested": ([0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0], 1.0 / 16.0, 16.0, 1.0 / 16.0),
    # Partial overlap: intersection 1, union 7, enclosing 9.
    "partial": ([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], 1.0 / 7.0, 7.0, 1.0 / 7.0 - 2.0 / 9.0),
    # Sharing one edge: no overlap, the hull is exactly the union.
    "touching": ([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0], 0.0, 2.0, 0.0),
    # Overlap on one axis only: the clamp to 0 must apply per axis;
    # intersection 0, union 4, enclosing 9.
    "one_axis": ([0.0, 0.0, 2.0, 1.0], [1.0, 2.0, 3.0, 3.0], 0.0, 4.0, -5.0 / 9.0),
}


@pytest.mark.parametrize("name", list(PAIR_CASES))
def test_iou_and_giou_hand_values(name: str) -> None:
    a, b, iou_expected, union_expected, giou_expected = PAIR_CASES[name]
    boxes_a = torch.tensor([a], dtype=torch.float64)
    boxes_b = torch.tensor([b], dtype=torch.float64)
    iou, union = box_iou(boxes_a, boxes_b)
    assert iou.shape == (1, 1) and union.shape == (1, 1)
    assert iou.item() == pytest.approx(iou_expected, abs=1e-12)
    assert union.item() == pytest.approx(union_expected, abs=1e-12)
    assert generalized_box_iou(boxes_a, boxes_b).item() == pytest.approx(giou_expected, abs=1e-12)
    # Both measures are symmetric.
    assert generalized_box_iou(boxes_b, boxes_a).item() == pytest.approx(giou_expected, abs=1e-12)


def test_pairwise_matrix_matches_pair_by_pair() -> None:
    boxes_a = box_cxcywh_to_xyxy(_random_cxcywh((3,)))
    boxes_b = box_cxcywh_to_xyxy(_random_cxcywh((4,)))
    iou, _ = box_iou(boxes_a, boxes_b)
    giou = generalized_box_iou(boxes_a, boxes_b)
    assert iou.shape == (3, 4) and giou.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert iou[i, j] == box_iou(boxes_a[i : i + 1], boxes_b[j : j + 1])[0][0, 0]
            assert giou[i, j] == generalized_box_iou(boxes_a[i : i + 1], boxes_b[j : j + 1])[0, 0]
    assert bool((giou <= iou).all()) and bool((giou >= -1).all())


@pytest.mark.parametrize("n, m", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs_give_empty_matrices(n: int, m: int) -> None:
    boxes_a = box_cxcywh_to_xyxy(_random_cxcywh((n,)))
    boxes_b = box_cxcywh_to_xyxy(_random_cxcywh((m,)))
    iou, union = box_iou(boxes_a, boxes_b)
    assert iou.shape == (n, m) and union.shape == (n, m)
    assert generalized_box_iou(boxes_a, boxes_b).shape == (n, m)


_UNIT = [[0.0, 0.0, 1.0, 1.0]]

# name -> (function, its tensor arguments); every call must raise ValueError.
INVALID_CALLS = {
    "giou_x1_lt_x0": (generalized_box_iou, ([[2.0, 0.0, 1.0, 1.0]], _UNIT)),
    "giou_y1_lt_y0": (generalized_box_iou, (_UNIT, [[0.0, 2.0, 1.0, 1.0]])),
    "giou_nan": (generalized_box_iou, ([[0.0, 0.0, float("nan"), 1.0]], _UNIT)),
    "giou_1d": (generalized_box_iou, ([0.0, 0.0, 1.0, 1.0], _UNIT)),
    "iou_last_dim_3": (box_iou, ([[0.0, 0.0, 1.0]], _UNIT)),
    "iou_3d": (box_iou, (_UNIT, [_UNIT])),
    "to_xyxy_last_dim_5": (box_cxcywh_to_xyxy, ([[0.5, 0.5, 0.1, 0.1, 0.0]],)),
    "to_cxcywh_last_dim_3": (box_xyxy_to_cxcywh, ([[0.0, 0.0, 1.0]],)),
    "area_last_dim_2": (box_area, ([[1.0, 1.0]],)),
}


@pytest.mark.parametrize("name", list(INVALID_CALLS))
def test_invalid_boxes_raise_value_error(name: str) -> None:
    function, args = INVALID_CALLS[name]
    with pytest.raises(ValueError):
        function(*[torch.tensor(a) for a in args])


def test_inverse_sigmoid_matches_logit_inside_the_clip() -> None:
    x = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(inverse_sigmoid(x), torch.logit(x))
    torch.testing.assert_close(torch.sigmoid(inverse_sigmoid(x)), x)


# Official clipping: x -> [0, 1], then log(max(x, eps) / max(1 - x, eps)).
@pytest.mark.parametrize(
    "x, eps, expected",
    [
        (0.0, 1e-5, math.log(1e-5)),
        (1.0, 1e-5, -math.log(1e-5)),
        (-0.5, 1e-5, math.log(1e-5)),
        (1.5, 1e-5, -math.log(1e-5)),
        (0.0, 1e-2, math.log(1e-2)),
        (0.5, 1e-5, 0.0),
    ],
)
def test_inverse_sigmoid_clipping(x: float, eps: float, expected: float) -> None:
    value = inverse_sigmoid(torch.tensor([x], dtype=torch.float64), eps=eps)
    assert value.item() == pytest.approx(expected, abs=1e-12)
