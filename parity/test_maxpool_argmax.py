"""The stem max-pool's argmax as a forced, counted decision (parity/forcing.py MaxPoolArgmax).

A crafted input has one window whose two largest elements are ``gap`` apart, in opposite
order on the two sides: torch's argmax is one, the port's the other. Within the
``train.maxpool_argmax`` band the port's gradient goes where torch's does and the decision
row counts one forced flip; beyond it the flip is unforced and the row fails.
"""

from __future__ import annotations

import types

import jittor as jt
import numpy as np
import pytest
import torch

import jittor_impl.backbone
import torch_ref.backbone
from parity.forcing import MaxPoolArgmax
from parity.tolerances import tolerance
from parity.training import row_kind

PATH = "train.maxpool_argmax."
# Window (1, 1) of a 3x3, stride-2, padding-1 pooling spans rows and columns 1..3; element
# (2, 2) lies in that window only, (2, 3) also in window (1, 2).
FIRST, SECOND = (2, 2), (2, 3)


def _inputs(gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Torch's and the port's pooled input: small positive values, and in plane (0, 1) the
    two elements of window (1, 1) at 0.5 and 0.5 + gap, torch's larger first, the port's second."""
    x = np.random.default_rng(0).uniform(0.0, 0.1, (2, 3, 7, 7)).astype(np.float32)
    torch_x, jittor_x = x.copy(), x.copy()
    torch_x[0, 1][FIRST], torch_x[0, 1][SECOND] = 0.5 + gap, 0.5
    jittor_x[0, 1][FIRST], jittor_x[0, 1][SECOND] = 0.5, 0.5 + gap
    return torch_x, jittor_x


def _pool_both(gap: float):
    """One stem pooling on each side, the argmax recorded in torch and forced in Jittor;
    returns the forcing, both outputs and both input gradients (of a random upstream)."""
    pair = types.SimpleNamespace(torch_model=torch_ref.backbone.PResNet(18, num_stages=1, return_idx=(0,)),
                                 jittor_model=jittor_impl.backbone.PResNet(18, num_stages=1, return_idx=(0,)))
    torch_x, jittor_x = _inputs(gap)
    upstream = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    ties = MaxPoolArgmax(pair)
    x_t = torch.tensor(torch_x, requires_grad=True)
    with ties.recording():
        out_t = pair.torch_model.stem_pool(x_t)
    (out_t * torch.from_numpy(upstream)).sum().backward()
    x_j = jt.array(jittor_x)
    with ties.forcing():
        out_j = pair.jittor_model.stem_pool(x_j)
        grad_j = jt.grad((out_j * jt.array(upstream)).sum(), x_j).numpy()
    return ties, out_t.detach().numpy(), out_j.numpy(), x_t.grad.numpy(), grad_j


@pytest.mark.parametrize("gap, forced", [(1e-6, True), (1e-3, False)])
def test_max_pool_argmax_is_forced_within_the_band_only(gap: float, forced: bool) -> None:
    """Within the band the port's gradient equals torch's (the window's gradient on torch's
    argmax) and the row passes with one forced flip; beyond it the port keeps its own argmax
    and the row fails on an unforced flip. The port's forward values are its own either way."""
    assert tolerance("decision", PATH).atol > 1e-6 and tolerance("decision", PATH).atol < 1e-3
    ties, out_t, out_j, grad_t, grad_j = _pool_both(gap)
    assert out_j[0, 1, 1, 1] == np.float32(0.5 + gap)  # the port's own maximum
    np.testing.assert_allclose(out_j, out_t, rtol=0, atol=2 * gap)
    assert grad_t[0, 1][FIRST] != 0 and grad_t[0, 1][SECOND] != grad_t[0, 1][FIRST]
    assert np.array_equal(grad_j, grad_t) is forced
    if not forced:  # the port's own argmax took the window's gradient
        assert grad_j[0, 1][FIRST] == 0
    [row] = ties.decisions()
    assert row.path == PATH and row_kind(row.path) == "decision"
    assert ties.flips == {row.path: 1}
    assert (row.compared, row.flipped, row.forced) == (2 * 3 * 4 * 4, 1, int(forced))
    assert row.max_abs == pytest.approx(gap, rel=5e-2)  # rounded at 0.5 in fp32
    assert row.passed is forced
    if not forced:
        assert "1 flips outside the band" in row.reason


def test_agreeing_argmax_counts_no_flip() -> None:
    """The same input on both sides: nothing flips, the port's gradient is its own (= torch's)."""
    ties, _, _, grad_t, grad_j = _pool_both(0.0)
    np.testing.assert_array_equal(grad_j, grad_t)
    [row] = ties.decisions()
    assert row.flipped == 0 and row.forced == 0 and row.passed


@pytest.mark.parametrize("gap, forced", [(1e-6, True), (1e-3, False)])
def test_a_replay_takes_the_reference_argmax_within_its_band(gap: float, forced: bool) -> None:
    """A float64 replay whose own argmax differs from the fp32 reference's: within the band it
    pools (and sends the gradient) at the reference's, and it reports the flip either way."""
    reference, own = _inputs(gap)
    x = torch.tensor(own.astype(np.float64), requires_grad=True)
    y = MaxPoolArgmax.replay(PATH, x, reference)
    y[0, 1, 1, 1].backward()  # window (1, 1)'s gradient only
    taken = FIRST if forced else SECOND
    assert y[0, 1, 1, 1].item() == own[0, 1][taken].astype(np.float64)
    assert x.grad[0, 1][taken].item() == 1 and x.grad.sum().item() == 1
    flips = MaxPoolArgmax.replay_flips(x, reference)
    assert flips.shape == (1,) and flips[0] == pytest.approx(gap, rel=5e-2)
