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
- ``torch.optim.AdamW`` skips a parameter whose ``grad`` is None (the loss does not reach it:
  ``denoising_class_embed`` on a batch without any target) and counts steps per parameter;
  ``jittor.optim.AdamW`` gets zeros for such a parameter, still decays and moves it, and
  bias-corrects every parameter with one global count. :class:`AdamW` here restores torch's
  rule; :func:`gradient_probe` finds the parameters ``jt.grad`` does not reach. Its update
  is torch's single-tensor arithmetic (the first moment by ``lerp``, where Jittor's
  ``b1 * m + (1 - b1) * g`` rounds differently) in one OpenMP kernel per parameter.
"""

from __future__ import annotations

import itertools
import re
from contextlib import contextmanager
from typing import Iterator

import jittor as jt
from jittor import nn

from ._kernels import adamw_hyperparameters, adamw_update
from .ema import ModelEMA

# Jittor's grad.cc logs this warning for a target the loss does not reach, then returns zeros.
_NO_GRADIENT = re.compile(r"grads\[(\d+)\] '([^']*)' doesn't have gradient")
_PROBES = itertools.count()


@contextmanager
def gradient_probe(targets: list[jt.Var]) -> Iterator[set[int]]:
    """Finds the ``targets`` that the ``jt.grad`` calls made inside the block do not reach.

    PyTorch leaves ``p.grad`` at None for a parameter the loss does not depend on; Jittor has
    no such marker. ``jt.grad`` (``src/grad.cc``) walks back from the loss through Vars that
    are not stop-grad; a target it does not reach gets a constant zero (indistinguishable from
    a computed zero gradient, e.g. an embedding's padding row) and the warning
    ``grads[i] '<name>' doesn't have gradient`` is logged, once per Var name for the life of
    the process. So each target is renamed to a name unique to this block, the warnings are
    captured with ``jt.log_capture_scope`` and the original names are restored on exit.

    Args:
        targets: The Vars the block's ``jt.grad`` calls differentiate with respect to.

    Yields:
        A set that, when the block ends, holds the indices (into ``targets``) of the Vars
        without a gradient.
    """
    probe = next(_PROBES)
    old_names = [var.name() for var in targets]
    probe_names = {f"{old}@gradprobe{probe}.{i}": i for i, old in enumerate(old_names)}
    for var, name in zip(targets, probe_names):
        var.name(name)
    missing: set[int] = set()
    try:
        with jt.log_capture_scope() as logs:
            yield missing
    finally:
        for var, name in zip(targets, old_names):
            var.name(name)
    found = (_NO_GRADIENT.search(entry["msg"]) for entry in logs)
    missing.update(probe_names[f.group(2)] for f in found if f and f.group(2) in probe_names)


class AdamW(jt.optim.AdamW):
    """``jittor.optim.AdamW`` with ``torch.optim.AdamW``'s bookkeeping.

    The update of a parameter is torch's single-tensor formulas (``p *= 1 - lr * wd``, the
    first moment by ``lerp``, bias-corrected moments, ``eps`` added after the square root) in
    one OpenMP kernel per parameter on CPU (:func:`~jittor_impl._kernels.adamw_update`;
    Jittor's own update is several single-threaded kernels). As in torch, a parameter the last
    ``backward`` did not reach is not touched at all (no decay, no moment update, no count),
    and each parameter's bias correction uses its own update count.

    Beside Jittor's ``m`` / ``values`` / ``grads``, every group holds:
        steps: Each parameter's update count (torch's ``state[p]["step"]``).
        reached: Whether the gradients in ``grads`` reached each parameter (torch:
            ``p.grad is not None``). As ``grads``, it is replaced by the first ``backward``
            after a ``zero_grad`` (``step`` ends with one) and accumulated by later ones.
    """

    def __init__(self, params: list, lr: float, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, eps=eps, betas=betas, weight_decay=weight_decay)
        self._fresh = True
        for group in self.param_groups:
            self._add_counts(group)

    @staticmethod
    def _add_counts(group: dict) -> None:
        group["steps"] = [0] * len(group["params"])
        group["reached"] = [False] * len(group["params"])

    def add_param_group(self, group: dict) -> None:
        """Adds a group (Jittor's moments, plus this class's counts)."""
        super().add_param_group(group)
        self._add_counts(group)

    def zero_grad(self) -> None:
        """The next ``backward`` replaces the gradients instead of adding to them (Jittor's)."""
        super().zero_grad()
        self._fresh = True

    def backward(self, loss: jt.Var, retain_graph: bool = False) -> None:
        """Jittor's ``backward`` (gradients into ``grads``), recording what it reached."""
        trainable = [p for g in self.param_groups for p in g["params"] if not p.is_stop_grad()]
        with gradient_probe(trainable) as missing:
            super().backward(loss, retain_graph)
        unreached = {id(trainable[i]) for i in missing}
        for group in self.param_groups:
            group["reached"] = [(was and not self._fresh)
                                or (not p.is_stop_grad() and id(p) not in unreached)
                                for p, was in zip(group["params"], group["reached"])]
        self._fresh = False

    def step(self, loss: jt.Var | None = None, retain_graph: bool = False) -> None:
        """One AdamW update of every reached parameter (``backward(loss)`` first when given)."""
        self.pre_step(loss, retain_graph)
        for group in self.param_groups:
            lr = group.get("lr", self.lr)
            eps = group.get("eps", self.eps)
            weight_decay = group.get("weight_decay", self.weight_decay)
            b0, b1 = group.get("betas", self.betas)
            steps = group["steps"]
            hypers = {}  # per update count: the scalars of adamw_update
            for i, (p, g, v, m) in enumerate(zip(group["params"], group["grads"],
                                                 group["values"], group["m"])):
                if not group["reached"][i]:
                    continue
                steps[i] += 1
                if steps[i] not in hypers:
                    hypers[steps[i]] = adamw_hyperparameters(lr, weight_decay, (b0, b1), eps, steps[i])
                new_p, new_m, new_v = adamw_update(p, g, m, v, hypers[steps[i]])
                p.update(new_p)
                m.update(new_m)
                v.update(new_v)
        self.post_step()


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
        optimizer: :class:`AdamW` (or any optimizer over the model's trainable Vars).
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
