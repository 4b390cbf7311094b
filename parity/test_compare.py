"""``compare_arrays``, the comparison under every row: its metrics on hand-worked pairs, and
NaN / Inf judged by place before anything is measured."""

from __future__ import annotations

import math

import numpy as np
import pytest

from parity.compare import BLOCK, Tolerance, compare_arrays

LOOSE = Tolerance(atol=1.0, rtol=0.0, max_rel_l2=1.0, min_cosine=0.0)
NAN, INF = float("nan"), float("inf")

# (name, test, reference, tolerance, expected fields; "reason" is a substring or "" for none)
CASES = [
    ("equal", [1.0, -2.0, 3.0], [1.0, -2.0, 3.0], Tolerance(),
     dict(passed=True, max_abs=0.0, rel_l2=0.0, cosine=1.0, within=1.0, reason="")),
    # diff (0, 0, 1) against (1, 2, 2): |diff| 1, |ref| 3, relative 1 / 2 at the last element
    ("one element off", [1.0, 2.0, 3.0], [1.0, 2.0, 2.0], LOOSE,
     dict(passed=True, max_abs=1.0, max_rel=0.5, rel_l2=1 / 3, cosine=11 / (math.sqrt(14) * 3),
          within=1.0)),
    ("outside atol", [1.0, 2.0, 3.0], [1.0, 2.0, 2.0], Tolerance(atol=0.5, max_rel_l2=1.0, min_cosine=0.0),
     dict(passed=False, within=2 / 3, reason="33.3% of elements outside atol=0.5")),
    ("rel L2 over", [1.0, 2.0, 3.0], [1.0, 2.0, 2.0], Tolerance(atol=1.0, max_rel_l2=0.3, min_cosine=0.0),
     dict(passed=False, reason="rel L2 0.333 > 0.3")),
    ("opposite", [1.0, 2.0], [-1.0, -2.0], Tolerance(atol=10.0, max_rel_l2=10.0, min_cosine=0.5),
     dict(passed=False, cosine=-1.0, reason="cosine -1.00000000 < 0.5")),
    ("zero reference", [0.0, 1e-3], [0.0, 0.0], LOOSE,
     dict(passed=False, rel_l2=math.inf, max_rel=1e9, reason="rel L2 inf > 1")),
    ("both zero", [0.0, 0.0], [0.0, 0.0], Tolerance(),
     dict(passed=True, rel_l2=0.0, cosine=1.0)),
    ("empty", np.zeros((0, 4)), np.zeros((0, 4)), Tolerance(),
     dict(passed=True, rel_l2=0.0, cosine=1.0, within=1.0, nan_test=0)),
    ("NaN at the same place", [1.0, NAN, 3.0], [1.0, NAN, 2.0], LOOSE,
     dict(passed=True, nan_test=1, nan_ref=1, max_abs=1.0, rel_l2=1 / math.sqrt(5))),
    ("NaN on one side", [1.0, NAN, 3.0], [1.0, 2.0, 3.0], LOOSE,
     dict(passed=False, nan_test=1, nan_ref=0, reason="NaN on one side only (test 1, reference 0)")),
    ("Inf at the same place", [INF, 2.0], [INF, 2.0], Tolerance(),
     dict(passed=True, inf_test=1, inf_ref=1, rel_l2=0.0)),
    ("Inf of the other sign", [INF, 2.0], [-INF, 2.0], LOOSE,
     dict(passed=False, reason="Inf differs (test 1, reference 1)")),
    ("Inf on one side", [1.0, 2.0], [INF, 2.0], LOOSE,
     dict(passed=False, inf_test=0, inf_ref=1, reason="Inf differs")),
    ("shape", [1.0, 2.0], [1.0, 2.0, 3.0], LOOSE,
     dict(passed=False, reason="shape (2,) != reference (3,)")),
    ("dtype kind", np.array([1, 2]), np.array([1.0, 2.0]), LOOSE,
     dict(passed=False, reason="dtype int64 != reference float64")),
    ("Jittor scalar", np.array([2.5], np.float32), np.array(2.5, np.float32), Tolerance(),
     dict(passed=True, rel_l2=0.0, shape_test=())),
    # Measured block by block: one element off in the last of three blocks (ones against ones):
    # |diff| 1 of 3 * BLOCK elements, rel L2 1 / sqrt(3 * BLOCK).
    ("off in the last block", np.r_[np.ones(3 * BLOCK - 1), 2.0], np.ones(3 * BLOCK),
     Tolerance(atol=0.5, max_rel_l2=1.0, min_cosine=0.0),
     dict(passed=False, max_abs=1.0, max_rel=1.0, rel_l2=1 / math.sqrt(3 * BLOCK),
          within=1 - 1 / (3 * BLOCK), reason="outside atol=0.5")),
    ("NaN at the same place in a later block", np.r_[np.ones(BLOCK), NAN, 3.0],
     np.r_[np.ones(BLOCK), NAN, 2.0], LOOSE,
     dict(passed=True, nan_test=1, nan_ref=1, max_abs=1.0, rel_l2=1 / math.sqrt(BLOCK + 4))),
    ("NaN on one side in a later block", np.r_[np.ones(BLOCK), NAN], np.ones(BLOCK + 1), LOOSE,
     dict(passed=False, nan_test=1, reason="NaN on one side only (test 1, reference 0)")),
]


@pytest.mark.parametrize("name,test,reference,tol,expected", CASES, ids=[c[0] for c in CASES])
def test_compare_arrays(name, test, reference, tol, expected) -> None:
    c = compare_arrays(np.asarray(test, dtype=None), np.asarray(reference), tol, name)
    assert c.path == name
    for field, value in expected.items():
        got = getattr(c, field)
        if field == "reason":
            assert value in got if value else got == "", (got, value)
        elif isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-12, abs=0.0), (field, got, value)
        else:
            assert got == value, (field, got, value)


def test_float32_pairs_are_measured_in_float64() -> None:
    """A float32 difference below float32's resolution of the values is still measured."""
    ref = np.full(1000, 1.0, np.float32)
    test = ref + np.float32(2 ** -23)  # one float32 step above 1
    c = compare_arrays(test, ref, Tolerance(atol=0.0, rtol=0.0, max_rel_l2=1.0, min_cosine=0.0))
    assert c.max_abs == 2 ** -23 and c.rel_l2 == pytest.approx(2 ** -23, rel=1e-12)
    assert c.within == 0.0 and not c.passed
