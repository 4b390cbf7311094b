"""ModelEMA of torch_ref and jittor_impl: decay ramp, the averaging recursion, buffers,
checkpoint state, and agreement of the two frameworks.

Every test taking the ``fw`` fixture runs once per framework through :data:`FRAMEWORKS`;
states are compared as numpy arrays in the official layout (``num_batches_tracked`` 0-dim).
"""

from __future__ import annotations

import itertools
import math
from typing import Dict

import jittor_impl  # noqa: F401  (sets Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest
import torch
from jittor import nn as jnn
from torch import nn as tnn

import torch_ref
from jittor_impl.checkpoint import load_state_dict_strict, model_state_dict
from jittor_impl.nn import BatchNorm2d, Linear, named_parameters
from jittor_impl.ema import ModelEMA as JittorModelEMA
from torch_ref.ema import ModelEMA as TorchModelEMA

State = Dict[str, np.ndarray]

FLOAT_KEYS = {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
COUNTER = "1.num_batches_tracked"
OFFICIAL = (0.9999, 2000, 0)  # (decay, warmups, updates) of a fresh official EMA


class _JittorBatchNorm1d(BatchNorm2d):
    """The project's BatchNorm (torch semantics, int64 ``num_batches_tracked``) over ``[bs, c]``.

    Jittor's own ``nn.BatchNorm1d`` has no ``num_batches_tracked``.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        return super().execute(x[:, :, None, None])[:, :, 0, 0]


class _Torch:
    """PyTorch side: torch_ref's ModelEMA and a ``Linear(3, 4) -> BatchNorm1d(4)`` model."""

    name = "torch"
    ModelEMA = TorchModelEMA
    build_ema = staticmethod(torch_ref.build_ema)

    @staticmethod
    def small_model() -> tnn.Module:
        return tnn.Sequential(tnn.Linear(3, 4), tnn.BatchNorm1d(4))

    @staticmethod
    def train_step(model: tnn.Module, rng: np.random.Generator) -> None:
        """Changes every parameter and buffer as a training step would (counter + 1)."""
        model.train()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)))
            model(torch.from_numpy(rng.standard_normal((8, 3)).astype(np.float32)))

    @staticmethod
    def state(module: tnn.Module) -> State:
        return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

    @staticmethod
    def native_state(state: State) -> dict:
        return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}

    @staticmethod
    def load_state(module: tnn.Module, state: State) -> None:
        module.load_state_dict(_Torch.native_state(state), strict=True)

    @staticmethod
    def all_frozen(module: tnn.Module) -> bool:
        return all(not t.requires_grad for t in itertools.chain(module.parameters(), module.buffers()))

    @staticmethod
    def all_trainable(model: tnn.Module) -> bool:
        return all(p.requires_grad for p in model.parameters())

    @staticmethod
    def all_eval(module: tnn.Module) -> bool:
        return all(not m.training for m in module.modules())


class _Jittor:
    """Jittor side: jittor_impl's ModelEMA and the same model from the project's layers."""

    name = "jittor"
    ModelEMA = JittorModelEMA
    build_ema = staticmethod(jittor_impl.build_ema)

    @staticmethod
    def small_model() -> jnn.Module:
        return jnn.Sequential(Linear(3, 4), _JittorBatchNorm1d(4))

    @staticmethod
    def train_step(model: jnn.Module, rng: np.random.Generator) -> None:
        """Changes every parameter and buffer as a training step would (counter + 1)."""
        model.train()
        with jt.no_grad():
            for _, p in named_parameters(model):
                p.update(p + jt.array(rng.standard_normal(p.shape).astype(np.float32)))
            model(jt.array(rng.standard_normal((8, 3)).astype(np.float32)))
        jt.sync(list(model.state_dict().values()))

    @staticmethod
    def state(module: jnn.Module) -> State:
        return model_state_dict(module)

    @staticmethod
    def native_state(state: State) -> dict:
        return {k: np.array(v) for k, v in state.items()}

    @staticmethod
    def load_state(module: jnn.Module, state: State) -> None:
        load_state_dict_strict(module, state, "test_ema")

    @staticmethod
    def all_frozen(module: jnn.Module) -> bool:
        # Jittor's parameters() lists buffers too; state_dict() is checked as well.
        return all(v.is_stop_grad() for v in [*module.parameters(), *module.state_dict().values()])

    @staticmethod
    def all_trainable(model: jnn.Module) -> bool:
        return all(not p.is_stop_grad() for _, p in named_parameters(model))

    @staticmethod
    def all_eval(module: jnn.Module) -> bool:
        return all(not m.training for m in module.modules())


FRAMEWORKS = {"torch": _Torch, "jittor": _Jittor}


@pytest.fixture(params=list(FRAMEWORKS))
def fw(request):
    """The per-framework helpers (:class:`_Torch` or :class:`_Jittor`)."""
    return FRAMEWORKS[request.param]


def _floats(state: State) -> State:
    """The floating-point entries of ``state`` as float64."""
    return {k: v.astype(np.float64) for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}


# (updates, warmups, expected decay) with decay 0.9999; expected = 0.9999 * (1 - exp(-n / warmups)).
DECAY_CASES = [
    (1, 2000, 4.998250333e-04),
    (2000, 2000, 0.6320573468),
    (20000, 2000, 0.9998546046),
    (1, 2, 0.3934299934),
]


@pytest.mark.parametrize("updates, warmups, expected", DECAY_CASES)
def test_decay_schedule(fw, updates: int, warmups: int, expected: float) -> None:
    """decay_fn is ``decay * (1 - exp(-updates / warmups))``."""
    ema = fw.ModelEMA(fw.small_model(), decay=0.9999, warmups=warmups)
    assert ema.decay_fn(updates) == pytest.approx(0.9999 * (1 - math.exp(-updates / warmups)), rel=1e-12)
    assert ema.decay_fn(updates) == pytest.approx(expected, rel=1e-9)


def test_official_config(fw) -> None:
    """build_ema gives the official decay, warm-up and a zero update count."""
    ema = fw.build_ema(fw.small_model(), "r18vd")
    assert (ema.decay, ema.warmups, ema.updates) == OFFICIAL


def test_copy_is_frozen_eval_and_independent(fw) -> None:
    """The average is a frozen eval-mode copy that training the model leaves unchanged."""
    model = fw.small_model()
    ema = fw.ModelEMA(model)
    assert fw.all_eval(ema.module)
    assert fw.all_frozen(ema.module)
    assert fw.all_trainable(model)
    before = fw.state(ema.module)
    assert set(before) == FLOAT_KEYS | {COUNTER}
    fw.train_step(model, np.random.default_rng(0))
    assert fw.state(model)[COUNTER] == 1
    for k, v in fw.state(ema.module).items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed without an update")
    # Frozen for good: switching the copy to training mode does not make it trainable.
    ema.module.train()
    assert fw.all_frozen(ema.module)


def test_updates_follow_the_recursion(fw) -> None:
    """Three updates give ``v = d_n v + (1 - d_n) w_n`` on every float entry; the counter is kept."""
    rng = np.random.default_rng(1)
    model = fw.small_model()
    # A short ramp keeps the decay far from 0, so the average differs visibly from the model.
    ema = fw.ModelEMA(model, decay=0.9999, warmups=2)
    created = fw.state(model)
    expected = _floats(created)

    for n in range(1, 4):
        fw.train_step(model, rng)
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-n / 2))
        current = _floats(fw.state(model))
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * current[k]
    assert ema.updates == 3

    averaged = fw.state(ema.module)
    model_state = fw.state(model)
    assert set(expected) == FLOAT_KEYS
    for k, v in expected.items():
        assert averaged[k].dtype == np.float32, k
        np.testing.assert_allclose(averaged[k], v, rtol=1e-6, atol=1e-7, err_msg=f"EMA of {k}")
        assert not np.allclose(averaged[k], model_state[k]), f"{k} merely copies the model"
    assert model_state[COUNTER] == 3
    assert averaged[COUNTER].dtype == np.int64
    np.testing.assert_array_equal(averaged[COUNTER], created[COUNTER])


def test_state_dict_round_trip(fw) -> None:
    """state_dict/load_state_dict restore the average and updates; warmups stays the constructor's."""
    rng = np.random.default_rng(2)
    model = fw.small_model()
    ema = fw.ModelEMA(model, warmups=10)
    for _ in range(2):
        fw.train_step(model, rng)
        ema.update(model)
    state = ema.state_dict()
    assert set(state) == {"module", "updates", "warmups"}
    assert (state["updates"], state["warmups"]) == (2, 10)

    # As officially, warmups comes from the constructor, updates from the state.
    restored = fw.ModelEMA(fw.small_model(), warmups=30)
    restored.load_state_dict(state)
    assert (restored.updates, restored.warmups) == (2, 30)
    saved = fw.state(ema.module)
    for k, v in saved.items():
        np.testing.assert_array_equal(fw.state(restored.module)[k], v, err_msg=k)

    # The restored average holds its own values, not the source's.
    fw.train_step(model, rng)
    ema.update(model)
    for k, v in saved.items():
        np.testing.assert_array_equal(fw.state(restored.module)[k], v, err_msg=f"{k} aliases the source")


def test_load_state_without_module_raises(fw) -> None:
    """A state without 'module' is rejected."""
    with pytest.raises(ValueError, match="module"):
        fw.ModelEMA(fw.small_model()).load_state_dict({"updates": 3})


@pytest.mark.parametrize("kwargs", [{"decay": 1.5}, {"decay": -0.1}, {"warmups": 0}])
def test_invalid_settings_raise(fw, kwargs: dict) -> None:
    """A decay outside [0, 1] or a non-positive warm-up is rejected."""
    with pytest.raises(ValueError):
        fw.ModelEMA(fw.small_model(), **kwargs)


def _check_far_past_warmup_step(fw, decay: float = OFFICIAL[0]) -> None:
    """Asserts that, 20 warm-up lengths in, one update of the official EMA moves every average
    by ``(1 - d) * (w - v)`` with ``d = decay * (1 - exp(-updates / warmups))`` (rel 1e-5).

    The averages are small (|v| <= 1e-5) and the weights far from them (0.5 <= |w| <= 1.5), so
    float32 rounding of the new average stays far below 1e-5 of the step.
    """
    rng = np.random.default_rng(3)
    model = fw.small_model()
    ema = fw.build_ema(model, "r18vd")
    warmups = ema.warmups
    start = 20 * warmups

    template = fw.state(model)
    averages = {k: (rng.uniform(-1e-5, 1e-5, v.shape).astype(np.float32) if k in FLOAT_KEYS else v)
                for k, v in template.items()}
    weights = {k: ((rng.choice([-1.0, 1.0], v.shape) * rng.uniform(0.5, 1.5, v.shape)).astype(np.float32)
                   if k in FLOAT_KEYS else v)
               for k, v in template.items()}
    ema.load_state_dict({"module": fw.native_state(averages), "updates": start})
    fw.load_state(model, weights)

    before = fw.state(ema.module)
    ema.update(model)
    after = fw.state(ema.module)
    assert ema.updates == start + 1

    d = decay * (1 - math.exp(-(start + 1) / warmups))
    w, v0, v1 = _floats(weights), _floats(before), _floats(after)
    assert set(w) == FLOAT_KEYS
    for k in FLOAT_KEYS:
        np.testing.assert_allclose(v1[k] - v0[k], (1 - d) * (w[k] - v0[k]), rtol=1e-5, atol=0,
                                   err_msg=f"EMA step of {k}")
    np.testing.assert_array_equal(after[COUNTER], before[COUNTER])


def test_step_far_past_warmup(fw) -> None:
    """Past the warm-up, one update moves the average by exactly ``(1 - d) * (w - v)``."""
    _check_far_past_warmup_step(fw)


@pytest.mark.parametrize("wrong_decay", [0.999, 0.9998])
def test_step_check_rejects_a_wrong_decay(fw, monkeypatch, wrong_decay: float) -> None:
    """The far-past-warm-up check fails for an EMA whose asymptotic decay is not 0.9999."""
    def wrong_decay_fn(self, updates: int) -> float:
        return wrong_decay * (1 - math.exp(-updates / self.warmups))

    monkeypatch.setattr(fw.ModelEMA, "decay_fn", wrong_decay_fn)
    with pytest.raises(AssertionError, match="EMA step of"):
        _check_far_past_warmup_step(fw)


def _ulps(*arrays: np.ndarray, n: int) -> float:
    """``n`` float32 units in the last place of the largest magnitude in ``arrays``.

    The absolute floor of the cross-framework comparison: Jittor's CPU kernel fuses
    ``d * v + (1 - d) * w`` (FMA), so an average may round about one unit of its operands'
    magnitude away from PyTorch's, which matters only for entries near zero.
    """
    return n * float(np.spacing(np.float32(max(float(np.abs(a).max()) for a in arrays))))


def test_torch_and_jittor_agree() -> None:
    """From the same weights and the same weight changes, the two EMAs' averages and their
    per-update changes agree after each of 3 updates."""
    rng = np.random.default_rng(4)
    t_model, j_model = _Torch.small_model(), _Jittor.small_model()
    t_state = _Torch.state(t_model)
    assert {k: (v.shape, v.dtype) for k, v in _Jittor.state(j_model).items()} == \
        {k: (v.shape, v.dtype) for k, v in t_state.items()}
    _Jittor.load_state(j_model, t_state)
    t_ema = _Torch.ModelEMA(t_model, decay=0.9999, warmups=2)
    j_ema = _Jittor.ModelEMA(j_model, decay=0.9999, warmups=2)

    weights = t_state
    for n in range(1, 4):
        weights = {k: (v + rng.standard_normal(v.shape).astype(np.float32) if k in FLOAT_KEYS else v + 1)
                   for k, v in weights.items()}
        t_before, j_before = _Torch.state(t_ema.module), _Jittor.state(j_ema.module)
        for fw, model, ema in ((_Torch, t_model, t_ema), (_Jittor, j_model, j_ema)):
            fw.load_state(model, weights)
            ema.update(model)
        t_after, j_after = _Torch.state(t_ema.module), _Jittor.state(j_ema.module)
        assert t_ema.updates == j_ema.updates == n

        np.testing.assert_array_equal(j_after[COUNTER], t_after[COUNTER])
        np.testing.assert_array_equal(t_after[COUNTER], t_state[COUNTER])
        for k in FLOAT_KEYS:
            assert j_after[k].dtype == t_after[k].dtype == np.float32, k
            scale = (t_before[k], t_after[k], weights[k])
            np.testing.assert_allclose(j_after[k], t_after[k], rtol=1e-6, atol=_ulps(*scale, n=2),
                                       err_msg=f"average of {k} after update {n}")
            t_delta = t_after[k].astype(np.float64) - t_before[k]
            j_delta = j_after[k].astype(np.float64) - j_before[k]
            assert np.abs(t_delta).min() > 0, f"update {n} left {k} unchanged"
            np.testing.assert_allclose(j_delta, t_delta, rtol=1e-6, atol=_ulps(*scale, n=4),
                                       err_msg=f"change of {k} at update {n}")
