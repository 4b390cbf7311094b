"""RT-DETR set criterion: matching-based detection losses (official v1 ``SetCriterion``).

The loss functions supported are ``labels`` (softmax cross-entropy), ``bce``, ``focal``,
``vfl`` (varifocal) and ``boxes`` (L1 + GIoU). Losses are computed on the final decoder
output, on every ``aux_outputs`` entry (re-matched, keys suffixed ``_aux_{i}``) and on every
``dn_aux_outputs`` entry (denoising queries, matched through ``dn_meta``, keys suffixed
``_dn_{i}``). Every returned loss is already multiplied by its weight from ``weight_dict``;
losses without a weight are dropped.

Every matching decision of a forward is recorded in ``SetCriterion.last_indices`` and any of
them can be replaced through ``SetCriterion.forced_indices``, so the parity harness can compare
the two frameworks' matches decision by decision and then compute both sides' losses with the
same matches.

Differences from torch_ref/criterion.py:
- ``forward`` is ``execute`` (Jittor's ``Module.__call__`` calls ``execute``).
- Jittor's ``binary_cross_entropy_with_logits`` has no ``reduction='none'``:
  :func:`_binary_cross_entropy_with_logits` writes PyTorch's element-wise formula
  ``(1 - t) * x - logsigmoid(x)`` (times ``weight``), with the stable
  ``logsigmoid(x) = min(x, 0) - log(1 + exp(-|x|))`` of :func:`_log_sigmoid` (``log(1 + u)``
  for PyTorch's ``log1p(u)``, which Jittor lacks: rounding ``1 + u`` to float32 costs at
  most about 6e-8 in absolute value). This form is used instead of
  ``max(x, 0) - x * t + log(1 + exp(-|x|))`` because Jittor sends the gradient of
  ``maximum`` / ``minimum`` at a tie to the constant and takes ``d|x|/dx = 1`` at 0: the
  ``min`` form then still differentiates to ``sigmoid(x) - t`` at ``x == 0``, the ``max``
  form would give ``-0.5 - t``. PyTorch differentiates with its closed form
  ``(sigmoid(x) - t) * weight``; autograd of this formula gives the same values up to
  rounding.
- ``F.one_hot`` is ``nn.one_hot`` and ``F.l1_loss(reduction='none')`` is ``(a - b).abs()``
  (at an exact zero difference Jittor's gradient is ``+1``, PyTorch's ``0``).
- ``F.cross_entropy(logits [bs, C+1, nq], target [bs, nq], weight)`` is
  ``nn.cross_entropy_loss`` on the flattened ``[bs*nq, C+1]`` logits and ``[bs*nq]``
  targets; its ``'mean'`` with ``weight`` is, as in PyTorch, the weighted sum divided by the
  sum of the weights of the targets.
- ``empty_weight`` is a plain stop-grad Var listed in ``_buffer_names`` (the project's buffer
  convention) instead of ``register_buffer``; it is in ``state_dict`` under the same key.
- The matched-class map is written with Jittor's index assignment
  ``target_classes[idx] = ...`` (a functional setitem: the Var is rebound to the updated
  array, gradients flow from the assigned values), the index pair is built with
  ``jt.concat`` / ``jt.full_like``, and ``torch.diag`` / ``tile`` are ``jt.diag`` /
  ``repeat``.
- Distributed normaliser: ``torch.distributed`` is Jittor's MPI (``jt.in_mpi``,
  ``Var.mpi_all_reduce('add')``, ``jt.world_size``); without MPI the world size is 1.
- Scalars: Jittor has no 0-dim Vars, so every loss and ``class_error`` is a ``[1]`` Var
  (PyTorch: ``[]``).
- ``dn_meta['dn_positive_idx']`` entries must be integer Vars (PyTorch: int64 tensors).
- Forced matches become int64 Vars with ``jt.array(..., dtype="int64")`` (PyTorch:
  ``torch.from_numpy``); recorded matches are fetched with ``Var.numpy()`` when
  ``last_indices`` is read. Not fetching them inside the forward matters more here than in
  PyTorch: fetching ``dn_positive_idx`` mid-step made live memory grow (r18vd at 128, batch 2:
  752 -> 783 MiB from step 10 to 30, flat without the fetch).
- ``_top1_accuracy`` uses ``jt.topk`` (a full argsort): among exactly tied logits it may pick
  another class than ``torch.topk``.
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
    """Numerically stable ``log(sigmoid(x))``, as PyTorch computes ``F.logsigmoid``.

    Args:
        x: Logits of any shape.

    Returns:
        ``min(x, 0) - log(1 + exp(-|x|))``, same shape as ``x``.
    """
    return jt.minimum(x, 0.0) - jt.log(1 + jt.exp(-x.abs()))


def _binary_cross_entropy_with_logits(
    inputs: jt.Var,
    targets: jt.Var,
    weight: Optional[jt.Var] = None,
) -> jt.Var:
    """Element-wise binary cross-entropy on logits, ``F.binary_cross_entropy_with_logits(..., reduction='none')``.

    Args:
        inputs: Logits of any shape.
        targets: Targets in ``[0, 1]``, same shape, floating point.
        weight: Optional element-wise weight, broadcastable to ``inputs``.

    Returns:
        ``((1 - targets) * inputs - logsigmoid(inputs)) * weight``, same shape as ``inputs``.
    """
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
    """Element-wise sigmoid focal loss (https://arxiv.org/abs/1708.02002), unreduced.

    Same formula as ``torchvision.ops.sigmoid_focal_loss(..., reduction='none')``:
    ``alpha_t * BCE(inputs, targets) * (1 - p_t) ** gamma`` with ``p = sigmoid(inputs)``,
    ``p_t = p * t + (1 - p) * (1 - t)`` and ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``
    (the alpha factor is skipped when ``alpha < 0``).

    Args:
        inputs: Logits of any shape.
        targets: Binary (or soft) targets of the same shape, floating point.
        alpha: Positive/negative balance; negative disables it.
        gamma: Focusing exponent.

    Returns:
        Loss of the same shape as ``inputs``.
    """
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
    """Validates per-image matches given as arrays and returns them as int64 numpy pairs.

    Args:
        matches: One ``(query_idx, target_idx)`` pair of 1-D integer arrays per image.
        name: What the matches are, for the error messages.
        num_queries: Queries per image; every query index must lie in ``[0, num_queries)``.
        num_gts: Targets per image; every target index of image ``i`` must lie in
            ``[0, num_gts[i])``.
        num_copies: How often each target is matched (``dn_num_group`` for the denoising
            queries): image ``i`` needs ``min(num_queries, num_gts[i] * num_copies)`` pairs,
            as many as the matcher (1 copy) or ``dn_meta`` produce.

    Returns:
        The matches as :data:`MatchArrays`.

    Raises:
        ValueError: On a wrong number of images, a malformed pair, a wrong length or an
            index out of range.
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
    """Number of distributed processes, 1 outside MPI."""
    if _is_dist_initialized():
        return jt.world_size
    return 1


class SetCriterion(nn.Module):
    """Computes the RT-DETR training losses from model outputs and targets.

    Args:
        matcher: A :class:`~jittor_impl.matcher.HungarianMatcher` (any callable with its interface).
        weight_dict: Loss name (e.g. ``loss_vfl``) to weight; unlisted losses are dropped.
        losses: Names of the loss functions to apply, from ``labels``, ``bce``, ``focal``,
            ``vfl`` and ``boxes``.
        alpha: Alpha of the focal and varifocal losses.
        gamma: Gamma of the focal and varifocal losses.
        eos_coef: Cross-entropy weight of the no-object class (``labels`` loss only).
        num_classes: Number of object classes, without the no-object class.

    Attributes:
        last_indices: Every matching decision of the last forward (read-only, see
            :attr:`last_indices`).
        forced_indices: None, or a dict with some of those keys whose :data:`MatchArrays`
            are used instead of the matcher's (or ``dn_meta``'s) matches for that entry; checked
            against the outputs and targets at every forward.

    Raises:
        ValueError: When ``losses`` names an unsupported loss.
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
        """Every matching decision of the last forward, in the order it was made.

        Keyed by where it was made: ``final`` (the last decoder layer), ``aux_{i}``
        (``aux_outputs[i]``: the other decoder layers, then the encoder top-k prediction; the
        same suffix as their losses) and ``dn`` (the denoising queries, from ``dn_meta``). The
        forward keeps the matches it used; they become :data:`MatchArrays` only when read, so
        a training step never waits for them.
        """
        return OrderedDict(
            (key, [(_match_array(src), _match_array(tgt)) for src, tgt in indices])
            for key, indices in self._last_matches.items()
        )

    def _check_logits(self, src_logits: jt.Var, expected_classes: int, loss_name: str) -> None:
        """Raises ValueError unless ``src_logits`` is ``[bs, num_queries, expected_classes]``.

        Args:
            src_logits: Predicted logits.
            expected_classes: Required size of the last dimension.
            loss_name: Loss name for the error message.

        Raises:
            ValueError: On a shape mismatch.
        """
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
        """Builds the per-query class targets, ``num_classes`` (no object) where unmatched.

        Args:
            src_logits: Logits ``[bs, num_queries, C]``.
            targets: Per-image target dicts.
            indices: Per-image ``(query_idx, target_idx)`` matches.

        Returns:
            ``(idx, target_classes_o, target_classes)``: the (batch, query) index pair of the
            matched queries, their labels ``[num_matched]`` and the full map
            ``[bs, num_queries]``.
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
        """Softmax cross-entropy over ``num_classes + 1`` classes, no-object weighted by ``eos_coef``.

        Args:
            outputs: Dict with ``pred_logits`` ``[bs, num_queries, num_classes + 1]``.
            targets: Per-image target dicts.
            indices: Per-image matches.
            num_boxes: Normaliser (unused by this loss, kept for a common signature).
            log: Whether to add ``class_error`` (top-1 error in percent on matched queries).

        Returns:
            ``{'loss_ce': ...}`` plus ``class_error`` when ``log``.
        """
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
        """Per-class binary cross-entropy against one-hot targets.

        Args:
            outputs: Dict with ``pred_logits`` ``[bs, num_queries, num_classes]``.
            targets: Per-image target dicts.
            indices: Per-image matches.
            num_boxes: Normaliser.
            log: Unused, kept for a common signature.

        Returns:
            ``{'loss_bce': ...}``.
        """
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
        """Sigmoid focal loss against one-hot targets.

        Args:
            outputs: Dict with ``pred_logits`` ``[bs, num_queries, num_classes]``.
            targets: Per-image target dicts.
            indices: Per-image matches.
            num_boxes: Normaliser.
            log: Unused, kept for a common signature.

        Returns:
            ``{'loss_focal': ...}``.
        """
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
        """Varifocal loss: BCE towards the (detached) IoU of each matched box for its class.

        Target score is the IoU of the matched prediction/target pair on the target class, 0
        elsewhere; the weight is ``alpha * p**gamma * (1 - t) + target_score`` with the
        predicted probability ``p`` detached. With no matched pairs the IoU part is empty and
        only the negative term remains (finite).

        Args:
            outputs: Dict with ``pred_logits`` ``[bs, num_queries, num_classes]`` and
                ``pred_boxes`` ``[bs, num_queries, 4]``.
            targets: Per-image target dicts.
            indices: Per-image matches.
            num_boxes: Normaliser.
            log: Unused, kept for a common signature.

        Returns:
            ``{'loss_vfl': ...}``.
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
        """Element-wise ``|src - target|`` of the matched boxes (the L1 box loss before its sum).

        A method of its own so that a parity harness can replace it on an instance (its
        gradient ``sign(src - target)`` is a decision at ties).

        Args:
            src_boxes: ``[num_matched, 4]`` predicted boxes.
            target_boxes: ``[num_matched, 4]`` matched target boxes.

        Returns:
            ``[num_matched, 4]``.
        """
        return (src_boxes - target_boxes).abs()

    def loss_boxes(
        self,
        outputs: Dict[str, jt.Var],
        targets: Sequence[Dict[str, jt.Var]],
        indices: Indices,
        num_boxes: float,
        log: bool = True,
    ) -> Dict[str, jt.Var]:
        """L1 and GIoU losses of the matched boxes (normalised ``cxcywh``), summed over ``num_boxes``.

        Args:
            outputs: Dict with ``pred_boxes`` ``[bs, num_queries, 4]``.
            targets: Per-image target dicts with ``boxes`` ``[n_i, 4]``.
            indices: Per-image matches.
            num_boxes: Normaliser.
            log: Unused, kept for a common signature.

        Returns:
            ``{'loss_bbox': ..., 'loss_giou': ...}``.
        """
        pred_boxes = outputs["pred_boxes"]
        check_targets(targets, pred_boxes.shape[0], self.num_classes)
        idx = self._get_src_permutation_idx(indices)
        src_boxes = pred_boxes[idx]  # [num_matched, 4]
        target_boxes = jt.concat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)  # [num_matched, 4]

        loss_bbox = self.l1_distance(src_boxes, target_boxes)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))  # [m, m]
        loss_giou = 1 - jt.diag(giou)  # [num_matched]
        return {
            "loss_bbox": loss_bbox.sum() / num_boxes,
            "loss_giou": loss_giou.sum() / num_boxes,
        }

    def _get_src_permutation_idx(self, indices: Indices) -> Tuple[jt.Var, jt.Var]:
        """Flattens per-image matches into a (batch index, query index) pair for advanced indexing.

        Args:
            indices: Per-image ``(query_idx, target_idx)`` matches.

        Returns:
            ``(batch_idx, src_idx)``, both ``[num_matched]`` int64.
        """
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
        """Dispatches to the loss function called ``loss``.

        Args:
            loss: One of ``labels``, ``bce``, ``focal``, ``vfl``, ``boxes``.
            outputs: Model outputs for one decoder layer.
            targets: Per-image target dicts.
            indices: Per-image matches.
            num_boxes: Normaliser.
            **kwargs: Passed to the loss function (``log``).

        Returns:
            The unweighted loss dict of that function.

        Raises:
            ValueError: When ``loss`` is not a supported loss name.
        """
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
        """Multiplies each loss by its weight, drops unweighted ones and appends ``suffix`` to the keys.

        Args:
            l_dict: Unweighted losses.
            suffix: Key suffix (``''``, ``'_aux_{i}'`` or ``'_dn_{i}'``).

        Returns:
            The weighted losses.
        """
        return {k + suffix: l_dict[k] * self.weight_dict[k] for k in l_dict if k in self.weight_dict}

    def execute(
        self,
        outputs: Dict[str, object],
        targets: Sequence[Dict[str, jt.Var]],
    ) -> Dict[str, jt.Var]:
        """Computes all weighted losses.

        Args:
            outputs: Dict with ``pred_logits`` and ``pred_boxes`` of the last decoder layer and
                optionally ``aux_outputs`` (list of such dicts), ``dn_aux_outputs`` (list of
                such dicts for the denoising queries) together with ``dn_meta`` (dict with
                ``dn_positive_idx``: per-image integer Vars, and ``dn_num_group``: int).
            targets: ``bs`` dicts with ``labels`` ``[n_i]`` and ``boxes`` ``[n_i, 4]``
                (normalised ``cxcywh``).

        Returns:
            Dict of weighted scalar losses: ``loss_*``, ``loss_*_aux_{i}``, ``loss_*_dn_{i}``.

        Raises:
            ValueError: When ``dn_aux_outputs`` comes without ``dn_meta``, on malformed inputs,
                or on ``forced_indices`` that do not fit them.
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
        """The keys of the matching decisions a forward on ``outputs`` makes, in order.

        Args:
            outputs: Model outputs as passed to :meth:`execute`.

        Returns:
            ``['final', 'aux_0', ..., 'dn']``: ``aux_{i}`` per ``aux_outputs`` entry, ``dn``
            when there are ``dn_aux_outputs``.
        """
        keys = ["final"] + [f"aux_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
        if "dn_aux_outputs" in outputs:
            keys.append("dn")
        return keys

    def _check_forced_keys(self, outputs: Dict[str, object]) -> None:
        """Raises ValueError when ``forced_indices`` names a decision this forward does not make.

        Args:
            outputs: Model outputs as passed to :meth:`execute`.
        """
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
        """One matching decision: the forced matches of ``key`` if set, else ``decide()``; recorded.

        Args:
            key: Name of the decision (see ``last_indices``).
            layer_outputs: The outputs matched (for the number of queries).
            targets: Per-image target dicts.
            decide: Gives the matches when none are forced.
            num_copies: How often each target is matched: 1 for the Hungarian matches
                (``min(num_queries, n_i)`` pairs per image), ``dn_num_group`` for the denoising
                ones (``n_i * dn_num_group`` pairs).

        Returns:
            Per-image ``(query_idx, target_idx)`` int64 Vars.

        Raises:
            ValueError: When the forced matches of ``key`` do not fit the outputs and targets.
        """
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
        """Matches of the denoising queries: positive query ``k`` of group ``g`` ↔ target ``k``.

        Args:
            dn_meta: Dict with ``dn_positive_idx`` (per image, integer Var of the positive
                denoising query indices, ``n_i * dn_num_group`` long) and ``dn_num_group``.
            targets: Per-image target dicts.

        Returns:
            Per-image ``(dn_query_idx, target_idx)`` with ``target_idx = arange(n_i)`` tiled
            ``dn_num_group`` times; empty int64 Vars for images without targets.

        Raises:
            ValueError: On missing keys, an empty batch, or a positive index list whose length is
                not ``n_i * dn_num_group``.
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
    """Top-1 accuracy in percent, 0 for an empty target (official ``accuracy`` with ``topk=(1,)``).

    Args:
        output: Logits ``[n, C]``.
        target: Labels ``[n]``.

    Returns:
        ``[1]`` Var.
    """
    if target.numel() == 0:
        return jt.zeros([1])
    _, pred = output.topk(1, 1, True, True)  # [n, 1]
    correct = pred[:, 0].equal(target)  # [n]
    return correct.float32().sum(0) * (100.0 / target.shape[0])
