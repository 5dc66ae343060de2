// The scale searches of kvforge's GGML quantizers on tiles of groups, with no torch types: shared
// by the torch extension (quantize.cpp) and the torch-free block library (gguf_blocks.cpp), so the
// two give the same bytes.
//
// Shapes: x, w float32 [n, g] (n groups of g <= kMaxGroup values; w None = uniform weights),
// scales / mins float32 [n], codes int8 [n, g].
//
// Maths, for codes l_i of a candidate inverse scale s and weights w_i:
//   symmetric (make_qx_quants): l_i = clamp(round(s x_i), -nmax, nmax-1); the least-squares
//     scale is d = sum w x l / sum w l^2 and it lowers the weighted error by d * sum w x l, the
//     score kept at its maximum.
//   scale + min (make_qkx2_quants): l_i = clamp(round(s (x_i - lo)), 0, nmax) with lo = min(x, 0);
//     (d, m) solve the 2x2 weighted least squares of x ~ d l + m (m <= 0, else m = 0 and d
//     refits alone); the weighted squared error picks the candidate.
// Rounding is half away from zero, as the torch code: candidate scales such as (nmax - 0.5) / span
// put the largest value on an exact tie, so the rule matters.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace kvforge_quant {

constexpr float kEps = 1e-15f;
constexpr int64_t kMaxGroup = 32;
constexpr int64_t kLanes = 16;          // groups searched side by side, one per SIMD lane

inline float round_away(float v) { return std::copysign(std::floor(std::fabs(v) + 0.5f), v); }

// Up to kLanes groups transposed, value i of every group side by side: the searches run the
// same candidates on every group, so each lane follows one group with no horizontal sums.
// Lanes past the last group hold zeros (weight 0) and are never written back.
struct Tile {
  alignas(64) float x[kMaxGroup][kLanes];
  alignas(64) float w[kMaxGroup][kLanes];
  int64_t g;
  int64_t num_groups;

  Tile(const float* xs, const float* ws, int64_t group, int64_t first, int64_t count)
      : g(group), num_groups(count) {
    for (int64_t i = 0; i < g; ++i) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const bool used = j < count;
        x[i][j] = used ? xs[(first + j) * g + i] : 0.f;
        w[i][j] = used ? (ws ? ws[(first + j) * g + i] : 1.f) : 0.f;
      }
    }
  }
};

template <bool kWeighted>
void search_symmetric_tile(const Tile& t, float nmax, int64_t num_steps, float* out) {
  alignas(64) float amax[kLanes] = {}, inv_max[kLanes], best[kLanes], best_scale[kLanes];
  alignas(64) float signed_max[kLanes] = {};
  for (int64_t i = 0; i < t.g; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {  // first largest |x|, as torch.argmax
      const bool larger = std::fabs(t.x[i][j]) > amax[j];
      amax[j] = larger ? std::fabs(t.x[i][j]) : amax[j];
      signed_max[j] = larger ? t.x[i][j] : signed_max[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    // an all-zero group gets codes 0, so no candidate and scale 0
    inv_max[j] = amax[j] < kEps ? 0.f : 1.f / signed_max[j];
    best[j] = -1.f;
    best_scale[j] = 0.f;
  }
  for (int64_t step = -num_steps; step <= num_steps; ++step) {
    alignas(64) float iscale[kLanes], sumlx[kLanes] = {}, suml2[kLanes] = {};
    const float numerator = -(nmax + 0.1f * static_cast<float>(step));
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) iscale[j] = numerator * inv_max[j];
    for (int64_t i = 0; i < t.g; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const float q = std::min(std::max(round_away(t.x[i][j] * iscale[j]), -nmax), nmax - 1.f);
        const float wq = kWeighted ? t.w[i][j] * q : q;
        sumlx[j] += wq * t.x[i][j];
        suml2[j] += wq * q;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float scale = suml2[j] > 0.f ? sumlx[j] / suml2[j] : 0.f;
      const bool better = suml2[j] > 0.f && scale * sumlx[j] > best[j];
      best[j] = better ? scale * sumlx[j] : best[j];
      best_scale[j] = better ? scale : best_scale[j];
    }
  }
  for (int64_t j = 0; j < t.num_groups; ++j) out[j] = best_scale[j];
}

template <bool kWeighted>
void search_asymmetric_tile(const Tile& t, float nmax, float rmin, float rdelta,
                            int64_t num_steps, float* out_scale, float* out_min) {
  alignas(64) float lo[kLanes], hi[kLanes], sum_w[kLanes] = {}, sum_x[kLanes] = {};
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) lo[j] = hi[j] = t.x[0][j];
  for (int64_t i = 0; i < t.g; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float x = t.x[i][j], w = t.w[i][j];
      lo[j] = std::min(lo[j], x);
      hi[j] = std::max(hi[j], x);
      sum_w[j] += w;
      sum_x[j] += w * x;
    }
  }
  alignas(64) float inv_span[kLanes], best_err[kLanes], best_scale[kLanes], best_min[kLanes];
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    lo[j] = std::min(lo[j], 0.f);
    inv_span[j] = hi[j] - lo[j] < kEps ? 0.f : 1.f / (hi[j] - lo[j]);
    best_err[j] = INFINITY;
  }
  // Candidate -1 is the plain min-max fit (scale span / nmax, min lo), the one to beat.
  for (int64_t step = -1; step <= num_steps; ++step) {
    alignas(64) float iscale[kLanes], sum_l[kLanes] = {}, sum_l2[kLanes] = {},
                                      sum_xl[kLanes] = {}, err[kLanes] = {};
    alignas(64) float codes[kMaxGroup][kLanes];
    const float numerator =
        step < 0 ? nmax : rmin + rdelta * static_cast<float>(step) + nmax;
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) iscale[j] = numerator * inv_span[j];
    for (int64_t i = 0; i < t.g; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        // x - lo >= 0: rounding half up is rounding half away from zero
        const float l =
            std::min(std::max(std::floor(iscale[j] * (t.x[i][j] - lo[j]) + 0.5f), 0.f), nmax);
        codes[i][j] = l;
        const float wl = kWeighted ? t.w[i][j] * l : l;
        sum_l[j] += wl;
        sum_l2[j] += wl * l;
        sum_xl[j] += wl * t.x[i][j];
      }
    }
    alignas(64) float fit_scale[kLanes], fit_min[kLanes];
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      float scale, min;
      if (step < 0) {
        scale = (hi[j] - lo[j]) / nmax;
        min = lo[j];
      } else {
        const float det = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
        const bool solved = std::fabs(det) > kEps;
        scale = solved ? (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / det : 1.f / iscale[j];
        min = solved ? (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / det : lo[j];
        // a positive min is not representable: refit the scale alone with min 0
        scale = min > 0.f ? sum_xl[j] / std::max(sum_l2[j], kEps) : scale;
        min = min > 0.f ? 0.f : min;
      }
      fit_scale[j] = scale;
      fit_min[j] = min;
    }
    // The weighted squared error, summed directly: expanded in the sums above, it would be
    // the difference of float32 terms ~1/err times larger than itself.
    for (int64_t i = 0; i < t.g; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const float diff = fit_scale[j] * codes[i][j] + fit_min[j] - t.x[i][j];
        err[j] += (kWeighted ? t.w[i][j] : 1.f) * diff * diff;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const bool better = err[j] < best_err[j];
      best_err[j] = better ? err[j] : best_err[j];
      best_scale[j] = better ? fit_scale[j] : best_scale[j];
      best_min[j] = better ? fit_min[j] : best_min[j];
    }
  }
  for (int64_t j = 0; j < t.num_groups; ++j) {
    const bool flat = inv_span[j] == 0.f;  // hi - lo < eps: scale 0 and min lo, as torch
    out_scale[j] = flat ? 0.f : best_scale[j];
    out_min[j] = flat ? lo[j] : best_min[j];
  }
}

}  // namespace kvforge_quant
