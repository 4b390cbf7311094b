"""Contrastive denoising training group of RT-DETR (Jittor port).

In training the decoder gets, before its matching queries, denoising queries made from noised copies of the
ground truth (DINO's contrastive denoising). Every noise draw comes from a :class:`~rtdetr_common.random.SharedRandom`
in a fixed order (the official code uses torch's global generator), so both frameworks build identical groups.

Differences from torch_ref/denoising.py:
- Vars have no device to follow; ``dim()`` is ``ndim``.
- ``torch.full`` / ``zeros`` / ``tile`` / ``clip`` / ``from_numpy`` are ``jt.full`` / ``jt.zeros`` / ``repeat`` / ``clamp`` / ``jt.array``.
- ``jt.nonzero`` returns int32 indices and ``jt.split`` a list: the per-image positive indices are cast to int64 and returned as a tuple, as in PyTorch.
- ``class_embed`` is the ``Embedding`` of ``jittor_impl.decoder`` (PyTorch semantics of ``padding_idx``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import jittor as jt
from jittor import nn

from rtdetr_common.random import SharedRandom

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from .distributed import gather_counts

__all__ = ["get_contrastive_denoising_training_group"]


def _check_targets(targets: List[Dict[str, jt.Var]]) -> List[int]:
    """Validates the targets (ValueError if empty or malformed) and returns their box counts."""
    if len(targets) == 0:
        raise ValueError("targets must hold one dict per image, got an empty sequence")
    num_gts = []
    for i, target in enumerate(targets):
        if "labels" not in target or "boxes" not in target:
            raise ValueError(f"targets[{i}] must have the keys 'labels' and 'boxes'")
        labels = target["labels"]
        boxes = target["boxes"]
        if labels.ndim != 1:
            raise ValueError(f"targets[{i}]['labels'] must be 1-D, got shape {tuple(labels.shape)}")
        if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{i}]['boxes'] must have shape [{labels.shape[0]}, 4], "
                f"got {tuple(boxes.shape)}"
            )
        num_gts.append(int(labels.shape[0]))
    return num_gts


def get_contrastive_denoising_training_group(
    targets: List[Dict[str, jt.Var]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Module,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    rng: Optional[SharedRandom] = None,
) -> Tuple[Optional[jt.Var], Optional[jt.Var], Optional[jt.Var], Optional[dict]]:
    """Builds the noised denoising queries, their self-attention mask and metadata.

    Each image is padded to ``max_gt_num`` objects (label ``num_classes``, zero box) and repeated ``2 * num_group``
    times, ``num_group = max(num_denoising // max_gt_num, 1)``: positives then negatives in each group. Labels are
    resampled with probability ``label_noise_ratio / 2``; box corners move by up to ``box_noise_scale * wh / 2``
    (negatives 1 to 2 times that) and become logits, as officially only when ``box_noise_scale > 0``.

    Returns:
        ``(input_query_class [bs, n, hidden], input_query_bbox_unact [bs, n, 4], attn_mask, dn_meta)``, the mask
        ``[n + num_queries]`` square (True = may not attend), ``dn_meta`` with ``dn_positive_idx`` (per image),
        ``dn_num_group`` and ``dn_num_split``; all None when ``num_denoising <= 0`` or no image has an object.
    """
    if num_denoising <= 0:
        return None, None, None, None
    if rng is None:
        raise ValueError("get_contrastive_denoising_training_group needs a SharedRandom rng")

    num_gts = _check_targets(targets)

    all_gts, start = gather_counts(num_gts)  # the global batch's, over every process
    rows = slice(start, start + len(num_gts))  # this process's images among them
    max_gt_num = max(all_gts)
    if max_gt_num == 0:
        return None, None, None, None

    num_group = num_denoising // max_gt_num
    num_group = 1 if num_group == 0 else num_group
    bs = len(num_gts)

    # Pad every image to max_gt_num objects.
    input_query_class = jt.full([bs, max_gt_num], num_classes, dtype="int64")
    input_query_bbox = jt.zeros([bs, max_gt_num, 4], dtype="float32")
    pad_gt_mask = jt.zeros([bs, max_gt_num], dtype="bool")
    for i in range(bs):
        num_gt = num_gts[i]
        if num_gt > 0:
            input_query_class[i, :num_gt] = targets[i]["labels"].int64()
            input_query_bbox[i, :num_gt] = targets[i]["boxes"].float32()
            pad_gt_mask[i, :num_gt] = True

    # Repeat for the positive and negative half of every group.
    input_query_class = input_query_class.repeat(1, 2 * num_group)
    input_query_bbox = input_query_bbox.repeat(1, 2 * num_group, 1)
    pad_gt_mask = pad_gt_mask.repeat(1, 2 * num_group)

    negative_gt_mask = jt.zeros([bs, max_gt_num * 2, 1], dtype="float32")
    negative_gt_mask[:, max_gt_num:] = 1.0
    negative_gt_mask = negative_gt_mask.repeat(1, num_group, 1)  # [bs, n, 1]
    positive_gt_mask = 1.0 - negative_gt_mask
    positive_gt_mask = positive_gt_mask.squeeze(-1) * pad_gt_mask
    # Column of every positive query, image by image (nonzero is row-major).
    dn_positive_idx = jt.nonzero(positive_gt_mask)[:, 1].int64()
    dn_positive_idx = tuple(jt.split(dn_positive_idx, [n * num_group for n in num_gts]))

    num_denoising = int(max_gt_num * 2 * num_group)

    if label_noise_ratio > 0:
        u = jt.array(rng.uniform((len(all_gts), num_denoising))[rows])
        new_label = jt.array(rng.integers(0, num_classes, (len(all_gts), num_denoising))[rows])
        noise_mask = u < (label_noise_ratio * 0.5)
        input_query_class = jt.where(noise_mask & pad_gt_mask, new_label, input_query_class)

    if box_noise_scale > 0:
        known_bbox = box_cxcywh_to_xyxy(input_query_bbox)
        diff = (input_query_bbox[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        rand_sign = jt.array(rng.integers(0, 2, (len(all_gts), num_denoising, 4))[rows])
        rand_sign = rand_sign.float32() * 2.0 - 1.0
        rand_part = jt.array(rng.uniform((len(all_gts), num_denoising, 4))[rows])
        rand_part = (rand_part + 1.0) * negative_gt_mask + rand_part * (1.0 - negative_gt_mask)
        rand_part = rand_part * rand_sign
        known_bbox = known_bbox + rand_part * diff
        known_bbox = known_bbox.clamp(min_v=0.0, max_v=1.0)
        input_query_bbox = box_xyxy_to_cxcywh(known_bbox)
        input_query_bbox = inverse_sigmoid(input_query_bbox)

    input_query_class = class_embed(input_query_class)

    tgt_size = num_denoising + num_queries
    attn_mask = jt.zeros([tgt_size, tgt_size], dtype="bool")
    # Matching queries may not see the denoising queries.
    attn_mask[num_denoising:, :num_denoising] = True
    # A denoising group may not see the other groups.
    group_size = max_gt_num * 2
    for i in range(num_group):
        start = group_size * i
        end = group_size * (i + 1)
        attn_mask[start:end, :start] = True
        attn_mask[start:end, end:num_denoising] = True

    dn_meta = {
        "dn_positive_idx": dn_positive_idx,
        "dn_num_group": num_group,
        "dn_num_split": [num_denoising, num_queries],
    }
    return input_query_class, input_query_bbox, attn_mask, dn_meta
