"""torch_ref.ema.ModelEMA: decay ramp, the averaging recursion, buffers and checkpoint state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torch_ref import build_ema
from torch_ref.ema import ModelEMA


def _small_model() -> nn.Module:
    """A model with parameters, float buffers and an integer buffer.

    Returns:
        ``Linear(3, 4) -> BatchNorm1d(4)``; BatchNorm holds ``running_mean`` / ``running_var``
        (float) and ``num_batches_tracked`` (int64).
    """
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _train_step(model: nn.Module) -> None:
    """Changes every parameter and buffer of ``model`` as a training step would.

    Args:
        model: The model from :func:`_small_model`, updated in place.
    """
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # updates the BatchNorm running statistics and counter


# (updates, warmups, expected decay) with decay 0.9999; expected = 0.9999 * (1 - exp(-n / warmups)).
DECAY_CASES = [
    (1, 2000, 4.998250333e-04),
    (2000, 2000, 0.6320573468),
    (20000, 2000, 0.9998546046),
    (1, 2, 0.3934299934),
]


@pytest.mark.parametrize("updates, warmups, expected", DECAY_CASES)
def test_decay_schedule(updates: int, warmups: int, expected: float) -> None:
    ema = ModelEMA(_small_model(), decay=0.9999, warmups=warmups)
    assert ema.decay_fn(updates) == pytest.approx(0.9999 * (1 - math.exp(-updates / warmups)), rel=1e-12)
    assert ema.decay_fn(updates) == pytest.approx(expected, rel=1e-9)


def test_official_config() -> None:
    ema = build_ema(_small_model(), "r18vd")
    assert (ema.decay, ema.warmups, ema.updates) == (0.9999, 2000, 0)


def test_copy_is_frozen_eval_and_independent() -> None:
    model = _small_model()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _train_step(model)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed without an update"


def test_updates_follow_the_recursion() -> None:
    model = _small_model()
    # A short ramp keeps the decay far from 0, so the average differs visibly from the model.
    ema = ModelEMA(model, decay=0.9999, warmups=2)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    int_buffer_at_creation = model.state_dict()["1.num_batches_tracked"].clone()

    for n in range(1, 4):
        _train_step(model)
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-n / 2))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * model.state_dict()[k]
    assert ema.updates == 3

    averaged = ema.module.state_dict()
    assert set(expected) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k], v, rtol=1e-6, atol=1e-7, msg=f"EMA of {k}")
        assert not torch.allclose(averaged[k], model.state_dict()[k]), f"{k} merely copies the model"
    assert model.state_dict()["1.num_batches_tracked"].item() == 3
    assert torch.equal(averaged["1.num_batches_tracked"], int_buffer_at_creation)


def test_state_dict_round_trip() -> None:
    model = _small_model()
    ema = ModelEMA(model, warmups=10)
    for _ in range(2):
        _train_step(model)
        ema.update(model)
    state = ema.state_dict()
    assert set(state) == {"module", "updates", "warmups"}
    assert (state["updates"], state["warmups"]) == (2, 10)

    # As officially, warmups comes from the constructor, updates from the state.
    restored = ModelEMA(_small_model(), warmups=30)
    restored.load_state_dict(state)
    assert (restored.updates, restored.warmups) == (2, 30)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[k], v), k


def test_load_state_without_module_raises() -> None:
    with pytest.raises(ValueError, match="module"):
        ModelEMA(_small_model()).load_state_dict({"updates": 3})


@pytest.mark.parametrize("kwargs", [{"decay": 1.5}, {"decay": -0.1}, {"warmups": 0}])
def test_invalid_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ModelEMA(_small_model(), **kwargs)
