"""torch_ref.postprocessor.RTDETRPostProcessor: top-k selection, (w, h) scaling, COCO remap, deploy mode."""

from __future__ import annotations

import pytest
import torch

from rtdetr_common.coco import LABEL_TO_CATEGORY
from torch_ref import build_postprocessor
from torch_ref.postprocessor import RTDETRPostProcessor


def _outputs(bs: int, num_queries: int, num_classes: int) -> dict[str, torch.Tensor]:
    """Random decoder outputs with distinct scores.

    Args:
        bs: Batch size.
        num_queries: Queries per image.
        num_classes: Logit columns.

    Returns:
        Dict with ``pred_logits`` ``[bs, num_queries, num_classes]`` and ``pred_boxes``
        ``[bs, num_queries, 4]`` (normalised ``cxcywh``).
    """
    logits = 3.0 * torch.randn(bs, num_queries, num_classes, dtype=torch.float64)
    centre = 0.2 + 0.6 * torch.rand(bs, num_queries, 2, dtype=torch.float64)
    size = 0.05 + 0.4 * torch.rand(bs, num_queries, 2, dtype=torch.float64)
    return {"pred_logits": logits, "pred_boxes": torch.cat([centre, size], dim=-1)}


def test_focal_path_equals_manual_computation() -> None:
    bs, num_queries, num_classes, k = 2, 6, 3, 5
    outputs = _outputs(bs, num_queries, num_classes)
    sizes = torch.tensor([[640.0, 480.0], [320.0, 800.0]], dtype=torch.float64)  # (w, h)
    post = RTDETRPostProcessor(num_classes=num_classes, use_focal_loss=True, num_top_queries=k)

    results = post(outputs, sizes)
    assert len(results) == bs
    for b in range(bs):
        w, h = sizes[b].tolist()
        candidates = []
        for q in range(num_queries):
            cx, cy, bw, bh = outputs["pred_boxes"][b, q].tolist()
            pixels = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            for c in range(num_classes):
                score = 1.0 / (1.0 + torch.exp(-outputs["pred_logits"][b, q, c]).item())
                candidates.append((score, c, pixels))
        best = sorted(candidates, key=lambda item: -item[0])[:k]

        result = results[b]
        assert set(result) == {"labels", "boxes", "scores"}
        assert result["labels"].tolist() == [c for _, c, _ in best]
        torch.testing.assert_close(result["scores"], torch.tensor([s for s, _, _ in best], dtype=torch.float64))
        torch.testing.assert_close(result["boxes"], torch.tensor([p for _, _, p in best], dtype=torch.float64))


def test_sizes_are_width_then_height() -> None:
    post = RTDETRPostProcessor(num_classes=2, use_focal_loss=True, num_top_queries=1)
    outputs = {
        "pred_logits": torch.tensor([[[5.0, -5.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.25, 0.5, 0.5]]]),  # xyxy (0.25, 0.0, 0.75, 0.5)
    }
    (result,) = post(outputs, torch.tensor([[640.0, 480.0]]))
    # Read as (h, w) the box would come out as (120, 0, 360, 320).
    torch.testing.assert_close(result["boxes"], torch.tensor([[160.0, 0.0, 480.0, 240.0]]))


def test_remap_mscoco_category_gives_coco_ids() -> None:
    outputs = _outputs(bs=2, num_queries=10, num_classes=80)
    sizes = torch.tensor([[640.0, 640.0], [500.0, 375.0]], dtype=torch.float64)
    plain = build_postprocessor("r18vd")(outputs, sizes)
    remapped = build_postprocessor("r18vd", remap_mscoco_category=True)(outputs, sizes)
    for before, after in zip(plain, remapped):
        assert after["labels"].tolist() == [LABEL_TO_CATEGORY[label] for label in before["labels"].tolist()]
        assert torch.equal(after["boxes"], before["boxes"]) and torch.equal(after["scores"], before["scores"])

    # Spot checks of the official table: person, stop sign (after the unused id 12), toothbrush.
    one_hot = torch.full((1, 3, 80), -10.0)
    for query, label in enumerate([0, 11, 79]):
        one_hot[0, query, label] = 10.0 - query  # distinct scores fix the top-k order
    post = RTDETRPostProcessor(num_classes=80, num_top_queries=3, remap_mscoco_category=True)
    (result,) = post({"pred_logits": one_hot, "pred_boxes": torch.full((1, 3, 4), 0.5)}, torch.tensor([[1.0, 1.0]]))
    assert result["labels"].tolist() == [1, 13, 90]


def test_remap_needs_80_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        RTDETRPostProcessor(num_classes=20, remap_mscoco_category=True)


def test_deploy_mode_returns_batched_tuple_without_remap() -> None:
    outputs = _outputs(bs=2, num_queries=10, num_classes=80)
    sizes = torch.tensor([[640.0, 480.0], [480.0, 640.0]], dtype=torch.float64)
    post = build_postprocessor("r18vd", remap_mscoco_category=True)
    post.num_top_queries = 7
    as_dicts = post(outputs, sizes)

    assert post.deploy() is post
    assert post.deploy_mode and not post.training
    labels, boxes, scores = post(outputs, sizes)
    assert labels.shape == (2, 7) and boxes.shape == (2, 7, 4) and scores.shape == (2, 7)
    for b, result in enumerate(as_dicts):
        # The official deploy path returns before the COCO remap: raw labels 0..79.
        assert [LABEL_TO_CATEGORY[label] for label in labels[b].tolist()] == result["labels"].tolist()
        assert torch.equal(boxes[b], result["boxes"]) and torch.equal(scores[b], result["scores"])


@pytest.mark.parametrize("shape", [(2,), (2, 3), (3, 2), (1, 2, 2)])
def test_bad_size_shape_raises(shape: tuple[int, ...]) -> None:
    post = RTDETRPostProcessor(num_classes=3, num_top_queries=4)
    with pytest.raises(ValueError, match=r"\(width, height\)"):
        post(_outputs(bs=2, num_queries=5, num_classes=3), torch.ones(shape, dtype=torch.float64))


def test_more_top_queries_than_candidates_raises() -> None:
    post = RTDETRPostProcessor(num_classes=3, num_top_queries=16)
    with pytest.raises(ValueError, match="num_top_queries"):
        post(_outputs(bs=1, num_queries=5, num_classes=3), torch.ones(1, 2, dtype=torch.float64))
