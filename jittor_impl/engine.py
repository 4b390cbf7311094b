"""One optimisation step, the unit that trainers and the parity harness repeat.

Differences from torch_ref/engine.py:
- ``optimizer.backward(loss)`` computes the gradients (Jittor has no ``loss.backward()``) and
  :func:`clip_grad_norm` clips them with torch's rule (``max_norm / (norm + 1e-6)``, capped
  at 1, over the norm of all gradients together) before ``optimizer.step()``. Jittor's own
  ``Optimizer.clip_grad_norm`` has the same rule but takes the norm of all gradients
  concatenated with one running float32 sum: over the ~2e7 gradient elements of r18vd the
  sum loses ~2% (measured 4.375 against the exact 4.471 on 2e7 normal samples; r18vd at
  256x256, seeded weights: clip factor 3.5% off torch's, every AdamW moment 3.5% off). Here
  each gradient's sum of squares accumulates in float64 and the total is exact to fp32.
- Jittor evaluates lazily. BatchNorm running statistics and ``num_batches_tracked`` are
  stop-grad Vars updated in the forward pass; the optimizer syncs only the parameters it
  updates, so without a sync each step's statistics would keep the previous step's graph
  alive and memory would grow without bound. The step ends with one ``jt.sync`` of the loss
  terms and the whole model state (the EMA syncs its own).
"""

from __future__ import annotations

import jittor as jt
from jittor import nn

from .ema import ModelEMA


def clip_grad_norm(optimizer: jt.optim.Optimizer, max_norm: float) -> float:
    """Scales every gradient by ``min(1, max_norm / (total_norm + 1e-6))`` (torch's rule).

    Args:
        optimizer: An optimizer after ``backward``; its groups' ``grads`` are scaled in place.
        max_norm: The largest allowed global L2 norm.

    Returns:
        The global L2 norm of the gradients before clipping.
    """
    grads = [g for group in optimizer.param_groups
             for p, g in zip(group["params"], group["grads"]) if not p.is_stop_grad()]
    squares = jt.concat([g.float64().sqr().sum().reshape(1) for g in grads])  # [n_grads]
    total_norm = squares.sum().sqrt()  # [1]
    scale = jt.minimum(max_norm / (total_norm + 1e-6), 1.0).float32()  # [1]
    for g in grads:
        g.update(g * scale)
    return float(total_norm.item())


def train_step(model: nn.Module, criterion: nn.Module, optimizer: jt.optim.Optimizer,
               images: jt.Var, targets: list[dict], clip_max_norm: float = 0.0,
               ema: ModelEMA | None = None) -> dict[str, float]:
    """Forward, losses, backward, gradient clipping, optimizer step and EMA update.

    Args:
        model: RTDETR in training mode.
        criterion: SetCriterion.
        optimizer: AdamW (or any optimizer over the model's trainable Vars).
        images: [bs, 3, h, w] in [0, 1].
        targets: Per-image ``labels`` / ``boxes`` (normalised cxcywh).
        clip_max_norm: Global gradient norm clip (official 0.1); 0 disables it.
        ema: Updated after the step when given.

    Returns:
        Every loss term and their sum (``loss``) as Python floats.
    """
    outputs = model(images, targets)
    losses = criterion(outputs, targets)
    loss = sum(losses.values())
    optimizer.backward(loss)
    if clip_max_norm > 0:
        clip_grad_norm(optimizer, clip_max_norm)
    optimizer.step()
    detached = {k: v.detach() for k, v in losses.items()}
    jt.sync(list(detached.values()) + [loss.detach()] + list(model.state_dict().values()))
    if ema is not None:
        ema.update(model)
    values = {k: float(v.item()) for k, v in detached.items()}
    values["loss"] = float(loss.item())
    return values
