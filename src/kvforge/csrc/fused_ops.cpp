// Fused per-layer elementwise ops on the CPU: each replaces several eager torch ops (and their
// temporaries) of a decoder layer, which at a few tokens per step cost more than the maths.
//
// Dimensions: T tokens, E hidden size, F MLP width, H heads (query and key heads side by side for
// the rotary), D head dim, KVH KV heads.
//
//   rms_norm(x [T, E], w [E], eps)                      -> x / rms(x) * w
//   add_rms_norm(x [T, E], residual [T, E], w, eps)     -> residual += x; residual / rms * w
//   rotary_(x [T, H, D], cos [T, D], signed_sin [T, D])    x = x cos + roll(x, D/2) signed_sin
//   silu_and_mul(gate_up [T, 2F])                       -> silu(gate_up[:, :F]) * gate_up[:, F:]
//   kv_cache_store(k, v [T, KVH, D], k_cache, v_cache [NB, BS, KVH, D], slots [T])
//                                                          cache[slot] = (k, v) in the cache dtype
//   lora_apply_(y [T, N], x [T, K], a [S, W, K], bt [S, W, N], token_slots [T])
//                                                          y[t] += bt[s]^T (a[s] x[t]), s = slot of
//                                                          token t (-1: none); see layers/lora.py
// Everything is computed in float32 and rounded once to the output dtype (float32, bfloat16 or
// float16), so each op matches its torch reference (layers/norm.py, layers/rotary.py, the MLP,
// PagedKVCache._store) to the last rounding. Inputs may be strided views (rows of a fused qkv);
// the last dimension must be contiguous. Rows go to at::parallel_for when there are many.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kvforge_ops.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGrainRows = 16;

template <typename T>
inline float to_f32(const T* p) {
  return static_cast<float>(*p);
}
template <typename T>
inline void from_f32(T* p, float v) {
  *p = static_cast<T>(v);
}

void check_rows(const at::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == dims, name, " must be a ", dims, "-D CPU tensor");
  TORCH_CHECK(x.stride(-1) == 1, name, "'s last dimension must be contiguous");
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, name,
              " must be float32, bfloat16 or float16");
}

#define KVF_FLOAT_TYPES(TYPE, NAME, ...)                                                  \
  [&] {                                                                                   \
    switch (TYPE) {                                                                       \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }                      \
      case at::kBFloat16: { using NAME = at::BFloat16; return __VA_ARGS__(); }            \
      case at::kHalf: { using NAME = at::Half; return __VA_ARGS__(); }                    \
      default: TORCH_CHECK(false, "unsupported dtype ", TYPE);                            \
    }                                                                                     \
  }()

// One row: out = r / rms(r) * w, r = x (+ residual, stored back when given).
template <typename T, typename W>
void norm_row(const T* x, T* residual, const W* w, T* out, int64_t n, float eps,
              std::vector<float>& buf) {
  float* r = buf.data();
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = to_f32(x + i);
    if (residual != nullptr) {
      v += to_f32(residual + i);
      from_f32(residual + i, v);
      v = to_f32(residual + i);  // the stored (rounded) sum, as the torch reference sees it
    }
    r[i] = v;
    sum += v * v;
  }
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) from_f32(out + i, r[i] * inv * to_f32(w + i));
}

at::Tensor norm_impl(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                     const at::Tensor& weight, double eps) {
  check_rows(x, "x", 2);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.is_contiguous(),
              "weight must be contiguous [", n, "]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type(),
              "weight must be float32 or x's dtype");
  if (residual.has_value()) {
    check_rows(*residual, "residual", 2);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->is_contiguous(),
                "residual must be contiguous and match x");
  }
  at::Tensor out = at::empty({rows, n}, x.options());
  KVF_FLOAT_TYPES(x.scalar_type(), T, [&] {
    auto run = [&](const auto* w) {
      at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(n);
        for (int64_t t = begin; t < end; ++t) {
          T* res = residual.has_value() ? residual->data_ptr<T>() + t * n : nullptr;
          norm_row(x.data_ptr<T>() + t * x.stride(0), res, w, out.data_ptr<T>() + t * n, n,
                   static_cast<float>(eps), buf);
        }
      });
    };
    if (weight.scalar_type() == at::kFloat) {
      run(weight.data_ptr<float>());
    } else {
      run(weight.data_ptr<T>());
    }
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_impl(x, std::nullopt, weight, eps);
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  return norm_impl(x, residual, weight, eps);
}

// x [T, H, D] in place (any row and head strides, contiguous D): NeoX half rotation.
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  check_rows(x, "x", 3);
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "head dim must be even");
  for (const at::Tensor* t : {&cos, &signed_sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == tokens * dim,
                "cos / signed_sin must be contiguous float32 [T, D]");
  }
  const float* c = cos.data_ptr<float>();
  const float* s = signed_sin.data_ptr<float>();
  KVF_FLOAT_TYPES(x.scalar_type(), T, [&] {
    T* base = x.data_ptr<T>();
    at::parallel_for(0, tokens, kGrainRows, [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim);
      for (int64_t t = begin; t < end; ++t) {
        const float* ct = c + t * dim;
        const float* st = s + t * dim;
        for (int64_t h = 0; h < heads; ++h) {
          T* p = base + t * x.stride(0) + h * x.stride(1);
          for (int64_t i = 0; i < dim; ++i) row[i] = to_f32(p + i);
          for (int64_t i = 0; i < dim; ++i) {
            const float rolled = row[i < half ? i + half : i - half];
            from_f32(p + i, row[i] * ct[i] + rolled * st[i]);
          }
        }
      }
    });
  });
}

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for 8 floats: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p the Cephes expf polynomial
// (about 1 ulp); written here because a scalar std::exp per element made silu_and_mul ~10% of a
// decode step. Overflow gives inf, NaN stays NaN (max/min return their second operand when one
// is NaN), as std::exp.
inline __m256 exp8(__m256 x_in) {
  const __m256 x =
      _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-87.3365f), x_in));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 overflow = _mm256_cmp_ps(x_in, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)),
                          _mm256_set1_ps(std::numeric_limits<float>::infinity()), overflow);
}
#endif

// out[i] = silu(g[i]) * u[i] over one float32 row.
inline int64_t silu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(g + i);
    const __m256 silu = _mm256_div_ps(
        a, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
  }
#endif
  return i;  // the columns done; the caller finishes the rest
}
template <typename T>
inline int64_t silu_mul_row(const T*, const T*, T*, int64_t) {
  return 0;  // 16-bit rows: all in the caller's loop
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", 2);
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1));
  KVF_FLOAT_TYPES(gate_up.scalar_type(), T, [&] {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* g = gate_up.data_ptr<T>() + t * gate_up.stride(0);
        T* o = out.data_ptr<T>() + t * width;
        const int64_t done = silu_mul_row(g, g + width, o, width);
        for (int64_t i = done; i < width; ++i) {
          // torch rounds silu(gate) to the dtype before the product
          const float a = to_f32(g + i);
          const T act = static_cast<T>(a / (1.0f + std::exp(-a)));
          from_f32(o + i, static_cast<float>(act) * to_f32(g + width + i));
        }
      }
    });
  });
  return out;
}

template <typename S, typename C>
void store_rows(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t tokens) {
  const int64_t heads = src.size(1), dim = src.size(2);
  C* dst = cache.data_ptr<C>();
  const S* base = src.data_ptr<S>();
  for (int64_t t = 0; t < tokens; ++t) {
    C* out = dst + slots[t] * heads * dim;
    for (int64_t h = 0; h < heads; ++h) {
      const S* in = base + t * src.stride(0) + h * src.stride(1);
      if constexpr (std::is_same_v<S, C>) {
        std::memcpy(out + h * dim, in, dim * sizeof(C));
      } else {
        for (int64_t i = 0; i < dim; ++i) out[h * dim + i] = static_cast<C>(to_f32(in + i));
      }
    }
  }
}

void kv_cache_store(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                    at::Tensor& value_cache, const at::Tensor& slots) {
  check_rows(key, "key", 3);
  check_rows(value, "value", 3);
  TORCH_CHECK(key.sizes() == value.sizes() && key.scalar_type() == value.scalar_type(),
              "key and value must match");
  const int64_t tokens = key.size(0);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.numel() == tokens,
              "slots must be contiguous int64 [T]");
  for (const at::Tensor* c : {&key_cache, &value_cache}) {
    check_rows(*c, "cache", 4);
    TORCH_CHECK(c->is_contiguous() && c->size(2) == key.size(1) && c->size(3) == key.size(2),
                "caches must be contiguous [NB, BS, KVH, D]");
  }
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "caches must match");
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t capacity = key_cache.size(0) * key_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(s[t] >= 0 && s[t] < capacity, "slot ", s[t], " is outside the cache");
  }
  KVF_FLOAT_TYPES(key.scalar_type(), S, [&] {
    KVF_FLOAT_TYPES(key_cache.scalar_type(), C, [&] {
      store_rows<S, C>(key, key_cache, s, tokens);
      store_rows<S, C>(value, value_cache, s, tokens);
    });
  });
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
#endif
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// LoRA updates of a batch that mixes adapters, in place: for each token t whose slot s =
// token_slots[t] is >= 0, h = a[s] x[t] (W dot products) and y[t] += h bt[s] (W row updates,
// skipping the zero rows of ranks an adapter does not fill). Tokens run in parallel; each reads
// only its own adapter's rows, so a batch of many adapters costs what each token needs (a stacked
// matmul over every slot would do the work of all of them for every token).
void lora_apply_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                 const at::Tensor& token_slots) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
                  a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat,
              "lora_apply_ works on float32");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a.dim() == 3 && bt.dim() == 3, "bad ranks");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && a.is_contiguous() && bt.is_contiguous(),
              "lora_apply_ needs contiguous tensors");
  const int64_t tokens = x.size(0), in = x.size(1), out = y.size(1);
  const int64_t num_slots = a.size(0), width = a.size(1);
  TORCH_CHECK(y.size(0) == tokens && a.size(2) == in && bt.size(0) == num_slots &&
                  bt.size(1) == width && bt.size(2) == out,
              "lora_apply_ shapes disagree");
  TORCH_CHECK(token_slots.scalar_type() == at::kLong && token_slots.numel() == tokens &&
                  token_slots.is_contiguous(),
              "token_slots must be int64 [T]");
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t* sp = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] < num_slots, "token slot ", sp[t], " out of range");
  }
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = sp[t];
      if (s < 0) continue;
      const float* as = ap + s * width * in;
      for (int64_t w = 0; w < width; ++w) h[w] = dot(as + w * in, xp + t * in, in);
      const float* bs = bp + s * width * out;
      for (int64_t w = 0; w < width; ++w) {
        if (h[w] != 0.0f) axpy(h[w], bs + w * out, yp + t * out, out);
      }
    }
  });
}

// One plain pre-norm decoder layer in a single call: the same ops, in the same order, as
// DecoderLayer.forward in models/common.py takes for a layer without biases, QK-norm or sandwich
// norms, with SiLU, quant_gemm weights, float32 activations and a 16/32-bit paged KV cache; so
// the results are identical and only the ~12 Python module calls per layer go away.
//   linears: (qs, scales, mins) of qkv, o, gate_up and down, in that order.
// Returns (mlp output, residual): the hidden state is their sum (the next norm adds them).
std::tuple<at::Tensor, at::Tensor> decoder_layer(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, const std::vector<std::optional<at::Tensor>>& linears,
    int64_t act_bits, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& cos,
    const at::Tensor& signed_sin, at::Tensor& key_cache, at::Tensor& value_cache,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    const at::Tensor& query_lens, const at::Tensor& query_start_loc, double scale,
    int64_t sliding_window, const std::vector<at::Tensor>& lora,
    const std::optional<at::Tensor>& token_slots) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be contiguous float32 [T, E]");
  TORCH_CHECK(linears.size() == 12, "linears must hold (qs, scales, mins) of 4 layers");
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(linears[3 * i].has_value() && linears[3 * i + 1].has_value(),
                "linear ", i, " lacks its codes or scales");
  }
  TORCH_CHECK(lora.empty() || (lora.size() == 8 && token_slots.has_value()),
              "lora must hold (a, bt) of the 4 linears, with token_slots");
  auto linear = [&](const at::Tensor& in, int i) {
    at::Tensor y =
        quant_linear(in, *linears[3 * i], *linears[3 * i + 1], linears[3 * i + 2], act_bits);
    if (!lora.empty()) lora_apply_(y, in.contiguous(), lora[2 * i], lora[2 * i + 1], *token_slots);
    return y;
  };
  at::Tensor res = residual.has_value() ? *residual : x;
  at::Tensor h = residual.has_value() ? add_rms_norm(x, res, input_norm, eps)
                                      : rms_norm(x, input_norm, eps);
  const at::Tensor qkv = linear(h, 0);  // [T, (H + 2 KVH) D]
  const int64_t tokens = x.size(0);
  const int64_t head_dim = qkv.size(1) / (num_heads + 2 * num_kv_heads);
  TORCH_CHECK(head_dim * (num_heads + 2 * num_kv_heads) == qkv.size(1), "qkv width mismatch");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({tokens, -1, head_dim});
  rotary_(qk, cos, signed_sin);
  const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, num_kv_heads, head_dim});
  const at::Tensor v =
      qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, num_kv_heads, head_dim});
  kv_cache_store(k, v, key_cache, value_cache, slots);
  const at::Tensor attn = paged_attention(
      qk.narrow(1, 0, num_heads), key_cache, value_cache, block_tables, seq_lens, query_lens,
      query_start_loc, scale, sliding_window, std::nullopt, std::nullopt, std::nullopt,
      std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  const at::Tensor o = linear(attn.view({tokens, q_size}), 1);
  h = add_rms_norm(o, res, post_norm, eps);
  return {linear(silu_and_mul(linear(h, 2)), 3), res};
}

// Greedy sampling of float32 logits [R, V] in one pass per row: (argmax, its log-probability
// logit - logsumexp(row)), as torch's argmax (first maximum; a NaN counts as the maximum) and
// logsumexp (an infinite maximum is the result). banned [R, W] (token ids, -1 = none) are never
// chosen (min_tokens' stop tokens); the log-probability is still of the unbanned row, as the
// sampler's. Replaces argmax + gather + logsumexp: ~0.4 ms per decode step on a 49k vocabulary.
std::tuple<at::Tensor, at::Tensor> greedy_sample(const at::Tensor& logits,
                                                 const std::optional<at::Tensor>& banned) {
  check_rows(logits, "logits", 2);
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be contiguous float32 [R, V]");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits need a vocabulary");
  const int64_t* ban = nullptr;
  int64_t W = 0;
  if (banned.has_value()) {
    TORCH_CHECK(banned->scalar_type() == at::kLong && banned->is_contiguous() &&
                    banned->dim() == 2 && banned->size(0) == R,
                "banned must be contiguous int64 [R, W]");
    ban = banned->data_ptr<int64_t>();
    W = banned->size(1);
  }
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({R}, logits.options());
  const float* base = logits.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = base + r * V;
      const int64_t* row_ban = ban + r * W;
      auto is_banned = [&](int64_t i) {
        for (int64_t w = 0; w < W; ++w) {
          if (row_ban[w] == i) return true;
        }
        return false;
      };
      const float neg_inf = -std::numeric_limits<float>::infinity();
      auto value = [&](int64_t i) { return W > 0 && is_banned(i) ? neg_inf : x[i]; };
      int64_t best = 0;
      float best_value = value(0);
      for (int64_t i = 1; i < V && !std::isnan(best_value); ++i) {
        if (x[i] > best_value || std::isnan(x[i])) {
          const float v = value(i);
          if (v > best_value || std::isnan(v)) {
            best = i;
            best_value = v;
          }
        }
      }
      float m = x[0];  // the unbanned row's maximum, for logsumexp
      for (int64_t i = 1; i < V && !std::isnan(m); ++i) {
        if (x[i] > m || std::isnan(x[i])) m = x[i];
      }
      float lse = m;
      if (std::isfinite(m)) {
        float sum = 0.0f;
        int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 acc = _mm256_setzero_ps();
        const __m256 vm = _mm256_set1_ps(m);
        for (; i + 8 <= V; i += 8) {
          acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, acc);
        for (float v : lanes) sum += v;
#endif
        for (; i < V; ++i) sum += std::exp(x[i] - m);
        lse = m + std::log(sum);
      }
      tp[r] = best;
      lp[r] = x[best] - lse;
    }
  });
  return {tokens, logprobs};
}

// ---------------------------------------------------------------------------------------------
// decoder_stack for a few tokens (decode, short verifications) as one parallel region: the
// threads stay in it from the first layer to the last, split each op's work among themselves and
// meet at spin barriers between ops. The per-op path opens a parallel region per op, ~5 per layer,
// and each costs microseconds of thread wake-up (OpenMP's workers sleep between regions); with
// 30 layers at one token that was ~0.5 ms of a ~7 ms step. Same kernels, same order per row, so
// the results equal the per-op path's (attention takes each (request, KV head) whole, without
// split-K: long contexts may round differently, as when the batch changes).

constexpr int64_t kTeamMaxTokens = 16;

// A barrier for the threads of one region: spins (the other threads are on their cores between
// ops a few microseconds apart), yields after a while so an oversubscribed machine goes on.
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}
  void wait() {
    if (threads_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < 20000) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int threads_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> generation_{0};
};

// [begin, end) of n items for thread t of n_threads.
inline std::pair<int64_t, int64_t> share(int64_t n, int t, int n_threads) {
  return {n * t / n_threads, n * (t + 1) / n_threads};
}

// Rotary of one head row in place (rotary_'s arithmetic).
inline void rotary_row(float* p, const float* c, const float* s, int64_t dim, float* row) {
  const int64_t half = dim / 2;
  std::memcpy(row, p, dim * sizeof(float));
  for (int64_t i = 0; i < dim; ++i) p[i] = row[i] * c[i] + row[i < half ? i + half : i - half] * s[i];
}

template <typename C>
inline void store_head(const float* in, C* out, int64_t dim) {
  if constexpr (std::is_same_v<C, float>) {
    std::memcpy(out, in, dim * sizeof(float));
  } else {
    for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<C>(in[i]);
  }
}

// The interleaved weights of a layer's 4 linears, if all four are.
bool team_linears(const std::vector<std::optional<at::Tensor>>& weights, int64_t layers) {
  if (!quant_gemm_il_available()) return false;
  for (int64_t i = 0; i < layers; ++i) {
    for (int j = 0; j < 4; ++j) {
      const auto& qs = weights[14 * i + 2 + 3 * j];
      if (!qs.has_value() || qs->dim() != 4) return false;
    }
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> decoder_stack_team(
    const at::Tensor& x, const std::vector<std::optional<at::Tensor>>& weights,
    const std::vector<at::Tensor>& caches, double eps, int64_t act_bits, int64_t num_heads,
    int64_t num_kv_heads, const at::Tensor& cos, const at::Tensor& signed_sin,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    const at::Tensor& query_lens, const at::Tensor& query_start_loc, double scale,
    int64_t sliding_window) {
  const int64_t layers = static_cast<int64_t>(caches.size()) / 2;
  const int64_t T = x.size(0), E = x.size(1), B = block_tables.size(0);
  // Everything is checked here: nothing may throw inside the region.
  PagedAttentionHeads heads_check(caches[0], block_tables, seq_lens, query_lens, query_start_loc,
                                  scale, sliding_window, num_heads, T);
  const int64_t D = caches[0].size(3);
  const int64_t qkv_width = (num_heads + 2 * num_kv_heads) * D;
  int64_t F = 0;
  for (int64_t i = 0; i < layers; ++i) {
    const auto first = weights.begin() + 14 * i;
    TORCH_CHECK(first[0].has_value() && first[1].has_value(), "layer ", i, " lacks its norms");
    for (int j = 0; j < 2; ++j) {
      const at::Tensor& w = *first[j];
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == E,
                  "norm weights must be contiguous float32 [", E, "]");
    }
    heads_check.check_layer(caches[2 * i], caches[2 * i + 1]);
    int64_t n_out[4], k_in[4];
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& qs = *first[2 + 3 * j];
      check_interleaved(qs, *first[3 + 3 * j], first[4 + 3 * j]);
      n_out[j] = qs.size(0) * qs.size(2);
      k_in[j] = qs.size(1) * 32;
    }
    if (i == 0) F = n_out[2] / 2;
    TORCH_CHECK(k_in[0] == E && n_out[0] == qkv_width && k_in[1] == num_heads * D &&
                    n_out[1] == E && k_in[2] == E && n_out[2] == 2 * F && k_in[3] == F &&
                    n_out[3] == E,
                "layer ", i, ": linear shapes do not chain");
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == T * D &&
                  signed_sin.scalar_type() == at::kFloat && signed_sin.is_contiguous() &&
                  signed_sin.numel() == T * D,
              "cos / signed_sin must be contiguous float32 [T, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "slots must be contiguous int64 [T]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t capacity = caches[0].size(0) * caches[0].size(1);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot ", slot[t], " is outside the cache");
  }
  const int64_t* q_lens = query_lens.data_ptr<int64_t>();
  const int64_t* q_start = query_start_loc.data_ptr<int64_t>();
  int64_t covered = 0;
  for (int64_t b = 0; b < B; ++b) covered += q_lens[b];
  TORCH_CHECK(covered == T, "the requests' query tokens must cover the batch");

  const bool high = act_bits == 16;
  const at::Tensor xc = x.contiguous();
  at::Tensor res = xc.clone();  // the residual stream
  at::Tensor hidden = at::empty({T, E}, x.options());
  at::Tensor normed = at::empty({T, E}, x.options());
  at::Tensor qkv = at::empty({T, qkv_width}, x.options());
  at::Tensor attn = at::empty({T, num_heads * D}, x.options());
  at::Tensor o = at::empty({T, E}, x.options());
  at::Tensor gate_up = at::empty({T, 2 * F}, x.options());
  at::Tensor act = at::empty({T, F}, x.options());
  QuantActs acts;
  acts.resize(T, std::max({E, num_heads * D, F}), high);
  const int max_threads = std::max(1, at::get_num_threads());
  std::vector<std::unique_ptr<PagedAttentionHeads>> attention;
  for (int t = 0; t < max_threads; ++t) {
    attention.push_back(std::make_unique<PagedAttentionHeads>(
        caches[0], block_tables, seq_lens, query_lens, query_start_loc, scale, sliding_window,
        num_heads, T));
  }
  const int64_t G = num_heads / num_kv_heads, kv_size = num_kv_heads * D;
  const float* cp = cos.data_ptr<float>();
  const float* sp = signed_sin.data_ptr<float>();
  float* resp = res.data_ptr<float>();
  float* hp = hidden.data_ptr<float>();
  float* np = normed.data_ptr<float>();
  float* qp = qkv.data_ptr<float>();
  float* ap = attn.data_ptr<float>();
  float* op = o.data_ptr<float>();
  float* gp = gate_up.data_ptr<float>();
  float* mp = act.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  const at::ScalarType cache_type = caches[0].scalar_type();
  std::unique_ptr<SpinBarrier> barrier;

#pragma omp parallel num_threads(max_threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
#pragma omp single
    barrier = std::make_unique<SpinBarrier>(n);  // the single's implied barrier publishes it
    std::vector<float> buf(std::max(E, D));
    const auto [r0, r1] = share(T, t, n);
    PagedAttentionHeads& heads = *attention[t];
    for (int64_t i = 0; i < layers; ++i) {
      const auto first = weights.begin() + 14 * i;
      const float* in_norm = first[0]->data_ptr<float>();
      const float* post_norm = first[1]->data_ptr<float>();
      auto gemm = [&](int j, float* y) {
        const at::Tensor& qs = *first[2 + 3 * j];
        const auto [g0, g1] = share(qs.size(0), t, n);
        quant_gemm_il_groups(acts, high, qs, *first[3 + 3 * j], first[4 + 3 * j], T, y, g0, g1);
        barrier->wait();
      };
      // input norm (residual += previous output after the first layer), activations
      for (int64_t r = r0; r < r1; ++r) {
        norm_row(i == 0 ? resp + r * E : hp + r * E, i == 0 ? nullptr : resp + r * E, in_norm,
                 np + r * E, E, feps, buf);
      }
      quant_acts_rows(np, E, high, acts, r0, r1);
      barrier->wait();
      gemm(0, qp);
      // rotary, K/V store and attention of each (request, KV head)
      at::Tensor& k_cache = const_cast<at::Tensor&>(caches[2 * i]);
      at::Tensor& v_cache = const_cast<at::Tensor&>(caches[2 * i + 1]);
      heads.set_layer(k_cache, v_cache, qp, qkv_width, ap);
      for (int64_t item = t; item < B * num_kv_heads; item += n) {
        const int64_t b = item / num_kv_heads, g = item % num_kv_heads;
        for (int64_t token = q_start[b]; token < q_start[b] + q_lens[b]; ++token) {
          float* row = qp + token * qkv_width;
          const float* c = cp + token * D;
          const float* s = sp + token * D;
          for (int64_t h = g * G; h < (g + 1) * G; ++h) rotary_row(row + h * D, c, s, D, buf.data());
          float* k = row + num_heads * D + g * D;
          rotary_row(k, c, s, D, buf.data());
          const int64_t at_slot = (slot[token] * num_kv_heads + g) * D;
          KVF_FLOAT_TYPES(cache_type, C, [&] {
            store_head(k, k_cache.data_ptr<C>() + at_slot, D);
            store_head(k + kv_size, v_cache.data_ptr<C>() + at_slot, D);
          });
        }
        heads.run(b, g);
      }
      barrier->wait();
      quant_acts_rows(ap, num_heads * D, high, acts, r0, r1);
      barrier->wait();
      gemm(1, op);
      for (int64_t r = r0; r < r1; ++r) {
        norm_row(op + r * E, resp + r * E, post_norm, np + r * E, E, feps, buf);
      }
      quant_acts_rows(np, E, high, acts, r0, r1);
      barrier->wait();
      gemm(2, gp);
      for (int64_t r = r0; r < r1; ++r) {
        const float* g = gp + r * 2 * F;
        float* out = mp + r * F;
        for (int64_t c = silu_mul_row(g, g + F, out, F); c < F; ++c) {
          const float a = g[c];
          out[c] = a / (1.0f + std::exp(-a)) * g[F + c];
        }
      }
      quant_acts_rows(mp, F, high, acts, r0, r1);
      barrier->wait();
      gemm(3, hp);
    }
  }
  return {hidden, res};
}

// Every layer of a plain model in one call, so no Python runs between layers: decoder_layer for
// layer i with weights[14 i .. 14 i + 13] = (input norm, post-attention norm, the 12 linear
// tensors) and caches[2 i], caches[2 i + 1] = its key and value caches; the other arguments are
// shared (one rotary table, one sliding window). With LoRA, lora[8 i .. 8 i + 7] are layer i's
// (a, bt) of its 4 linears. Returns (mlp output, residual) of the last layer.
std::tuple<at::Tensor, at::Tensor> decoder_stack(
    const at::Tensor& x, const std::vector<std::optional<at::Tensor>>& weights,
    std::vector<at::Tensor> caches, double eps, int64_t act_bits, int64_t num_heads,
    int64_t num_kv_heads, const at::Tensor& cos, const at::Tensor& signed_sin,
    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& seq_lens,
    const at::Tensor& query_lens, const at::Tensor& query_start_loc, double scale,
    int64_t sliding_window, const std::vector<at::Tensor>& lora,
    const std::optional<at::Tensor>& token_slots) {
  const int64_t layers = static_cast<int64_t>(caches.size()) / 2;
  TORCH_CHECK(layers > 0 && caches.size() % 2 == 0 &&
                  static_cast<int64_t>(weights.size()) == 14 * layers,
              "decoder_stack needs 14 weights and 2 caches per layer");
  TORCH_CHECK(lora.empty() || static_cast<int64_t>(lora.size()) == 8 * layers,
              "decoder_stack needs 8 LoRA tensors per layer");
  const bool float_kv = caches[0].scalar_type() == at::kFloat ||
                        caches[0].scalar_type() == at::kBFloat16 ||
                        caches[0].scalar_type() == at::kHalf;
  if (lora.empty() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
      x.size(0) <= kTeamMaxTokens && x.size(0) > 0 && (act_bits == 8 || act_bits == 16) &&
      float_kv && team_linears(weights, layers)) {
    return decoder_stack_team(x, weights, caches, eps, act_bits, num_heads, num_kv_heads, cos,
                              signed_sin, slots, block_tables, seq_lens, query_lens,
                              query_start_loc, scale, sliding_window);
  }
  std::optional<at::Tensor> residual;
  at::Tensor h = x;
  for (int64_t i = 0; i < layers; ++i) {
    const auto first = weights.begin() + 14 * i;
    TORCH_CHECK(first[0].has_value() && first[1].has_value(), "layer ", i, " lacks its norms");
    const std::vector<std::optional<at::Tensor>> linears(first + 2, first + 14);
    const std::vector<at::Tensor> layer_lora =
        lora.empty() ? std::vector<at::Tensor>()
                     : std::vector<at::Tensor>(lora.begin() + 8 * i, lora.begin() + 8 * i + 8);
    auto [out, res] = decoder_layer(h, residual, *first[0], *first[1], eps, linears, act_bits,
                                    num_heads, num_kv_heads, cos, signed_sin, caches[2 * i],
                                    caches[2 * i + 1], slots, block_tables, seq_lens,
                                    query_lens, query_start_loc, scale, sliding_window,
                                    layer_lora, token_slots);
    h = out;
    residual = res;
  }
  return {h, *residual};
}

void bind_fused_ops(pybind11::module_& m) {
  m.attr("decoder_team_max_tokens") = kTeamMaxTokens;
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>(), "x / rms(x) * weight over the last dimension", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, py::call_guard<py::gil_scoped_release>(),
        "residual += x in place, then rms_norm(residual): returns the normalized rows",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rotary_", &rotary_, py::call_guard<py::gil_scoped_release>(), "NeoX rotary in place on x [T, H, D] with cos / signed sin [T, D]",
        py::arg("x"), py::arg("cos"), py::arg("signed_sin"));
  m.def("silu_and_mul", &silu_and_mul, py::call_guard<py::gil_scoped_release>(), "silu(gate) * up of a fused [T, 2F] gate/up output",
        py::arg("gate_up"));
  m.def("kv_cache_store", &kv_cache_store, py::call_guard<py::gil_scoped_release>(), "k / v [T, KVH, D] into 16/32-bit caches at slots",
        py::arg("key"), py::arg("value"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("slots"));
  m.def("lora_apply_", &lora_apply_, py::call_guard<py::gil_scoped_release>(),
        "y[t] += bt[s]^T (a[s] x[t]) for each token t of adapter slot s = token_slots[t] >= 0",
        py::arg("y"), py::arg("x"), py::arg("a"), py::arg("bt"), py::arg("token_slots"));
  m.def("greedy_sample", &greedy_sample, py::call_guard<py::gil_scoped_release>(),
        "(argmax, its log-probability) of each row of float32 logits [R, V], never a banned id",
        py::arg("logits"), py::arg("banned") = py::none());
  m.def("decoder_layer", &decoder_layer, py::call_guard<py::gil_scoped_release>(),
        "a plain pre-norm decoder layer in one call: (x, residual) -> (mlp out, residual)");
  m.def("decoder_stack", &decoder_stack, py::call_guard<py::gil_scoped_release>(),
        "every layer of a plain model in one call: x -> (mlp out, residual) of the last layer");
}
