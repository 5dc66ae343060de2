// quant_gemm on a row-interleaved layout, for CPUs with VNNI byte dot products (AVX512-VNNI+VL
// or AVX-VNNI): eight weight rows share each 32-column block, so one 8-lane dpbusd advances
// the dot products of all eight rows and each block's float work (int32 -> float, scale, min)
// is one vector op for eight rows instead of eight. Per byte of weights that is 3-4x fewer
// instructions than quant_gemm.cpp's one-row kernel: one-row decode streams weights closer to
// the memory's rate, and a few rows (batched decode, speculative verification) run closer to
// the integer units' rate.
//
// Layout (W = 8 or 16 weight rows a group, G = N / W groups, NB = K / 32 blocks; made by
// quant_gemm_il_pack):
//   qs      4-bit: uint8 [G, NB, W, 16]: a group's block is 4 chunks of 4 W bytes; byte 4 r + i
//                  of chunk c holds code 4 c + i of row r (low nibble) and code 16 + 4 c + i
//                  (high nibble). Unpacked, chunk c gives the vector of codes 4c..4c+3 of every
//                  row (lane r = row r) and, shifted, codes 16+4c..16+4c+3.
//           8-bit: uint8 [G, NB, W, 32]: 8 vectors of 4 W bytes, vector j = codes 4j..4j+3 of
//                  the W rows, each stored + 128 (unsigned).
//   scales  float16 or float32 [G, NB, W]; mins the same or None.
// W = 8 runs on 256-bit vectors (one int32 lane per row). W = 16 runs on 512-bit vectors, in
// builds with AVX512-VNNI and BW, for N % 16 == 0: where a CPU issues 512-bit dpbusd as fast as
// 256-bit ones (AMD Zen 5: ~10 G/s of either per core) that halves the instructions per weight.
//   Codes are unsigned with an offset o: w = d (u - o) + m, o = 0 for 4-bit codes with mins
//   (Q4_1), 8 for 4-bit codes without (Q4_0: stored + 8), 128 for 8-bit codes.
//
// Activations: per block of 32, dx = max|x| / Q and qx = round(x / dx). dpbusd multiplies
// unsigned by signed bytes, so 16-bit activations (Q = 32639) are split into two signed bytes,
// qx = 256 h + l, and the block's integer dot product is 256 sum(u h) + sum(u l) - o sum(qx):
// exactly the int16 product (|256 * 255 * 128 * 32| < 2^31), at two dpbusd per 4 columns of 8
// rows. 8-bit activations (Q = 127) are l alone. The block adds d dx dot + m dx sum(qx).
//
// act_bits 0 dequantizes the weights a tile at a time for ATen's float GEMM (dense_gemm_tiles);
// quant_linear does not need it on this layout (the integer kernel is faster at any row count).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kvforge_ops.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && \
    ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#include <immintrin.h>
#define KVF_IL 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KVF_IL16 1
#endif
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGrainGroups = 2;       // fewest groups per parallel task
constexpr float kQ16 = 32639.0f;  // 127 * 256 + 127: the largest qx whose high byte fits int8
constexpr float kQ8 = 127.0f;

inline float half_to_float(const at::Half* p) { return static_cast<float>(*p); }
inline float half_to_float(const float* p) { return *p; }

template <typename SC>
struct Weights {
  const uint8_t* qs;
  const SC* scales;
  const SC* mins;  // nullptr without mins
  int64_t rows;         // W: weight rows interleaved in a group
  int64_t block_bytes;  // 16 W (4-bit) or 32 W (8-bit) per group and block
  int32_t offset;
  bool four() const { return block_bytes == 16 * rows; }  // 4-bit codes
};

#ifdef KVF_IL
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}

using kvf_simd::hsum_i32;
using kvf_simd::load8;

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc += u . broadcast(4 signed bytes at p). With AVX-512 the broadcast is folded into the
// dpbusd as an embedded {1to8} memory operand: a separate vpbroadcastd takes a vector ALU slot
// that dpbusd needs, and the compilers do not fold it themselves.
inline __m256i dpbusd_bcast(__m256i acc, __m256i u, const int8_t* p) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  asm("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
#else
  return dpbusd(acc, u, broadcast4(p));
#endif
}

// 32 int32 lanes (each within int8) -> 32 signed bytes in column order.
inline __m256i pack_bytes(const __m256i* v) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                           _mm256_packs_epi32(v[2], v[3]));
  // the packs interleave 128-bit lanes; the permute restores column order
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The vector operations of the kernel for W weight rows a group: one int32 / float lane per row.
template <int W>
struct Vec;

template <>
struct Vec<8> {
  using I = __m256i;
  using F = __m256;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I low_nibbles(I v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
  static I high_nibbles(I v) { return low_nibbles(_mm256_srli_epi16(v, 4)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I shift8(I a) { return _mm256_slli_epi32(a, 8); }
  static I dot(I acc, I u, const int8_t* p) { return dpbusd_bcast(acc, u, p); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  template <typename SC>
  static F scales(const SC* p) { return load8(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

#ifdef KVF_IL16
template <>
struct Vec<16> {
  using I = __m512i;
  using F = __m512;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I low_nibbles(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
  static I high_nibbles(I v) { return low_nibbles(_mm512_srli_epi16(v, 4)); }
  static I zero() { return _mm512_setzero_si512(); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I shift8(I a) { return _mm512_slli_epi32(a, 8); }
  static I dot(I acc, I u, const int8_t* p) {  // embedded {1to16} broadcast, as dpbusd_bcast
    asm("vpdpbusd %2%{1to16%}, %1, %0"
        : "+v"(acc)
        : "v"(u), "m"(*reinterpret_cast<const int32_t*>(p)));
    return acc;
  }
  static F fzero() { return _mm512_setzero_ps(); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static F scales(const float* p) { return _mm512_loadu_ps(p); }
  static F scales(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#endif

using Acts = QuantActs;

template <typename T>
void quantize_block(const T* x, bool high, int8_t* out, float* d, float* dsum, int32_t* sum) {
  __m256 v[4];
  const float max_abs = kvf_simd::load_block_abs_max(x, v);
  const float top = high ? kQ16 : kQ8;
  const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? top / max_abs : 0.0f);
  __m256i q[4];
  __m256i total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {  // round to nearest even, as std::nearbyint
    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    total = _mm256_add_epi32(total, q[i]);
  }
  if (high) {  // qx = 256 h + l with l the sign-extended low byte
    __m256i h[4], l[4];
    for (int i = 0; i < 4; ++i) {
      l[i] = _mm256_srai_epi32(_mm256_slli_epi32(q[i], 24), 24);
      h[i] = _mm256_srai_epi32(_mm256_sub_epi32(q[i], l[i]), 8);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), pack_bytes(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kBlock), pack_bytes(l));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), pack_bytes(q));
  }
  *sum = hsum_i32(total);
  *d = max_abs / top;
  *dsum = *d * static_cast<float>(*sum);
}

// Block b of row m goes to index b * rows + m (block-major: a block's rows are adjacent, so the
// kernel reads them at constant offsets from one pointer).
template <typename T>
inline void quantize_at(const T* x, int64_t K, bool high, Acts& a, int64_t i) {
  const int64_t NB = K / kBlock, m = i / NB, b = i % NB, at = b * a.rows + m;
  quantize_block(x + i * kBlock, high, a.q.data() + at * a.stride, &a.d[at], &a.dsum[at],
                 &a.sum[at]);
}

template <typename T>
void quantize_rows(const T* x, int64_t K, bool high, Acts& a, int64_t r0, int64_t r1) {
  const int64_t NB = K / kBlock;
  for (int64_t i = r0 * NB; i < r1 * NB; ++i) quantize_at(x, K, high, a, i);
}

template <typename T>
Acts quantize_acts(const T* x, int64_t M, int64_t K, bool high) {
  Acts a;
  a.resize(M, K, high);
  const int64_t NB = K / kBlock;
  at::parallel_for(0, M * NB, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize_at(x, K, high, a, i);
  });
  return a;
}

// AVX-512 has 32 vector registers: 8 activation rows share each unpacked block; AVX-VNNI 16.
#if defined(__AVX512VL__)
constexpr int kMicroRows = 8;
constexpr int kChainRows = 4;
#else
constexpr int kMicroRows = 2;
constexpr int kChainRows = 2;
#endif

// Weight bytes fetched ahead of the block being read: a thread reads its groups' blocks in
// address order, and the hardware prefetchers alone fall short of the memory's rate on the
// small matrices of one-row decode (each restarts the stream; 1.1-1.4x tokens/s with this)
// and on the 28 MB LM head at 16 rows, where each block is slow to consume (6-10 GB/s
// without; 1.6-2.7x faster with). Prefill and 16-row decode of the layers measured the same.
constexpr int64_t kPrefetchBytes = 4096;

inline void prefetch_ahead(const uint8_t* block, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + off), _MM_HINT_T0);
  }
}

// Group g (weight rows W g .. W g + W - 1) against activation rows m0..m0+R-1 into
// y[m, W g .. W g + W - 1].
template <int W, typename SC, bool kFour, bool kHigh, bool kMins, int R>
void micro_kernel(const Weights<SC>& w, const Acts& a, int64_t g, int64_t m0, int64_t NB,
                  int64_t N, float* y) {
  using V = Vec<W>;
  typename V::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::fzero();
  const uint8_t* base = w.qs + g * NB * w.block_bytes;
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* blk = base + b * w.block_bytes;
    if (m0 == 0) prefetch_ahead(blk, w.block_bytes);  // once per group, not per row tile
    typename V::I wj[8];
    if constexpr (kFour) {
      for (int c = 0; c < 4; ++c) {
        const typename V::I v = V::load(blk + 4 * W * c);
        wj[c] = V::low_nibbles(v);
        wj[c + 4] = V::high_nibbles(v);
      }
    } else {
      for (int j = 0; j < 8; ++j) wj[j] = V::load(blk + 4 * W * j);
    }
    const int64_t sb = (g * NB + b) * W;
    const typename V::F dw = V::scales(w.scales + sb);
    typename V::F mw;
    if constexpr (kMins) mw = V::scales(w.mins + sb);
    // The block's activation rows m0.. are adjacent (block-major), so every operand below is
    // one pointer plus a constant. dpbusd has a latency of several cycles: P rows at a time (S
    // chains each when P is small) keep enough independent accumulations in flight.
    constexpr int64_t kStride = kHigh ? 2 * kBlock : kBlock;
    constexpr int64_t kLo = kHigh ? kBlock : 0;
    const int64_t ab0 = b * a.rows + m0;
    const int8_t* xb = a.q.data() + ab0 * kStride;
    const float* db = a.d.data() + ab0;
    const float* dsb = a.dsum.data() + ab0;
    const int32_t* sumb = a.sum.data() + ab0;
    constexpr int P = R < kChainRows ? R : kChainRows;
    constexpr int S = P >= kChainRows ? 1 : 2;
#pragma GCC unroll 8
    for (int r0 = 0; r0 < R; r0 += P) {
      typename V::I lo[P][S], hi[P][S];
      for (int p = 0; p < P && r0 + p < R; ++p) {
        for (int c = 0; c < S; ++c) {
          lo[p][c] = V::zero();
          hi[p][c] = V::zero();
        }
        if constexpr (!(kFour && kMins)) {  // codes with an offset: - o sum(qx), exactly
          lo[p][0] = V::set1(-w.offset * sumb[r0 + p]);
        }
      }
      for (int j = 0; j < 8; ++j) {
        for (int p = 0; p < P && r0 + p < R; ++p) {
          const int8_t* xq = xb + (r0 + p) * kStride + 4 * j;
          lo[p][j % S] = V::dot(lo[p][j % S], wj[j], xq + kLo);
          if constexpr (kHigh) hi[p][j % S] = V::dot(hi[p][j % S], wj[j], xq);
        }
      }
      for (int p = 0; p < P && r0 + p < R; ++p) {
        typename V::I total = S == 2 ? V::add(lo[p][0], lo[p][S - 1]) : lo[p][0];
        if constexpr (kHigh) {
          const typename V::I h = S == 2 ? V::add(hi[p][0], hi[p][S - 1]) : hi[p][0];
          total = V::add(V::shift8(h), total);
        }
        typename V::F& out = acc[r0 + p];
        out = V::fmadd(V::to_float(total), V::mul(dw, V::broadcast(db + r0 + p)), out);
        if constexpr (kMins) out = V::fmadd(mw, V::broadcast(dsb + r0 + p), out);
      }
    }
  }
  for (int r = 0; r < R; ++r) V::store(y + (m0 + r) * N + g * W, acc[r]);
}

template <int W, typename SC, bool kFour, bool kHigh, bool kMins, int R>
void remainder_rows(int64_t rows, const Weights<SC>& w, const Acts& a, int64_t g, int64_t m,
                    int64_t NB, int64_t N, float* y) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_kernel<W, SC, kFour, kHigh, kMins, R>(w, a, g, m, NB, N, y);
    } else {
      remainder_rows<W, SC, kFour, kHigh, kMins, R - 1>(rows, w, a, g, m, NB, N, y);
    }
  }
}

template <int W, typename SC, bool kFour, bool kHigh, bool kMins>
void gemm_group_range(const Weights<SC>& w, const Acts& a, int64_t M, int64_t N, int64_t NB,
                      float* y, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t m = 0;
    for (; m + kMicroRows <= M; m += kMicroRows) {
      micro_kernel<W, SC, kFour, kHigh, kMins, kMicroRows>(w, a, g, m, NB, N, y);
    }
    remainder_rows<W, SC, kFour, kHigh, kMins, kMicroRows - 1>(M - m, w, a, g, m, NB, N, y);
  }
}

// Groups [g0, g1) on the calling thread, or (g1 < 0) every group split among ATen's threads.
template <int W, typename SC, bool kFour>
void dispatch_width(const Weights<SC>& w, const Acts& a, bool high, int64_t M, int64_t N,
                    int64_t NB, float* y, int64_t g0, int64_t g1) {
  auto run = [&](auto kernel) {
    if (g1 >= 0) {
      kernel(w, a, M, N, NB, y, g0, g1);
      return;
    }
    at::parallel_for(0, N / W, kGrainGroups, [&](int64_t begin, int64_t end) {
      kernel(w, a, M, N, NB, y, begin, end);
    });
  };
  const bool mins = w.mins != nullptr;
  if (high) {
    mins ? run(gemm_group_range<W, SC, kFour, true, true>)
         : run(gemm_group_range<W, SC, kFour, true, false>);
  } else {
    mins ? run(gemm_group_range<W, SC, kFour, false, true>)
         : run(gemm_group_range<W, SC, kFour, false, false>);
  }
}

template <typename SC>
void dispatch(const Weights<SC>& w, const Acts& a, bool high, int64_t M, int64_t N, int64_t NB,
              float* y, int64_t g0 = 0, int64_t g1 = -1) {
  const bool four = w.four();
#ifdef KVF_IL16
  if (w.rows == 16) {
    four ? dispatch_width<16, SC, true>(w, a, high, M, N, NB, y, g0, g1)
         : dispatch_width<16, SC, false>(w, a, high, M, N, NB, y, g0, g1);
    return;
  }
#endif
  four ? dispatch_width<8, SC, true>(w, a, high, M, N, NB, y, g0, g1)
       : dispatch_width<8, SC, false>(w, a, high, M, N, NB, y, g0, g1);
}
#endif  // KVF_IL

// Code k (0..31) of row r in a group's block of W rows.
inline int32_t code_at(const uint8_t* blk, bool four, int64_t W, int64_t r, int64_t k) {
  if (four) {
    const uint8_t byte = blk[4 * W * ((k % 16) / 4) + 4 * r + k % 4];
    return k < 16 ? byte & 0x0F : byte >> 4;
  }
  return blk[4 * W * (k / 4) + 4 * r + k % 4];
}

// Weight row n dequantized to float32 out [K].
template <typename SC>
void dequantize_row(const Weights<SC>& w, int64_t n, int64_t NB, float* out) {
  const int64_t W = w.rows, g = n / W, r = n % W;
  const bool four = w.four();
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* blk = w.qs + (g * NB + b) * w.block_bytes;
    const int64_t s = (g * NB + b) * W + r;
    const float d = half_to_float(w.scales + s);
    const float m = w.mins ? half_to_float(w.mins + s) : 0.0f;
    for (int64_t k = 0; k < kBlock; ++k) {
      out[b * kBlock + k] = d * static_cast<float>(code_at(blk, four, W, r, k) - w.offset) + m;
    }
  }
}

template <typename SC>
Weights<SC> weights_of(const at::Tensor& qs, const at::Tensor& scales,
                       const std::optional<at::Tensor>& mins) {
  const bool four = qs.size(3) == 16;
  const bool has_mins = mins.has_value() && mins->defined();
  const int64_t W = qs.size(2);
  return {static_cast<const uint8_t*>(qs.data_ptr()), scales.data_ptr<SC>(),
          has_mins ? mins->data_ptr<SC>() : nullptr, W, four ? 16 * W : 32 * W,
          four ? (has_mins ? 0 : 8) : 128};
}

#ifdef KVF_IL
// Rows W g .. W g + W - 1 dequantized to float32 out [W, K] (row stride ldo), eight rows at a
// time: for each block, rows r and r+1 of a 4-code vector are 8 bytes of one chunk, widened,
// scaled and stored as two quarters.
template <typename SC>
void dequantize_group(const Weights<SC>& w, int64_t g, int64_t NB, float* out, int64_t ldo) {
  const int64_t W = w.rows;
  const bool four = w.four();
  const __m256 off = _mm256_set1_ps(static_cast<float>(w.offset));
  for (int64_t b = 0; b < NB; ++b) {
    const uint8_t* blk = w.qs + (g * NB + b) * w.block_bytes;
    for (int64_t eighth = 0; eighth < W / 8; ++eighth) {
      const int64_t sb = (g * NB + b) * W + 8 * eighth;
      const __m256 d = load8(w.scales + sb);
      const __m256 m = w.mins ? load8(w.mins + sb) : _mm256_setzero_ps();
      __m256 dp[4], mp[4];  // rows (2i, 2i+1), each repeated 4 times
      for (int i = 0; i < 4; ++i) {
        const __m256i idx = _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1,
                                              2 * i + 1, 2 * i + 1);
        dp[i] = _mm256_permutevar8x32_ps(d, idx);
        mp[i] = _mm256_permutevar8x32_ps(m, idx);
      }
      float* rows = out + 8 * eighth * ldo;
      for (int j = 0; j < 8; ++j) {  // codes 4j..4j+3 of the eight rows
        const uint8_t* src = blk + 4 * W * (four ? j % 4 : j) + 32 * eighth;
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        __m256i u = raw;
        if (four) {
          u = j < 4 ? raw : _mm256_srli_epi16(raw, 4);
          u = _mm256_and_si256(u, _mm256_set1_epi8(0x0F));
        }
        alignas(32) uint8_t bytes[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), u);
        for (int i = 0; i < 4; ++i) {
          const __m128i pair = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * i));
          const __m256 codes =
              _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(pair)), off);
          const __m256 v = _mm256_fmadd_ps(codes, dp[i], mp[i]);
          float* row = rows + 2 * i * ldo + b * kBlock + 4 * j;
          _mm_storeu_ps(row, _mm256_castps256_ps128(v));
          _mm_storeu_ps(row + ldo, _mm256_extractf128_ps(v, 1));
        }
      }
    }
  }
}
#else
template <typename SC>
void dequantize_group(const Weights<SC>& w, int64_t g, int64_t NB, float* out, int64_t ldo) {
  for (int64_t r = 0; r < w.rows; ++r) dequantize_row(w, g * w.rows + r, NB, out + r * ldo);
}
#endif

template <typename SC>
void dense_gemm(const at::Tensor& x, const Weights<SC>& w, int64_t N, int64_t K, at::Tensor& y) {
  const int64_t NB = K / kBlock, W = w.rows;
  dense_gemm_tiles(x, N, K, W, y, [&](int64_t n0, int64_t n1, float* out) {
    at::parallel_for(n0 / W, n1 / W, kGrainGroups, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        dequantize_group(w, g, NB, out + (g * W - n0) * K, K);
      }
    });
  });
}

void check_layout(const at::Tensor& qs, const at::Tensor& scales,
                  const std::optional<at::Tensor>& mins) {
  TORCH_CHECK(qs.dim() == 4 && qs.is_contiguous() && qs.scalar_type() == at::kByte &&
                  (qs.size(3) == 16 || qs.size(3) == 32),
              "interleaved qs must be contiguous uint8 [N/W, K/32, W, 16 or 32]");
  TORCH_CHECK(qs.size(2) == 8 || (qs.size(2) == 16 && quant_gemm_il_max_rows() == 16),
              "interleaved groups of ", qs.size(2), " rows are not built here");
  TORCH_CHECK((scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat) &&
                  scales.is_contiguous() && scales.dim() == 3 && scales.size(0) == qs.size(0) &&
                  scales.size(1) == qs.size(1) && scales.size(2) == qs.size(2),
              "interleaved scales must be contiguous float16 or float32 [N/W, K/32, W]");
  if (mins.has_value() && mins->defined()) {
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type() &&
                    mins->is_contiguous(),
                "mins must match scales");
  }
}

template <typename F>
void with_weights(const at::Tensor& qs, const at::Tensor& scales,
                  const std::optional<at::Tensor>& mins, F&& f) {
  if (scales.scalar_type() == at::kHalf) {
    f(weights_of<at::Half>(qs, scales, mins));
  } else {
    f(weights_of<float>(qs, scales, mins));
  }
}

}  // namespace

bool quant_gemm_il_available() {
#ifdef KVF_IL
  return true;
#else
  return false;
#endif
}

int64_t quant_gemm_il_max_rows() {
#ifdef KVF_IL16
  return 16;
#else
  return 8;
#endif
}

at::Tensor quant_gemm_il(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                         const std::optional<at::Tensor>& mins, int64_t act_bits) {
  check_layout(qs, scales, mins);
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0) * qs.size(2), NB = qs.size(1);
  TORCH_CHECK(K == NB * kBlock, "x has ", K, " columns, the weights ", NB * kBlock);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  const at::Tensor xc = x.contiguous();
  with_weights(qs, scales, mins, [&](const auto& w) {
    using SC = std::remove_cv_t<std::remove_reference_t<decltype(*w.scales)>>;
    if (act_bits == 0) {
      dense_gemm<SC>(xc, w, N, K, y);
      return;
    }
#ifdef KVF_IL
    const bool high = act_bits == 16;
    const Acts a = xc.scalar_type() == at::kFloat
                       ? quantize_acts(xc.data_ptr<float>(), M, K, high)
                       : quantize_acts(xc.data_ptr<at::BFloat16>(), M, K, high);
    float* out = y.data_ptr<float>();
    dispatch<SC>(w, a, high, M, N, NB, out);
#else
    TORCH_CHECK(false, "this build has no VNNI kernel for the interleaved layout");
#endif
  });
  return y;
}

void QuantActs::resize(int64_t M, int64_t K, bool high) {
  const int64_t NB = K / kBlock;
  rows = M;
  stride = high ? 2 * kBlock : kBlock;
  q.resize(M * NB * stride);
  d.resize(M * NB);
  dsum.resize(M * NB);
  sum.resize(M * NB);
}

void quant_acts_rows(const float* x, int64_t K, bool high, QuantActs& a, int64_t r0,
                     int64_t r1) {
#ifdef KVF_IL
  quantize_rows(x, K, high, a, r0, r1);
#else
  TORCH_CHECK(false, "this build has no VNNI kernel for the interleaved layout");
#endif
}

void quant_gemm_il_groups(const QuantActs& a, bool high, const at::Tensor& qs,
                          const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                          int64_t M, float* y, int64_t g0, int64_t g1) {
#ifdef KVF_IL
  const int64_t N = qs.size(0) * qs.size(2), NB = qs.size(1);
  with_weights(qs, scales, mins, [&](const auto& w) {
    using SC = std::remove_cv_t<std::remove_reference_t<decltype(*w.scales)>>;
    dispatch<SC>(w, a, high, M, N, NB, y, g0, g1);
  });
#else
  TORCH_CHECK(false, "this build has no VNNI kernel for the interleaved layout");
#endif
}

void check_interleaved(const at::Tensor& qs, const at::Tensor& scales,
                       const std::optional<at::Tensor>& mins) {
  check_layout(qs, scales, mins);
}

at::Tensor quant_gemm_il_rows(const at::Tensor& qs, const at::Tensor& scales,
                              const std::optional<at::Tensor>& mins, const at::Tensor& index) {
  check_layout(qs, scales, mins);
  const int64_t N = qs.size(0) * qs.size(2), NB = qs.size(1), K = NB * kBlock;
  const at::Tensor idx = index.to(at::kLong).contiguous().view(-1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t t = 0; t < idx.numel(); ++t) {
    TORCH_CHECK(ip[t] >= 0 && ip[t] < N, "row ", ip[t], " is outside [0, ", N, ")");
  }
  at::Tensor out = at::empty({idx.numel(), K}, scales.options().dtype(at::kFloat));
  with_weights(qs, scales, mins, [&](const auto& w) {
    float* op = out.data_ptr<float>();
    at::parallel_for(0, idx.numel(), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) dequantize_row(w, ip[t], NB, op + t * K);
    });
  });
  return out;
}

// codes int8 [N, K] (4-bit unsigned with mins, 4-bit signed without, else 8-bit signed), scales
// and mins float32 [N, K/32] -> (qs, scales, mins) in groups of `rows` (8, or 16 where built);
// mins is None for signed codes.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> quant_gemm_il_pack(
    const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
    bool four, int64_t rows) {
  const int64_t N = codes.size(0), K = codes.size(1), NB = K / kBlock, W = rows;
  TORCH_CHECK(W == 8 || (W == 16 && quant_gemm_il_max_rows() == 16),
              "interleaved groups of ", W, " rows are not built here");
  TORCH_CHECK(N % W == 0 && K % kBlock == 0, "interleaving needs N % ", W,
              " == 0 and K % 32 == 0");
  const int64_t G = N / W;
  const bool has_mins = mins.has_value() && mins->defined();
  const int32_t offset = four ? (has_mins ? 0 : 8) : 128;
  const at::Tensor c = codes.contiguous();
  const int8_t* cp = c.data_ptr<int8_t>();
  const int64_t block_bytes = four ? 16 * W : 32 * W;
  at::Tensor qs = at::zeros({G, NB, W, block_bytes / W}, c.options().dtype(at::kByte));
  uint8_t* qp = qs.data_ptr<uint8_t>();
  at::parallel_for(0, G, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < NB; ++b) {
        uint8_t* blk = qp + (g * NB + b) * block_bytes;
        for (int64_t r = 0; r < W; ++r)
          for (int64_t k = 0; k < kBlock; ++k) {
            const int32_t u = cp[(g * W + r) * K + b * kBlock + k] + offset;
            if (four) {
              blk[4 * W * ((k % 16) / 4) + 4 * r + k % 4] |=
                  static_cast<uint8_t>(k < 16 ? u : u << 4);
            } else {
              blk[4 * W * (k / 4) + 4 * r + k % 4] = static_cast<uint8_t>(u);
            }
          }
      }
  });
  auto interleave = [&](const at::Tensor& t) {  // [N, NB] -> [G, NB, W]
    return t.view({G, W, NB}).permute({0, 2, 1}).contiguous();
  };
  std::optional<at::Tensor> out_mins;
  if (has_mins) out_mins = interleave(*mins);
  return {qs, interleave(scales), out_mins};
}
