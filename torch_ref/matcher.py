"""Hungarian matching between RT-DETR predictions and ground-truth boxes (the official v1 ``HungarianMatcher``).

One cost matrix for the whole batch (class cost, L1 box cost and negative GIoU), then a linear assignment per image.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def check_targets(targets: Sequence[Dict[str, torch.Tensor]], batch_size: int, num_classes: int) -> None:
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
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"targets[{i}]['labels'] must be a 1-D integer tensor, got shape {tuple(labels.shape)} "
                f"dtype {labels.dtype}"
            )
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [n, 4], got {tuple(boxes.shape)}")
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{i}] has {labels.shape[0]} labels but {boxes.shape[0]} boxes"
            )
        if labels.numel() > 0:
            low = int(labels.min())
            high = int(labels.max())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"targets[{i}]['labels'] holds values in [{low}, {high}] but labels must lie in "
                    f"[0, {num_classes}); COCO category ids (1..90) must be remapped to contiguous "
                    "labels first (rtdetr_common.coco.CATEGORY_TO_LABEL / remap_mscoco_category=True)"
                )


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

    @torch.no_grad()
    def forward(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
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
            out_prob = F.sigmoid(flat_logits)
        else:
            out_prob = flat_logits.softmax(-1)
        out_bbox = pred_boxes.flatten(0, 1)

        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        num_targets = tgt_ids.shape[0]

        if self.use_focal_loss:
            out_prob = out_prob[:, tgt_ids]  # [bs*num_queries, total_targets]
            neg_cost_class = (1 - self.alpha) * (out_prob**self.gamma) * (-(1 - out_prob + 1e-8).log())
            pos_cost_class = self.alpha * ((1 - out_prob) ** self.gamma) * (-(out_prob + 1e-8).log())
            cost_class = pos_cost_class - neg_cost_class
        else:
            cost_class = -out_prob[:, tgt_ids]

        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)  # [bs*num_queries, total_targets]
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.reshape(bs, num_queries, num_targets).cpu()  # [bs, num_queries, total_targets]

        sizes = [t["boxes"].shape[0] for t in targets]
        self.last_costs = [per_image_cost[i].numpy() for i, per_image_cost in enumerate(cost.split(sizes, -1))]
        indices = []
        for image_cost in self.last_costs:
            query_idx, target_idx = linear_sum_assignment(image_cost)
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return indices
