"""The embedded default: deterministic weights in the official layout, images and targets.

No weights can be downloaded here, and a freshly initialised RT-DETR is a poor test subject
(zero-initialised box heads, identical BatchNorm statistics). These weights are drawn from a
seeded numpy stream with fan-in scaling, BatchNorm statistics spread around realistic values
and class biases near the official prior, so every layer carries signal and every comparison
is meaningful. Images (smooth colour fields with fine noise, in [0, 1]) and targets (valid
normalised cxcywh boxes, int64 labels) come from seeded streams too. The same seed gives the
same bytes on any machine and in both frameworks.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .configs import Size, spatial_size
from .state_dicts import TensorSpec


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


def seeded_state_dict(specs: Mapping[str, TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Draws every entry of a state_dict specification from a seeded stream.

    Args:
        specs: Keys with shapes and dtypes (e.g. from a model or the official manifest).
        seed: Seed; the draw for each key depends only on the seed and the key order.

    Returns:
        A state_dict of numpy arrays with exactly the given shapes and dtypes.
    """
    gen = np.random.Generator(np.random.PCG64(seed))
    prior_bias = -math.log((1 - 0.01) / 0.01)
    out: dict[str, np.ndarray] = {}
    for key, spec in specs.items():
        shape, leaf = spec.shape, key.rsplit(".", 1)[-1]
        if spec.dtype.startswith("int"):
            value = np.zeros(shape)
        elif leaf == "running_var":
            value = gen.uniform(0.5, 1.5, shape)
        elif leaf == "running_mean":
            value = gen.normal(0.0, 0.1, shape)
        elif len(shape) == 1 and leaf == "weight":
            value = gen.uniform(0.8, 1.2, shape)
        elif len(shape) == 1 and leaf == "bias" and "score_head" in key:
            value = prior_bias + gen.normal(0.0, 0.5, shape)
        elif len(shape) == 1:
            value = gen.normal(0.0, 0.05, shape)
        else:
            value = gen.normal(0.0, 1.0 / math.sqrt(_fan_in(shape)), shape)
        out[key] = np.asarray(value, dtype=np.dtype(spec.dtype))
    return out


def seeded_images(batch: int, size: Size, seed: int = 0) -> np.ndarray:
    """Images in [0, 1], smooth enough to look like photos: [batch, 3, h, w] float32.

    ``size`` is one int S (S x S) or an ``(h, w)`` pair; an int gives the same bytes as
    ``(S, S)``.
    """
    h, w = spatial_size(size)
    gen = np.random.Generator(np.random.PCG64(seed))
    coarse = gen.random((batch, 3, h // 16 + 1, w // 16 + 1), dtype=np.float32)
    rows = np.minimum(np.arange(h) // 16, coarse.shape[2] - 1)
    cols = np.minimum(np.arange(w) // 16, coarse.shape[3] - 1)
    smooth = coarse[:, :, rows][:, :, :, cols]  # [batch, 3, h, w]
    noise = gen.random((batch, 3, h, w), dtype=np.float32)
    return (0.8 * smooth + 0.2 * noise).astype(np.float32)


def seeded_targets(counts: list[int], num_classes: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per-image targets: int64 labels and valid normalised cxcywh float32 boxes."""
    gen = np.random.Generator(np.random.PCG64(seed + 1))
    targets = []
    for n in counts:
        wh = gen.uniform(0.05, 0.5, (n, 2))
        cxcy = gen.uniform(wh / 2, 1 - wh / 2)
        targets.append({"labels": gen.integers(0, num_classes, n).astype(np.int64),
                        "boxes": np.concatenate([cxcy, wh], 1).astype(np.float32)})
    return targets
