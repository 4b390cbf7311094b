"""CPU kernels (OpenMP, oneDNN) of the port's hot operators (Jittor-only, no torch mirror).

Jittor's fused CPU kernels run on one thread (measured: a fused multiply-add-max and a
per-channel sum over ``[2, 128, 160, 160]`` keep one core busy whatever ``OMP_NUM_THREADS``
says), while torch runs its operators on every thread, and Jittor reduces an axis with one
float32 running sum. Outside convolutions and matrix products, which both frameworks hand to
oneDNN, that made an r18vd training step at 640 (batch 2, 2 threads) 1.57x torch's time. The
operators that dominated are written here as ``jt.code`` CPU kernels, each with its gradient
as a second kernel (a ``jt.Function``), parallel over channels, elements, rows or heads:

- :func:`batch_norm_train`: training-mode BatchNorm (batch statistics in float64);
- :func:`channel_affine`: eval-mode and frozen BatchNorm (a scale and shift per channel);
- :func:`relu`: ReLU;
- :func:`softmax_last`: softmax over the last axis (row sums in float64);
- :func:`ms_deform_attn`: the decoder's multi-scale deformable attention (bilinear
  sampling and the weighted sum over levels and points);
- :func:`max_pool2d`, :func:`avg_pool2d`: pooling with torch's semantics;
- :func:`swap_last_axes`: the token layouts' transposes;
- :func:`layer_norm`: LayerNorm over the last axis (statistics in float64);
- :func:`adamw_update`: one parameter's AdamW update, torch's single-tensor formulas.

Products run through oneDNN's ``sgemm``, which Jittor's own CPU matmul calls and which its
oneDNN operators load into the process's global symbols (:func:`has_dnnl_sgemm`):
:func:`batched_sgemm` (attention heads), :func:`linear` (bias included) and
:func:`conv1x1` (pointwise convolutions in the NCHW layout, where Jittor's convolution
reorders both maps to a blocked layout and back). One rule for all three: on CUDA, or where
oneDNN's ``sgemm`` is not loaded, each returns Jittor's own operator instead (stacked
``jt.matmul``, ``jittor.nn.linear``, ``jittor.nn.conv2d``).

On CUDA the callers use compositions of Jittor ops instead (``jittor_impl.nn``,
``jittor_impl.decoder``), which Jittor parallelises there. Every kernel takes float32 only
and says so when given anything else.
"""

import ctypes
import functools
from typing import Optional, Sequence, Tuple

import jittor as jt
from jittor import nn

__all__ = ["batch_norm_train", "channel_affine", "relu", "softmax_last", "ms_deform_attn",
           "max_pool2d", "avg_pool2d", "swap_last_axes", "adamw_hyperparameters", "adamw_update",
           "has_dnnl_sgemm", "batched_sgemm", "linear", "layer_norm",
           "conv1x1"]


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
    """Averages ``[bs, c, h, w]`` over all axes but the channel one.

    Jittor reduces an axis by a plain running sum, whose float32 rounding
    error grows with the number of terms (about 5e-6 relative for 25600
    terms, against 1e-7 for torch's pairwise sums). Summing one axis at a
    time keeps each running sum short.

    Args:
        x: Input of shape ``[bs, c, h, w]``.

    Returns:
        The per-channel mean, shape ``[1, c, 1, 1]``.
    """
    n = x.shape[0] * x.shape[2] * x.shape[3]
    return x.sum(dim=3, keepdims=True).sum(dim=2, keepdims=True).sum(dim=0, keepdims=True) / n


def _batch_norm_train_ops(x: jt.Var, weight: jt.Var, bias: jt.Var,
                          eps: float) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """Training-mode batch normalisation composed of Jittor ops (the CUDA path); arguments
    and results as :func:`batch_norm_train`'s."""
    mean = _channel_mean(x)  # [1, c, 1, 1]
    centered = x - mean
    var = _channel_mean(centered * centered)  # [1, c, 1, 1], biased
    scale = weight.reshape(1, -1, 1, 1) / jt.sqrt(var + eps)  # [1, c, 1, 1]
    y = centered * scale + bias.reshape(1, -1, 1, 1)
    return y, mean.reshape(-1).detach(), var.reshape(-1).detach()  # [c] statistics


# Kernels of _BatchNormTrain. Channel c of a contiguous [N, C, H, W] tensor is N runs of H*W
# floats starting at (n * C + c) * H * W; each OpenMP thread takes whole channels, so every
# sum is one thread's float64 running sum. The formulas are torch's CPU BatchNorm ones:
# forward y = x * a + b with a = weight * invstd, b = bias - mean * a; backward
# dx = (dy - sum(dy) / M - (x - mean) * sum(dy * (x - mean)) * invstd^2 / M) * weight * invstd.
_CHANNEL_HEADER = """
#include <cmath>
#define BN_CHANNEL(ptr, n) ((ptr) + ((size_t)(n) * C + c) * HW)
"""
_BN_KERNEL_HEADER = _CHANNEL_HEADER + "#define BN_EPS ({eps!r})\n"

# in0 x [N, C, H, W], in1 weight [C], in2 bias [C] -> out0 y, out1 mean [C], out2 var [C]
_BN_FORWARD_SRC = """
const int N = in0_shape0, C = in0_shape1;
const size_t HW = (size_t)in0_shape2 * in0_shape3;
const double M = (double)N * (double)HW;
#pragma omp parallel for schedule(static)
for (int c = 0; c < C; c++) {
    double sum = 0;
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        for (size_t i = 0; i < HW; i++) sum += x[i];
    }
    const double mean = sum / M;
    double squares = 0;
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        for (size_t i = 0; i < HW; i++) { const double d = x[i] - mean; squares += d * d; }
    }
    const double var = squares / M;
    const double scale = in1_p[c] / std::sqrt(var + BN_EPS);
    const float a = (float)scale;
    const float b = (float)(in2_p[c] - mean * scale);
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        float* y = BN_CHANNEL(out0_p, n);
        for (size_t i = 0; i < HW; i++) y[i] = x[i] * a + b;
    }
    out1_p[c] = (float)mean;
    out2_p[c] = (float)var;
}
"""

# in0 x, in1 dy [N, C, H, W], in2 weight, in3 mean, in4 var [C]
#   -> out0 dx [N, C, H, W], out1 dweight [C], out2 dbias [C]
_BN_BACKWARD_SRC = """
const int N = in0_shape0, C = in0_shape1;
const size_t HW = (size_t)in0_shape2 * in0_shape3;
const double M = (double)N * (double)HW;
#pragma omp parallel for schedule(static)
for (int c = 0; c < C; c++) {
    const double mean = in3_p[c];
    const double invstd = 1.0 / std::sqrt((double)in4_p[c] + BN_EPS);
    double sum_dy = 0, sum_dy_xc = 0;
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        const float* dy = BN_CHANNEL(in1_p, n);
        for (size_t i = 0; i < HW; i++) { sum_dy += dy[i]; sum_dy_xc += dy[i] * (x[i] - mean); }
    }
    const float k = (float)(sum_dy_xc * invstd * invstd / M);
    const float grad_mean = (float)(sum_dy / M);
    const float w = (float)(in2_p[c] * invstd);
    const float m = (float)mean;
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        const float* dy = BN_CHANNEL(in1_p, n);
        float* dx = BN_CHANNEL(out0_p, n);
        for (size_t i = 0; i < HW; i++) dx[i] = (dy[i] - grad_mean - (x[i] - m) * k) * w;
    }
    out1_p[c] = (float)(sum_dy_xc * invstd);
    out2_p[c] = (float)sum_dy;
}
"""


class _BatchNormTrain(jt.Function):
    """Training-mode batch normalisation on CPU as two OpenMP kernels (forward, backward).

    Jittor's fused CPU kernels run on one thread, and its axis reductions are single float32
    running sums; torch's BatchNorm runs on every thread. Composed of Jittor ops, a BatchNorm
    forward and backward took 2.0-2.7x torch's time (shapes ``[4, 64, 40, 40]`` to
    ``[2, 256, 80, 80]``, 2 threads) and half of an r18vd training step's time outside
    convolutions. These kernels take 0.3-0.6x torch's time, and summing in float64 they are
    closer to a float64 BatchNorm than torch's (relative L2 of output and input gradient
    about 4e-8 and 5e-8 against torch's 5e-8 and 6e-8).
    """

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var,
                eps: float) -> Tuple[jt.Var, jt.Var, jt.Var]:
        """Normalises ``x`` with its batch statistics; arguments and results as
        :func:`batch_norm_train`'s (which detaches the statistics)."""
        c = x.shape[1]
        header = _BN_KERNEL_HEADER.format(eps=float(eps))
        y, mean, var = jt.code([x.shape, (c,), (c,)], ["float32"] * 3, [x, weight, bias],
                               cpu_header=header, cpu_src=_BN_FORWARD_SRC)
        self.saved = (x, weight, mean, var, header)
        return y, mean, var

    def grad(self, grad_y: jt.Var, grad_mean: Optional[jt.Var],
             grad_var: Optional[jt.Var]) -> Tuple[jt.Var, jt.Var, jt.Var, None]:
        """Gradients with respect to ``x``, ``weight`` and ``bias`` (``None`` for ``eps``).

        ``grad_mean`` and ``grad_var`` are ``None``: :func:`batch_norm_train` detaches the
        statistics.
        """
        x, weight, mean, var, header = self.saved
        c = x.shape[1]
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, (c,), (c,)], ["float32"] * 3, [x, grad_y, weight, mean, var],
            cpu_header=header, cpu_src=_BN_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias, None


def batch_norm_train(x: jt.Var, weight: jt.Var, bias: jt.Var,
                     eps: float) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """Training-mode batch normalisation over ``[bs, c, h, w]`` with the batch statistics.

    On CPU it runs the OpenMP kernels of :class:`_BatchNormTrain`; on CUDA it is composed of
    Jittor ops.

    Args:
        x: Input ``[bs, c, h, w]``, float32.
        weight: Scale ``[c]``, float32.
        bias: Shift ``[c]``, float32.
        eps: Value added to the variance before the square root.

    Returns:
        The output ``[bs, c, h, w]``, the batch mean ``[c]`` and the biased batch variance
        ``[c]``; the statistics carry no gradient.

    Raises:
        ValueError: If ``x`` is not 4-D or ``weight``/``bias`` do not have its channel count.
        TypeError: If ``x``, ``weight`` or ``bias`` is not float32.
    """
    _check_channel_vectors("batch_norm_train", x, weight=weight, bias=bias)
    if jt.flags.use_cuda:
        return _batch_norm_train_ops(x, weight, bias, eps)
    y, mean, var = _BatchNormTrain.apply(x, weight, bias, eps)
    return y, mean.detach(), var.detach()  # the Function tapes its outputs anew


# in0 x [N, C, H, W], in1 scale [C], in2 shift [C] -> out0 y = x * scale + shift per channel.
_AFFINE_FORWARD_SRC = """
const int N = in0_shape0, C = in0_shape1;
const size_t HW = (size_t)in0_shape2 * in0_shape3;
#pragma omp parallel for schedule(static)
for (int c = 0; c < C; c++) {
    const float a = in1_p[c], b = in2_p[c];
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        float* y = BN_CHANNEL(out0_p, n);
        for (size_t i = 0; i < HW; i++) y[i] = x[i] * a + b;
    }
}
"""

# in0 x, in1 dy [N, C, H, W], in2 scale [C] -> out0 dx, out1 dscale [C], out2 dshift [C];
# AFFINE_PARAM_GRADS 0 (scale and shift without gradient, as in frozen and eval-mode
# BatchNorm) skips the sums and their read of x, and writes zeros.
_AFFINE_BACKWARD_SRC = """
const int N = in0_shape0, C = in0_shape1;
const size_t HW = (size_t)in0_shape2 * in0_shape3;
#pragma omp parallel for schedule(static)
for (int c = 0; c < C; c++) {
    const float a = in2_p[c];
    double sum_dy = 0, sum_dy_x = 0;
    for (int n = 0; n < N; n++) {
        const float* x = BN_CHANNEL(in0_p, n);
        const float* dy = BN_CHANNEL(in1_p, n);
        float* dx = BN_CHANNEL(out0_p, n);
        if (AFFINE_PARAM_GRADS) {
            for (size_t i = 0; i < HW; i++) { dx[i] = dy[i] * a; sum_dy += dy[i]; sum_dy_x += dy[i] * x[i]; }
        } else {
            for (size_t i = 0; i < HW; i++) dx[i] = dy[i] * a;
        }
    }
    out1_p[c] = (float)sum_dy_x;
    out2_p[c] = (float)sum_dy;
}
"""


class _ChannelAffine(jt.Function):
    """``x * scale[c] + shift[c]`` over ``[bs, c, h, w]`` on CPU as two OpenMP kernels (the
    eval-mode and frozen BatchNorms; Jittor's fused kernel of it runs on one thread)."""

    def execute(self, x: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
        """Returns ``x * scale + shift`` per channel."""
        self.saved = (x, scale, not (scale.is_stop_grad() and shift.is_stop_grad()))
        return jt.code(x.shape, "float32", [x, scale, shift],
                       cpu_header=_CHANNEL_HEADER, cpu_src=_AFFINE_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var]:
        """Gradients with respect to ``x``, ``scale`` and ``shift``."""
        x, scale, param_grads = self.saved
        c = x.shape[1]
        header = _CHANNEL_HEADER + f"#define AFFINE_PARAM_GRADS {int(param_grads)}\n"
        return tuple(jt.code([x.shape, (c,), (c,)], ["float32"] * 3, [x, grad_y, scale],
                             cpu_header=header, cpu_src=_AFFINE_BACKWARD_SRC))


def channel_affine(x: jt.Var, scale: jt.Var, shift: jt.Var) -> jt.Var:
    """``x * scale + shift`` with one scale and shift per channel of ``[bs, c, h, w]``.

    On CPU an OpenMP kernel (sums of its gradient in float64), on CUDA Jittor ops.

    Args:
        x: Input ``[bs, c, h, w]``, float32.
        scale: ``[c]``, float32.
        shift: ``[c]``, float32.

    Returns:
        A tensor of the shape of ``x``.

    Raises:
        ValueError: If ``x`` is not 4-D or ``scale``/``shift`` do not have its channel count.
        TypeError: If a tensor is not float32.
    """
    _check_channel_vectors("channel_affine", x, scale=scale, shift=shift)
    if jt.flags.use_cuda:
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    return _ChannelAffine.apply(x, scale, shift)


# in0 x -> out0 y, element by element over the flat tensor.
_RELU_FORWARD_SRC = """
const size_t n = in0->num;
#pragma omp parallel for schedule(static)
for (size_t i = 0; i < n; i++) out0_p[i] = in0_p[i] > 0.f ? in0_p[i] : 0.f;
"""

# in0 y (the forward's output), in1 dy -> out0 dx: torch's threshold_backward on the output.
_RELU_BACKWARD_SRC = """
const size_t n = in0->num;
#pragma omp parallel for schedule(static)
for (size_t i = 0; i < n; i++) out0_p[i] = in0_p[i] > 0.f ? in1_p[i] : 0.f;
"""


class _ReLU(jt.Function):
    """ReLU on CPU as two OpenMP kernels.

    Composed of Jittor ops, the ReLUs of an r18vd training step at 640 (forward, and
    backward as a select on the input) took about 0.2 s of single-threaded kernels against
    torch's 0.06 s.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        """Returns ``max(x, 0)``."""
        y = jt.code(x.shape, "float32", [x], cpu_src=_RELU_FORWARD_SRC)
        self.y = y
        return y

    def grad(self, grad_y: jt.Var) -> jt.Var:
        """Passes ``grad_y`` where the output is positive, zero elsewhere."""
        return jt.code(grad_y.shape, "float32", [self.y, grad_y], cpu_src=_RELU_BACKWARD_SRC)


def relu(x: jt.Var) -> jt.Var:
    """``max(x, 0)`` element-wise, with an OpenMP kernel on CPU (``nn.relu`` on CUDA).

    The gradient is ``grad * (x > 0)``, as torch's (zero at ``x == 0``).

    Args:
        x: Float32 input of any shape.

    Returns:
        A tensor of the same shape.

    Raises:
        TypeError: If ``x`` is not float32.
    """
    _require_float32("relu", x=x)
    if jt.flags.use_cuda:
        return nn.relu(x)
    return _ReLU.apply(x)


# Rows of the last axis, each one thread's: in0 x [rows, L] -> out0 y. Masked entries are
# -inf: exp(-inf - max) is 0, and a row of -inf only gives NaN, as torch's softmax does.
_SOFTMAX_FORWARD_SRC = """
const size_t L = in0_shape{last};
const size_t rows = in0->num / L;
#pragma omp parallel for schedule(static)
for (size_t r = 0; r < rows; r++) {{
    const float* x = in0_p + r * L;
    float* y = out0_p + r * L;
    float top = x[0];
    for (size_t i = 1; i < L; i++) top = x[i] > top ? x[i] : top;
    double sum = 0;
    for (size_t i = 0; i < L; i++) {{ y[i] = std::exp(x[i] - top); sum += y[i]; }}
    const float inv = (float)(1.0 / sum);
    for (size_t i = 0; i < L; i++) y[i] *= inv;
}}
"""

# in0 y (the forward's output), in1 dy -> out0 dx = y * (dy - sum(dy * y)) per row.
_SOFTMAX_BACKWARD_SRC = """
const size_t L = in0_shape{last};
const size_t rows = in0->num / L;
#pragma omp parallel for schedule(static)
for (size_t r = 0; r < rows; r++) {{
    const float* y = in0_p + r * L;
    const float* dy = in1_p + r * L;
    float* dx = out0_p + r * L;
    double dot = 0;
    for (size_t i = 0; i < L; i++) dot += (double)dy[i] * y[i];
    const float d = (float)dot;
    for (size_t i = 0; i < L; i++) dx[i] = y[i] * (dy[i] - d);
}}
"""


class _SoftmaxLast(jt.Function):
    """Softmax over the last axis on CPU as two OpenMP kernels, one row per iteration.

    Composed of Jittor ops (max, subtract, exp, sum, divide and their derived gradients),
    the attention softmaxes of an r18vd training step at 640 took about 0.13 s of
    single-threaded kernels against torch's 0.02 s.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        """Returns ``exp(x - max) / sum(exp(x - max))`` along the last axis."""
        last = x.ndim - 1
        y = jt.code(x.shape, "float32", [x], cpu_header="#include <cmath>",
                    cpu_src=_SOFTMAX_FORWARD_SRC.format(last=last))
        self.y = y
        return y

    def grad(self, grad_y: jt.Var) -> jt.Var:
        """``y * (grad_y - sum(grad_y * y))`` along the last axis."""
        last = grad_y.ndim - 1
        return jt.code(grad_y.shape, "float32", [self.y, grad_y],
                       cpu_src=_SOFTMAX_BACKWARD_SRC.format(last=last))


def softmax_last(x: jt.Var) -> jt.Var:
    """Softmax over the last axis, with OpenMP kernels on CPU (``nn.softmax`` on CUDA).

    Args:
        x: Float32 input with at least one axis and a non-empty last axis; ``-inf``
            entries are masked out.

    Returns:
        A tensor of the same shape whose rows along the last axis sum to 1.

    Raises:
        ValueError: If ``x`` has no axis or an empty last axis.
        TypeError: If ``x`` is not float32.
    """
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"softmax_last needs a non-empty last axis, got shape {list(x.shape)}")
    _require_float32("softmax_last", x=x)
    if jt.flags.use_cuda:
        return nn.softmax(x, dim=-1)
    return _SoftmaxLast.apply(x)


# Multi-scale deformable attention. Shapes: value [B, V, H, C] (levels concatenated along V),
# locations [B, Q, H, L, P, 2] in [0, 1] (x, y), weights [B, Q, H, L, P], output [B, Q, H, C].
# MSDA_LEVELS lists each level's (h, w, first row in V); MSDA_CELLS points at optional int32
# [B, Q, H, L, P, 2] top-left corners (column, row) that replace floor() of the pixel
# coordinate (a parity check forces the reference's cells at cell edges), or is nullptr. Bilinear sampling is torch's
# F.grid_sample(align_corners=False, padding_mode='zeros') on the grid 2 * loc - 1, with the
# corner weights of its CPU kernel (w = x - floor(x), e = 1 - w, ...; corners outside the map
# add nothing); each level's sampled value is multiplied by its weight and summed over levels
# and points in order, as the reference sums its stacked samples.
_MSDA_HEADER = """
#include <cmath>
#define MSDA_CELLS {cells}
// The sizes of the inputs: value [B, V, H, C], locations [B, Q, H, L, P, 2].
#define MSDA_SIZES const int B = in0_shape0, V = in0_shape1, H = in0_shape2, C = in0_shape3; \\
                   const int Q = in1_shape1, L = in1_shape3, P = in1_shape4;
static const int MSDA_LEVELS[][3] = {levels};
struct MsdaPoint {{
    int h, wd, start;     // its level's size and first row in V
    int row[2], col[2];   // north/south rows, west/east columns
    bool in_row[2], in_col[2];
    float n, s, w, e;     // distances to the north, south, west and east sides
}};
// Point lp = ((b * Q + q) * H + head) * L * P + l * P + point of level l.
static inline MsdaPoint msda_point(const float* locations, const int* cells, long lp, int l) {{
    MsdaPoint p;
    p.h = MSDA_LEVELS[l][0]; p.wd = MSDA_LEVELS[l][1]; p.start = MSDA_LEVELS[l][2];
    const float x = ((2.f * locations[lp * 2] - 1.f + 1.f) * p.wd - 1.f) / 2.f;
    const float y = ((2.f * locations[lp * 2 + 1] - 1.f + 1.f) * p.h - 1.f) / 2.f;
    const float xw = cells ? (float)cells[lp * 2] : std::floor(x);
    const float yn = cells ? (float)cells[lp * 2 + 1] : std::floor(y);
    p.w = x - xw; p.e = 1.f - p.w; p.n = y - yn; p.s = 1.f - p.n;
    for (int k = 0; k < 2; k++) {{
        const float cx = xw + k, cy = yn + k;
        p.in_col[k] = cx >= 0.f && cx <= p.wd - 1;
        p.in_row[k] = cy >= 0.f && cy <= p.h - 1;
        p.col[k] = (int)cx; p.row[k] = (int)cy;
    }}
    return p;
}}
// Corner k = 2 * i + j (i: north/south row, j: west/east column): nw, ne, sw, se.
static inline bool msda_inside(const MsdaPoint& p, int i, int j) {{
    return p.in_row[i] && p.in_col[j];
}}
static inline float msda_corner_weight(const MsdaPoint& p, int i, int j) {{
    return (i ? p.n : p.s) * (j ? p.w : p.e);
}}
// Offset of corner (i, j)'s channels of head hd of image b in value [B, V, H, C].
static inline long msda_offset(const MsdaPoint& p, int i, int j, int b, int hd, int V, int H, int C) {{
    return (((long)b * V + p.start + (long)p.row[i] * p.wd + p.col[j]) * H + hd) * C;
}}
"""

_NO_CELLS = "((const int*)nullptr)"  # MSDA_CELLS without forced cells

# in0 value, in1 locations, in2 weights[, in3 cells] -> out0 output
_MSDA_FORWARD_SRC = """
MSDA_SIZES
#pragma omp parallel for schedule(static)
for (long u = 0; u < (long)B * Q * H; u++) {
    const int b = u / ((long)Q * H), hd = u % H;
    float* out = out0_p + u * C;
    for (int c = 0; c < C; c++) out[c] = 0.f;
    for (int l = 0; l < L; l++) for (int pt = 0; pt < P; pt++) {
        const long lp = (u * L + l) * P + pt;
        const MsdaPoint p = msda_point(in1_p, MSDA_CELLS, lp, l);
        const float aw = in2_p[lp];
        const float* corner[4]; float cw[4];
        for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) {
            corner[2 * i + j] = msda_inside(p, i, j) ? in0_p + msda_offset(p, i, j, b, hd, V, H, C) : nullptr;
            cw[2 * i + j] = msda_corner_weight(p, i, j);
        }
        for (int c = 0; c < C; c++) {
            float val = 0.f;
            for (int k = 0; k < 4; k++) if (corner[k]) val += corner[k][c] * cw[k];
            out[c] += val * aw;
        }
    }
}
"""

# in0 value, in1 locations, in2 weights, in3 grad_output[, in4 cells]
#   -> out0 grad_value, out1 grad_locations, out2 grad_weights
# One thread per (b, head): the rows of grad_value it adds to are that head's alone.
_MSDA_BACKWARD_SRC = """
MSDA_SIZES
#pragma omp parallel for schedule(static)
for (int bh = 0; bh < B * H; bh++) {
    const int b = bh / H, hd = bh % H;
    for (int v = 0; v < V; v++) {
        float* gv = out0_p + (((long)b * V + v) * H + hd) * C;
        for (int c = 0; c < C; c++) gv[c] = 0.f;
    }
    for (int q = 0; q < Q; q++) {
        const long u = ((long)b * Q + q) * H + hd;
        const float* gout = in3_p + u * C;
        for (int l = 0; l < L; l++) for (int pt = 0; pt < P; pt++) {
            const long lp = (u * L + l) * P + pt;
            const MsdaPoint p = msda_point(in1_p, MSDA_CELLS, lp, l);
            const float aw = in2_p[lp];
            // d(corner weight)/dx and /dy for nw, ne, sw, se
            const float dwx[4] = {-p.s, p.s, -p.n, p.n};
            const float dwy[4] = {-p.e, -p.w, p.e, p.w};
            float grad_aw = 0.f, grad_x = 0.f, grad_y = 0.f;
            for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) {
                if (!msda_inside(p, i, j)) continue;
                const long off = msda_offset(p, i, j, b, hd, V, H, C);
                const float* val = in0_p + off;
                float* gv = out0_p + off;
                const float cw = msda_corner_weight(p, i, j);
                float dot = 0.f;
                for (int c = 0; c < C; c++) {
                    dot += gout[c] * val[c];
                    gv[c] += gout[c] * aw * cw;
                }
                grad_aw += dot * cw;
                grad_x += dot * dwx[2 * i + j];
                grad_y += dot * dwy[2 * i + j];
            }
            out2_p[lp] = grad_aw;
            // x = ((2 * lx - 1 + 1) * w - 1) / 2, so dx/dlx = w (and dy/dly = h)
            out1_p[lp * 2] = grad_x * aw * p.wd;
            out1_p[lp * 2 + 1] = grad_y * aw * p.h;
        }
    }
}
"""


class _MSDeformAttn(jt.Function):
    """Multi-scale deformable attention on CPU as two OpenMP kernels.

    Composed of Jittor ops (a gather of the four corners per level, their weights, a stack and
    a weighted sum, and the scatter of the gradient), it took about 0.15 s of single-threaded
    kernels in an r18vd training step at 640 against 0.06 s for torch's ``grid_sample``.
    The forward runs one thread per (image, query, head), the backward one per (image, head),
    so that each thread adds only to its own head's rows of the value gradient.
    """

    def execute(self, value: jt.Var, sampling_locations: jt.Var, attention_weights: jt.Var,
                levels: str, cells: Optional[jt.Var]) -> jt.Var:
        """Returns the attended features ``[bs, len_q, n_head, head_dim]``."""
        bs, len_q, n_head = sampling_locations.shape[:3]
        inputs = [value, sampling_locations, attention_weights]
        header = _MSDA_HEADER.format(levels=levels, cells=_NO_CELLS if cells is None else "in3_p")
        out = jt.code((bs, len_q, n_head, value.shape[3]), "float32",
                      inputs + ([] if cells is None else [cells]),
                      cpu_header=header, cpu_src=_MSDA_FORWARD_SRC)
        self.saved = (value, sampling_locations, attention_weights, levels, cells)
        return out

    def grad(self, grad_out: jt.Var) -> Tuple[Optional[jt.Var], ...]:
        """Gradients with respect to the values, the locations and the weights."""
        value, locations, weights, levels, cells = self.saved
        header = _MSDA_HEADER.format(levels=levels, cells=_NO_CELLS if cells is None else "in4_p")
        grads = jt.code([value.shape, locations.shape, weights.shape], ["float32"] * 3,
                        [value, locations, weights, grad_out] + ([] if cells is None else [cells]),
                        cpu_header=header, cpu_src=_MSDA_BACKWARD_SRC)
        return (*grads, None, None)


def ms_deform_attn(value: jt.Var, value_spatial_shapes: Sequence[Sequence[int]],
                   sampling_locations: jt.Var, attention_weights: jt.Var,
                   cells: Optional[jt.Var] = None) -> jt.Var:
    """Multi-scale deformable attention with bilinear sampling, as OpenMP kernels (CPU only).

    Computes what ``jittor_impl.decoder.deformable_attention_core_func`` (and the reference's
    ``F.grid_sample`` form) computes, with the same corner weights and summation order, and
    its gradients with respect to all three tensors.

    Args:
        value: ``[bs, len_v, n_head, head_dim]``, levels concatenated.
        value_spatial_shapes: ``[(h_0, w_0), ...]`` with ``sum(h * w) == len_v``.
        sampling_locations: ``[bs, len_q, n_head, n_levels, n_points, 2]`` normalised
            ``(x, y)``, in ``[0, 1]`` inside the map.
        attention_weights: ``[bs, len_q, n_head, n_levels, n_points]``.
        cells: Optional int32 ``[bs, len_q, n_head, n_levels, n_points, 2]`` column and row
            of each point's top-left corner, used instead of ``floor`` of its pixel
            coordinate (the bilinear weights stay those of the coordinate).

    Returns:
        ``[bs, len_q, n_head * head_dim]``.

    Raises:
        ValueError: If the shapes do not fit together.
        TypeError: If a tensor is not float32 (``cells``: not int32).
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
    """Checks a 2-D pooling's input and arguments and returns its kernel header and output
    shape.

    The output size is torch's (``pooling_output_shape``): with ``ceil_mode`` a last window
    that would start in the right or bottom padding is dropped.

    Raises:
        ValueError: If ``x`` is not 4-D, a size is not positive, the padding is more than half
            the kernel (torch's limit) or the output would be empty.
        TypeError: If ``x`` is not float32.
    """
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
    header = (_POOL_HEADER + f"#define POOL_KH {kernel[0]}\n#define POOL_KW {kernel[1]}\n"
              f"#define POOL_SH {step[0]}\n#define POOL_SW {step[1]}\n"
              f"#define POOL_PH {pad[0]}\n#define POOL_PW {pad[1]}\n"
              f"#define POOL_OH {out[0]}\n#define POOL_OW {out[1]}\n" + _POOL_WINDOWS)
    return header, (x.shape[0], x.shape[1], out[0], out[1])


# 2-D pooling over the planes of a contiguous [N, C, H, W] tensor, one plane per OpenMP
# iteration (so the backward's additions into a plane are one thread's). Window (oh, ow) spans
# rows [oh * SH - PH, + KH) and columns [ow * SW - PW, + KW) clipped to the image, as in
# torch's CPU kernels.
_POOL_HEADER = """
#include <algorithm>
#include <cstdint>
#include <cstring>
#define POOL_PLANES const long planes = (long)in0_shape0 * in0_shape1
// NaN test on the bits: fast-math compilers may drop std::isnan.
static inline bool pool_is_nan(float v) {
    uint32_t bits; std::memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7fffffffu) > 0x7f800000u;
}
"""

# After the POOL_* sizes (it expands them): calls f(o, h0, h1, w0, w1, padded) for each window
# o = oh * OW + ow of an H x W plane in row-major order, with the window's clipped rows
# [h0, h1) and columns [w0, w1) and, for average pooling, its size clipped at the far
# padding only (`padded`).
_POOL_WINDOWS = """
template <class F>
static inline void pool_each_window(int H, int W, F f) {
    for (int oh = 0; oh < POOL_OH; oh++) for (int ow = 0; ow < POOL_OW; ow++) {
        const int h = oh * POOL_SH - POOL_PH, w = ow * POOL_SW - POOL_PW;
        const int padded = (std::min(h + POOL_KH, H + POOL_PH) - h) * (std::min(w + POOL_KW, W + POOL_PW) - w);
        f(oh * POOL_OW + ow, std::max(h, 0), std::min(h + POOL_KH, H), std::max(w, 0),
          std::min(w + POOL_KW, W), padded);
    }
}
"""

# in0 x [N, C, H, W] -> out0 y [N, C, OH, OW], out1 argmax (flat index in the plane, int32).
# torch's rule: the first maximum in row-major window order, a NaN wins and the last NaN stays.
# The NaN test is only compiled into the windows of planes that hold a NaN (found by a scan of
# the plane's bits): in every window it tripled the kernel's time.
_MAX_POOL_PLANE = """
template <bool WITH_NAN>
static inline void max_pool_plane(const float* x, float* y, int* arg, int H, int W) {
    pool_each_window(H, W, [&](int o, int h0, int h1, int w0, int w1, int) {
        int at = h0 * W + w0;
        float top = x[at];
        for (int h = h0; h < h1; h++) for (int w = w0; w < w1; w++) {
            const float v = x[h * W + w];
            if (v > top || (WITH_NAN && pool_is_nan(v))) { top = v; at = h * W + w; }
        }
        y[o] = top;
        arg[o] = at;
    });
}
"""

_MAX_POOL_FORWARD_SRC = """
POOL_PLANES;
const int H = in0_shape2, W = in0_shape3;
#pragma omp parallel for schedule(static)
for (long pl = 0; pl < planes; pl++) {
    const float* x = in0_p + pl * H * W;
    uint32_t top_bits = 0;  // the largest magnitude's bits; above +inf's only for a NaN
    for (int i = 0; i < H * W; i++) {
        uint32_t bits; std::memcpy(&bits, x + i, sizeof bits);
        top_bits = std::max(top_bits, bits & 0x7fffffffu);
    }
    const bool nan = top_bits > 0x7f800000u;
    float* y = out0_p + pl * POOL_OH * POOL_OW;
    int* arg = out1_p + pl * POOL_OH * POOL_OW;
    if (nan) max_pool_plane<true>(x, y, arg, H, W);
    else max_pool_plane<false>(x, y, arg, H, W);
}
"""

# in0 argmax, in1 dy [N, C, OH, OW] -> out0 dx [N, C, H, W]: each output's gradient added to
# its maximum, in output order.
_MAX_POOL_BACKWARD_SRC = """
POOL_PLANES;
const size_t HW = (size_t)out0_shape2 * out0_shape3, OHW = (size_t)POOL_OH * POOL_OW;
#pragma omp parallel for schedule(static)
for (long pl = 0; pl < planes; pl++) {
    const int* arg = in0_p + pl * OHW;
    const float* dy = in1_p + pl * OHW;
    float* dx = out0_p + pl * HW;
    for (size_t i = 0; i < HW; i++) dx[i] = 0.f;
    for (size_t i = 0; i < OHW; i++) dx[arg[i]] += dy[i];
}
"""

# in0 x [N, C, H, W] -> out0 y [N, C, OH, OW]: the window's float sum in row-major order over
# its count POOL_COUNT.
_AVG_POOL_FORWARD_SRC = """
POOL_PLANES;
const int H = in0_shape2, W = in0_shape3;
#pragma omp parallel for schedule(static)
for (long pl = 0; pl < planes; pl++) {
    const float* x = in0_p + pl * H * W;
    float* y = out0_p + pl * POOL_OH * POOL_OW;
    pool_each_window(H, W, [&](int o, int h0, int h1, int w0, int w1, int padded) {
        float sum = 0.f;
        for (int h = h0; h < h1; h++) for (int w = w0; w < w1; w++) sum += x[h * W + w];
        y[o] = sum / POOL_COUNT;
    });
}
"""

# in0 dy [N, C, OH, OW] -> out0 dx [N, C, H, W]: dy / POOL_COUNT added to each input of the window.
_AVG_POOL_BACKWARD_SRC = """
POOL_PLANES;
const int H = out0_shape2, W = out0_shape3;
#pragma omp parallel for schedule(static)
for (long pl = 0; pl < planes; pl++) {
    const float* dy = in0_p + pl * POOL_OH * POOL_OW;
    float* dx = out0_p + pl * H * W;
    for (int i = 0; i < H * W; i++) dx[i] = 0.f;
    pool_each_window(H, W, [&](int o, int h0, int h1, int w0, int w1, int padded) {
        const float g = dy[o] / POOL_COUNT;
        for (int h = h0; h < h1; h++) for (int w = w0; w < w1; w++) dx[h * W + w] += g;
    });
}
"""


class _MaxPool2d(jt.Function):
    """2-D max pooling on CPU as two OpenMP kernels, the forward keeping each window's
    argmax for the backward (Jittor's pooling kernels run on one thread: 71 ms of an r18vd
    training step at 640 for the stem's pooling and its gradient)."""

    def execute(self, x: jt.Var, header: str, shape: Tuple[int, int, int, int]) -> jt.Var:
        """Returns the window maxima ``[bs, c, out_h, out_w]``."""
        y, argmax = jt.code([shape, shape], ["float32", "int32"], [x],
                            cpu_header=header + _MAX_POOL_PLANE,
                            cpu_src=_MAX_POOL_FORWARD_SRC)
        self.saved = (x.shape, argmax.detach(), header)
        return y

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, None, None]:
        """Adds each output's gradient to its window's maximum."""
        shape, argmax, header = self.saved
        return jt.code(shape, "float32", [argmax, grad_y], cpu_header=header,
                       cpu_src=_MAX_POOL_BACKWARD_SRC), None, None


class _AvgPool2d(jt.Function):
    """2-D average pooling on CPU as two OpenMP kernels (Jittor's run on one thread)."""

    def execute(self, x: jt.Var, header: str, shape: Tuple[int, int, int, int]) -> jt.Var:
        """Returns the window averages ``[bs, c, out_h, out_w]``."""
        self.saved = (x.shape, header)
        return jt.code(shape, "float32", [x],
                       cpu_header=header, cpu_src=_AVG_POOL_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, None, None]:
        """Spreads each output's gradient evenly over its window's count."""
        shape, header = self.saved
        return jt.code(shape, "float32", [grad_y], cpu_header=header,
                       cpu_src=_AVG_POOL_BACKWARD_SRC), None, None



def max_pool2d(x: jt.Var, kernel_size, stride=None, padding=0, ceil_mode: bool = False) -> jt.Var:
    """2-D max pooling with torch's ``F.max_pool2d`` semantics (OpenMP kernels on CPU).

    Padding never wins (windows are clipped to the image), the first maximum of a window in
    row-major order takes the gradient, and a NaN is the maximum of its window. On CUDA
    Jittor's ``nn.max_pool2d``.

    Args:
        x: Float32 input ``[bs, c, h, w]``.
        kernel_size: Window size, an int or ``(kh, kw)``.
        stride: Window step (int or pair); ``None`` means ``kernel_size``.
        padding: Implicit padding on each side (int or pair), at most half the kernel.
        ceil_mode: Round the output size up instead of down.

    Returns:
        ``[bs, c, out_h, out_w]``.

    Raises:
        ValueError: If ``x`` is not 4-D, the sizes are invalid or the output is empty.
        TypeError: If ``x`` is not float32.
    """
    header, shape = _pool_geometry("max_pool2d", x, kernel_size, stride, padding, ceil_mode)
    if jt.flags.use_cuda:
        return nn.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)
    return _MaxPool2d.apply(x, header, shape)


def avg_pool2d(x: jt.Var, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> jt.Var:
    """2-D average pooling with torch's ``F.avg_pool2d`` semantics (OpenMP kernels on CPU).

    A window's divisor is its size including the padding (``count_include_pad``) but never
    the part past the far padding that ``ceil_mode`` adds, or its in-image count otherwise.
    On CUDA Jittor's ``nn.avg_pool2d``. The other arguments, the result and the errors are
    :func:`max_pool2d`'s (the padding is zeros).

    Args:
        count_include_pad: Count the padding in the divisor.
    """
    header, shape = _pool_geometry("avg_pool2d", x, kernel_size, stride, padding, ceil_mode)
    if jt.flags.use_cuda:
        return nn.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    count = "padded" if count_include_pad else "((h1 - h0) * (w1 - w0))"
    return _AvgPool2d.apply(x, header + f"#define POOL_COUNT {count}\n", shape)


# in0 x [B, M, N] -> out0 y [B, N, M], in 32 x 32 tiles (one tile per OpenMP iteration), so
# that both the reads and the writes stay within a few cache lines per row.
_SWAP_LAST_AXES_SRC = """
const int B = in0_shape0, M = in0_shape1, N = in0_shape2;
const int TM = (M + 31) / 32, TN = (N + 31) / 32;
#pragma omp parallel for schedule(static)
for (long t = 0; t < (long)B * TM * TN; t++) {
    const int b = t / ((long)TM * TN), r = t % ((long)TM * TN);
    const int i0 = (r / TN) * 32, j0 = (r % TN) * 32;
    const int i1 = std::min(i0 + 32, M), j1 = std::min(j0 + 32, N);
    const float* x = in0_p + (size_t)b * M * N;
    float* y = out0_p + (size_t)b * M * N;
    for (int j = j0; j < j1; j++) for (int i = i0; i < i1; i++) y[(size_t)j * M + i] = x[(size_t)i * N + j];
}
"""


def _swap_last_axes_kernel(x: jt.Var) -> jt.Var:
    """The tiled transpose kernel of a float32 ``[b, m, n]``, giving ``[b, n, m]``."""
    return jt.code((x.shape[0], x.shape[2], x.shape[1]), "float32", [x],
                   cpu_header="#include <algorithm>", cpu_src=_SWAP_LAST_AXES_SRC)


class _SwapLastAxes(jt.Function):
    """``[b, m, n] -> [b, n, m]`` on CPU as an OpenMP kernel, which is also its gradient.

    Jittor's CPU transpose runs on one thread: the ten of an r18vd training step at 640
    (the token layouts of the encoder and the decoder's memory, forward and backward) took
    36 ms.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        """Returns the transposed copy."""
        return _swap_last_axes_kernel(x)

    def grad(self, grad_y: jt.Var) -> jt.Var:
        """The gradient's transposed copy."""
        return _swap_last_axes_kernel(grad_y)


def swap_last_axes(x: jt.Var) -> jt.Var:
    """``x.permute(0, 2, 1)`` of a 3-D tensor as a contiguous copy, an OpenMP kernel on CPU
    (``permute`` on CUDA).

    Args:
        x: Float32 ``[b, m, n]``.

    Returns:
        ``[b, n, m]``.

    Raises:
        ValueError: If ``x`` is not 3-D.
        TypeError: If ``x`` is not float32.
    """
    if x.ndim != 3:
        raise ValueError(f"swap_last_axes expects [b, m, n], got shape {list(x.shape)}")
    _require_float32("swap_last_axes", x=x)
    if jt.flags.use_cuda:
        return x.permute(0, 2, 1)
    return _SwapLastAxes.apply(x)


# The scalars of one AdamW update, in the order of ADAMW_HYPER (a float32 Var, so that the
# kernel is compiled once, not once per step): the decay factor 1 - lr * wd, the first
# moment's lerp weight 1 - beta1, beta2, 1 - beta2, 1 / sqrt(1 - beta2^step), eps and
# -lr / (1 - beta1^step).
_ADAMW_FIELDS = ("decay", "lerp", "beta2", "one_minus_beta2", "inv_bc2_sqrt", "eps", "neg_step_size")


def adamw_hyperparameters(lr: float, weight_decay: float, betas: Tuple[float, float],
                          eps: float, step: int) -> jt.Var:
    """The float32 ``[7]`` Var of scalars :func:`adamw_update` takes, for update ``step``.

    Each is computed in float64 and rounded to float32 once, as torch's ``AdamW`` does when
    it applies a Python scalar to a float32 tensor (the bias corrections' square root and
    reciprocal are taken in float64, then rounded).

    Args:
        lr: Learning rate.
        weight_decay: Decoupled weight decay.
        betas: ``(beta1, beta2)``.
        eps: Added to the denominator after the square root.
        step: The parameter's update count, this update included (from 1).

    Returns:
        float32 ``[7]``.

    Raises:
        ValueError: If ``step`` is below 1.
    """
    if step < 1:
        raise ValueError(f"adamw_hyperparameters: step {step} must be at least 1")
    beta1, beta2 = betas
    values = {"decay": 1 - lr * weight_decay, "lerp": 1 - beta1, "beta2": beta2,
              "one_minus_beta2": 1 - beta2, "inv_bc2_sqrt": 1 / (1 - beta2 ** step) ** 0.5,
              "eps": eps, "neg_step_size": -lr / (1 - beta1 ** step)}
    return jt.array([values[k] for k in _ADAMW_FIELDS]).float32()


# in0 param, in1 grad, in2 exp_avg, in3 exp_avg_sq (float32, one shape), in4 the scalars
#   -> out0 param, out1 exp_avg, out2 exp_avg_sq; element by element, torch's single-tensor
# AdamW: p *= decay; m = lerp(m, g, 1 - beta1) (m + w * (g - m), as torch for w < 0.5);
# v = v * beta2 + (1 - beta2) * g * g; p += -step_size * m / (sqrt(v) / sqrt(bc2) + eps).
_ADAMW_SRC = """
const float decay = in4_p[0], lerp = in4_p[1], beta2 = in4_p[2], one_minus_beta2 = in4_p[3];
const float inv_bc2_sqrt = in4_p[4], eps = in4_p[5], neg_step_size = in4_p[6];
const size_t n = in0->num;
#pragma omp parallel for schedule(static)
for (size_t i = 0; i < n; i++) {
    const float g = in1_p[i];
    const float m = in2_p[i] + lerp * (g - in2_p[i]);
    const float v = in3_p[i] * beta2 + one_minus_beta2 * g * g;
    const float denom = std::sqrt(v) * inv_bc2_sqrt + eps;
    out0_p[i] = in0_p[i] * decay + neg_step_size * (m / denom);
    out1_p[i] = m;
    out2_p[i] = v;
}
"""


def _adamw_update_ops(param: jt.Var, grad: jt.Var, exp_avg: jt.Var, exp_avg_sq: jt.Var,
                      hyper: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """:func:`adamw_update` composed of Jittor ops (the CUDA path)."""
    h = dict(zip(_ADAMW_FIELDS, (hyper[i] for i in range(len(_ADAMW_FIELDS)))))
    m = exp_avg + h["lerp"] * (grad - exp_avg)
    v = exp_avg_sq * h["beta2"] + h["one_minus_beta2"] * grad * grad
    denom = jt.sqrt(v) * h["inv_bc2_sqrt"] + h["eps"]
    return param * h["decay"] + h["neg_step_size"] * (m / denom), m, v


def adamw_update(param: jt.Var, grad: jt.Var, exp_avg: jt.Var, exp_avg_sq: jt.Var,
                 hyper: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var]:
    """One AdamW update of one parameter, torch's single-tensor formulas, as one OpenMP
    kernel on CPU (Jittor ops on CUDA).

    Composed of Jittor ops, the updates of r18vd's 326 parameters took 49 ms of
    single-threaded kernels per step.

    Args:
        param: The parameter, float32.
        grad: Its gradient, float32, the parameter's shape.
        exp_avg: First moment, float32, the parameter's shape.
        exp_avg_sq: Second moment, float32, the parameter's shape.
        hyper: :func:`adamw_hyperparameters` of this update.

    Returns:
        The new parameter, first moment and second moment (the caller ``update``s them).

    Raises:
        ValueError: If the shapes differ or ``hyper`` is not ``[7]``.
        TypeError: If a tensor is not float32.
    """
    shapes = [list(t.shape) for t in (param, grad, exp_avg, exp_avg_sq)]
    if any(s != shapes[0] for s in shapes) or list(hyper.shape) != [len(_ADAMW_FIELDS)]:
        raise ValueError(f"adamw_update: param, grad, exp_avg and exp_avg_sq must share one shape "
                         f"and hyper be [{len(_ADAMW_FIELDS)}]; got {shapes} and {list(hyper.shape)}")
    _require_float32("adamw_update", param=param, grad=grad, exp_avg=exp_avg,
                     exp_avg_sq=exp_avg_sq, hyper=hyper)
    if jt.flags.use_cuda:
        return _adamw_update_ops(param, grad, exp_avg, exp_avg_sq, hyper)
    return tuple(jt.code([param.shape] * 3, ["float32"] * 3, [param, grad, exp_avg, exp_avg_sq, hyper],
                         cpu_header="#include <cmath>", cpu_src=_ADAMW_SRC))


@functools.lru_cache(maxsize=None)
def has_dnnl_sgemm() -> bool:
    """Whether oneDNN's ``dnnl_sgemm`` is among the process's global symbols.

    Jittor loads its oneDNN operators (and with them oneDNN) with ``RTLD_GLOBAL`` when it has
    oneDNN, so a ``jt.code`` kernel can call ``dnnl_sgemm`` without linking it itself.
    """
    try:
        return hasattr(ctypes.CDLL(None), "dnnl_sgemm")
    except OSError:
        return False


# oneDNN's row-major C API (dnnl.h), declared here so that kernels need no oneDNN headers.
_SGEMM_HEADER = """
#include <cstdint>
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                          float* C, int64_t ldc);
"""

# in0 a [n, m, k] (SGEMM_TA: [n, k, m]), in1 b [n, k, p] (SGEMM_TB: [n, p, k]) -> out0 [n, m, p]:
# one sgemm per slice, the slices spread over the OpenMP threads (oneDNN runs each on its
# caller's thread inside a parallel region).
_BATCHED_SGEMM_SRC = """
const int64_t n = out0_shape0, M = out0_shape1, P = out0_shape2;
const int64_t K = SGEMM_TA ? in0_shape1 : in0_shape2;
#pragma omp parallel for schedule(static)
for (int64_t i = 0; i < n; i++)
    dnnl_sgemm(SGEMM_TA ? 'T' : 'N', SGEMM_TB ? 'T' : 'N', M, P, K, 1.f, in0_p + i * M * K,
               SGEMM_TA ? M : K, in1_p + i * K * P, SGEMM_TB ? K : P, 0.f, out0_p + i * M * P, P);
"""


def _matmul_2d(x: jt.Var, y: jt.Var, transpose_x: bool = False, transpose_y: bool = False) -> jt.Var:
    """One 2-D product ``op(x) @ op(y)``, where ``op`` transposes when asked.

    Written as the broadcast product and sum that Jittor hands to oneDNN, with the transpose
    as oneDNN's flag (transposing first would cost a separate single-threaded copy).

    Args:
        x: ``[m, k]``, or ``[k, m]`` with ``transpose_x``.
        y: ``[k, p]``, or ``[p, k]`` with ``transpose_y``.

    Returns:
        ``[m, p]``.
    """
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
    """``op(a[i]) @ op(b[i])`` for every ``i``, stacked from ``n`` 2-D Jittor products.

    Args:
        a: ``[n, m, k]``, or ``[n, k, m]`` with ``transpose_a``.
        b: ``[n, k, p]``, or ``[n, p, k]`` with ``transpose_b``.

    Returns:
        ``[n, m, p]``.
    """
    return jt.stack([_matmul_2d(a[i], b[i], transpose_a, transpose_b) for i in range(a.shape[0])])


def batched_sgemm(a: jt.Var, b: jt.Var, transpose_a: bool = False,
                  transpose_b: bool = False) -> jt.Var:
    """``op(a[i]) @ op(b[i])`` for every ``i`` as one kernel of oneDNN products (CPU only).

    Each slice's product is oneDNN's ``sgemm``, the 2-D product Jittor's own CPU matmul
    calls, so the results equal stacked 2-D ``jt.matmul`` products bit for bit; one kernel
    replaces ``n`` products, ``n`` slicings and a stack.

    Args:
        a: Float32 ``[n, m, k]``, or ``[n, k, m]`` with ``transpose_a``.
        b: Float32 ``[n, k, p]``, or ``[n, p, k]`` with ``transpose_b``.
        transpose_a: Whether ``op`` transposes the slices of ``a``.
        transpose_b: Whether ``op`` transposes the slices of ``b``.

    Returns:
        ``[n, m, p]``.

    Raises:
        ValueError: If the shapes do not fit.
        TypeError: If ``a`` or ``b`` is not float32.
    """
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"batched_sgemm expects 3-D operands, got {list(a.shape)} and {list(b.shape)}")
    n, m, k = (a.shape[0], a.shape[2], a.shape[1]) if transpose_a else a.shape
    k_b, p = (b.shape[2], b.shape[1]) if transpose_b else b.shape[1:]
    if b.shape[0] != n or k_b != k:
        raise ValueError(f"batched_sgemm: {list(a.shape)} (transposed: {transpose_a}) and "
                         f"{list(b.shape)} (transposed: {transpose_b}) do not multiply")
    _require_float32("batched_sgemm", a=a, b=b)
    if jt.flags.use_cuda or not has_dnnl_sgemm():
        return _slice_matmul(a, b, transpose_a, transpose_b)
    header = _SGEMM_HEADER + f"#define SGEMM_TA {int(transpose_a)}\n#define SGEMM_TB {int(transpose_b)}\n"
    return jt.code((n, m, p), "float32", [a, b], cpu_header=header, cpu_src=_BATCHED_SGEMM_SRC)


# in0 x [M, K], in1 weight [N, K][, in2 bias [N]] -> out0 y [M, N] = x @ weight^T (+ bias): the
# bias rows are written first and the product added to them (beta = 1), as torch's addmm does.
_LINEAR_FORWARD_SRC = """
const int64_t M = in0_shape0, K = in0_shape1, N = in1_shape0;
#pragma omp parallel for schedule(static)
for (int64_t i = 0; i < M; i++)
    for (int64_t j = 0; j < N; j++) out0_p[i * N + j] = LINEAR_BIAS ? LINEAR_BIAS[j] : 0.f;
dnnl_sgemm('N', 'T', M, N, K, 1.f, in0_p, K, in1_p, K, 1.f, out0_p, N);
"""

# in0 x [M, K], in1 weight [N, K], in2 dy [M, N] -> out0 dx [M, K] = dy @ weight,
# out1 dweight [N, K] = dy^T @ x, out2 dbias [N] = column sums of dy in float64: each block
# of LINEAR_ROWS rows is summed by one thread, the blocks' sums then in block order (the
# same result whatever the thread count).
_LINEAR_BACKWARD_SRC = """
const int64_t M = in0_shape0, K = in0_shape1, N = in1_shape0;
dnnl_sgemm('N', 'N', M, K, N, 1.f, in2_p, N, in1_p, K, 0.f, out0_p, K);
dnnl_sgemm('T', 'N', N, K, M, 1.f, in2_p, N, in0_p, K, 0.f, out1_p, K);
const int64_t LINEAR_ROWS = 64, blocks = (M + LINEAR_ROWS - 1) / LINEAR_ROWS;
std::vector<double> partial(blocks * N, 0.0);
#pragma omp parallel for schedule(static)
for (int64_t blk = 0; blk < blocks; blk++) {
    double* sum = partial.data() + blk * N;
    for (int64_t i = blk * LINEAR_ROWS; i < std::min(M, (blk + 1) * LINEAR_ROWS); i++)
        for (int64_t j = 0; j < N; j++) sum[j] += in2_p[i * N + j];
}
for (int64_t j = 0; j < N; j++) {
    double total = 0;
    for (int64_t blk = 0; blk < blocks; blk++) total += partial[blk * N + j];
    out2_p[j] = (float)total;
}
"""


class _Linear(jt.Function):
    """``x @ weight^T + bias`` over rows on CPU: one kernel forward (oneDNN's ``sgemm`` on
    the bias rows), one backward (two ``sgemm``\ s and the bias's column sums)."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: Optional[jt.Var]) -> jt.Var:
        """Returns ``[M, N]`` for ``x`` ``[M, K]``."""
        self.saved = (x, weight, bias is not None)
        header = _SGEMM_HEADER + f"#define LINEAR_BIAS {'in2_p' if bias is not None else '((const float*)nullptr)'}\n"
        return jt.code((x.shape[0], weight.shape[0]), "float32",
                       [x, weight] + ([bias] if bias is not None else []),
                       cpu_header=header, cpu_src=_LINEAR_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, Optional[jt.Var]]:
        """Gradients with respect to ``x``, ``weight`` and ``bias``."""
        x, weight, has_bias = self.saved
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, weight.shape, (weight.shape[0],)], ["float32"] * 3, [x, weight, grad_y],
            cpu_header=_SGEMM_HEADER + "#include <algorithm>\n#include <vector>\n",
            cpu_src=_LINEAR_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias if has_bias else None


def linear(x: jt.Var, weight: jt.Var, bias: Optional[jt.Var] = None) -> jt.Var:
    """``x @ weight^T + bias`` over the last axis, torch's ``F.linear``.

    On CPU with oneDNN loaded (:func:`has_dnnl_sgemm`) one kernel forward and one backward
    (:class:`_Linear`); composed of Jittor's matmul and a broadcast add, a linear layer is
    three to five kernels with a single-threaded bias add and bias gradient (27 ms of an r18vd
    training step at 640). Elsewhere ``jittor.nn.linear``.

    Args:
        x: Float32 ``[..., in_features]``.
        weight: Float32 ``[out_features, in_features]``.
        bias: Optional float32 ``[out_features]``.

    Returns:
        ``[..., out_features]``.

    Raises:
        ValueError: If the shapes do not fit.
        TypeError: If a tensor is not float32.
    """
    if (weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]
            or (bias is not None and list(bias.shape) != [weight.shape[0]])):
        raise ValueError(f"linear: input {list(x.shape)}, weight {list(weight.shape)} and bias "
                         f"{None if bias is None else list(bias.shape)} do not fit [..., in], "
                         f"[out, in], [out]")
    _require_float32("linear", x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if jt.flags.use_cuda or not has_dnnl_sgemm():
        return nn.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    y = _Linear.apply(rows, weight, bias)  # [M, out]
    return y.reshape(*x.shape[:-1], weight.shape[0])  # [..., out]


# Rows of the last axis: in0 x [rows, D], in1 weight [D], in2 bias [D] -> out0 y [rows, D],
# out1 mean [rows], out2 rstd [rows]; mean and variance of a row in float64 (two passes, the
# variance of the centred values, as torch), y = (x - mean) * rstd * weight + bias.
_LAYER_NORM_FORWARD_SRC = """
const int64_t D = in1_shape0, rows = in0->num / D;
#pragma omp parallel for schedule(static)
for (int64_t r = 0; r < rows; r++) {
    const float* x = in0_p + r * D;
    float* y = out0_p + r * D;
    double sum = 0;
    for (int64_t i = 0; i < D; i++) sum += x[i];
    const double mean = sum / D;
    double squares = 0;
    for (int64_t i = 0; i < D; i++) { const double d = x[i] - mean; squares += d * d; }
    const float rstd = (float)(1.0 / std::sqrt(squares / D + LN_EPS));
    const float m = (float)mean;
    for (int64_t i = 0; i < D; i++) y[i] = (x[i] - m) * rstd * in1_p[i] + in2_p[i];
    out1_p[r] = m;
    out2_p[r] = rstd;
}
"""

# in0 x [rows, D], in1 dy [rows, D], in2 weight [D], in3 mean [rows], in4 rstd [rows]
#   -> out0 dx [rows, D], out1 dweight [D], out2 dbias [D]. With xhat = (x - mean) * rstd and
# g = dy * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (row means in float64);
# dweight = sum over rows of dy * xhat and dbias = sum of dy, in float64, by blocks of
# LN_ROWS rows (each block one thread's), the blocks added in order.
_LAYER_NORM_BACKWARD_SRC = """
const int64_t D = in2_shape0, rows = in0->num / D;
const int64_t LN_ROWS = 64, blocks = (rows + LN_ROWS - 1) / LN_ROWS;
std::vector<double> partial(blocks * 2 * D, 0.0);
#pragma omp parallel for schedule(static)
for (int64_t blk = 0; blk < blocks; blk++) {
    double* dw = partial.data() + blk * 2 * D;
    double* db = dw + D;
    for (int64_t r = blk * LN_ROWS; r < std::min(rows, (blk + 1) * LN_ROWS); r++) {
        const float* x = in0_p + r * D;
        const float* dy = in1_p + r * D;
        float* dx = out0_p + r * D;
        const float m = in3_p[r], rstd = in4_p[r];
        double sum_g = 0, sum_g_xhat = 0;
        for (int64_t i = 0; i < D; i++) {
            const float xhat = (x[i] - m) * rstd;
            const float g = dy[i] * in2_p[i];
            sum_g += g;
            sum_g_xhat += (double)g * xhat;
            dw[i] += (double)dy[i] * xhat;
            db[i] += dy[i];
        }
        const float mean_g = (float)(sum_g / D), mean_g_xhat = (float)(sum_g_xhat / D);
        for (int64_t i = 0; i < D; i++) {
            const float xhat = (x[i] - m) * rstd;
            dx[i] = rstd * (dy[i] * in2_p[i] - mean_g - xhat * mean_g_xhat);
        }
    }
}
for (int64_t i = 0; i < D; i++) {
    double dw = 0, db = 0;
    for (int64_t blk = 0; blk < blocks; blk++) { dw += partial[blk * 2 * D + i]; db += partial[blk * 2 * D + D + i]; }
    out1_p[i] = (float)dw;
    out2_p[i] = (float)db;
}
"""


class _LayerNorm(jt.Function):
    """LayerNorm over the last axis with a scale and shift, on CPU as two OpenMP kernels
    (one row per iteration forward; blocks of rows backward)."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
        """Returns the normalised, scaled and shifted ``x``."""
        header = f"#include <cmath>\n#define LN_EPS ({float(eps)!r})\n"
        rows = x.numel() // x.shape[-1]
        y, mean, rstd = jt.code([x.shape, (rows,), (rows,)], ["float32"] * 3, [x, weight, bias],
                                cpu_header=header, cpu_src=_LAYER_NORM_FORWARD_SRC)
        self.saved = (x, weight, mean.detach(), rstd.detach())
        return y

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, jt.Var, None]:
        """Gradients with respect to ``x``, ``weight`` and ``bias`` (``None`` for ``eps``)."""
        x, weight, mean, rstd = self.saved
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, weight.shape, weight.shape], ["float32"] * 3, [x, grad_y, weight, mean, rstd],
            cpu_header="#include <algorithm>\n#include <vector>\n", cpu_src=_LAYER_NORM_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias, None


def layer_norm(x: jt.Var, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
    """LayerNorm over the last axis, torch's ``F.layer_norm(x, (d,), weight, bias, eps)``.

    On CPU two OpenMP kernels with the row statistics and the parameter gradients in float64;
    composed of Jittor ops (single-threaded mean, centring, variance and their derived
    gradients) the LayerNorms of an r18vd training step at 640 took about 40 ms. On CUDA the
    composition.

    Args:
        x: Float32 ``[..., d]``.
        weight: Float32 ``[d]``.
        bias: Float32 ``[d]``.
        eps: Added to the variance before the square root.

    Returns:
        A tensor of the shape of ``x``.

    Raises:
        ValueError: If ``weight`` or ``bias`` is not ``[d]``.
        TypeError: If a tensor is not float32.
    """
    if x.ndim == 0 or any(list(v.shape) != [x.shape[-1]] for v in (weight, bias)):
        raise ValueError(f"layer_norm: input {list(x.shape)}, weight {list(weight.shape)} and bias "
                         f"{list(bias.shape)} do not fit [..., d], [d], [d]")
    _require_float32("layer_norm", x=x, weight=weight, bias=bias)
    if jt.flags.use_cuda:
        return _layer_norm_ops(x, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)


def _layer_norm_ops(x: jt.Var, weight: jt.Var, bias: jt.Var, eps: float) -> jt.Var:
    """:func:`layer_norm` composed of Jittor ops (the CUDA path): the mean subtracted before
    the variance, as torch."""
    mean = x.mean(dim=-1, keepdims=True)  # [..., 1]
    centered = x - mean
    var = (centered * centered).mean(dim=-1, keepdims=True)  # [..., 1]
    return centered / jt.sqrt(var + eps) * weight + bias


# Pointwise convolution of contiguous [N, Ci, H, W] maps: image n's output [Co, H*W] is
# weight [Co, Ci] @ x_n [Ci, H*W], one oneDNN sgemm in the maps' own layout (Jittor's
# convolution reorders both maps to a blocked layout and back).
# in0 x, in1 weight [Co, Ci, 1, 1][, in2 bias [Co]] -> out0 y [N, Co, H, W]; a bias fills the
# output first and the product is added to it (beta = 1).
_CONV1X1_FORWARD_SRC = """
const int64_t N = in0_shape0, Ci = in0_shape1, HW = (int64_t)in0_shape2 * in0_shape3, Co = in1_shape0;
for (int64_t n = 0; n < N; n++) {
    float* y = out0_p + n * Co * HW;
    if (CONV_BIAS) {
        #pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < Co; c++)
            for (int64_t i = 0; i < HW; i++) y[c * HW + i] = CONV_BIAS[c];
    }
    dnnl_sgemm('N', 'N', Co, HW, Ci, 1.f, in1_p, Ci, in0_p + n * Ci * HW, HW, CONV_BIAS ? 1.f : 0.f, y, HW);
}
"""

# in0 x, in1 weight, in2 dy [N, Co, H, W] -> out0 dx = weight^T @ dy_n per image,
# out1 dweight = sum over images of dy_n @ x_n^T (image by image, in order; zeros when
# CONV_WEIGHT_GRAD is 0, a frozen weight), out2 dbias [Co] = per-channel sums of dy in
# float64 (zeros without a bias).
_CONV1X1_BACKWARD_SRC = """
const int64_t N = in0_shape0, Ci = in0_shape1, HW = (int64_t)in0_shape2 * in0_shape3, Co = in1_shape0;
for (int64_t n = 0; n < N; n++) {
    dnnl_sgemm('T', 'N', Ci, HW, Co, 1.f, in1_p, Ci, in2_p + n * Co * HW, HW, 0.f, out0_p + n * Ci * HW, HW);
    if (CONV_WEIGHT_GRAD)
        dnnl_sgemm('N', 'T', Co, Ci, HW, 1.f, in2_p + n * Co * HW, HW, in0_p + n * Ci * HW, HW,
                   n ? 1.f : 0.f, out1_p, Ci);
}
if (!CONV_WEIGHT_GRAD) for (int64_t i = 0; i < Co * Ci; i++) out1_p[i] = 0.f;
#pragma omp parallel for schedule(static)
for (int64_t c = 0; c < Co; c++) {
    double sum = 0;
    if (CONV_BIAS_GRAD)
        for (int64_t n = 0; n < N; n++) for (int64_t i = 0; i < HW; i++) sum += in2_p[(n * Co + c) * HW + i];
    out2_p[c] = (float)sum;
}
"""


class _Conv1x1(jt.Function):
    """Pointwise convolution on CPU as oneDNN ``sgemm`` calls in the NCHW layout."""

    def execute(self, x: jt.Var, weight: jt.Var, bias: Optional[jt.Var]) -> jt.Var:
        """Returns ``[N, Co, H, W]``."""
        bias_ptr = "in2_p" if bias is not None else "((const float*)nullptr)"
        self.saved = (x, weight, not weight.is_stop_grad(), bias is not None)
        return jt.code((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), "float32",
                       [x, weight] + ([bias] if bias is not None else []),
                       cpu_header=_SGEMM_HEADER + f"#define CONV_BIAS {bias_ptr}\n",
                       cpu_src=_CONV1X1_FORWARD_SRC)

    def grad(self, grad_y: jt.Var) -> Tuple[jt.Var, jt.Var, Optional[jt.Var]]:
        """Gradients with respect to ``x``, ``weight`` and ``bias``."""
        x, weight, weight_grad, has_bias = self.saved
        header = (_SGEMM_HEADER + f"#define CONV_WEIGHT_GRAD {int(weight_grad)}\n"
                  f"#define CONV_BIAS_GRAD {int(has_bias)}\n")
        grad_x, grad_weight, grad_bias = jt.code(
            [x.shape, weight.shape, (weight.shape[0],)], ["float32"] * 3, [x, weight, grad_y],
            cpu_header=header, cpu_src=_CONV1X1_BACKWARD_SRC)
        return grad_x, grad_weight, grad_bias if has_bias else None


def conv1x1(x: jt.Var, weight: jt.Var, bias: Optional[jt.Var] = None) -> jt.Var:
    """A 1x1 convolution (stride 1, no padding, one group) as oneDNN ``sgemm`` calls (CPU only).

    Jittor's CPU convolution reorders the maps to a blocked
    layout and back around oneDNN's convolution; a pointwise one is a matrix product per
    image in the NCHW layout itself (measured, 2 threads, the 1x1 convolutions of an r18vd
    training step at 640: forward 77 ms against 41 ms, forward and backward 207 against
    151 ms).

    Args:
        x: Float32 ``[N, Ci, H, W]``.
        weight: Float32 ``[Co, Ci, 1, 1]``.
        bias: Optional float32 ``[Co]``.

    Returns:
        ``[N, Co, H, W]``.

    Raises:
        ValueError: If the shapes do not fit.
        TypeError: If a tensor is not float32.
    """
    if (x.ndim != 4 or weight.ndim != 4 or tuple(weight.shape[1:]) != (x.shape[1], 1, 1)
            or (bias is not None and list(bias.shape) != [weight.shape[0]])):
        raise ValueError(f"conv1x1: input {list(x.shape)}, weight {list(weight.shape)} and bias "
                         f"{None if bias is None else list(bias.shape)} do not fit [N, Ci, H, W], "
                         f"[Co, Ci, 1, 1], [Co]")
    _require_float32("conv1x1", x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if jt.flags.use_cuda or not has_dnnl_sgemm():
        return nn.conv2d(x, weight, bias)
    return _Conv1x1.apply(x, weight, bias)
