// Matrix-product kernels on oneDNN's sgemm (batched products, linear, pointwise convolution)
// and the tiled transpose of the last two axes. Snippet format: see normalisation.cc.
// Only run where oneDNN's dnnl_sgemm is in the process's global symbols (has_dnnl_sgemm).

// @snippet sgemm_header
// oneDNN's row-major C API (dnnl.h), declared here so that kernels need no oneDNN headers.
#include <algorithm>
#include <cstdint>
#include <vector>
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
                          float* C, int64_t ldc);

// @snippet batched_sgemm
// op(a[i]) @ op(b[i]) for every i. Header: sgemm_header. Defines: SGEMM_TA, SGEMM_TB (0 or 1).
// in0 a [n, m, k] (SGEMM_TA: [n, k, m]), in1 b [n, k, p] (SGEMM_TB: [n, p, k]) -> out0 [n, m, p].
// One sgemm per slice, the slices spread over the OpenMP threads (oneDNN runs each on its
// caller's thread inside a parallel region).
const int64_t n = out0_shape0, M = out0_shape1, P = out0_shape2;
const int64_t K = SGEMM_TA ? in0_shape1 : in0_shape2;
#pragma omp parallel for schedule(static)
for (int64_t i = 0; i < n; i++)
    dnnl_sgemm(SGEMM_TA ? 'T' : 'N', SGEMM_TB ? 'T' : 'N', M, P, K, 1.f, in0_p + i * M * K,
               SGEMM_TA ? M : K, in1_p + i * K * P, SGEMM_TB ? K : P, 0.f, out0_p + i * M * P, P);

// @snippet linear_forward
// x @ weight^T (+ bias). Header: sgemm_header. Defines: LINEAR_BIAS (in2_p, or a null
// const float*).
// in0 x [M, K], in1 weight [N, K][, in2 bias [N]] -> out0 y [M, N]. The bias rows are written
// first and the product added to them (beta = 1), as torch's addmm does.
const int64_t M = in0_shape0, K = in0_shape1, N = in1_shape0;
#pragma omp parallel for schedule(static)
for (int64_t i = 0; i < M; i++)
    for (int64_t j = 0; j < N; j++) out0_p[i * N + j] = LINEAR_BIAS ? LINEAR_BIAS[j] : 0.f;
dnnl_sgemm('N', 'T', M, N, K, 1.f, in0_p, K, in1_p, K, 1.f, out0_p, N);

// @snippet linear_backward
// Gradients of linear_forward. Header: sgemm_header.
// in0 x [M, K], in1 weight [N, K], in2 dy [M, N] -> out0 dx [M, K] = dy @ weight,
// out1 dweight [N, K] = dy^T @ x, out2 dbias [N] = column sums of dy in float64: each block of
// LINEAR_ROWS rows summed by one thread, then the blocks' sums in block order (the same result
// whatever the thread count).
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

// @snippet conv1x1_forward
// Pointwise convolution of contiguous [N, Ci, H, W] maps: image n's output [Co, H*W] is
// weight [Co, Ci] @ x_n [Ci, H*W], one sgemm in the maps' own layout. Header: sgemm_header.
// Defines: CONV_BIAS (in2_p, or a null const float*).
// in0 x [N, Ci, H, W], in1 weight [Co, Ci, 1, 1][, in2 bias [Co]] -> out0 y [N, Co, H, W];
// a bias fills the output first and the product is added to it (beta = 1).
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

// @snippet conv1x1_backward
// Gradients of conv1x1_forward. Header: sgemm_header. Defines: CONV_WEIGHT_GRAD (0 for a
// frozen weight), CONV_BIAS_GRAD (0 without a bias).
// in0 x [N, Ci, H, W], in1 weight [Co, Ci, 1, 1], in2 dy [N, Co, H, W]
//   -> out0 dx = weight^T @ dy_n per image, out1 dweight = sum over images of dy_n @ x_n^T
// (image by image, in order; zeros without CONV_WEIGHT_GRAD), out2 dbias [Co] = per-channel
// sums of dy in float64 (zeros without CONV_BIAS_GRAD).
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

// @snippet swap_last_axes_header
#include <algorithm>

// @snippet swap_last_axes
// The transpose of the last two axes as a contiguous copy. Header: swap_last_axes_header.
// in0 x [B, M, N] -> out0 y [B, N, M], in 32 x 32 tiles (one tile per OpenMP iteration), so
// that both the reads and the writes stay within a few cache lines per row.
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
