"""Exponential moving average of model weights (official RT-DETR ``ModelEMA``).

Every floating-point entry of the model's ``state_dict`` (parameters and buffers such as
BatchNorm running statistics) is averaged; integer buffers (``num_batches_tracked``) keep the
value they had when the EMA was created. The decay ramps up as
``decay * (1 - exp(-updates / warmups))``, so early updates follow the model closely.
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Dict

import torch
import torch.nn as nn


def _unwrap(model: nn.Module) -> nn.Module:
    """Returns the wrapped module of a (Distributed)DataParallel model, else the model itself.

    Args:
        model: A module, possibly wrapped for data parallelism.

    Returns:
        The underlying module.
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


class ModelEMA:
    """Keeps an exponential moving average copy of a model.

    Args:
        model: Model to track; a deep copy is taken (unwrapped from data-parallel wrappers),
            put in eval mode, with ``requires_grad`` False on all parameters.
        decay: Asymptotic decay.
        warmups: Number of updates setting the time constant of the decay ramp.

    Attributes:
        module: The averaged model.
        decay: Asymptotic decay.
        warmups: Ramp time constant.
        updates: Number of :meth:`update` calls so far.

    Raises:
        ValueError: When ``decay`` is outside ``[0, 1]`` or ``warmups`` is not positive.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ModelEMA decay must lie in [0, 1], got {decay}")
        if warmups <= 0:
            raise ValueError(f"ModelEMA warmups must be positive, got {warmups}")
        self.module = deepcopy(_unwrap(model)).eval()
        self.decay = decay
        self.warmups = warmups
        self.updates = 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_fn(self, updates: int) -> float:
        """Decay used at a given update count: ``decay * (1 - exp(-updates / warmups))``.

        Args:
            updates: Update count (1 for the first update).

        Returns:
            The decay as a Python float.
        """
        return self.decay * (1 - math.exp(-updates / self.warmups))

    def update(self, model: nn.Module) -> None:
        """Blends the current weights of ``model`` into the average: ``v = d * v + (1 - d) * w``.

        Args:
            model: The trained model (same architecture; may be data-parallel wrapped).

        Raises:
            ValueError: When ``model``'s state_dict lacks a floating-point entry of the EMA.
        """
        with torch.no_grad():
            self.updates += 1
            d = self.decay_fn(self.updates)

            model_state = _unwrap(model).state_dict()
            for k, v in self.module.state_dict().items():
                if v.dtype.is_floating_point:
                    if k not in model_state:
                        raise ValueError(f"ModelEMA.update: model state_dict has no entry '{k}'")
                    v.copy_(d * v + (1 - d) * model_state[k].detach())

    def to(self, *args, **kwargs) -> "ModelEMA":
        """Moves the averaged model (``nn.Module.to`` arguments) and returns ``self``."""
        self.module = self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> Dict[str, object]:
        """Checkpoint state: ``{'module': ..., 'updates': ..., 'warmups': ...}``."""
        return {"module": self.module.state_dict(), "updates": self.updates, "warmups": self.warmups}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores a state written by :meth:`state_dict` (strict on the module keys).

        As in the official code, ``updates`` is restored when present and ``warmups`` is kept
        from the constructor.

        Args:
            state: Dict with ``module`` and optionally ``updates``.

        Raises:
            ValueError: When ``state`` has no ``module`` entry.
        """
        if "module" not in state:
            raise ValueError(f"ModelEMA state must hold 'module', got keys {sorted(state)}")
        self.module.load_state_dict(state["module"])
        if "updates" in state:
            self.updates = state["updates"]
