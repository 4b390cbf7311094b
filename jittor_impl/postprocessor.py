"""RT-DETR post-processing: decoder outputs to per-image labelled boxes in pixels.

IMPORTANT: ``orig_target_sizes`` is ``[bs, 2]`` ordered **(width, height)**, as in the official
code (the COCO dataset stores ``orig_size`` as ``[w, h]``). Passing (height, width) silently
swaps the x and y scaling of every box on non-square images.

Differences from torch_ref/postprocessor.py:
- ``forward`` is ``execute`` (Jittor's ``Module.__call__`` calls ``execute``).
- ``torch.topk`` is ``jt.topk``, a full descending argsort followed by a slice: the same
  values, but among exactly tied scores the order (and so which of them is kept at the cut)
  may differ from PyTorch's. Its int32 indices are cast to int64, so ``labels`` are int64
  as in PyTorch.
- ``scores.max(dim=-1)`` is ``jt.argmax`` (which returns ``(indices, values)``; the int32
  indices are cast to int64);
  ``F.sigmoid`` / ``F.softmax`` / ``gather`` are ``jt.sigmoid`` / ``nn.softmax`` /
  ``jt.gather``.
- The COCO lookup table is an int64 Var built without a ``device`` argument.
"""

from __future__ import annotations

from typing import Dict, List, Tuple, Union

import jittor as jt
from jittor import nn

from rtdetr_common.coco import LABEL_TO_CATEGORY

from .box_ops import box_cxcywh_to_xyxy


class RTDETRPostProcessor(nn.Module):
    """Selects the top-scoring detections and scales their boxes to the original image size.

    Focal mode (``use_focal_loss=True``, the RT-DETR default): sigmoid scores, top
    ``num_top_queries`` over all (query, class) pairs, so one query may appear with several
    classes. Softmax mode: softmax over ``num_classes + 1`` logits with the last (no-object)
    column dropped, best class per query, then the top ``num_top_queries`` queries when there
    are more queries than that.

    Deviations from the official code, both in the softmax mode only:

    * The official code calls ``F.softmax(logits)`` without ``dim``; for a 3-D tensor PyTorch's
      implicit choice is ``dim=0`` (the batch), which is a bug. Here the softmax is over classes.
    * The official code gathers the top-k boxes from the unscaled ``cxcywh`` ``pred_boxes``
      instead of the scaled ``xyxy`` boxes, so its softmax-mode boxes are in the wrong format
      and scale whenever ``num_queries > num_top_queries``. Here they are gathered from the
      scaled ``xyxy`` boxes, as in focal mode.

    Args:
        num_classes: Number of object classes.
        use_focal_loss: Focal (sigmoid) or softmax scoring, see above.
        num_top_queries: Number of detections kept per image.
        remap_mscoco_category: Map labels 0..79 to COCO category ids
            (``rtdetr_common.coco.LABEL_TO_CATEGORY``); requires ``num_classes == 80``.

    Attributes:
        deploy_mode: When True, ``forward`` returns the tuple ``(labels, boxes, scores)`` of
            batched tensors (without category remapping) instead of a list of dicts.

    Raises:
        ValueError: When ``remap_mscoco_category`` is set with ``num_classes != 80``.
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
        """Turns decoder outputs into detections.

        Args:
            outputs: Dict with ``pred_logits`` ``[bs, num_queries, C]`` (``C = num_classes`` in
                focal mode, ``num_classes + 1`` in softmax mode) and ``pred_boxes``
                ``[bs, num_queries, 4]`` (normalised ``cxcywh``).
            orig_target_sizes: ``[bs, 2]`` original image sizes as **(width, height)**.

        Returns:
            A list of ``bs`` dicts with ``labels`` ``[k]``, ``boxes`` ``[k, 4]`` (``xyxy`` in
            pixels) and ``scores`` ``[k]``; or, in ``deploy_mode``, the tuple
            ``(labels [bs, k], boxes [bs, k, 4], scores [bs, k])``.

        Raises:
            ValueError: On missing keys or mismatched shapes.
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
        bbox_pred = box_cxcywh_to_xyxy(boxes) * scale  # [bs, num_queries, 4]

        if self.use_focal_loss:
            if self.num_top_queries > num_queries * self.num_classes:
                raise ValueError(
                    f"num_top_queries={self.num_top_queries} exceeds num_queries*num_classes="
                    f"{num_queries * self.num_classes}"
                )
            scores = jt.sigmoid(logits)
            scores, index = jt.topk(scores.flatten(1), self.num_top_queries, dim=-1)  # [bs, k] over nq*C
            index = index.int64()
            labels = index % self.num_classes  # [bs, k]
            query_index = index // self.num_classes  # [bs, k]
            boxes = jt.gather(bbox_pred, 1, query_index.unsqueeze(-1).repeat(1, 1, 4))  # [bs, k, 4]
        else:
            scores = nn.softmax(logits, dim=-1)[:, :, :-1]  # [bs, nq, num_classes]
            labels, scores = jt.argmax(scores, dim=-1)  # [bs, nq]
            labels = labels.int64()
            boxes = bbox_pred
            if scores.shape[1] > self.num_top_queries:
                scores, index = jt.topk(scores, self.num_top_queries, dim=-1)  # [bs, k]
                labels = jt.gather(labels, 1, index)  # [bs, k]
                boxes = jt.gather(bbox_pred, 1, index.unsqueeze(-1).repeat(1, 1, 4))  # [bs, k, 4]

        if self.deploy_mode:
            return labels, boxes, scores

        if self.remap_mscoco_category:
            lookup = jt.array(
                [LABEL_TO_CATEGORY[i] for i in range(self.num_classes)], dtype="int64"
            )  # [num_classes]
            labels = lookup[labels]  # [bs, k]

        results = []
        for lab, box, sco in zip(labels, boxes, scores):
            results.append({"labels": lab, "boxes": box, "scores": sco})
        return results

    def deploy(self) -> "RTDETRPostProcessor":
        """Switches to eval and deploy mode (tuple output) and returns ``self``."""
        self.eval()
        self.deploy_mode = True
        return self
