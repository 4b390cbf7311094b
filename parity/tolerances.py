"""The one tolerance table of the harness.

Keys are ``(kind, path pattern)``; the first entry whose kind matches and whose pattern is a
substring of the compared path wins, so specific entries come before the kind's default. Every
entry looser than the fp32 default says why.
"""

from __future__ import annotations

from .compare import Tolerance

# fp32 on CPU; the targets of the project (issue 3 / issue 4).
_TABLE: list[tuple[str, str, Tolerance, str]] = [
    ("output", "", Tolerance(atol=1e-4), "final outputs: max abs <= 1e-4"),
    # Box corners are scaled by the image size (hundreds of pixels), so a 1e-6 relative
    # difference of the normalised box is ~1e-3 px: the target is stated in pixels.
    ("detection", "boxes", Tolerance(atol=1e-2), "detections: boxes within 1e-2 px"),
    ("detection", "scores", Tolerance(atol=1e-4), "detections: scores within 1e-4"),
    ("loss", "", Tolerance(atol=0.0, rtol=1e-4), "loss terms: 1e-4 relative"),
    # Encoder scores of O(1) carry ~1e-6 of fp32 accumulation-order noise between the
    # frameworks; two candidates closer than 1e-5 are a tie that rounding decides either way.
    # atol here bounds the score gap of any differing choice.
    ("decision", "eval.decoder.topk", Tolerance(atol=1e-5), "top-k: only ties within 1e-5 may differ"),
    # In training, BatchNorm normalises with batch statistics (sums over bs*h*w elements),
    # which carry ~1e-5 relative fp32 error in either framework (the reference's own fp32 vs
    # float64 error is of the same size): encoder scores then tie within 1e-4.
    ("decision", "train.decoder.topk", Tolerance(atol=1e-4), "train top-k: ties within 1e-4"),
    # Detection scores are sigmoids of logits that agree within 1e-5: two detections whose
    # scores are this close may come out of the postprocessor's top-k in either order.
    ("decision", "postprocess.topk", Tolerance(atol=1e-5), "detections: reorder only within ties"),
    ("decision", "", Tolerance(atol=0.0), "other decisions: identical"),
]


def tolerance(kind: str, path: str) -> Tolerance:
    """The tolerance for a compared path of a given kind.

    Raises:
        KeyError: If the table has no entry for the kind (every comparison must be covered).
    """
    for entry_kind, pattern, tol, _ in _TABLE:
        if entry_kind == kind and pattern in path:
            return tol
    raise KeyError(f"no tolerance entry for kind {kind!r} (path {path!r})")


def loss_tolerance(path: str, noise: float) -> Tolerance:
    """The tolerance of one loss term given the fp32 noise level of the forward it came from.

    The target is 1e-4 relative. ``noise`` is the largest relative gap between the reference's
    fp32 and float64 loss terms of the same forward: how far fp32 rounding alone moves a loss
    of this model on this input (train-mode BatchNorm on random weights amplifies rounding).
    Where three times that exceeds 1e-4, the port may differ from the reference by
    ``3 * noise``: the reference carries one ``noise`` of rounding error, and Jittor's CPU
    kernels, compiled with ``-Ofast`` (fused multiply-adds, reciprocal division, approximate
    ``log``/``exp``), carry about twice as much. Logic errors (a wrong match, a wrong
    activation) move losses by orders of magnitude more. Reports show the noise level.
    """
    base = tolerance("loss", path)
    return Tolerance(atol=base.atol, rtol=max(base.rtol, 3.0 * noise))


def table_rows() -> list[dict]:
    """The table as rows, for reports (every report lists the tolerances it used)."""
    return [{"kind": k, "path": p or "*", "atol": t.atol, "rtol": t.rtol,
             "max_rel_l2": t.max_rel_l2, "min_cosine": t.min_cosine, "why": why}
            for k, p, t, why in _TABLE]
