// Block-quantized GEMM on the CPU: y = x W^T with W in blocks of 32 columns, x quantized per block
// of 32 to int16 (default: 1/32767 of the block's largest value, far finer than bfloat16's 8-bit
// mantissa, so results track float32) or to int8 (llama.cpp's Q8 activation scheme: faster, but
// it moves near-tied logits), integer dot products, float32 accumulation.
//
// Dimensions: M activation rows, N output rows (weight rows), K columns, NB = K / 32 blocks per
// row, S = K / sub scale entries per row (sub = 16 for 16-column groups, else 32).
//
// Packed weight layout (made by quant_gemm_repack from the common w = code * scale + min form):
//   qs      4-bit: uint8 [N, NB, 16]: byte j of a block holds code j (low nibble) and code j+16
//                  (high nibble), codes unsigned 0..15 (symmetric -8..7 codes are stored +8 with
//                  min = -8 * scale), as GGML's Q4 blocks;
//           8-bit: int8 [N, NB, 32]: signed codes in column order.
//   scales  float16 or float32 [N, S]: a group of 32k columns (k > 1) repeats its scale over its
//           32-blocks; a group of 16 (Q2_K, Q3_K, Q6_K) keeps two scales per 32-block. float16
//           when every scale and min is exactly a float16 (Q4_0, Q4_1, Q8_0 store them so): one
//           token's decode reads every weight once, so 2-byte scales are 1/6 less memory traffic.
//   mins    as scales (same dtype) or None.
//
// Maths, for one block (or 16-half) with weights w_j = d q_j + m and activations x_j ~ dx qx_j
// (dx = max|x| / Q, qx_j = round(x_j / dx) in [-Q, Q], Q = 127 or 32767):
//   sum_j x_j w_j ~ d dx sum_j q_j qx_j + m dx sum_j qx_j.
// The integer sum is exact; dx sum_j qx_j is computed once per activation block (per 16-half).
//
// Integer dot products of 32 bytes give 8 int32 lanes, lane i summing elements 4i..4i+3, so lanes
// 0-3 are the first 16-half and 4-7 the second: a 16-column group scales each half separately.
//   AVX2: _mm256_maddubs_epi16 needs an unsigned operand: 4-bit codes are 0..15; signed 8-bit
//         codes use |q| and move q's sign onto qx (_mm256_sign_epi8), as qx never is -128.
//   AVX-VNNI / AVX512-VNNI(+VL): _mm256_dpbusd(_avx)_epi32 on the same operands.
//   int16 activations: codes widened to int16, _mm256_madd_epi16 (or VNNI's dpwssd) gives the
//   same lane sums per 16-half (a lane holds two products; |q qx| <= 128 * 32767 cannot overflow).
//   Otherwise: scalar loops.
// The build uses -march=native on the machine that runs it, so these #ifs are the run-time choice.
//
// Many rows (prefill): the integer kernels are compute-bound there, so from kDenseMinRows rows a
// tile of weight rows is dequantized to float32 and multiplied by ATen's float GEMM (exact float32
// activations: the same result as the float32 reference on the dequantized weights).
//
// On CPUs with VNNI byte dot products, quant_gemm_repack picks the row-interleaved layout of
// quant_gemm_il.cpp instead (Q4_0 / Q4_1 / Q8_0 and other 32-column groups, N % 8 == 0): qs is
// then 4-D and quant_gemm hands it over; the layout below serves 16-column groups and other CPUs.
//
// Parallelism: at::parallel_for over N; each thread takes a slice of output rows for every
// activation row, so each weight is read from memory once. Activation rows go in tiles of
// kRowTile (kept in cache) and micro-tiles of kMicroRows that share each unpacked weight block.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kvforge_ops.h"
#include "simd.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVF_QG_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowTile = 64;    // activation rows kept in cache while a weight slice streams
constexpr int kMicroRows = 8;       // activation rows sharing one unpacked weight block
constexpr int64_t kGrainRows = 16;  // fewest output rows per parallel task
constexpr int64_t kDenseMinRows = 256; // from this many activation rows: dequantize + float GEMM
constexpr int64_t kDenseTileBytes = 8 << 20;  // float32 weight rows dequantized at a time

// Activations quantized per 32-block: codes [M, K] (int8_t or int16_t), scales [M, NB],
// dx * sum(qx) per 16-half [M, 2 * NB] and per block [M, NB] (the weights' mins multiply them).
template <typename Q>
struct QuantizedActs {
  std::vector<Q> q;
  std::vector<float> d;
  std::vector<float> half_sums;
  std::vector<float> block_sums;
};

// SC: the scales' type, float or at::Half.
template <typename SC>
struct Weights {
  const uint8_t* qs;
  const SC* scales;
  const SC* mins;  // nullptr without mins
  int64_t row_bytes;  // bytes of qs per weight row
  int64_t row_scales;  // S
};

inline float scale_at(const float* p, int64_t i) { return p[i]; }
inline float scale_at(const at::Half* p, int64_t i) {
#if defined(__F16C__) && defined(KVF_QG_AVX2)
  return _cvtsh_ss(reinterpret_cast<const uint16_t*>(p)[i]);
#else
  return static_cast<float>(p[i]);
#endif
}

// ---- activation quantization ------------------------------------------------------------------

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

#ifdef KVF_QG_AVX2
using kvf_simd::hsum;
using kvf_simd::hsum_i32;
using kvf_simd::load8;
#endif

template <typename Q>
constexpr float kQMax = sizeof(Q) == 1 ? 127.0f : 32767.0f;

template <typename T, typename Q>
void quantize_block(const T* x, Q* q, float* d, float* half_sums, float* block_sum) {
#ifdef KVF_QG_AVX2
  __m256 v[4];
  const float max_abs = kvf_simd::load_block_abs_max(x, v);
  const float scale = max_abs / kQMax<Q>;
  const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? kQMax<Q> / max_abs : 0.0f);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  const int32_t s0 = hsum_i32(_mm256_add_epi32(qi[0], qi[1]));
  const int32_t s1 = hsum_i32(_mm256_add_epi32(qi[2], qi[3]));
  // packs interleave 128-bit lanes; the permutes restore column order
  const __m256i packed16a = _mm256_packs_epi32(qi[0], qi[1]);
  const __m256i packed16b = _mm256_packs_epi32(qi[2], qi[3]);
  if constexpr (sizeof(Q) == 1) {
    const __m256i packed8 = _mm256_packs_epi16(packed16a, packed16b);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(packed8, order));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(packed16a, 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16),
                        _mm256_permute4x64_epi64(packed16b, 0xD8));
  }
#else
  float max_abs = 0.0f;
  for (int j = 0; j < kBlock; ++j) max_abs = std::max(max_abs, std::fabs(to_float(x[j])));
  const float scale = max_abs / kQMax<Q>;
  const float inv = max_abs > 0.0f ? kQMax<Q> / max_abs : 0.0f;
  int32_t s0 = 0, s1 = 0;
  for (int j = 0; j < kBlock; ++j) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(to_float(x[j]) * inv));
    q[j] = static_cast<Q>(v);
    (j < 16 ? s0 : s1) += v;
  }
#endif
  *d = scale;
  half_sums[0] = scale * static_cast<float>(s0);
  half_sums[1] = scale * static_cast<float>(s1);
  *block_sum = scale * static_cast<float>(s0 + s1);
}

template <typename Q, typename T>
QuantizedActs<Q> quantize_acts(const T* x, int64_t M, int64_t K) {
  const int64_t NB = K / kBlock;
  QuantizedActs<Q> a{std::vector<Q>(M * K), std::vector<float>(M * NB),
                     std::vector<float>(2 * M * NB), std::vector<float>(M * NB)};
  at::parallel_for(0, M * NB, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      quantize_block(x + i * kBlock, a.q.data() + i * kBlock, a.d.data() + i,
                     a.half_sums.data() + 2 * i, a.block_sums.data() + i);
    }
  });
  return a;
}

// ---- integer dot products of one 32-block -----------------------------------------------------

#ifdef KVF_QG_AVX2
// 8 int32 lanes, lane i = sum of u_j * s_j over j in 4i..4i+3 (u unsigned, s signed bytes).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

template <bool kFour>
inline __m256i load_weight_block(const uint8_t* p) {
  if constexpr (kFour) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

// The block's codes widened to int16: w0 = codes 0..15, w1 = codes 16..31.
template <bool kFour>
inline void load_weight_block16(const uint8_t* p, __m256i& w0, __m256i& w1) {
  if constexpr (kFour) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i low = _mm_set1_epi8(0x0F);
    w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
    w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
    w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
  }
}

// int16 codes against int16 activations in dot_u8s8's lane layout when kSub16 (lanes 0-3 the
// first 16-half, 4-7 the second); otherwise any 8 lanes summing to the block's dot product.
template <bool kSub16>
inline __m256i dot_i16(__m256i w0, __m256i w1, const int16_t* x) {
  const __m256i d0 = _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  const __m256i d1 =
      _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)));
  if constexpr (kSub16) {
    return _mm256_add_epi32(_mm256_permute2x128_si256(d0, d1, 0x20),
                            _mm256_permute2x128_si256(d0, d1, 0x31));
  } else {
    return _mm256_add_epi32(d0, d1);
  }
}

// One weight row n against R activation rows starting at m0 (R <= kMicroRows).
template <typename Q, typename SC, bool kFour, bool kSub16, bool kMins, int R>
void micro_kernel(const Weights<SC>& w, const QuantizedActs<Q>& a, int64_t n, int64_t m0,
                  int64_t K, int64_t N, float* y) {
  constexpr bool kByteActs = sizeof(Q) == 1;
  const int64_t NB = K / kBlock;
  const uint8_t* qs = w.qs + n * w.row_bytes;
  const SC* scales = w.scales + n * w.row_scales;
  const SC* mins = kMins ? w.mins + n * w.row_scales : nullptr;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* block = qs + b * (kFour ? 16 : 32);
    __m256i wq, wu, w0, w1;
    if constexpr (kByteActs) {
      wq = load_weight_block<kFour>(block);
      wu = kFour ? wq : _mm256_abs_epi8(wq);
    } else {
      load_weight_block16<kFour>(block, w0, w1);
    }
    __m256 dw;
    if constexpr (kSub16) {
      dw = _mm256_set_m128(_mm_set1_ps(scale_at(scales, 2 * b + 1)),
                           _mm_set1_ps(scale_at(scales, 2 * b)));
    } else {
      dw = _mm256_set1_ps(scale_at(scales, b));
    }
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const Q* xq = a.q.data() + m * K + b * kBlock;
      __m256i dot;
      if constexpr (kByteActs) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
        dot = dot_u8s8(wu, kFour ? xv : _mm256_sign_epi8(xv, wq));
      } else {
        dot = dot_i16<kSub16>(w0, w1, xq);
      }
      const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[m * NB + b]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), dd, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float tail = 0.0f;
    if constexpr (kMins) {  // sum over scale entries s of min[s] * dx sum(qx) of s's columns
      const int64_t m = m0 + r, S = w.row_scales;
      const float* sums = kSub16 ? a.half_sums.data() + m * S : a.block_sums.data() + m * S;
      int64_t s = 0;
      for (; s + 8 <= S; s += 8) {
        acc[r] = _mm256_fmadd_ps(load8(mins + s), _mm256_loadu_ps(sums + s), acc[r]);
      }
      for (; s < S; ++s) tail += scale_at(mins, s) * sums[s];
    }
    y[(m0 + r) * N + n] = hsum(acc[r]) + tail;
  }
}
#else
template <bool kFour>
inline void load_weight_block(const uint8_t* p, int32_t* out) {
  for (int j = 0; j < 16 && kFour; ++j) {
    out[j] = p[j] & 0x0F;
    out[j + 16] = p[j] >> 4;
  }
  for (int j = 0; j < 32 && !kFour; ++j) out[j] = static_cast<int8_t>(p[j]);
}

template <typename Q, typename SC, bool kFour, bool kSub16, bool kMins, int R>
void micro_kernel(const Weights<SC>& w, const QuantizedActs<Q>& a, int64_t n, int64_t m0,
                  int64_t K, int64_t N, float* y) {
  const int64_t NB = K / kBlock;
  const uint8_t* qs = w.qs + n * w.row_bytes;
  const SC* scales = w.scales + n * w.row_scales;
  const SC* mins = kMins ? w.mins + n * w.row_scales : nullptr;
  float acc[R] = {};
  int32_t wq[kBlock];
  for (int64_t b = 0; b < NB; ++b) {
    load_weight_block<kFour>(qs + b * (kFour ? 16 : 32), wq);
    const float d0 = scale_at(scales, kSub16 ? 2 * b : b);
    const float d1 = scale_at(scales, kSub16 ? 2 * b + 1 : b);
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const Q* xq = a.q.data() + m * K + b * kBlock;
      int32_t s0 = 0, s1 = 0;
      for (int j = 0; j < 16; ++j) s0 += wq[j] * xq[j];
      for (int j = 16; j < 32; ++j) s1 += wq[j] * xq[j];
      const float dx = a.d[m * NB + b];
      acc[r] += dx * (d0 * static_cast<float>(s0) + d1 * static_cast<float>(s1));
      if constexpr (kMins) {
        const float* hs = a.half_sums.data() + 2 * (m * NB + b);
        acc[r] += kSub16 ? scale_at(mins, 2 * b) * hs[0] + scale_at(mins, 2 * b + 1) * hs[1]
                         : scale_at(mins, b) * (hs[0] + hs[1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = acc[r];
}
#endif

// The last rows < kMicroRows of a tile: micro_kernel<R> for R = rows.
template <typename Q, typename SC, bool kFour, bool kSub16, bool kMins, int R>
void remainder_rows(int64_t rows, const Weights<SC>& w, const QuantizedActs<Q>& a, int64_t n,
                    int64_t m, int64_t K, int64_t N, float* y) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_kernel<Q, SC, kFour, kSub16, kMins, R>(w, a, n, m, K, N, y);
    } else {
      remainder_rows<Q, SC, kFour, kSub16, kMins, R - 1>(rows, w, a, n, m, K, N, y);
    }
  }
}

template <typename Q, typename SC, bool kFour, bool kSub16, bool kMins>
void gemm_rows(const Weights<SC>& w, const QuantizedActs<Q>& a, int64_t M, int64_t N, int64_t K,
               float* y) {
  at::parallel_for(0, N, kGrainRows, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t t = 0; t < M; t += kRowTile) {
      const int64_t t_end = std::min(M, t + kRowTile);
      for (int64_t n = n_begin; n < n_end; ++n) {
        int64_t m = t;
        for (; m + kMicroRows <= t_end; m += kMicroRows) {
          micro_kernel<Q, SC, kFour, kSub16, kMins, kMicroRows>(w, a, n, m, K, N, y);
        }
        remainder_rows<Q, SC, kFour, kSub16, kMins, kMicroRows - 1>(t_end - m, w, a, n, m, K, N,
                                                                     y);
      }
    }
  });
}

template <typename Q, typename SC, bool kFour>
void dispatch(const Weights<SC>& w, const QuantizedActs<Q>& a, bool sub16, int64_t M, int64_t N,
              int64_t K, float* y) {
  const bool has_mins = w.mins != nullptr;
  if (sub16) {
    has_mins ? gemm_rows<Q, SC, kFour, true, true>(w, a, M, N, K, y)
             : gemm_rows<Q, SC, kFour, true, false>(w, a, M, N, K, y);
  } else {
    has_mins ? gemm_rows<Q, SC, kFour, false, true>(w, a, M, N, K, y)
             : gemm_rows<Q, SC, kFour, false, false>(w, a, M, N, K, y);
  }
}

// Weight row n dequantized to float32 out [K].
template <typename SC>
inline void dequantize_row(const Weights<SC>& w, bool four, bool sub16, int64_t n, int64_t K,
                           float* out) {
  const int64_t NB = K / kBlock;
  const uint8_t* qs = w.qs + n * w.row_bytes;
  const SC* scales = w.scales + n * w.row_scales;
  const SC* mins = w.mins ? w.mins + n * w.row_scales : nullptr;
  for (int64_t b = 0; b < NB; ++b) {
    float* row = out + b * kBlock;
    // Codes 0..15 and 16..31 of the block: each 16-half has its own scale with sub16.
    const int64_t s0 = sub16 ? 2 * b : b, s1 = sub16 ? 2 * b + 1 : b;
    const float d0 = scale_at(scales, s0), d1 = scale_at(scales, s1);
    const float m0 = mins ? scale_at(mins, s0) : 0.0f, m1 = mins ? scale_at(mins, s1) : 0.0f;
#ifdef KVF_QG_AVX2
    __m256i c[4];  // codes 8i..8i+7 as int32
    if (four) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
      c[0] = _mm256_cvtepu8_epi32(lo);
      c[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
      c[2] = _mm256_cvtepu8_epi32(hi);
      c[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
    } else {
      const uint8_t* p = qs + b * kBlock;
      for (int i = 0; i < 4; ++i) {
        c[i] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i)));
      }
    }
    for (int i = 0; i < 4; ++i) {
      const __m256 d = _mm256_set1_ps(i < 2 ? d0 : d1), m = _mm256_set1_ps(i < 2 ? m0 : m1);
      _mm256_storeu_ps(row + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(c[i]), d, m));
    }
#else
    for (int j = 0; j < kBlock; ++j) {
      const float code =
          four ? static_cast<float>(j < 16 ? qs[b * 16 + j] & 0x0F : qs[b * 16 + j - 16] >> 4)
               : static_cast<float>(static_cast<int8_t>(qs[b * kBlock + j]));
      row[j] = j < 16 ? code * d0 + m0 : code * d1 + m1;
    }
#endif
  }
}

// Weight rows [n0, n1) dequantized to float32 out [n1 - n0, K].
template <typename SC>
void dequantize_rows(const Weights<SC>& w, bool four, bool sub16, int64_t n0, int64_t n1,
                     int64_t K, float* out) {
  at::parallel_for(n0, n1, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) dequantize_row(w, four, sub16, n, K, out + (n - n0) * K);
  });
}

// y = x W^T through float32 tiles of W and ATen's GEMM (see kDenseMinRows).
template <typename SC>
void dense_gemm(const at::Tensor& x, const Weights<SC>& w, bool four, bool sub16, int64_t N,
                int64_t K, at::Tensor& y) {
  dense_gemm_tiles(x, N, K, 1, y, [&](int64_t n0, int64_t n1, float* out) {
    dequantize_rows(w, four, sub16, n0, n1, K, out);
  });
}

// ---- float32 weights, few activation rows ------------------------------------------------------

// y[m, n] = x[m, :] . w[n, :] for an MR x NR tile: x rows with stride ldx, w rows with stride
// ldw, y with stride ldy. 3 x 3 tiles keep 9 accumulators (8 lanes each), 3 weight and 3
// activation vectors in the 16 AVX2 registers: 6 loads per 9 FMAs.
template <int MR, int NR>
void fma_tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t K, float* y,
              int64_t ldy) {
#ifdef KVF_QG_AVX2
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR], xv[MR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm256_loadu_ps(w + n * ldw + k);
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(xv[m], wv[n], acc[m][n]);
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float sum = hsum(acc[m][n]);
      for (int64_t j = k; j < K; ++j) sum += x[m * ldx + j] * w[n * ldw + j];
      y[m * ldy + n] = sum;
    }
#else
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += x[m * ldx + k] * w[n * ldw + k];
      y[m * ldy + n] = sum;
    }
#endif
}

constexpr int kTileM = 3;
constexpr int kTileN = 3;

// All M rows of x against NR weight rows into y[:, 0 : NR] (y has stride N).
template <int NR>
void fma_rows(const float* x, int64_t M, const float* w, int64_t K, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + kTileM <= M; m += kTileM) fma_tile<kTileM, NR>(x + m * K, K, w, K, K, y + m * N, N);
  if (M - m == 2) fma_tile<2, NR>(x + m * K, K, w, K, K, y + m * N, N);
  if (M - m == 1) fma_tile<1, NR>(x + m * K, K, w, K, K, y + m * N, N);
}

}  // namespace

// y [M, N] = x [M, K] w [N, K]^T for float32 x and w and few rows M: each weight row is read
// from memory once and multiplied by every activation row (kept in cache), which is what a
// decode step of a small batch or a speculative verification needs. ATen's GEMM is 2-5x slower
// per weight byte there than at one row (see layers/linear.py).
at::Tensor float_gemm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
                  x.device().is_cpu() && w.device().is_cpu(),
              "float_gemm takes float32 CPU tensors");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, groups, std::max<int64_t>(1, kGrainRows / kTileN), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kTileN, rows = std::min<int64_t>(kTileN, N - n0);
      const float* wr = wp + n0 * K;
      if (rows == 3) fma_rows<3>(xp, M, wr, K, yp + n0, N);
      if (rows == 2) fma_rows<2>(xp, M, wr, K, yp + n0, N);
      if (rows == 1) fma_rows<1>(xp, M, wr, K, yp + n0, N);
    }
  });
  return y;
}

// y [M, N] float32 = x [M, K] (float32 or bfloat16) times the packed weights (layout above), x
// quantized to act_bits (8 or 16) per block; act_bits 0: the float GEMM on dequantized tiles.
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                      const std::optional<at::Tensor>& mins, int64_t act_bits) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "x must be float32 or bfloat16");
  TORCH_CHECK(act_bits == 0 || act_bits == 8 || act_bits == 16,
              "act_bits must be 8 or 16 (0: float GEMM), got ", act_bits);
  if (qs.dim() == 4) return quant_gemm_il(x, qs, scales, mins, act_bits);
  TORCH_CHECK(qs.dim() == 3 && qs.is_contiguous() && (qs.size(2) == 16 || qs.size(2) == 32),
              "qs must be contiguous [N, K/32, 16 or 32]");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), NB = qs.size(1);
  TORCH_CHECK(K == NB * kBlock, "x has ", K, " columns, the weights ", NB * kBlock);
  const bool half = scales.scalar_type() == at::kHalf;
  TORCH_CHECK((half || scales.scalar_type() == at::kFloat) && scales.is_contiguous() &&
                  scales.size(0) == N && (scales.size(1) == NB || scales.size(1) == 2 * NB),
              "scales must be contiguous float16 or float32 [N, K/32 or K/16]");
  const bool has_mins = mins.has_value() && mins->defined();
  if (has_mins) {
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type() &&
                    mins->is_contiguous(),
                "mins must match scales");
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous();
  const bool sub16 = scales.size(1) == 2 * NB;
  const bool four = qs.size(2) == 16;
  auto run = [&](auto scale_tag) {
    using SC = decltype(scale_tag);
    const Weights<SC> w{static_cast<const uint8_t*>(qs.data_ptr()), scales.data_ptr<SC>(),
                        has_mins ? mins->data_ptr<SC>() : nullptr, NB * qs.size(2),
                        scales.size(1)};
    if (act_bits == 0) {
      dense_gemm(xc, w, four, sub16, N, K, y);
      return;
    }
    auto gemm = [&](auto a) {
      using Q = typename decltype(a.q)::value_type;
      four ? dispatch<Q, SC, true>(w, a, sub16, M, N, K, y.data_ptr<float>())
           : dispatch<Q, SC, false>(w, a, sub16, M, N, K, y.data_ptr<float>());
    };
    auto quantize = [&](auto tag) {
      using Q = decltype(tag);
      return xc.scalar_type() == at::kFloat ? quantize_acts<Q>(xc.data_ptr<float>(), M, K)
                                            : quantize_acts<Q>(xc.data_ptr<at::BFloat16>(), M, K);
    };
    if (act_bits == 16) {
      gemm(quantize(int16_t{}));
    } else {
      gemm(quantize(int8_t{}));
    }
  };
  if (half) {
    run(at::Half{});
  } else {
    run(float{});
  }
  return y;
}

// y [M, N] = x W^T for weights that dequantize(n0, n1, out) writes as float32 rows [n0, n1) of
// K columns: tiles of about kDenseTileBytes (a multiple of row_multiple rows) and ATen's GEMM.
void dense_gemm_tiles(const at::Tensor& x, int64_t N, int64_t K, int64_t row_multiple,
                      at::Tensor& y,
                      const std::function<void(int64_t, int64_t, float*)>& dequantize) {
  const at::Tensor xf = x.to(at::kFloat);
  const int64_t tile =
      std::max<int64_t>(kGrainRows, kDenseTileBytes / (4 * K)) / row_multiple * row_multiple;
  at::Tensor wt = at::empty({std::min(tile, N), K}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    at::Tensor part = wt.narrow(0, 0, n1 - n0);
    dequantize(n0, n1, part.data_ptr<float>());
    if (n0 == 0 && n1 == N) {
      at::mm_out(y, xf, part.t());
    } else {
      y.narrow(1, n0, n1 - n0).copy_(at::mm(xf, part.t()));
    }
  }
}

// What a linear layer runs: quant_gemm with act_bits for few rows, the float GEMM from
// kDenseMinRows rows.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t act_bits) {
  // the interleaved kernel outruns the float GEMM at any row count (1.2-1.5x at 512 rows)
  const bool dense = qs.dim() == 3 && x.dim() == 2 && x.size(0) >= kDenseMinRows;
  return quant_gemm(x, qs, scales, mins, dense ? 0 : act_bits);
}

// The common form (codes int8 [N, K], scales [N, K/group], mins or None) -> (qs, scales, mins)
// in the layout above: 4-bit when the codes fit, else 8-bit.
// layout: "rows" (above), "interleaved" (quant_gemm_il.cpp: a VNNI build, 32-column groups and
// N % 8 == 0; groups of 16 rows where 512-bit VNNI is built and N % 16 == 0, else of 8),
// "interleaved8" (groups of 8 rows) or "auto" (interleaved where it can be).
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> quant_gemm_repack(
    const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
    int64_t group, const std::string& layout) {
  TORCH_CHECK(layout == "auto" || layout == "rows" || layout == "interleaved" ||
                  layout == "interleaved8",
              "layout must be auto, rows, interleaved or interleaved8, got ", layout);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "codes must be int8 [N, K]");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(group == 16 || (group > 0 && group % kBlock == 0), "unsupported group ", group);
  TORCH_CHECK(K % kBlock == 0 && K % group == 0, "K=", K, " is not a multiple of the block");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group,
              "scales must be [N, K/group]");
  const bool has_mins = mins.has_value() && mins->defined();
  const int64_t sub = group == 16 ? 16 : 32;
  const int64_t repeats = group / sub;
  at::Tensor out_scales = scales.to(at::kFloat).repeat_interleave(repeats, 1).contiguous();
  std::optional<at::Tensor> out_mins;
  if (has_mins) out_mins = mins->to(at::kFloat).repeat_interleave(repeats, 1).contiguous();

  const int64_t low = codes.numel() ? codes.min().item<int64_t>() : 0;
  const int64_t high = codes.numel() ? codes.max().item<int64_t>() : 0;
  const bool unsigned4 = has_mins && low >= 0 && high <= 15;
  const bool signed4 = !has_mins && low >= -8 && high <= 7;
  const bool can_interleave =
      quant_gemm_il_available() && sub == kBlock && N % 8 == 0;
  TORCH_CHECK(layout == "rows" || layout == "auto" || can_interleave,
              "the interleaved layout needs a VNNI build, 32-column groups and N % 8 == 0");
  at::Tensor qs;
  if (layout != "rows" && can_interleave) {
    const int64_t wide = quant_gemm_il_max_rows();
    const int64_t rows = layout != "interleaved8" && N % wide == 0 ? wide : 8;
    std::tie(qs, out_scales, out_mins) = quant_gemm_il_pack(
        codes, out_scales, out_mins, unsigned4 || signed4, rows);
  } else if (!unsigned4 && !signed4) {
    qs = codes.contiguous().view({N, K / kBlock, kBlock});
  } else {
    at::Tensor u = codes.to(at::kShort);
    if (signed4) {  // w = d q = d (q + 8) - 8 d
      u = u + 8;
      out_mins = (out_scales * -8.0f).contiguous();
    }
    u = u.to(at::kByte).view({N, K / kBlock, 2, 16});
    qs = at::bitwise_or(u.select(2, 0), at::bitwise_left_shift(u.select(2, 1), 4)).contiguous();
  }
  // float16 scales and mins when every value is exactly a float16 (see the layout above).
  auto exact_half = [](const at::Tensor& t) { return t.to(at::kHalf).to(at::kFloat).equal(t); };
  if (exact_half(out_scales) && (!out_mins || exact_half(*out_mins))) {
    out_scales = out_scales.to(at::kHalf);
    if (out_mins) out_mins = out_mins->to(at::kHalf);
  }
  return {qs, out_scales, out_mins};
}

// The SIMD path this build compiled.
std::string quant_gemm_isa() {
#if defined(KVF_QG_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(KVF_QG_AVX2) && defined(__AVXVNNI__)
  return "avxvnni";
#elif defined(KVF_QG_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

void bind_quant_gemm(pybind11::module_& m) {
  m.def("quant_gemm", &quant_gemm, py::call_guard<py::gil_scoped_release>(), "x [M, K] times block-quantized weights: float32 [M, N]",
        py::arg("x"), py::arg("qs"), py::arg("scales"), py::arg("mins") = py::none(),
        py::arg("act_bits") = 16);
  m.def("quant_gemm_repack", &quant_gemm_repack, py::call_guard<py::gil_scoped_release>(),
        "codes/scales/mins/group -> (qs, scales, mins) in quant_gemm's layout", py::arg("codes"),
        py::arg("scales"), py::arg("mins"), py::arg("group"), py::arg("layout") = "auto");
  m.def("quant_gemm_il_rows", &quant_gemm_il_rows, py::call_guard<py::gil_scoped_release>(),
        "rows index of interleaved weights dequantized: float32 [len(index), K]", py::arg("qs"),
        py::arg("scales"), py::arg("mins"), py::arg("index"));
  m.def("quant_linear", &quant_linear, py::call_guard<py::gil_scoped_release>(),
        "quant_gemm with act_bits (on the row layout: the float GEMM from "
        "QUANT_GEMM_DENSE_MIN_ROWS rows)",
        py::arg("x"), py::arg("qs"), py::arg("scales"), py::arg("mins") = py::none(),
        py::arg("act_bits") = 16);
  m.attr("QUANT_GEMM_DENSE_MIN_ROWS") = kDenseMinRows;
  m.def("float_gemm", &float_gemm, py::call_guard<py::gil_scoped_release>(),
        "x [M, K] w [N, K]^T in float32 for few rows M (each weight read once)", py::arg("x"),
        py::arg("w"));
  m.def("quant_gemm_il_max_rows", &quant_gemm_il_max_rows, "Weight rows an interleaved group holds "
        "at most: 16 where 512-bit VNNI is built, else 8");
  m.def("quant_gemm_isa", &quant_gemm_isa, py::call_guard<py::gil_scoped_release>(), "The SIMD path compiled: avx512vnni, avxvnni, avx2 "
        "or scalar");
}
