"""Exponential moving average of model weights (official RT-DETR ``ModelEMA``).

Every floating-point entry of the model's ``state_dict`` (parameters and buffers such as
BatchNorm running statistics) is averaged; integer buffers (``num_batches_tracked``) keep the
value they had when the EMA was created. The decay ramps up as
``decay * (1 - exp(-updates / warmups))``, so early updates follow the model closely.

Differences from torch_ref/ema.py:
- No ``_unwrap``: Jittor's data parallelism (MPI) runs one plain module per process and
  never wraps it.
- ``copy.deepcopy`` of a Jittor module copies every Var through numpy (``Var.__reduce__``),
  which keeps dtypes (int64 buffers stay int64) but not the stop-grad mark; every Var of the
  copy, parameter or buffer (Jittor's ``parameters()`` lists both), is made stop-grad here,
  as PyTorch's ``requires_grad_(False)`` on the parameters (buffers never require grad there),
  before ``eval()``: Jittor's ``eval()`` records each Var's flag for ``train()`` to restore.
- Jittor's ``state_dict()`` lists every public Var of the module tree, parameters and
  buffers alike, under the PyTorch keys (the project's buffer convention keeps
  non-persistent buffers out of it by a leading underscore), so the update walks
  ``state_dict()`` exactly as the torch code does.
- Jittor evaluates lazily: ``v.copy_(...)`` is ``v.update(...)`` inside ``jt.no_grad()``
  (``update`` rebinds the Var to the new value and cuts the graph to the old one), followed
  by one ``jt.sync`` of all updated Vars, so the averages are computed at once and no graph
  or memory accumulates over updates.
- Jittor compiles its CPU kernels with ``-Ofast -march=native``, which fuses
  ``d * v + (1 - d) * w`` into a fused multiply-add; PyTorch rounds both products. About a
  third of the averaged values then differ from PyTorch's by one unit in the last place per
  update; the difference does not accumulate (the average forgets it at rate ``1 - d``).
- No ``to``: Jittor places every Var by the global ``jt.flags.use_cuda``.
- ``load_state_dict``: Jittor's ``Module.load_state_dict`` only warns on missing or
  mismatched entries, so the module state goes through
  :func:`jittor_impl.checkpoint.load_state_dict_strict` (same keys, shapes and dtypes, as
  PyTorch's strict loading requires; values may be Jittor Vars or numpy arrays).
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import Dict

import jittor as jt
from jittor import nn

from .checkpoint import load_state_dict_strict


class ModelEMA:
    """Keeps an exponential moving average copy of a model.

    Args:
        model: Model to track; a deep copy is taken, put in eval mode, with every Var
            stop-grad.
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
        self.module = deepcopy(model)
        for p in self.module.parameters():
            p.stop_grad()
        self.module.eval()
        self.decay = decay
        self.warmups = warmups
        self.updates = 0

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

        The new averages are computed before returning (one ``jt.sync``), so repeated updates
        do not build up a lazy graph.

        Args:
            model: The trained model (same architecture).

        Raises:
            ValueError: When ``model``'s state_dict lacks a floating-point entry of the EMA.
        """
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
        """Restores a state written by :meth:`state_dict` (strict on the module keys).

        As in the official code, ``updates`` is restored when present and ``warmups`` is kept
        from the constructor.

        Args:
            state: Dict with ``module`` and optionally ``updates``.

        Raises:
            ValueError: When ``state`` has no ``module`` entry, or (as
                ``StateDictMismatchError``, a ValueError) when its module state does not match.
        """
        if "module" not in state:
            raise ValueError(f"ModelEMA state must hold 'module', got keys {sorted(state)}")
        load_state_dict_strict(self.module, state["module"], "ModelEMA.load_state_dict")
        if "updates" in state:
            self.updates = state["updates"]
