"""CPU kernels (OpenMP, oneDNN) of the port's hot operators (Jittor-only, no torch mirror).

Each is a ``jt.Function`` of ``jt.code`` kernels (C++ in ``jittor_impl/kernels/*.cc``), taking
float32 only; :func:`uses_kernel` picks it or Jittor ops from ``jittor_impl.kernels.OPERATORS``.
"""

import ctypes
import functools
from typing import Optional, Sequence, Tuple

import jittor as jt
from jittor import nn

from . import kernels as cpp

__all__ = ["batch_norm_train", "channel_affine", "relu", "softmax_last", "ms_deform_attn",
           "max_pool2d", "avg_pool2d", "swap_last_axes", "adamw_hyperparameters", "adamw_update",
           "has_dnnl_sgemm", "batched_sgemm", "linear", "layer_norm",
           "conv1x1", "uses_kernel"]


def uses_kernel(operator: str) -> bool:
    """Whether ``operator``, a key of ``jittor_impl.kernels.OPERATORS``, runs its kernel here."""
    if operator not in cpp.OPERATORS:
        raise KeyError(f"no operator {operator!r} in jittor_impl.kernels.OPERATORS")
    impl = cpp.OPERATORS[operator]
    choice = impl.cuda if jt.flags.use_cuda else impl.cpu
    return choice == cpp.KERNEL and (not impl.onednn or has_dnnl_sgemm())


def _require_float32(caller: str, **tensors: jt.Var) -> None:
    """Raises ``TypeError`` naming the first tensor that is not float32."""
    for name, v in tensors.items():
        if v.dtype != "float32":
            raise TypeError(f"{caller}: {name} is {v.dtype}, expected float32")


def _check_channel_vectors(caller: str, x: jt.Var, **vectors: jt.Var) -> None:
    """Checks that ``x`` is a float32 ``[bs, c, h, w]`` and each vector a float32 ``[c]``."""
    if x.ndim != 4:
        raise ValueError(f"{caller} expects [bs, c, h, w], got shape {list(x.shape)}")
    for name, v in vectors.items():
        if list(v.shape) != [x.shape[1]]:
            raise ValueError(f"{caller}: {name} has shape {list(v.shape)}, expected "
                             f"[{x.shape[1]}] for input {list(x.shape)}")
    _require_float32(caller, x=x, **vectors)


def _channel_mean(x: jt.Var) -> jt.Var:
    """Mean over all axes but the channel one, ``[1, c, 1, 1]``, summed one axis at a time."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    return x.sum(dim=3, keepdims=True).sum(dim=2, keepdims=True).sum(dim=0, keepdims=True) / n


def _batch_norm_train_ops(x: jt.Var, weight: jt.Var, bias: jt.Var,
                          eps: float) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """:func:`batch_norm_train` composed of Jittor ops."""
    mean = _channel_mean(x)  # [1, c, 1, 1]
    centered = x - mean
    var = _channel_mean(centered * centered)  # [1, c, 1, 1], biased
    scale = weight.reshape(1, -1, 1, 1) / jt.sqrt(var + eps)  # [1, c, 1, 1]
    y = centered * scale + bias.reshape(1, -1, 1, 1)
    return y, mean.reshape(-1).detach(), var.reshape(-1).detach()  # [c] statistics


_BN_FORWARD_SRC = cpp.snippet("normalisation", "bn_forward")
_BN_BACKWARD_SRC = cpp.snippet("normalisation", "bn_backward")


class _BatchNormTrain(jt.Function):
    """Training-mode batch normalisation as two OpenMP kernels (forward, backward)."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var,
                eps: float) -> Tuple[jt.Var, jt.Var, jt.Var]:
        c = x.shape[1]
        header = cpp.header("normalisation", "channel_header", BN_EPS=float(eps))
        y, mean, var = jt.code([x.shape, (c,), (c,)], ["float32"] * 3, [x, weight, bias],
                               cpu_header=header, cpu_src=_BN_FORWARD_SRC)
        self.saved = (x, weight, mean, var, header)
        return y, mean, var

    def grad(self, grad_y: jt.Var, grad_mean: Optional[jt.Var],
             grad_var: Optional[jt.Var]) -> Tuple[jt.Var, jt.Var, jt.Var, None]:
        """Gradients for ``x``, ``weight`` and ``bias`` (the statistics are detached)."""
        x, weight, mean, var, header = self.saved
        c = x.shape[1]
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, (c,), (c,)], ["float32"] * 3, [x, grad_y, weight, mean, var],
            cpu_header=header, cpu_src=_BN_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias, None


def batch_norm_train(x: jt.Var, weight: jt.Var, bias: jt.Var,
                     eps: float) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """Training-mode batch normalisation of ``[bs, c, h, w]`` with float32 ``weight``, ``bias``
    ``[c]``: the output, the batch mean and the biased batch variance (``[c]``, no gradient)."""
    _check_channel_vectors("batch_norm_train", x, weight=weight, bias=bias)
    if not uses_kernel("batch_norm_train"):
        return _batch_norm_train_ops(x, weight, bias, eps)
    y, mean, var = _BatchNormTrain.apply(x, weight, bias, eps)
    return y, mean.detach(), var.detach()  # the Function tapes its outputs anew


_AFFINE_FORWARD_SRC = cpp.snippet("normalisation", "affine_forward")
_AFFINE_BACKWARD_SRC = cpp.snippet("normalisation", "affine_backward")


class _ChannelAffine(jt.Function):
    """``x * scale[c] + shift[c]`` over ``[bs, c, h, w]`` as two OpenMP kernels."""

    def execute(self, x: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
        self.saved = (x, scale, not (scale.is_stop_grad() and shift.is_stop_grad()))
        return jt.code(x.shape, "float32", [x, scale, shift],
                       cpu_header=cpp.header("normalisation", "channel_header"),
                       cpu_src=_AFFINE_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var]:
        x, scale, param_grads = self.saved
        c = x.shape[1]
        header = cpp.header("normalisation", "channel_header", AFFINE_PARAM_GRADS=param_grads)
        return tuple(jt.code([x.shape, (c,), (c,)], ["float32"] * 3, [x, grad_y, scale],
                             cpu_header=header, cpu_src=_AFFINE_BACKWARD_SRC))


def channel_affine(x: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
    """``x * scale + shift`` with one scale and shift ``[c]`` per channel of ``[bs, c, h, w]``."""
    _check_channel_vectors("channel_affine", x, scale=scale, shift=shift)
    if not uses_kernel("channel_affine"):
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    return _ChannelAffine.apply(x, scale, shift)


_RELU_FORWARD_SRC = cpp.snippet("activation", "relu_forward")
_RELU_BACKWARD_SRC = cpp.snippet("activation", "relu_backward")


class _ReLU(jt.Function):
    """ReLU as two OpenMP kernels."""

    def execute(self, x: jt.Var) -> jt.Var:
        y = jt.code(x.shape, "float32", [x], cpu_src=_RELU_FORWARD_SRC)
        self.y = y
        return y

    def grad(self, grad_y: jt.Var) -> jt.Var:
        return jt.code(grad_y.shape, "float32", [self.y, grad_y], cpu_src=_RELU_BACKWARD_SRC)


def relu(x: jt.Var) -> jt.Var:
    """``max(x, 0)`` of a float32 tensor, with torch's gradient ``grad * (x > 0)``."""
    _require_float32("relu", x=x)
    if not uses_kernel("relu"):
        return nn.relu(x)
    return _ReLU.apply(x)


_SOFTMAX_FORWARD_SRC = cpp.snippet("activation", "softmax_forward")
_SOFTMAX_BACKWARD_SRC = cpp.snippet("activation", "softmax_backward")


class _SoftmaxLast(jt.Function):
    """Softmax over the last axis as two OpenMP kernels, one row per iteration."""

    def execute(self, x: jt.Var) -> jt.Var:
        header = cpp.header("activation", "softmax_header",
                            SOFTMAX_ROW_LENGTH=f"in0_shape{x.ndim - 1}")
        y = jt.code(x.shape, "float32", [x], cpu_header=header, cpu_src=_SOFTMAX_FORWARD_SRC)
        self.y = y
        return y

    def grad(self, grad_y: jt.Var) -> jt.Var:
        header = cpp.defines(SOFTMAX_ROW_LENGTH=f"in0_shape{grad_y.ndim - 1}")
        return jt.code(grad_y.shape, "float32", [self.y, grad_y], cpu_header=header,
                       cpu_src=_SOFTMAX_BACKWARD_SRC)


def softmax_last(x: jt.Var) -> jt.Var:
    """Softmax of a float32 tensor over its non-empty last axis; ``-inf`` entries are masked."""
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"softmax_last needs a non-empty last axis, got shape {list(x.shape)}")
    _require_float32("softmax_last", x=x)
    if not uses_kernel("softmax_last"):
        return nn.softmax(x, dim=-1)
    return _SoftmaxLast.apply(x)


_NO_CELLS = "((const int*)nullptr)"  # MSDA_CELLS without forced cells
_MSDA_FORWARD_SRC = cpp.snippet("deformable_attention", "msda_forward")
_MSDA_BACKWARD_SRC = cpp.snippet("deformable_attention", "msda_backward")


class _MSDeformAttn(jt.Function):
    """Multi-scale deformable attention as two OpenMP kernels."""

    def execute(self, value: jt.Var, sampling_locations: jt.Var, attention_weights: jt.Var,
                levels: str, cells: Optional[jt.Var]) -> jt.Var:
        bs, len_q, n_head = sampling_locations.shape[:3]
        inputs = [value, sampling_locations, attention_weights]
        header = cpp.header("deformable_attention", "msda_header", MSDA_LEVEL_TABLE=levels,
                            MSDA_CELLS=_NO_CELLS if cells is None else "in3_p")
        out = jt.code((bs, len_q, n_head, value.shape[3]), "float32",
                      inputs + ([] if cells is None else [cells]),
                      cpu_header=header, cpu_src=_MSDA_FORWARD_SRC)
        self.saved = (value, sampling_locations, attention_weights, levels, cells)
        return out

    def grad(self, grad_out: jt.Var) -> Tuple[Optional[jt.Var], ...]:
        value, locations, weights, levels, cells = self.saved
        header = cpp.header("deformable_attention", "msda_header", MSDA_LEVEL_TABLE=levels,
                            MSDA_CELLS=_NO_CELLS if cells is None else "in4_p")
        grads = jt.code([value.shape, locations.shape, weights.shape], ["float32"] * 3,
                        [value, locations, weights, grad_out] + ([] if cells is None else [cells]),
                        cpu_header=header, cpu_src=_MSDA_BACKWARD_SRC)
        return (*grads, None, None)


def ms_deform_attn(value: jt.Var, value_spatial_shapes: Sequence[Sequence[int]],
                   sampling_locations: jt.Var, attention_weights: jt.Var,
                   cells: Optional[jt.Var] = None) -> jt.Var:
    """Multi-scale deformable attention with bilinear sampling, as OpenMP kernels (CPU only).

    Computes ``jittor_impl.decoder.deformable_attention_core_func`` with the same corner weights
    and summation order, and its gradients for all three float32 tensors.

    Args:
        value: ``[bs, len_v, n_head, head_dim]``, levels concatenated (``len_v == sum(h * w)``).
        value_spatial_shapes: ``[(h_0, w_0), ...]``.
        sampling_locations: ``[bs, len_q, n_head, n_levels, n_points, 2]``, normalised ``(x, y)``.
        attention_weights: ``[bs, len_q, n_head, n_levels, n_points]``.
        cells: Optional int32, shaped as ``sampling_locations``: column and row of each point's
            top-left corner, used instead of ``floor`` of its pixel coordinate.

    Returns:
        ``[bs, len_q, n_head * head_dim]``.
    """
    bs, len_v, n_head, head_dim = value.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    expected = (bs, sampling_locations.shape[1], n_head, len(shapes))
    if (sampling_locations.ndim != 6 or tuple(sampling_locations.shape[:4]) != expected
            or sampling_locations.shape[5] != 2
            or tuple(attention_weights.shape) != tuple(sampling_locations.shape[:5])
            or (cells is not None and tuple(cells.shape) != tuple(sampling_locations.shape))
            or sum(h * w for h, w in shapes) != len_v):
        raise ValueError(
            f"ms_deform_attn: value {list(value.shape)}, levels {shapes}, locations "
            f"{list(sampling_locations.shape)}, weights {list(attention_weights.shape)} and cells "
            f"{None if cells is None else list(cells.shape)} do not fit [bs, sum(h*w), n_head, "
            f"head_dim], [bs, len_q, n_head, n_levels, n_points, 2] (twice), "
            f"[bs, len_q, n_head, n_levels, n_points]")
    if cells is not None and cells.dtype != "int32":
        raise TypeError(f"ms_deform_attn: cells is {cells.dtype}, expected int32")
    _require_float32("ms_deform_attn", value=value, sampling_locations=sampling_locations,
                     attention_weights=attention_weights)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    levels = "{" + ", ".join(f"{{{h}, {w}, {s}}}" for (h, w), s in zip(shapes, starts)) + "}"
    out = _MSDeformAttn.apply(value, sampling_locations, attention_weights, levels,
                              None if cells is None else cells.stop_grad())
    return out.reshape(bs, out.shape[1], n_head * head_dim)  # [bs, len_q, n_head * head_dim]


def _pair(name: str, value) -> Tuple[int, int]:
    """``(v, v)`` for an int, the pair itself for a pair of ints; anything else is an error."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def _pool_geometry(caller: str, x: jt.Var, kernel_size, stride, padding,
                   ceil_mode: bool) -> Tuple[str, Tuple[int, int, int, int]]:
    """Checks a 2-D pooling's input and arguments (torch's limits); returns its kernel header
    and torch's output shape (with ``ceil_mode`` a last window starting in the far padding is
    dropped)."""
    if x.ndim != 4:
        raise ValueError(f"{caller} expects [bs, c, h, w], got shape {list(x.shape)}")
    _require_float32(caller, x=x)
    kernel = _pair("kernel_size", kernel_size)
    step = kernel if stride is None else _pair("stride", stride)
    pad = _pair("padding", padding)
    if min(kernel) < 1 or min(step) < 1 or min(pad) < 0:
        raise ValueError(f"{caller}: kernel_size {kernel} and stride {step} must be positive "
                         f"and padding {pad} non-negative")
    if any(p > k // 2 for p, k in zip(pad, kernel)):
        raise ValueError(f"{caller}: padding {pad} must be at most half of kernel_size {kernel}")
    out = []
    for size, k, s, p in zip(x.shape[2:], kernel, step, pad):
        n = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (n - 1) * s >= size + p:
            n -= 1
        out.append(n)
    if min(out) < 1:
        raise ValueError(f"{caller}: input {list(x.shape)} is smaller than kernel_size {kernel} "
                         f"with padding {pad}; the output would be empty")
    header = cpp.header("pooling", "pool_header", POOL_KH=kernel[0], POOL_KW=kernel[1],
                        POOL_SH=step[0], POOL_SW=step[1], POOL_PH=pad[0], POOL_PW=pad[1],
                        POOL_OH=out[0], POOL_OW=out[1])
    return header, (x.shape[0], x.shape[1], out[0], out[1])


_MAX_POOL_FORWARD_SRC = cpp.snippet("pooling", "max_pool_forward")
_MAX_POOL_BACKWARD_SRC = cpp.snippet("pooling", "max_pool_backward")
_AVG_POOL_FORWARD_SRC = cpp.snippet("pooling", "avg_pool_forward")
_AVG_POOL_BACKWARD_SRC = cpp.snippet("pooling", "avg_pool_backward")


class _MaxPool2d(jt.Function):
    """2-D max pooling as two OpenMP kernels (the forward keeps the argmax for the backward)."""

    def execute(self, x: jt.Var, header: str, shape: Tuple[int, int, int, int]) -> jt.Var:
        y, argmax = jt.code([shape, shape], ["float32", "int32"], [x],
                            cpu_header=header + cpp.snippet("pooling", "max_pool_plane"),
                            cpu_src=_MAX_POOL_FORWARD_SRC)
        self.saved = (x.shape, argmax.detach(), header)
        return y

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, None, None]:
        shape, argmax, header = self.saved
        return jt.code(shape, "float32", [argmax, grad_y], cpu_header=header,
                       cpu_src=_MAX_POOL_BACKWARD_SRC), None, None


class _AvgPool2d(jt.Function):
    """2-D average pooling as two OpenMP kernels; ``header`` also defines ``POOL_COUNT``."""

    def execute(self, x: jt.Var, header: str, shape: Tuple[int, int, int, int]) -> jt.Var:
        self.saved = (x.shape, header)
        return jt.code(shape, "float32", [x],
                       cpu_header=header, cpu_src=_AVG_POOL_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, None, None]:
        shape, header = self.saved
        return jt.code(shape, "float32", [grad_y], cpu_header=header,
                       cpu_src=_AVG_POOL_BACKWARD_SRC), None, None


def max_pool2d(x: jt.Var, kernel_size, stride=None, padding=0, ceil_mode: bool = False) -> jt.Var:
    """2-D max pooling of a float32 ``[bs, c, h, w]`` with torch's ``F.max_pool2d`` semantics.

    Padding never wins (windows are clipped to the image), the first maximum of a window in
    row-major order takes the gradient, and a NaN is the maximum of its window. ``kernel_size``,
    ``stride`` (``None``: the kernel size) and ``padding`` (at most half the kernel) are ints or
    pairs; ``ceil_mode`` rounds the output size up.
    """
    header, shape = _pool_geometry("max_pool2d", x, kernel_size, stride, padding, ceil_mode)
    if not uses_kernel("max_pool2d"):
        return nn.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
    return _MaxPool2d.apply(x, header, shape)


def avg_pool2d(x: jt.Var, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> jt.Var:
    """2-D average pooling with torch's ``F.avg_pool2d`` semantics, arguments as
    :func:`max_pool2d`'s.

    A window's divisor is its size including the zero padding (``count_include_pad``) but never
    the part past the far padding that ``ceil_mode`` adds, or its in-image count otherwise.
    """
    header, shape = _pool_geometry("avg_pool2d", x, kernel_size, stride, padding, ceil_mode)
    if not uses_kernel("avg_pool2d"):
        return nn.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    count = "padded" if count_include_pad else "((h1 - h0) * (w1 - w0))"
    return _AvgPool2d.apply(x, cpp.defines(POOL_COUNT=count) + header, shape)


_SWAP_LAST_AXES_SRC = cpp.snippet("products", "swap_last_axes")


def _swap_last_axes_kernel(x: jt.Var) -> jt.Var:
    """The tiled transpose kernel of a float32 ``[b, m, n]``, giving ``[b, n, m]``."""
    return jt.code((x.shape[0], x.shape[2], x.shape[1]), "float32", [x],
                   cpu_header=cpp.header("products", "swap_last_axes_header"),
                   cpu_src=_SWAP_LAST_AXES_SRC)


class _SwapLastAxes(jt.Function):
    """``[b, m, n] -> [b, n, m]`` as an OpenMP kernel, which is also its gradient."""

    def execute(self, x: jt.Var) -> jt.Var:
        return _swap_last_axes_kernel(x)

    def grad(self, grad_y: jt.Var) -> jt.Var:
        return _swap_last_axes_kernel(grad_y)


def swap_last_axes(x: jt.Var) -> jt.Var:
    """``x.permute(0, 2, 1)`` of a float32 ``[b, m, n]`` as a contiguous copy."""
    if x.ndim != 3:
        raise ValueError(f"swap_last_axes expects [b, m, n], got shape {list(x.shape)}")
    _require_float32("swap_last_axes", x=x)
    if not uses_kernel("swap_last_axes"):
        return x.permute(0, 2, 1)
    return _SwapLastAxes.apply(x)


# The scalars of one AdamW update in the kernel's order; it reads each as in4_p[ADAMW_<NAME>].
_ADAMW_FIELDS = ("decay", "lerp", "beta2", "one_minus_beta2", "inv_bc2_sqrt", "eps", "neg_step_size")
_ADAMW_SRC = cpp.snippet("optimizer", "adamw_update")


def adamw_hyperparameters(lr: float, weight_decay: float, betas: Tuple[float, float],
                          eps: float, step: int) -> jt.Var:
    """The float32 ``[7]`` scalars :func:`adamw_update` takes for update ``step`` (from 1), each
    computed in float64 and rounded to float32 once, as torch's ``AdamW`` applies Python scalars."""
    if step < 1:
        raise ValueError(f"adamw_hyperparameters: step {step} must be at least 1")
    beta1, beta2 = betas
    values = {"decay": 1 - lr * weight_decay, "lerp": 1 - beta1, "beta2": beta2,
              "one_minus_beta2": 1 - beta2, "inv_bc2_sqrt": 1 / (1 - beta2 ** step) ** 0.5,
              "eps": eps, "neg_step_size": -lr / (1 - beta1 ** step)}
    return jt.array([values[k] for k in _ADAMW_FIELDS]).float32()


def _adamw_update_ops(param: jt.Var, grad: jt.Var, exp_avg: jt.Var, exp_avg_sq: jt.Var,
                      hyper: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """:func:`adamw_update` composed of Jittor ops."""
    h = dict(zip(_ADAMW_FIELDS, (hyper[i] for i in range(len(_ADAMW_FIELDS)))))
    m = exp_avg + h["lerp"] * (grad - exp_avg)
    v = exp_avg_sq * h["beta2"] + h["one_minus_beta2"] * grad * grad
    denom = jt.sqrt(v) * h["inv_bc2_sqrt"] + h["eps"]
    return param * h["decay"] + h["neg_step_size"] * (m / denom), m, v


def adamw_update(param: jt.Var, grad: jt.Var, exp_avg: jt.Var, exp_avg_sq: jt.Var,
                 hyper: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """One AdamW update of one float32 parameter, torch's single-tensor formulas; ``grad`` and the
    moments share its shape, ``hyper`` is :func:`adamw_hyperparameters`'s. Returns the new
    parameter, first moment and second moment (the caller ``update``s them).
    """
    shapes = [list(t.shape) for t in (param, grad, exp_avg, exp_avg_sq)]
    if any(s != shapes[0] for s in shapes) or list(hyper.shape) != [len(_ADAMW_FIELDS)]:
        raise ValueError(f"adamw_update: param, grad, exp_avg and exp_avg_sq must share one shape "
                         f"and hyper be [{len(_ADAMW_FIELDS)}]; got {shapes} and {list(hyper.shape)}")
    _require_float32("adamw_update", param=param, grad=grad, exp_avg=exp_avg,
                     exp_avg_sq=exp_avg_sq, hyper=hyper)
    if not uses_kernel("adamw_update"):
        return _adamw_update_ops(param, grad, exp_avg, exp_avg_sq, hyper)
    header = cpp.header("optimizer", "adamw_header",
                        **{f"ADAMW_{name.upper()}": i for i, name in enumerate(_ADAMW_FIELDS)})
    return tuple(jt.code([param.shape] * 3, ["float32"] * 3, [param, grad, exp_avg, exp_avg_sq, hyper],
                         cpu_header=header, cpu_src=_ADAMW_SRC))


@functools.lru_cache(maxsize=None)
def has_dnnl_sgemm() -> bool:
    """Whether oneDNN's ``dnnl_sgemm`` is among the process's global symbols (Jittor loads its
    oneDNN operators with ``RTLD_GLOBAL``, so a kernel can call it without linking it)."""
    try:
        return hasattr(ctypes.CDLL(None), "dnnl_sgemm")
    except OSError:
        return False


_BATCHED_SGEMM_SRC = cpp.snippet("products", "batched_sgemm")


def _matmul_2d(x: jt.Var, y: jt.Var, transpose_x: bool = False, transpose_y: bool = False) -> jt.Var:
    """``op(x) @ op(y)`` (one operand transposed at most) as the broadcast product and sum that
    Jittor hands to oneDNN."""
    if transpose_x and transpose_y:
        raise ValueError("_matmul_2d transposes one operand at most")
    if transpose_x:
        k, m = x.shape
        p = y.shape[1]
        # [k, m, p] products summed over k
        return (x.broadcast([k, m, p], [2]) * y.broadcast([k, m, p], [1])).sum(0)
    if transpose_y:
        m, k = x.shape
        p = y.shape[0]
        # [m, p, k] products summed over k
        return (x.broadcast([m, p, k], [1]) * y.broadcast([m, p, k], [0])).sum(2)
    return jt.matmul(x, y)


def _slice_matmul(a: jt.Var, b: jt.Var, transpose_a: bool = False, transpose_b: bool = False) -> jt.Var:
    """:func:`batched_sgemm` as ``n`` stacked 2-D Jittor products."""
    return jt.stack([_matmul_2d(a[i], b[i], transpose_a, transpose_b) for i in range(a.shape[0])])


def batched_sgemm(a: jt.Var, b: jt.Var, transpose_a: bool = False,
                  transpose_b: bool = False) -> jt.Var:
    """``op(a[i]) @ op(b[i])`` of float32 ``a`` ``[n, m, k]`` (``[n, k, m]`` with ``transpose_a``)
    and ``b`` ``[n, k, p]`` (``[n, p, k]`` with ``transpose_b``): ``[n, m, p]``, forward only,
    bit-equal to stacked 2-D ``jt.matmul`` products."""
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"batched_sgemm expects 3-D operands, got {list(a.shape)} and {list(b.shape)}")
    n, m, k = (a.shape[0], a.shape[2], a.shape[1]) if transpose_a else a.shape
    k_b, p = (b.shape[2], b.shape[1]) if transpose_b else b.shape[1:]
    if b.shape[0] != n or k_b != k:
        raise ValueError(f"batched_sgemm: {list(a.shape)} (transposed: {transpose_a}) and "
                         f"{list(b.shape)} (transposed: {transpose_b}) do not multiply")
    _require_float32("batched_sgemm", a=a, b=b)
    if not uses_kernel("batched_sgemm"):
        return _slice_matmul(a, b, transpose_a, transpose_b)
    header = cpp.header("products", "sgemm_header", SGEMM_TA=transpose_a, SGEMM_TB=transpose_b)
    return jt.code((n, m, p), "float32", [a, b], cpu_header=header, cpu_src=_BATCHED_SGEMM_SRC)


_LINEAR_FORWARD_SRC = cpp.snippet("products", "linear_forward")
_LINEAR_BACKWARD_SRC = cpp.snippet("products", "linear_backward")
_NO_BIAS = "((const float*)nullptr)"  # LINEAR_BIAS and CONV_BIAS without a bias


class _Linear(jt.Function):
    """``x @ weight^T + bias`` over the rows of ``x`` ``[M, K]``, one kernel each way."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: Optional[jt.Var]) -> jt.Var:
        self.saved = (x, weight, bias is not None)
        header = cpp.header("products", "sgemm_header",
                            LINEAR_BIAS="in2_p" if bias is not None else _NO_BIAS)
        return jt.code((x.shape[0], weight.shape[0]), "float32",
                       [x, weight] + ([bias] if bias is not None else []),
                       cpu_header=header, cpu_src=_LINEAR_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, Optional[jt.Var]]:
        x, weight, has_bias = self.saved
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, weight.shape, (weight.shape[0],)], ["float32"] * 3, [x, weight, grad_y],
            cpu_header=cpp.header("products", "sgemm_header"), cpu_src=_LINEAR_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias if has_bias else None


def linear(x: jt.Var, weight: jt.Var, bias: Optional[jt.Var] = None) -> jt.Var:
    """``x @ weight^T + bias`` over the last axis, torch's ``F.linear`` (float32; ``bias``
    optional)."""
    if (weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]
            or (bias is not None and list(bias.shape) != [weight.shape[0]])):
        raise ValueError(f"linear: input {list(x.shape)}, weight {list(weight.shape)} and bias "
                         f"{None if bias is None else list(bias.shape)} do not fit [..., in], "
                         f"[out, in], [out]")
    _require_float32("linear", x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if not uses_kernel("linear"):
        return nn.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    y = _Linear.apply(rows, weight, bias)  # [M, out]
    return y.reshape(*x.shape[:-1], weight.shape[0])  # [..., out]


_LAYER_NORM_FORWARD_SRC = cpp.snippet("normalisation", "layer_norm_forward")
_LAYER_NORM_BACKWARD_SRC = cpp.snippet("normalisation", "layer_norm_backward")


class _LayerNorm(jt.Function):
    """LayerNorm over the last axis with a scale and shift as two OpenMP kernels."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
        header = cpp.header("normalisation", "layer_norm_header", LN_EPS=float(eps))
        rows = x.numel() // x.shape[-1]
        y, mean, rstd = jt.code([x.shape, (rows,), (rows,)], ["float32"] * 3, [x, weight, bias],
                                cpu_header=header, cpu_src=_LAYER_NORM_FORWARD_SRC)
        self.saved = (x, weight, mean.detach(), rstd.detach())
        return y

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var, None]:
        x, weight, mean, rstd = self.saved
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, weight.shape, weight.shape], ["float32"] * 3, [x, grad_y, weight, mean, rstd],
            cpu_header=cpp.header("normalisation", "layer_norm_header"),
            cpu_src=_LAYER_NORM_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias, None


def layer_norm(x: jt.Var, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
    """torch's ``F.layer_norm(x, (d,), weight, bias, eps)`` of a float32 ``[..., d]``."""
    if x.ndim == 0 or any(list(v.shape) != [x.shape[-1]] for v in (weight, bias)):
        raise ValueError(f"layer_norm: input {list(x.shape)}, weight {list(weight.shape)} and bias "
                         f"{list(bias.shape)} do not fit [..., d], [d], [d]")
    _require_float32("layer_norm", x=x, weight=weight, bias=bias)
    if not uses_kernel("layer_norm"):
        return _layer_norm_ops(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)


def _layer_norm_ops(x: jt.Var, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
    """:func:`layer_norm` composed of Jittor ops (the mean subtracted before the variance)."""
    mean = x.mean(dim=-1, keepdims=True)  # [..., 1]
    centered = x - mean
    var = (centered * centered).mean(dim=-1, keepdims=True)  # [..., 1]
    return centered / jt.sqrt(var + eps) * weight + bias


_CONV1X1_FORWARD_SRC = cpp.snippet("products", "conv1x1_forward")
_CONV1X1_BACKWARD_SRC = cpp.snippet("products", "conv1x1_backward")


class _Conv1x1(jt.Function):
    """Pointwise convolution as oneDNN ``sgemm`` calls in the NCHW layout."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: Optional[jt.Var]) -> jt.Var:
        self.saved = (x, weight, not weight.is_stop_grad(), bias is not None)
        header = cpp.header("products", "sgemm_header",
                            CONV_BIAS="in2_p" if bias is not None else _NO_BIAS)
        return jt.code((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), "float32",
                       [x, weight] + ([bias] if bias is not None else []),
                       cpu_header=header, cpu_src=_CONV1X1_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, Optional[jt.Var]]:
        x, weight, weight_grad, has_bias = self.saved
        header = cpp.header("products", "sgemm_header", CONV_WEIGHT_GRAD=weight_grad,
                            CONV_BIAS_GRAD=has_bias)
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, weight.shape, (weight.shape[0],)], ["float32"] * 3, [x, weight, grad_y],
            cpu_header=header, cpu_src=_CONV1X1_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias if has_bias else None


def conv1x1(x: jt.Var, weight: jt.Var, bias: Optional[jt.Var] = None) -> jt.Var:
    """A 1x1 convolution (stride 1, no padding, one group) of float32 ``[N, Ci, H, W]`` by
    ``[Co, Ci, 1, 1]`` with an optional bias ``[Co]``."""
    if (x.ndim != 4 or weight.ndim != 4 or tuple(weight.shape[1:]) != (x.shape[1], 1, 1)
            or (bias is not None and list(bias.shape) != [weight.shape[0]])):
        raise ValueError(f"conv1x1: input {list(x.shape)}, weight {list(weight.shape)} and bias "
                         f"{None if bias is None else list(bias.shape)} do not fit [N, Ci, H, W], "
                         f"[Co, Ci, 1, 1], [Co]")
    _require_float32("conv1x1", x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if not uses_kernel("conv1x1"):
        return nn.conv2d(x, weight, bias)
    return _Conv1x1.apply(x, weight, bias)
