"""Tensor and tree comparison: the metrics every parity check reports.

For each pair of arrays: shape and dtype first, then max abs, max relative, relative L2
(``||a - b|| / ||b||`` with ``b`` the reference), cosine similarity, the share of elements within
tolerance, and NaN/Inf on either side. A NaN on one side only is always a failure; NaNs in the
same places on both sides are reported and compared as equal. :func:`compare_tree` walks nested
dicts, lists and tuples and names every leaf by its path (``aux_outputs[2].pred_boxes``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from .arrays import to_numpy


@dataclass(frozen=True)
class Tolerance:
    """Pass criterion for one comparison.

    An element is within tolerance when ``|a - b| <= atol + rtol * |b|``; the pair passes when
    every element is within tolerance, ``rel_l2 <= max_rel_l2`` and ``cosine >= min_cosine``.
    """

    atol: float = 1e-4
    rtol: float = 0.0
    max_rel_l2: float = math.inf
    min_cosine: float = -math.inf


@dataclass
class Comparison:
    """Metrics of one aligned pair (``test`` against ``reference``)."""

    path: str
    shape_ref: tuple
    shape_test: tuple
    dtype_ref: str
    dtype_test: str
    max_abs: float = math.nan
    max_rel: float = math.nan
    rel_l2: float = math.nan
    cosine: float = math.nan
    within: float = math.nan
    nan_ref: int = 0
    nan_test: int = 0
    inf_ref: int = 0
    inf_test: int = 0
    passed: bool = False
    reason: str = ""
    # Decision rows (forced ties, top-k, matches, AdamW sign flips): elements compared, put on
    # the other side by the port, replaced by the reference's side, and the tie band used.
    compared: int | None = None
    flipped: int | None = None
    forced: int | None = None
    band: float | None = None
    # The reference's own fp32 error at this tensor (rel L2 against its float64 replay),
    # where the check measured it.
    floor: float | None = None

    def as_row(self) -> dict:
        """A flat dict for CSV/JSON output."""
        row = asdict(self)
        row["shape_ref"] = "x".join(map(str, self.shape_ref))
        row["shape_test"] = "x".join(map(str, self.shape_test))
        return row


def _judge(c: Comparison, tol: Tolerance) -> Comparison:
    """Sets ``passed`` and ``reason`` of ``c`` from its metrics and ``tol``."""
    failures = []
    if c.within < 1.0:
        failures.append(f"{(1 - c.within) * 100:.3g}% of elements outside atol={tol.atol:g} "
                        f"rtol={tol.rtol:g} (max abs {c.max_abs:.3g})")
    if not c.rel_l2 <= tol.max_rel_l2:
        failures.append(f"rel L2 {c.rel_l2:.3g} > {tol.max_rel_l2:g}")
    if not c.cosine >= tol.min_cosine:
        failures.append(f"cosine {c.cosine:.8f} < {tol.min_cosine:g}")
    c.passed = not failures
    c.reason = "; ".join(failures)
    return c


# Elements per block of the metrics' pass: the float64 copies of a block stay in the core's own
# cache, where one pass over a whole large tensor would stream from memory at every step.
BLOCK = 8192


def _blockwise_metrics(c: Comparison, test: np.ndarray, ref: np.ndarray, tol: Tolerance,
                       finite_only: bool = True) -> bool:
    """Sets the error metrics of ``c`` from 1-D arrays of equal size, in float64, one block of
    :data:`BLOCK` elements at a time. With ``finite_only``, returns False with ``c`` unchanged
    as soon as a block's dot products are not finite (a NaN or Inf, or an overflow)."""
    sums = np.zeros(4)  # diff.diff, ref.ref, test.test, test.ref
    max_abs = max_rel = 0.0
    inside = 0
    with np.errstate(invalid="ignore", over="ignore"):  # NaN, Inf, overflow: judged by callers
        for start in range(0, test.size, BLOCK):
            a = test[start:start + BLOCK].astype(np.float64)
            b = ref[start:start + BLOCK].astype(np.float64)
            diff = a - b
            block = np.array([np.dot(diff, diff), np.dot(b, b), np.dot(a, a), np.dot(a, b)])
            if finite_only and not np.isfinite(block).all():
                return False
            sums += block
            np.abs(diff, out=diff)
            max_abs = max(max_abs, float(diff.max()))
            bound = np.abs(b, out=b)
            scaled = np.maximum(bound, 1e-12)
            max_rel = max(max_rel, float(np.divide(diff, scaled, out=scaled).max()))
            np.multiply(bound, tol.rtol, out=bound)
            bound += tol.atol
            inside += np.count_nonzero(diff <= bound)
    diff_sq, ref_sq, a_sq, a_ref = (float(x) for x in sums)
    c.max_abs, c.max_rel = max_abs, max_rel
    ref_norm, diff_norm = math.sqrt(ref_sq), math.sqrt(diff_sq)
    if ref_norm > 0:
        c.rel_l2 = diff_norm / ref_norm
    else:
        c.rel_l2 = math.inf if diff_norm > 0 else 0.0
    na, nb = math.sqrt(a_sq), ref_norm
    c.cosine = float(a_ref / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    c.within = inside / test.size if test.size else 1.0
    return True


def _compare_with_non_finite(c: Comparison, a64: np.ndarray, b64: np.ndarray,
                             tol: Tolerance) -> Comparison:
    """The rest of :func:`compare_arrays` where a value is NaN or Inf: they must sit at the same
    places on both sides (Inf with the same sign); the metrics are of the finite rest."""
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    inf_a, inf_b = np.isinf(a64), np.isinf(b64)
    c.nan_test, c.nan_ref = int(nan_a.sum()), int(nan_b.sum())
    c.inf_test, c.inf_ref = int(inf_a.sum()), int(inf_b.sum())
    if (nan_a != nan_b).any():
        c.reason = f"NaN on one side only (test {c.nan_test}, reference {c.nan_ref})"
        return c
    if (inf_a != inf_b).any() or (a64[inf_a] != b64[inf_b]).any():
        c.reason = f"Inf differs (test {c.inf_test}, reference {c.inf_ref})"
        return c
    finite = ~(nan_a | inf_a)
    _blockwise_metrics(c, a64[finite], b64[finite], tol, finite_only=False)  # overflow: inf metrics
    return _judge(c, tol)


def compare_arrays(test: Any, reference: Any, tol: Tolerance, path: str = "") -> Comparison:
    """Compares one array pair.

    Args:
        test: The array under test (Jittor side), any array-like.
        reference: The reference (torch side).
        tol: Pass criterion.
        path: Name reported with the result.

    Returns:
        The metrics; ``passed`` False with a ``reason`` on any failure.
    """
    a, b = np.asarray(to_numpy(test)), np.asarray(to_numpy(reference))
    if b.ndim == 0 and a.shape == (1,):
        # Jittor has no 0-dim Vars: its scalars (losses, counters) have shape [1].
        a = a.reshape(())
    c = Comparison(path, tuple(b.shape), tuple(a.shape), str(b.dtype), str(a.dtype))
    if a.shape != b.shape:
        c.reason = f"shape {a.shape} != reference {b.shape}"
        return c
    if a.dtype.kind != b.dtype.kind:
        c.reason = f"dtype {a.dtype} != reference {b.dtype}"
        return c
    if a.size == 0:
        c.nan_test = c.nan_ref = c.inf_test = c.inf_ref = 0
        c.max_abs = c.max_rel = c.rel_l2 = 0.0
        c.cosine = c.within = 1.0
    elif _blockwise_metrics(c, a.reshape(-1), b.reshape(-1), tol):
        c.nan_test = c.nan_ref = c.inf_test = c.inf_ref = 0
    else:  # a NaN or Inf somewhere: the masked, slower path
        return _compare_with_non_finite(c, a.astype(np.float64), b.astype(np.float64), tol)
    return _judge(c, tol)


def iter_leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Yields ``(path, leaf)`` for every non-container value of a nested structure."""
    if isinstance(tree, dict):
        for k in tree:
            yield from iter_leaves(tree[k], f"{path}.{k}" if path else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from iter_leaves(v, f"{path}[{i}]")
    else:
        yield path, tree


def compare_tree(test: Any, reference: Any, tol_for: Callable[[str], Tolerance],
                 skip: Callable[[str], bool] = lambda path: False) -> list[Comparison]:
    """Compares two nested structures leaf by leaf.

    Args:
        test: Nested dicts/lists of arrays (Jittor side).
        reference: The same structure (torch side).
        tol_for: Tolerance for a leaf path.
        skip: Paths that are not arrays to compare (e.g. plain Python metadata).

    Returns:
        One :class:`Comparison` per leaf; a leaf present on one side only is a failure.
    """
    left = dict(iter_leaves(test))
    right = dict(iter_leaves(reference))
    results = []
    for path in list(right) + [p for p in left if p not in right]:
        if skip(path):
            continue
        if path not in left or path not in right:
            side = "test" if path not in left else "reference"
            results.append(Comparison(path, (), (), "", "", reason=f"missing on the {side} side"))
            continue
        results.append(compare_arrays(left[path], right[path], tol_for(path), path))
    return results
