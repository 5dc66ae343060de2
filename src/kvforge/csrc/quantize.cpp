// Scale searches and codes of kvforge's GGML quantizers (kvforge/quant/quantizers.py): the torch
// versions there define the maths and stay the fallback. Torch evaluates each candidate scale as
// a dozen passes over every group of a tensor; here a tile of kLanes groups stays in L1, one
// group per SIMD lane, while all the candidates are tried, and at::parallel_for spreads the
// tiles over the cores.
//
// The searches themselves live in quant_search.h (shared with the torch-free gguf_blocks.cpp).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kvforge_ops.h"
#include "quant_search.h"

namespace {

using namespace kvforge_quant;

constexpr int64_t kGrainGroups = 1024;  // groups per parallel_for task

// x and (when given) w as contiguous float32 [n, g]; checks shapes.
std::tuple<at::Tensor, std::optional<at::Tensor>> groups_of(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [n, g]");
  TORCH_CHECK(x.size(1) <= kMaxGroup, "groups of at most ", kMaxGroup, " values");
  std::optional<at::Tensor> weights;
  if (w.has_value()) {
    TORCH_CHECK(w->sizes() == x.sizes() && w->scalar_type() == at::kFloat,
                "w must be float32 of x's shape");
    weights = w->contiguous();
  }
  return {x.contiguous(), weights};
}

int64_t num_tiles(int64_t n) { return (n + kLanes - 1) / kLanes; }

}  // namespace

at::Tensor quant_search_symmetric(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                  int64_t nmax, int64_t num_steps) {
  auto [xc, wc] = groups_of(x, w);
  const int64_t n = xc.size(0), g = xc.size(1);
  at::Tensor scales = at::empty({n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc ? wc->data_ptr<float>() : nullptr;
  float* out = scales.data_ptr<float>();
  const float fmax = static_cast<float>(nmax);
  at::parallel_for(0, num_tiles(n), kGrainGroups / kLanes, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kLanes;
      const Tile t(xp, wp, g, first, std::min(kLanes, n - first));
      if (wp) {
        search_symmetric_tile<true>(t, fmax, num_steps, out + first);
      } else {
        search_symmetric_tile<false>(t, fmax, num_steps, out + first);
      }
    }
  });
  return scales;
}

std::tuple<at::Tensor, at::Tensor> quant_search_asymmetric(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& w,
                                                           int64_t nmax, double rmin, double rdelta,
                                                           int64_t num_steps) {
  auto [xc, wc] = groups_of(x, w);
  const int64_t n = xc.size(0), g = xc.size(1);
  at::Tensor scales = at::empty({n}, xc.options());
  at::Tensor mins = at::empty({n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc ? wc->data_ptr<float>() : nullptr;
  float* sp = scales.data_ptr<float>();
  float* mp = mins.data_ptr<float>();
  at::parallel_for(0, num_tiles(n), kGrainGroups / kLanes, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kLanes;
      const Tile t(xp, wp, g, first, std::min(kLanes, n - first));
      const float fmax = static_cast<float>(nmax), fr = static_cast<float>(rmin),
                  fd = static_cast<float>(rdelta);
      if (wp) {
        search_asymmetric_tile<true>(t, fmax, fr, fd, num_steps, sp + first, mp + first);
      } else {
        search_asymmetric_tile<false>(t, fmax, fr, fd, num_steps, sp + first, mp + first);
      }
    }
  });
  return {scales, mins};
}

at::Tensor quant_codes(const at::Tensor& x, const at::Tensor& scales,
                       const std::optional<at::Tensor>& mins, int64_t lo, int64_t hi) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [n, g]");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(0), g = xc.size(1);
  TORCH_CHECK(scales.numel() == n && scales.scalar_type() == at::kFloat, "scales: float32 [n]");
  TORCH_CHECK(!mins || (mins->numel() == n && mins->scalar_type() == at::kFloat),
              "mins: float32 [n]");
  TORCH_CHECK(-128 <= lo && lo <= hi && hi <= 127, "codes must fit int8");
  const at::Tensor sc = scales.contiguous();
  const at::Tensor mn = mins ? mins->contiguous() : at::Tensor();
  at::Tensor codes = at::empty({n, g}, xc.options().dtype(at::kChar));
  const float* xp = xc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* mp = mins ? mn.data_ptr<float>() : nullptr;
  int8_t* out = codes.data_ptr<int8_t>();
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  at::parallel_for(0, n, kGrainGroups * 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float inv = sp[r] == 0.f ? 0.f : 1.f / sp[r];
      const float min = mp ? mp[r] : 0.f;
      const float* xr = xp + r * g;
      int8_t* qr = out + r * g;
#pragma omp simd
      for (int64_t i = 0; i < g; ++i) {
        qr[i] = static_cast<int8_t>(std::min(std::max(round_away((xr[i] - min) * inv), flo), fhi));
      }
    }
  });
  return codes;
}

void bind_quantize(pybind11::module_& m) {
  m.def("quant_search_symmetric", &quant_search_symmetric, py::call_guard<py::gil_scoped_release>(),
        "Best scale per group [n] of x [n, g] for codes in [-nmax, nmax-1]", py::arg("x"),
        py::arg("w"), py::arg("nmax"), py::arg("num_steps"));
  m.def("quant_search_asymmetric", &quant_search_asymmetric,
        py::call_guard<py::gil_scoped_release>(),
        "Best (scale, min <= 0) per group of x [n, g] for codes in [0, nmax]", py::arg("x"),
        py::arg("w"), py::arg("nmax"), py::arg("rmin"), py::arg("rdelta"), py::arg("num_steps"));
  m.def("quant_codes", &quant_codes, py::call_guard<py::gil_scoped_release>(),
        "int8 codes clamp(round((x - min) / scale), lo, hi) of x [n, g]", py::arg("x"),
        py::arg("scales"), py::arg("mins"), py::arg("lo"), py::arg("hi"));
}
