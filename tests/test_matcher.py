"""torch_ref.matcher.HungarianMatcher: optimal assignment of the official matching cost."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from torch_ref import build_matcher
from torch_ref.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from torch_ref.matcher import HungarianMatcher

NUM_CLASSES = 5


def _outputs(bs: int, num_queries: int, num_classes: int = NUM_CLASSES) -> dict[str, torch.Tensor]:
    """Random decoder outputs.

    Args:
        bs: Batch size.
        num_queries: Queries per image.
        num_classes: Logit columns.

    Returns:
        Dict with ``pred_logits`` ``[bs, num_queries, num_classes]`` and ``pred_boxes``
        ``[bs, num_queries, 4]`` (valid normalised ``cxcywh``).
    """
    logits = 2.0 * torch.randn(bs, num_queries, num_classes)
    centre = 0.2 + 0.6 * torch.rand(bs, num_queries, 2)
    size = 0.05 + 0.4 * torch.rand(bs, num_queries, 2)
    return {"pred_logits": logits, "pred_boxes": torch.cat([centre, size], dim=-1)}


def _target(num_boxes: int, num_classes: int = NUM_CLASSES) -> dict[str, torch.Tensor]:
    """A random ground-truth dict.

    Args:
        num_boxes: Number of objects (may be 0).
        num_classes: Labels are drawn from ``[0, num_classes)``.

    Returns:
        Dict with int64 ``labels`` ``[num_boxes]`` and ``boxes`` ``[num_boxes, 4]`` (``cxcywh``).
    """
    centre = 0.2 + 0.6 * torch.rand(num_boxes, 2)
    size = 0.05 + 0.4 * torch.rand(num_boxes, 2)
    return {
        "labels": torch.randint(0, num_classes, (num_boxes,), dtype=torch.int64),
        "boxes": torch.cat([centre, size], dim=-1),
    }


def _official_cost(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    target: dict[str, torch.Tensor],
    use_focal_loss: bool,
    weights: dict[str, float],
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """The official matching cost of one image, written out term by term.

    Args:
        logits: ``[num_queries, num_classes]``.
        boxes: ``[num_queries, 4]`` predicted ``cxcywh``.
        target: Ground truth of the image.
        use_focal_loss: Focal class cost on sigmoid scores, else ``-softmax`` probability.
        weights: ``cost_class``, ``cost_bbox`` and ``cost_giou``.
        alpha: Focal alpha.
        gamma: Focal gamma.

    Returns:
        ``[num_queries, num_targets]`` cost matrix.
    """
    labels = target["labels"]
    if use_focal_loss:
        prob = torch.sigmoid(logits)[:, labels]  # [nq, nt]
        positive = alpha * (1 - prob) ** gamma * -torch.log(prob + 1e-8)
        negative = (1 - alpha) * prob**gamma * -torch.log(1 - prob + 1e-8)
        cost_class = positive - negative
    else:
        cost_class = -torch.softmax(logits, dim=-1)[:, labels]  # [nq, nt]
    cost_bbox = (boxes[:, None, :] - target["boxes"][None, :, :]).abs().sum(-1)  # [nq, nt]
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target["boxes"]))
    return weights["cost_class"] * cost_class + weights["cost_bbox"] * cost_bbox + weights["cost_giou"] * cost_giou


# Each cost term alone (a swapped or dropped term changes the optimum), then the official mix.
WEIGHT_CASES = {
    "class_only": {"cost_class": 1.0, "cost_bbox": 0.0, "cost_giou": 0.0},
    "bbox_only": {"cost_class": 0.0, "cost_bbox": 1.0, "cost_giou": 0.0},
    "giou_only": {"cost_class": 0.0, "cost_bbox": 0.0, "cost_giou": 1.0},
    "official": {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0},
}


@pytest.mark.parametrize("weights_name", list(WEIGHT_CASES))
@pytest.mark.parametrize("use_focal_loss", [True, False], ids=["focal", "softmax"])
def test_equals_brute_force_assignment(use_focal_loss: bool, weights_name: str) -> None:
    weights = WEIGHT_CASES[weights_name]
    matcher = HungarianMatcher(weights, use_focal_loss=use_focal_loss, alpha=0.25, gamma=2.0)
    for _ in range(5):
        outputs = _outputs(bs=1, num_queries=4)
        target = _target(2)
        target["labels"] = torch.randperm(NUM_CLASSES)[:2]  # distinct labels: no tie under class cost alone
        cost = _official_cost(
            outputs["pred_logits"][0], outputs["pred_boxes"][0], target, use_focal_loss, weights, 0.25, 2.0
        )  # [4, 2]
        # Query perm[j] is assigned to target j; try every ordered pair of distinct queries.
        totals = {
            perm: sum(cost[q, j].item() for j, q in enumerate(perm)) for perm in itertools.permutations(range(4), 2)
        }
        ranked = sorted(totals, key=totals.get)
        best = ranked[0]
        assert totals[ranked[1]] - totals[best] > 1e-4, "the random case must have a unique optimum"

        ((query_idx, target_idx),) = matcher(outputs, [target])
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert set(zip(query_idx.tolist(), target_idx.tolist())) == {(q, j) for j, q in enumerate(best)}


def test_official_r18vd_matcher_config() -> None:
    matcher = build_matcher("r18vd")
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2, 5, 2)
    assert (matcher.use_focal_loss, matcher.alpha, matcher.gamma) == (True, 0.25, 2.0)


def test_batched_equals_per_image() -> None:
    matcher = build_matcher("r18vd", num_classes=NUM_CLASSES)
    sizes = [3, 0, 5, 1]
    outputs = _outputs(bs=len(sizes), num_queries=6)
    targets = [_target(n) for n in sizes]

    batched = matcher(outputs, targets)
    assert len(batched) == len(sizes)
    for i, (query_idx, target_idx) in enumerate(batched):
        single = {k: v[i : i + 1] for k, v in outputs.items()}
        ((query_single, target_single),) = matcher(single, [targets[i]])
        assert torch.equal(query_idx, query_single) and torch.equal(target_idx, target_single)
        assert len(query_idx) == sizes[i]
        assert torch.equal(query_idx, query_idx.sort().values)
        assert sorted(target_idx.tolist()) == list(range(sizes[i]))


def test_more_targets_than_queries_matches_every_query() -> None:
    matcher = build_matcher("r18vd", num_classes=NUM_CLASSES)
    ((query_idx, target_idx),) = matcher(_outputs(bs=1, num_queries=3), [_target(5)])
    assert query_idx.tolist() == [0, 1, 2]
    assert len(set(target_idx.tolist())) == 3


@pytest.mark.parametrize("sizes", [[0, 2], [0, 0]], ids=["one_image_empty", "batch_empty"])
def test_images_without_targets_get_empty_matches(sizes: list[int]) -> None:
    matcher = build_matcher("r18vd", num_classes=NUM_CLASSES)
    indices = matcher(_outputs(bs=len(sizes), num_queries=4), [_target(n) for n in sizes])
    for (query_idx, target_idx), n in zip(indices, sizes):
        assert query_idx.shape == (n,) and target_idx.shape == (n,)
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64


@pytest.mark.parametrize("bad_label", [NUM_CLASSES, 90, -1])
def test_out_of_range_labels_mention_the_category_remap(bad_label: int) -> None:
    matcher = build_matcher("r18vd", num_classes=NUM_CLASSES)
    target = _target(2)
    target["labels"][1] = bad_label
    with pytest.raises(ValueError, match="remap"):
        matcher(_outputs(bs=1, num_queries=4), [target])


@pytest.mark.parametrize(
    "targets, message",
    [
        ([], "targets for a batch"),
        ([{"labels": torch.tensor([1])}], "'labels' and 'boxes'"),
        ([{"labels": torch.tensor([1.0]), "boxes": torch.rand(1, 4)}], "integer"),
        ([{"labels": torch.tensor([1, 2]), "boxes": torch.rand(1, 4)}], "2 labels but 1 boxes"),
    ],
    ids=["count", "keys", "dtype", "length"],
)
def test_malformed_targets_raise(targets: list, message: str) -> None:
    matcher = build_matcher("r18vd", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=message):
        matcher(_outputs(bs=1, num_queries=4), targets)


def test_all_zero_weights_raise() -> None:
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher({"cost_class": 0, "cost_bbox": 0, "cost_giou": 0})


def test_last_costs_are_the_per_image_cost_matrices_of_the_last_call() -> None:
    matcher = build_matcher("r18vd", num_classes=NUM_CLASSES)
    sizes = [3, 0, 2]
    outputs = _outputs(bs=len(sizes), num_queries=6)
    targets = [_target(n) for n in sizes]
    weights = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}

    indices = matcher(outputs, targets)

    assert len(matcher.last_costs) == len(sizes)
    for i, ((query_idx, target_idx), cost) in enumerate(zip(indices, matcher.last_costs)):
        assert cost.shape == (6, sizes[i]) and cost.dtype == np.float32
        expected = _official_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i], True, weights,
                                  0.25, 2.0)  # [6, n_i]
        np.testing.assert_allclose(cost, expected.numpy(), rtol=1e-5, atol=1e-5)
        # The recorded matrix is the one the assignment minimises.
        best_query, best_target = linear_sum_assignment(cost)
        assert query_idx.tolist() == best_query.tolist() and target_idx.tolist() == best_target.tolist()

    matcher({k: v[:1] for k, v in outputs.items()}, targets[:1])
    assert len(matcher.last_costs) == 1, "each call replaces the previous call's costs"
