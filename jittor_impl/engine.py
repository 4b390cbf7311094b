"""One optimisation step, the unit that trainers and the parity harness repeat.

Differences from torch_ref/engine.py:
- ``optimizer.backward(loss)`` computes the gradients (Jittor has no ``loss.backward()``).
- :func:`clip_grad_norm` is torch's rule with float64 sums of squares; Jittor's ``Optimizer.clip_grad_norm`` uses one float32 running sum, which drifts on large models.
- Lazy evaluation: the step ends with one ``jt.sync`` of the losses and model state, else BatchNorm statistics keep each step's graph alive (EMA syncs its own).
- :class:`AdamW` follows ``torch.optim.AdamW``: a parameter the loss does not reach (:func:`gradient_probe`) is untouched; bias correction counts each parameter's steps.
- :class:`AdamW` updates with torch's single-tensor arithmetic (first moment by ``lerp``), rounding unlike Jittor's ``b1 * m + (1 - b1) * g``.
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

    Jittor gives such a target a constant zero gradient and logs its name once per process, so the targets are renamed
    uniquely for the block, the log is captured and the names are restored on exit. Yields a set that, when the block
    ends, holds the indices (into ``targets``) of the unreached Vars.
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
    """``jittor.optim.AdamW`` with ``torch.optim.AdamW``'s bookkeeping and single-tensor update, a kernel per parameter.

    Each group also holds ``steps`` (per-parameter update counts, torch's ``state[p]["step"]``) and ``reached`` (torch's
    ``p.grad is not None``; reset by the first ``backward`` after a ``zero_grad``, accumulated by later ones).
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
    """Scales the gradients by ``min(1, max_norm / (norm + 1e-6))`` (torch's rule); returns the L2 norm before."""
    grads = [g for group in optimizer.param_groups
             for p, g in zip(group["params"], group["grads"]) if not p.is_stop_grad()]
    squares = jt.concat([g.float64().sqr().sum().reshape(1) for g in grads])
    total_norm = squares.sum().sqrt()
    scale = jt.minimum(max_norm / (total_norm + 1e-6), 1.0).float32()
    for g in grads:
        g.update(g * scale)
    return float(total_norm.item())


def train_step(model: nn.Module, criterion: nn.Module, optimizer: jt.optim.Optimizer,
               images: jt.Var, targets: list[dict], clip_max_norm: float = 0.0,
               ema: ModelEMA | None = None) -> dict[str, float]:
    """Forward, losses, backward, gradient clipping, optimizer step and EMA update (when ``ema`` is given).

    ``images`` are ``[bs, 3, h, w]`` in [0, 1]; ``clip_max_norm`` (official 0.1) bounds the global gradient norm, 0
    disables it. Returns every loss term and their sum (``loss``) as Python floats.
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
