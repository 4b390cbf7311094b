"""Exponential moving average of model weights (the official RT-DETR ``ModelEMA``)."""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Dict

import torch
import torch.nn as nn


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, else ``model`` itself."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


class ModelEMA:
    """Averaged copy of a model (eval mode, no gradients): float state entries are averaged, integer ones kept."""

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
        """Decay at update count ``updates`` (1 for the first): ``decay * (1 - exp(-updates / warmups))``."""
        return self.decay * (1 - math.exp(-updates / self.warmups))

    def update(self, model: nn.Module) -> None:
        """Blends the weights of ``model`` into the average: ``v = d * v + (1 - d) * w`` for every float entry."""
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
        """Restores :meth:`state_dict` output (strict on the module); ``warmups`` stays the constructor's."""
        if "module" not in state:
            raise ValueError(f"ModelEMA state must hold 'module', got keys {sorted(state)}")
        self.module.load_state_dict(state["module"])
        if "updates" in state:
            self.updates = state["updates"]
