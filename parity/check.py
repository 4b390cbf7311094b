"""End-to-end parity checks of one variant: eval outputs, detections, decisions and losses.

Each check returns :class:`~parity.compare.Comparison` rows tagged with a kind (``output``,
``decision``, ``detection``, ``loss``); :func:`run_check` gathers them for the CLI and the tests.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import jittor as jt
import numpy as np
import torch

import torch_ref
from rtdetr_common.configs import Size, spatial_size
from rtdetr_common.seeded import seeded_images, seeded_targets

from .compare import Comparison, Tolerance, compare_arrays, compare_tree
from .decisions import (MatchCosts, compare_denoising, compare_dn_meta, compare_matches,
                        match_differences, matcher_costs)
from .arrays import to_numpy
from .capture import torch_to_jittor_tree
from .models import ModelPair, to_jittor, to_torch
from .tolerances import loss_tolerance, tolerance


@dataclass
class CheckRow:
    """One line of a parity report."""

    kind: str
    comparison: Comparison

    @property
    def passed(self) -> bool:
        return self.comparison.passed


@dataclass
class CheckResult:
    """Everything one ``check`` run measured."""

    variant: str
    weights: str
    size: Size
    rows: list[CheckRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    precision_floor: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    not_run: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def add(self, kind: str, comparisons: list[Comparison]) -> None:
        self.rows.extend(CheckRow(kind, c) for c in comparisons)


def decision_comparison(path: str, test: np.ndarray, reference: np.ndarray,
                        scores: np.ndarray | None = None) -> Comparison:
    """Compares discrete choices; a choice that differs only inside a near-tie passes.

    Args:
        path: Name of the decision (its tolerance entry is looked up by it).
        test: Jittor-side indices [bs, n].
        reference: Torch-side indices [bs, n].
        scores: Reference scores the choice was made from ([bs, candidates]). With them, every
            differing position reports the score gap between the two chosen candidates, and
            the decision passes when each gap is within the tolerance (a tie decided by
            rounding, not a disagreement). Without them any difference fails.

    Returns:
        The comparison; ``max_abs`` holds the largest score gap when scores are given.
    """
    test, reference = np.asarray(test), np.asarray(reference)
    c = compare_arrays(test, reference, Tolerance(atol=0.0), path)
    if c.passed or test.shape != reference.shape:
        return c
    where = np.argwhere(test != reference)
    b, i = where[0][0], where[0][-1]
    c.reason = (f"{len(where)} of {test.size} indices differ; first at batch {b} position {i}: "
                f"test {test[b, i]} vs reference {reference[b, i]}")
    if scores is None:
        return c
    rows = where[:, 0]
    gaps = np.abs(scores[rows, reference[test != reference]] - scores[rows, test[test != reference]])
    c.max_abs = float(gaps.max())
    tol = tolerance("decision", path)
    c.passed = bool(c.max_abs <= tol.atol)
    verdict = "ties within" if c.passed else "exceeds"
    c.reason += f"; largest score gap {c.max_abs:.3g} {verdict} {tol.atol:g}"
    return c


def align_detections(test: dict, reference: dict, score_tie: float) -> tuple[np.ndarray, int]:
    """Pairs each reference detection with a Jittor one, allowing reordering only inside ties.

    The postprocessor's top-k over queries x classes orders equal scores arbitrarily, so two
    detections whose scores tie may trade places. A reference detection keeps its Jittor
    counterpart at the same position when labels agree; otherwise it takes the closest-box
    unused Jittor detection with the same label and a score within ``score_tie``. Anything
    else stays in place and fails the comparisons that follow.

    Returns:
        ``(order, moved)``: indices that reorder the Jittor detections, and how many moved.
    """
    n = len(reference["scores"])
    order = np.arange(n)
    used = np.zeros(n, dtype=bool)
    for i in range(n):
        same = (test["labels"][i] == reference["labels"][i]
                and np.abs(test["boxes"][i] - reference["boxes"][i]).max() <= 1e-2)
        if same and not used[i]:
            used[i] = True
            continue
        candidates = np.flatnonzero(~used & (test["labels"] == reference["labels"][i])
                                    & (np.abs(test["scores"] - reference["scores"][i]) <= score_tie))
        if candidates.size:
            dist = np.abs(test["boxes"][candidates] - reference["boxes"][i]).max(axis=1)
            order[i] = candidates[np.argmin(dist)]
            used[order[i]] = True
    moved = int((order != np.arange(n)).sum())
    return order, moved


class ScoreCapture:
    """Records the torch decoder's encoder class scores (max over classes) during a forward."""

    def __init__(self, torch_model: torch.nn.Module) -> None:
        self.scores: np.ndarray | None = None
        self._handle = torch_model.decoder.enc_score_head.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.scores = to_numpy(output.max(-1).values)  # [bs, candidates]

    def close(self) -> None:
        """Removes the hook."""
        self._handle.remove()


def _jittor_forward(pair: ModelPair, images: np.ndarray, targets: list | None,
                    forced: np.ndarray | None, rng_state: dict | None = None) -> dict:
    """Runs the Jittor model, optionally with the reference top-k decision forced in.

    ``rng_state`` rewinds the model's shared stream first, so a re-run draws the same
    denoising noise as the run it repeats. Another port runs as it is (it has no forcing
    hook), its outputs adapted to the official convention.
    """
    if pair.external:
        args = (jt.array(images),) if targets is None else (jt.array(images), to_jittor(targets))
        return pair.port_parts.options.outputs(pair.jittor_model(*args))
    if rng_state is not None:
        pair.jittor_model.rng.load_state_dict(rng_state)
    decoder = pair.jittor_model.decoder
    decoder.forced_topk_ind = None if forced is None else jt.array(forced).int64()
    try:
        args = (jt.array(images),) if targets is None else (jt.array(images), to_jittor(targets))
        return pair.jittor_model(*args)
    finally:
        decoder.forced_topk_ind = None


def _compare_topk(pair: ModelPair, result: CheckResult, path: str, capture: ScoreCapture,
                  images: np.ndarray, targets: list | None, out: dict,
                  rng_state: dict | None = None) -> dict:
    """Compares the top-k decision; on a difference re-runs Jittor with the reference one."""
    if not _has_topk_hook(pair):
        result.notes.append(f"{path}: not compared: the port's decoder does not expose its top-k "
                            "selection (decoder.last_topk_ind / forced_topk_ind); its outputs are "
                            "compared as they come")
        return out
    ref_ind = to_numpy(pair.torch_model.decoder.last_topk_ind)
    topk = decision_comparison(path, pair.jittor_model.decoder.last_topk_ind.numpy(), ref_ind,
                               capture.scores)
    result.add("decision", [topk])
    if np.array_equal(pair.jittor_model.decoder.last_topk_ind.numpy(), ref_ind):
        return out
    result.notes.append(f"{path}: {topk.reason}; reference decision forced into Jittor "
                        "for the comparisons downstream")
    return _jittor_forward(pair, images, targets, ref_ind, rng_state)


def _has_topk_hook(pair: ModelPair) -> bool:
    decoder = getattr(pair.jittor_model, "decoder", None)
    return hasattr(type(decoder), "forced_topk_ind") and hasattr(decoder, "last_topk_ind")


def check_eval(pair: ModelPair, result: CheckResult, size: Size, batch: int = 1) -> None:
    """Eval forward on the same images: outputs, top-k decision, postprocessed detections.

    ``size`` is one int (square) or ``(h, w)``; the pair must have been built for it. The
    postprocessor's original sizes are non-square whatever ``size`` is.
    """
    h, w = spatial_size(size)
    images = seeded_images(batch, size, seed=1)
    pair.eval()
    capture = ScoreCapture(pair.torch_model)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            ref = pair.torch_model(to_torch(images, pair.torch_device))
        result.seconds["torch_eval_forward"] = time.perf_counter() - start
    finally:
        capture.close()
    start = time.perf_counter()
    with jt.no_grad():
        out = _jittor_forward(pair, images, None, None)
        jt.sync_all()
        result.seconds["jittor_eval_forward"] = time.perf_counter() - start
        out = _compare_topk(pair, result, "eval.decoder.topk_ind", capture, images, None, out)
    result.add("output", compare_tree(to_numpy(out), to_numpy(ref),
                                      lambda p: tolerance("output", p)))
    # (w, h) per image: the official postprocessor's order, non-square on purpose.
    sizes = np.array([[w + 37 * i + 13, h - 5 * i] for i in range(batch)], dtype=np.float32)
    postprocessor = pair.port_parts.postprocessor
    if postprocessor is None:
        result.notes.append("detections: not compared: the port has no postprocessor")
        return
    pp_ref = torch_ref.build_postprocessor(pair.cfg)(ref, to_torch(sizes, pair.torch_device))
    pp_out = postprocessor(pair.port_parts.options.to_port(out),
                           jt.array(pair.port_parts.options.orig_sizes(sizes)))
    for i, (a, b) in enumerate(zip(to_numpy(pp_out), to_numpy(pp_ref))):
        order, moved = align_detections(a, b, tolerance("decision", "postprocess.topk").atol)
        a = {k: v[order] for k, v in a.items()}
        if moved:
            result.notes.append(f"detections[{i}]: {moved} detections with scores tied within "
                                f"{tolerance('decision', 'postprocess.topk').atol:g} came out of "
                                "top-k in another order and were re-paired by label and box")
        result.add("detection", [
            decision_comparison(f"detections[{i}].labels", a["labels"][None], b["labels"][None]),
            compare_arrays(a["scores"], b["scores"], tolerance("detection", "scores"),
                           f"detections[{i}].scores"),
            compare_arrays(a["boxes"], b["boxes"], tolerance("detection", "boxes"),
                           f"detections[{i}].boxes")])


def _float64_losses(pair: ModelPair, images: np.ndarray, targets: list, topk_ind: np.ndarray,
                    matches: dict) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
    """The reference losses recomputed in float64 on a copy of the torch model.

    Same weights, same targets, the same (rewound) denoising noise and the fp32 run's top-k
    and matching decisions, so the only difference from the fp32 reference is rounding: the
    gap between the two is the precision floor of fp32 for each loss term.

    Returns:
        The float64 loss terms, and the float64 matching costs of every Hungarian decision.
    """
    model = copy.deepcopy(pair.torch_model).double().train()
    model.decoder.forced_topk_ind = to_torch(topk_ind, pair.torch_device)
    tg = [{"labels": t["labels"], "boxes": t["boxes"].double()}
          for t in to_torch(targets, pair.torch_device)]
    criterion = torch_ref.build_criterion(pair.cfg).double()
    criterion.forced_indices = matches
    with torch.no_grad():
        out = model(to_torch(images, pair.torch_device).double(), tg)
        losses = criterion(out, tg)
    costs = matcher_costs(criterion.matcher, out, tg, list(matches))
    return {k: float(v) for k, v in losses.items()}, costs


def _compare_match_decisions(result: CheckResult, criteria: tuple, outputs: tuple, targets: list,
                             losses_out: dict, float64_costs: dict,
                             device: torch.device | None = None) -> dict:
    """Compares every Hungarian and denoising match; on a difference forces the reference's.

    Each decision key of the criterion (``final``, ``aux_{i}``, ``dn``) gets a decision row,
    differing images with their cost gaps. When any differs, the reference's matches are
    forced into the Jittor criterion and its losses recomputed on the same outputs, so the
    loss terms are compared with the same matches (as the forced top-k does for the encoder).

    Args:
        result: Collects the rows and notes.
        criteria: ``(jittor_criterion, torch_criterion)`` after their forwards.
        outputs: ``(jittor_outputs, torch_outputs)`` of the train forward.
        targets: Numpy targets.
        losses_out: The Jittor losses computed with Jittor's own matches.
        float64_costs: The reference's float64 matching costs (from :func:`_float64_losses`).
        device: The torch outputs' device.

    Returns:
        The Jittor losses to compare: ``losses_out``, or the ones with the forced matches.
    """
    criterion_out, criterion_ref = criteria
    out, ref = outputs
    keys = list(criterion_ref.last_indices)
    costs = MatchCosts(reference=matcher_costs(criterion_ref.matcher, ref, to_torch(targets, device), keys),
                       test=matcher_costs(criterion_out.matcher, out, to_jittor(targets), keys),
                       float64=float64_costs)
    result.add("decision", compare_matches(criterion_out.last_indices, criterion_ref.last_indices, costs))
    differences = match_differences(criterion_out.last_indices, criterion_ref.last_indices, costs)
    if not differences:
        return losses_out
    unforced = {k: float(v.numpy().reshape(())) for k, v in losses_out.items()}
    criterion_out.forced_indices = dict(criterion_ref.last_indices)
    forced = criterion_out(out, to_jittor(targets))
    moved = {k: abs(unforced[k] - float(forced[k].numpy().reshape(()))) / max(abs(unforced[k]), 1e-12)
             for k in unforced}
    worst = max(moved, key=moved.get)
    result.notes.append(
        f"train.match: {len(differences)} image assignment(s) differ "
        f"({', '.join(f'{d.key}: {d.describe()}' for d in differences)}); the reference matches "
        f"were forced into the Jittor criterion for the loss comparison (forcing moved Jittor's "
        f"{worst} by {moved[worst]:.3g} relative)")
    return forced


def check_port_criterion(pair: ModelPair, result: CheckResult, size: Size,
                         counts: list[int]) -> None:
    """Another port's criterion on the reference's train-mode outputs, every loss term.

    The port's own forward draws its own denoising noise, so its criterion is compared in
    isolation: both criteria take the torch model's outputs (with its denoising groups) and
    the same targets. Each term's fp32 floor comes from the reference's float64 replay, as in
    :func:`check_train_losses`.
    """
    images = seeded_images(len(counts), size, seed=2)
    targets = seeded_targets(counts, pair.cfg.num_classes, seed=3)
    pair.train()
    torch_rng_state = pair.torch_model.rng.state_dict()
    ref = pair.torch_model(to_torch(images, pair.torch_device), to_torch(targets, pair.torch_device))
    criterion_ref = torch_ref.build_criterion(pair.cfg)
    losses_ref = criterion_ref(ref, to_torch(targets, pair.torch_device))
    exact, _ = _replayed_losses(pair, images, targets, criterion_ref, torch_rng_state)
    outputs = pair.port_parts.options.to_port(torch_to_jittor_tree(ref, {}))
    losses_out = pair.port_parts.criterion(outputs, to_jittor(targets))
    result.notes.append("train losses: the port's criterion was given the reference's outputs "
                        "(its forward draws its own denoising noise); its matching is its own")
    _add_losses(result, losses_out, losses_ref, exact)


def _replayed_losses(pair: ModelPair, images: np.ndarray, targets: list,
                     criterion_ref: torch.nn.Module, rng_state: dict) -> tuple[dict, dict]:
    """:func:`_float64_losses` of the fp32 train forward just run, its stream rewound to
    ``rng_state`` (where that forward started) and left where the forward left it."""
    ref_topk = to_numpy(pair.torch_model.decoder.last_topk_ind)
    replay_rng = pair.torch_model.rng.state_dict()
    pair.torch_model.rng.load_state_dict(rng_state)
    try:
        return _float64_losses(pair, images, targets, ref_topk, criterion_ref.last_indices)
    finally:
        pair.torch_model.rng.load_state_dict(replay_rng)


def _add_losses(result: CheckResult, losses_out: dict, losses_ref: dict,
                exact: dict[str, float]) -> None:
    """Loss rows, each term judged with the forward's noise: the largest fp32 floor."""
    floors = {k: abs(float(v.detach()) - exact[k]) / max(abs(exact[k]), 1e-12)
              for k, v in losses_ref.items()}
    result.precision_floor.update(floors)
    noise = max(floors.values())
    result.add("loss", compare_tree(to_numpy(losses_out), to_numpy(losses_ref),
                                    lambda p: loss_tolerance(p, noise)))


def check_train_losses(pair: ModelPair, result: CheckResult, size: Size, counts: list[int]) -> None:
    """Train-mode forward with the same targets and denoising noise, then every loss term.

    Both models draw denoising noise from identically seeded shared streams. If the encoder's
    top-k selection differs, the difference and its score gap are reported and the reference
    decision is forced into the Jittor side so the losses can still be compared. The Jittor
    model's stream is rewound for that re-run so it draws the same denoising noise again.

    The denoising groups (``dn_meta``, noised labels, boxes and attention mask) and every
    matching decision of the criteria are compared as decisions; differing matches are
    reported with their cost gaps and the reference's are forced into the Jittor criterion
    before its loss terms are compared (:func:`_compare_match_decisions`).

    Each loss term is also computed in float64 by the reference; the fp32 errors against that
    (each term's precision floor) give the forward's noise level, which the ``loss``
    tolerance entry takes into account. ``size`` is one int (square) or ``(h, w)``.
    """
    images = seeded_images(len(counts), size, seed=2)
    targets = seeded_targets(counts, pair.cfg.num_classes, seed=3)
    pair.train()
    torch_rng_state = pair.torch_model.rng.state_dict()
    capture = ScoreCapture(pair.torch_model)
    try:
        ref = pair.torch_model(to_torch(images, pair.torch_device), to_torch(targets, pair.torch_device))
    finally:
        capture.close()
    rng_state = pair.jittor_model.rng.state_dict()
    out = _jittor_forward(pair, images, targets, None)
    out = _compare_topk(pair, result, "train.decoder.topk_ind", capture, images, targets, out,
                        rng_state)
    criterion_ref = torch_ref.build_criterion(pair.cfg)
    criterion_out = pair.port_parts.criterion
    losses_ref = criterion_ref(ref, to_torch(targets, pair.torch_device))
    losses_out = criterion_out(out, to_jittor(targets))
    exact, float64_costs = _replayed_losses(pair, images, targets, criterion_ref, torch_rng_state)
    result.add("decision", compare_dn_meta(out.get("dn_meta"), ref.get("dn_meta")))
    for kind, row in compare_denoising(pair, targets, torch_rng_state, rng_state):
        result.add(kind, [row])
    losses_out = _compare_match_decisions(result, (criterion_out, criterion_ref), (out, ref), targets,
                                          losses_out, float64_costs, pair.torch_device)
    _add_losses(result, losses_out, losses_ref, exact)
    total_ref = float(sum(v.item() for v in losses_ref.values()))
    if not math.isfinite(total_ref):
        result.notes.append(f"reference total loss is not finite: {total_ref}")


def run_check(pair: ModelPair, size: Size, train_size: Size = 640,
              counts: tuple[int, ...] = (4, 0)) -> CheckResult:
    """Eval parity at ``size`` and train-loss parity at ``train_size`` (each S or ``(h, w)``)."""
    result = CheckResult(pair.cfg.name, pair.weights_source, size, device=pair.device)
    check_eval(pair, result, size)
    if pair.port_parts.criterion is None:
        result.not_run["losses"] = "the port has no criterion"
    elif not pair.external:
        check_train_losses(pair, result, train_size, list(counts))
    else:
        check_port_criterion(pair, result, train_size, list(counts))
    return result
