"""Discrete decisions of a train-mode forward, compared as decisions.

Two kinds of decision shape the training losses besides the encoder's top-k:

- The Hungarian matches, one assignment per image for every decoder output the criterion
  matches (``SetCriterion.last_indices``: ``final``, ``aux_{i}``, ``dn``). They are compared as
  sets of ``(query, target)`` pairs. Where they differ, both assignments are evaluated on the
  reference's cost matrix: the difference (the *cost gap*, >= 0 because the reference's choice
  is optimal on it) says how close the reference came to choosing the Jittor assignment. A
  difference inside a near-tie (gap within the ``match`` tie tolerance) is rounding deciding a
  tie and passes; anything else fails. The same gap on Jittor's costs and on the reference's
  float64 costs is reported with it: how strongly Jittor preferred its choice, and how far the
  reference's own fp32 rounding moved the gap.
- The contrastive denoising groups: ``dn_meta`` (positive query indices per image, number of
  groups, split sizes), the noised labels, the noised boxes and the self-attention mask. All
  come from the shared random stream, so labels, indices and the mask must agree exactly and
  the boxes within fp32 rounding.

Every function returns :class:`~parity.compare.Comparison` rows for a
:class:`~parity.check.CheckResult` (kind ``decision`` unless tagged otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rtdetr_common.random import SharedRandom

from .arrays import to_numpy
from .compare import Comparison, compare_arrays
from .tolerances import tolerance

MatchArrays = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class MatchCosts:
    """Per-decision cost matrices (:func:`matcher_costs`) that cost gaps are measured on.

    Attributes:
        reference: The reference's fp32 costs; a difference is judged on these.
        test: Jittor's costs (reported).
        float64: The reference's costs from its float64 re-run with the same decisions
            (reported: the fp32 rounding of the gap).
    """

    reference: dict[str, list[np.ndarray]] | None = None
    test: dict[str, list[np.ndarray]] | None = None
    float64: dict[str, list[np.ndarray]] | None = None


@dataclass
class MatchDifference:
    """One image whose assignment differs between the frameworks at one decision.

    Attributes:
        key: The decision (``final``, ``aux_{i}``, ``dn``).
        image: Index of the image in the batch.
        only_test: ``(query, target)`` pairs only the Jittor assignment holds.
        only_reference: Pairs only the reference assignment holds.
        gap: Cost of the Jittor assignment minus that of the reference one, both on the
            reference's cost matrix (None without cost matrices, e.g. for ``dn``).
        gap_test: The same two assignments on Jittor's own cost matrix, reference minus
            Jittor (how strongly Jittor preferred its choice), None without it.
        gap_float64: ``gap`` on the reference's float64 costs, None without them.
    """

    key: str
    image: int
    only_test: list[tuple[int, int]]
    only_reference: list[tuple[int, int]]
    gap: float | None = None
    gap_test: float | None = None
    gap_float64: float | None = None

    def describe(self) -> str:
        """One line: the differing pairs and the cost gaps."""
        text = (f"image {self.image}: Jittor (query, target) {self.only_test} vs reference "
                f"{self.only_reference}")
        gaps = [(self.gap, "reference fp32"), (self.gap_float64, "reference float64"),
                (-self.gap_test if self.gap_test is not None else None, "Jittor")]
        measured = [f"{value:.4g} ({where})" for value, where in gaps if value is not None]
        if measured:
            text += "; cost of Jittor's minus the reference's assignment: " + ", ".join(measured)
        return text


def layer_outputs(outputs: dict, key: str) -> dict:
    """The outputs the criterion matched for one decision key.

    Args:
        outputs: Model outputs of a train forward (either framework).
        key: ``final`` or ``aux_{i}`` (the Hungarian decisions of ``SetCriterion``).

    Returns:
        Dict with ``pred_logits`` and ``pred_boxes`` of that layer.

    Raises:
        ValueError: For a key that names no Hungarian decision of these outputs.
    """
    if key == "final":
        return {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    aux = outputs.get("aux_outputs", [])
    if key.startswith("aux_") and key[4:].isdigit() and int(key[4:]) < len(aux):
        return aux[int(key[4:])]
    raise ValueError(f"no Hungarian decision {key!r} in outputs with {len(aux)} aux_outputs")


def matcher_costs(matcher: Callable, outputs: dict, targets: list,
                  keys: list[str]) -> dict[str, list[np.ndarray]]:
    """Re-runs a matcher on every Hungarian decision and keeps its per-image cost matrices.

    The matcher is deterministic, so the costs are those the criterion's decisions were made
    from.

    Args:
        matcher: A ``HungarianMatcher`` of either framework (it records ``last_costs``).
        outputs: Model outputs of the same framework.
        targets: Targets in that framework.
        keys: Decision keys (``dn`` is skipped: it is not a cost-based decision).

    Returns:
        Key -> per-image float64 cost matrices ``[num_queries, n_i]``.
    """
    costs = {}
    for key in keys:
        if key == "dn":
            continue
        matcher(layer_outputs(outputs, key), targets)
        costs[key] = [np.asarray(c, dtype=np.float64) for c in matcher.last_costs]
    return costs


def assignment_cost(cost: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> float:
    """Total cost of an assignment, summed in float64.

    Args:
        cost: ``[num_queries, n]`` cost matrix.
        pairs: ``(query_idx, target_idx)`` arrays.

    Returns:
        ``sum(cost[query_idx, target_idx])``.
    """
    return float(np.asarray(cost, dtype=np.float64)[pairs[0], pairs[1]].sum())


def _pair_set(pairs: tuple[np.ndarray, np.ndarray]) -> set[tuple[int, int]]:
    return set(zip(np.asarray(pairs[0]).tolist(), np.asarray(pairs[1]).tolist()))


def _gap(costs: dict[str, list[np.ndarray]] | None, key: str, image: int,
         first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Cost of ``first`` minus cost of ``second`` on ``costs[key][image]``, None without it."""
    if costs is None or key not in costs:
        return None
    return assignment_cost(costs[key][image], first) - assignment_cost(costs[key][image], second)


def match_differences(test: dict[str, MatchArrays], reference: dict[str, MatchArrays],
                      costs: MatchCosts | None = None) -> list[MatchDifference]:
    """Every image whose assignment differs, per decision key present on both sides.

    Args:
        test: Jittor's ``SetCriterion.last_indices``.
        reference: The reference's ``last_indices``.
        costs: Cost matrices to measure the gaps on (none measured without).

    Returns:
        The differences, in decision order.
    """
    costs = costs if costs is not None else MatchCosts()
    differences = []
    for key in reference:
        if key not in test or len(test[key]) != len(reference[key]):
            continue
        for i, (t_pairs, r_pairs) in enumerate(zip(test[key], reference[key])):
            t_set, r_set = _pair_set(t_pairs), _pair_set(r_pairs)
            if t_set == r_set:
                continue
            differences.append(MatchDifference(
                key, i, sorted(t_set - r_set), sorted(r_set - t_set),
                gap=_gap(costs.reference, key, i, t_pairs, r_pairs),
                gap_test=_gap(costs.test, key, i, r_pairs, t_pairs),
                gap_float64=_gap(costs.float64, key, i, t_pairs, r_pairs)))
    return differences


def _key_label(key: str, keys: list[str]) -> str:
    """``aux_{last}`` is the encoder's top-k prediction (RT-DETR appends it after the layers)."""
    aux = [k for k in keys if k.startswith("aux_")]
    return f"{key} (encoder top-k)" if aux and key == aux[-1] else key


def compare_matches(test: dict[str, MatchArrays], reference: dict[str, MatchArrays],
                    costs: MatchCosts | None = None, prefix: str = "train.match") -> list[Comparison]:
    """One decision row per matching decision: identical, a near-tie, or a failure.

    A key's row passes when every image's pairs agree, or when every differing image's cost
    gap on the reference costs is within ``tolerance('decision', '<prefix>.<key>')`` (the
    ``match`` tie tolerance). Without reference costs for the key (``dn``) any difference fails.

    Args:
        test: Jittor's ``SetCriterion.last_indices``.
        reference: The reference's ``last_indices``.
        costs: Cost matrices to measure the gaps on; without reference costs any difference
            fails.
        prefix: Path prefix of the rows.

    Returns:
        Rows with path ``<prefix>.<key>``; ``max_abs`` is the largest cost gap (0 when the
        decisions agree), ``within`` the share of reference pairs Jittor also chose.
    """
    keys = list(reference) + [k for k in test if k not in reference]
    differences = match_differences(test, reference, costs)
    rows = []
    for key in keys:
        path = f"{prefix}.{key}"
        if key not in test or key not in reference:
            side = "test" if key not in test else "reference"
            rows.append(Comparison(path, (), (), "int64", "int64", reason=f"missing on the {side} side"))
            continue
        n_ref = sum(len(p[0]) for p in reference[key])
        n_test = sum(len(p[0]) for p in test[key])
        c = Comparison(path, (n_ref,), (n_test,), "int64", "int64", max_abs=0.0, rel_l2=0.0,
                       cosine=1.0, within=1.0)
        if len(test[key]) != len(reference[key]):
            c.reason = f"{len(test[key])} images vs reference {len(reference[key])}"
            rows.append(c)
            continue
        mine = [d for d in differences if d.key == key]
        common = sum(len(_pair_set(t) & _pair_set(r)) for t, r in zip(test[key], reference[key]))
        c.within = common / n_ref if n_ref else 1.0
        c.passed = not mine
        if mine:
            tol = tolerance("decision", path)
            gaps = [abs(d.gap) for d in mine if d.gap is not None]
            c.max_abs = max(gaps) if gaps else float("nan")
            tied = len(gaps) == len(mine) and max(gaps) <= tol.atol
            c.passed = tied
            verdict = (f"a near-tie (every cost gap <= {tol.atol:g}): rounding decided it" if tied
                       else f"not a tie (cost gap above {tol.atol:g} or no costs to measure it)")
            c.reason = (f"{_key_label(key, keys)}: {len(mine)} of {len(reference[key])} images match "
                        f"differently, {verdict}; " + "; ".join(d.describe() for d in mine))
        rows.append(c)
    return rows


def _exact(test: Any, reference: Any, path: str) -> Comparison:
    """Exact comparison of a discrete array (its ``decision`` tolerance is 0)."""
    return compare_arrays(np.asarray(test), np.asarray(reference), tolerance("decision", path), path)


def compare_dn_meta(test: dict | None, reference: dict | None,
                    prefix: str = "train.dn_meta") -> list[Comparison]:
    """Compares two ``dn_meta`` dicts exactly: positive indices per image, groups, split.

    Args:
        test: Jittor's ``outputs['dn_meta']`` (None without denoising).
        reference: The reference's.
        prefix: Path prefix of the rows.

    Returns:
        Decision rows; none when neither side denoised, one failing row when only one did.
    """
    if test is None and reference is None:
        return []
    if test is None or reference is None:
        side = "test" if test is None else "reference"
        return [Comparison(prefix, (), (), "", "",
                           reason=f"denoising ran on one side only (missing on the {side} side)")]
    rows = [_exact([test["dn_num_group"]], [reference["dn_num_group"]], f"{prefix}.dn_num_group"),
            _exact(list(test["dn_num_split"]), list(reference["dn_num_split"]), f"{prefix}.dn_num_split")]
    ref_idx, test_idx = reference["dn_positive_idx"], test["dn_positive_idx"]
    if len(ref_idx) != len(test_idx):
        rows.append(Comparison(f"{prefix}.dn_positive_idx", (len(ref_idx),), (len(test_idx),), "", "",
                               reason=f"{len(test_idx)} images vs reference {len(ref_idx)}"))
        return rows
    for i, (a, b) in enumerate(zip(test_idx, ref_idx)):
        rows.append(_exact(_array(a).astype(np.int64), _array(b).astype(np.int64),
                           f"{prefix}.dn_positive_idx[{i}]"))
    return rows


def _array(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x))


def _replay_denoising(build: Callable, decoder: Any, targets: list, rng_state: dict) -> dict:
    """Rebuilds one framework's denoising group from a saved stream state, labels un-embedded.

    Args:
        build: That framework's ``get_contrastive_denoising_training_group``.
        decoder: That framework's decoder (denoising settings).
        targets: Targets in that framework.
        rng_state: The shared stream's state before the forward being replayed.

    Returns:
        ``{'labels', 'boxes_unact', 'attn_mask'}`` as numpy (empty dict without denoising).
    """
    rng = SharedRandom()
    rng.load_state_dict(rng_state)
    labels, boxes, mask, meta = build(targets, decoder.num_classes, decoder.num_queries,
                                      lambda x: x,  # identity "embedding": the noised labels
                                      num_denoising=decoder.num_denoising,
                                      label_noise_ratio=decoder.label_noise_ratio,
                                      box_noise_scale=decoder.box_noise_scale, rng=rng)
    if meta is None:
        return {}
    return {"labels": _array(labels).astype(np.int64), "boxes_unact": _array(boxes),
            "attn_mask": _array(mask)}


def compare_denoising(pair: Any, targets: list, torch_rng_state: dict, jittor_rng_state: dict,
                      prefix: str = "train.denoising") -> list[tuple[str, Comparison]]:
    """Replays both frameworks' denoising groups from their saved streams and compares them.

    The labels (before embedding) and the attention mask must agree exactly; the box logits
    (``inverse_sigmoid`` of the noised, clipped boxes) within the ``output`` tolerance.

    Args:
        pair: The :class:`~parity.models.ModelPair`.
        targets: Numpy targets of the forward (as from ``seeded_targets``).
        torch_rng_state: ``pair.torch_model.rng.state_dict()`` taken before the torch forward.
        jittor_rng_state: The Jittor model's stream state before its forward.
        prefix: Path prefix of the rows.

    Returns:
        ``(kind, row)`` pairs: ``decision`` rows for labels and mask, an ``output`` row for
        the boxes; none when neither side denoises (no targets).
    """
    from jittor_impl.denoising import get_contrastive_denoising_training_group as jittor_group
    from torch_ref.denoising import get_contrastive_denoising_training_group as torch_group

    from .models import to_jittor, to_torch

    ref = _replay_denoising(torch_group, pair.torch_model.decoder, to_torch(targets, pair.torch_device),
                            torch_rng_state)
    out = _replay_denoising(jittor_group, pair.jittor_model.decoder, to_jittor(targets), jittor_rng_state)
    if not ref and not out:
        return []
    if not ref or not out:
        side = "test" if not out else "reference"
        reason = f"denoising ran on one side only (missing on the {side} side)"
        return [("decision", Comparison(prefix, (), (), "", "", reason=reason))]
    return [("decision", _exact(out["labels"], ref["labels"], f"{prefix}.labels")),
            ("decision", _exact(out["attn_mask"], ref["attn_mask"], f"{prefix}.attn_mask")),
            ("output", compare_arrays(out["boxes_unact"], ref["boxes_unact"],
                                      tolerance("output", f"{prefix}.boxes_unact"), f"{prefix}.boxes_unact"))]
