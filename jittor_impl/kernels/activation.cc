// Activation kernels: ReLU and softmax over the last axis. Snippet format: see normalisation.cc.

// @snippet relu_forward
// in0 x -> out0 y = max(x, 0), element by element over the flat tensor.
const size_t n = in0->num;
#pragma omp parallel for schedule(static)
for (size_t i = 0; i < n; i++) out0_p[i] = in0_p[i] > 0.f ? in0_p[i] : 0.f;

// @snippet relu_backward
// in0 y (the forward's output), in1 dy -> out0 dx: dy where y is positive, else 0 (torch's
// threshold_backward on the output, so zero at x == 0).
const size_t n = in0->num;
#pragma omp parallel for schedule(static)
for (size_t i = 0; i < n; i++) out0_p[i] = in0_p[i] > 0.f ? in1_p[i] : 0.f;

// @snippet softmax_header
#include <cmath>

// @snippet softmax_forward
// Softmax over the last axis, forward. Header: softmax_header. Defines: SOFTMAX_ROW_LENGTH
// (in0_shapeD of the last axis D).
// in0 x [rows, L] -> out0 y [rows, L], one row per OpenMP iteration, the row sum in float64.
// Masked entries are -inf: exp(-inf - max) is 0, and a row of -inf only gives NaN, as torch's.
const size_t L = SOFTMAX_ROW_LENGTH;
const size_t rows = in0->num / L;
#pragma omp parallel for schedule(static)
for (size_t r = 0; r < rows; r++) {
    const float* x = in0_p + r * L;
    float* y = out0_p + r * L;
    float top = x[0];
    for (size_t i = 1; i < L; i++) top = x[i] > top ? x[i] : top;
    double sum = 0;
    for (size_t i = 0; i < L; i++) { y[i] = std::exp(x[i] - top); sum += y[i]; }
    const float inv = (float)(1.0 / sum);
    for (size_t i = 0; i < L; i++) y[i] *= inv;
}

// @snippet softmax_backward
// Softmax over the last axis, backward. Defines: SOFTMAX_ROW_LENGTH.
// in0 y (the forward's output), in1 dy -> out0 dx = y * (dy - sum(dy * y)) per row, the sum in
// float64.
const size_t L = SOFTMAX_ROW_LENGTH;
const size_t rows = in0->num / L;
#pragma omp parallel for schedule(static)
for (size_t r = 0; r < rows; r++) {
    const float* y = in0_p + r * L;
    const float* dy = in1_p + r * L;
    float* dx = out0_p + r * L;
    double dot = 0;
    for (size_t i = 0; i < L; i++) dot += (double)dy[i] * y[i];
    const float d = (float)dot;
    for (size_t i = 0; i < L; i++) dx[i] = y[i] * (dy[i] - d);
}
