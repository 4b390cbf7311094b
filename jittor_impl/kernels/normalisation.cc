// Normalisation kernels: training-mode batch norm, the per-channel affine of eval-mode and
// frozen batch norm, and layer norm over the last axis.
//
// Snippet format (all files here): a line `// @snippet NAME` starts a snippet, which runs to the
// next such line. Header snippets (includes, macros, helpers) go to jt.code's cpu_header, source
// snippets (statements) to its cpu_src, where inK_p / outK_p point at the K-th input / output,
// inK_shapeD is its size along axis D and inK->num its element count. "Defines:" names the
// #defines that jittor_impl/_kernels.py prepends to the header.

// @snippet channel_header
// Channel c of a contiguous [N, C, H, W] tensor is N runs of H*W floats starting at
// (n * C + c) * H * W; C, HW and the channel c must be in scope where BN_CHANNEL is used.
#include <cmath>
#define BN_CHANNEL(ptr, n) ((ptr) + ((size_t)(n) * C + c) * HW)

// @snippet bn_forward
// Training-mode batch norm forward. Header: channel_header. Defines: BN_EPS.
// in0 x [N, C, H, W], in1 weight [C], in2 bias [C]
//   -> out0 y [N, C, H, W], out1 batch mean [C], out2 biased batch variance [C].
// One channel per OpenMP iteration, so each sum is one thread's float64 running sum; torch's
// CPU formulas: y = x * a + b with a = weight * invstd, b = bias - mean * a.
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

// @snippet bn_backward
// Training-mode batch norm backward. Header: channel_header. Defines: BN_EPS.
// in0 x [N, C, H, W], in1 dy [N, C, H, W], in2 weight [C], in3 mean [C], in4 var [C]
//   -> out0 dx [N, C, H, W], out1 dweight [C], out2 dbias [C].
// torch's CPU formula, with M = N * H * W and the channel sums in float64:
// dx = (dy - sum(dy) / M - (x - mean) * sum(dy * (x - mean)) * invstd^2 / M) * weight * invstd.
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

// @snippet affine_forward
// Per-channel affine forward. Header: channel_header.
// in0 x [N, C, H, W], in1 scale [C], in2 shift [C] -> out0 y = x * scale + shift per channel.
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

// @snippet affine_backward
// Per-channel affine backward. Header: channel_header. Defines: AFFINE_PARAM_GRADS (0 or 1).
// in0 x [N, C, H, W], in1 dy [N, C, H, W], in2 scale [C]
//   -> out0 dx [N, C, H, W], out1 dscale [C], out2 dshift [C] (channel sums in float64).
// AFFINE_PARAM_GRADS 0 (scale and shift without gradient, as in frozen and eval-mode batch
// norm) skips the sums and their read of x, and writes zeros.
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

// @snippet layer_norm_header
#include <algorithm>
#include <cmath>
#include <vector>

// @snippet layer_norm_forward
// Layer norm over the last axis, forward. Header: layer_norm_header. Defines: LN_EPS.
// in0 x [rows, D], in1 weight [D], in2 bias [D] -> out0 y [rows, D], out1 mean [rows],
// out2 rstd [rows]. One row per OpenMP iteration; its mean and variance in float64 (two
// passes, the variance of the centred values, as torch); y = (x - mean) * rstd * weight + bias.
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

// @snippet layer_norm_backward
// Layer norm over the last axis, backward. Header: layer_norm_header.
// in0 x [rows, D], in1 dy [rows, D], in2 weight [D], in3 mean [rows], in4 rstd [rows]
//   -> out0 dx [rows, D], out1 dweight [D], out2 dbias [D].
// With xhat = (x - mean) * rstd and g = dy * weight: dx = rstd * (g - mean(g) - xhat *
// mean(g * xhat)) (row means in float64); dweight = sum over rows of dy * xhat and dbias = sum
// of dy, in float64, by blocks of LN_ROWS rows (each block one thread's), the blocks added in
// order, so the result does not depend on the thread count.
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
