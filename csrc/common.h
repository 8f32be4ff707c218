// Shared helpers for the loramix_fast C++ CPU kernels (csrc/*.cpp, all built into one library).
//
//   acc_t<T>            accumulation type: double for double, float otherwise (fp32, bf16, fp16)
//   LMF_AVX512          defined when the build targets AVX-512 F/BW/VL (-march=native on such a CPU)
//   ld16(p) / ld16(p,k) 16 elements of float / bf16 / fp16 -> __m512 (masked: lanes off in k read 0)
//   LMF_CHECK_*         argument checks whose messages name the argument
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LMF_AVX512 1
#include <immintrin.h>
#endif

namespace loramix {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline at::ScalarType acc_scalar_type() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

#ifdef LMF_AVX512
// Types the AVX-512 kernels load as 16 fp32 lanes.
template <typename T>
constexpr bool kVec16 = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                        std::is_same_v<T, c10::Half>;

inline __mmask16 tail_mask(int64_t n) {  // first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 ld16(const c10::BFloat16* p) {
  return bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 ld16(const c10::BFloat16* p, __mmask16 k) {
  return bf16_to_f32(_mm256_maskz_loadu_epi16(k, p));
}
inline __m512 ld16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 ld16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
#endif

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// Checks that t is a CPU tensor with `ndim` dims; want[i] < 0 means "any size".
inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<int64_t> want, const char* dims) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == static_cast<int64_t>(want.size()), op, ": ", name, " must be ",
              want.size(), "-D with shape ", dims, ", got shape ", shape_str(t.sizes()));
  int64_t i = 0;
  for (int64_t w : want) {
    TORCH_CHECK(w < 0 || t.size(i) == w, op, ": ", name, " must have shape ", dims,
                ", got shape ", shape_str(t.sizes()), " (dim ", i, " should be ", w, ")");
    ++i;
  }
}

inline bool is_float_type(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

}  // namespace loramix
