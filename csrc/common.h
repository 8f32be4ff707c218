// Shared helpers for the loramix_fast C++ CPU kernels (csrc/*.cpp, all built into one library).
//
//   acc_t<T>            accumulation type: double for double, float otherwise (fp32, bf16, fp16)
//   LMF_AVX512          defined when the build targets AVX-512 F/BW/VL (-march=native on such a CPU)
//   ld16(p) / ld16(p,k) 16 elements of float / bf16 / fp16 -> __m512 (masked: lanes off in k read 0)
//   LMF_CHECK_*         argument checks whose messages name the argument
//   CpuIsa / cpu_isa()  the kernel path chosen at run time from what the CPU has (AMX, AVX512-BF16,
//                       AVX-512, AVX2, generic C++), capped by LORAMIX_CPU_ISA (tests force each path)
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

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

// ---------------------------------------------------------------- the ops' shared arguments ------
// The factor stacks against the input width K and output width N: A [E, R, K], B [E, N, R], both in
// dt (the dtype of the op's tensor `of`, "x" or "y"). Returns {E, R}.
inline std::pair<int64_t, int64_t> check_factors(const char* op, const at::Tensor& A,
                                                 const at::Tensor& B, int64_t K, int64_t N,
                                                 at::ScalarType dt, const char* of) {
  check_shape(op, "A", A, {-1, -1, K}, "[E, R, K]");
  const int64_t E = A.size(0), R = A.size(1);
  check_shape(op, "B", B, {E, N, R}, "[E, N, R]");
  TORCH_CHECK(A.scalar_type() == dt, op, ": A must have ", of, "'s dtype ", dt, ", got ", A.scalar_type());
  TORCH_CHECK(B.scalar_type() == dt, op, ": B must have ", of, "'s dtype ", dt, ", got ", B.scalar_type());
  return {E, R};
}

struct Meta {
  at::Tensor idx, w, scale, rank;  // host copies: int64 / ot / ot / int64, contiguous
};

// scale [E], rank [E] (values in [0, R]), idx [M, S] (ids in [-1, E)), w [M, S] or none: checked and
// copied to the kernels' types (ot for scale and w). Values are checked in int64 (int32 ids widen
// losslessly; nothing is ever narrowed) and raise ValueError, like the Python-side checks of the
// other backends.
inline Meta prepare(const char* op, const at::Tensor& scale, const at::Tensor& rank,
                    const at::Tensor& idx, const std::optional<at::Tensor>& w, int64_t M, int64_t E,
                    int64_t R, at::ScalarType ot) {
  check_shape(op, "scale", scale, {E}, "[E]");
  TORCH_CHECK(is_float_type(scale.scalar_type()), op, ": scale must be a float tensor, got ",
              scale.scalar_type());
  check_shape(op, "rank", rank, {E}, "[E]");
  TORCH_CHECK(rank.scalar_type() == at::kInt || rank.scalar_type() == at::kLong, op,
              ": rank must be int32 or int64, got ", rank.scalar_type());
  check_shape(op, "idx", idx, {M, -1}, "[M, S]");
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
              ": idx must be int32 or int64, got ", idx.scalar_type());
  Meta mt;
  mt.rank = rank.to(at::kLong).contiguous();
  const int64_t* rk = mt.rank.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(rk[e] >= 0 && rk[e] <= R, op, ": rank[", e, "] = ", rk[e],
                      " is outside [0, R] with R = ", R, " (the stack's max rank)");
  mt.idx = idx.to(at::kLong).contiguous();
  const int64_t* id = mt.idx.data_ptr<int64_t>();
  const int64_t S = std::max<int64_t>(1, idx.size(1));
  for (int64_t i = 0; i < mt.idx.numel(); ++i)
    TORCH_CHECK_VALUE(id[i] >= -1 && id[i] < E, op, ": idx holds adapter id ", id[i], " at [",
                      i / S, ", ", i % S, "], outside [-1, ", E - 1, "] (E = ", E,
                      " adapters; -1 = no adapter)");
  if (w.has_value() && w->defined()) {
    check_shape(op, "w", *w, {M, idx.size(1)}, "[M, S] (same as idx)");
    TORCH_CHECK(is_float_type(w->scalar_type()), op, ": w must be a float tensor, got ",
                w->scalar_type());
    mt.w = w->to(ot).contiguous();
  }
  mt.scale = scale.to(ot).contiguous();
  return mt;
}

// t itself when its last stride is 1 (or it has <= 1 column), else a contiguous copy.
inline at::Tensor unit_last(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// ---------------------------------------------------------------- run-time kernel paths ----------
// Kernels compiled for an instruction set other than the build's baseline carry
// __attribute__((target(...))) (LMF_TARGET_*), so one build holds every path and the CPU picks:
//   kAmx        AMX-BF16 present: the library GEMMs (MKL / oneDNN run on the tiles) take large
//               adapter groups; everything else as kAvx512Bf16
//   kAvx512Bf16 AVX512-BF16 dot products (vdpbf16ps) on 16-bit data, fp32 accumulation
//   kAvx512     AVX-512 F/BW/VL: 16-bit data widened to fp32 in registers, FMA
//   kAvx2       AVX2 + FMA + F16C, 8 lanes
//   kGeneric    plain C++ (what the compiler vectorises for the build's -march)
// LORAMIX_CPU_ISA=amx|avx512bf16|avx512|avx2|generic (read per call) caps the path; naming one the
// CPU lacks is an error, except amx, which only changes which GEMM runs (so it can be tested on a
// CPU without tiles, as long as it has AVX512-BF16).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define LMF_X86 1
#define LMF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LMF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define LMF_TARGET_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#include <immintrin.h>
#endif

enum class CpuIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

inline const char* isa_name(CpuIsa i) {
  switch (i) {
    case CpuIsa::kAmx: return "amx";
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// What this CPU (and its OS: __builtin_cpu_supports checks that the vector state is enabled)
// supports; computed once.
inline CpuIsa cpu_isa_detected() {
  static const CpuIsa best = [] {
#ifdef LMF_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    const bool amx = bf16 && __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile");
#else
    const bool amx = false;
#endif
    return amx ? CpuIsa::kAmx : bf16 ? CpuIsa::kAvx512Bf16 : avx512 ? CpuIsa::kAvx512
                                                                    : avx2 ? CpuIsa::kAvx2
                                                                           : CpuIsa::kGeneric;
#else
    return CpuIsa::kGeneric;
#endif
  }();
  return best;
}

// The path to run now: the detected one, or the one LORAMIX_CPU_ISA names (read per call).
inline CpuIsa cpu_isa() {
  const CpuIsa best = cpu_isa_detected();
  const char* s = std::getenv("LORAMIX_CPU_ISA");
  if (s == nullptr || *s == 0) return best;
  static const char* const names[] = {"generic", "avx2", "avx512", "avx512bf16", "amx"};
  for (int i = 0; i < 5; ++i) {
    if (std::strcmp(s, names[i]) != 0) continue;
    const CpuIsa want = static_cast<CpuIsa>(i);
    const bool ok = want <= best || (want == CpuIsa::kAmx && best >= CpuIsa::kAvx512Bf16);
    TORCH_CHECK_VALUE(ok, "LORAMIX_CPU_ISA=", s, ": this CPU supports at most ", isa_name(best));
    return want;
  }
  TORCH_CHECK_VALUE(false, "LORAMIX_CPU_ISA must be one of amx, avx512bf16, avx512, avx2, generic; got '",
                    s, "'");
  return best;
}

}  // namespace loramix
