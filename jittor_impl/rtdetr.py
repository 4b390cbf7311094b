"""The RT-DETR detector: backbone -> hybrid encoder -> decoder.

Differences from torch_ref/rtdetr.py:
- ``self.training`` is Jittor's ``self.is_training()``.
- The multi-scale resize uses :func:`resize_nearest`, which reproduces PyTorch's
  ``F.interpolate(mode='nearest')`` source-index rule exactly (float32 scale, floor, clamp);
  Jittor's own ``nn.interpolate`` computes nearest indices differently.
- ``deploy`` calls ``convert_to_deploy`` the same way; Jittor has no ``modules()`` filter by
  type, so every module is visited.
"""

from __future__ import annotations

from typing import Sequence

import jittor as jt
import numpy as np
from jittor import nn

from rtdetr_common.random import SharedRandom


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's nearest source index for each output index (``floor(i * in/out)``, clamped)."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jt.Var, size: Sequence[int]) -> jt.Var:
    """Nearest-neighbour resize of [bs, c, h, w] to ``size`` = (h', w'), as PyTorch computes it."""
    _, _, h, w = x.shape
    rows = jt.array(_nearest_index(h, int(size[0])))
    cols = jt.array(_nearest_index(w, int(size[1])))
    return x[:, :, rows][:, :, :, cols]  # [bs, c, h', w']


class RTDETR(nn.Module):
    """RT-DETR as in the official ``RTDETR`` module.

    In training with ``multi_scale`` set, the batch is resized (nearest) to a square size
    drawn from ``multi_scale`` with the shared random stream, so the torch side draws the
    same size.

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

    def execute(self, x: jt.Var, targets: list[dict] | None = None) -> dict:
        """Runs the detector.

        Args:
            x: Images [bs, 3, h, w] in [0, 1] (RT-DETR uses no mean/std normalisation).
            targets: In training, per-image dicts with ``labels`` (int64 [n]) and ``boxes``
                (normalised cxcywh [n, 4]) for contrastive denoising.

        Returns:
            The decoder's output dict (``pred_logits``, ``pred_boxes`` and, in training,
            ``aux_outputs``, ``dn_aux_outputs``, ``dn_meta``).
        """
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
