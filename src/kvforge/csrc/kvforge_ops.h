// Declarations shared by the extension's sources: the ops one source calls from another, and the
// functions that add each source's ops to the Python module (defined in paged_attention.cpp).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

// quant_gemm.cpp: y [M, N] float32 = x [M, K] times block-quantized weights.
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                      const std::optional<at::Tensor>& mins, int64_t act_bits);
// quant_gemm, or the float GEMM from a row count where it is faster.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t act_bits);

// The float GEMM on dequantized weight tiles that both layouts run for many rows.
void dense_gemm_tiles(const at::Tensor& x, int64_t N, int64_t K, int64_t row_multiple,
                      at::Tensor& y,
                      const std::function<void(int64_t, int64_t, float*)>& dequantize);

// quant_gemm_il.cpp: the row-interleaved layout for VNNI builds.
bool quant_gemm_il_available();
int64_t quant_gemm_il_max_rows();  // 16 where 512-bit VNNI is built, else 8
at::Tensor quant_gemm_il(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                         const std::optional<at::Tensor>& mins, int64_t act_bits);
at::Tensor quant_gemm_il_rows(const at::Tensor& qs, const at::Tensor& scales,
                              const std::optional<at::Tensor>& mins, const at::Tensor& index);
// Activations quantized per block of 32 for the interleaved kernel: per (block b, row m), at
// index b * rows + m, the signed bytes (stride bytes: h[32] then l[32] for 16 bits, l[32] for
// 8), dx, dx * sum(qx), sum(qx).
struct QuantActs {
  int64_t rows = 0;
  int64_t stride = 0;
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
  std::vector<int32_t> sum;
  void resize(int64_t M, int64_t K, bool high);  // M rows of K columns
};
// The pieces of quant_gemm_il for callers that split the work among their own threads (no
// ATen parallelism, no checks, nothing allocated): rows [r0, r1) of x [M, K] into a (sized by
// resize), and output groups [g0, g1) (rows W g0 .. W g1 of the weights) of y [M, N].
void quant_acts_rows(const float* x, int64_t K, bool high, QuantActs& a, int64_t r0, int64_t r1);
void quant_gemm_il_groups(const QuantActs& a, bool high, const at::Tensor& qs,
                          const at::Tensor& scales, const std::optional<at::Tensor>& mins,
                          int64_t M, float* y, int64_t g0, int64_t g1);
void check_interleaved(const at::Tensor& qs, const at::Tensor& scales,
                       const std::optional<at::Tensor>& mins);  // throws on a bad layout
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> quant_gemm_il_pack(
    const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
    bool four, int64_t rows);

// paged_attention.cpp: attention over paged K/V blocks, read in place; [T, H, D].
at::Tensor paged_attention(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_lens,
    const at::Tensor& query_start_loc, double scale, int64_t sliding_window,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_center, const std::optional<at::Tensor>& v_center,
    const std::optional<at::Tensor>& k_token_scale, const std::optional<at::Tensor>& v_token_scale,
    const std::optional<at::Tensor>& recent_slot_of_block,
    const std::optional<at::Tensor>& recent_k, const std::optional<at::Tensor>& recent_v);

// Paged attention one (request, KV head) at a time on the calling thread, over float32 queries
// with a row stride, for callers that split the work among their own threads: everything is
// checked by the constructor and check_layer; set_layer and run neither allocate nor throw.
// A (request, KV head) covers all the request's query tokens and keys (no split-K).
class PagedAttentionHeads {
 public:
  PagedAttentionHeads(const at::Tensor& key_cache, const at::Tensor& block_tables,
                      const at::Tensor& seq_lens, const at::Tensor& query_lens,
                      const at::Tensor& query_start_loc, double scale, int64_t sliding_window,
                      int64_t num_heads, int64_t num_tokens);
  ~PagedAttentionHeads();
  void check_layer(const at::Tensor& key_cache, const at::Tensor& value_cache) const;
  // query: head h of token t at query[t * query_stride + h * D]; out [T, H * D]
  void set_layer(const at::Tensor& key_cache, const at::Tensor& value_cache, const float* query,
                 int64_t query_stride, float* out);
  void run(int64_t request, int64_t kv_head);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

void bind_quant_gemm(pybind11::module_& m);
void bind_quantize(pybind11::module_& m);
void bind_fused_ops(pybind11::module_& m);
