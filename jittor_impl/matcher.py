"""Hungarian matching between RT-DETR predictions and ground-truth boxes (the official v1 ``HungarianMatcher``).

One cost matrix for the whole batch (class cost, L1 box cost and negative GIoU), then a linear assignment per image.

Differences from torch_ref/matcher.py:
- ``forward`` is ``execute`` (Jittor's ``Module.__call__`` calls ``execute``); ``@torch.no_grad()`` is ``@jt.no_grad()``.
- ``torch.cdist(p=1)`` is :func:`_l1_cdist`, the same sum of absolute differences written with broadcasting.
- ``F.sigmoid`` / ``softmax`` / ``torch.cat`` are ``jt.sigmoid`` / ``Var.softmax`` / ``jt.concat``.
- The cost matrix is fetched by ``.numpy()`` (no ``.cpu()``) and split per image by ``np.split`` (PyTorch: ``Tensor.split``).
- Matches are int64 Vars by ``jt.array(..., dtype="int64")`` (a plain ``jt.array`` gives int32), so the criterion indexes with int64 as in torch.
- The label check uses ``dtype.is_float()`` / ``is_bool()`` (PyTorch: ``is_floating_point`` / ``== torch.bool``) and reads min/max with ``.item()``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import jittor as jt
import numpy as np
from jittor import nn
from scipy.optimize import linear_sum_assignment

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def check_targets(targets: Sequence[Dict[str, jt.Var]], batch_size: int, num_classes: int) -> None:
    """Validates one target per image: ``labels`` (1-D integer, in ``[0, num_classes)``) and ``boxes`` ``[n, 4]``.

    Labels are contiguous: COCO category ids (1..90) must be remapped first (``rtdetr_common.coco.CATEGORY_TO_LABEL``).
    Raises ValueError on a wrong count, missing keys, wrong shapes or dtypes, or an out-of-range label.
    """
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch_size} predictions")
    for i, target in enumerate(targets):
        if "labels" not in target or "boxes" not in target:
            raise ValueError(f"targets[{i}] must hold 'labels' and 'boxes', got keys {sorted(target)}")
        labels = target["labels"]
        boxes = target["boxes"]
        if labels.dim() != 1 or labels.dtype.is_float() or labels.dtype.is_bool():
            raise ValueError(
                f"targets[{i}]['labels'] must be a 1-D integer Var, got shape {tuple(labels.shape)} "
                f"dtype {labels.dtype}"
            )
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [n, 4], got {tuple(boxes.shape)}")
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{i}] has {labels.shape[0]} labels but {boxes.shape[0]} boxes"
            )
        if labels.numel() > 0:
            low = int(labels.min().item())
            high = int(labels.max().item())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"targets[{i}]['labels'] holds values in [{low}, {high}] but labels must lie in "
                    f"[0, {num_classes}); COCO category ids (1..90) must be remapped to contiguous "
                    "labels first (rtdetr_common.coco.CATEGORY_TO_LABEL / remap_mscoco_category=True)"
                )


def _l1_cdist(x1: jt.Var, x2: jt.Var) -> jt.Var:
    """Pairwise L1 distance ``[N, M]`` of ``[N, D]`` and ``[M, D]`` points, as ``torch.cdist(x1, x2, p=1)``."""
    return (x1[:, None, :] - x2[None, :, :]).abs().sum(-1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising a weighted matching cost.

    The cost per (query, target) is ``cost_bbox * L1 + cost_class * class_cost + cost_giou * (-GIoU)``; the class
    cost is the focal difference ``pos - neg`` on sigmoid probabilities with ``use_focal_loss``, else the negative
    softmax probability of the target class. ValueError if a weight is missing or all three are zero.
    ``last_costs`` keeps the last call's per-image cost matrices (numpy ``[num_queries, n_i]``) for the parity harness.
    """

    def __init__(
        self,
        weight_dict: Dict[str, float],
        use_focal_loss: bool = False,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        missing = [k for k in ("cost_class", "cost_bbox", "cost_giou") if k not in weight_dict]
        if missing:
            raise ValueError(f"HungarianMatcher weight_dict lacks {missing}, got keys {sorted(weight_dict)}")
        self.cost_class = weight_dict["cost_class"]
        self.cost_bbox = weight_dict["cost_bbox"]
        self.cost_giou = weight_dict["cost_giou"]

        self.use_focal_loss = use_focal_loss
        self.alpha = alpha
        self.gamma = gamma

        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.last_costs: List[np.ndarray] = []

    @jt.no_grad()
    def execute(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
    ) -> List[Tuple[jt.Var, jt.Var]]:
        """Matches ``pred_logits`` ``[bs, nq, C]`` and ``pred_boxes`` ``[bs, nq, 4]`` (cxcywh) to the targets.

        Returns ``bs`` pairs ``(query_idx, target_idx)`` of int64 indices, ``min(nq, n_i)`` long, query_idx ascending.
        """
        if "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise ValueError(f"outputs must hold 'pred_logits' and 'pred_boxes', got keys {sorted(outputs)}")
        logits = outputs["pred_logits"]
        pred_boxes = outputs["pred_boxes"]
        if logits.dim() != 3:
            raise ValueError(f"pred_logits must be [bs, num_queries, num_classes], got {tuple(logits.shape)}")
        if pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4 or pred_boxes.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"pred_boxes must be [bs, num_queries, 4] matching pred_logits {tuple(logits.shape)}, "
                f"got {tuple(pred_boxes.shape)}"
            )
        bs, num_queries, num_classes = logits.shape
        check_targets(targets, bs, num_classes)

        flat_logits = logits.flatten(0, 1)  # [bs*num_queries, num_classes]
        if self.use_focal_loss:
            out_prob = jt.sigmoid(flat_logits)
        else:
            out_prob = flat_logits.softmax(-1)
        out_bbox = pred_boxes.flatten(0, 1)

        tgt_ids = jt.concat([t["labels"] for t in targets])
        tgt_bbox = jt.concat([t["boxes"] for t in targets])
        num_targets = tgt_ids.shape[0]

        if self.use_focal_loss:
            out_prob = out_prob[:, tgt_ids]  # [bs*num_queries, total_targets]
            neg_cost_class = (1 - self.alpha) * (out_prob**self.gamma) * (-(1 - out_prob + 1e-8).log())
            pos_cost_class = self.alpha * ((1 - out_prob) ** self.gamma) * (-(out_prob + 1e-8).log())
            cost_class = pos_cost_class - neg_cost_class
        else:
            cost_class = -out_prob[:, tgt_ids]

        cost_bbox = _l1_cdist(out_bbox, tgt_bbox)  # [bs*num_queries, total_targets]
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.reshape(bs, num_queries, num_targets).numpy()  # [bs, num_queries, total_targets]

        sizes = [t["boxes"].shape[0] for t in targets]
        self.last_costs = [
            per_image_cost[i] for i, per_image_cost in enumerate(np.split(cost, np.cumsum(sizes)[:-1], axis=-1))
        ]
        indices = []
        for image_cost in self.last_costs:
            query_idx, target_idx = linear_sum_assignment(image_cost)
            indices.append(
                (jt.array(query_idx, dtype="int64"), jt.array(target_idx, dtype="int64"))
            )
        return indices
