"""The RT-DETR detector: backbone -> hybrid encoder -> decoder."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtdetr_common.random import SharedRandom


class RTDETR(nn.Module):
    """RT-DETR as in the official ``RTDETR`` module.

    In training with ``multi_scale`` set, the batch is resized (nearest, as the official
    ``F.interpolate`` default) to a square size drawn from ``multi_scale``; the draw comes
    from the shared random stream, not from numpy's global generator as officially, so that
    the Jittor side can draw the same size.

    Args:
        backbone: Feature extractor returning a list of maps.
        encoder: HybridEncoder.
        decoder: RTDETRTransformer.
        multi_scale: Training input sizes, or None/empty to keep the input size.
        rng: Shared random stream (the decoder's denoising noise uses the same one).
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module,
                 multi_scale: Sequence[int] | None = None, rng: SharedRandom | None = None) -> None:
        super().__init__()
        # Official attribute order (decoder before encoder): state_dict keys come out in the
        # same order as in the official checkpoints.
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.multi_scale = list(multi_scale) if multi_scale else None
        self.rng = rng if rng is not None else SharedRandom(0)

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None) -> dict:
        """Runs the detector.

        Args:
            x: Images [bs, 3, h, w] in [0, 1] (RT-DETR uses no mean/std normalisation).
            targets: In training, per-image dicts with ``labels`` (int64 [n]) and ``boxes``
                (normalised cxcywh [n, 4]) for contrastive denoising.

        Returns:
            The decoder's output dict (``pred_logits``, ``pred_boxes`` and, in training,
            ``aux_outputs``, ``dn_aux_outputs``, ``dn_meta``).
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"RTDETR expects images [bs, 3, h, w], got shape {tuple(x.shape)}")
        if self.multi_scale and self.training:
            size = int(self.rng.choice(self.multi_scale))
            x = F.interpolate(x, size=[size, size])
        feats = self.backbone(x)
        feats = self.encoder(feats)
        return self.decoder(feats, targets)

    def deploy(self) -> "RTDETR":
        """Switches to eval mode and fuses every RepVGG block into one convolution."""
        self.eval()
        for module in self.modules():
            if hasattr(module, "convert_to_deploy"):
                module.convert_to_deploy()
        return self
