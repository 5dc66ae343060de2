// GGUF's legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) to and from float32, with no torch:
// a plain shared library that kvforge/ops/blocks.py loads with ctypes.
//
// Why native, and why apart from the torch extension: requantizing a file (`kvforge quantize`)
// is a few passes over every weight, which numpy does one full-tensor pass per operation
// (~1 s each way for a 135M model) and torch only after its ~1.5 s import, longer than
// llama-quantize's whole run. Here a block is read once, in cache, and nothing needs torch.
// The quantizers give the same bytes as kvforge/quant/quantizers.py (its searches are the shared
// quant_search.h; the rest is the same float32 arithmetic in the same order).
//
// Layouts (ggml's; d, m float16; qs nibbles: value j in the low half of byte j, value j + 16 in
// the high half; qh bit j is bit 4 of value j):
//   Q4_0 [d, qs[16]]          x = d (q - 8)         Q4_1 [d, m, qs[16]]          x = d q + m
//   Q5_0 [d, qh[4], qs[16]]   x = d (q - 16)        Q5_1 [d, m, qh[4], qs[16]]   x = d q + m
//   Q8_0 [d, q[32] int8]      x = d q

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_search.h"

namespace {

using namespace kvforge_quant;

constexpr int kBlock = 32;
// ggml type ids (gguf.GGMLQuantizationType)
constexpr int32_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8;

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    const uint32_t bits = ((exponent + 112) << 23) | (mantissa << 13);
    std::memcpy(&magnitude, &bits, 4);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Round to nearest, ties to even (as torch's .to(float16)); overflow gives infinity.
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7fffffff;
  if (abs > 0x7f800000) return sign | 0x7e00;  // NaN
  if (abs >= 0x477ff000) return sign | 0x7c00;  // >= 65520 rounds to infinity
  if (abs < 0x38800000) {                       // below 2^-14: a subnormal half (or zero)
    float magnitude;
    std::memcpy(&magnitude, &abs, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f));  // / 2^-24
  }
  const uint32_t rounded = abs + 0xfff + ((abs >> 13) & 1);
  return sign | static_cast<uint16_t>((rounded - 0x38000000) >> 13);
}

float f16_round(float f) { return half_to_float(float_to_half(f)); }

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// ------------------------------------------------------------------------------ dequantize

void dequantize_block(int32_t type, const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b));
  if (type == kQ8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < kBlock; ++i) y[i] = d * static_cast<float>(q[i]);
    return;
  }
  const bool has_min = type == kQ4_1 || type == kQ5_1;
  const float m = has_min ? half_to_float(load_u16(b + 2)) : 0.f;
  const uint8_t* p = b + (has_min ? 4 : 2);
  uint32_t qh = 0;
  const bool five_bits = type == kQ5_0 || type == kQ5_1;
  if (five_bits) {
    std::memcpy(&qh, p, 4);
    p += 4;
  }
  const int offset = has_min ? 0 : (five_bits ? 16 : 8);
  for (int j = 0; j < kBlock / 2; ++j) {
    int lo = p[j] & 0x0f, hi = p[j] >> 4;
    if (five_bits) {
      lo |= static_cast<int>((qh >> j) & 1) << 4;
      hi |= static_cast<int>((qh >> (j + 16)) & 1) << 4;
    }
    y[j] = d * static_cast<float>(lo - offset) + m;
    y[j + kBlock / 2] = d * static_cast<float>(hi - offset) + m;
  }
}

// ------------------------------------------------------------------------------ quantize

// Codes of one block: clamp(round((x - min) / d), lo, hi), 0 where d is 0 (quant_codes).
void block_codes(const float* x, float d, float min, float lo, float hi, int* q) {
  const float inv = d == 0.f ? 0.f : 1.f / d;
  for (int i = 0; i < kBlock; ++i) {
    q[i] = static_cast<int>(std::min(std::max(round_away((x[i] - min) * inv), lo), hi));
  }
}

void pack_nibbles(const int* q, uint8_t* out) {
  for (int j = 0; j < kBlock / 2; ++j) {
    out[j] = static_cast<uint8_t>((q[j] & 0x0f) | ((q[j + kBlock / 2] & 0x0f) << 4));
  }
}

void pack_high_bits(const int* q, uint8_t* out) {
  uint32_t qh = 0;
  for (int j = 0; j < kBlock; ++j) qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
  std::memcpy(out, &qh, 4);
}

void quantize_q8_0(const float* x, uint8_t* out) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < kBlock; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  // + 0: an all-zero block (whatever its zeros' signs) gets scale +0, as llama.cpp's fabs
  const float d = f16_round(std::max(hi, -lo) / 127.f) + 0.f;
  int q[kBlock];
  block_codes(x, d, 0.f, -127.f, 127.f, q);
  store_u16(out, float_to_half(d));
  for (int i = 0; i < kBlock; ++i) out[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(q[i]));
}

// Q4_0 / Q5_0 (symmetric search, codes shifted by nmax) and Q4_1 / Q5_1 (scale + min search)
// for up to kLanes blocks at x, as quantizers.py's _legacy_sym / _legacy_asym.
void quantize_tile(int32_t type, const float* x, int64_t count, uint8_t* out, int64_t out_size) {
  const Tile tile(x, nullptr, kBlock, 0, count);
  const bool five_bits = type == kQ5_0 || type == kQ5_1;
  const bool has_min = type == kQ4_1 || type == kQ5_1;
  float scales[kLanes], mins[kLanes] = {};
  if (has_min) {
    search_asymmetric_tile<false>(tile, five_bits ? 31.f : 15.f, -0.9f, 0.05f, 36, scales, mins);
  } else {
    search_symmetric_tile<false>(tile, five_bits ? 16.f : 8.f, 9, scales);
  }
  for (int64_t b = 0; b < count; ++b) {
    const float* xb = x + b * kBlock;
    uint8_t* ob = out + b * out_size;
    const float d = f16_round(scales[b]);
    int q[kBlock];
    if (has_min) {
      const float m = f16_round(mins[b]);
      block_codes(xb, d, m, 0.f, five_bits ? 31.f : 15.f, q);
      store_u16(ob, float_to_half(d));
      store_u16(ob + 2, float_to_half(m));
      ob += 4;
    } else {
      const float nmax = five_bits ? 16.f : 8.f;
      block_codes(xb, d, 0.f, -nmax, nmax - 1.f, q);
      for (int i = 0; i < kBlock; ++i) q[i] += static_cast<int>(nmax);
      store_u16(ob, float_to_half(d));
      ob += 2;
    }
    if (five_bits) {
      pack_high_bits(q, ob);
      ob += 4;
    }
    pack_nibbles(q, ob);
  }
}

// Up to kLanes blocks of any handled type; false (nothing written) when a value is NaN or
// infinite, which no scale can represent.
bool quantize_blocks(int32_t type, const float* x, int64_t count, uint8_t* out, int64_t size) {
  bool finite = true;
  for (int64_t i = 0; i < count * kBlock; ++i) finite &= std::fabs(x[i]) <= 3.4028235e38f;
  if (!finite) return false;
  if (type == kQ8_0) {
    for (int64_t b = 0; b < count; ++b) quantize_q8_0(x + b * kBlock, out + b * size);
  } else {
    quantize_tile(type, x, count, out, size);
  }
  return true;
}

int64_t type_size(int32_t type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    default: return -1;
  }
}

}  // namespace

extern "C" {

// Float32 values of num_blocks blocks (32 values each); returns -1 for an unhandled type.
int32_t kvf_dequantize(int32_t type, const uint8_t* src, float* dst, int64_t num_blocks) {
  const int64_t size = type_size(type);
  if (size < 0) return -1;
  for (int64_t b = 0; b < num_blocks; ++b) dequantize_block(type, src + b * size, dst + b * kBlock);
  return 0;
}

// Status of kvf_quantize / kvf_requantize: 0 done, -1 a type this library does not handle,
// 1 a NaN or infinite value met (the output is incomplete).

// Blocks of num_blocks x 32 float32 values.
int32_t kvf_quantize(int32_t type, const float* src, uint8_t* dst, int64_t num_blocks) {
  const int64_t size = type_size(type);
  if (size < 0) return -1;
  for (int64_t first = 0; first < num_blocks; first += kLanes) {
    const int64_t count = std::min(kLanes, num_blocks - first);
    if (!quantize_blocks(type, src + first * kBlock, count, dst + first * size, size)) return 1;
  }
  return 0;
}

// Blocks of one type to another, a tile at a time through a buffer that stays in L1 (the float
// tensor is never materialised); the same bytes as kvf_dequantize then kvf_quantize.
int32_t kvf_requantize(int32_t src_type, const uint8_t* src, int32_t dst_type, uint8_t* dst,
                       int64_t num_blocks) {
  const int64_t src_size = type_size(src_type), dst_size = type_size(dst_type);
  if (src_size < 0 || dst_size < 0) return -1;
  alignas(64) float values[kLanes * kBlock];
  for (int64_t first = 0; first < num_blocks; first += kLanes) {
    const int64_t count = std::min(kLanes, num_blocks - first);
    for (int64_t b = 0; b < count; ++b) {
      dequantize_block(src_type, src + (first + b) * src_size, values + b * kBlock);
    }
    if (!quantize_blocks(dst_type, values, count, dst + first * dst_size, dst_size)) return 1;
  }
  return 0;
}

}  // extern "C"
