// SpectR / Arrow expert scoring with top-k selection and mixing weights (DESIGN.md operation 2).
//
// Semantics (loramix_fast.reference.spectr_topk is the spec):
//   score="norm":  s[m, t] = || h[m, t, :rank[t]] ||_2
//   score="first": s[m, t] = |h[m, t, 0]| * score_scale[t]
//   idx[m] = the k highest s[m, t] over experts with rank[t] > 0, descending, ties to the lowest t;
//   slots without a (finite-scored) expert get idx -1 and weight 0;
//   weighting="uniform": w = 1/k on each valid slot (fewer than k valid: they still get 1/k); "softmax": softmax(s / temperature) over them.
// Shapes (M = rows, T = experts, R = max rank): h [M, T, R] with any strides (fp32/fp16/bf16/fp64),
//   rank [T] int or None, score_scale [T] float or None.
// Returns (idx [M, k] int32, w [M, k] float32, scores [M, T] float32). Math in fp32.
//
// Norms with a unit rank stride (h as a slice of a GEMM output): AVX-512 sums of squares on the 16-bit or
// fp32 values, widened in registers (no fp32 copy of h); other strides: a scalar loop.
// One row per iteration of at::parallel_for; the top-k is an insertion into a sorted list of at most
// min(k, T) entries (T is a few hundred at most), which keeps ties on the lowest index because experts
// are visited in ascending order and only a strictly greater score displaces an entry.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LMF_SPECTR_AVX512 1
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

#ifdef LMF_SPECTR_AVX512
// sum_{j < n} float(p[j])^2 for fp32 / bf16 / fp16 p with unit stride: 16 lanes at a time, fp32
// FMA (16-bit values widened in registers: h is never copied to fp32), one horizontal sum.
template <typename scalar_t>
inline float sumsq16(const scalar_t* p, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (n - j)) - 1u);
    __m512 v;
    if constexpr (std::is_same_v<scalar_t, float>) {
      v = _mm512_maskz_loadu_ps(k, p + j);
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p + j)), 16));
    } else {
      v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p + j));
    }
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}
template <typename scalar_t>
constexpr bool kSumsq16 = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16> ||
                          std::is_same_v<scalar_t, at::Half>;
#else
template <typename scalar_t>
constexpr bool kSumsq16 = false;  // the scalar loop below
#endif

template <typename scalar_t>
void spectr_rows(const scalar_t* __restrict__ hp, int64_t M, int64_t T, int64_t R, int64_t sm, int64_t st,
                 int64_t sr, int64_t k, const int64_t* __restrict__ rank, const float* __restrict__ scale,
                 bool first, bool softmax, float inv_temp, int32_t* __restrict__ idx_out,
                 float* __restrict__ w_out, float* __restrict__ s_out) {
  const int64_t kk = std::min(k, T);
  const float ninf = -std::numeric_limits<float>::infinity();
  const float pinf = std::numeric_limits<float>::infinity();
  // Rows cost about T * R loads each; aim for ~16K elements per task.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, T * std::max<int64_t>(R, 1)));
  std::vector<int64_t> rlim(T);
  for (int64_t t = 0; t < T; ++t) rlim[t] = std::min(std::max<int64_t>(rank[t], 0), R);
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    std::vector<float> topv(kk + 1);
    std::vector<int32_t> topi(kk + 1);
    for (int64_t m = m0; m < m1; ++m) {
      const scalar_t* hrow = hp + m * sm;
      float* srow = s_out + m * T;
      // 1) scores
      if (first) {
        for (int64_t t = 0; t < T; ++t) {
          const float v = std::fabs(static_cast<float>(hrow[t * st]));
          srow[t] = scale ? v * scale[t] : v;
        }
      } else if (sr == 1 && kSumsq16<scalar_t>) {
#ifdef LMF_SPECTR_AVX512
        if constexpr (kSumsq16<scalar_t>)
          for (int64_t t = 0; t < T; ++t) srow[t] = std::sqrt(sumsq16(hrow + t * st, rlim[t]));
#endif
      } else if (sr == 1) {
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* ht = hrow + t * st;
          const int64_t rr = rlim[t];
          float acc = 0.f;
          for (int64_t j = 0; j < rr; ++j) {
            const float v = static_cast<float>(ht[j]);
            acc += v * v;
          }
          srow[t] = std::sqrt(acc);
        }
      } else {
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* ht = hrow + t * st;
          const int64_t rr = rlim[t];
          float acc = 0.f;
          for (int64_t j = 0; j < rr; ++j) {
            const float v = static_cast<float>(ht[j * sr]);
            acc += v * v;
          }
          srow[t] = std::sqrt(acc);
        }
      }
      // 2) top-k by insertion over experts with rank > 0, visited in ascending order: only a
      // strictly greater key displaces an entry, so ties keep the lowest index. NaN ranks above
      // everything (as in torch.sort) and -inf never enters; both leave the slot -1 below.
      int64_t n = 0;  // entries held in topv/topi, sorted descending
      float thr = ninf;  // a key must beat this to enter
      for (int64_t t = 0; t < T; ++t) {
        float key = srow[t];
        key = std::isnan(key) ? pinf : key;
        if (!(key > thr) || rank[t] <= 0) continue;
        int64_t p = n < kk ? n++ : kk - 1;
        while (p > 0 && key > topv[p - 1]) {
          topv[p] = topv[p - 1];
          topi[p] = topi[p - 1];
          --p;
        }
        topv[p] = key;
        topi[p] = static_cast<int32_t>(t);
        if (n == kk) thr = topv[kk - 1];
      }
      int32_t* irow = idx_out + m * k;
      float* wrow = w_out + m * k;
      int64_t cnt = 0;
      float vmax = ninf;
      for (int64_t j = 0; j < n; ++j) {
        if (std::isfinite(topv[j])) {
          ++cnt;
          vmax = std::max(vmax, topv[j]);
        }
      }
      float denom = 0.f;
      if (softmax) {
        for (int64_t j = 0; j < n; ++j)
          if (std::isfinite(topv[j])) denom += std::exp((topv[j] - vmax) * inv_temp);
      }
      for (int64_t j = 0; j < k; ++j) {
        if (j < n && std::isfinite(topv[j])) {
          irow[j] = topi[j];
          wrow[j] = softmax ? std::exp((topv[j] - vmax) * inv_temp) / denom : 1.f / static_cast<float>(k);
        } else {
          irow[j] = -1;
          wrow[j] = 0.f;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectr_topk_cpu(
    const at::Tensor& h, int64_t k, const std::optional<at::Tensor>& rank, c10::string_view score,
    const std::optional<at::Tensor>& score_scale, c10::string_view weighting, double temperature) {
  TORCH_CHECK(h.dim() == 3, "spectr_topk: h must be 3-D [M, T, R], got ", h.sizes());
  TORCH_CHECK(h.device().is_cpu(), "spectr_topk: h must be a CPU tensor");
  TORCH_CHECK(k >= 1, "spectr_topk: k must be >= 1, got ", k);
  TORCH_CHECK(score == "norm" || score == "first", "spectr_topk: score must be 'norm' or 'first', got '",
              std::string(score), "'");
  TORCH_CHECK(weighting == "uniform" || weighting == "softmax",
              "spectr_topk: weighting must be 'uniform' or 'softmax', got '", std::string(weighting), "'");
  const bool first = score == "first";
  const bool softmax = weighting == "softmax";
  TORCH_CHECK(!softmax || temperature > 0, "spectr_topk: temperature must be > 0, got ", temperature);
  const int64_t M = h.size(0), T = h.size(1), R = h.size(2);
  TORCH_CHECK(!first || R >= 1, "spectr_topk: score='first' needs R >= 1, got h ", h.sizes());

  std::vector<int64_t> rk(T, R);
  if (rank.has_value() && rank->defined()) {
    TORCH_CHECK(rank->dim() == 1 && rank->size(0) == T, "spectr_topk: rank must be [T] = [", T, "], got ",
                rank->sizes());
    at::Tensor r64 = rank->to(at::kCPU, at::kLong).contiguous();
    std::copy(r64.data_ptr<int64_t>(), r64.data_ptr<int64_t>() + T, rk.begin());
  }
  at::Tensor sc;
  if (first && score_scale.has_value() && score_scale->defined()) {
    TORCH_CHECK(score_scale->dim() == 1 && score_scale->size(0) == T,
                "spectr_topk: score_scale must be [T] = [", T, "], got ", score_scale->sizes());
    sc = score_scale->to(at::kCPU, at::kFloat).contiguous();
  }

  auto idx = at::empty({M, k}, h.options().dtype(at::kInt));
  auto w = at::empty({M, k}, h.options().dtype(at::kFloat));
  auto s = at::empty({M, T}, h.options().dtype(at::kFloat));
  if (M == 0) return {idx, w, s};
  if (T == 0) {
    idx.fill_(-1);
    w.zero_();
    return {idx, w, s};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "spectr_topk_cpu", [&] {
    spectr_rows<scalar_t>(h.const_data_ptr<scalar_t>(), M, T, R, h.stride(0), h.stride(1), h.stride(2), k,
                          rk.data(), sc.defined() ? sc.const_data_ptr<float>() : nullptr, first, softmax,
                          static_cast<float>(1.0 / temperature), idx.data_ptr<int32_t>(), w.data_ptr<float>(),
                          s.data_ptr<float>());
  });
  return {idx, w, s};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix_cpp, m) {
  m.def(
      "spectr_topk(Tensor h, int k, Tensor? rank, str score, Tensor? score_scale, str weighting, "
      "float temperature) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loramix_cpp, CPU, m) { m.impl("spectr_topk", &spectr_topk_cpu); }
