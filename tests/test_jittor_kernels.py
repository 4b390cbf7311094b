"""The CPU kernels of the Jittor port against torch: values and gradients.

Training-mode BatchNorm (outputs, gradients, running statistics), the per-channel affine of
eval-mode BatchNorm, ReLU, the last-axis softmax, the deformable attention, max and average
pooling, the last-axes transpose, the linear layer, the pointwise convolution, LayerNorm and
the AdamW update of ``jittor_impl._kernels``, and ``batched_matmul`` of ``jittor_impl.nn``. Both Jittor
implementations of each are checked: the CPU kernels and the composition of Jittor ops that
CUDA runs, on shapes with odd sizes, a single image, a 1x1 map, masked softmax rows, tied
and NaN pooling windows.
"""

from __future__ import annotations

import jittor_impl  # sets Jittor up before it is imported
import jittor as jt
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jittor_impl._kernels import (_adamw_update_ops, _batch_norm_train_ops, _layer_norm_ops,
                                  adamw_hyperparameters, adamw_update, avg_pool2d, batch_norm_train,
                                  batched_sgemm, channel_affine, conv1x1, layer_norm, linear, max_pool2d,
                                  relu, softmax_last, swap_last_axes)
from jittor_impl.nn import AvgPool2d, BatchNorm2d, Conv2d, LayerNorm, Linear, ReLU, batched_matmul

SHAPES = [(2, 8, 5, 7), (1, 3, 1, 2), (3, 16, 33, 17), (2, 4, 1, 1)]
IMPLEMENTATIONS = {"kernel": batch_norm_train, "ops": _batch_norm_train_ops}
# Error allowed against the float64 result, relative to its largest magnitude: (times torch's
# own float32 error, floor).
TOLERANCES = {
    # float64 sums: measured at most 1.2x torch's error on these shapes.
    "kernel": (2.0, 1e-7),
    # Jittor's derived gradients sum each axis with one running float32 sum: measured up to
    # 5x torch's error (grad_bias, 1683 terms per channel).
    "ops": (8.0, 1e-6),
}


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
    weight = rng.standard_normal(shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    grad_y = rng.standard_normal(shape).astype(np.float32)
    return x, weight, bias, grad_y


def _torch_reference(x, weight, bias, grad_y, dtype) -> dict[str, np.ndarray]:
    xt, wt, bt = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, weight, bias))
    y = F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    (y * torch.tensor(grad_y, dtype=dtype)).sum().backward()
    mean = xt.detach().mean(dim=(0, 2, 3))
    var = xt.detach().var(dim=(0, 2, 3), unbiased=False)
    return {"y": y.detach().numpy(), "mean": mean.numpy(), "var": var.numpy(),
            "grad_x": xt.grad.numpy(), "grad_weight": wt.grad.numpy(), "grad_bias": bt.grad.numpy()}


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_train_matches_torch(impl: str, shape: tuple[int, ...]) -> None:
    x, weight, bias, grad_y = _inputs(shape)
    xj, wj, bj = jt.array(x), jt.array(weight), jt.array(bias)
    y, mean, var = IMPLEMENTATIONS[impl](xj, wj, bj, 1e-5)
    grads = jt.grad((y * jt.array(grad_y)).sum(), [xj, wj, bj])
    got = {"y": y, "mean": mean, "var": var, "grad_x": grads[0], "grad_weight": grads[1],
           "grad_bias": grads[2]}
    got = {k: v.numpy() for k, v in got.items()}
    fp32 = _torch_reference(x, weight, bias, grad_y, torch.float32)
    fp64 = _torch_reference(x, weight, bias, grad_y, torch.float64)
    for key, ref in fp64.items():
        assert got[key].shape == ref.shape, key
        scale = max(float(np.abs(ref).max()), 1.0)
        err = float(np.abs(got[key] - ref).max()) / scale
        torch_err = float(np.abs(fp32[key] - ref).max()) / scale
        factor, floor = TOLERANCES[impl]
        assert err <= max(factor * torch_err, floor), f"{impl} {key}: {err:.2e} (torch {torch_err:.2e})"


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_statistics_carry_no_gradient(impl: str) -> None:
    x, weight, bias, _ = _inputs((2, 3, 4, 4))
    xj = jt.array(x)
    _, mean, var = IMPLEMENTATIONS[impl](xj, jt.array(weight), jt.array(bias), 1e-5)
    assert not jt.grad((mean * mean).sum() + var.sum(), xj).numpy().any()


def test_module_running_statistics_match_torch_over_steps() -> None:
    shape = (2, 6, 9, 5)
    ours, ref = BatchNorm2d(shape[1], momentum=0.1), torch.nn.BatchNorm2d(shape[1], momentum=0.1)
    for step in range(3):
        x, _, _, _ = _inputs(shape, seed=step)
        ours(jt.array(x)).sync()
        ref(torch.from_numpy(x))
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(ref, name).numpy(),
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    assert int(ours.num_batches_tracked.numpy()[0]) == int(ref.num_batches_tracked) == 3


def test_frozen_scale_still_gives_the_input_gradient() -> None:
    x, weight, bias, grad_y = _inputs((2, 5, 6, 3))
    xj, wj, bj = jt.array(x), jt.array(weight).stop_grad(), jt.array(bias).stop_grad()
    y, _, _ = batch_norm_train(xj, wj, bj, 1e-5)
    grad_x = jt.grad((y * jt.array(grad_y)).sum(), xj).numpy()
    ref = _torch_reference(x, weight, bias, grad_y, torch.float64)["grad_x"]
    np.testing.assert_allclose(grad_x, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, error, message", [
    (((2, 3, 4), (3,), "float32"), ValueError, "expects \\[bs, c, h, w\\], got shape \\[2, 3, 4\\]"),
    (((2, 3, 4, 4), (4,), "float32"), ValueError, "weight has shape \\[4\\], expected \\[3\\]"),
    (((2, 3, 4, 4), (3,), "float64"), TypeError, "x is float64, expected float32"),
], ids=["3d", "weight-shape", "float64"])
def test_bad_input_is_refused_clearly(args, error, message) -> None:
    x_shape, w_shape, dtype = args
    x = jt.zeros(x_shape, dtype)
    with pytest.raises(error, match=message):
        batch_norm_train(x, jt.ones(w_shape), jt.zeros(w_shape), 1e-5)


def test_single_value_per_channel_is_refused_in_training() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm2d(3)(jt.zeros((1, 3, 1, 1)))


def _relative_errors(got: np.ndarray, fp32: np.ndarray, fp64: np.ndarray) -> tuple[float, float]:
    """Max abs error of ``got`` and of torch's float32 result against float64, over its scale."""
    scale = max(float(np.abs(fp64).max()), 1.0)
    return (float(np.abs(got - fp64).max()) / scale, float(np.abs(fp32 - fp64).max()) / scale)


RELU = {"kernel": relu, "ops": jt.nn.relu}


@pytest.mark.parametrize("impl", sorted(RELU))
def test_relu_matches_torch_exactly(impl: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 7, 9)).astype(np.float32)
    x[0, 0, 0, :4] = 0.0  # the kink: output 0, gradient 0 in torch
    grad_y = rng.standard_normal(x.shape).astype(np.float32)
    xj = jt.array(x)
    y = RELU[impl](xj)
    grad_x = jt.grad((y * jt.array(grad_y)).sum(), xj)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.relu(xt)
    (yt * torch.from_numpy(grad_y)).sum().backward()
    np.testing.assert_array_equal(y.numpy(), yt.detach().numpy())
    np.testing.assert_array_equal(grad_x.numpy(), xt.grad.numpy())


def test_relu_module_is_jittors_relu_computed_by_the_kernel() -> None:
    module = ReLU()
    assert isinstance(module, jt.nn.ReLU)  # the harness finds ReLUs by Jittor's class
    x = jt.array(np.linspace(-2, 2, 11, dtype=np.float32))
    np.testing.assert_array_equal(module(x).numpy(), np.maximum(x.numpy(), 0))


SOFTMAX = {"kernel": softmax_last, "ops": lambda x: jt.nn.softmax(x, dim=-1)}
# Error allowed against float64, relative to the largest magnitude: (times torch's float32
# error, floor).
SOFTMAX_TOLERANCES = {
    # float64 row sums: measured at most 0.5x torch's error.
    "kernel": (1.0, 1e-7),
    # Jittor's nn.softmax: measured 9x torch's error on rows of 400 (the r18vd encoder's
    # attention at 640).
    "ops": (12.0, 1e-7),
}


@pytest.mark.parametrize("impl", sorted(SOFTMAX))
@pytest.mark.parametrize("shape", [(2, 8, 30, 400), (4, 16), (5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_softmax_last_matches_torch(impl: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    grad_y = rng.standard_normal(shape).astype(np.float32)
    xj = jt.array(x)
    y = SOFTMAX[impl](xj)
    grad_x = jt.grad((y * jt.array(grad_y)).sum(), xj)
    ref = {}
    for dtype in (torch.float32, torch.float64):
        xt = torch.tensor(x, dtype=dtype, requires_grad=True)
        yt = torch.softmax(xt, dim=-1)
        (yt * torch.tensor(grad_y, dtype=dtype)).sum().backward()
        ref[dtype] = (yt.detach().numpy(), xt.grad.numpy())
    factor, floor = SOFTMAX_TOLERANCES[impl]
    for i, (name, got) in enumerate((("y", y), ("grad_x", grad_x))):
        err, torch_err = _relative_errors(got.numpy(), ref[torch.float32][i], ref[torch.float64][i])
        assert err <= max(factor * torch_err, floor), f"{impl} {name}: {err:.2e} (torch {torch_err:.2e})"


@pytest.mark.parametrize("impl", sorted(SOFTMAX))
def test_softmax_last_masks_minus_infinity_like_torch(impl: str) -> None:
    x = np.array([[1.0, -np.inf, 2.0, -np.inf], [-np.inf] * 4, [0.5, 0.5, -np.inf, 3.0]],
                 dtype=np.float32)
    got = SOFTMAX[impl](jt.array(x)).numpy()
    ref = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    assert np.isnan(got[1]).all() and np.isnan(ref[1]).all()  # a fully masked row
    np.testing.assert_allclose(got[[0, 2]], ref[[0, 2]], rtol=1e-6, atol=0)
    assert (got[0, [1, 3]] == 0).all() and got[2, 2] == 0


@pytest.mark.parametrize("call, error, message", [
    (lambda: relu(jt.zeros((2, 3), "float64")), TypeError, "relu: x is float64, expected float32"),
    (lambda: softmax_last(jt.zeros((2, 0))), ValueError, "non-empty last axis, got shape \\[2, 0\\]"),
    (lambda: softmax_last(jt.zeros((2, 3), "int32")), TypeError, "x is int32, expected float32"),
    (lambda: channel_affine(jt.zeros((2, 3, 4, 4)), jt.ones((3,)), jt.zeros((2,))), ValueError,
     "shift has shape \\[2\\], expected \\[3\\]"),
], ids=["relu-float64", "softmax-empty", "softmax-int", "affine-shift-shape"])
def test_bad_kernel_input_is_refused_clearly(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("products", ["kernel", "slices"])
@pytest.mark.parametrize("transpose_b", [False, True], ids=["b", "b^T"])
@pytest.mark.parametrize("shapes", [((3, 5, 4), (3, 4, 6)), ((16, 40, 8), (16, 8, 40)), ((1, 1, 3), (1, 3, 1))],
                         ids=["small", "heads", "vector"])
def test_batched_matmul_and_its_gradients_match_torch(shapes, transpose_b, products, monkeypatch) -> None:
    if products == "slices":  # the form used where oneDNN's sgemm is not loaded
        import jittor_impl._kernels as kernels

        monkeypatch.setattr(kernels, "has_dnnl_sgemm", lambda: False)
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    if transpose_b:
        b = np.ascontiguousarray(b.transpose(0, 2, 1))
    grad_out = rng.standard_normal((shapes[0][0], shapes[0][1], shapes[1][2])).astype(np.float32)
    aj, bj = jt.array(a), jt.array(b)
    out = batched_matmul(aj, bj, transpose_b=transpose_b)
    grad_a, grad_b = jt.grad((out * jt.array(grad_out)).sum(), [aj, bj])
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    out_t = torch.bmm(at, bt.transpose(1, 2) if transpose_b else bt)
    (out_t * torch.from_numpy(grad_out)).sum().backward()
    for name, got, ref in (("out", out, out_t.detach()), ("grad_a", grad_a, at.grad), ("grad_b", grad_b, bt.grad)):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_batched_sgemm_equals_jittors_2d_products_bit_for_bit() -> None:
    rng = np.random.default_rng(14)
    a = jt.array(rng.standard_normal((4, 33, 17)).astype(np.float32))
    b = jt.array(rng.standard_normal((4, 17, 29)).astype(np.float32))
    expected = np.stack([jt.matmul(a[i], b[i]).numpy() for i in range(4)])
    np.testing.assert_array_equal(batched_sgemm(a, b).numpy(), expected)
    a_t, b_t = (jt.array(np.ascontiguousarray(v.numpy().transpose(0, 2, 1))) for v in (a, b))
    np.testing.assert_array_equal(batched_sgemm(a_t, b_t, True, True).numpy(), expected)


@pytest.mark.parametrize("call, message", [
    (lambda: batched_sgemm(jt.zeros((2, 3, 4)), jt.zeros((2, 3, 4))), "do not multiply"),
    (lambda: batched_sgemm(jt.zeros((2, 3, 4)), jt.zeros((3, 4, 5))), "do not multiply"),
    (lambda: batched_sgemm(jt.zeros((3, 4)), jt.zeros((4, 5))), "expects 3-D operands"),
], ids=["inner", "batch", "rank"])
def test_batched_sgemm_refuses_mismatched_shapes(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _deformable_inputs(seed: int = 4):
    """Two levels of different sizes; a fifth of the points fall outside their map."""
    rng = np.random.default_rng(seed)
    shapes = [(6, 9), (3, 4)]
    bs, len_q, n_head, head_dim, n_points = 2, 7, 3, 5, 4
    len_v = sum(h * w for h, w in shapes)
    value = rng.standard_normal((bs, len_v, n_head, head_dim)).astype(np.float32)
    locations = rng.uniform(-0.15, 1.15, (bs, len_q, n_head, len(shapes), n_points, 2)).astype(np.float32)
    weights = rng.uniform(0, 1, (bs, len_q, n_head, len(shapes), n_points)).astype(np.float32)
    grad_out = rng.standard_normal((bs, len_q, n_head * head_dim)).astype(np.float32)
    return shapes, value, locations, weights, grad_out


def test_ms_deform_attn_matches_the_ops_form_and_torch() -> None:
    from jittor_impl.decoder import deformable_attention_core_func as jittor_ops
    from jittor_impl._kernels import ms_deform_attn
    from torch_ref.decoder import deformable_attention_core_func as torch_ops

    shapes, value, locations, weights, grad_out = _deformable_inputs()
    results = {}
    for name, fn in (("kernel", ms_deform_attn), ("ops", jittor_ops)):
        args = [jt.array(a) for a in (value, locations, weights)]
        out = fn(args[0], shapes, args[1], args[2])
        grads = jt.grad((out * jt.array(grad_out)).sum(), args)
        results[name] = [out.numpy()] + [g.numpy() for g in grads]
    for dtype in (torch.float32, torch.float64):
        args = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (value, locations, weights)]
        out = torch_ops(args[0], shapes, args[1], args[2])
        (out * torch.tensor(grad_out, dtype=dtype)).sum().backward()
        results[dtype] = [out.detach().numpy()] + [a.grad.numpy() for a in args]
    for i, what in enumerate(("output", "grad_value", "grad_locations", "grad_weights")):
        ref = results[torch.float64][i]
        scale = float(np.abs(ref).max())
        torch_err = float(np.abs(results[torch.float32][i] - ref).max()) / scale
        for name in ("kernel", "ops"):
            err = float(np.abs(results[name][i] - ref).max()) / scale
            # float32 sums in another order than torch's: measured at most 1.2x its error.
            assert err <= max(2 * torch_err, 1e-7), f"{name} {what}: {err:.2e} (torch {torch_err:.2e})"
    assert np.abs(results["kernel"][2]).max() > 0  # the locations do get a gradient


def test_ms_deform_attn_refuses_mismatched_shapes() -> None:
    from jittor_impl._kernels import ms_deform_attn

    shapes, value, locations, weights, _ = _deformable_inputs()
    with pytest.raises(ValueError, match="do not fit"):
        ms_deform_attn(jt.array(value), [(6, 9), (3, 3)], jt.array(locations), jt.array(weights))
    with pytest.raises(ValueError, match="do not fit"):
        ms_deform_attn(jt.array(value), shapes, jt.array(locations), jt.array(weights[..., :3]))


def _own_cells(locations: np.ndarray, shapes) -> np.ndarray:
    """``floor`` of each point's pixel coordinate, as torch's ``grid_sample`` computes it."""
    sizes = np.array([[w, h] for h, w in shapes], np.float32).reshape(1, 1, 1, len(shapes), 1, 2)
    pos = ((np.float32(2) * locations - np.float32(1) + np.float32(1)) * sizes - np.float32(1)) / np.float32(2)
    return np.floor(pos).astype(np.int32)


def test_forced_cells_move_only_the_location_gradient_of_an_edge_point() -> None:
    from jittor_impl._kernels import ms_deform_attn
    from jittor_impl.decoder import deformable_attention_core_func as jittor_ops

    shapes, value, locations, weights, grad_out = _deformable_inputs()
    # Point (0, 0, 0, level 0, point 0): x = 3 + 2e-4 px, just inside cell column 3.
    locations[0, 0, 0, 0, 0, 0] = (3 + 2e-4 + 0.5) / shapes[0][1]
    own = _own_cells(locations, shapes)
    assert own[0, 0, 0, 0, 0, 0] == 3
    other = own.copy()
    other[0, 0, 0, 0, 0, 0] = 2  # the cell on the other side of the edge

    def run(fn, cells):
        args = [jt.array(a) for a in (value, locations, weights)]
        out = fn(args[0], shapes, args[1], args[2], None if cells is None else jt.array(cells))
        grads = jt.grad((out * jt.array(grad_out)).sum(), args)
        return [out.numpy()] + [g.numpy() for g in grads]

    plain, with_own, forced = run(ms_deform_attn, None), run(ms_deform_attn, own), run(ms_deform_attn, other)
    for a, b in zip(plain, with_own):
        # The own cells change nothing but the compiler's rounding (another kernel build).
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(forced[0], plain[0], rtol=0, atol=1e-3)  # continuous at the edge
    change = np.abs(forced[2] - plain[2])
    jump = float(change[0, 0, 0, 0, 0, 0])
    assert jump > 1.0  # that x's gradient takes the other cell's slope (measured 16.4)
    change[0, 0, 0, 0, 0, 0] = 0
    assert change.max() < 0.01 * jump  # the rest moves by the 2e-4 px overlap only
    for got, ref in zip(forced, run(jittor_ops, other)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # the ops form forces alike


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_channel_affine_and_its_gradients_match_torch(shape: tuple[int, ...]) -> None:
    x, scale, shift, grad_y = _inputs(shape, seed=7)
    xj, sj, bj = jt.array(x), jt.array(scale), jt.array(shift)
    y = channel_affine(xj, sj, bj)
    grads = jt.grad((y * jt.array(grad_y)).sum(), [xj, sj, bj])
    ref = {}
    for dtype in (torch.float32, torch.float64):
        xt, st, bt = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, scale, shift))
        yt = xt * st.reshape(1, -1, 1, 1) + bt.reshape(1, -1, 1, 1)
        (yt * torch.tensor(grad_y, dtype=dtype)).sum().backward()
        ref[dtype] = [yt.detach().numpy(), xt.grad.numpy(), st.grad.numpy(), bt.grad.numpy()]
    for i, got in enumerate([y] + list(grads)):
        err, torch_err = _relative_errors(got.numpy(), ref[torch.float32][i], ref[torch.float64][i])
        # One product and sum per element, float64 sums: measured within torch's own error.
        assert err <= max(2 * torch_err, 1e-7), f"output {i}: {err:.2e} (torch {torch_err:.2e})"


def test_channel_affine_with_frozen_scale_and_shift_gives_the_input_gradient() -> None:
    x, scale, shift, grad_y = _inputs((2, 5, 6, 3), seed=9)
    xj = jt.array(x)
    y = channel_affine(xj, jt.array(scale).stop_grad(), jt.array(shift).stop_grad())
    grad_x = jt.grad((y * jt.array(grad_y)).sum(), xj).numpy()
    np.testing.assert_allclose(grad_x, grad_y * scale.reshape(1, -1, 1, 1), rtol=1e-6, atol=0)


def test_eval_and_frozen_batchnorm_use_the_running_statistics() -> None:
    from jittor_impl.backbone import FrozenBatchNorm2d

    x, weight, bias, _ = _inputs((2, 6, 5, 4), seed=8)
    mean = np.linspace(-1, 1, 6).astype(np.float32)
    var = np.linspace(0.5, 2, 6).astype(np.float32)
    expected = (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var.reshape(1, -1, 1, 1) + 1e-5)
    expected = expected * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    for module in (BatchNorm2d(6), FrozenBatchNorm2d(6)):
        for name, v in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            getattr(module, name).update(jt.array(v))
        module.eval()
        np.testing.assert_allclose(module(jt.array(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


# (kind, input shape, kernel_size, stride, padding, ceil_mode, count_include_pad): the model's
# stem max pooling and 'd' shortcut average pooling, odd sizes, rectangular windows, a map no
# larger than the window (torch pools it, Jittor's own pooling refuses it), padding counted
# in or out of the divisor.
POOLS = [
    ("max", (2, 3, 9, 9), 3, 2, 1, False, True),
    ("max", (2, 3, 10, 7), 3, 2, 1, True, True),
    ("max", (1, 2, 3, 3), 3, 1, 1, False, True),
    ("max", (1, 2, 5, 6), (3, 2), (2, 1), (1, 0), True, True),
    ("avg", (2, 3, 10, 10), 2, 2, 0, True, True),
    ("avg", (2, 3, 9, 7), 2, 2, 0, True, True),
    ("avg", (1, 2, 2, 2), 2, 2, 0, True, True),
    ("avg", (2, 3, 9, 7), 3, 2, 1, True, True),
    ("avg", (2, 3, 9, 7), 3, 2, 1, True, False),
]


def _torch_pool(kind, xt, kernel, stride, padding, ceil, count_pad):
    if kind == "max":
        return F.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil)
    return F.avg_pool2d(xt, kernel, stride, padding, ceil_mode=ceil, count_include_pad=count_pad)


def _jittor_pool(kind, xj, kernel, stride, padding, ceil, count_pad):
    if kind == "max":
        return max_pool2d(xj, kernel, stride, padding, ceil)
    return avg_pool2d(xj, kernel, stride, padding, ceil, count_pad)


@pytest.mark.parametrize("kind, shape, kernel, stride, padding, ceil, count_pad", POOLS,
                         ids=[f"{p[0]}-{'x'.join(map(str, p[1]))}-k{p[2]}-p{p[4]}-c{int(p[6])}" for p in POOLS])
def test_pooling_and_its_gradient_match_torch(kind, shape, kernel, stride, padding, ceil, count_pad) -> None:
    rng = np.random.default_rng(10)
    # After a ReLU most windows of the stem hold ties at zero: the gradient goes to the first.
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = _torch_pool(kind, xt, kernel, stride, padding, ceil, count_pad)
    grad_y = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.from_numpy(grad_y))
    xj = jt.array(x)
    y = _jittor_pool(kind, xj, kernel, stride, padding, ceil, count_pad)
    grad_x = jt.grad((y * jt.array(grad_y)).sum(), xj)
    assert y.shape == tuple(yt.shape)
    if kind == "max":  # a selection: exact
        np.testing.assert_array_equal(y.numpy(), yt.detach().numpy())
        np.testing.assert_array_equal(grad_x.numpy(), xt.grad.numpy())
    else:  # a float sum of at most 9 terms and a division
        np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad_x.numpy(), xt.grad.numpy(), rtol=1e-6, atol=1e-7)


def test_the_model_pooling_matches_jittors_own_where_it_applies() -> None:
    """The CUDA path (Jittor's pooling) and the kernels agree on the model's two poolings."""
    rng = np.random.default_rng(11)
    x = jt.array(np.maximum(rng.standard_normal((2, 4, 11, 12)), 0).astype(np.float32))
    np.testing.assert_array_equal(max_pool2d(x, 3, 2, 1).numpy(), jt.nn.max_pool2d(x, 3, 2, 1).numpy())
    np.testing.assert_allclose(AvgPool2d(2, 2, 0, ceil_mode=True)(x).numpy(),
                               jt.nn.AvgPool2d(2, 2, 0, ceil_mode=True)(x).numpy(), rtol=1e-6)


def test_max_pooling_propagates_nan_like_torch() -> None:
    x = np.arange(2 * 49, dtype=np.float32).reshape(1, 2, 7, 7) % 5
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 4, 4] = x[0, 1, 4, 5] = np.nan  # the later NaN of a window takes the gradient
    xt = torch.tensor(x, requires_grad=True)
    yt = F.max_pool2d(xt, 3, 2, 1)
    yt.sum().backward()
    xj = jt.array(x)
    y = max_pool2d(xj, 3, 2, 1)
    grad_x = jt.grad(y.sum(), xj)
    np.testing.assert_array_equal(y.numpy(), yt.detach().numpy())  # NaN where torch has NaN
    np.testing.assert_array_equal(grad_x.numpy(), xt.grad.numpy())


@pytest.mark.parametrize("call, error, message", [
    (lambda: max_pool2d(jt.zeros((2, 3, 4)), 2), ValueError, "expects \\[bs, c, h, w\\], got shape \\[2, 3, 4\\]"),
    (lambda: max_pool2d(jt.zeros((1, 1, 4, 4), "float64"), 2), TypeError, "x is float64, expected float32"),
    (lambda: max_pool2d(jt.zeros((1, 1, 4, 4)), 3, 1, 2), ValueError, "padding \\(2, 2\\) must be at most half"),
    (lambda: avg_pool2d(jt.zeros((1, 1, 2, 2)), 3), ValueError, "output would be empty"),
    (lambda: avg_pool2d(jt.zeros((1, 1, 4, 4)), 0), ValueError, "must be positive"),
    (lambda: avg_pool2d(jt.zeros((1, 1, 4, 4)), (2, 2, 2)), ValueError, "kernel_size must be an int or a pair"),
], ids=["3d", "float64", "padding", "empty", "zero-kernel", "triple"])
def test_bad_pooling_input_is_refused_clearly(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_avg_pool_module_keeps_torchs_attributes() -> None:
    module = AvgPool2d(2, ceil_mode=True)
    reference = torch.nn.AvgPool2d(2, ceil_mode=True)
    for name in ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"):
        assert getattr(module, name) == getattr(reference, name), name


@pytest.mark.parametrize("shape", [(2, 256, 100), (1, 33, 65), (3, 1, 7), (2, 64, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swap_last_axes_and_its_gradient_are_exact(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape).astype(np.float32)
    grad_y = rng.standard_normal((shape[0], shape[2], shape[1])).astype(np.float32)
    xj = jt.array(x)
    y = swap_last_axes(xj)
    grad_x = jt.grad((y * jt.array(grad_y)).sum(), xj)
    np.testing.assert_array_equal(y.numpy(), x.transpose(0, 2, 1))
    np.testing.assert_array_equal(grad_x.numpy(), grad_y.transpose(0, 2, 1))


def test_swap_last_axes_refuses_other_ranks() -> None:
    with pytest.raises(ValueError, match="expects \\[b, m, n\\], got shape \\[4, 5\\]"):
        swap_last_axes(jt.zeros((4, 5)))


ADAMW = {"kernel": adamw_update, "ops": _adamw_update_ops}


@pytest.mark.parametrize("impl", sorted(ADAMW))
@pytest.mark.parametrize("step", [1, 7])
def test_adamw_update_matches_torchs_single_tensor_adamw(impl: str, step: int) -> None:
    rng = np.random.default_rng(13)
    shape = (3, 37, 5)
    param, grad, exp_avg = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    exp_avg_sq = rng.uniform(0, 2, shape).astype(np.float32)
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4}
    pt = torch.tensor(param)
    opt = torch.optim.AdamW([pt], foreach=False, **hyper)
    pt.grad = torch.from_numpy(grad)
    opt.state[pt] = {"step": torch.tensor(float(step - 1)), "exp_avg": torch.tensor(exp_avg),
                     "exp_avg_sq": torch.tensor(exp_avg_sq)}
    opt.step()
    h = adamw_hyperparameters(hyper["lr"], hyper["weight_decay"], hyper["betas"], hyper["eps"], step)
    got = ADAMW[impl](*(jt.array(a) for a in (param, grad, exp_avg, exp_avg_sq)), h)
    expected = (pt, opt.state[pt]["exp_avg"], opt.state[pt]["exp_avg_sq"])
    for name, g, e in zip(("param", "exp_avg", "exp_avg_sq"), got, expected):
        # The same float32 formulas; fused multiply-adds may round the last bit differently.
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=2e-7, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("call, error, message", [
    (lambda: adamw_update(jt.zeros((2, 3)), jt.zeros((3, 2)), jt.zeros((2, 3)), jt.zeros((2, 3)),
                          jt.zeros((7,))), ValueError, "must share one shape"),
    (lambda: adamw_update(*(jt.zeros((2,)),) * 4, jt.zeros((6,))), ValueError, "hyper be \\[7\\]"),
    (lambda: adamw_update(jt.zeros((2,), "float64"), *(jt.zeros((2,)),) * 3, jt.zeros((7,))),
     TypeError, "param is float64"),
    (lambda: adamw_hyperparameters(1e-3, 0.0, (0.9, 0.999), 1e-8, 0), ValueError, "step 0 must be at least 1"),
], ids=["shapes", "hyper", "float64", "step"])
def test_bad_adamw_input_is_refused_clearly(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def _assert_close_to_float64(jittor_fn, torch_fn, arrays: list, grad_y: np.ndarray,
                             names: list, factor: float, floor: float, label: str = "") -> None:
    """Output and input gradients of ``jittor_fn`` against float64 torch, within ``factor``
    times torch's own float32 error (or ``floor``), relative to the largest magnitude."""
    args = [jt.array(a) for a in arrays]
    y = jittor_fn(*args)
    got = [y] + list(jt.grad((y * jt.array(grad_y)).sum(), args))
    ref = {}
    for dtype in (torch.float32, torch.float64):
        targs = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in arrays]
        yt = torch_fn(*targs)
        (yt * torch.tensor(grad_y, dtype=dtype)).sum().backward()
        ref[dtype] = [yt.detach().numpy()] + [t.grad.numpy() for t in targs]
    for i, name in enumerate(names):
        assert got[i].shape == ref[torch.float64][i].shape, name
        err, torch_err = _relative_errors(got[i].numpy(), ref[torch.float32][i], ref[torch.float64][i])
        assert err <= max(factor * torch_err, floor), f"{label} {name}: {err:.2e} (torch {torch_err:.2e})"


LINEAR = {"kernel": linear, "ops": jt.nn.linear}


@pytest.mark.parametrize("impl", sorted(LINEAR))
@pytest.mark.parametrize("x_shape, out_features, bias", [
    ((2, 300, 64), 96, True),  # a decoder projection, 600 rows
    ((70, 5), 3, True),  # more rows than one block of the bias gradient's sums
    ((2, 3, 4, 5), 6, True),
    ((5, 7), 3, False),
], ids=["tokens", "rows", "4d", "no-bias"])
def test_linear_and_its_gradients_match_torch(impl, x_shape, out_features, bias) -> None:
    rng = np.random.default_rng(15)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((out_features, x_shape[-1])) * 0.3).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32)
    grad_y = rng.standard_normal((*x_shape[:-1], out_features)).astype(np.float32)
    arrays = [x, w] + ([b] if bias else [])
    # oneDNN's sgemm like Jittor's matmul, the bias gradient summed in float64 (Jittor's own:
    # one float32 running sum, measured 3.7e-6 over 16800 rows).
    _assert_close_to_float64(LINEAR[impl], F.linear, arrays, grad_y,
                             ["y", "grad_x", "grad_weight", "grad_bias"][:len(arrays) + 1], 4.0, 1e-6, impl)


def test_linear_module_is_jittors_linear_computed_by_the_kernel() -> None:
    module = Linear(5, 3)
    assert isinstance(module, jt.nn.Linear)
    assert sorted(module.state_dict()) == ["bias", "weight"]
    x = jt.array(np.random.default_rng(16).standard_normal((4, 5)).astype(np.float32))
    np.testing.assert_allclose(module(x).numpy(), jt.nn.Linear.execute(module, x).numpy(), rtol=1e-6, atol=1e-6)


def test_linear_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="input \\[4, 5\\], weight \\[3, 6\\] and bias None do not fit"):
        linear(jt.zeros((4, 5)), jt.zeros((3, 6)))
    with pytest.raises(ValueError, match="bias \\[4\\] do not fit"):
        linear(jt.zeros((4, 5)), jt.zeros((3, 5)), jt.zeros((4,)))


LAYER_NORM = {"kernel": layer_norm, "ops": _layer_norm_ops}
# Error allowed against float64, relative to the largest magnitude: (times torch's float32
# error, floor).
LAYER_NORM_TOLERANCES = {
    # float64 row statistics and parameter sums: measured at most 0.9x torch's error.
    "kernel": (1.5, 2e-7),
    # Jittor's single float32 running sums: measured up to 3.2x torch's error (the
    # parameter gradients over 16800 rows).
    "ops": (5.0, 1e-6),
}


@pytest.mark.parametrize("impl", sorted(LAYER_NORM))
@pytest.mark.parametrize("shape", [(2, 300, 256), (70, 4), (3, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_and_its_gradients_match_torch(impl: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(17)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)  # a mean far from zero
    weight, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    grad_y = rng.standard_normal(shape).astype(np.float32)
    factor, floor = LAYER_NORM_TOLERANCES[impl]
    _assert_close_to_float64(lambda *a: LAYER_NORM[impl](*a, 1e-5),
                             lambda xt, wt, bt: F.layer_norm(xt, (shape[-1],), wt, bt, 1e-5),
                             [x, weight, bias], grad_y, ["y", "grad_x", "grad_weight", "grad_bias"],
                             factor, floor, impl)


@pytest.mark.parametrize("normalized_shape, affine", [(6, True), ((4, 6), True), ((4, 6), False)],
                         ids=["1d", "2d", "2d-no-affine"])
def test_layer_norm_module_matches_torchs(normalized_shape, affine) -> None:
    rng = np.random.default_rng(18)
    module, reference = LayerNorm(normalized_shape, elementwise_affine=affine), torch.nn.LayerNorm(
        normalized_shape, elementwise_affine=affine)
    if affine:
        for name in ("weight", "bias"):
            value = rng.standard_normal(reference.weight.shape).astype(np.float32)
            getattr(module, name).update(jt.array(value))
            getattr(reference, name).data = torch.from_numpy(value)
    x = rng.standard_normal((3, 4, 6)).astype(np.float32)
    expected = reference(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(module(jt.array(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_layer_norm_refuses_a_mismatched_shape() -> None:
    with pytest.raises(ValueError, match="input \\[3, 5\\] does not end in \\[4\\]"):
        LayerNorm(4)(jt.zeros((3, 5)))
    with pytest.raises(ValueError, match="weight \\[3\\] and bias \\[4\\] do not fit"):
        layer_norm(jt.zeros((2, 4)), jt.ones((3,)), jt.zeros((4,)), 1e-5)


@pytest.mark.parametrize("x_shape, out_channels, bias", [
    ((2, 32, 9, 11), 16, False),  # the model's pointwise convolutions have no bias
    ((1, 5, 4, 3), 7, True),
    ((2, 8, 1, 1), 4, True),
], ids=["no-bias", "bias", "1x1-map"])
def test_conv1x1_and_its_gradients_match_torch(x_shape, out_channels, bias) -> None:
    rng = np.random.default_rng(19)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((out_channels, x_shape[1], 1, 1)) * 0.3).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    grad_y = rng.standard_normal((x_shape[0], out_channels, *x_shape[2:])).astype(np.float32)
    arrays = [x, w] + ([b] if bias else [])
    # oneDNN's sgemm, the bias gradient in float64: measured at most 1.5x torch's error.
    _assert_close_to_float64(conv1x1, F.conv2d, arrays, grad_y,
                             ["y", "grad_x", "grad_weight", "grad_bias"][:len(arrays) + 1], 3.0, 1e-6)


def test_conv2d_module_takes_the_pointwise_kernel_only_where_it_applies(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(jittor_impl.nn, "conv1x1", lambda *a: calls.append(a) or conv1x1(*a))
    rng = np.random.default_rng(20)
    x = jt.array(rng.standard_normal((2, 6, 7, 5)).astype(np.float32))
    for module, expected_calls in ((Conv2d(6, 4, 1, bias=False), 1), (Conv2d(6, 4, 3, padding=1), 0),
                                   (Conv2d(6, 4, 1, stride=2), 0), (Conv2d(6, 4, 1, groups=2), 0)):
        calls.clear()
        np.testing.assert_allclose(module(x).numpy(), jt.nn.Conv2d.execute(module, x).numpy(),
                                   rtol=1e-5, atol=1e-5)
        assert len(calls) == expected_calls, module


def test_conv1x1_of_a_frozen_weight_still_gives_the_input_gradient() -> None:
    rng = np.random.default_rng(21)
    x = jt.array(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    w = rng.standard_normal((5, 3, 1, 1)).astype(np.float32)
    grad_x = jt.grad(conv1x1(x, jt.array(w).stop_grad()).sum(), x).numpy()
    np.testing.assert_allclose(grad_x, np.broadcast_to(w.sum(0).reshape(1, 3, 1, 1), x.shape), rtol=1e-5)


def test_conv1x1_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="weight \\[4, 3, 3, 3\\] and bias None do not fit"):
        conv1x1(jt.zeros((1, 3, 5, 5)), jt.zeros((4, 3, 3, 3)))
    with pytest.raises(ValueError, match="input \\[1, 2, 5, 5\\]"):
        conv1x1(jt.zeros((1, 2, 5, 5)), jt.zeros((4, 3, 1, 1)))


def test_without_onednn_sgemm_every_product_kernel_is_jittors_own_op(monkeypatch) -> None:
    """One rule for a missing oneDNN: each product kernel (and so each layer on it) returns
    Jittor's own operator, never an error and never a different result."""
    import jittor_impl._kernels as kernels

    monkeypatch.setattr(kernels, "has_dnnl_sgemm", lambda: False)
    monkeypatch.setattr(kernels, "jt", _NoCode(jt))  # a kernel that still ran would fail here
    rng = np.random.default_rng(22)
    x = jt.array(rng.standard_normal((2, 6, 5, 4)).astype(np.float32))
    conv = Conv2d(6, 3, 1)
    dense = Linear(4, 3)
    a, b = x[0], x[1].transpose(0, 2, 1)  # [6, 5, 4] @ [6, 4, 5]
    for name, got, want in (
            ("conv1x1", kernels.conv1x1(x, conv.weight, conv.bias), jt.nn.conv2d(x, conv.weight, conv.bias)),
            ("Conv2d", conv(x), jt.nn.Conv2d.execute(conv, x)),
            ("linear", kernels.linear(x, dense.weight, dense.bias), jt.nn.linear(x, dense.weight, dense.bias)),
            ("Linear", dense(x), jt.nn.Linear.execute(dense, x)),
            ("batched_sgemm", kernels.batched_sgemm(a, b), jt.stack([jt.matmul(a[i], b[i]) for i in range(6)]))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


class _NoCode:
    """Jittor with ``jt.code`` taken away (anything else passes through)."""

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        if name == "code":
            raise AssertionError("a oneDNN kernel ran without oneDNN")
        return getattr(self._module, name)