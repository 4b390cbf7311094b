"""Contrastive denoising training group of RT-DETR (Jittor port).

During training RT-DETR feeds the decoder, in front of its ``num_queries`` matching queries,
extra "denoising" queries built from noised copies of the ground-truth boxes and labels
(the contrastive denoising of DINO). Each group holds one positive copy (small box noise)
and one negative copy (large box noise) of every ground-truth object; the groups and the
matching queries are kept from seeing each other with a self-attention mask.

The official code draws the noise from torch's global generator. Here every draw comes
from a :class:`~rtdetr_common.random.SharedRandom`, in a fixed order, so that the torch and
Jittor implementations build identical groups.

Differences from torch_ref/denoising.py:
- Tensors are ``jt.Var``; there is no device to follow. ``labels.dim()`` is ``labels.ndim``,
  ``torch.full`` / ``zeros`` / ``tile`` / ``clip`` / ``from_numpy`` are ``jt.full`` /
  ``jt.zeros`` / ``repeat`` / ``clamp`` / ``jt.array``.
- ``jt.nonzero`` returns int32 indices and ``jt.split`` a list: the per-image positive
  indices are cast to int64 and returned as a tuple, as in PyTorch.
- ``class_embed`` is the ``Embedding`` of ``jittor_impl.decoder`` (PyTorch semantics of
  ``padding_idx``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import jittor as jt
from jittor import nn

from rtdetr_common.random import SharedRandom

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["get_contrastive_denoising_training_group"]


def _check_targets(targets: List[Dict[str, jt.Var]]) -> List[int]:
    """Validates the per-image targets and returns their box counts.

    Args:
        targets: One dict per image with ``'labels'`` (int64 ``[n]``) and ``'boxes'``
            (float ``[n, 4]``, normalised cxcywh).

    Returns:
        The number of ground-truth objects of each image.

    Raises:
        ValueError: If ``targets`` is empty or an entry is malformed.
    """
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
    """Builds the noised denoising queries, their attention mask and metadata.

    Every image is padded to ``max_gt_num`` objects (label ``num_classes``, zero box) and the
    padded set is repeated ``2 * num_group`` times, ``num_group = max(num_denoising // max_gt_num, 1)``;
    in each group the first ``max_gt_num`` queries are positives, the next ``max_gt_num`` negatives.
    With ``n = max_gt_num * 2 * num_group`` denoising queries, the noise is drawn from ``rng`` in
    this order::

        if label_noise_ratio > 0:  u = rng.uniform((bs, n)); new_label = rng.integers(0, num_classes, (bs, n))
        if box_noise_scale > 0:    rand_sign = rng.integers(0, 2, (bs, n, 4)); rand_part = rng.uniform((bs, n, 4))

    A real (non-padding) label is replaced by ``new_label`` where ``u < label_noise_ratio * 0.5``.
    Box corners move by ``rand_sign * rand_part * box_noise_scale * wh / 2``, with ``rand_part``
    in ``[0, 1)`` for positives and ``[1, 2)`` for negatives, and are clipped to ``[0, 1]``.

    As in the official code, the boxes are mapped to logits (inverse sigmoid) only inside the
    box-noise step: with ``box_noise_scale <= 0`` they are returned as plain normalised cxcywh.

    Args:
        targets: One dict per image with ``'labels'`` (int64 ``[n_i]``) and ``'boxes'``
            (float ``[n_i, 4]``, normalised cxcywh). Images without objects are allowed.
        num_classes: Number of object classes; ``num_classes`` itself is the padding label.
        num_queries: Number of matching (non-denoising) decoder queries.
        class_embed: Embedding with ``num_classes + 1`` rows (padding row last).
        num_denoising: Requested number of denoising queries; ``<= 0`` disables denoising.
        label_noise_ratio: Twice the probability of replacing a label.
        box_noise_scale: Scale of the box noise; ``<= 0`` disables it.
        rng: Shared random stream every noise draw comes from.

    Returns:
        ``(input_query_class, input_query_bbox_unact, attn_mask, dn_meta)``:
        the embedded labels ``[bs, n, hidden]``, the box logits ``[bs, n, 4]``, the boolean
        self-attention mask ``[n + num_queries, n + num_queries]`` (True = may not attend) and
        a dict with ``'dn_positive_idx'`` (tuple of per-image int64 index Vars of the positive
        queries), ``'dn_num_group'`` and ``'dn_num_split'`` (``[n, num_queries]``).
        All four are None when ``num_denoising <= 0`` or no image has an object.

    Raises:
        ValueError: If ``rng`` is missing or ``targets`` is malformed.
    """
    if num_denoising <= 0:
        return None, None, None, None
    if rng is None:
        raise ValueError("get_contrastive_denoising_training_group needs a SharedRandom rng")

    num_gts = _check_targets(targets)

    max_gt_num = max(num_gts)
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
    input_query_class = input_query_class.repeat(1, 2 * num_group)  # [bs, n]
    input_query_bbox = input_query_bbox.repeat(1, 2 * num_group, 1)  # [bs, n, 4]
    pad_gt_mask = pad_gt_mask.repeat(1, 2 * num_group)  # [bs, n]

    negative_gt_mask = jt.zeros([bs, max_gt_num * 2, 1], dtype="float32")
    negative_gt_mask[:, max_gt_num:] = 1.0
    negative_gt_mask = negative_gt_mask.repeat(1, num_group, 1)  # [bs, n, 1]
    positive_gt_mask = 1.0 - negative_gt_mask
    positive_gt_mask = positive_gt_mask.squeeze(-1) * pad_gt_mask  # [bs, n]
    # Column of every positive query, image by image (nonzero is row-major).
    dn_positive_idx = jt.nonzero(positive_gt_mask)[:, 1].int64()
    dn_positive_idx = tuple(jt.split(dn_positive_idx, [n * num_group for n in num_gts]))

    num_denoising = int(max_gt_num * 2 * num_group)

    if label_noise_ratio > 0:
        u = jt.array(rng.uniform((bs, num_denoising)))
        new_label = jt.array(rng.integers(0, num_classes, (bs, num_denoising)))
        noise_mask = u < (label_noise_ratio * 0.5)
        input_query_class = jt.where(noise_mask & pad_gt_mask, new_label, input_query_class)

    if box_noise_scale > 0:
        known_bbox = box_cxcywh_to_xyxy(input_query_bbox)
        # Half width / height for (x1, y1, x2, y2): [bs, n, 4]
        diff = (input_query_bbox[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        rand_sign = jt.array(rng.integers(0, 2, (bs, num_denoising, 4)))
        rand_sign = rand_sign.float32() * 2.0 - 1.0
        rand_part = jt.array(rng.uniform((bs, num_denoising, 4)))
        rand_part = (rand_part + 1.0) * negative_gt_mask + rand_part * (1.0 - negative_gt_mask)
        rand_part = rand_part * rand_sign
        known_bbox = known_bbox + rand_part * diff
        known_bbox = known_bbox.clamp(min_v=0.0, max_v=1.0)
        input_query_bbox = box_xyxy_to_cxcywh(known_bbox)
        input_query_bbox = inverse_sigmoid(input_query_bbox)

    input_query_class = class_embed(input_query_class)  # [bs, n, hidden]

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
