"""Box utilities of RT-DETR: cxcywh / xyxy conversion, area, (generalized) IoU and inverse sigmoid.

``cxcywh`` boxes are (centre x, centre y, width, height), ``xyxy`` boxes (left, top, right, bottom).

Differences from torch_ref/box_ops.py:
- ``torch.max`` / ``torch.min`` of two tensors are ``jt.maximum`` / ``jt.minimum``; ``clamp`` / ``clip`` bounds are ``min_v`` / ``max_v``.
- At exact ties ``jt.maximum`` / ``minimum`` / ``clamp`` give the whole gradient to the second operand (the bound); PyTorch splits it or gives it to the input.
- The NaN/inverted-box check reads its verdict with ``.item()`` (PyTorch: ``bool()`` / ``int()``).
"""

from __future__ import annotations

from typing import Tuple

import jittor as jt


def _check_pairwise_boxes(boxes: jt.Var, name: str) -> None:
    """Raises ValueError unless ``boxes`` is shaped ``[N, 4]``."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")


def _check_xyxy_order(boxes: jt.Var, name: str) -> None:
    """Raises ValueError when any box has ``x1 < x0`` or ``y1 < y0`` (NaN counts as bad)."""
    ordered = (boxes[:, 2:] >= boxes[:, :2]).all(dim=-1)
    if not ordered.all().item():
        num_bad = int(jt.logical_not(ordered).int32().sum().item())
        raise ValueError(
            f"generalized_box_iou: {name} has {num_bad} of {boxes.shape[0]} boxes with x1 < x0 or "
            "y1 < y0 (or NaN); boxes must be xyxy with right >= left and bottom >= top"
        )


def box_cxcywh_to_xyxy(x: jt.Var) -> jt.Var:
    """Converts ``[..., 4]`` boxes from (cx, cy, w, h) to (x0, y0, x1, y1)."""
    if x.shape[-1] != 4:
        raise ValueError(f"box_cxcywh_to_xyxy expects [..., 4], got {tuple(x.shape)}")
    x_c, y_c, w, h = x.unbind(-1)
    corners = [x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h]
    return jt.stack(corners, dim=-1)


def box_xyxy_to_cxcywh(x: jt.Var) -> jt.Var:
    """Converts ``[..., 4]`` boxes from (x0, y0, x1, y1) to (cx, cy, w, h)."""
    if x.shape[-1] != 4:
        raise ValueError(f"box_xyxy_to_cxcywh expects [..., 4], got {tuple(x.shape)}")
    x0, y0, x1, y1 = x.unbind(-1)
    centre_size = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
    return jt.stack(centre_size, dim=-1)


def box_area(boxes: jt.Var) -> jt.Var:
    """Areas ``[...]`` of ``[..., 4]`` boxes in ``xyxy``."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"box_area expects [..., 4], got {tuple(boxes.shape)}")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jt.Var, boxes2: jt.Var) -> Tuple[jt.Var, jt.Var]:
    """Pairwise IoU and union area, both ``[N, M]``, of ``[N, 4]`` and ``[M, 4]`` boxes in ``xyxy``."""
    _check_pairwise_boxes(boxes1, "boxes1")
    _check_pairwise_boxes(boxes2, "boxes2")
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)

    top_left = jt.maximum(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = jt.minimum(boxes1[:, None, 2:], boxes2[:, 2:])

    wh = (bottom_right - top_left).clamp(min_v=0)
    inter = wh[:, :, 0] * wh[:, :, 1]

    union = area1[:, None] + area2 - inter
    iou = inter / union
    return iou, union


def generalized_box_iou(boxes1: jt.Var, boxes2: jt.Var) -> jt.Var:
    """Pairwise generalized IoU ``[N, M]`` of ``xyxy`` boxes; inverted boxes raise ValueError (official: assert)."""
    _check_pairwise_boxes(boxes1, "boxes1")
    _check_pairwise_boxes(boxes2, "boxes2")
    _check_xyxy_order(boxes1, "boxes1")
    _check_xyxy_order(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)

    top_left = jt.minimum(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = jt.maximum(boxes1[:, None, 2:], boxes2[:, 2:])

    wh = (bottom_right - top_left).clamp(min_v=0)
    enclosing_area = wh[:, :, 0] * wh[:, :, 1]

    return iou - (enclosing_area - union) / enclosing_area


def inverse_sigmoid(x: jt.Var, eps: float = 1e-5) -> jt.Var:
    """Logit of ``x`` clipped to ``[0, 1]``, numerator and denominator floored at ``eps`` (as officially)."""
    x = x.clamp(min_v=0.0, max_v=1.0)
    return jt.log(x.clamp(min_v=eps) / (1 - x).clamp(min_v=eps))
