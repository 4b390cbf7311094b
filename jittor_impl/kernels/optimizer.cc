// Optimizer kernels: one parameter's AdamW update. Snippet format: see normalisation.cc.

// @snippet adamw_header
#include <cmath>

// @snippet adamw_update
// torch's single-tensor AdamW, element by element. Header: adamw_header. Defines: the index of
// each scalar in in4, ADAMW_<NAME> for each name of _ADAMW_FIELDS in jittor_impl/_kernels.py.
// in0 param, in1 grad, in2 exp_avg, in3 exp_avg_sq (float32, one shape), in4 the scalars [7]
//   -> out0 param, out1 exp_avg, out2 exp_avg_sq.
// p *= decay (1 - lr * wd); m = lerp(m, g, 1 - beta1) (m + w * (g - m), as torch for w < 0.5);
// v = v * beta2 + (1 - beta2) * g * g; p += -step_size * m / (sqrt(v) / sqrt(bc2) + eps), with
// neg_step_size = -lr / (1 - beta1^step) and inv_bc2_sqrt = 1 / sqrt(1 - beta2^step).
const float decay = in4_p[ADAMW_DECAY], lerp = in4_p[ADAMW_LERP], beta2 = in4_p[ADAMW_BETA2];
const float one_minus_beta2 = in4_p[ADAMW_ONE_MINUS_BETA2], inv_bc2_sqrt = in4_p[ADAMW_INV_BC2_SQRT];
const float eps = in4_p[ADAMW_EPS], neg_step_size = in4_p[ADAMW_NEG_STEP_SIZE];
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
