"""One seeded random stream that both frameworks draw from.

The official RT-DETR draws its training randomness (denoising label and box noise, the
multi-scale input size, augmentations) from the framework's global generator. Two frameworks
never produce the same numbers that way, so every random decision in this project is drawn
from a :class:`SharedRandom` instead: numpy arrays that the torch and Jittor sides convert to
their own tensors. Two streams built with the same seed give identical draws in identical order.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class SharedRandom:
    """A seeded numpy stream with the few draws the models and data pipeline need.

    Args:
        seed: Seed of the underlying PCG64 generator.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._gen = np.random.Generator(np.random.PCG64(self.seed))

    def uniform(self, shape: Sequence[int]) -> np.ndarray:
        """Floats in [0, 1) of the given shape, as float32."""
        return self._gen.random(tuple(shape), dtype=np.float32)

    def integers(self, low: int, high: int, shape: Sequence[int]) -> np.ndarray:
        """Integers in [low, high) of the given shape, as int64."""
        return self._gen.integers(low, high, size=tuple(shape), dtype=np.int64)

    def choice(self, options: Sequence[Any]) -> Any:
        """One element of ``options``, drawn uniformly."""
        if len(options) == 0:
            raise ValueError("SharedRandom.choice needs a non-empty sequence")
        return options[int(self._gen.integers(0, len(options)))]

    def state_dict(self) -> dict:
        """The generator state, JSON-serialisable, for checkpoints."""
        return {"seed": self.seed, "bit_generator": self._gen.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self._gen.bit_generator.state = state["bit_generator"]
