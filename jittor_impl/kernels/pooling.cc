// 2-D pooling kernels with torch's semantics (max with its argmax, average). Snippet format:
// see normalisation.cc.

// @snippet pool_header
// Pooling over the planes of a contiguous [N, C, H, W] tensor, one plane per OpenMP iteration
// (so that the backward's additions into a plane are one thread's). Defines: the kernel size
// POOL_KH, POOL_KW, stride POOL_SH, POOL_SW, padding POOL_PH, POOL_PW and output size POOL_OH,
// POOL_OW. Window (oh, ow) spans rows [oh * SH - PH, + KH) and columns [ow * SW - PW, + KW)
// clipped to the image, as in torch's CPU kernels.
#include <algorithm>
#include <cstdint>
#include <cstring>
#define POOL_PLANES const long planes = (long)in0_shape0 * in0_shape1
// NaN test on the bits: fast-math compilers may drop std::isnan.
static inline bool pool_is_nan(float v) {
    uint32_t bits; std::memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7fffffffu) > 0x7f800000u;
}
// Calls f(o, h0, h1, w0, w1, padded) for each window o = oh * OW + ow of an H x W plane in
// row-major order, with the window's clipped rows [h0, h1) and columns [w0, w1) and, for
// average pooling, its size clipped at the far padding only (`padded`).
template <class F>
static inline void pool_each_window(int H, int W, F f) {
    for (int oh = 0; oh < POOL_OH; oh++) for (int ow = 0; ow < POOL_OW; ow++) {
        const int h = oh * POOL_SH - POOL_PH, w = ow * POOL_SW - POOL_PW;
        const int padded = (std::min(h + POOL_KH, H + POOL_PH) - h) * (std::min(w + POOL_KW, W + POOL_PW) - w);
        f(oh * POOL_OW + ow, std::max(h, 0), std::min(h + POOL_KH, H), std::max(w, 0),
          std::min(w + POOL_KW, W), padded);
    }
}

// @snippet max_pool_plane
// One plane's max pooling (header, after pool_header). torch's rule: the first maximum in
// row-major window order, a NaN wins and the last NaN stays. WITH_NAN compiles the NaN test in;
// the forward uses it only for planes that hold a NaN (the test in every window is slow).
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

// @snippet max_pool_forward
// Header: pool_header, max_pool_plane.
// in0 x [N, C, H, W] -> out0 y [N, C, OH, OW], out1 argmax (flat index in the plane, int32).
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

// @snippet max_pool_backward
// Header: pool_header.
// in0 argmax [N, C, OH, OW], in1 dy [N, C, OH, OW] -> out0 dx [N, C, H, W]: each output's
// gradient added to its maximum, in output order.
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

// @snippet avg_pool_forward
// Header: pool_header. Defines: POOL_COUNT, the divisor (an expression of the window's h0, h1,
// w0, w1 and padded).
// in0 x [N, C, H, W] -> out0 y [N, C, OH, OW]: the window's float sum in row-major order over
// POOL_COUNT.
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

// @snippet avg_pool_backward
// Header: pool_header. Defines: POOL_COUNT.
// in0 dy [N, C, OH, OW] -> out0 dx [N, C, H, W]: dy / POOL_COUNT added to each input of the
// window.
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
