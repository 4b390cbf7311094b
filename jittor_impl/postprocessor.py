"""RT-DETR post-processing: decoder outputs to per-image labelled boxes in pixels.

``orig_target_sizes`` rows are **(width, height)**, as in the official code (COCO's ``orig_size``); passing
(height, width) silently swaps the x and y scaling of every box on non-square images.

Differences from torch_ref/postprocessor.py:
- ``forward`` is ``execute`` (Jittor's ``Module.__call__`` calls ``execute``).
- ``torch.topk`` is ``jt.topk``, a full descending argsort then a slice: same values, but exactly tied scores may come in another order (so differ at the cut).
- ``scores.max(dim=-1)`` is ``jt.argmax`` (returning ``(indices, values)``); its and ``jt.topk``'s int32 indices are cast to int64, as PyTorch's.
- ``F.sigmoid`` / ``F.softmax`` / ``gather`` are ``jt.sigmoid`` / ``nn.softmax`` / ``jt.gather``.
- The COCO lookup table is an int64 Var built without a ``device`` argument.
"""

from __future__ import annotations

from typing import Dict, List, Tuple, Union

import jittor as jt
from jittor import nn

from rtdetr_common.coco import LABEL_TO_CATEGORY

from .box_ops import box_cxcywh_to_xyxy


class RTDETRPostProcessor(nn.Module):
    """Keeps the top-scoring detections and scales their boxes to the original image size.

    Focal mode (the default): top ``num_top_queries`` over all sigmoid (query, class) scores, so a query may appear
    with several classes. Softmax mode: best class per query (no-object column dropped), then the top
    ``num_top_queries`` queries. Two softmax-mode bugs of the official code are fixed: the softmax is over classes
    (not the batch), and the kept boxes are the scaled ``xyxy`` ones. ``remap_mscoco_category`` maps labels to COCO
    category ids (needs ``num_classes == 80``); in ``deploy_mode`` the output is a tuple, see :meth:`deploy`.
    """

    def __init__(
        self,
        num_classes: int = 80,
        use_focal_loss: bool = True,
        num_top_queries: int = 300,
        remap_mscoco_category: bool = False,
    ) -> None:
        super().__init__()
        if remap_mscoco_category and num_classes != len(LABEL_TO_CATEGORY):
            raise ValueError(
                f"remap_mscoco_category needs num_classes={len(LABEL_TO_CATEGORY)} (COCO), got {num_classes}"
            )
        self.use_focal_loss = use_focal_loss
        self.num_top_queries = num_top_queries
        self.num_classes = num_classes
        self.remap_mscoco_category = remap_mscoco_category
        self.deploy_mode = False

    def extra_repr(self) -> str:
        """Summary shown by ``repr``."""
        return (
            f"use_focal_loss={self.use_focal_loss}, num_classes={self.num_classes}, "
            f"num_top_queries={self.num_top_queries}"
        )

    def execute(
        self,
        outputs: Dict[str, jt.Var],
        orig_target_sizes: jt.Var,
    ) -> Union[List[Dict[str, jt.Var]], Tuple[jt.Var, jt.Var, jt.Var]]:
        """Detections of a batch; ``orig_target_sizes`` is ``[bs, 2]`` as **(width, height)**.

        Returns ``bs`` dicts of ``labels`` ``[k]``, ``boxes`` ``[k, 4]`` (``xyxy`` in pixels) and ``scores`` ``[k]``.
        """
        if "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise ValueError(f"outputs must hold 'pred_logits' and 'pred_boxes', got keys {sorted(outputs)}")
        logits = outputs["pred_logits"]
        boxes = outputs["pred_boxes"]
        if logits.dim() != 3:
            raise ValueError(f"pred_logits must be [bs, num_queries, C], got {tuple(logits.shape)}")
        bs, num_queries, num_logits = logits.shape
        if tuple(boxes.shape) != (bs, num_queries, 4):
            raise ValueError(f"pred_boxes must be [{bs}, {num_queries}, 4], got {tuple(boxes.shape)}")
        if orig_target_sizes.dim() != 2 or tuple(orig_target_sizes.shape) != (bs, 2):
            raise ValueError(
                f"orig_target_sizes must be [bs={bs}, 2] holding (width, height) per image, "
                f"got {tuple(orig_target_sizes.shape)}"
            )
        expected_logits = self.num_classes if self.use_focal_loss else self.num_classes + 1
        if num_logits != expected_logits:
            raise ValueError(
                f"pred_logits has {num_logits} classes, expected {expected_logits} "
                f"(num_classes={self.num_classes}, use_focal_loss={self.use_focal_loss})"
            )

        scale = orig_target_sizes.repeat(1, 2).unsqueeze(1)  # [bs, 1, 4] as (w, h, w, h)
        bbox_pred = box_cxcywh_to_xyxy(boxes) * scale

        if self.use_focal_loss:
            if self.num_top_queries > num_queries * self.num_classes:
                raise ValueError(
                    f"num_top_queries={self.num_top_queries} exceeds num_queries*num_classes="
                    f"{num_queries * self.num_classes}"
                )
            scores = jt.sigmoid(logits)
            scores, index = jt.topk(scores.flatten(1), self.num_top_queries, dim=-1)  # [bs, k] over nq*C
            index = index.int64()
            labels = index % self.num_classes
            query_index = index // self.num_classes
            boxes = jt.gather(bbox_pred, 1, query_index.unsqueeze(-1).repeat(1, 1, 4))
        else:
            scores = nn.softmax(logits, dim=-1)[:, :, :-1]  # [bs, nq, num_classes]
            labels, scores = jt.argmax(scores, dim=-1)
            labels = labels.int64()
            boxes = bbox_pred
            if scores.shape[1] > self.num_top_queries:
                scores, index = jt.topk(scores, self.num_top_queries, dim=-1)
                labels = jt.gather(labels, 1, index)
                boxes = jt.gather(bbox_pred, 1, index.unsqueeze(-1).repeat(1, 1, 4))

        if self.deploy_mode:
            return labels, boxes, scores

        if self.remap_mscoco_category:
            lookup = jt.array(
                [LABEL_TO_CATEGORY[i] for i in range(self.num_classes)], dtype="int64"
            )
            labels = lookup[labels]

        results = []
        for lab, box, sco in zip(labels, boxes, scores):
            results.append({"labels": lab, "boxes": box, "scores": sco})
        return results

    def deploy(self) -> "RTDETRPostProcessor":
        """Switches to eval and deploy mode (batched ``(labels, boxes, scores)``, no remapping); returns ``self``."""
        self.eval()
        self.deploy_mode = True
        return self
