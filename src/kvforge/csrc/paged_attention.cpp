// Paged attention on the CPU: every query token attends over its request's KV blocks in place.
//
// Dimensions: T new tokens this step, B requests, H query heads, KVH KV heads, G = H / KVH query
// heads per KV head, D head dim, NB cache blocks, BS block size, MB block-table width,
// KT keys per tile, R query rows (tokens x G heads) of one work item.
//
// Maths, for one query row q at position p and its keys j in [lo, p] (lo = 0, or
// p - window + 1 with a sliding window), where the request's context ends at p itself:
//   s_j = scale * q.k_j,   out = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m),   m = max_j s_j.
// Online softmax over key tiles keeps a running max m, sum l and accumulator a[D]; a tile whose
// largest score m' exceeds m first rescales (l, a) by exp(m - m'). No score row or mask tensor
// is ever materialized: the causal / window bounds come from positions.
// Split-K: a long context is cut into chunks c, each giving (m_c, l_c, a_c); with M = max m_c,
//   out = sum_c a_c exp(m_c - M) / sum_c l_c exp(m_c - M).
// One-byte caches store k~ with k = t * (s_k ⊙ k~) + c_k (s_k, c_k: per-channel scale and mean;
// t: int8's per-token-head scale, 1 for fp8), so the scales fold into the query and the output:
//   q.k = t * (q ⊙ s_k).k~ + q.c_k,   sum_j p_j v_j / l = s_v ⊙ (sum_j p_j t_j v~_j) / l + c_v.
// Exact 16-bit copies of recent blocks are mapped into that stored space when a tile is loaded,
// ((x - c) / s with t = 1), so one loop serves both.
//
// GQA: the G query heads sharing a KV head are rows of the same work item, so each K/V tile is
// converted and read once per group. Work items are (request, query tile, KV heads[, chunk]):
// prefill tiles take one KV head, decode items every KV head (so a token's K/V rows are read
// whole). Items are taken longest first from an atomic counter by at::parallel_for's threads.
//
// Vectorization: GCC / Clang vector extensions (8-float vectors) for the dot products and the
// V accumulation, and plain loops the compiler vectorizes for conversions and exp; a head dim
// that is not 64 / 128 / 256 takes scalar loops.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kvforge_ops.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kKeyTile = 32;         // KT: keys loaded (and converted) together
constexpr int64_t kRowsPerItem = 48;     // query rows (tokens x G heads) per work item
constexpr int64_t kMinSplitKeys = 256;   // a split-K chunk covers at least this many keys
constexpr int64_t kItemsPerThread = 4;   // split-K when there are fewer items than this per thread
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum class Elem { kFloat, kBFloat16, kHalf, kFp8E4M3, kFp8E5M2, kInt8 };

Elem elem_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Elem::kFloat;
    case at::kBFloat16: return Elem::kBFloat16;
    case at::kHalf: return Elem::kHalf;
    case at::kFloat8_e4m3fn: return Elem::kFp8E4M3;
    case at::kFloat8_e5m2: return Elem::kFp8E5M2;
    case at::kChar: return Elem::kInt8;
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", type);
  }
  return Elem::kFloat;  // not reached
}

inline bool is_16_or_32_bit(Elem e) {
  return e == Elem::kFloat || e == Elem::kBFloat16 || e == Elem::kHalf;
}

inline int64_t elem_size(Elem e) {
  return e == Elem::kFloat ? 4 : (is_16_or_32_bit(e) ? 2 : 1);
}

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }

// IEEE half to float without branches (so loops over it vectorize): move exponent and mantissa
// into place, multiply by 2^112 to re-bias (this also normalizes subnormals), then restore
// inf / nan exponents and the sign.
inline float half_to_float(uint16_t h) {
  const uint32_t magnitude = h & 0x7fffu;
  uint32_t bits;
  const float scaled = bits_to_float(magnitude << 13) * 0x1p112f;
  std::memcpy(&bits, &scaled, sizeof bits);
  bits |= magnitude >= 0x7c00u ? 0x7f800000u : 0u;
  return bits_to_float(bits | (uint32_t(h & 0x8000u) << 16));
}

// fp8 byte -> float, one 256-entry table per format (built once, thread-safe statics).
const float* fp8_table(Elem e) {
  static const auto tables = [] {
    std::array<std::array<float, 256>, 2> t{};
    for (int i = 0; i < 256; ++i) {
      t[0][i] = float(c10::Float8_e4m3fn(uint8_t(i), c10::Float8_e4m3fn::from_bits()));
      t[1][i] = float(c10::Float8_e5m2(uint8_t(i), c10::Float8_e5m2::from_bits()));
    }
    return t;
  }();
  return e == Elem::kFp8E4M3 ? tables[0].data() : tables[1].data();
}

// dst[0, D) = the D values at src as float (stored values as they are, no scales).
inline void to_float(float* __restrict dst, const void* src, Elem e, int64_t D) {
  switch (e) {
    case Elem::kFloat:
      std::memcpy(dst, src, D * sizeof(float));
      return;
    case Elem::kBFloat16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(s[d]);
      return;
    }
    case Elem::kHalf: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (int64_t d = 0; d < D; ++d) dst[d] = half_to_float(s[d]);
      return;
    }
    case Elem::kFp8E4M3:
    case Elem::kFp8E5M2: {
      const float* table = fp8_table(e);
      const auto* s = static_cast<const uint8_t*>(src);
      for (int64_t d = 0; d < D; ++d) dst[d] = table[s[d]];
      return;
    }
    case Elem::kInt8: {
      const auto* s = static_cast<const int8_t*>(src);
      for (int64_t d = 0; d < D; ++d) dst[d] = float(s[d]);
      return;
    }
  }
}

inline void from_float(void* dst, const float* src, Elem e, int64_t D) {
  switch (e) {
    case Elem::kFloat:
      std::memcpy(dst, src, D * sizeof(float));
      return;
    case Elem::kBFloat16: {
      auto* o = static_cast<c10::BFloat16*>(dst);
      for (int64_t d = 0; d < D; ++d) o[d] = c10::BFloat16(src[d]);
      return;
    }
    case Elem::kHalf: {
      auto* o = static_cast<c10::Half*>(dst);
      for (int64_t d = 0; d < D; ++d) o[d] = c10::Half(src[d]);
      return;
    }
    default:
      return;  // NOTE: the host checks that queries (and so outputs) are 16- or 32-bit floats
  }
}

// exp(x) for x <= 0 (scores minus their running max): Cephes' expf, 2^n * e^r with
// n = round(x / ln 2) (by the 1.5 * 2^23 trick) and a degree-6 polynomial for
// |r| <= ln(2) / 2; about 1 ulp. Plain branch-free arithmetic, so a loop over it vectorizes
// (std::exp does not without -ffast-math; the clamp needs -fno-trapping-math).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38 is still a normal float
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// Eight floats, one AVX register (two NEON ones): GCC / Clang vector extensions, so the inner
// loops are vector code without intrinsics. Used when D is a compile-time multiple of 8.
using Vec = float __attribute__((vector_size(32)));
using Vec4 = float __attribute__((vector_size(16)));
constexpr int kLanes = 8;

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(Vec v) {
  Vec4 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  lo += hi;
  return (lo[0] + lo[2]) + (lo[1] + lo[3]);
}

template <int n>
inline Vec dot_vec(const Vec* q, const float* k) {
  Vec s0 = {}, s1 = {};
  for (int c = 0; c + 1 < n; c += 2) {
    s0 += q[c] * load(k + c * kLanes);
    s1 += q[c + 1] * load(k + (c + 1) * kLanes);
  }
  if constexpr (n % 2 == 1) s0 += q[n - 1] * load(k + (n - 1) * kLanes);
  return s0 + s1;
}

// scores[j] = t[j] * (q . rows[j]) + bias for j in [j0, j1); returns their max. With a
// compile-time D the query stays in registers and four keys go at once (independent chains).
template <int kD>
inline float dot_tile(const float* __restrict q, const float* const* rows, const float* t,
                      float bias, int64_t j0, int64_t j1, int64_t D, float* __restrict scores) {
  if constexpr (kD > 0) {
    constexpr int n = kD / kLanes;
    Vec qv[n];
    for (int c = 0; c < n; ++c) qv[c] = load(q + c * kLanes);
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      const Vec d0 = dot_vec<n>(qv, rows[j]), d1 = dot_vec<n>(qv, rows[j + 1]);
      const Vec d2 = dot_vec<n>(qv, rows[j + 2]), d3 = dot_vec<n>(qv, rows[j + 3]);
      scores[j] = t[j] * hsum(d0) + bias;
      scores[j + 1] = t[j + 1] * hsum(d1) + bias;
      scores[j + 2] = t[j + 2] * hsum(d2) + bias;
      scores[j + 3] = t[j + 3] * hsum(d3) + bias;
    }
    for (; j < j1; ++j) scores[j] = t[j] * hsum(dot_vec<n>(qv, rows[j])) + bias;
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const float* k = rows[j];
      float sum = 0.0f;
      for (int64_t d = 0; d < D; ++d) sum += q[d] * k[d];
      scores[j] = t[j] * sum + bias;
    }
  }
  float tile_max = kNegInf;
  for (int64_t j = j0; j < j1; ++j) tile_max = std::max(tile_max, scores[j]);
  return tile_max;
}

// acc[D] += sum_j p[j] t[j] rows[j][D] for j in [j0, j1); returns sum_j p[j]. With a
// compile-time D the accumulator stays in registers across the keys.
template <int kD>
inline float accumulate(float* __restrict acc, const float* const* rows, const float* p,
                        const float* t, int64_t j0, int64_t j1, int64_t D) {
  float sum = 0.0f;
  if constexpr (kD > 0) {
    constexpr int n = kD / kLanes;
    Vec a[n];
    for (int c = 0; c < n; ++c) a[c] = load(acc + c * kLanes);
    for (int64_t j = j0; j < j1; ++j) {
      const float* v = rows[j];
      const float w = p[j] * t[j];
      sum += p[j];
      for (int c = 0; c < n; ++c) a[c] += w * load(v + c * kLanes);
    }
    for (int c = 0; c < n; ++c) store(acc + c * kLanes, a[c]);
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const float* v = rows[j];
      const float w = p[j] * t[j];
      sum += p[j];
      for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
    }
  }
  return sum;
}

// Everything a work item reads, as raw pointers (checked on the host).
struct Problem {
  const void* query;  // [T, H, D]: head h of token t at t * query_stride + h * D
  int64_t query_stride;
  Elem query_elem;
  int64_t H, KVH, G, D;
  const void* k_cache;  // [NB, BS, KVH, D]
  const void* v_cache;
  Elem kv_elem;
  int64_t block_size;
  const int64_t* block_tables;  // [B, MB]
  int64_t max_blocks;
  const int64_t* seq_lens;  // [B]
  const int64_t* query_lens;
  const int64_t* query_start;
  float scale;
  int64_t window;  // 0: no sliding window
  // One-byte caches (null otherwise): [KVH, D] float scales and means, [NB, BS, KVH] fp16
  // token scales (int8), and the recent blocks' exact copies [NB] / [capacity + 1, BS, KVH, D].
  const float* k_scale;
  const float* v_scale;
  const float* k_center;
  const float* v_center;
  const uint16_t* k_token_scale;
  const uint16_t* v_token_scale;
  const int64_t* recent_slot_of_block;
  const void* recent_k;
  const void* recent_v;
  Elem recent_elem;
  int64_t recent_capacity;
  void* out;       // [T, H, D], query dtype
  float* partial;  // split-K chunks: per row (m, l, acc[D])
};

// Query tokens [token_begin, token_begin + num_tokens) of a request with KV heads
// [head_begin, head_end), over keys [key_begin, key_end); a chunk of a split item writes
// (m, l, acc) per row at partial_offset. Row r: KV head head_begin + r / (num_tokens * G),
// then token and query head within it (see Rows).
struct Item {
  int64_t request, head_begin, head_end, token_begin, num_tokens, key_begin, key_end;
  bool is_chunk;
  int64_t partial_offset;
  int64_t cost;

  int64_t num_rows(int64_t G) const { return (head_end - head_begin) * num_tokens * G; }
};

// Row r of an item <-> (KV head, token of the batch, query head).
struct Rows {
  int64_t G, per_head, head_begin, first_token;
  Rows(const Problem& p, const Item& it)
      : G(p.G), per_head(it.num_tokens * p.G), head_begin(it.head_begin),
        first_token(p.query_start[it.request] + it.token_begin) {}
  int64_t kv_head(int64_t r) const { return head_begin + r / per_head; }
  int64_t token_offset(int64_t r) const { return (r % per_head) / G; }  // within the item
  int64_t query_head(int64_t r) const { return kv_head(r) * G + r % G; }
};

// Per-thread buffers, sized for the largest item.
struct Scratch {
  std::vector<float> q, q_center, m, l, acc, k_buf, v_buf, scores, k_token, v_token;
  std::vector<const float*> k_rows, v_rows;
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), q_center(rows), m(rows), l(rows), acc(rows * D), k_buf(kKeyTile * D),
        v_buf(kKeyTile * D), scores(kKeyTile), k_token(kKeyTile), v_token(kKeyTile),
        k_rows(kKeyTile), v_rows(kKeyTile) {}
};

// One side (K or V) of a tile being loaded: where its values come from and where they go.
struct TileSide {
  const char* cache;       // [NB, BS, KVH, D] stored values
  const char* recent;      // exact copies [capacity + 1, BS, KVH, D], or null
  const uint16_t* tokens;  // int8 token scales [NB, BS, KVH] (fp16 bits), or null
  const float* scale;      // [KVH, D] channel scales and means (one-byte caches), or null
  const float* center;
  float* buf;              // [KT, D] converted rows
  const float** rows;      // [KT] row pointers
  float* token_scale;      // [KT]
};

// Row j of one side for cache slot (block, offset): a pointer into a float32 cache, or the
// row converted into buf (exact copies mapped into the stored space, (x - c) / s).
inline void load_row(const Problem& p, const TileSide& side, int64_t g, int64_t j, int64_t block,
                     int64_t offset, int64_t exact) {
  const int64_t D = p.D, BS = p.block_size, KVH = p.KVH;
  float* dst = side.buf + j * D;
  if (exact >= 0) {
    const int64_t index = ((exact * BS + offset) * KVH + g) * D;
    to_float(dst, side.recent + index * elem_size(p.recent_elem), p.recent_elem, D);
    const float* scale = side.scale + g * D;
    const float* center = side.center ? side.center + g * D : nullptr;
    for (int64_t d = 0; d < D; ++d) dst[d] = (dst[d] - (center ? center[d] : 0.0f)) / scale[d];
    side.rows[j] = dst;
    side.token_scale[j] = 1.0f;
    return;
  }
  const int64_t index = (block * BS + offset) * KVH + g;
  const char* src = side.cache + index * D * elem_size(p.kv_elem);
  if (p.kv_elem == Elem::kFloat) {
    side.rows[j] = reinterpret_cast<const float*>(src);
  } else {
    to_float(dst, src, p.kv_elem, D);
    side.rows[j] = dst;
  }
  side.token_scale[j] = side.tokens ? half_to_float(side.tokens[index]) : 1.0f;
}

// K and V rows of keys [k0, k1) of one request and KV head, with their token scales.
void load_tile(const Problem& p, const int64_t* table, int64_t g, int64_t k0, int64_t k1,
               Scratch& s) {
  const TileSide k{static_cast<const char*>(p.k_cache), static_cast<const char*>(p.recent_k),
                   p.k_token_scale, p.k_scale, p.k_center, s.k_buf.data(), s.k_rows.data(),
                   s.k_token.data()};
  const TileSide v{static_cast<const char*>(p.v_cache), static_cast<const char*>(p.recent_v),
                   p.v_token_scale, p.v_scale, p.v_center, s.v_buf.data(), s.v_rows.data(),
                   s.v_token.data()};
  const int64_t BS = p.block_size;
  int64_t block_index = k0 / BS, offset = k0 % BS;  // then stepped, without divisions
  for (int64_t j = 0; j < k1 - k0; ++j, ++offset) {
    if (offset == BS) {
      offset = 0;
      ++block_index;
    }
    const int64_t block = table[block_index];
    const int64_t exact = p.recent_slot_of_block ? p.recent_slot_of_block[block] : -1;
    load_row(p, k, g, j, block, offset, exact);
    load_row(p, v, g, j, block, offset, exact);
  }
}

// The normalized output row acc / l (with one-byte V: s_v ⊙ acc / l + c_v) into out.
void store_row(const Problem& p, int64_t token, int64_t head, const float* acc, float l,
               float* tmp) {
  const int64_t D = p.D, g = head / p.G;
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < D; ++d) {
    float x = acc[d] * inv;
    if (p.v_scale) x = x * p.v_scale[g * D + d] + (p.v_center ? p.v_center[g * D + d] : 0.0f);
    tmp[d] = x;
  }
  auto* out = static_cast<char*>(p.out) + (token * p.H + head) * D * elem_size(p.query_elem);
  from_float(out, tmp, p.query_elem, D);
}

// Rows' queries folded with the K scales: q' = scale * s_k ⊙ q, q_center = scale * q.c_k;
// empty softmax state (m = -inf, l = 0, acc = 0).
void load_queries(const Problem& p, const Rows& rows, int64_t num_rows, Scratch& s) {
  const int64_t D = p.D;
  const auto* query = static_cast<const char*>(p.query);
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t g = rows.kv_head(r);
    const int64_t token = rows.first_token + rows.token_offset(r);
    float* q = s.q.data() + r * D;
    const int64_t at = token * p.query_stride + rows.query_head(r) * D;
    to_float(q, query + at * elem_size(p.query_elem), p.query_elem, D);
    float q_center = 0.0f;
    if (p.k_center) {
      for (int64_t d = 0; d < D; ++d) q_center += q[d] * p.k_center[g * D + d];
    }
    s.q_center[r] = q_center * p.scale;
    for (int64_t d = 0; d < D; ++d) q[d] *= p.scale * (p.k_scale ? p.k_scale[g * D + d] : 1.0f);
    s.m[r] = kNegInf;
    s.l[r] = 0.0f;
    std::fill_n(s.acc.data() + r * D, D, 0.0f);
  }
}

// Online-softmax update of rows [r0, r1) (one KV head) with the loaded tile of keys [k0, k1);
// each row takes the keys its causal / sliding window allows.
template <int kD>
void attend_tile(const Problem& p, const Rows& rows, int64_t first_pos, int64_t r0, int64_t r1,
                 int64_t k0, int64_t k1, Scratch& s) {
  const int64_t D = kD > 0 ? kD : p.D;
  float* scores = s.scores.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t pos = first_pos + rows.token_offset(r);
    const int64_t lo = p.window > 0 ? std::max(k0, pos - p.window + 1) : k0;
    const int64_t hi = std::min(k1, pos + 1);
    if (lo >= hi) continue;
    const int64_t j0 = lo - k0, j1 = hi - k0;
    const float tile_max = dot_tile<kD>(s.q.data() + r * D, s.k_rows.data(), s.k_token.data(),
                                        s.q_center[r], j0, j1, D, scores);
    float* acc = s.acc.data() + r * D;
    if (tile_max > s.m[r]) {
      const float correction = std::exp(s.m[r] - tile_max);  // 0 on the first tile
      s.l[r] *= correction;
      for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
      s.m[r] = tile_max;
    }
    const float m = s.m[r];
    for (int64_t j = j0; j < j1; ++j) scores[j] = exp_nonpositive(scores[j] - m);
    s.l[r] += accumulate<kD>(acc, s.v_rows.data(), scores, s.v_token.data(), j0, j1, D);
  }
}

template <int kD>
void run_item(const Problem& p, const Item& it, Scratch& s) {
  const Rows rows(p, it);
  const int64_t num_rows = it.num_rows(p.G), D = p.D;
  const int64_t first_pos = p.seq_lens[it.request] - p.query_lens[it.request] + it.token_begin;
  const int64_t* table = p.block_tables + it.request * p.max_blocks;
  load_queries(p, rows, num_rows, s);
  // Tile by tile, head by head: a decode item holds every KV head of its request, so it reads
  // each token's K/V rows whole.
  for (int64_t k0 = it.key_begin; k0 < it.key_end; k0 += kKeyTile) {
    const int64_t k1 = std::min(k0 + kKeyTile, it.key_end);
    for (int64_t g = it.head_begin; g < it.head_end; ++g) {
      load_tile(p, table, g, k0, k1, s);
      const int64_t r0 = (g - it.head_begin) * rows.per_head;
      attend_tile<kD>(p, rows, first_pos, r0, r0 + rows.per_head, k0, k1, s);
    }
  }
  // A chunk hands (m, l, acc) to the merge; a whole item writes its output.
  for (int64_t r = 0; r < num_rows; ++r) {
    const float* acc = s.acc.data() + r * D;
    if (it.is_chunk) {
      float* dst = p.partial + it.partial_offset + r * (D + 2);
      dst[0] = s.m[r];
      dst[1] = s.l[r];
      std::copy_n(acc, D, dst + 2);
    } else {
      store_row(p, rows.first_token + rows.token_offset(r), rows.query_head(r), acc, s.l[r],
                s.k_buf.data());
    }
  }
}

// Combine the chunks [first, first + count) of one split item (same rows, same order).
void merge_chunks(const Problem& p, const std::vector<Item>& items, int64_t first, int64_t count,
                  std::vector<float>& acc) {
  const Item& whole = items[first];
  const Rows rows(p, whole);
  const int64_t D = p.D;
  for (int64_t r = 0; r < whole.num_rows(p.G); ++r) {
    float m = kNegInf;
    for (int64_t c = 0; c < count; ++c) {
      m = std::max(m, p.partial[items[first + c].partial_offset + r * (D + 2)]);
    }
    float l = 0.0f;
    std::fill_n(acc.data(), D, 0.0f);
    for (int64_t c = 0; c < count; ++c) {
      const float* part = p.partial + items[first + c].partial_offset + r * (D + 2);
      if (part[1] == 0.0f) continue;  // a chunk wholly outside this row's window
      const float w = std::exp(part[0] - m);
      l += part[1] * w;
      for (int64_t d = 0; d < D; ++d) acc[d] += part[2 + d] * w;
    }
    store_row(p, rows.first_token + rows.token_offset(r), rows.query_head(r), acc.data(), l,
              acc.data() + D);
  }
}

// Work items: (request, query tile, KV heads) with its key range. A tile has up to
// kRowsPerItem rows; short ones (decode) take several KV heads. When there are few items
// (decode of a few long sequences), long ones are cut into split-K chunks.
std::vector<Item> plan_items(const Problem& p, int64_t num_requests, int64_t num_threads,
                             int64_t& partial_floats) {
  const int64_t tile_tokens = std::max<int64_t>(1, kRowsPerItem / p.G);
  std::vector<Item> base;
  for (int64_t b = 0; b < num_requests; ++b) {
    const int64_t q_len = p.query_lens[b], context = p.seq_lens[b] - q_len;
    for (int64_t t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int64_t n = std::min(tile_tokens, q_len - t0);
      const int64_t key_end = context + t0 + n;
      const int64_t key_begin =
          p.window > 0 ? std::max<int64_t>(0, context + t0 - p.window + 1) : 0;
      const int64_t heads = std::clamp<int64_t>(kRowsPerItem / (n * p.G), 1, p.KVH);
      for (int64_t g = 0; g < p.KVH; g += heads) {
        const int64_t g1 = std::min(g + heads, p.KVH);
        base.push_back({b, g, g1, t0, n, key_begin, key_end, false, 0,
                        (g1 - g) * n * (key_end - key_begin)});
      }
    }
  }
  const int64_t target = kItemsPerThread * num_threads;
  const int64_t base_count = static_cast<int64_t>(base.size());
  partial_floats = 0;
  if (base_count == 0 || base_count >= target) return base;
  std::vector<Item> items;
  const int64_t wanted = (target + base_count - 1) / base_count;
  for (const Item& it : base) {
    const int64_t keys = it.key_end - it.key_begin;
    const int64_t splits = std::min(wanted, keys / kMinSplitKeys);
    if (splits < 2) {
      items.push_back(it);
      continue;
    }
    int64_t chunk = (keys + splits - 1) / splits;
    chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
    for (int64_t k0 = it.key_begin; k0 < it.key_end; k0 += chunk) {
      Item c = it;
      c.key_begin = k0;
      c.key_end = std::min(k0 + chunk, it.key_end);
      c.is_chunk = true;
      c.partial_offset = partial_floats;
      c.cost = (c.head_end - c.head_begin) * c.num_tokens * (c.key_end - c.key_begin);
      partial_floats += c.num_rows(p.G) * (p.D + 2);
      items.push_back(c);
    }
  }
  return items;
}

template <int kD>
void run_all(const Problem& p, const std::vector<Item>& items, int64_t num_threads) {
  std::vector<int64_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });
  int64_t max_rows = 0;
  for (const Item& it : items) max_rows = std::max(max_rows, it.num_rows(p.G));
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(items.size());
  const int64_t workers = std::min(num_threads, count);
  // One task per thread; each takes items, longest first, until none are left.
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch(max_rows, p.D);
    for (int64_t i = next++; i < count; i = next++) run_item<kD>(p, items[order[i]], scratch);
  });
}

// Combine each split item's chunks (consecutive items of one request, query tile and heads).
void merge_split_items(const Problem& p, const std::vector<Item>& items) {
  std::vector<std::pair<int64_t, int64_t>> groups;  // (first chunk, number of chunks)
  for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) {
    const Item& it = items[i];
    if (!it.is_chunk) continue;
    if (!groups.empty()) {
      const Item& first = items[groups.back().first];
      if (first.request == it.request && first.head_begin == it.head_begin &&
          first.token_begin == it.token_begin) {
        ++groups.back().second;
        continue;
      }
    }
    groups.emplace_back(i, 1);
  }
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(2 * p.D);
    for (int64_t i = begin; i < end; ++i) {
      merge_chunks(p, items, groups[i].first, groups[i].second, acc);
    }
  });
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

const float* channel_table(const std::optional<at::Tensor>& t, int64_t KVH, int64_t D,
                           const char* name) {
  if (!t.has_value()) return nullptr;
  check_cpu_contiguous(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == KVH * D, name,
              " must hold ", KVH, " x ", D, " float32 values");
  return t->data_ptr<float>();
}

// The one-byte format's scales, means, int8 token scales and recent exact copies.
void set_one_byte_format(Problem& p, int64_t NB, const std::optional<at::Tensor>& k_scale,
                         const std::optional<at::Tensor>& v_scale,
                         const std::optional<at::Tensor>& k_center,
                         const std::optional<at::Tensor>& v_center,
                         const std::optional<at::Tensor>& k_token_scale,
                         const std::optional<at::Tensor>& v_token_scale,
                         const std::optional<at::Tensor>& recent_slot_of_block,
                         const std::optional<at::Tensor>& recent_k,
                         const std::optional<at::Tensor>& recent_v) {
  const bool is_quantized = !is_16_or_32_bit(p.kv_elem);
  TORCH_CHECK(is_quantized == k_scale.has_value() && is_quantized == v_scale.has_value(),
              "k_scale and v_scale go with one-byte caches, and only with them");
  const int64_t BS = p.block_size, KVH = p.KVH, D = p.D;
  p.k_scale = channel_table(k_scale, KVH, D, "k_scale");
  p.v_scale = channel_table(v_scale, KVH, D, "v_scale");
  p.k_center = channel_table(k_center, KVH, D, "k_center");
  p.v_center = channel_table(v_center, KVH, D, "v_center");
  TORCH_CHECK(k_token_scale.has_value() == v_token_scale.has_value(), "give both token scales");
  if (k_token_scale.has_value()) {
    for (const at::Tensor* t : {&*k_token_scale, &*v_token_scale}) {
      check_cpu_contiguous(*t, "token scales");
      TORCH_CHECK(t->scalar_type() == at::kHalf && t->numel() == NB * BS * KVH,
                  "token scales must be float16 [num_blocks, block_size, KVH]");
    }
    p.k_token_scale = reinterpret_cast<const uint16_t*>(k_token_scale->data_ptr());
    p.v_token_scale = reinterpret_cast<const uint16_t*>(v_token_scale->data_ptr());
  }
  if (!recent_slot_of_block.has_value()) return;
  TORCH_CHECK(is_quantized && recent_k.has_value() && recent_v.has_value(),
              "recent blocks go with one-byte caches and need recent_k / recent_v");
  const at::Tensor& slots = *recent_slot_of_block;
  check_cpu_contiguous(slots, "recent_slot_of_block");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == NB,
              "recent_slot_of_block must be int64 [num_blocks]");
  for (const at::Tensor* t : {&*recent_k, &*recent_v}) {
    check_cpu_contiguous(*t, "recent_k / recent_v");
    TORCH_CHECK(t->dim() == 4 && t->size(1) == BS && t->size(2) == KVH && t->size(3) == D &&
                    t->sizes() == recent_k->sizes() &&
                    t->scalar_type() == recent_k->scalar_type(),
                "recent_k / recent_v must be [capacity + 1, block_size, KVH, D], one dtype");
  }
  p.recent_elem = elem_of(recent_k->scalar_type());
  TORCH_CHECK(is_16_or_32_bit(p.recent_elem), "recent copies must be 16- or 32-bit floats");
  p.recent_slot_of_block = slots.data_ptr<int64_t>();
  p.recent_k = recent_k->data_ptr();
  p.recent_v = recent_v->data_ptr();
  p.recent_capacity = recent_k->size(0);
}

// The shapes, block tables, lengths and scale of a Problem (checked by the callers).
void set_layout(Problem& p, int64_t num_heads, const at::Tensor& key_cache,
                const at::Tensor& block_tables, const at::Tensor& seq_lens,
                const at::Tensor& query_lens, const at::Tensor& query_start_loc, double scale,
                int64_t sliding_window) {
  p.H = num_heads;
  p.KVH = key_cache.size(2);
  p.G = num_heads / p.KVH;
  p.D = key_cache.size(3);
  p.kv_elem = elem_of(key_cache.scalar_type());
  p.block_size = key_cache.size(1);
  p.block_tables = block_tables.data_ptr<int64_t>();
  p.max_blocks = block_tables.size(1);
  p.seq_lens = seq_lens.data_ptr<int64_t>();
  p.query_lens = query_lens.data_ptr<int64_t>();
  p.query_start = query_start_loc.data_ptr<int64_t>();
  p.scale = static_cast<float>(scale);
  p.window = std::max<int64_t>(sliding_window, 0);
}

// Every block (and exact copy) a request reads must exist: the kernel does no bounds checks.
void check_requests(const Problem& p, int64_t B, int64_t T, int64_t NB) {
  const int64_t BS = p.block_size;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t seq_len = p.seq_lens[b], q_len = p.query_lens[b];
    TORCH_CHECK(q_len >= 0 && q_len <= seq_len && seq_len <= p.max_blocks * BS, "request ", b,
                ": bad lengths (query ", q_len, ", sequence ", seq_len, ")");
    TORCH_CHECK(p.query_start[b] >= 0 && p.query_start[b] + q_len <= T, "request ", b,
                ": query tokens outside [0, ", T, ")");
    for (int64_t i = 0; i < (seq_len + BS - 1) / BS; ++i) {
      const int64_t block = p.block_tables[b * p.max_blocks + i];
      TORCH_CHECK(block >= 0 && block < NB, "request ", b, ": block ", block, " out of range");
      TORCH_CHECK(!p.recent_slot_of_block || p.recent_slot_of_block[block] < p.recent_capacity,
                  "request ", b, ": recent slot of block ", block, " out of range");
    }
  }
}

}  // namespace

// See the comment at the top of the file. Returns [T, H, D] in the query's dtype.
at::Tensor paged_attention(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_lens,
    const at::Tensor& query_start_loc, double scale, int64_t sliding_window,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_center, const std::optional<at::Tensor>& v_center,
    const std::optional<at::Tensor>& k_token_scale, const std::optional<at::Tensor>& v_token_scale,
    const std::optional<at::Tensor>& recent_slot_of_block,
    const std::optional<at::Tensor>& recent_k, const std::optional<at::Tensor>& recent_v) {
  TORCH_CHECK(query.dim() == 3 && query.device().is_cpu(), "query must be a [T, H, D] CPU tensor");
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [num_blocks, block_size, KVH, D]");
  check_cpu_contiguous(key_cache, "key_cache");
  check_cpu_contiguous(value_cache, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              "K and V caches differ in shape or dtype");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong,
              "block_tables must be int64 [B, max_blocks]");
  check_cpu_contiguous(block_tables, "block_tables");
  const int64_t B = block_tables.size(0);
  for (const at::Tensor* t : {&seq_lens, &query_lens, &query_start_loc}) {
    check_cpu_contiguous(*t, "seq_lens / query_lens / query_start_loc");
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == B,
                "seq_lens, query_lens and query_start_loc must be int64 [B]");
  }
  const at::Tensor q = query.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = key_cache.size(0), KVH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D, "key_cache head dim ", key_cache.size(3), " != ", D);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "query heads ", H, " not a multiple of KV heads ", KVH);

  Problem p{};
  p.query = q.data_ptr();
  p.query_stride = H * D;
  p.query_elem = elem_of(q.scalar_type());
  TORCH_CHECK(is_16_or_32_bit(p.query_elem), "query must be float32, bfloat16 or float16");
  set_layout(p, H, key_cache, block_tables, seq_lens, query_lens, query_start_loc, scale,
             sliding_window);
  p.k_cache = key_cache.data_ptr();
  p.v_cache = value_cache.data_ptr();
  set_one_byte_format(p, NB, k_scale, v_scale, k_center, v_center, k_token_scale, v_token_scale,
                      recent_slot_of_block, recent_k, recent_v);
  check_requests(p, B, T, NB);

  at::Tensor out = at::empty_like(q);
  p.out = out.data_ptr();
  const int64_t num_threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t partial_floats = 0;
  const std::vector<Item> items = plan_items(p, B, num_threads, partial_floats);
  if (items.empty()) return out;
  std::vector<float> partial(partial_floats);
  p.partial = partial.data();
  switch (D) {  // NOTE: compile-time head dims must be multiples of kLanes
    case 64: run_all<64>(p, items, num_threads); break;
    case 128: run_all<128>(p, items, num_threads); break;
    case 256: run_all<256>(p, items, num_threads); break;
    default: run_all<0>(p, items, num_threads); break;
  }
  if (partial_floats > 0) merge_split_items(p, items);
  return out;
}


struct PagedAttentionHeads::Impl {
  Problem p{};
  Scratch scratch;
  int64_t num_blocks;
  Impl(int64_t rows, int64_t D) : scratch(rows, D) {}
};

PagedAttentionHeads::PagedAttentionHeads(const at::Tensor& key_cache,
                                         const at::Tensor& block_tables,
                                         const at::Tensor& seq_lens, const at::Tensor& query_lens,
                                         const at::Tensor& query_start_loc, double scale,
                                         int64_t sliding_window, int64_t num_heads,
                                         int64_t num_tokens) {
  check_layer(key_cache, key_cache);
  for (const at::Tensor* t : {&block_tables, &seq_lens, &query_lens, &query_start_loc}) {
    check_cpu_contiguous(*t, "block_tables / seq_lens / query_lens / query_start_loc");
    TORCH_CHECK(t->scalar_type() == at::kLong, "block tables and lengths must be int64");
  }
  const int64_t B = block_tables.size(0), KVH = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(block_tables.dim() == 2 && seq_lens.numel() == B && query_lens.numel() == B &&
                  query_start_loc.numel() == B,
              "block_tables [B, max_blocks] and lengths [B]");
  TORCH_CHECK(KVH > 0 && num_heads % KVH == 0, "query heads not a multiple of KV heads");
  Problem p{};
  p.query_elem = Elem::kFloat;
  set_layout(p, num_heads, key_cache, block_tables, seq_lens, query_lens, query_start_loc, scale,
             sliding_window);
  check_requests(p, B, num_tokens, key_cache.size(0));
  int64_t rows = 1;
  for (int64_t b = 0; b < B; ++b) rows = std::max(rows, p.query_lens[b] * p.G);
  impl_ = std::make_unique<Impl>(rows, D);
  impl_->p = p;
  impl_->num_blocks = key_cache.size(0);
}

PagedAttentionHeads::~PagedAttentionHeads() = default;

void PagedAttentionHeads::check_layer(const at::Tensor& key_cache,
                                      const at::Tensor& value_cache) const {
  TORCH_CHECK(key_cache.dim() == 4, "key_cache must be [num_blocks, block_size, KVH, D]");
  check_cpu_contiguous(key_cache, "key_cache");
  check_cpu_contiguous(value_cache, "value_cache");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() &&
                  value_cache.scalar_type() == key_cache.scalar_type() &&
                  is_16_or_32_bit(elem_of(key_cache.scalar_type())),
              "K and V caches must be 16- or 32-bit floats of one shape");
  if (impl_) {
    const Problem& p = impl_->p;
    TORCH_CHECK(key_cache.size(0) == impl_->num_blocks && key_cache.size(1) == p.block_size &&
                    key_cache.size(2) == p.KVH && key_cache.size(3) == p.D &&
                    elem_of(key_cache.scalar_type()) == p.kv_elem,
                "every layer's cache must have the first one's shape and dtype");
  }
}

void PagedAttentionHeads::set_layer(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                    const float* query, int64_t query_stride, float* out) {
  Problem& p = impl_->p;
  p.k_cache = key_cache.data_ptr();
  p.v_cache = value_cache.data_ptr();
  p.query = query;
  p.query_stride = query_stride;
  p.out = out;
}

void PagedAttentionHeads::run(int64_t request, int64_t kv_head) {
  const Problem& p = impl_->p;
  const int64_t q_len = p.query_lens[request], context = p.seq_lens[request] - q_len;
  if (q_len == 0) return;
  const int64_t key_begin = p.window > 0 ? std::max<int64_t>(0, context - p.window + 1) : 0;
  const Item it{request, kv_head, kv_head + 1, 0, q_len, key_begin, p.seq_lens[request],
                false, 0, q_len * (p.seq_lens[request] - key_begin)};
  switch (p.D) {
    case 64: run_item<64>(p, it, impl_->scratch); break;
    case 128: run_item<128>(p, it, impl_->scratch); break;
    case 256: run_item<256>(p, it, impl_->scratch); break;
    default: run_item<0>(p, it, impl_->scratch); break;
  }
}

// Every op releases the GIL while it runs (py::call_guard): the server's event loop thread keeps
// streaming tokens while the engine thread computes, as it does during torch's own ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvforge CPU ops: paged attention, block-quantized GEMM, fused layer ops, quantizers";
  m.def("paged_attention", &paged_attention, py::call_guard<py::gil_scoped_release>(), "Attention over paged K/V blocks, read in place",
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("query_lens"), py::arg("query_start_loc"), py::arg("scale"),
        py::arg("sliding_window"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none(), py::arg("k_center") = py::none(),
        py::arg("v_center") = py::none(), py::arg("k_token_scale") = py::none(),
        py::arg("v_token_scale") = py::none(), py::arg("recent_slot_of_block") = py::none(),
        py::arg("recent_k") = py::none(), py::arg("recent_v") = py::none());
  bind_quant_gemm(m);
  bind_fused_ops(m);
  bind_quantize(m);
}
