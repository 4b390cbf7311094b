"""RT-DETR set criterion: matching-based detection losses (official v1 ``SetCriterion``).

Losses are computed on the final decoder output, on each ``aux_outputs`` entry (re-matched, keys
``*_aux_{i}``) and on each ``dn_aux_outputs`` entry (matched through ``dn_meta``, keys ``*_dn_{i}``),
each times its ``weight_dict`` weight. Matching decisions are recorded in ``last_indices`` and can be
replaced through ``forced_indices``, so the parity harness can compare them one by one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .matcher import check_targets

Indices = List[Tuple[torch.Tensor, torch.Tensor]]
# Per-image ``(query_idx, target_idx)`` as int64 numpy arrays: matches outside the graph.
MatchArrays = List[Tuple[np.ndarray, np.ndarray]]

SUPPORTED_LOSSES = ("labels", "bce", "focal", "vfl", "boxes")


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Element-wise sigmoid focal loss as torchvision's, unreduced; ``alpha < 0`` disables alpha."""
    prob = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def check_match_arrays(
    matches: Sequence[Tuple[object, object]],
    name: str,
    num_queries: int,
    num_gts: Sequence[int],
    num_copies: int = 1,
) -> MatchArrays:
    """Validates per-image ``(query_idx, target_idx)`` matches; returns them as int64 numpy pairs.

    Image ``i`` needs ``min(num_queries, num_gts[i] * num_copies)`` pairs of in-range indices
    (``num_copies``: ``dn_num_group`` for the denoising matches, else 1); ValueError otherwise.
    """
    if len(matches) != len(num_gts):
        raise ValueError(f"{name} holds {len(matches)} images, the batch has {len(num_gts)}")
    arrays = []
    for i, pair in enumerate(matches):
        if len(pair) != 2:
            raise ValueError(f"{name}[{i}] must be a (query_idx, target_idx) pair, got {len(pair)} entries")
        src, tgt = np.asarray(pair[0]), np.asarray(pair[1])
        expected = min(num_queries, num_gts[i] * num_copies)
        for what, array, bound in (("query_idx", src, num_queries), ("target_idx", tgt, num_gts[i])):
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(
                    f"{name}[{i}] {what} must be a 1-D integer array, got shape {array.shape} dtype {array.dtype}"
                )
            if array.shape[0] != expected:
                raise ValueError(
                    f"{name}[{i}] {what} has {array.shape[0]} entries, expected {expected} "
                    f"({num_gts[i]} targets x {num_copies}, at most {num_queries} queries)"
                )
            if array.size and (array.min() < 0 or array.max() >= bound):
                raise ValueError(
                    f"{name}[{i}] {what} holds values in [{array.min()}, {array.max()}], outside [0, {bound})"
                )
        arrays.append((src.astype(np.int64), tgt.astype(np.int64)))
    return arrays


def _match_array(index: torch.Tensor) -> np.ndarray:
    """An index tensor as an int64 numpy array."""
    return index.detach().cpu().numpy().astype(np.int64)


def _is_dist_initialized() -> bool:
    """Whether torch.distributed is available and initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _get_world_size() -> int:
    """Number of distributed processes, 1 when not distributed."""
    if _is_dist_initialized():
        return torch.distributed.get_world_size()
    return 1


class SetCriterion(nn.Module):
    """Computes the RT-DETR training losses from model outputs and targets.

    ``losses`` come from ``SUPPORTED_LOSSES``; ``eos_coef`` weighs the no-object class of ``labels``;
    ``alpha`` and ``gamma`` belong to the focal and varifocal losses. ``forced_indices`` is None or maps
    decision keys (see ``last_indices``) to :data:`MatchArrays` used instead of the computed matches.
    """

    def __init__(
        self,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        losses: Sequence[str],
        alpha: float = 0.2,
        gamma: float = 2.0,
        eos_coef: float = 1e-4,
        num_classes: int = 80,
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in SUPPORTED_LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unsupported losses {unknown}; supported: {list(SUPPORTED_LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = list(losses)

        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

        self.alpha = alpha
        self.gamma = gamma
        self._last_matches: Dict[str, Indices] = OrderedDict()
        self.forced_indices: Optional[Dict[str, MatchArrays]] = None

    @property
    def last_indices(self) -> Dict[str, MatchArrays]:
        """Every matching decision of the last forward as :data:`MatchArrays`, in order.

        Keys: ``final``, ``aux_{i}`` (``aux_outputs[i]``, the suffix of its losses) and ``dn``.
        Converted only when read, so a training step never waits for them.
        """
        return OrderedDict(
            (key, [(_match_array(src), _match_array(tgt)) for src, tgt in indices])
            for key, indices in self._last_matches.items()
        )

    def _check_logits(self, src_logits: torch.Tensor, expected_classes: int, loss_name: str) -> None:
        """Raises ValueError unless ``src_logits`` is ``[bs, num_queries, expected_classes]``."""
        if src_logits.dim() != 3 or src_logits.shape[-1] != expected_classes:
            raise ValueError(
                f"'{loss_name}' loss needs pred_logits of shape [bs, num_queries, {expected_classes}] "
                f"(num_classes={self.num_classes}), got {tuple(src_logits.shape)}"
            )

    def _get_target_classes(
        self,
        src_logits: torch.Tensor,
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
    ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Class targets per query, ``num_classes`` (no object) where unmatched.

        Returns ``(idx, target_classes_o, target_classes)``: the (batch, query) index pair of the matched
        queries, their labels and the ``[bs, num_queries]`` class map.
        """
        check_targets(targets, src_logits.shape[0], self.num_classes)
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])  # [num_matched]
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )  # [bs, num_queries]
        target_classes[idx] = target_classes_o.to(torch.int64)
        return idx, target_classes_o, target_classes

    def loss_labels(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Softmax cross-entropy over ``num_classes + 1`` classes; ``log`` adds ``class_error``."""
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes + 1, "labels")
        idx, target_classes_o, target_classes = self._get_target_classes(src_logits, targets, indices)

        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)  # logits [bs, C+1, nq]
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx], target_classes_o)
        return losses

    def loss_labels_bce(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Per-class binary cross-entropy against one-hot targets."""
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes, "bce")
        _, _, target_classes = self._get_target_classes(src_logits, targets, indices)

        target = F.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]  # [bs, nq, num_classes]
        loss = F.binary_cross_entropy_with_logits(src_logits, target.to(src_logits.dtype), reduction="none")
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_bce": loss}

    def loss_labels_focal(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Sigmoid focal loss against one-hot targets."""
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes, "focal")
        _, _, target_classes = self._get_target_classes(src_logits, targets, indices)

        target = F.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]  # [bs, nq, num_classes]
        loss = sigmoid_focal_loss(src_logits, target.to(src_logits.dtype), self.alpha, self.gamma)
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_focal": loss}

    def loss_labels_vfl(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Varifocal loss: BCE towards the detached IoU of each matched box on its class.

        Weighted by ``alpha * p**gamma * (1 - t) + target_score`` with ``p`` detached.
        """
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes, "vfl")
        idx, _, target_classes = self._get_target_classes(src_logits, targets, indices)

        src_boxes = outputs["pred_boxes"][idx]  # [num_matched, 4]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)  # [num_matched, 4]
        ious, _ = box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))  # [num_matched, num_matched]
        ious = torch.diag(ious).detach()  # [num_matched]

        target = F.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]  # [bs, nq, num_classes]

        target_score_o = torch.zeros(target_classes.shape, dtype=src_logits.dtype, device=src_logits.device)  # [bs, nq]
        target_score_o[idx] = ious.to(target_score_o.dtype)
        target_score = target_score_o.unsqueeze(-1) * target  # [bs, nq, num_classes]

        pred_score = F.sigmoid(src_logits).detach()
        weight = self.alpha * pred_score.pow(self.gamma) * (1 - target) + target_score

        loss = F.binary_cross_entropy_with_logits(src_logits, target_score, weight=weight, reduction="none")
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_vfl": loss}

    def l1_distance(self, src_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """Element-wise ``|src - target|``; a method so a harness can replace its gradient at ties."""
        return F.l1_loss(src_boxes, target_boxes, reduction="none")

    def generalized_iou(self, boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
        """Pairwise generalized IoU ``[N, M]`` of ``xyxy`` boxes; a method so a harness can choose its corners at ties."""
        return generalized_box_iou(boxes1, boxes2)

    def loss_boxes(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """L1 and GIoU losses of the matched ``cxcywh`` boxes, summed over ``num_boxes``."""
        pred_boxes = outputs["pred_boxes"]
        check_targets(targets, pred_boxes.shape[0], self.num_classes)
        idx = self._get_src_permutation_idx(indices)
        src_boxes = pred_boxes[idx]  # [num_matched, 4]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)  # [num_matched, 4]

        loss_bbox = self.l1_distance(src_boxes, target_boxes)
        giou = self.generalized_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))  # [m, m]
        loss_giou = 1 - torch.diag(giou)  # [num_matched]
        return {
            "loss_bbox": loss_bbox.sum() / num_boxes,
            "loss_giou": loss_giou.sum() / num_boxes,
        }

    def _get_src_permutation_idx(self, indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-image matches as one ``(batch_idx, query_idx)`` pair for indexing."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])  # [num_matched]
        src_idx = torch.cat([src for (src, _) in indices])  # [num_matched]
        return batch_idx, src_idx

    def get_loss(
        self,
        loss: str,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        indices: Indices,
        num_boxes: float,
        **kwargs,
    ) -> Dict[str, torch.Tensor]:
        """Unweighted losses of the loss function named ``loss``."""
        loss_map: Dict[str, Callable[..., Dict[str, torch.Tensor]]] = {
            "labels": self.loss_labels,
            "bce": self.loss_labels_bce,
            "focal": self.loss_labels_focal,
            "vfl": self.loss_labels_vfl,
            "boxes": self.loss_boxes,
        }
        if loss not in loss_map:
            raise ValueError(f"unknown loss '{loss}'; supported: {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _weighted(self, l_dict: Dict[str, torch.Tensor], suffix: str) -> Dict[str, torch.Tensor]:
        """Weights the losses, drops unweighted ones and appends ``suffix`` to the keys."""
        return {k + suffix: l_dict[k] * self.weight_dict[k] for k in l_dict if k in self.weight_dict}

    def forward(
        self,
        outputs: Dict[str, object],
        targets: Sequence[Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """Computes all weighted losses: ``loss_*``, ``loss_*_aux_{i}`` and ``loss_*_dn_{i}``.

        Args:
            outputs: ``pred_logits`` and ``pred_boxes`` of the last decoder layer, optionally
                ``aux_outputs`` and ``dn_aux_outputs`` (lists of such dicts), the latter with ``dn_meta``.
            targets: Per image, ``labels`` ``[n_i]`` and ``boxes`` ``[n_i, 4]`` (normalised ``cxcywh``).
        """
        self._check_forced_keys(outputs)
        self._last_matches = OrderedDict()
        outputs_without_aux = {k: v for k, v in outputs.items() if "aux" not in k}

        indices = self._decide(
            "final", outputs_without_aux, targets, lambda: self.matcher(outputs_without_aux, targets)
        )

        num_boxes_total = sum(len(t["labels"]) for t in targets)
        num_boxes_tensor = torch.as_tensor(
            [num_boxes_total], dtype=torch.float, device=outputs["pred_logits"].device
        )  # [1]
        if _is_dist_initialized():
            torch.distributed.all_reduce(num_boxes_tensor)
        num_boxes = torch.clamp(num_boxes_tensor / _get_world_size(), min=1).item()

        losses: Dict[str, torch.Tensor] = {}
        for loss in self.losses:
            l_dict = self.get_loss(loss, outputs, targets, indices, num_boxes)
            losses.update(self._weighted(l_dict, ""))

        if "aux_outputs" in outputs:
            for i, aux_outputs in enumerate(outputs["aux_outputs"]):
                aux_indices = self._decide(
                    f"aux_{i}", aux_outputs, targets, lambda: self.matcher(aux_outputs, targets)
                )
                for loss in self.losses:
                    kwargs = {"log": False} if loss == "labels" else {}
                    l_dict = self.get_loss(loss, aux_outputs, targets, aux_indices, num_boxes, **kwargs)
                    losses.update(self._weighted(l_dict, f"_aux_{i}"))

        if "dn_aux_outputs" in outputs:
            if "dn_meta" not in outputs or outputs["dn_meta"] is None:
                raise ValueError("outputs hold 'dn_aux_outputs' but no 'dn_meta' to match them with")
            cdn_indices = self.get_cdn_matched_indices(outputs["dn_meta"], targets)
            dn_indices = self._decide(
                "dn",
                outputs["dn_aux_outputs"][0],
                targets,
                lambda: cdn_indices,
                num_copies=outputs["dn_meta"]["dn_num_group"],
            )
            dn_num_boxes = num_boxes * outputs["dn_meta"]["dn_num_group"]

            for i, aux_outputs in enumerate(outputs["dn_aux_outputs"]):
                for loss in self.losses:
                    kwargs = {"log": False} if loss == "labels" else {}
                    l_dict = self.get_loss(loss, aux_outputs, targets, dn_indices, dn_num_boxes, **kwargs)
                    losses.update(self._weighted(l_dict, f"_dn_{i}"))

        return losses

    @staticmethod
    def decision_keys(outputs: Dict[str, object]) -> List[str]:
        """Keys of the matching decisions a forward on ``outputs`` makes, in order."""
        keys = ["final"] + [f"aux_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
        if "dn_aux_outputs" in outputs:
            keys.append("dn")
        return keys

    def _check_forced_keys(self, outputs: Dict[str, object]) -> None:
        """Raises ValueError when ``forced_indices`` names a decision this forward lacks."""
        if self.forced_indices is None:
            return
        keys = self.decision_keys(outputs)
        unknown = [k for k in self.forced_indices if k not in keys]
        if unknown:
            raise ValueError(
                f"forced_indices has keys {unknown} that this forward does not match; its decisions: {keys}"
            )

    def _decide(
        self,
        key: str,
        layer_outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        decide: Callable[[], Indices],
        num_copies: int = 1,
    ) -> Indices:
        """One recorded matching decision: the checked forced matches of ``key``, else ``decide()``."""
        if self.forced_indices is not None and key in self.forced_indices:
            arrays = check_match_arrays(
                self.forced_indices[key],
                f"forced_indices['{key}']",
                layer_outputs["pred_logits"].shape[1],
                [len(t["labels"]) for t in targets],
                num_copies,
            )
            indices = [(torch.from_numpy(src), torch.from_numpy(tgt)) for src, tgt in arrays]
        else:
            indices = decide()
        self._last_matches[key] = indices
        return indices

    @staticmethod
    def get_cdn_matched_indices(
        dn_meta: Dict[str, object],
        targets: Sequence[Dict[str, torch.Tensor]],
    ) -> Indices:
        """Matches of the denoising queries: positive query ``k`` of each group ↔ target ``k``.

        ``dn_meta`` holds ``dn_num_group`` and ``dn_positive_idx`` (per image, ``n_i * dn_num_group``
        query indices); ValueError when they do not fit ``targets``.
        """
        if "dn_positive_idx" not in dn_meta or "dn_num_group" not in dn_meta:
            raise ValueError(f"dn_meta must hold 'dn_positive_idx' and 'dn_num_group', got keys {sorted(dn_meta)}")
        if len(targets) == 0:
            raise ValueError("get_cdn_matched_indices needs at least one target dict")
        dn_positive_idx = dn_meta["dn_positive_idx"]
        dn_num_group = dn_meta["dn_num_group"]
        num_gts = [len(t["labels"]) for t in targets]
        device = targets[0]["labels"].device

        dn_match_indices = []
        for i, num_gt in enumerate(num_gts):
            if num_gt > 0:
                gt_idx = torch.arange(num_gt, dtype=torch.int64, device=device)
                gt_idx = gt_idx.tile(dn_num_group)  # [num_gt * dn_num_group]
                if len(dn_positive_idx[i]) != len(gt_idx):
                    raise ValueError(
                        f"dn_positive_idx[{i}] has {len(dn_positive_idx[i])} entries, expected "
                        f"{num_gt} targets x {dn_num_group} groups = {len(gt_idx)}"
                    )
                dn_match_indices.append((dn_positive_idx[i], gt_idx))
            else:
                dn_match_indices.append(
                    (torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
                )
        return dn_match_indices


@torch.no_grad()
def _top1_accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent, 0 without targets (official ``accuracy``, ``topk=(1,)``)."""
    if target.numel() == 0:
        return torch.zeros([], device=output.device)
    _, pred = output.topk(1, 1, True, True)  # [n, 1]
    correct = pred[:, 0].eq(target)  # [n]
    return correct.float().sum(0) * (100.0 / target.size(0))
