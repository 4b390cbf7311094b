"""The float64 replay of the reference: its precision floor for every training-side check.

A float64 copy of the torch model replays the fp32 reference's step with the same weights,
denoising noise and decisions (top-k, matches, and the sides of the kinks, the max-pool
windows' argmax among them, within their decision entries' ``atol``), so the only difference
from the fp32 reference is rounding: the reference's own fp32 error against it is the floor
the port's error is judged by.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

import torch_ref
import torch_ref.backbone as torch_backbone
import torch_ref.decoder as torch_decoder

from .decisions import matcher_costs
from .forcing import (Decisions, GiouCorners, L1Signs, Matches, MaxPoolArgmax, ReluGates, SampleCells,
                      TopkSelection, match_flips, override, robust_error)
from .arrays import to_numpy
from .models import ModelPair, to_torch


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters torch's optimizer updates (``requires_grad``), in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def numpy_params(named: list) -> dict[str, np.ndarray]:
    """``name -> float64 copy`` of torch Parameters or Jittor Vars."""
    return {name: to_numpy(p).astype(np.float64) for name, p in named}


def grads_of(named: list) -> dict[str, np.ndarray | None]:
    """``name -> copy of p.grad`` (None where torch has none)."""
    return {name: None if p.grad is None else p.grad.detach().numpy().copy() for name, p in named}


def snapshot(state: dict, copy: bool = True) -> dict[str, np.ndarray]:
    """Numpy copies of a state dict's values (never views of tensors updated in place), or
    with ``copy=False`` views where nothing updates the tensors again."""
    take = np.array if copy else np.asarray
    return {k: take(v) for k, v in to_numpy(dict(state)).items()}


def build_emas(model: Any, cfg, counts: tuple[int, ...], build, zero) -> list:
    """One EMA per update count of :func:`parity.training.ema_updates`, each with that count.
    The first averages from the model's weights; the later ones from zeros (``zero`` clears
    an EMA's floating-point state), so that their change ``(1 - d) * w`` stays far above the
    weights' fp32 spacing at an asymptotic ``1 - d`` of ~1e-4."""
    emas = []
    for i, updates in enumerate(counts):
        ema = build(model, cfg)
        ema.updates = updates
        if i:
            zero(ema)
        emas.append(ema)
    return emas


def zero_torch_ema(ema) -> None:
    """Clears a torch EMA's floating-point state."""
    with torch.no_grad():
        for v in ema.module.state_dict().values():
            if v.is_floating_point():
                v.zero_()


class Float64Replay:
    """A float64 copy of the reference model that replays the fp32 reference's steps.

    Args:
        pair: The model pair; its torch model is copied now (before any step to replay).
        dtype: float64 (the floor); float32 replays the reference as a second fp32
            implementation would (a control, e.g. under another thread count).
        bands: Tie bands by decision path (default: each decision entry's ``atol``); a
            control takes the port's.

    Attributes:
        tie_errors: Per kink path, the robust ``|float64 - fp32|`` of the reference's inputs
            to it in the last replayed forward (widens the port's tie bands).
        flips: Per kink path, ``|reference input|`` of every element whose own side differed
            from the fp32 reference's in the last replayed forward (forced or not).
        topk_flips: Queries of the fp32 reference's top-k that the replay's own scores would
            not have selected in the last replayed forward.
        match_flips: (query, target) pairs of the fp32 reference's matches that the replay's
            own matcher, on its own outputs, would not have made in the last replayed forward.
        losses: Every loss term and ``loss`` of the last replayed forward.
        grads: The gradients of the last replayed step before clipping.
        clipped: The same after clipping (equal to ``grads`` without a step).
    """

    def __init__(self, pair: ModelPair, dtype: torch.dtype = torch.float64,
                 bands: dict[str, float] | None = None) -> None:
        self.cfg = pair.cfg
        self.dtype = dtype
        self.bands = dict(bands or {})
        self.model = copy.deepcopy(pair.torch_model).to(dtype).train()
        self.criterion = torch_ref.build_criterion(pair.cfg).to(dtype)
        self.optimizer: torch.optim.Optimizer | None = None
        self.emas: list[torch_ref.ema.ModelEMA] = []
        self.tie_errors: dict[str, float] = {}
        self.flips: dict[str, list[np.ndarray]] = {}
        self.topk_flips = 0
        self.match_flips = 0
        self.losses: dict[str, float] = {}
        self.grads: dict[str, np.ndarray | None] = {}
        self.clipped: dict[str, np.ndarray | None] = {}
        self._calls: dict[str, Any] = {}

    def _note(self, path: str, error: float) -> None:
        self.tie_errors[path] = max(self.tie_errors.get(path, 0.0), error)

    def _forced(self, path: str, kind: type, x: torch.Tensor) -> torch.Tensor:
        reference = next(self._calls[path])
        self._note(path, robust_error(x.detach().numpy(), reference))
        self.flips.setdefault(path, []).append(kind.replay_flips(x, reference))
        return kind.replay(path, x, reference, self.bands.get(path))

    def _giou(self, path: str, boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
        reference = next(self._calls[path])
        d = GiouCorners.differences(boxes1, boxes2)
        self._note(path, robust_error(d.detach().numpy(), reference))
        self.flips.setdefault(path, []).append(GiouCorners.replay_flips(d, reference))
        return GiouCorners.replay_giou(path, boxes1, boxes2, reference, self.bands.get(path))

    def _relu(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return self._forced(path, ReluGates, x)

    def _sample(self, path: str, m: torch.nn.Module, value, shapes, locations, weights):
        forced, error, flips = SampleCells.replay_locations(path, locations, shapes, next(self._calls[path]),
                                                            self.bands.get(path))
        self._note(path, error)
        self.flips.setdefault(path, []).append(flips)
        return type(m).sample(m, value, shapes, forced, weights)

    def _forward_backward(self, images: np.ndarray, targets: list[dict],
                          decisions: Decisions) -> dict[str, float]:
        model = self.model
        model.rng.load_state_dict(decisions.rng_state)
        model.decoder.forced_topk_ind = torch.from_numpy(decisions.topk)
        self._calls = {path: iter(calls) for path, calls in decisions.ties.items()}
        self.tie_errors = {}
        self.flips = {}
        self.topk_flips = 0
        own_matches: dict[str, list] = {}
        criterion = self.criterion

        def decide(key, layer_outputs, targets, decide, num_copies=1):
            own_matches[key] = [(s.numpy(), t.numpy()) for s, t in decide()]
            return type(criterion)._decide(criterion, key, layer_outputs, targets, decide,
                                           num_copies)
        l1 = L1Signs.path(L1Signs.name)
        targets_ = ([(m, "forward", lambda x, path=ReluGates.path(name): self._relu(path, x))
                     for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
                    + [(m, "sample", lambda v, s, loc, w, path=SampleCells.path(name), m=m:
                        self._sample(path, m, v, s, loc, w))
                       for name, m in model.named_modules()
                       if isinstance(m, torch_decoder.MSDeformableAttention)]
                    + [(self.criterion, "l1_distance",
                        lambda src, target: self._forced(l1, L1Signs, src - target)),
                       (self.criterion, "generalized_iou",
                        lambda b1, b2: self._giou(GiouCorners.path(GiouCorners.name), b1, b2))]
                    + [(m, "stem_pool", lambda x, path=MaxPoolArgmax.path(name):
                        self._forced(path, MaxPoolArgmax, x))
                       for name, m in model.named_modules() if isinstance(m, torch_backbone.PResNet)])
        targets_.append((criterion, "_decide", decide))
        head = model.decoder.enc_score_head
        scores: list = []
        targets_.append((head, "forward", lambda x: scores.append(type(head).forward(head, x)) or scores[-1]))
        try:
            with override(targets_):
                tg = [{"labels": t["labels"], "boxes": t["boxes"].to(self.dtype)}
                      for t in to_torch(targets)]
                out = model(torch.from_numpy(images).to(self.dtype), tg)
                self.criterion.forced_indices = decisions.matches
                losses = self.criterion(out, tg)
        finally:
            model.decoder.forced_topk_ind = None
        if decisions.scores is not None:
            best = scores[0].detach().max(-1).values
            self._note(TopkSelection.path, robust_error(best.numpy(), decisions.scores))
            own = torch.topk(best, decisions.topk.shape[1], dim=1).indices.numpy()
            self.topk_flips = sum(len(set(r) - set(o)) for r, o in zip(decisions.topk, own))
        self.match_flips = match_flips(own_matches, decisions.matches)
        if decisions.costs:
            with torch.no_grad():
                costs = matcher_costs(self.criterion.matcher, out, tg, list(decisions.costs))
            for key, per_image in costs.items():
                self._note(f"{Matches.prefix}.{key}", max(
                    (robust_error(a, b) for a, b in zip(per_image, decisions.costs[key]) if a.size),
                    default=0.0))
        loss = sum(losses.values())
        model.zero_grad(set_to_none=True)
        loss.backward()
        self.losses = {k: float(v.detach()) for k, v in losses.items()}
        self.losses["loss"] = float(loss.detach())
        self.grads = self.clipped = grads_of(trainable(model))
        return self.losses

    def gradients(self, images: np.ndarray, targets: list[dict],
                  decisions: Decisions) -> dict[str, np.ndarray | None]:
        """Float64 gradients of the official loss sum (``None`` where torch has none)."""
        self._forward_backward(images, targets, decisions)
        return self.grads

    def train_step(self, images: np.ndarray, targets: list[dict], decisions: Decisions,
                   clip_max_norm: float, ema_updates: tuple[int, ...] = ()) -> dict[str, float]:
        """One official step in float64 (as ``torch_ref.engine.train_step``), decisions forced.

        The optimizer (official groups) is created at the first call and kept; so are the
        EMAs of :func:`parity.training.build_emas`, one per entry of ``ema_updates``.
        """
        if self.optimizer is None:
            self.optimizer = torch_ref.build_optimizer(self.model, self.cfg)
        if ema_updates and not self.emas:
            self.emas = build_emas(self.model, self.cfg, ema_updates, torch_ref.build_ema,
                                   zero_torch_ema)
        values = self._forward_backward(images, targets, decisions)
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_max_norm)
        self.clipped = grads_of(trainable(self.model))
        self.optimizer.step()
        for ema in self.emas:
            ema.update(self.model)
        return values

    def weights(self) -> dict[str, np.ndarray]:
        """The trainable weights, float64."""
        return numpy_params(trainable(self.model))

    def flip_counts(self) -> dict[str, int]:
        """Per kind of decision, how many of the last replayed forward's would have gone the
        other way than the fp32 reference's: per kind of kink (``relu_gate``, ``sample_cell``,
        ``l1_sign``, ``giou_corner``, ``maxpool_argmax``; :attr:`flips`), ``topk`` (:attr:`topk_flips`) and
        ``match`` (:attr:`match_flips`)."""
        counts: dict[str, int] = {"topk": self.topk_flips, "match": self.match_flips}
        for path, arrays in self.flips.items():
            kind = path.split(".")[1]
            counts[kind] = counts.get(kind, 0) + int(sum(a.size for a in arrays))
        return counts
