"""torch_ref.criterion.SetCriterion: every loss against a plain manual computation, and normalisation."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from torch_ref.criterion import SetCriterion

NUM_CLASSES = 4
NUM_QUERIES = 5
ALPHA, GAMMA, EOS_COEF = 0.3, 1.5, 0.1

# Image 0 has two objects, image 1 one. Query 0 <-> object 1 and query 3 <-> object 0 in image 0,
# query 4 <-> object 0 in image 1.
TARGETS = [
    {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], dtype=torch.float64),
    },
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]], dtype=torch.float64)},
]
INDICES = [(torch.tensor([0, 3]), torch.tensor([1, 0])), (torch.tensor([4]), torch.tensor([0]))]
NUM_BOXES = 3.0

Pairs = list[tuple[int, int, int]]


def _pairs(indices: list[tuple[torch.Tensor, torch.Tensor]]) -> Pairs:
    """Flattens per-image matches.

    Args:
        indices: Per-image ``(query_idx, target_idx)``.

    Returns:
        ``(image, query, target)`` triples.
    """
    return [(b, q, t) for b, (qs, ts) in enumerate(indices) for q, t in zip(qs.tolist(), ts.tolist())]


def _outputs(num_logits: int, num_queries: int = NUM_QUERIES) -> dict[str, torch.Tensor]:
    """Random float64 outputs of one decoder layer.

    Args:
        num_logits: Logit columns.
        num_queries: Queries per image.

    Returns:
        Dict with ``pred_logits`` ``[2, num_queries, num_logits]`` and ``pred_boxes``
        ``[2, num_queries, 4]`` (valid normalised ``cxcywh``).
    """
    logits = 2.0 * torch.randn(2, num_queries, num_logits, dtype=torch.float64)
    centre = 0.25 + 0.5 * torch.rand(2, num_queries, 2, dtype=torch.float64)
    size = 0.1 + 0.3 * torch.rand(2, num_queries, 2, dtype=torch.float64)
    return {"pred_logits": logits, "pred_boxes": torch.cat([centre, size], dim=-1)}


def _iou_giou(a: list[float], b: list[float]) -> tuple[float, float]:
    """IoU and GIoU of two ``cxcywh`` boxes with plain arithmetic.

    Args:
        a: First box ``(cx, cy, w, h)``.
        b: Second box ``(cx, cy, w, h)``.

    Returns:
        ``(iou, giou)``.
    """
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    iou = inter / union
    return iou, iou - (hull - union) / hull


def _one_hot(logits: torch.Tensor, targets: list[dict], pairs: Pairs) -> torch.Tensor:
    """One-hot class targets of the matched queries, zeros elsewhere.

    Args:
        logits: ``[bs, nq, num_classes]`` (for the shape).
        targets: Per-image ground truth.
        pairs: ``(image, query, target)`` matches.

    Returns:
        ``[bs, nq, num_classes]`` float64.
    """
    onehot = torch.zeros_like(logits)
    for b, q, t in pairs:
        onehot[b, q, targets[b]["labels"][t]] = 1.0
    return onehot


def _binary_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise ``-(t log p + (1 - t) log(1 - p))`` with ``p = sigmoid(logits)``.

    Args:
        logits: Any shape.
        target: Same shape, values in ``[0, 1]``.

    Returns:
        Same shape.
    """
    p = torch.sigmoid(logits)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p))


def _manual_vfl(outputs: dict, targets: list[dict], pairs: Pairs, num_boxes: float) -> dict[str, torch.Tensor]:
    """Varifocal loss: BCE towards the matched IoU, weighted ``alpha p^gamma`` on negatives.

    Args:
        outputs: One layer's outputs.
        targets: Per-image ground truth.
        pairs: Matches.
        num_boxes: Normaliser.

    Returns:
        ``{'loss_vfl': ...}``.
    """
    logits = outputs["pred_logits"]
    onehot = _one_hot(logits, targets, pairs)
    score = torch.zeros_like(logits)
    for b, q, t in pairs:
        iou, _ = _iou_giou(outputs["pred_boxes"][b, q].tolist(), targets[b]["boxes"][t].tolist())
        score[b, q, targets[b]["labels"][t]] = iou
    weight = ALPHA * torch.sigmoid(logits) ** GAMMA * (1 - onehot) + score
    return {"loss_vfl": (weight * _binary_ce(logits, score)).sum() / num_boxes}


def _manual_focal(outputs: dict, targets: list[dict], pairs: Pairs, num_boxes: float) -> dict[str, torch.Tensor]:
    """Sigmoid focal loss written per case (positive / negative entry).

    Args:
        outputs: One layer's outputs.
        targets: Per-image ground truth.
        pairs: Matches.
        num_boxes: Normaliser.

    Returns:
        ``{'loss_focal': ...}``.
    """
    logits = outputs["pred_logits"]
    onehot = _one_hot(logits, targets, pairs)
    p = torch.sigmoid(logits)
    positive = -ALPHA * (1 - p) ** GAMMA * torch.log(p)
    negative = -(1 - ALPHA) * p**GAMMA * torch.log(1 - p)
    return {"loss_focal": torch.where(onehot == 1, positive, negative).sum() / num_boxes}


def _manual_bce(outputs: dict, targets: list[dict], pairs: Pairs, num_boxes: float) -> dict[str, torch.Tensor]:
    """Binary cross-entropy against one-hot targets, summed and divided by ``num_boxes``.

    Args:
        outputs: One layer's outputs.
        targets: Per-image ground truth.
        pairs: Matches.
        num_boxes: Normaliser.

    Returns:
        ``{'loss_bce': ...}``.
    """
    logits = outputs["pred_logits"]
    return {"loss_bce": _binary_ce(logits, _one_hot(logits, targets, pairs)).sum() / num_boxes}


def _manual_labels(outputs: dict, targets: list[dict], pairs: Pairs, num_boxes: float) -> dict[str, torch.Tensor]:
    """Weighted softmax cross-entropy (no-object weight ``eos_coef``) and the top-1 class error.

    Args:
        outputs: One layer's outputs with ``num_classes + 1`` logit columns.
        targets: Per-image ground truth.
        pairs: Matches.
        num_boxes: Unused by this loss.

    Returns:
        ``{'loss_ce': ..., 'class_error': ...}``.
    """
    logits = outputs["pred_logits"]
    classes = torch.full(logits.shape[:2], NUM_CLASSES, dtype=torch.int64)
    for b, q, t in pairs:
        classes[b, q] = targets[b]["labels"][t]
    class_weight = torch.where(classes == NUM_CLASSES, EOS_COEF, 1.0).to(torch.float64)
    nll = -torch.log(torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)).gather(-1, classes[..., None])[..., 0]
    correct = [int(logits[b, q].argmax()) == int(targets[b]["labels"][t]) for b, q, t in pairs]
    return {
        "loss_ce": (class_weight * nll).sum() / class_weight.sum(),
        "class_error": torch.tensor(100.0 - 100.0 * sum(correct) / len(correct), dtype=torch.float64),
    }


def _manual_boxes(outputs: dict, targets: list[dict], pairs: Pairs, num_boxes: float) -> dict[str, torch.Tensor]:
    """L1 and ``1 - GIoU`` of the matched boxes, summed and divided by ``num_boxes``.

    Args:
        outputs: One layer's outputs.
        targets: Per-image ground truth.
        pairs: Matches.
        num_boxes: Normaliser.

    Returns:
        ``{'loss_bbox': ..., 'loss_giou': ...}``.
    """
    l1, giou_loss = 0.0, 0.0
    for b, q, t in pairs:
        pred, target = outputs["pred_boxes"][b, q], targets[b]["boxes"][t]
        l1 += (pred - target).abs().sum().item()
        giou_loss += 1.0 - _iou_giou(pred.tolist(), target.tolist())[1]
    return {
        "loss_bbox": torch.tensor(l1 / num_boxes, dtype=torch.float64),
        "loss_giou": torch.tensor(giou_loss / num_boxes, dtype=torch.float64),
    }


# loss name -> (logit columns, manual computation)
LOSS_CASES: dict[str, tuple[int, Callable[..., dict[str, torch.Tensor]]]] = {
    "vfl": (NUM_CLASSES, _manual_vfl),
    "focal": (NUM_CLASSES, _manual_focal),
    "bce": (NUM_CLASSES, _manual_bce),
    "labels": (NUM_CLASSES + 1, _manual_labels),
    "boxes": (NUM_CLASSES, _manual_boxes),
}


class _FixedMatcher:
    """Stands in for the Hungarian matcher: always returns the same matches and counts its calls.

    Args:
        indices: The matches to return.
    """

    def __init__(self, indices: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.indices = indices
        self.calls = 0

    def __call__(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns the fixed matches.

        Args:
            outputs: Ignored.
            targets: Ignored.

        Returns:
            The matches given at construction.
        """
        self.calls += 1
        return self.indices


def _criterion(losses: list[str], weight_dict: dict[str, float], indices=INDICES) -> SetCriterion:
    """A float64 criterion with the test's alpha, gamma, eos_coef, class count and a fixed matcher.

    Args:
        losses: Loss functions to apply.
        weight_dict: Loss weights.
        indices: Matches the stand-in matcher returns.

    Returns:
        The criterion, its ``empty_weight`` buffer in float64 like the test outputs.
    """
    criterion = SetCriterion(
        _FixedMatcher(indices),
        weight_dict,
        losses,
        alpha=ALPHA,
        gamma=GAMMA,
        eos_coef=EOS_COEF,
        num_classes=NUM_CLASSES,
    )
    return criterion.to(torch.float64)


@pytest.mark.parametrize("loss", list(LOSS_CASES))
def test_loss_equals_manual_computation(loss: str) -> None:
    num_logits, manual = LOSS_CASES[loss]
    outputs = _outputs(num_logits)
    got = _criterion([loss], {}).get_loss(loss, outputs, TARGETS, INDICES, NUM_BOXES)
    expected = manual(outputs, TARGETS, _pairs(INDICES), NUM_BOXES)
    assert set(got) == set(expected)
    for key, value in expected.items():
        # class_error is computed in float32, as officially (accuracy on correct.float()).
        tol = 1e-6 if key == "class_error" else 1e-10
        torch.testing.assert_close(got[key].to(torch.float64), value, rtol=tol, atol=tol, msg=key)


def test_vfl_target_iou_is_detached_from_the_boxes() -> None:
    outputs = _outputs(NUM_CLASSES)
    outputs["pred_logits"].requires_grad_(True)
    outputs["pred_boxes"].requires_grad_(True)
    _criterion(["vfl"], {}).get_loss("vfl", outputs, TARGETS, INDICES, NUM_BOXES)["loss_vfl"].backward()
    assert outputs["pred_boxes"].grad is None
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_logits"].grad.abs().sum() > 0


def test_forward_weights_suffixes_and_dn_normalisation() -> None:
    weight_dict = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    criterion = _criterion(["vfl", "boxes"], weight_dict)
    # Denoising layout: max_gt_num 2, 2 groups -> 8 queries; positives are the first 2 of each group of 4.
    dn_meta = {"dn_positive_idx": (torch.tensor([0, 1, 4, 5]), torch.tensor([0, 4])), "dn_num_group": 2}
    dn_pairs = [(0, 0, 0), (0, 1, 1), (0, 4, 0), (0, 5, 1), (1, 0, 0), (1, 4, 0)]
    main, aux, dn = _outputs(NUM_CLASSES), _outputs(NUM_CLASSES), _outputs(NUM_CLASSES, num_queries=8)
    outputs = {**main, "aux_outputs": [aux], "dn_aux_outputs": [dn], "dn_meta": dn_meta}

    losses = criterion(outputs, TARGETS)

    expected = {}
    for suffix, layer, pairs, num_boxes in [
        ("", main, _pairs(INDICES), NUM_BOXES),
        ("_aux_0", aux, _pairs(INDICES), NUM_BOXES),
        ("_dn_0", dn, dn_pairs, NUM_BOXES * 2),  # denoising divides by num_boxes * dn_num_group
    ]:
        for manual in (_manual_vfl, _manual_boxes):
            for key, value in manual(layer, TARGETS, pairs, num_boxes).items():
                expected[key + suffix] = weight_dict[key] * value
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-10, atol=1e-10, msg=key)
    assert criterion.matcher.calls == 2, "the matcher runs for the last layer and each aux layer, not for dn"


def test_num_boxes_is_clamped_to_one_without_targets() -> None:
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}] * 2
    no_match = [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))] * 2
    criterion = _criterion(["vfl", "boxes"], {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, no_match)
    outputs = _outputs(NUM_CLASSES)
    losses = criterion(outputs, empty)
    torch.testing.assert_close(losses["loss_vfl"], _manual_vfl(outputs, empty, [], 1.0)["loss_vfl"])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0


def test_unweighted_losses_are_dropped() -> None:
    losses = _criterion(["labels"], {"loss_ce": 2.0})(_outputs(NUM_CLASSES + 1), TARGETS)
    assert set(losses) == {"loss_ce"}


def test_unknown_loss_name_raises() -> None:
    with pytest.raises(ValueError, match="unsupported losses"):
        _criterion(["masks"], {})
    with pytest.raises(ValueError, match="unknown loss"):
        _criterion(["vfl"], {}).get_loss("giou", _outputs(NUM_CLASSES), TARGETS, INDICES, NUM_BOXES)


def test_dn_outputs_without_meta_raise() -> None:
    outputs = {**_outputs(NUM_CLASSES), "dn_aux_outputs": [_outputs(NUM_CLASSES)]}
    with pytest.raises(ValueError, match="dn_meta"):
        _criterion(["boxes"], {"loss_bbox": 1.0})(outputs, TARGETS)


def _dn_case() -> tuple[dict, list[tuple[int, int, int]]]:
    """Outputs with one aux layer and one denoising layer, and the denoising pairs of their ``dn_meta``.

    Returns:
        ``(outputs, dn_pairs)``: max_gt_num 2, 2 groups (8 denoising queries); positives are
        the first 2 queries of each group of 4.
    """
    dn_meta = {"dn_positive_idx": (torch.tensor([0, 1, 4, 5]), torch.tensor([0, 4])), "dn_num_group": 2}
    dn_pairs = [(0, 0, 0), (0, 1, 1), (0, 4, 0), (0, 5, 1), (1, 0, 0), (1, 4, 0)]
    outputs = {**_outputs(NUM_CLASSES), "aux_outputs": [_outputs(NUM_CLASSES), _outputs(NUM_CLASSES)],
               "dn_aux_outputs": [_outputs(NUM_CLASSES, num_queries=8)], "dn_meta": dn_meta}
    return outputs, dn_pairs


def _as_pairs(arrays: list) -> Pairs:
    """``(image, query, target)`` triples of recorded or forced numpy matches."""
    return [(b, int(q), int(t)) for b, (qs, ts) in enumerate(arrays) for q, t in zip(qs, ts)]


def test_every_decision_is_recorded_in_order() -> None:
    criterion = _criterion(["vfl", "boxes"], {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    outputs, dn_pairs = _dn_case()

    criterion(outputs, TARGETS)

    assert list(criterion.last_indices) == ["final", "aux_0", "aux_1", "dn"] == SetCriterion.decision_keys(outputs)
    for key in ("final", "aux_0", "aux_1"):
        assert _as_pairs(criterion.last_indices[key]) == _pairs(INDICES), key
    assert _as_pairs(criterion.last_indices["dn"]) == dn_pairs
    for query_idx, target_idx in criterion.last_indices["dn"]:
        assert isinstance(query_idx, np.ndarray) and query_idx.dtype == np.int64 and target_idx.dtype == np.int64

    criterion({k: v for k, v in outputs.items() if "aux" not in k}, TARGETS)
    assert list(criterion.last_indices) == ["final"], "each forward starts a new record"


def test_forced_indices_replace_the_matcher_and_the_dn_matches() -> None:
    weight_dict = {"loss_vfl": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    outputs, _ = _dn_case()
    forced_aux = [(np.array([1, 2]), np.array([0, 1])), (np.array([0]), np.array([0]))]
    forced_dn = [(np.array([2, 3, 6, 7]), np.array([0, 1, 0, 1])), (np.array([1, 5]), np.array([0, 0]))]
    criterion = _criterion(["vfl", "boxes"], weight_dict)
    criterion.forced_indices = {"aux_1": forced_aux, "dn": forced_dn}

    losses = criterion(outputs, TARGETS)

    assert criterion.matcher.calls == 2, "the matcher runs for 'final' and 'aux_0' only"
    assert _as_pairs(criterion.last_indices["aux_1"]) == _as_pairs(forced_aux)
    assert _as_pairs(criterion.last_indices["dn"]) == _as_pairs(forced_dn)
    for suffix, layer, pairs, num_boxes in [
        ("_aux_0", outputs["aux_outputs"][0], _pairs(INDICES), NUM_BOXES),
        ("_aux_1", outputs["aux_outputs"][1], _as_pairs(forced_aux), NUM_BOXES),
        ("_dn_0", outputs["dn_aux_outputs"][0], _as_pairs(forced_dn), NUM_BOXES * 2),
    ]:
        for manual in (_manual_vfl, _manual_boxes):
            for key, value in manual(layer, TARGETS, pairs, num_boxes).items():
                torch.testing.assert_close(losses[key + suffix], weight_dict[key] * value, rtol=1e-10, atol=1e-10)

    # Forcing exactly what was decided changes nothing.
    free = _criterion(["vfl", "boxes"], weight_dict)
    expected = free(outputs, TARGETS)
    free.forced_indices = dict(free.last_indices)
    again = free(outputs, TARGETS)
    assert free.matcher.calls == 3
    assert all(torch.equal(again[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "forced, message",
    [
        ({"aux_7": []}, r"keys \['aux_7'\] that this forward does not match"),
        ({"final": [(np.array([0, 3]), np.array([1, 0]))]}, "holds 1 images, the batch has 2"),
        ({"final": [(np.array([0]), np.array([1])), (np.array([4]), np.array([0]))]}, "has 1 entries, expected 2"),
        ({"final": [(np.array([0, 9]), np.array([1, 0])), (np.array([4]), np.array([0]))]}, r"outside \[0, 5\)"),
        ({"final": [(np.array([0, 3]), np.array([1, 2])), (np.array([4]), np.array([0]))]}, r"outside \[0, 2\)"),
        ({"final": [(np.array([0.0, 3.0]), np.array([1, 0])), (np.array([4]), np.array([0]))]}, "1-D integer"),
        ({"final": [(np.array([0, 3]),), (np.array([4]), np.array([0]))]}, r"\(query_idx, target_idx\) pair"),
        ({"dn": [(np.array([0, 1]), np.array([0, 1])), (np.array([0, 4]), np.array([0, 0]))]},
         r"forced_indices\['dn'\]\[0\] query_idx has 2 entries, expected 4"),
    ],
    ids=["unknown_key", "images", "length", "query_range", "target_range", "dtype", "pair", "dn_length"],
)
def test_bad_forced_indices_raise(forced: dict, message: str) -> None:
    criterion = _criterion(["boxes"], {"loss_bbox": 1.0})
    criterion.forced_indices = forced
    with pytest.raises(ValueError, match=message):
        criterion(_dn_case()[0], TARGETS)
