"""torch_ref equals HuggingFace transformers' independent RT-DETR on the same (random) weights.

HF's ``RTDetrForObjectDetection`` was validated by its authors against the official checkpoints,
so agreement to float32 noise on non-trivial weights is an independent check of torch_ref's
numerics. How the two are lined up (see ``tests/hf_rtdetr.py`` for the details):

* weights: torch_ref is built, every float parameter / buffer is re-drawn from a seeded
  generator, and the state_dict is renamed to HF's layout and loaded strictly;
* ``eval_idx``: the official decoder returns layer ``eval_idx`` in eval (r50vd_m: layer 2 of 6),
  HF always the last one, so HF's ``intermediate_*[:, eval_idx]`` is compared;
* query order: the 300 queries are the top-k encoder scores. Two scores that differ by about
  one float32 ulp can come out of top-k in either order depending on rounding in the encoder,
  which permutes the queries (the decoder is permutation-equivariant, so the per-query results
  are unchanged). HF queries are therefore matched to torch_ref's, and a query may only have
  moved if its encoder score ties (within ``TIE_TOL``) with the one it swapped with;
* invalid anchors: the official code sets them to +inf, HF to float32 max; both give sigmoid 1,
  so queries picked from the zeroed border memory agree too (r34vd exercises this path).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from rtdetr_common.configs import load_official_configs, load_official_manifest  # noqa: E402
from torch_ref import build_model  # noqa: E402
from torch_ref.backbone import FrozenBatchNorm2d  # noqa: E402

from tests.hf_rtdetr import hf_config_for, hf_eval_index, official_to_hf  # noqa: E402
from transformers import RTDetrForObjectDetection  # noqa: E402

pytestmark = pytest.mark.hf

OFFICIAL = load_official_configs()
MANIFEST = load_official_manifest()
VARIANTS = [
    "r18vd",
    "r50vd",
    pytest.param("r34vd", marks=pytest.mark.slow),
    pytest.param("r50vd_m", marks=pytest.mark.slow),
    pytest.param("r101vd", marks=pytest.mark.slow),
]
ATOL = 1e-4
TIE_TOL = 1e-4
WEIGHT_SEED = 0
INPUT_SEED = 1
_NORMS = (nn.BatchNorm2d, nn.LayerNorm, FrozenBatchNorm2d)


@torch.no_grad()
def _randomize_(model: nn.Module, seed: int) -> None:
    """Re-draws every float parameter and buffer of ``model`` in place, deterministically.

    Scales keep activations O(1) through the deepest variant so nothing saturates: conv / linear /
    embedding weights ~ N(0, 1/fan_in), other biases ~ N(0, 0.1^2); norm layers get weight and
    running_var ~ U(0.5, 1.5) (positive) and bias, running_mean ~ N(0, 0.1^2). Integer buffers
    (``num_batches_tracked``) are left alone.

    Args:
        model: Module to overwrite.
        seed: Seed of the torch.Generator; the draw order is ``model.modules()`` order.
    """
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        is_norm = isinstance(module, _NORMS)
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if not tensor.is_floating_point():
                continue
            if is_norm and name in ("weight", "running_var"):
                new = 0.5 + torch.rand(tensor.shape, generator=gen)
            elif is_norm or tensor.dim() < 2:
                new = 0.1 * torch.randn(tensor.shape, generator=gen)
            else:
                fan_in = tensor[0].numel()
                new = torch.randn(tensor.shape, generator=gen) / math.sqrt(fan_in)
            tensor.copy_(new)


def _hf_model(variant: str) -> RTDetrForObjectDetection:
    """HF's detector for an official variant, randomly initialised, in eval mode."""
    return RTDetrForObjectDetection(hf_config_for(OFFICIAL[variant])).eval()


def _align_queries(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """For each torch_ref query, the nearest HF query; only encoder-score ties may be reordered.

    Queries drawn from invalid border anchors are exact duplicates of one another (zeroed memory,
    +inf / finfo.max anchor), so the pairing need not be one-to-one; instead every HF query must
    also be some torch_ref query's partner.

    Args:
        ours: torch_ref per-query outputs [num_queries, c] (logits and boxes concatenated).
        theirs: HF per-query outputs [num_queries, c].
        scores: HF's top-k encoder selection scores [num_queries] (in HF's query order).

    Returns:
        ``perm`` with ``theirs[perm]`` in torch_ref's query order.
    """
    # [num_queries(ours), num_queries(theirs)] max abs difference of every pair
    distance = (ours[:, None, :] - theirs[None, :, :]).abs().amax(-1)
    perm = distance.argmin(1)
    moved = (perm != torch.arange(len(perm))).nonzero().flatten()
    untied = [(int(q), int(perm[q])) for q in moved
              if abs(float(scores[q]) - float(scores[perm[q]])) > TIE_TOL]
    direct = distance.diagonal().max().item()
    assert untied == [], (f"outputs differ (max |diff| in query order {direct:.3g}) and no "
                          f"tie-only reordering explains it; (ours, HF) pairs: {untied[:10]}")
    unpaired = (distance.amin(0) > ATOL).nonzero().flatten().tolist()
    assert unpaired == [], f"HF queries with no torch_ref counterpart: {unpaired}"
    return perm


@pytest.mark.parametrize("variant", VARIANTS)
def test_mapping_covers_official_manifest(variant: str) -> None:
    """Every official key maps onto exactly HF's keys and shapes, and HF has the official size."""
    hf = _hf_model(variant)
    zeros = {k: torch.zeros(shape, dtype=getattr(torch, dtype))
             for k, (shape, dtype, _) in MANIFEST[variant]["state_dict"].items()}
    hf.load_state_dict(official_to_hf(zeros, hf.state_dict()), strict=True)
    assert sum(p.numel() for p in hf.parameters()) == MANIFEST[variant]["num_parameters"]


def test_mapping_rejects_leftovers() -> None:
    """Unknown official keys and uncovered HF keys are reported, not silently dropped."""
    hf_keys = _hf_model("r18vd").state_dict()
    official = {k: torch.zeros(shape, dtype=getattr(torch, dtype))
                for k, (shape, dtype, _) in MANIFEST["r18vd"]["state_dict"].items()}
    with pytest.raises(KeyError, match="decoder.not_a_module.weight"):
        official_to_hf({**official, "decoder.not_a_module.weight": torch.zeros(1)}, hf_keys)
    official.pop("decoder.enc_score_head.bias")
    with pytest.raises(KeyError, match="model.enc_score_head.bias"):
        official_to_hf(official, hf_keys)


def test_hf_config_rejects_what_hf_cannot_express() -> None:
    """Configs HF's modules cannot reproduce fail loudly instead of building a different model."""
    base = OFFICIAL["r18vd"]
    with pytest.raises(ValueError, match="'vd' variant"):
        hf_config_for({**base, "PResNet": {**base["PResNet"], "variant": "b"}})
    with pytest.raises(ValueError, match="depth_mult"):
        hf_config_for({**base, "HybridEncoder": {**base["HybridEncoder"], "depth_mult": 0.5}})
    with pytest.raises(ValueError, match="in_channels"):
        hf_config_for({**base, "HybridEncoder": {**base["HybridEncoder"], "in_channels": [512, 1024, 2048]}})
    with pytest.raises(ValueError, match="RTDETRTransformer"):
        hf_config_for({k: v for k, v in base.items() if k != "RTDETRTransformer"})


def test_in_proj_split_rows() -> None:
    """The fused q/k/v projection is split row-wise in q, k, v order."""
    weight = torch.arange(12.0).reshape(6, 2)
    key = "decoder.decoder.layers.0.self_attn.in_proj_weight"
    out = official_to_hf({key: weight})
    prefix = "model.decoder.layers.0.self_attn"
    assert torch.equal(out[f"{prefix}.q_proj.weight"], weight[0:2])
    assert torch.equal(out[f"{prefix}.k_proj.weight"], weight[2:4])
    assert torch.equal(out[f"{prefix}.v_proj.weight"], weight[4:6])


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_hf(variant: str) -> None:
    """Same weights and image: logits and boxes agree within 1e-4 and are far from trivial."""
    ours_model = build_model(variant, num_classes=80).eval()
    _randomize_(ours_model, WEIGHT_SEED)
    hf = _hf_model(variant)
    hf.load_state_dict(official_to_hf(ours_model.state_dict(), hf.state_dict()), strict=True)

    image = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(INPUT_SEED))
    with torch.no_grad():
        ours = ours_model(image)
        theirs = hf(pixel_values=image)

    layer = hf_eval_index(OFFICIAL[variant])
    hf_logits = theirs.intermediate_logits[0, layer]  # [num_queries, num_classes]
    hf_boxes = theirs.intermediate_reference_points[0, layer]  # [num_queries, 4]
    logits, boxes = ours["pred_logits"][0], ours["pred_boxes"][0]
    assert logits.shape == hf_logits.shape == (300, 80) and boxes.shape == hf_boxes.shape == (300, 4)

    scores = theirs.enc_topk_logits[0].max(-1).values  # [num_queries]
    perm = _align_queries(torch.cat([logits, boxes], -1), torch.cat([hf_logits, hf_boxes], -1), scores)
    logit_diff = (logits - hf_logits[perm]).abs().max().item()
    box_diff = (boxes - hf_boxes[perm]).abs().max().item()
    assert logit_diff <= ATOL, f"{variant}: max |logits diff| {logit_diff:.3g}"
    assert box_diff <= ATOL, f"{variant}: max |boxes diff| {box_diff:.3g}"

    # Not vacuous: spread-out logits, many distinct boxes spread over the image (duplicates only
    # come from invalid-anchor queries: r34vd with these seeds takes 179 of them, 122 distinct boxes).
    assert logits.std().item() > 0.5
    assert torch.unique(boxes, dim=0).shape[0] >= 100
    assert boxes[:, :2].std(0).min().item() > 0.05
    if layer != theirs.intermediate_logits.shape[1] - 1:
        # The official early exit matters here: HF's last layer is a different prediction.
        assert (theirs.logits[0] - hf_logits).abs().max().item() > 0.1
