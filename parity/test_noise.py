"""The noise measurement behind the allowances: its rule, its record and a small measurement."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from parity.noise import CONTROLS, KINDS, MARGIN, QUANTILE, control, derive, measure, parse_size, ratio
from parity.tolerances import loss_tolerance, noise_record, tolerance


@pytest.mark.parametrize("error, floor, expected", [
    (2e-3, 1e-4, 20.0),        # error over floor
    (0.0, 0.0, None),          # nothing measured: no sample
    (2e-3, 0.0, math.inf),     # an error where the reference has none: nothing would let it pass
])
def test_ratio(error: float, floor: float, expected: float | None) -> None:
    assert ratio(error, floor) == (pytest.approx(expected) if expected is not None else None)


def test_derive_applies_the_rule() -> None:
    values = np.linspace(0.0, 10.0, 1001).tolist()
    d = derive({"grad": values})["grad"]
    assert d["factor"] == pytest.approx(MARGIN * np.quantile(values, QUANTILE))
    assert d["samples"] == 1001 and d["max"] == 10.0
    with pytest.raises(ValueError, match="no samples"):
        derive({"grad": []})


def test_controls_are_restored() -> None:
    import torch
    before = torch.get_num_threads(), torch.backends.mkldnn.enabled
    for _, threads, onednn in CONTROLS:
        with control(threads, onednn):
            assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads, onednn)
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == before


@pytest.mark.parametrize("text, expected", [("256", 256), ("480x640", (480, 640))])
def test_parse_size(text: str, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["250", "480x", "axb", "0"])
def test_parse_size_names_the_problem(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_the_table_reads_the_derivation() -> None:
    """Every noise entry is the record's factor for its kind, and that factor follows the rule
    from the record's own quantile."""
    kinds = noise_record()["kinds"]
    for kind, d in kinds.items():
        assert d["factor"] == pytest.approx(MARGIN * d["p99.9"]), kind
    cases = {"grad.x": "grad", "update.x": "grad", "exp_avg.x": "step", "exp_avg_sq.x": "step",
             "ema.x": "step", "ema_delta[2].x": "step", "buffer_delta.x": "step",
             "trajectory.step[3].loss": "trajectory_loss", "trajectory.step[3].weights": "trajectory",
             "train.relu_gate.decoder.x": "decision"}
    for path, kind in cases.items():
        assert tolerance("noise", path).atol == kinds[kind]["factor"], path
    assert tolerance("noise.zero", "grad.x").atol == kinds["zero"]["factor"]
    assert loss_tolerance("loss_vfl", 1.0).rtol == kinds["loss"]["factor"]


def test_a_missing_or_partial_record_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="rtdetr-parity noise"):
        noise_record(tmp_path / "none.json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"kinds": {"grad": {"factor": 2.0}}}))
    with pytest.raises(ValueError, match="lacks the kinds"):
        noise_record(partial)


def test_measure_takes_samples_of_every_kind() -> None:
    samples = measure(["r18vd"], [(96, 160)], [0], steps=1)
    assert set(samples) == set(KINDS)
    # one sample per trainable parameter with a gradient (not zero in exact arithmetic), per control
    assert len(samples["grad"]) > 300 * len(CONTROLS)
    assert all(samples[kind] for kind in KINDS if kind != "decision")  # flips may not occur
    assert all(v >= 0 for values in samples.values() for v in values)
