"""OpenMP CPU kernels for the hot parts of training (a Jittor-only file, no torch mirror).

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
  sampling and the weighted sum over levels and points).

On CUDA the callers use compositions of Jittor ops instead (``jittor_impl.common``,
``jittor_impl.decoder``), which Jittor parallelises there. Every kernel takes float32 only
and says so when given anything else.
"""

from typing import Optional, Sequence, Tuple

import jittor as jt
from jittor import nn

__all__ = ["batch_norm_train", "channel_affine", "relu", "softmax_last", "ms_deform_attn"]


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
