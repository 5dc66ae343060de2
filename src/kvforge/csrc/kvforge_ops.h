// Declarations shared by the extension's sources: the ops one source calls from another, and the
// functions that add each source's ops to the Python module (defined in paged_attention.cpp).
#pragma once

#include <torch/extension.h>

#include <functional>
#include <optional>
#include <tuple>

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
at::Tensor quant_gemm_il(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                         const std::optional<at::Tensor>& mins, int64_t act_bits);
at::Tensor quant_gemm_il_rows(const at::Tensor& qs, const at::Tensor& scales,
                              const std::optional<at::Tensor>& mins, const at::Tensor& index);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> quant_gemm_il_pack(
    const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& mins,
    bool four);

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

void bind_quant_gemm(pybind11::module_& m);
void bind_quantize(pybind11::module_& m);
void bind_fused_ops(pybind11::module_& m);
