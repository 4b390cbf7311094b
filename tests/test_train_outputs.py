"""RT-DETR r18vd in training: official output structure, loss names, gradients, empty targets, multi-scale."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rtdetr_common.configs import load_official_configs
from rtdetr_common.random import SharedRandom
from torch_ref import build_criterion, build_model

NUM_CLASSES = 80
NUM_QUERIES = 300
NUM_DECODER_LAYERS = 3  # r18vd
NUM_DENOISING = 100
LOSS_BASES = ("loss_vfl", "loss_bbox", "loss_giou")
# Last layer, then the aux entries (decoder layers but the last, encoder proposals); denoising layers.
MATCHED_SUFFIXES = [""] + [f"_aux_{i}" for i in range(NUM_DECODER_LAYERS)]
DN_SUFFIXES = [f"_dn_{i}" for i in range(NUM_DECODER_LAYERS)]
OFFICIAL_MULTI_SCALE = load_official_configs()["r18vd"]["RTDETR"]["multi_scale"]

# Parameters whose gradient is exactly zero after one step from the official initialisation: the
# last linear layer of every box head starts with zero weight and bias (official _reset_parameters),
# so nothing flows back into the hidden layers of those heads. Every other parameter gets a
# non-zero gradient.
ZERO_GRAD_AT_INIT = {
    f"decoder.{head}.layers.{layer}.{kind}"
    for head in ["enc_bbox_head"] + [f"dec_bbox_head.{i}" for i in range(NUM_DECODER_LAYERS)]
    for layer in (0, 1)
    for kind in ("weight", "bias")
}


def _targets(num_boxes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Random ground truth for a batch.

    Args:
        num_boxes: Objects per image (0 allowed).

    Returns:
        Per-image dicts with int64 ``labels`` in ``[0, 80)`` and normalised ``cxcywh`` ``boxes``.
    """
    targets = []
    for n in num_boxes:
        centre = 0.25 + 0.5 * torch.rand(n, 2)
        size = 0.1 + 0.3 * torch.rand(n, 2)
        labels = torch.randint(0, NUM_CLASSES, (n,), dtype=torch.int64)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], dim=-1)})
    return targets


def _loss_names(suffixes: list[str]) -> set[str]:
    """Official loss keys for the given suffixes.

    Args:
        suffixes: Key suffixes, e.g. ``['', '_aux_0', '_dn_0']``.

    Returns:
        Every ``loss_vfl`` / ``loss_bbox`` / ``loss_giou`` key with every suffix.
    """
    return {base + suffix for base in LOSS_BASES for suffix in suffixes}


def _forward(num_boxes: list[int], backward: bool) -> SimpleNamespace:
    """One r18vd training forward (and optionally backward) on a 2x3x256x256 batch.

    Args:
        num_boxes: Objects per image.
        backward: Whether to back-propagate the summed loss (else run under ``no_grad``).

    Returns:
        Namespace with ``model``, ``targets``, ``outputs`` and ``losses``.
    """
    torch.manual_seed(0)
    model = build_model("r18vd", multi_scale=False).train()
    criterion = build_criterion("r18vd")
    images = torch.rand(2, 3, 256, 256)
    targets = _targets(num_boxes)
    with torch.set_grad_enabled(backward):
        outputs = model(images, targets)
        losses = criterion(outputs, targets)
    if backward:
        sum(losses.values()).backward()
    return SimpleNamespace(model=model, targets=targets, outputs=outputs, losses=losses)


@pytest.fixture(scope="module")
def step() -> SimpleNamespace:
    """Forward, loss and backward on a batch with 3 and 1 objects (shared by the tests below)."""
    return _forward([3, 1], backward=True)


def _assert_layer_output(layer: dict[str, torch.Tensor], num_queries: int) -> None:
    """Checks one layer's ``pred_logits`` / ``pred_boxes`` shapes and ranges.

    Args:
        layer: Output dict of one decoder layer.
        num_queries: Expected query count.
    """
    assert set(layer) == {"pred_logits", "pred_boxes"}
    assert layer["pred_logits"].shape == (2, num_queries, NUM_CLASSES)
    assert layer["pred_boxes"].shape == (2, num_queries, 4)
    assert torch.isfinite(layer["pred_logits"]).all()
    assert ((layer["pred_boxes"] > 0) & (layer["pred_boxes"] < 1)).all()


def test_output_structure(step: SimpleNamespace) -> None:
    outputs = step.outputs
    assert set(outputs) == {"pred_logits", "pred_boxes", "aux_outputs", "dn_aux_outputs", "dn_meta"}
    _assert_layer_output({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, NUM_QUERIES)

    # num_decoder_layers - 1 decoder layers, then the encoder's top-k proposals.
    assert len(outputs["aux_outputs"]) == NUM_DECODER_LAYERS
    for layer in outputs["aux_outputs"]:
        _assert_layer_output(layer, NUM_QUERIES)

    # max_gt_num 3 -> 100 // 3 = 33 groups of 3 positives + 3 negatives.
    num_group, num_dn = 33, 3 * 2 * 33
    meta = outputs["dn_meta"]
    assert set(meta) == {"dn_positive_idx", "dn_num_group", "dn_num_split"}
    assert meta["dn_num_group"] == num_group
    assert list(meta["dn_num_split"]) == [num_dn, NUM_QUERIES]
    assert [len(idx) for idx in meta["dn_positive_idx"]] == [3 * num_group, 1 * num_group]
    assert len(outputs["dn_aux_outputs"]) == NUM_DECODER_LAYERS
    for layer in outputs["dn_aux_outputs"]:
        _assert_layer_output(layer, num_dn)


def test_official_loss_names_all_finite(step: SimpleNamespace) -> None:
    assert set(step.losses) == _loss_names(MATCHED_SUFFIXES + DN_SUFFIXES)
    for name, value in step.losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        assert value.item() > 0, name


def test_every_parameter_gets_a_gradient(step: SimpleNamespace) -> None:
    params = dict(step.model.named_parameters())
    assert all(p.requires_grad for p in params.values()), "r18vd trains every parameter (freeze_at=-1)"
    missing = sorted(name for name, p in params.items() if p.grad is None)
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    all_zero = {name for name, p in params.items() if not p.grad.any()}
    assert all_zero == ZERO_GRAD_AT_INIT

    # The denoising label embedding's padding row (label 80, used for padded objects) is a
    # parameter but, being padding_idx, never receives gradient.
    embed_grad = params["decoder.denoising_class_embed.weight"].grad  # [81, 256]
    assert embed_grad.shape == (NUM_CLASSES + 1, 256)
    assert not embed_grad[NUM_CLASSES].any() and embed_grad[:NUM_CLASSES].any()


def test_one_image_without_boxes() -> None:
    run = _forward([2, 0], backward=False)
    assert [len(idx) for idx in run.outputs["dn_meta"]["dn_positive_idx"]] == [2 * 50, 0]
    assert set(run.losses) == _loss_names(MATCHED_SUFFIXES + DN_SUFFIXES)
    assert all(torch.isfinite(v) for v in run.losses.values())


def test_no_image_has_boxes_disables_denoising() -> None:
    run = _forward([0, 0], backward=False)
    assert set(run.outputs) == {"pred_logits", "pred_boxes", "aux_outputs"}
    assert len(run.outputs["aux_outputs"]) == NUM_DECODER_LAYERS
    assert set(run.losses) == _loss_names(MATCHED_SUFFIXES)
    assert all(torch.isfinite(v) for v in run.losses.values())
    assert all(run.losses[f"loss_{kind}"].item() == 0.0 for kind in ("bbox", "giou"))


class _InputSeen(Exception):
    """Raised by a backbone hook to stop the forward once the (resized) input is known."""


def _backbone_input_sizes(model: torch.nn.Module, num_calls: int) -> list[tuple[int, int]]:
    """Spatial sizes the backbone receives over several forwards of a 64x64 image.

    The forward is cut short right before the backbone, so no features are computed.

    Args:
        model: An RT-DETR model (its mode decides whether multi-scale resizing applies).
        num_calls: Number of forwards.

    Returns:
        ``(h, w)`` of the backbone input, one per forward.
    """
    sizes = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        """Stores the input's ``(h, w)`` and aborts the forward."""
        sizes.append(tuple(args[0].shape[-2:]))
        raise _InputSeen

    handle = model.backbone.register_forward_pre_hook(record)
    try:
        for _ in range(num_calls):
            with pytest.raises(_InputSeen):
                model(torch.rand(1, 3, 64, 64))
    finally:
        handle.remove()
    return sizes


def test_multi_scale_draws_official_sizes_from_the_shared_stream() -> None:
    first = build_model("r18vd", multi_scale=True, seed=0).train()
    second = build_model("r18vd", multi_scale=True, seed=0).train()
    assert first.multi_scale == OFFICIAL_MULTI_SCALE

    sizes = _backbone_input_sizes(first, 6)
    assert sizes == _backbone_input_sizes(second, 6)
    stream = SharedRandom(0)
    assert sizes == [(s, s) for s in (stream.choice(OFFICIAL_MULTI_SCALE) for _ in range(6))]
    assert len(set(sizes)) > 1

    other_seed = build_model("r18vd", multi_scale=True, seed=1).train()
    assert _backbone_input_sizes(other_seed, 6) != sizes


def test_multi_scale_is_off_in_eval_and_when_disabled() -> None:
    evaluating = build_model("r18vd", multi_scale=True, seed=0).eval()
    assert _backbone_input_sizes(evaluating, 2) == [(64, 64)] * 2
    disabled = build_model("r18vd", multi_scale=False, seed=0).train()
    assert disabled.multi_scale is None
    assert _backbone_input_sizes(disabled, 2) == [(64, 64)] * 2
