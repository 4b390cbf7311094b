// Multi-scale deformable attention kernels: bilinear sampling of each level's value map at each
// point and the weighted sum over levels and points, with its gradients. Snippet format: see
// normalisation.cc.

// @snippet msda_header
// Shapes: value [B, V, H, C] (levels concatenated along V), locations [B, Q, H, L, P, 2] in
// [0, 1] as (x, y), weights [B, Q, H, L, P], output [B, Q, H, C].
// Defines: MSDA_LEVEL_TABLE, a brace list of each level's {h, w, first row in V};
// MSDA_CELLS, a pointer at optional int32 [B, Q, H, L, P, 2] top-left corners (column, row)
// that replace floor() of the pixel coordinate (a parity check forces the reference's cells at
// cell edges), or a null const int*.
// Bilinear sampling is torch's F.grid_sample(align_corners=False, padding_mode='zeros') on the
// grid 2 * loc - 1, with the corner weights of its CPU kernel (w = x - floor(x), e = 1 - w,
// ...; corners outside the map add nothing).
#include <cmath>
// The sizes of the inputs: value [B, V, H, C], locations [B, Q, H, L, P, 2].
#define MSDA_SIZES const int B = in0_shape0, V = in0_shape1, H = in0_shape2, C = in0_shape3; \
                   const int Q = in1_shape1, L = in1_shape3, P = in1_shape4;
static const int MSDA_LEVELS[][3] = MSDA_LEVEL_TABLE;
struct MsdaPoint {
    int h, wd, start;     // its level's size and first row in V
    int row[2], col[2];   // north/south rows, west/east columns
    bool in_row[2], in_col[2];
    float n, s, w, e;     // distances to the north, south, west and east sides
};
// Point lp = ((b * Q + q) * H + head) * L * P + l * P + point of level l.
static inline MsdaPoint msda_point(const float* locations, const int* cells, long lp, int l) {
    MsdaPoint p;
    p.h = MSDA_LEVELS[l][0]; p.wd = MSDA_LEVELS[l][1]; p.start = MSDA_LEVELS[l][2];
    const float x = ((2.f * locations[lp * 2] - 1.f + 1.f) * p.wd - 1.f) / 2.f;
    const float y = ((2.f * locations[lp * 2 + 1] - 1.f + 1.f) * p.h - 1.f) / 2.f;
    const float xw = cells ? (float)cells[lp * 2] : std::floor(x);
    const float yn = cells ? (float)cells[lp * 2 + 1] : std::floor(y);
    p.w = x - xw; p.e = 1.f - p.w; p.n = y - yn; p.s = 1.f - p.n;
    for (int k = 0; k < 2; k++) {
        const float cx = xw + k, cy = yn + k;
        p.in_col[k] = cx >= 0.f && cx <= p.wd - 1;
        p.in_row[k] = cy >= 0.f && cy <= p.h - 1;
        p.col[k] = (int)cx; p.row[k] = (int)cy;
    }
    return p;
}
// Corner k = 2 * i + j (i: north/south row, j: west/east column): nw, ne, sw, se.
static inline bool msda_inside(const MsdaPoint& p, int i, int j) {
    return p.in_row[i] && p.in_col[j];
}
static inline float msda_corner_weight(const MsdaPoint& p, int i, int j) {
    return (i ? p.n : p.s) * (j ? p.w : p.e);
}
// Offset of corner (i, j)'s channels of head hd of image b in value [B, V, H, C].
static inline long msda_offset(const MsdaPoint& p, int i, int j, int b, int hd, int V, int H, int C) {
    return (((long)b * V + p.start + (long)p.row[i] * p.wd + p.col[j]) * H + hd) * C;
}

// @snippet msda_forward
// Header: msda_header (MSDA_CELLS: in3_p or null).
// in0 value, in1 locations, in2 weights[, in3 cells] -> out0 output. One thread per
// (image, query, head); each level's sampled value is multiplied by its weight and summed over
// levels and points in order, as the reference sums its stacked samples.
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

// @snippet msda_backward
// Header: msda_header (MSDA_CELLS: in4_p or null).
// in0 value, in1 locations, in2 weights, in3 grad_output[, in4 cells]
//   -> out0 grad_value, out1 grad_locations, out2 grad_weights.
// One thread per (image, head): the rows of grad_value it adds to are that head's alone.
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
