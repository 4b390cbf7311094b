"""The RT-DETR detector: backbone -> hybrid encoder -> decoder."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rtdetr_common.random import SharedRandom


class RTDETR(nn.Module):
    """RT-DETR as in the official ``RTDETR``; ``multi_scale`` training sizes are drawn from ``rng``."""

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module,
                 multi_scale: Sequence[int] | None = None, rng: SharedRandom | None = None) -> None:
        super().__init__()
        # Official attribute order (decoder before encoder): state_dict keys in checkpoint order.
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder
        self.multi_scale = list(multi_scale) if multi_scale else None
        self.rng = rng if rng is not None else SharedRandom(0)

    def forward(self, x: torch.Tensor, targets: list[dict] | None = None) -> dict:
        """Runs the detector on images [bs, 3, h, w] in [0, 1] (``targets`` only for denoising)."""
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
