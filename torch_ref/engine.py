"""One optimisation step, the unit that trainers and the parity harness repeat."""

from __future__ import annotations

import torch
from torch import nn

from .ema import ModelEMA


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, targets: list[dict], clip_max_norm: float = 0.0,
               ema: ModelEMA | None = None) -> dict[str, float]:
    """Forward, losses, backward, gradient clipping, optimizer step and EMA update (when ``ema`` is given).

    ``images`` are ``[bs, 3, h, w]`` in [0, 1]; ``clip_max_norm`` (official 0.1) bounds the global gradient norm, 0
    disables it. Returns every loss term and their sum (``loss``) as Python floats.
    """
    outputs = model(images, targets)
    losses = criterion(outputs, targets)
    loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    optimizer.step()
    if ema is not None:
        ema.update(model)
    values = {k: float(v.detach()) for k, v in losses.items()}
    values["loss"] = float(loss.detach())
    return values
