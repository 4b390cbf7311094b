"""Exponential moving average of model weights (the official RT-DETR ``ModelEMA``).

Differences from torch_ref/ema.py:
- No ``_unwrap`` or ``to``: Jittor's MPI data parallelism never wraps a module, and every Var is placed by ``jt.flags.use_cuda``.
- ``deepcopy`` keeps dtypes but not stop-grad marks: every Var of the copy (buffers too) is made stop-grad, then ``eval()`` records the flags for ``train()``.
- ``v.copy_(...)`` is ``v.update(...)`` in ``jt.no_grad()``, then one ``jt.sync`` of the updated Vars, so no lazy graph or memory builds up over updates.
- Jittor's ``-Ofast`` CPU kernels fuse ``d * v + (1 - d) * w`` into a multiply-add: averages may differ from PyTorch's by an ulp per update, not accumulating.
- ``load_state_dict`` uses :func:`jittor_impl.checkpoint.load_state_dict_strict` (Jittor's own only warns on mismatched entries)."""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Dict

import jittor as jt
from jittor import nn

from .checkpoint import load_state_dict_strict


class ModelEMA:
    """Averaged copy of a model (eval mode, no gradients): float state entries are averaged, integer ones kept."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ModelEMA decay must lie in [0, 1], got {decay}")
        if warmups <= 0:
            raise ValueError(f"ModelEMA warmups must be positive, got {warmups}")
        self.module = deepcopy(model)
        for p in self.module.parameters():
            p.stop_grad()
        self.module.eval()
        self.decay = decay
        self.warmups = warmups
        self.updates = 0

    def decay_fn(self, updates: int) -> float:
        """Decay at update count ``updates`` (1 for the first): ``decay * (1 - exp(-updates / warmups))``."""
        return self.decay * (1 - math.exp(-updates / self.warmups))

    def update(self, model: nn.Module) -> None:
        """Blends the weights of ``model`` into the average: ``v = d * v + (1 - d) * w`` for every float entry."""
        with jt.no_grad():
            self.updates += 1
            d = self.decay_fn(self.updates)

            model_state = model.state_dict()
            averaged = []
            for k, v in self.module.state_dict().items():
                if v.dtype.is_float():
                    if k not in model_state:
                        raise ValueError(f"ModelEMA.update: model state_dict has no entry '{k}'")
                    v.update(d * v + (1 - d) * model_state[k].detach())
                    averaged.append(v)
            jt.sync(averaged)

    def state_dict(self) -> Dict[str, object]:
        """Checkpoint state: ``{'module': ..., 'updates': ..., 'warmups': ...}``."""
        return {"module": self.module.state_dict(), "updates": self.updates, "warmups": self.warmups}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores :meth:`state_dict` output (strict on the module); ``warmups`` stays the constructor's."""
        if "module" not in state:
            raise ValueError(f"ModelEMA state must hold 'module', got keys {sorted(state)}")
        load_state_dict_strict(self.module, state["module"], "ModelEMA.load_state_dict")
        if "updates" in state:
            self.updates = state["updates"]
