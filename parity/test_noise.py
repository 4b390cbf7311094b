"""The noise measurement behind the allowances: its rule and a small measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from parity.noise import CONTROLS, MARGIN, QUANTILE, control, derive, measure, needed


@pytest.mark.parametrize("error, floor, fixed, expected", [
    (5e-4, 1e-4, 1e-3, 0.0),       # within the fixed entry: no allowance needed
    (2e-3, 1e-4, 1e-3, 20.0),      # beyond it: error over floor
    (2e-3, 0.0, 1e-3, math.inf),   # beyond it with no floor: nothing would let it pass
])
def test_needed_factor(error: float, floor: float, fixed: float, expected: float) -> None:
    assert needed(error, floor, fixed) == pytest.approx(expected)


def test_derive_applies_the_rule() -> None:
    values = np.linspace(0.0, 10.0, 1001).tolist()
    d = derive({"grad": values})["grad"]
    assert d["factor"] == pytest.approx(MARGIN * np.quantile(values, QUANTILE))
    assert d["samples"] == 1001 and d["beyond_fixed"] == 1000 and d["max"] == 10.0


def test_controls_are_restored() -> None:
    import torch
    before = torch.get_num_threads(), torch.backends.mkldnn.enabled
    for _, threads, onednn in CONTROLS:
        with control(threads, onednn):
            assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == before


def test_measure_takes_samples_of_every_kind() -> None:
    samples = measure("r18vd", [(96, 160)], [0])
    assert set(samples) == {"grad", "loss", "decision"}
    # one sample per trainable parameter with a gradient, per control
    assert len(samples["grad"]) > 300 * len(CONTROLS)
    assert all(v >= 0 for values in samples.values() for v in values)
