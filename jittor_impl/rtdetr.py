"""The RT-DETR detector: backbone -> hybrid encoder -> decoder.

Differences from torch_ref/rtdetr.py:
- ``self.training`` is Jittor's ``self.is_training()``.
- The multi-scale resize is :func:`resize_nearest`, PyTorch's nearest rule (Jittor's ``nn.interpolate`` picks other indices).
"""

from __future__ import annotations

from typing import Sequence

import jittor as jt
import numpy as np
from jittor import nn

from rtdetr_common.random import SharedRandom


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jt.Var, size: Sequence[int]) -> jt.Var:
    """Nearest resize of [bs, c, h, w] to ``size``, as PyTorch (index ``floor(i * in/out)``, clamped)."""
    _, _, h, w = x.shape
    rows = jt.array(_nearest_index(h, int(size[0])))
    cols = jt.array(_nearest_index(w, int(size[1])))
    return x[:, :, rows][:, :, :, cols]


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

    def execute(self, x: jt.Var, targets: list[dict] | None = None) -> dict:
        """Runs the detector on images [bs, 3, h, w] in [0, 1] (``targets`` only for denoising)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"RTDETR expects images [bs, 3, h, w], got shape {tuple(x.shape)}")
        if self.multi_scale and self.is_training():
            size = int(self.rng.choice(self.multi_scale))
            x = resize_nearest(x, [size, size])
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
