"""RT-DETR set criterion: matching-based detection losses (official v1 ``SetCriterion``).

Losses are computed on the final decoder output, on each ``aux_outputs`` entry (re-matched, keys
``*_aux_{i}``) and on each ``dn_aux_outputs`` entry (matched through ``dn_meta``, keys ``*_dn_{i}``),
each times its ``weight_dict`` weight. Matching decisions are recorded in ``last_indices`` and can be
replaced through ``forced_indices``, so the parity harness can compare them one by one.

Differences from torch_ref/criterion.py:
- ``forward`` is ``execute`` (Jittor's ``Module.__call__`` calls ``execute``).
- ``F.binary_cross_entropy_with_logits(reduction='none')``, absent in Jittor, is ``_binary_cross_entropy_with_logits``: ``((1 - t) * x - logsigmoid(x)) * w``.
- ``_log_sigmoid`` is ``min(x, 0) - log(1 + exp(-|x|))`` (no ``log1p`` in Jittor), the form whose Jittor gradient at ``x == 0`` stays ``sigmoid(x) - t``.
- ``F.one_hot`` is ``nn.one_hot``; ``F.l1_loss(reduction='none')`` is ``(a - b).abs()``, whose gradient at an exact zero difference is ``+1`` (PyTorch: ``0``).
- ``F.cross_entropy`` on ``[bs, C+1, nq]`` logits is ``nn.cross_entropy_loss`` on the flattened ``[bs*nq, C+1]`` logits (same weighted ``'mean'``).
- ``empty_weight`` is a stop-grad Var listed in ``_buffer_names`` instead of a ``register_buffer`` buffer; same ``state_dict`` key.
- ``target_classes[idx] = ...`` is Jittor's functional index assignment (the Var is rebound; gradients flow from the assigned values).
- ``torch.cat`` / ``full_like`` / ``diag`` / ``tile`` are ``jt.concat`` / ``jt.full_like`` / ``jt.diag`` / ``repeat``.
- The distributed normaliser uses MPI (``jt.in_mpi``, ``mpi_all_reduce('add')``, ``jt.world_size``) instead of ``torch.distributed``.
- Jittor has no 0-dim Vars: every loss and ``class_error`` is a ``[1]`` Var (PyTorch: ``[]``).
- ``dn_meta['dn_positive_idx']`` entries must be integer Vars (PyTorch: int64 tensors).
- Forced matches become Vars by ``jt.array(..., dtype="int64")`` (PyTorch: ``torch.from_numpy``); recorded ones are fetched only when ``last_indices`` is read.
- ``_top1_accuracy`` uses ``jt.topk`` (a full argsort): among exactly tied logits it may pick another class than ``torch.topk``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jittor as jt
import numpy as np
from jittor import nn

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .matcher import check_targets

Indices = List[Tuple[jt.Var, jt.Var]]
# Per-image ``(query_idx, target_idx)`` as int64 numpy arrays: matches outside the graph.
MatchArrays = List[Tuple[np.ndarray, np.ndarray]]

SUPPORTED_LOSSES = ("labels", "bce", "focal", "vfl", "boxes")


def _log_sigmoid(x: jt.Var) -> jt.Var:
    """Numerically stable ``log(sigmoid(x))``, as PyTorch's ``F.logsigmoid``."""
    return jt.minimum(x, 0.0) - jt.log(1 + jt.exp(-x.abs()))


def _binary_cross_entropy_with_logits(
    inputs: jt.Var,
    targets: jt.Var,
    weight: Optional[jt.Var] = None,
) -> jt.Var:
    """``F.binary_cross_entropy_with_logits(..., reduction='none')`` with an optional weight."""
    loss = (1 - targets) * inputs - _log_sigmoid(inputs)
    if weight is not None:
        loss = loss * weight
    return loss


def sigmoid_focal_loss(
    inputs: jt.Var,
    targets: jt.Var,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> jt.Var:
    """Element-wise sigmoid focal loss as torchvision's, unreduced; ``alpha < 0`` disables alpha."""
    prob = jt.sigmoid(inputs)
    ce_loss = _binary_cross_entropy_with_logits(inputs, targets)
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


def _match_array(index: jt.Var) -> np.ndarray:
    """An index Var as an int64 numpy array."""
    return index.numpy().astype(np.int64)


def _is_dist_initialized() -> bool:
    """Whether this process runs under MPI (Jittor's distributed mode)."""
    return bool(jt.in_mpi)


def _get_world_size() -> int:
    """Number of distributed processes, 1 when not distributed."""
    if _is_dist_initialized():
        return jt.world_size
    return 1


class SetCriterion(nn.Module):
    """Computes the RT-DETR training losses from model outputs and targets.

    ``losses`` come from ``SUPPORTED_LOSSES``; ``eos_coef`` weighs the no-object class of ``labels``;
    ``alpha`` and ``gamma`` belong to the focal and varifocal losses. ``forced_indices`` is None or maps
    decision keys (see ``last_indices``) to :data:`MatchArrays` used instead of the computed matches.
    """

    _buffer_names = ("empty_weight",)

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

        empty_weight = jt.ones(self.num_classes + 1)
        empty_weight[-1] = eos_coef
        self.empty_weight = empty_weight.stop_grad()

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

    def _check_logits(self, src_logits: jt.Var, expected_classes: int, loss_name: str) -> None:
        """Raises ValueError unless ``src_logits`` is ``[bs, num_queries, expected_classes]``."""
        if src_logits.dim() != 3 or src_logits.shape[-1] != expected_classes:
            raise ValueError(
                f"'{loss_name}' loss needs pred_logits of shape [bs, num_queries, {expected_classes}] "
                f"(num_classes={self.num_classes}), got {tuple(src_logits.shape)}"
            )

    def _get_target_classes(
        self,
        src_logits: jt.Var,
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
    ) -> Tuple[Tuple[jt.Var, jt.Var], jt.Var, jt.Var]:
        """Class targets per query, ``num_classes`` (no object) where unmatched.

        Returns ``(idx, target_classes_o, target_classes)``: the (batch, query) index pair of the matched
        queries, their labels and the ``[bs, num_queries]`` class map.
        """
        check_targets(targets, src_logits.shape[0], self.num_classes)
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = jt.concat([t["labels"][j] for t, (_, j) in zip(targets, indices)])  # [num_matched]
        target_classes = jt.full(src_logits.shape[:2], self.num_classes, dtype="int64")  # [bs, num_queries]
        target_classes[idx] = target_classes_o.int64()
        return idx, target_classes_o, target_classes

    def loss_labels(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, jt.Var]:
        """Softmax cross-entropy over ``num_classes + 1`` classes; ``log`` adds ``class_error``."""
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes + 1, "labels")
        idx, target_classes_o, target_classes = self._get_target_classes(src_logits, targets, indices)

        loss_ce = nn.cross_entropy_loss(
            src_logits.flatten(0, 1), target_classes.flatten(0, 1), weight=self.empty_weight
        )  # logits [bs*nq, C+1], targets [bs*nq]
        losses = {"loss_ce": loss_ce}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(src_logits[idx], target_classes_o)
        return losses

    def loss_labels_bce(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, jt.Var]:
        """Per-class binary cross-entropy against one-hot targets."""
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes, "bce")
        _, _, target_classes = self._get_target_classes(src_logits, targets, indices)

        target = nn.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]  # [bs, nq, num_classes]
        loss = _binary_cross_entropy_with_logits(src_logits, target.cast(src_logits.dtype))
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_bce": loss}

    def loss_labels_focal(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, jt.Var]:
        """Sigmoid focal loss against one-hot targets."""
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes, "focal")
        _, _, target_classes = self._get_target_classes(src_logits, targets, indices)

        target = nn.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]  # [bs, nq, num_classes]
        loss = sigmoid_focal_loss(src_logits, target.cast(src_logits.dtype), self.alpha, self.gamma)
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_focal": loss}

    def loss_labels_vfl(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, jt.Var]:
        """Varifocal loss: BCE towards the detached IoU of each matched box on its class.

        Weighted by ``alpha * p**gamma * (1 - t) + target_score`` with ``p`` detached.
        """
        src_logits = outputs["pred_logits"]
        self._check_logits(src_logits, self.num_classes, "vfl")
        idx, _, target_classes = self._get_target_classes(src_logits, targets, indices)

        src_boxes = outputs["pred_boxes"][idx]  # [num_matched, 4]
        target_boxes = jt.concat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)  # [num_matched, 4]
        ious, _ = box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))  # [num_matched, num_matched]
        ious = jt.diag(ious).detach()  # [num_matched]

        target = nn.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]  # [bs, nq, num_classes]

        target_score_o = jt.zeros(target_classes.shape, dtype=src_logits.dtype)  # [bs, nq]
        target_score_o[idx] = ious.cast(target_score_o.dtype)
        target_score = target_score_o.unsqueeze(-1) * target  # [bs, nq, num_classes]

        pred_score = jt.sigmoid(src_logits).detach()
        weight = self.alpha * pred_score.pow(self.gamma) * (1 - target) + target_score

        loss = _binary_cross_entropy_with_logits(src_logits, target_score, weight=weight)
        loss = loss.mean(1).sum() * src_logits.shape[1] / num_boxes
        return {"loss_vfl": loss}

    def l1_distance(self, src_boxes: jt.Var, target_boxes: jt.Var) -> jt.Var:
        """Element-wise ``|src - target|``; a method so a harness can replace its gradient at ties."""
        return (src_boxes - target_boxes).abs()

    def generalized_iou(self, boxes1: jt.Var, boxes2: jt.Var) -> jt.Var:
        """Pairwise generalized IoU ``[N, M]`` of ``xyxy`` boxes; a method so a harness can choose its corners at ties."""
        return generalized_box_iou(boxes1, boxes2)

    def loss_boxes(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, jt.Var]:
        """L1 and GIoU losses of the matched ``cxcywh`` boxes, summed over ``num_boxes``."""
        pred_boxes = outputs["pred_boxes"]
        check_targets(targets, pred_boxes.shape[0], self.num_classes)
        idx = self._get_src_permutation_idx(indices)
        src_boxes = pred_boxes[idx]  # [num_matched, 4]
        target_boxes = jt.concat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)  # [num_matched, 4]

        loss_bbox = self.l1_distance(src_boxes, target_boxes)
        giou = self.generalized_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))  # [m, m]
        loss_giou = 1 - jt.diag(giou)  # [num_matched]
        return {
            "loss_bbox": loss_bbox.sum() / num_boxes,
            "loss_giou": loss_giou.sum() / num_boxes,
        }

    def _get_src_permutation_idx(self, indices: Indices) -> Tuple[jt.Var, jt.Var]:
        """Per-image matches as one ``(batch_idx, query_idx)`` pair for indexing."""
        batch_idx = jt.concat([jt.full_like(src, i) for i, (src, _) in enumerate(indices)])  # [num_matched]
        src_idx = jt.concat([src for (src, _) in indices])  # [num_matched]
        return batch_idx, src_idx

    def get_loss(
        self,
        loss: str,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        **kwargs,
    ) -> Dict[str, jt.Var]:
        """Unweighted losses of the loss function named ``loss``."""
        loss_map: Dict[str, Callable[..., Dict[str, jt.Var]]] = {
            "labels": self.loss_labels,
            "bce": self.loss_labels_bce,
            "focal": self.loss_labels_focal,
            "vfl": self.loss_labels_vfl,
            "boxes": self.loss_boxes,
        }
        if loss not in loss_map:
            raise ValueError(f"unknown loss '{loss}'; supported: {sorted(loss_map)}")
        return loss_map[loss](outputs, targets, indices, num_boxes, **kwargs)

    def _weighted(self, l_dict: Dict[str, jt.Var], suffix: str) -> Dict[str, jt.Var]:
        """Weights the losses, drops unweighted ones and appends ``suffix`` to the keys."""
        return {k + suffix: l_dict[k] * self.weight_dict[k] for k in l_dict if k in self.weight_dict}

    def execute(
        self,
        outputs: Dict[str, object],
        targets: Sequence[Dict[str, jt.Var]],
    ) -> Dict[str, jt.Var]:
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
        num_boxes_tensor = jt.array([num_boxes_total], dtype="float32")  # [1]
        if _is_dist_initialized():
            num_boxes_tensor = num_boxes_tensor.mpi_all_reduce("add")
        num_boxes = jt.clamp(num_boxes_tensor / _get_world_size(), min_v=1).item()

        losses: Dict[str, jt.Var] = {}
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
        layer_outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
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
            indices = [(jt.array(src, dtype="int64"), jt.array(tgt, dtype="int64")) for src, tgt in arrays]
        else:
            indices = decide()
        self._last_matches[key] = indices
        return indices

    @staticmethod
    def get_cdn_matched_indices(
        dn_meta: Dict[str, object],
        targets: Sequence[Dict[str, jt.Var]],
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

        dn_match_indices = []
        for i, num_gt in enumerate(num_gts):
            if num_gt > 0:
                gt_idx = jt.arange(num_gt, dtype="int64")
                gt_idx = gt_idx.repeat(dn_num_group)  # [num_gt * dn_num_group]
                if len(dn_positive_idx[i]) != len(gt_idx):
                    raise ValueError(
                        f"dn_positive_idx[{i}] has {len(dn_positive_idx[i])} entries, expected "
                        f"{num_gt} targets x {dn_num_group} groups = {len(gt_idx)}"
                    )
                dn_match_indices.append((dn_positive_idx[i], gt_idx))
            else:
                dn_match_indices.append((jt.zeros(0, dtype="int64"), jt.zeros(0, dtype="int64")))
        return dn_match_indices


@jt.no_grad()
def _top1_accuracy(output: jt.Var, target: jt.Var) -> jt.Var:
    """Top-1 accuracy in percent, 0 without targets (official ``accuracy``, ``topk=(1,)``)."""
    if target.numel() == 0:
        return jt.zeros([1])
    _, pred = output.topk(1, 1, True, True)  # [n, 1]
    correct = pred[:, 0].equal(target)  # [n]
    return correct.float32().sum(0) * (100.0 / target.shape[0])
