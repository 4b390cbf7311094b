"""Box utilities of RT-DETR: format conversion, IoU, generalized IoU and inverse sigmoid.

Boxes are either ``cxcywh`` (centre x, centre y, width, height) or ``xyxy`` (left, top,
right, bottom). The pairwise functions take 2-D ``[N, 4]`` / ``[M, 4]`` Vars in ``xyxy``
and return ``[N, M]`` matrices, as in the official code (which follows DETR).

Differences from torch_ref/box_ops.py:
- ``torch.max`` / ``torch.min`` of two tensors are ``jt.maximum`` / ``jt.minimum``;
  ``clamp(min=...)`` / ``clip(min=..., max=...)`` are ``clamp(min_v=..., max_v=...)``.
- Where two inputs of ``jt.maximum`` / ``jt.minimum`` / ``clamp`` are exactly equal, Jittor
  sends the whole gradient to the second operand (the bound, for ``clamp``), PyTorch splits
  it (``maximum``) or passes it to the input (``clamp``). Values are identical; gradients
  differ only at such exact ties.
- The NaN/inverted-box check reads its verdict with ``.item()`` (PyTorch: ``bool()`` /
  ``int()``), which synchronises Jittor's lazy graph the same way.
"""

from __future__ import annotations

from typing import Tuple

import jittor as jt


def _check_pairwise_boxes(boxes: jt.Var, name: str) -> None:
    """Raises ValueError unless ``boxes`` is a 2-D ``[N, 4]`` Var.

    Args:
        boxes: Var to check.
        name: Name used in the error message.

    Raises:
        ValueError: When the Var is not shaped ``[N, 4]``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")


def _check_xyxy_order(boxes: jt.Var, name: str) -> None:
    """Raises ValueError when any box has ``x1 < x0`` or ``y1 < y0`` (NaN counts as bad).

    Args:
        boxes: ``[N, 4]`` boxes in ``xyxy``.
        name: Name used in the error message.

    Raises:
        ValueError: When a box is inverted or holds NaN.
    """
    ordered = (boxes[:, 2:] >= boxes[:, :2]).all(dim=-1)  # [N]
    if not ordered.all().item():
        num_bad = int(jt.logical_not(ordered).int32().sum().item())
        raise ValueError(
            f"generalized_box_iou: {name} has {num_bad} of {boxes.shape[0]} boxes with x1 < x0 or "
            "y1 < y0 (or NaN); boxes must be xyxy with right >= left and bottom >= top"
        )


def box_cxcywh_to_xyxy(x: jt.Var) -> jt.Var:
    """Converts boxes from ``cxcywh`` to ``xyxy``.

    Args:
        x: Boxes ``[..., 4]`` as (cx, cy, w, h).

    Returns:
        Boxes ``[..., 4]`` as (x0, y0, x1, y1).

    Raises:
        ValueError: When the last dimension is not 4.
    """
    if x.shape[-1] != 4:
        raise ValueError(f"box_cxcywh_to_xyxy expects [..., 4], got {tuple(x.shape)}")
    x_c, y_c, w, h = x.unbind(-1)
    corners = [x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h]
    return jt.stack(corners, dim=-1)  # [..., 4]


def box_xyxy_to_cxcywh(x: jt.Var) -> jt.Var:
    """Converts boxes from ``xyxy`` to ``cxcywh``.

    Args:
        x: Boxes ``[..., 4]`` as (x0, y0, x1, y1).

    Returns:
        Boxes ``[..., 4]`` as (cx, cy, w, h).

    Raises:
        ValueError: When the last dimension is not 4.
    """
    if x.shape[-1] != 4:
        raise ValueError(f"box_xyxy_to_cxcywh expects [..., 4], got {tuple(x.shape)}")
    x0, y0, x1, y1 = x.unbind(-1)
    centre_size = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
    return jt.stack(centre_size, dim=-1)  # [..., 4]


def box_area(boxes: jt.Var) -> jt.Var:
    """Area of ``xyxy`` boxes, ``(x1 - x0) * (y1 - y0)``.

    Args:
        boxes: Boxes ``[..., 4]`` in ``xyxy``.

    Returns:
        Areas ``[...]``.

    Raises:
        ValueError: When the last dimension is not 4.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"box_area expects [..., 4], got {tuple(boxes.shape)}")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jt.Var, boxes2: jt.Var) -> Tuple[jt.Var, jt.Var]:
    """Pairwise IoU of two sets of ``xyxy`` boxes, together with the pairwise union area.

    Args:
        boxes1: ``[N, 4]`` boxes in ``xyxy``.
        boxes2: ``[M, 4]`` boxes in ``xyxy``.

    Returns:
        A tuple ``(iou, union)``, both ``[N, M]``.

    Raises:
        ValueError: When either input is not shaped ``[K, 4]``.
    """
    _check_pairwise_boxes(boxes1, "boxes1")
    _check_pairwise_boxes(boxes2, "boxes2")
    area1 = box_area(boxes1)  # [N]
    area2 = box_area(boxes2)  # [M]

    top_left = jt.maximum(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    bottom_right = jt.minimum(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]

    wh = (bottom_right - top_left).clamp(min_v=0)  # [N, M, 2]
    inter = wh[:, :, 0] * wh[:, :, 1]  # [N, M]

    union = area1[:, None] + area2 - inter  # [N, M]
    iou = inter / union
    return iou, union


def generalized_box_iou(boxes1: jt.Var, boxes2: jt.Var) -> jt.Var:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of two sets of ``xyxy`` boxes.

    Args:
        boxes1: ``[N, 4]`` boxes in ``xyxy``.
        boxes2: ``[M, 4]`` boxes in ``xyxy``.

    Returns:
        ``[N, M]`` matrix of GIoU values in ``[-1, 1]``.

    Raises:
        ValueError: When an input is not ``[K, 4]``, or a box has ``x1 < x0`` or ``y1 < y0``
            (the official code asserts the same, since such boxes give inf/NaN).
    """
    _check_pairwise_boxes(boxes1, "boxes1")
    _check_pairwise_boxes(boxes2, "boxes2")
    _check_xyxy_order(boxes1, "boxes1")
    _check_xyxy_order(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)  # [N, M], [N, M]

    top_left = jt.minimum(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    bottom_right = jt.maximum(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]

    wh = (bottom_right - top_left).clamp(min_v=0)  # [N, M, 2]
    enclosing_area = wh[:, :, 0] * wh[:, :, 1]  # [N, M]

    return iou - (enclosing_area - union) / enclosing_area


def inverse_sigmoid(x: jt.Var, eps: float = 1e-5) -> jt.Var:
    """Logit of ``x``, clipped for numerical safety exactly as the official code does.

    ``x`` is first clipped to ``[0, 1]``; numerator and denominator are each clipped to at
    least ``eps`` before the log.

    Args:
        x: Var of probabilities.
        eps: Lower bound applied to ``x`` and ``1 - x``.

    Returns:
        ``log(x / (1 - x))`` with the clipping above, same shape as ``x``.
    """
    x = x.clamp(min_v=0.0, max_v=1.0)
    return jt.log(x.clamp(min_v=eps) / (1 - x).clamp(min_v=eps))
