"""jittor_impl.engine.AdamW against torch.optim.AdamW, and its checkpoint state in the trainer.

torch skips a parameter whose ``grad`` is None and counts steps per parameter; the port's
AdamW must do both, where Jittor's own decays and counts every parameter every step.
"""

from __future__ import annotations

import jittor_impl  # noqa: F401  (sets Jittor's environment before jittor is imported)
import jittor as jt
import numpy as np
import pytest
import torch

from jittor_impl.engine import AdamW, gradient_probe
from jittor_impl.trainer import load_optimizer_state, optimizer_state

SHAPES = {"used": (3, 4), "sometimes": (5,), "decay_free": (2, 2)}
HYPER = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}


def _start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def _loss_weights(step: int) -> dict[str, float]:
    """How much each parameter enters the loss at ``step``: ``sometimes`` is left out of
    steps 1 and 3 (no gradient at all, as the denoising embedding on a batch without targets)."""
    return {"used": 1.0, "sometimes": 0.0 if step in (1, 3) else 0.5, "decay_free": 2.0}


def _groups(params: dict) -> list[dict]:
    return [{"params": [params["used"], params["sometimes"]], "lr": HYPER["lr"]},
            {"params": [params["decay_free"]], "lr": HYPER["lr"] / 2, "weight_decay": 0.0}]


def _torch_run(start: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    params = {n: torch.tensor(v, requires_grad=True) for n, v in start.items()}
    opt = torch.optim.AdamW(_groups(params), **HYPER)
    for step in range(steps):
        opt.zero_grad()
        loss = sum(w * (params[n] ** 3).sum() for n, w in _loss_weights(step).items() if w)
        loss.backward()
        opt.step()
    return {n: p.detach().numpy() for n, p in params.items()}


def _jittor_loss(params: dict, step: int) -> jt.Var:
    return sum(w * (params[n] ** 3).sum() for n, w in _loss_weights(step).items() if w)


def test_adamw_matches_torch_when_a_parameter_has_no_gradient() -> None:
    start = _start()
    params = {n: jt.array(v) for n, v in start.items()}
    opt = AdamW(_groups(params), **HYPER)
    for step in range(5):
        before = params["sometimes"].numpy().copy()
        opt.step(_jittor_loss(params, step))
        if step == 1:
            assert opt.param_groups[0]["reached"] == [True, False]
            assert np.array_equal(params["sometimes"].numpy(), before)
    assert [g["steps"] for g in opt.param_groups] == [[5, 3], [5]]
    expected = _torch_run(start, 5)
    for name, value in expected.items():
        np.testing.assert_allclose(params[name].numpy(), value, rtol=2e-6, atol=1e-7,
                                   err_msg=name)


def test_gradient_probe_tells_no_gradient_from_a_zero_gradient() -> None:
    a, b, c = jt.array([1.0, 2.0]), jt.array([3.0]), jt.array([0.5])
    c.name("unused")
    loss = (a * 0.0).sum() + (b * 2.0).sum()
    with gradient_probe([a, b, c]) as missing:
        jt.grad(loss, [a, b, c])
    assert missing == {2}
    assert c.name() == "unused"


def test_optimizer_state_round_trip_keeps_per_parameter_counts() -> None:
    start = _start()
    params = {n: jt.array(v) for n, v in start.items()}
    opt = AdamW(_groups(params), **HYPER)
    for step in range(4):
        opt.step(_jittor_loss(params, step))
    state = optimizer_state(opt)
    fresh = AdamW(_groups({n: jt.array(v) for n, v in start.items()}), **HYPER)
    load_optimizer_state(fresh, state, "state")
    assert [g["steps"] for g in fresh.param_groups] == [[4, 2], [4]]
    for saved, group in zip(opt.param_groups, fresh.param_groups):
        for key in ("m", "values"):
            for x, y in zip(saved[key], group[key]):
                assert np.array_equal(x.numpy(), y.numpy())
    for group in state["groups"]:
        del group["steps"]  # a checkpoint written before per-parameter counts
    load_optimizer_state(fresh, state, "old.pkl")
    assert [g["steps"] for g in fresh.param_groups] == [[4, 4], [4]]
    state["groups"][0]["steps"] = [4]
    with pytest.raises(ValueError, match="old.pkl: optimizer group 0 has 1 step counts for 2"):
        load_optimizer_state(fresh, state, "old.pkl")
