// Fused multi-LoRA linear on CPU (DESIGN.md operation 1), registered as torch.ops.loramix_cpp.*
//
//   y[m] = x[m] @ W.T + bias + sum_s w[m,s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]] @ x[m]),
//   e = idx[m, s]; e = -1: nothing.
//   Legend: M rows, K in, N out, E adapters, R max rank, S slots, P (row, slot) pairs with work.
//
// Plan (no gathered copies of adapter weights; every adapter row/column past rank[e] is never read):
//   0. base: one BLAS call, at::addmm(bias, x, W.t()) (any W strides: HF Conv1D passes a view);
//      fp32 with M <= small_m_rows32() (decode) on AVX-512 and W with unit last stride: small32,
//      the base GEMM in the op's own tiles with the delta fused (torch's fp32 GEMM is 1.5-3x
//      slower at these M; see the fp32 small-M section).
//   1. host: the pairs (m, s) with e >= 0 and rank[e] > 0, counting-sorted by adapter into groups;
//      c[p] = w[m, s] * scale[e].
//   2. shrink  hc[p, :rank] = c[p] * A[e, :rank] @ x[m]                      # [P, R], fp32
//        small groups: AVX-512 dots, parallel over (block of <= 4 rows of one adapter, r): each A row
//                      is streamed once per block (decode: once), both cores stream A.
//        large groups (>= 256 rows): gather the x ROWS, one GEMM per 64-row chunk.
//   3. expand  out[m, n] += B[e, n, :rank] . hc[p]                          parallel over N ranges
//        small groups: per block of <= 4 rows, one pass over B[e, n0:n1, :rank] (AVX-512,
//                      4 outputs per horizontal reduction);
//        large groups: GEMM [rows, rank] x [rank, n1-n0] into a scratch, then scatter-add rows.
//   S = 1 without large groups (decode serving): 2 and 3 fused per block in ONE parallel region over
//   blocks (a block owns its rows: no barrier, h never leaves the thread).
//   fp32/fp64 add into y in place.
// bf16/fp16 have their own path (the "16-bit path" section below): the base GEMM in fp32 (a fused
// small-M kernel, or MKL's bf16 x bf16 -> fp32 GEMM), kernels picked at run time from the CPU
// (AMX / AVX512-BF16 / AVX-512 / AVX2 / generic, cpu_isa() in common.h) and ONE rounding of
// base + bias + delta; fp16 by default rounds twice (torch's fp16 GEMM is faster than MKL's).
// multi_lora_expand (SpectR's second half) is step 3 alone, with hc from the given h [M, E, R].
// Environment knobs (read per call; for tests and benchmarks): LORAMIX_CPU_ISA, LORAMIX_CPP_GEMM16,
// LORAMIX_CPP_SMALL_M, LORAMIX_CPP_SMALL_M32, LORAMIX_CPP_SMALL32_BASE, LORAMIX_CPP_LARGE_GROUP.
#include "common.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace loramix {
namespace {

constexpr int64_t kBlock = 4;        // rows of one adapter sharing one pass over A / B (small path)
constexpr int64_t kGemmRows = 64;    // rows per GEMM call (large path)
// Least multiply-adds worth a thread: below it one core does the delta (decode with a few rows
// moves < 1 MB of adapters; a fork/join costs microseconds when idle and a scheduler slice when the
// machine is oversubscribed).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;
// The same for a delta added after torch's base GEMM (aten16): one multiply-add per adapter element
// read, memory-bound, so both cores' bandwidth is worth a fork from 16 K multiply-adds (32 KB of
// bf16 factors) on.
constexpr int64_t kMinMemWorkPerThread = int64_t{1} << 14;

// Groups with at least this many rows take the GEMM path. On a 2-core AVX-512 EPYC (d = 2048,
// r = 16) the per-row kernels tied or beat one MKL call per 64 rows even for a 1024-row group (the
// small GEMMs have N = r and pay a call each), so only very popular adapters take it.
// LORAMIX_CPP_LARGE_GROUP overrides it (read per call, for benchmarks and tests).
int64_t large_group_rows(int64_t dflt = 256) {
  const char* s = std::getenv("LORAMIX_CPP_LARGE_GROUP");
  return s && *s ? std::max<int64_t>(1, std::atoll(s)) : dflt;
}

// ---------------------------------------------------------------- plan (host, O(M*S + E)) --------
template <typename O>
struct Plan {
  struct Block { int64_t p0, nb, g; };   // pairs [p0, p0 + nb) of group g (small path)
  struct Chunk { int64_t p0, nr, g; };   // pairs [p0, p0 + nr) of group g (large path)
  int64_t P = 0;
  std::vector<int64_t> row;    // [P] row of pair p; pairs sorted by adapter, then row
  std::vector<O> coef;         // [P] w * scale
  std::vector<int64_t> gbeg, gexp, grank;  // groups: pairs [gbeg[g], gbeg[g + 1]), adapter, rank
  std::vector<Block> blocks;
  std::vector<Chunk> chunks;
  std::vector<int64_t> large;  // large groups
};

// idx [M, S] int64 contiguous (values checked), w [M, S] in O or undefined, scale [E] in O,
// rank [E] int64 (checked). Small groups are cut into blocks of <= block rows; groups of >= big
// rows are large (chunks of kGemmRows).
template <typename O>
Plan<O> make_plan(const at::Tensor& idx, const at::Tensor& w, const at::Tensor& scale,
                  const at::Tensor& rank, int64_t E, int64_t block = kBlock,
                  int64_t big = large_group_rows()) {
  Plan<O> pl;
  const int64_t M = idx.size(0), S = idx.size(1);
  const int64_t* id = idx.data_ptr<int64_t>();
  const O* wp = w.defined() ? w.data_ptr<O>() : nullptr;
  const O* sc = scale.data_ptr<O>();
  const int64_t* rk = rank.data_ptr<int64_t>();
  std::vector<int64_t> cnt(E + 1, 0);
  for (int64_t i = 0; i < M * S; ++i) {
    const int64_t e = id[i];
    if (e >= 0 && rk[e] > 0) ++cnt[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) cnt[e + 1] += cnt[e];
  pl.P = cnt[E];
  if (pl.P == 0) return pl;
  pl.row.resize(pl.P);
  pl.coef.resize(pl.P);
  std::vector<int64_t> pos(cnt.begin(), cnt.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = id[m * S + s];
      if (e < 0 || rk[e] == 0) continue;
      const int64_t p = pos[e]++;
      pl.row[p] = m;
      pl.coef[p] = wp ? static_cast<O>(wp[m * S + s] * sc[e]) : sc[e];
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = cnt[e + 1] - cnt[e];
    if (n == 0) continue;
    const int64_t g = static_cast<int64_t>(pl.gexp.size());
    pl.gbeg.push_back(cnt[e]);
    pl.gexp.push_back(e);
    pl.grank.push_back(rk[e]);
    if (n >= big) {
      pl.large.push_back(g);
      for (int64_t i = 0; i < n; i += kGemmRows)
        pl.chunks.push_back({cnt[e] + i, std::min(kGemmRows, n - i), g});
    } else {
      for (int64_t i = 0; i < n; i += block)
        pl.blocks.push_back({cnt[e] + i, std::min(block, n - i), g});
    }
  }
  pl.gbeg.push_back(pl.P);
  return pl;
}

// The plan of a path that takes every group per row (no large groups); empty when no pair can
// exist (no adapter, no rank or no slot).
inline Plan<float> plan_per_row(const Meta& mt, int64_t E, int64_t R, int64_t block) {
  Plan<float> pl;
  if (E > 0 && R > 0 && mt.idx.size(1) > 0)
    pl = make_plan<float>(mt.idx, mt.w, mt.scale, mt.rank, E, block,
                          std::numeric_limits<int64_t>::max());
  return pl;
}

// bias as a contiguous tensor, or an undefined one when there is none.
inline at::Tensor contiguous_bias(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------- micro-kernels ------------------
// out[j] = a[:K] . xs[j][:K], j < NB (one pass over a)
template <typename T, int NB>
inline void dot_rows(const T* a, const T* const* xs, int64_t K, acc_t<T>* out) {
#ifdef LMF_AVX512
  if constexpr (kVec16<T>) {
    __m512 s0[NB], s1[NB];
    for (int j = 0; j < NB; ++j) s0[j] = s1[j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 a0 = ld16(a + k), a1 = ld16(a + k + 16);
      for (int j = 0; j < NB; ++j) {
        s0[j] = _mm512_fmadd_ps(a0, ld16(xs[j] + k), s0[j]);
        s1[j] = _mm512_fmadd_ps(a1, ld16(xs[j] + k + 16), s1[j]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 mk = tail_mask(K - k);
      const __m512 a0 = ld16(a + k, mk);
      for (int j = 0; j < NB; ++j) s0[j] = _mm512_fmadd_ps(a0, ld16(xs[j] + k, mk), s0[j]);
    }
    for (int j = 0; j < NB; ++j) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(s0[j], s1[j]));
    return;
  }
#endif
  using A = acc_t<T>;
  for (int j = 0; j < NB; ++j) {
    const T* xj = xs[j];
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += static_cast<A>(a[k]) * static_cast<A>(xj[k]);
    out[j] = s;
  }
}

#ifdef LMF_AVX512
// Horizontal sums of 4 vectors -> [sum p0, sum p1, sum p2, sum p3].
inline __m128 hsum4(__m512 p0, __m512 p1, __m512 p2, __m512 p3) {
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, 0x44), _mm512_shuffle_f32x4(p0, p1, 0xEE));
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(p2, p3, 0x44), _mm512_shuffle_f32x4(p2, p3, 0xEE));
  // lanes of d: partial sums of p0, p1, p2, p3 (4 floats each)
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(a, c, 0x88), _mm512_shuffle_f32x4(a, c, 0xDD));
  const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, 0x4E));  // [x0+x2, x1+x3, ..]
  const __m512 f = _mm512_add_ps(e, _mm512_permute_ps(e, 0xB1));  // every lane element = lane sum
  const __m512i pick = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, f));
}
#endif

// ys[j][n] += b[n * ldb, :rank] . hs[j][:rank] for n < nn, j < NB (one pass over b)
template <typename TB, typename O, int NB>
inline void expand_rows(const TB* b, int64_t ldb, int64_t nn, int64_t rank, const O* const* hs,
                        O* const* ys) {
#ifdef LMF_AVX512
  if constexpr (kVec16<TB> && std::is_same_v<O, float>) {
    if (rank <= 16) {
      const __mmask16 mk = tail_mask(rank);
      __m512 h[NB];
      for (int j = 0; j < NB; ++j) h[j] = _mm512_maskz_loadu_ps(mk, hs[j]);
      int64_t n = 0;
      for (; n + 4 <= nn; n += 4) {
        const TB* bn = b + n * ldb;
        const __m512 b0 = ld16(bn, mk), b1 = ld16(bn + ldb, mk), b2 = ld16(bn + 2 * ldb, mk),
                     b3 = ld16(bn + 3 * ldb, mk);
        for (int j = 0; j < NB; ++j) {
          const __m128 s = hsum4(_mm512_mul_ps(b0, h[j]), _mm512_mul_ps(b1, h[j]),
                                 _mm512_mul_ps(b2, h[j]), _mm512_mul_ps(b3, h[j]));
          _mm_storeu_ps(ys[j] + n, _mm_add_ps(_mm_loadu_ps(ys[j] + n), s));
        }
      }
      for (; n < nn; ++n) {
        const __m512 bv = ld16(b + n * ldb, mk);
        for (int j = 0; j < NB; ++j) ys[j][n] += _mm512_reduce_add_ps(_mm512_mul_ps(bv, h[j]));
      }
      return;
    }
    // rank > 16: chunks of 16 along r
    int64_t n = 0;
    for (; n + 4 <= nn; n += 4) {
      const TB* bn = b + n * ldb;
      __m512 p[NB][4];
      for (int j = 0; j < NB; ++j)
        for (int i = 0; i < 4; ++i) p[j][i] = _mm512_setzero_ps();
      for (int64_t r = 0; r < rank; r += 16) {
        const __mmask16 mk = tail_mask(rank - r);
        __m512 bv[4];
        for (int i = 0; i < 4; ++i) bv[i] = ld16(bn + i * ldb + r, mk);
        for (int j = 0; j < NB; ++j) {
          const __m512 hv = _mm512_maskz_loadu_ps(mk, hs[j] + r);
          for (int i = 0; i < 4; ++i) p[j][i] = _mm512_fmadd_ps(bv[i], hv, p[j][i]);
        }
      }
      for (int j = 0; j < NB; ++j) {
        const __m128 s = hsum4(p[j][0], p[j][1], p[j][2], p[j][3]);
        _mm_storeu_ps(ys[j] + n, _mm_add_ps(_mm_loadu_ps(ys[j] + n), s));
      }
    }
    for (; n < nn; ++n) {
      for (int j = 0; j < NB; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t r = 0; r < rank; r += 16) {
          const __mmask16 mk = tail_mask(rank - r);
          acc = _mm512_fmadd_ps(ld16(b + n * ldb + r, mk), _mm512_maskz_loadu_ps(mk, hs[j] + r), acc);
        }
        ys[j][n] += _mm512_reduce_add_ps(acc);
      }
    }
    return;
  }
#endif
  for (int64_t n = 0; n < nn; ++n) {
    const TB* bn = b + n * ldb;
    for (int j = 0; j < NB; ++j) {
      const O* hj = hs[j];
      O s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t r = 0; r < rank; ++r) s += static_cast<O>(bn[r]) * hj[r];
      ys[j][n] += s;
    }
  }
}

// ---------------------------------------------------------------- phases -------------------------
// hc[p, :rank] = c[p] * A[e, :rank] @ x[row[p]] for pairs of small groups
template <typename T, typename O>
void shrink_small(const Plan<O>& pl, const T* x, int64_t sx, const T* A, int64_t sAe, int64_t sAr,
                  int64_t K, O* hc, int64_t R, int64_t min_work = kMinWorkPerThread) {
  const auto& bl = pl.blocks;
  if (bl.empty()) return;
  std::vector<int64_t> start(bl.size() + 1, 0);  // work items: (block, r)
  for (size_t b = 0; b < bl.size(); ++b) start[b + 1] = start[b] + pl.grank[bl[b].g];
  const int64_t total = start.back();
  const int64_t grain = std::max<int64_t>(1, min_work / std::max<int64_t>(1, K));
  at::parallel_for(0, total, grain, [&](int64_t i0, int64_t i1) {
    size_t b = std::upper_bound(start.begin(), start.end(), i0) - start.begin() - 1;
    for (int64_t i = i0; i < i1; ++b) {
      const auto& blk = bl[b];
      const int64_t e = pl.gexp[blk.g];
      const T* xs[kBlock];
      for (int64_t j = 0; j < blk.nb; ++j) xs[j] = x + pl.row[blk.p0 + j] * sx;
      const int64_t r_end = std::min(start[b + 1], i1) - start[b];
      for (int64_t r = i - start[b]; r < r_end; ++r) {
        const T* a = A + e * sAe + r * sAr;
        O out[kBlock];
        switch (blk.nb) {
          case 1: dot_rows<T, 1>(a, xs, K, out); break;
          case 2: dot_rows<T, 2>(a, xs, K, out); break;
          case 3: dot_rows<T, 3>(a, xs, K, out); break;
          default: dot_rows<T, 4>(a, xs, K, out); break;
        }
        for (int64_t j = 0; j < blk.nb; ++j) hc[(blk.p0 + j) * R + r] = pl.coef[blk.p0 + j] * out[j];
      }
      i = start[b] + r_end;
    }
  });
}

// Same for large groups: gather x rows (converted to O), GEMM with A[e, :rank] (in O).
template <typename T, typename O>
void shrink_large(const Plan<O>& pl, const at::Tensor& x, const at::Tensor& A, O* hc, int64_t R) {
  if (pl.chunks.empty()) return;
  const at::ScalarType ot = acc_scalar_type<T>();
  const int64_t K = x.size(1), sx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  std::vector<at::Tensor> Ag(pl.gexp.size());  // [rank, K] in O, per large group
  for (int64_t g : pl.large) Ag[g] = A.select(0, pl.gexp[g]).narrow(0, 0, pl.grank[g]).to(ot);
  at::parallel_for(0, static_cast<int64_t>(pl.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    c10::InferenceMode guard;
    at::Tensor xg = at::empty({kGemmRows, K}, x.options().dtype(ot));
    O* xgp = xg.data_ptr<O>();
    for (int64_t c = c0; c < c1; ++c) {
      const auto& ch = pl.chunks[c];
      const int64_t rank = pl.grank[ch.g];
      for (int64_t i = 0; i < ch.nr; ++i) {
        const T* src = xp + pl.row[ch.p0 + i] * sx;
        O* dst = xgp + i * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<O>(src[k]);
      }
      at::Tensor h = at::mm(xg.narrow(0, 0, ch.nr), Ag[ch.g].t());  // [nr, rank]
      const O* hp = h.data_ptr<O>();
      for (int64_t i = 0; i < ch.nr; ++i) {
        const O c_ = pl.coef[ch.p0 + i];
        for (int64_t r = 0; r < rank; ++r) hc[(ch.p0 + i) * R + r] = c_ * hp[i * rank + r];
      }
    }
  });
}

// out[row[p], :] += B[e, :, :rank] @ hc[p, :rank] for every pair; parallel over N ranges.
template <typename TB, typename O>
void expand_all(const Plan<O>& pl, const at::Tensor& B, const at::Tensor& hc_t, at::Tensor& out) {
  const int64_t N = out.size(1), ldo = out.stride(0), R = hc_t.size(1);
  const int64_t sBe = B.stride(0), sBn = B.stride(1);
  const TB* Bp = B.data_ptr<TB>();
  const O* hc = hc_t.data_ptr<O>();
  O* op = out.data_ptr<O>();
  const at::ScalarType ot = out.scalar_type();
  int64_t work_per_n = 0;  // multiply-adds per output column
  for (const auto& blk : pl.blocks) work_per_n += blk.nb * pl.grank[blk.g];
  for (int64_t g : pl.large) work_per_n += (pl.gbeg[g + 1] - pl.gbeg[g]) * pl.grank[g];
  int64_t grain = std::max<int64_t>(16, kMinWorkPerThread / std::max<int64_t>(1, work_per_n));
  if (!pl.large.empty()) grain = std::max<int64_t>(grain, 128);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const int64_t nn = n1 - n0;
    for (const auto& blk : pl.blocks) {
      const int64_t e = pl.gexp[blk.g], rank = pl.grank[blk.g];
      const TB* b = Bp + e * sBe + n0 * sBn;
      const O* hs[kBlock];
      O* ys[kBlock];
      for (int64_t j = 0; j < blk.nb; ++j) {
        hs[j] = hc + (blk.p0 + j) * R;
        ys[j] = op + pl.row[blk.p0 + j] * ldo + n0;
      }
      switch (blk.nb) {
        case 1: expand_rows<TB, O, 1>(b, sBn, nn, rank, hs, ys); break;
        case 2: expand_rows<TB, O, 2>(b, sBn, nn, rank, hs, ys); break;
        case 3: expand_rows<TB, O, 3>(b, sBn, nn, rank, hs, ys); break;
        default: expand_rows<TB, O, 4>(b, sBn, nn, rank, hs, ys); break;
      }
    }
    if (pl.large.empty()) return;
    c10::InferenceMode guard;
    for (int64_t g : pl.large) {
      const int64_t rank = pl.grank[g];
      at::Tensor Bc = B.select(0, pl.gexp[g]).narrow(0, n0, nn).narrow(1, 0, rank);  // [nn, rank]
      if (Bc.scalar_type() != ot) Bc = Bc.to(ot);
      const at::Tensor Bct = Bc.t();
      for (int64_t p0 = pl.gbeg[g]; p0 < pl.gbeg[g + 1]; p0 += kGemmRows) {
        const int64_t nr = std::min(kGemmRows, pl.gbeg[g + 1] - p0);
        const at::Tensor d = at::mm(hc_t.narrow(0, p0, nr).narrow(1, 0, rank), Bct);  // [nr, nn]
        const O* dp = d.data_ptr<O>();
        for (int64_t i = 0; i < nr; ++i) {
          O* y = op + pl.row[p0 + i] * ldo + n0;
          const O* di = dp + i * nn;
#pragma omp simd
          for (int64_t n = 0; n < nn; ++n) y[n] += di[n];
        }
      }
    }
  });
}

// One row per pair (S = 1) and no large group: shrink and expand fused per block, one parallel
// region over blocks and no barrier (each block owns its rows): h stays in a thread-local buffer.
template <typename T, typename O>
void fused_small(const Plan<O>& pl, const T* x, int64_t sx, const T* A, int64_t sAe, int64_t sAr,
                 int64_t K, const T* B, int64_t sBe, int64_t sBn, O* out, int64_t ldo, int64_t N,
                 int64_t R) {
  const auto& bl = pl.blocks;
  const int64_t nblk = static_cast<int64_t>(bl.size());
  int64_t work = 0;
  for (const auto& blk : bl) work += blk.nb * pl.grank[blk.g] * (K + N);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread * nblk / std::max<int64_t>(1, work));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    std::vector<O> hbuf(kBlock * std::max<int64_t>(R, 16), O(0));
    for (int64_t b = b0; b < b1; ++b) {
      const auto& blk = bl[b];
      const int64_t e = pl.gexp[blk.g], rank = pl.grank[blk.g], ld = std::max<int64_t>(R, 16);
      const T* xs[kBlock];
      const O* hs[kBlock];
      O* ys[kBlock];
      for (int64_t j = 0; j < blk.nb; ++j) {
        xs[j] = x + pl.row[blk.p0 + j] * sx;
        hs[j] = hbuf.data() + j * ld;
        ys[j] = out + pl.row[blk.p0 + j] * ldo;
      }
      for (int64_t r = 0; r < rank; ++r) {
        O h[kBlock];
        const T* a = A + e * sAe + r * sAr;
        switch (blk.nb) {
          case 1: dot_rows<T, 1>(a, xs, K, h); break;
          case 2: dot_rows<T, 2>(a, xs, K, h); break;
          case 3: dot_rows<T, 3>(a, xs, K, h); break;
          default: dot_rows<T, 4>(a, xs, K, h); break;
        }
        for (int64_t j = 0; j < blk.nb; ++j) hbuf[j * ld + r] = pl.coef[blk.p0 + j] * h[j];
      }
      const T* bp = B + e * sBe;
      switch (blk.nb) {
        case 1: expand_rows<T, O, 1>(bp, sBn, N, rank, hs, ys); break;
        case 2: expand_rows<T, O, 2>(bp, sBn, N, rank, hs, ys); break;
        case 3: expand_rows<T, O, 3>(bp, sBn, N, rank, hs, ys); break;
        default: expand_rows<T, O, 4>(bp, sBn, N, rank, hs, ys); break;
      }
    }
  });
}

// ---------------------------------------------------------------- argument handling -------------
// ================================================================ 16-bit path (bf16 / fp16) =====
// y = round(C + bias + delta) with C = x @ W.T in fp32 from MKL's mixed-precision GEMM (bf16 x bf16
// -> fp32; it runs on AMX tiles where the CPU has them) or, for bf16 and small M, from the fused
// kernel below: the whole sum is rounded ONCE. fp16 (by default, see gemm16) and torch without MKL:
// C = float(at::addmm(bias, x, W.t())) in T, so y is rounded twice.
// The delta's kernels, one set per run-time path (cpu_isa(), common.h), all add into fp32 rows of C:
//   shrink  h[j, r] = c[j] * A[e, r] . x[j]: tiles of <= 4 rows x 4 ranks (1 row x 8 ranks), K in
//           steps of 32 elements (vdpbf16ps: two products per fp32 lane) / 16 / 8 (AVX2).
//   expand  C[j, n] += B[e, n, :rank] . h[j]. h stays fp32: for vdpbf16ps it is split into bf16
//           parts h = hi + lo (exact to 2^-17 relative), never rounded to bf16.
//           one row (decode): rows n, n+1 of B (16 ranks each) are one 512-bit load of rank pairs;
//             8 such accumulators reduce to 16 outputs in 22 shuffles/adds;
//           several rows of one adapter (bf16 path): a 16 x 16 tile of B is transposed in registers
//             once (rank pairs x outputs) and reused by every row: 16 dot products per row and tile.
//   round   y[n] = round(C[n] + bias[n]) per row, while the row is still in cache.
// S = 1 without large groups: one parallel region over blocks (<= 8 rows of one adapter: shrink,
// expand over all N, round), rows with no adapter rounded by the same items. Otherwise two phases:
// shrink into hc [P, R], then expand + round in parallel over N ranges. Large groups (kAmx: >= 256
// rows) run their shrink as one MKL GEMM over the gathered x rows.
constexpr int64_t kBlock16 = 8;  // rows per block on the 16-bit path

// hs[j][r] = coef[j] * A[r] . xs[j] for j < nb (1..4), r < rank; A rows sAr elements apart.
using ShrinkFn = void (*)(const void* const* xs, int nb, const void* a, int64_t sAr, int64_t rank,
                          int64_t K, const float* coef, float* const* hs);
// ys[j][n] += sum_{r < rank} b[n * ldb + r] * hs[j][r] for n < nn, j < nb (any nb >= 1).
using ExpandFn = void (*)(const void* b, int64_t ldb, int64_t nn, int64_t rank, int64_t nb,
                          const float* const* hs, float* const* ys);
// dst[n] = round(src[n] + bias[n]) for n < nn (bias may be null).
using RoundFn = void (*)(const float* src, const void* bias, void* dst, int64_t nn);
struct Kern16 {
  ShrinkFn shrink;
  ExpandFn expand;
  RoundFn round;
  // expand with h rounded to bf16 once (AVX512-BF16: one dot product per rank pair instead of the
  // hi + lo two): for aten16, whose base is already rounded to T (same error class as torch's bf16
  // h = x @ A.T); elsewhere the same as expand
  ExpandFn expand_hi = nullptr;
};

// ---------------------------------------------------------------- generic C++ ------------------
namespace gen {
template <typename T>
void shrink(const void* const* xs_, int nb, const void* a_, int64_t sAr, int64_t rank, int64_t K,
            const float* coef, float* const* hs) {
  const T* const* xs = reinterpret_cast<const T* const*>(xs_);
  const T* a = static_cast<const T*>(a_);
  for (int64_t r = 0; r < rank; ++r) {
    const T* ar = a + r * sAr;
    for (int j = 0; j < nb; ++j) {
      const T* xj = xs[j];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(ar[k]) * static_cast<float>(xj[k]);
      hs[j][r] = coef[j] * s;
    }
  }
}
template <typename T>
void expand(const void* b_, int64_t ldb, int64_t nn, int64_t rank, int64_t nb, const float* const* hs,
            float* const* ys) {
  const T* b = static_cast<const T*>(b_);
  for (int64_t n = 0; n < nn; ++n) {
    const T* bn = b + n * ldb;
    for (int64_t j = 0; j < nb; ++j) {
      const float* h = hs[j];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t r = 0; r < rank; ++r) s += static_cast<float>(bn[r]) * h[r];
      ys[j][n] += s;
    }
  }
}
template <typename T>
void round_row(const float* src, const void* bias_, void* dst_, int64_t nn) {
  const T* bias = static_cast<const T*>(bias_);
  T* dst = static_cast<T*>(dst_);
  if (bias) {
    for (int64_t n = 0; n < nn; ++n) dst[n] = static_cast<T>(src[n] + static_cast<float>(bias[n]));
  } else {
    for (int64_t n = 0; n < nn; ++n) dst[n] = static_cast<T>(src[n]);
  }
}
}  // namespace gen

#ifdef LMF_X86
// ---------------------------------------------------------------- AVX2 + FMA + F16C -----------
namespace k2 {
template <typename T>
LMF_TARGET_AVX2 inline __m256 ld8(const T* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  else
    return _mm256_cvtph_ps(v);
}
LMF_TARGET_AVX2 inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
// [sum a0, ..., sum a7]
LMF_TARGET_AVX2 inline __m256 reduce8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}
template <typename T, int NB, int RB>
LMF_TARGET_AVX2 void dot_tile(const T* const* xs, const T* const* as, int64_t K, float* out) {
  __m256 acc[NB][RB];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; ++r) acc[j][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = ld8(xs[j] + k);
    for (int r = 0; r < RB; ++r) {
      const __m256 av = ld8(as[r] + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm256_fmadd_ps(av, xv[j], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; ++r) {
      float s = hsum8(acc[j][r]);
      for (int64_t kk = k; kk < K; ++kk)
        s += static_cast<float>(as[r][kk]) * static_cast<float>(xs[j][kk]);
      out[j * RB + r] = s;
    }
}
template <typename T>
LMF_TARGET_AVX2 void shrink(const void* const* xs_, int nb, const void* a_, int64_t sAr, int64_t rank,
                            int64_t K, const float* coef, float* const* hs) {
  const T* const* xs = reinterpret_cast<const T* const*>(xs_);
  const T* a = static_cast<const T*>(a_);
  const T* xp[4];
  for (int j = 0; j < 4; ++j) xp[j] = xs[j < nb ? j : nb - 1];
  float out[16];
  for (int64_t r0 = 0; r0 < rank; r0 += 4) {
    const T* ap[4];
    for (int i = 0; i < 4; ++i) ap[i] = a + std::min<int64_t>(r0 + i, rank - 1) * sAr;
    if (nb == 1) dot_tile<T, 1, 4>(xp, ap, K, out);
    else if (nb == 2) dot_tile<T, 2, 4>(xp, ap, K, out);
    else dot_tile<T, 4, 4>(xp, ap, K, out);
    for (int j = 0; j < nb; ++j)
      for (int i = 0; i < 4 && r0 + i < rank; ++i) hs[j][r0 + i] = coef[j] * out[j * 4 + i];
  }
}
template <typename T>
LMF_TARGET_AVX2 void expand(const void* b_, int64_t ldb, int64_t nn, int64_t rank, int64_t nb,
                            const float* const* hs, float* const* ys) {
  const T* b = static_cast<const T*>(b_);
  const int64_t r8 = rank & ~int64_t{7};
  for (int64_t j = 0; j < nb; ++j) {
    const float* h = hs[j];
    float* y = ys[j];
    int64_t n = 0;
    for (; n + 8 <= nn; n += 8) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t r = 0; r < r8; r += 8) {
        const __m256 hv = _mm256_loadu_ps(h + r);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(ld8(b + (n + i) * ldb + r), hv, acc[i]);
      }
      __m256 s = reduce8(acc);
      if (r8 < rank) {  // rank tail (< 8 ranks), scalar
        alignas(32) float t[8];
        for (int i = 0; i < 8; ++i) {
          float u = 0.f;
          for (int64_t r = r8; r < rank; ++r) u += static_cast<float>(b[(n + i) * ldb + r]) * h[r];
          t[i] = u;
        }
        s = _mm256_add_ps(s, _mm256_load_ps(t));
      }
      _mm256_storeu_ps(y + n, _mm256_add_ps(_mm256_loadu_ps(y + n), s));
    }
    for (; n < nn; ++n) {
      float u = 0.f;
      for (int64_t r = 0; r < rank; ++r) u += static_cast<float>(b[n * ldb + r]) * h[r];
      y[n] += u;
    }
  }
}
template <typename T>
LMF_TARGET_AVX2 inline __m128i round8(__m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // round to nearest even, NaN -> 0x7FC0 (as c10)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  } else {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}
template <typename T>
LMF_TARGET_AVX2 void round_row(const float* src, const void* bias_, void* dst_, int64_t nn) {
  const T* bias = static_cast<const T*>(bias_);
  T* dst = static_cast<T*>(dst_);
  int64_t n = 0;
  for (; n + 8 <= nn; n += 8) {
    __m256 v = _mm256_loadu_ps(src + n);
    if (bias) v = _mm256_add_ps(v, ld8(bias + n));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + n), round8<T>(v));
  }
  for (; n < nn; ++n) dst[n] = static_cast<T>(src[n] + (bias ? static_cast<float>(bias[n]) : 0.f));
}
}  // namespace k2

// ---------------------------------------------------------------- AVX-512 (fp32 FMA) ----------
namespace k512 {
LMF_TARGET_AVX512 inline __mmask16 mask16(int64_t n) {  // first clamp(n, 0, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}
template <typename T>
LMF_TARGET_AVX512 inline __m512 ld(const T* p, __mmask16 k) {  // 16 elements -> fp32, off lanes 0
  const __m256i v = _mm256_maskz_loadu_epi16(k, p);
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  else
    return _mm512_cvtph_ps(v);
}
template <typename T>
LMF_TARGET_AVX512 inline __m512 ld(const T* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  else
    return _mm512_cvtph_ps(v);
}
// Horizontal sums of 4 vectors -> [sum p0, sum p1, sum p2, sum p3].
LMF_TARGET_AVX512 inline __m128 hsum4(__m512 p0, __m512 p1, __m512 p2, __m512 p3) {
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, 0x44), _mm512_shuffle_f32x4(p0, p1, 0xEE));
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(p2, p3, 0x44), _mm512_shuffle_f32x4(p2, p3, 0xEE));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(a, c, 0x88), _mm512_shuffle_f32x4(a, c, 0xDD));
  const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, 0x4E));
  const __m512 f = _mm512_add_ps(e, _mm512_permute_ps(e, 0xB1));
  const __m512i pick = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, f));
}
// acc[q]: lanes 0-7 partial sums of output 2q, lanes 8-15 of output 2q + 1 -> the 16 outputs.
LMF_TARGET_AVX512 inline __m512 reduce8(const __m512* acc) {
  __m512 v1[4];
  for (int i = 0; i < 4; ++i)  // 4 outputs x 4 partials
    v1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xDD));
  __m512 v2[2];
  for (int i = 0; i < 2; ++i)  // quarter q: outputs q, q + 4 (of this half) x 2 partials
    v2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v1[2 * i], v1[2 * i + 1]),
                          _mm512_unpackhi_ps(v1[2 * i], v1[2 * i + 1]));
  const __m512d a = _mm512_castps_pd(v2[0]), b = _mm512_castps_pd(v2[1]);
  const __m512 f = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  // lane 4q + i holds output q + 4i
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, f);
}
// Rows r0 and r1 (16 elements from b + r * ldb, masked to k; a row >= nn reads nothing) as one
// vector of 32 16-bit values: lanes 0-7 rank pairs of r0, lanes 8-15 of r1.
LMF_TARGET_AVX512 inline __m512i ld_pairs(const uint16_t* b, int64_t ldb, int64_t r0, int64_t nn,
                                          __mmask16 k) {
  const __m256i lo = r0 < nn ? _mm256_maskz_loadu_epi16(k, b + r0 * ldb) : _mm256_setzero_si256();
  const __m256i hi = r0 + 1 < nn ? _mm256_maskz_loadu_epi16(k, b + (r0 + 1) * ldb) : _mm256_setzero_si256();
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
template <typename T, int NB, int RB>
LMF_TARGET_AVX512 void dot_tile(const T* const* xs, const T* const* as, int64_t K, float* out) {
  __m512 acc[NB][RB];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = ld(xs[j] + k);
    for (int r = 0; r < RB; ++r) {
      const __m512 av = ld(as[r] + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(av, xv[j], acc[j][r]);
    }
  }
  if (k < K) {
    const __mmask16 m = mask16(K - k);
    __m512 xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = ld(xs[j] + k, m);
    for (int r = 0; r < RB; ++r) {
      const __m512 av = ld(as[r] + k, m);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(av, xv[j], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; r += 4)
      _mm_storeu_ps(out + j * RB + r, hsum4(acc[j][r], acc[j][r + 1], acc[j][r + 2], acc[j][r + 3]));
}
template <typename T>
LMF_TARGET_AVX512 void shrink(const void* const* xs_, int nb, const void* a_, int64_t sAr,
                              int64_t rank, int64_t K, const float* coef, float* const* hs) {
  const T* const* xs = reinterpret_cast<const T* const*>(xs_);
  const T* a = static_cast<const T*>(a_);
  const T* xp[4];
  for (int j = 0; j < 4; ++j) xp[j] = xs[j < nb ? j : nb - 1];
  const int RB = nb == 1 ? 8 : 4;
  float out[32];
  for (int64_t r0 = 0; r0 < rank; r0 += RB) {
    const T* ap[8];
    for (int i = 0; i < RB; ++i) ap[i] = a + std::min<int64_t>(r0 + i, rank - 1) * sAr;
    if (nb == 1) dot_tile<T, 1, 8>(xp, ap, K, out);
    else if (nb == 2) dot_tile<T, 2, 4>(xp, ap, K, out);
    else dot_tile<T, 4, 4>(xp, ap, K, out);
    for (int j = 0; j < nb; ++j)
      for (int i = 0; i < RB && r0 + i < rank; ++i) hs[j][r0 + i] = coef[j] * out[j * RB + i];
  }
}
// Even / odd elements of 16 packed pairs as fp32.
template <typename T>
LMF_TARGET_AVX512 inline void unpair(__m512i v, __m512& ev, __m512& od) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    ev = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    od = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    ev = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    od = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
  }
}
// y[n] += b[n, :rank] . h for n < nn (one row), rank pairs in fp32 lanes (see reduce8).
template <typename T>
LMF_TARGET_AVX512 void expand_one(const uint16_t* b, int64_t ldb, int64_t nn, int64_t rank,
                                  const float* h, float* y) {
  const __m512i ev_idx = _mm512_set_epi32(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i od_idx = _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 15, 13, 11, 9, 7, 5, 3, 1);
  const bool whole = rank == 16 && ldb == 16;  // rows n, n + 1 are one 64-byte load
  for (int64_t c0 = 0; c0 < rank; c0 += 16) {
    const __mmask16 km = mask16(rank - c0);
    const __m512 hv = _mm512_maskz_loadu_ps(km, h + c0);
    const __m512 he = _mm512_permutexvar_ps(ev_idx, hv), ho = _mm512_permutexvar_ps(od_idx, hv);
    const uint16_t* bc = b + c0;
    for (int64_t n = 0; n < nn; n += 16) {
      __m512 acc[8];
      for (int q = 0; q < 8; ++q) acc[q] = _mm512_setzero_ps();
      const bool full = n + 16 <= nn;
      for (int q = 0; q < 8; ++q) {
        const __m512i v = whole && full ? _mm512_loadu_si512(bc + (n + 2 * q) * 16)
                                        : ld_pairs(bc, ldb, n + 2 * q, nn, km);
        __m512 ev, od;
        unpair<T>(v, ev, od);
        acc[q] = _mm512_fmadd_ps(od, ho, _mm512_fmadd_ps(ev, he, acc[q]));
      }
      const __m512 s = reduce8(acc);
      const __mmask16 kn = mask16(nn - n);
      _mm512_mask_storeu_ps(y + n, kn, _mm512_add_ps(_mm512_maskz_loadu_ps(kn, y + n), s));
    }
  }
}
template <typename T>
LMF_TARGET_AVX512 void expand(const void* b, int64_t ldb, int64_t nn, int64_t rank, int64_t nb,
                              const float* const* hs, float* const* ys) {
  for (int64_t j = 0; j < nb; ++j)
    expand_one<T>(static_cast<const uint16_t*>(b), ldb, nn, rank, hs[j], ys[j]);
}
template <typename T>
LMF_TARGET_AVX512 inline __m256i round16(__m512 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // round to nearest even, NaN -> 0x7FC0 (as c10)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  } else {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
}
template <typename T>
LMF_TARGET_AVX512 void round_row(const float* src, const void* bias_, void* dst_, int64_t nn) {
  const T* bias = static_cast<const T*>(bias_);
  T* dst = static_cast<T*>(dst_);
  for (int64_t n = 0; n < nn; n += 16) {
    const __mmask16 k = mask16(nn - n);
    __m512 v = _mm512_maskz_loadu_ps(k, src + n);
    if (bias) v = _mm512_add_ps(v, ld(bias + n, k));
    _mm256_mask_storeu_epi16(dst + n, k, round16<T>(v));
  }
}
// ---- fp32, small M (decode): the base GEMM itself, fused with the delta (small32 below) ----------
// out[j * RB + r] = x_j . w_r over K for NB rows of x and RB rows of W (fp32 FMA, K in steps of 16);
// with pf, one cache line of each of the RB rows pf[r] is prefetched per step (the next quad of W,
// so its rows arrive while this one computes: W streams from memory exactly once).
template <int NB, int RB, bool kPrefetch>
LMF_TARGET_AVX512 void dot_tile32(const float* const* xs, const float* const* ws, int64_t K,
                                  float* out, const float* const* pf) {
  __m512 acc[NB][RB];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = _mm512_loadu_ps(xs[j] + k);
    if constexpr (kPrefetch)
      for (int r = 0; r < RB; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + k), _MM_HINT_T0);
    for (int r = 0; r < RB; ++r) {
      const __m512 wv = _mm512_loadu_ps(ws[r] + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv, xv[j], acc[j][r]);
    }
  }
  if (k < K) {
    const __mmask16 m = mask16(K - k);
    __m512 xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = _mm512_maskz_loadu_ps(m, xs[j] + k);
    for (int r = 0; r < RB; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, ws[r] + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(wv, xv[j], acc[j][r]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; r += 4)
      _mm_storeu_ps(out + j * RB + r, hsum4(acc[j][r], acc[j][r + 1], acc[j][r + 2], acc[j][r + 3]));
}
// One (row, adapter) pair of a small32 call: B[e] (rows of ldb floats), its rank, and the scaled
// shrink output h = c * A[e, :rank] @ x[row] (rank floats).
struct SmallPair32 { const float* b; int64_t rank; const float* h; };
// Columns [n0, n0 + nn) (nn <= 16) of every row: y[m, n] = x[m] . W[n] + bias[n] + sum over the
// row's pairs of B[e, n, :rank] . h. Per chunk of 16 rows: the base products in 4 x 4 tiles (4 rows
// of W stay in L1 while the rows of x come from L1 / L2; during the first chunk's first tile the
// next 4 rows of W, up to row N - 1, are prefetched), then per row one 16-wide vector: base + bias
// + each pair's 16 dots of length rank, stored once. W is read from memory once, y written once.
LMF_TARGET_AVX512 void small_panel32(const float* x, int64_t sx, int64_t M, const float* W,
                                     int64_t sW, int64_t n0, int64_t nn, int64_t N, int64_t K,
                                     const float* bias, const SmallPair32* pairs,
                                     const int64_t* pbeg, int64_t ldb, float* y, int64_t ldy) {
  alignas(64) float P[16 * 16];  // [16 rows][16 columns] base products of this chunk
  float out[16];
  const __mmask16 kn = mask16(nn);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(kn, bias + n0) : _mm512_setzero_ps();
  for (int64_t r0 = 0; r0 < M; r0 += 16) {
    const int64_t mr = std::min<int64_t>(16, M - r0);
    for (int64_t c0 = 0; c0 < nn; c0 += 4) {
      const float* wp[4];
      const float* pf[4];
      for (int i = 0; i < 4; ++i) {
        wp[i] = W + (n0 + std::min<int64_t>(c0 + i, nn - 1)) * sW;
        pf[i] = W + std::min<int64_t>(n0 + c0 + 4 + i, N - 1) * sW;
      }
      for (int64_t m0 = 0; m0 < mr; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, mr - m0);
        const float* xp[4];
        for (int j = 0; j < 4; ++j) xp[j] = x + (r0 + m0 + std::min<int64_t>(j, mb - 1)) * sx;
        if (r0 == 0 && m0 == 0) {
          if (mb == 1) dot_tile32<1, 4, true>(xp, wp, K, out, pf);
          else if (mb == 2) dot_tile32<2, 4, true>(xp, wp, K, out, pf);
          else dot_tile32<4, 4, true>(xp, wp, K, out, pf);
        } else {
          if (mb == 1) dot_tile32<1, 4, false>(xp, wp, K, out, nullptr);
          else if (mb == 2) dot_tile32<2, 4, false>(xp, wp, K, out, nullptr);
          else dot_tile32<4, 4, false>(xp, wp, K, out, nullptr);
        }
        for (int64_t j = 0; j < mb; ++j)
          for (int i = 0; i < 4; ++i) P[(m0 + j) * 16 + c0 + i] = out[j * 4 + i];
      }
    }
    for (int64_t mi = 0; mi < mr; ++mi) {
      const int64_t m = r0 + mi;
      __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(kn, P + mi * 16), bv);
      for (int64_t q = pbeg[m]; q < pbeg[m + 1]; ++q) {
        const SmallPair32& sp = pairs[q];
        const float* b = sp.b + n0 * ldb;
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t c0 = 0; c0 < sp.rank; c0 += 16) {
          const __mmask16 km = mask16(sp.rank - c0);
          const __m512 hv = _mm512_maskz_loadu_ps(km, sp.h + c0);
          for (int i = 0; i < 16; ++i)
            if (i < nn)
              acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, b + i * ldb + c0), hv, acc[i]);
        }
        __m512 sum = _mm512_castps128_ps512(hsum4(acc[0], acc[1], acc[2], acc[3]));
        sum = _mm512_insertf32x4(sum, hsum4(acc[4], acc[5], acc[6], acc[7]), 1);
        sum = _mm512_insertf32x4(sum, hsum4(acc[8], acc[9], acc[10], acc[11]), 2);
        sum = _mm512_insertf32x4(sum, hsum4(acc[12], acc[13], acc[14], acc[15]), 3);
        v = _mm512_add_ps(v, sum);
      }
      _mm512_mask_storeu_ps(y + m * ldy + n0, kn, v);
    }
  }
}
}  // namespace k512

// ---------------------------------------------------------------- AVX512-BF16 -----------------
namespace kbf16 {
using k512::mask16;
LMF_TARGET_BF16 inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
template <int NB, int RB>
LMF_TARGET_BF16 void dot_tile(const uint16_t* const* xs, const uint16_t* const* as, int64_t K, float* out) {
  __m512 acc[NB][RB];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = _mm512_loadu_si512(xs[j] + k);
    for (int r = 0; r < RB; ++r) {
      const __m512i av = _mm512_loadu_si512(as[r] + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = dp(acc[j][r], av, xv[j]);
    }
  }
  if (k < K) {
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512i xv[NB];
    for (int j = 0; j < NB; ++j) xv[j] = _mm512_maskz_loadu_epi16(m, xs[j] + k);
    for (int r = 0; r < RB; ++r) {
      const __m512i av = _mm512_maskz_loadu_epi16(m, as[r] + k);
      for (int j = 0; j < NB; ++j) acc[j][r] = dp(acc[j][r], av, xv[j]);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < RB; r += 4)
      _mm_storeu_ps(out + j * RB + r,
                    k512::hsum4(acc[j][r], acc[j][r + 1], acc[j][r + 2], acc[j][r + 3]));
}
LMF_TARGET_BF16 void shrink(const void* const* xs_, int nb, const void* a_, int64_t sAr, int64_t rank,
                            int64_t K, const float* coef, float* const* hs) {
  const uint16_t* const* xs = reinterpret_cast<const uint16_t* const*>(xs_);
  const uint16_t* a = static_cast<const uint16_t*>(a_);
  const uint16_t* xp[4];
  for (int j = 0; j < 4; ++j) xp[j] = xs[j < nb ? j : nb - 1];
  const int RB = nb == 1 ? 8 : 4;
  float out[32];
  for (int64_t r0 = 0; r0 < rank; r0 += RB) {
    const uint16_t* ap[8];
    for (int i = 0; i < RB; ++i) ap[i] = a + std::min<int64_t>(r0 + i, rank - 1) * sAr;
    if (nb == 1) dot_tile<1, 8>(xp, ap, K, out);
    else if (nb == 2) dot_tile<2, 4>(xp, ap, K, out);
    else dot_tile<4, 4>(xp, ap, K, out);
    for (int j = 0; j < nb; ++j)
      for (int i = 0; i < RB && r0 + i < rank; ++i) hs[j][r0 + i] = coef[j] * out[j * RB + i];
  }
}
// h[c0 : c0 + 16] (zero past rank) as bf16 parts hi + lo, each as 16 values.
LMF_TARGET_BF16 inline void split(const float* h, int64_t c0, int64_t rank, __m256i& hi, __m256i& lo) {
  const __m512 hv = _mm512_maskz_loadu_ps(mask16(rank - c0), h + c0);
  hi = (__m256i)_mm512_cvtneps_pbh(hv);
  const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
  lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(hv, hf));
}
// y[n] += b[n, :rank] . h for n < nn (one row): rows n, n + 1 per 512-bit vector of rank pairs.
template <bool kLo>
LMF_TARGET_BF16 void expand_one(const uint16_t* b, int64_t ldb, int64_t nn, int64_t rank,
                                const float* h, float* y) {
  const bool whole = rank == 16 && ldb == 16;  // rows n, n + 1 are one 64-byte load
  for (int64_t c0 = 0; c0 < rank; c0 += 16) {
    const __mmask16 km = mask16(rank - c0);
    __m256i hi, lo;
    split(h, c0, rank, hi, lo);
    const __m512i H = _mm512_broadcast_i64x4(hi), L = _mm512_broadcast_i64x4(lo);
    const uint16_t* bc = b + c0;
    int64_t n = 0;
    if (whole) {
      for (; n + 16 <= nn; n += 16) {
        __m512 acc[8];
        for (int q = 0; q < 8; ++q) {
          const __m512i v = _mm512_loadu_si512(bc + (n + 2 * q) * 16);
          acc[q] = kLo ? dp(dp(_mm512_setzero_ps(), v, H), v, L) : dp(_mm512_setzero_ps(), v, H);
        }
        _mm512_storeu_ps(y + n, _mm512_add_ps(_mm512_loadu_ps(y + n), k512::reduce8(acc)));
      }
    }
    for (; n < nn; n += 16) {
      __m512 acc[8];
      for (int q = 0; q < 8; ++q) {
        const __m512i v = k512::ld_pairs(bc, ldb, n + 2 * q, nn, km);
        acc[q] = kLo ? dp(dp(_mm512_setzero_ps(), v, H), v, L) : dp(_mm512_setzero_ps(), v, H);
      }
      const __mmask16 kn = mask16(nn - n);
      _mm512_mask_storeu_ps(y + n, kn, _mm512_add_ps(_mm512_maskz_loadu_ps(kn, y + n), k512::reduce8(acc)));
    }
  }
}
// Several rows of one adapter: per tile of 16 outputs and 16 ranks, B is transposed once into
// T[p] (lane l = the rank pair p of output n + l) and every row takes 2 * NP dot products with it.
template <int NP, bool kLo>
LMF_TARGET_BF16 void expand_many_chunk(const uint16_t* bc, int64_t ldb, int64_t nn, __mmask16 km,
                                       int64_t nb, const uint32_t* hp, const uint32_t* lp,
                                       float* const* ys) {
  const __m512i lo_idx = _mm512_set_epi32(27, 26, 25, 24, 11, 10, 9, 8, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 23, 22, 21, 20, 7, 6, 5, 4);
  for (int64_t n = 0; n < nn; n += 16) {
    __m512i z[8];  // z[i]: output rows n + i (low half) and n + 8 + i (high half), 8 pairs each
    for (int i = 0; i < 8; ++i) {
      const int64_t r0 = n + i, r1 = n + 8 + i;
      const __m256i a = r0 < nn ? _mm256_maskz_loadu_epi16(km, bc + r0 * ldb) : _mm256_setzero_si256();
      const __m256i c = r1 < nn ? _mm256_maskz_loadu_epi16(km, bc + r1 * ldb) : _mm256_setzero_si256();
      z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(a), c, 1);
    }
    // 8 x 8 dword transposes in both halves at once
    __m512i t[8], u[8], T[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
    }
    for (int g = 0; g < 2; ++g) {  // rows 4g .. 4g + 3 of each half
      u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g + 0], t[4 * g + 2]);  // pair 0 | pair 4
      u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g + 0], t[4 * g + 2]);  // pair 1 | pair 5
      u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);  // pair 2 | pair 6
      u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);  // pair 3 | pair 7
    }
    for (int k = 0; k < 4; ++k) {
      T[k] = _mm512_permutex2var_epi32(u[k], lo_idx, u[k + 4]);
      T[k + 4] = _mm512_permutex2var_epi32(u[k], hi_idx, u[k + 4]);
    }
    const __mmask16 kn = mask16(nn - n);
    for (int64_t j = 0; j < nb; ++j) {
      __m512 acc = _mm512_setzero_ps();
      for (int p = 0; p < NP; ++p) {
        acc = dp(acc, T[p], _mm512_set1_epi32(static_cast<int>(hp[j * 8 + p])));
        if constexpr (kLo) acc = dp(acc, T[p], _mm512_set1_epi32(static_cast<int>(lp[j * 8 + p])));
      }
      float* y = ys[j] + n;
      _mm512_mask_storeu_ps(y, kn, _mm512_add_ps(_mm512_maskz_loadu_ps(kn, y), acc));
    }
  }
}
template <bool kLo>
LMF_TARGET_BF16 void expand_t(const void* b_, int64_t ldb, int64_t nn, int64_t rank, int64_t nb,
                              const float* const* hs, float* const* ys) {
  const uint16_t* b = static_cast<const uint16_t*>(b_);
  if (nb == 1) return expand_one<kLo>(b, ldb, nn, rank, hs[0], ys[0]);
  alignas(64) uint32_t hp[8 * 8], lp[8 * 8];  // per row: 8 rank pairs of the chunk (hi / lo)
  for (int64_t j0 = 0; j0 < nb; j0 += 8) {
    const int64_t jn = std::min<int64_t>(8, nb - j0);
    for (int64_t c0 = 0; c0 < rank; c0 += 16) {
      for (int64_t j = 0; j < jn; ++j) {
        __m256i hi, lo;
        split(hs[j0 + j], c0, rank, hi, lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(hp + j * 8), hi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(lp + j * 8), lo);
      }
      const __mmask16 km = mask16(rank - c0);
      if (rank - c0 <= 8) expand_many_chunk<4, kLo>(b + c0, ldb, nn, km, jn, hp, lp, ys + j0);
      else expand_many_chunk<8, kLo>(b + c0, ldb, nn, km, jn, hp, lp, ys + j0);
    }
  }
}
// y += B h with h as bf16 hi + lo (exact to ~2^-16 of h: the one-rounding paths), or hi only
LMF_TARGET_BF16 void expand(const void* b, int64_t ldb, int64_t nn, int64_t rank, int64_t nb,
            const float* const* hs, float* const* ys) {
  expand_t<true>(b, ldb, nn, rank, nb, hs, ys);
}
LMF_TARGET_BF16 void expand_hi(const void* b, int64_t ldb, int64_t nn, int64_t rank, int64_t nb,
               const float* const* hs, float* const* ys) {
  expand_t<false>(b, ldb, nn, rank, nb, hs, ys);
}
LMF_TARGET_BF16 void round_row(const float* src, const void* bias_, void* dst_, int64_t nn) {
  const uint16_t* bias = static_cast<const uint16_t*>(bias_);
  uint16_t* dst = static_cast<uint16_t*>(dst_);
  for (int64_t n = 0; n < nn; n += 16) {
    const __mmask16 k = mask16(nn - n);
    __m512 v = _mm512_maskz_loadu_ps(k, src + n);
    if (bias)
      v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, bias + n)), 16)));
    _mm256_mask_storeu_epi16(dst + n, k, (__m256i)_mm512_cvtneps_pbh(v));
  }
}
// Small M (decode), AVX512-BF16: the base GEMM itself, fused. Per panel of 16 output columns:
// P[m, :] = x[m] @ W[n0:n0+16].T for every row (4 x 4 tiles of vdpbf16ps over K: the 4 rows of W
// stay in L1 while the rows of x stream from L2), then per row P[m] + bias + the row's adapter
// expand (one tile of expand_one per slot, h as bf16 hi + lo), rounded once and stored. W is read
// exactly once, y written once, nothing of size M x N in fp32.
// hl[p]: the hi / lo parts of pair p's scaled shrink output, R16 values each (zero past rank).
struct SmallPair { const uint16_t* b; int64_t rank; const uint16_t* hl; };
LMF_TARGET_BF16 void small_panel(const uint16_t* x, int64_t sx, int64_t M, const uint16_t* W,
                                 int64_t sW, int64_t n0, int64_t nn, int64_t K, const uint16_t* bias,
                                 const SmallPair* pairs, const int64_t* pbeg, int64_t ldb, int64_t R16,
                                 float* P, uint16_t* y, int64_t ldy) {
  // P [M][16]: base products of this panel
  for (int64_t c0 = 0; c0 < nn; c0 += 4) {
    const uint16_t* wp[8];
    for (int i = 0; i < 4; ++i) wp[i] = W + (n0 + std::min<int64_t>(c0 + i, nn - 1)) * sW;
    float out[16];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m0);
      const uint16_t* xp[4];
      for (int j = 0; j < 4; ++j) xp[j] = x + (m0 + std::min<int64_t>(j, mb - 1)) * sx;
      if (mb == 1) dot_tile<1, 4>(xp, wp, K, out);
      else if (mb == 2) dot_tile<2, 4>(xp, wp, K, out);
      else dot_tile<4, 4>(xp, wp, K, out);
      for (int64_t j = 0; j < mb; ++j)
        for (int i = 0; i < 4; ++i) P[(m0 + j) * 16 + c0 + i] = out[j * 4 + i];
    }
  }
  const __mmask16 kn = mask16(nn);
  const __m512 bv = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(kn, bias + n0)), 16))
                         : _mm512_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(kn, P + m * 16), bv);
    for (int64_t q = pbeg[m]; q < pbeg[m + 1]; ++q) {
      const SmallPair& sp = pairs[q];
      const uint16_t* bc0 = sp.b + n0 * ldb;
      for (int64_t c0 = 0; c0 < sp.rank; c0 += 16) {
        const __mmask16 km = mask16(sp.rank - c0);
        const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp.hl + c0)));
        const __m512i L = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp.hl + R16 + c0)));
        __m512 acc[8];
        if (nn == 16 && ldb == 16 && sp.rank == 16) {
          for (int i = 0; i < 8; ++i) {
            const __m512i bq = _mm512_loadu_si512(bc0 + 2 * i * 16);
            acc[i] = dp(dp(_mm512_setzero_ps(), bq, H), bq, L);
          }
        } else {
          for (int i = 0; i < 8; ++i) {
            const __m512i bq = k512::ld_pairs(bc0 + c0, ldb, 2 * i, nn, km);
            acc[i] = dp(dp(_mm512_setzero_ps(), bq, H), bq, L);
          }
        }
        v = _mm512_add_ps(v, k512::reduce8(acc));
      }
    }
    _mm256_mask_storeu_epi16(y + m * ldy + n0, kn, (__m256i)_mm512_cvtneps_pbh(v));
  }
}
// h (fp32, rank values) -> hl [2 * R16] bf16: hi then lo (zero past rank)
LMF_TARGET_BF16 void split_row(const float* h, int64_t rank, int64_t R16, uint16_t* hl) {
  for (int64_t c0 = 0; c0 < R16; c0 += 16) {
    __m256i hi, lo;
    split(h, c0, rank, hi, lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hl + c0), hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hl + R16 + c0), lo);
  }
}
}  // namespace kbf16
#endif  // LMF_X86

template <typename T>
Kern16 kernels16(CpuIsa isa) {
#ifdef LMF_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (isa >= CpuIsa::kAvx512Bf16)
      return {kbf16::shrink, kbf16::expand, kbf16::round_row, kbf16::expand_hi};
  }
  if (isa >= CpuIsa::kAvx512) return {k512::shrink<T>, k512::expand<T>, k512::round_row<T>};
  if (isa >= CpuIsa::kAvx2) return {k2::shrink<T>, k2::expand<T>, k2::round_row<T>};
#endif
  return {gen::shrink<T>, gen::expand<T>, gen::round_row<T>};
}

// ---------------------------------------------------------------- base GEMM with fp32 output ---
using Gemm16 = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*,
                        int, float, float*, int);
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
#if defined(LMF_X86) && defined(__linux__)
}  // namespace
}  // namespace loramix
extern "C" {
// MKL's mixed-precision GEMMs (row-major C = alpha op(A) op(B) + beta C, 16-bit inputs, fp32 C, LP64
// ints), exported by libtorch_cpu where torch links MKL (the x86 wheels); weak: null where not.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}
namespace loramix {
namespace {
const Gemm16 kMklBf16 = cblas_gemm_bf16bf16f32, kMklF16 = cblas_gemm_f16f16f32;
#else
const Gemm16 kMklBf16 = nullptr, kMklF16 = nullptr;
#endif

// The base GEMM of the 16-bit paths past the fused small-M kernel, for an [M, K] x [K, N] product:
// MKL's T x T -> fp32 GEMM (one rounding of base + bias + delta), or null: torch's GEMM in T, then
// the delta in place (aten16, two roundings, within the 2x rule). Defaults, measured:
//   fp16 -> torch (MKL's fp16 GEMM measured 2.5-4x slower than torch's fp16 F.linear at M <= 16 on
//     a Xeon with AVX512-FP16, which oneDNN uses);
//   bf16 -> MKL, except on AMX for large products (M >= 2048, or M >= 256 with N >= 1024): there
//     torch's bf16 GEMM (oneDNN on the tiles) made the op 1.1-1.45x faster than MKL's column-chunked
//     GEMM (2-core Xeon with AMX-BF16; d = 576-4096, M = 256-2048), while at M = 7-255, or N < 1024
//     below M = 2048 (SmolLM2's 576-wide layers at prefill), MKL ran level with it or faster.
// LORAMIX_CPP_GEMM16=mkl|aten (read per call) forces either.
template <typename T>
Gemm16 gemm16(CpuIsa isa, int64_t M = 0, int64_t N = 0) {
  constexpr bool bf16 = std::is_same_v<T, c10::BFloat16>;
  const Gemm16 mkl = bf16 ? kMklBf16 : kMklF16;
  const char* s = std::getenv("LORAMIX_CPP_GEMM16");
  if (s && *s) {
    TORCH_CHECK_VALUE(std::strcmp(s, "mkl") == 0 || std::strcmp(s, "aten") == 0,
                      "LORAMIX_CPP_GEMM16 must be 'mkl' or 'aten', got '", s, "'");
    return std::strcmp(s, "aten") == 0 ? nullptr : mkl;
  }
  if (!bf16) return nullptr;
  const bool large = M >= 2048 || (M >= 256 && N >= 1024);
  return isa == CpuIsa::kAmx && large ? nullptr : mkl;
}

// A logical [rows, cols] matrix t as a row-major GEMM operand: (data, transposed?, leading dim).
struct Operand {
  at::Tensor keep;
  const uint16_t* p;
  int trans;
  int64_t ld;
};
Operand operand(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if ((cols <= 1 || t.stride(1) == 1) && (rows <= 1 || t.stride(0) >= std::max<int64_t>(1, cols)))
    return {at::Tensor(), static_cast<const uint16_t*>(t.data_ptr()), kCblasNoTrans,
            rows <= 1 ? std::max<int64_t>(1, cols) : t.stride(0)};
  if ((rows <= 1 || t.stride(0) == 1) && (cols <= 1 || t.stride(1) >= std::max<int64_t>(1, rows)))
    return {at::Tensor(), static_cast<const uint16_t*>(t.data_ptr()), kCblasTrans,
            cols <= 1 ? std::max<int64_t>(1, rows) : t.stride(1)};
  at::Tensor c = t.contiguous();
  return {c, static_cast<const uint16_t*>(c.data_ptr()), kCblasNoTrans, std::max<int64_t>(1, cols)};
}

bool fits_int(std::initializer_list<int64_t> v) {
  for (int64_t i : v)
    if (i > std::numeric_limits<int>::max()) return false;
  return true;
}

// Large groups' shrink as one MKL GEMM each: hc[p, :rank] = c[p] * (x[rows] @ A[e, :rank].T).
template <typename T>
void shrink_large16(const Plan<float>& pl, const at::Tensor& x, const at::Tensor& A, Gemm16 g,
                    float* hc, int64_t R) {
  const int64_t K = x.size(1), sx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  for (int64_t grp : pl.large) {
    const int64_t p0 = pl.gbeg[grp], n = pl.gbeg[grp + 1] - p0, rank = pl.grank[grp];
    at::Tensor xg = at::empty({n, K}, x.options());  // the group's rows, gathered (T)
    T* xgp = xg.data_ptr<T>();
    at::parallel_for(0, n, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, K)),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i)
                         std::memcpy(xgp + i * K, xp + pl.row[p0 + i] * sx, K * sizeof(T));
                     });
    at::Tensor h = at::empty({n, rank}, x.options().dtype(at::kFloat));
    const T* Ae = A.data_ptr<T>() + pl.gexp[grp] * A.stride(0);
    g(kCblasRowMajor, kCblasNoTrans, kCblasTrans, static_cast<int>(n), static_cast<int>(rank),
      static_cast<int>(K), 1.f, reinterpret_cast<const uint16_t*>(xgp), static_cast<int>(K),
      reinterpret_cast<const uint16_t*>(Ae), static_cast<int>(A.stride(1)), 0.f,
      h.data_ptr<float>(), static_cast<int>(rank));
    const float* hp = h.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < rank; ++r) hc[(p0 + i) * R + r] = pl.coef[p0 + i] * hp[i * rank + r];
  }
}

// Every pair's expand over output columns [n0, n0 + nn): out(row[p])[n] += B[e, n0 + n, :rank] .
// hc[p] (out(m): the fp32 row that row m accumulates in, at column n0; hs / ys: the calling
// thread's pointer scratch). The column loops of expand_round16, gemm_chunked16 and aten16.
template <typename Out>
void expand_pairs16(const Plan<float>& pl, ExpandFn ex, const char* Bc, int64_t esz, int64_t sBe,
                    int64_t sBn, int64_t n0, int64_t nn, const float* hc, int64_t R, Out out,
                    std::vector<const float*>& hs, std::vector<float*>& ys) {
  auto run = [&](int64_t p0, int64_t np, int64_t g) {
    hs.resize(np);
    ys.resize(np);
    for (int64_t j = 0; j < np; ++j) {
      hs[j] = hc + (p0 + j) * R;
      ys[j] = out(pl.row[p0 + j]);
    }
    ex(Bc + (pl.gexp[g] * sBe + n0 * sBn) * esz, sBn, nn, pl.grank[g], np, hs.data(), ys.data());
  };
  for (const auto& blk : pl.blocks) run(blk.p0, blk.nb, blk.g);
  for (int64_t g : pl.large) run(pl.gbeg[g], pl.gbeg[g + 1] - pl.gbeg[g], g);
}

// Multiply-adds per output column of every pair's expand (sum of the pairs' ranks).
int64_t expand_work_per_col(const Plan<float>& pl) {
  int64_t w = 0;
  for (const auto& blk : pl.blocks) w += blk.nb * pl.grank[blk.g];
  for (int64_t g : pl.large) w += (pl.gbeg[g + 1] - pl.gbeg[g]) * pl.grank[g];
  return w;
}

// Width of the column chunks a 16-bit path's one parallel region runs over: >= 2 per thread,
// 64..256 wide (a [rows, cw] fp32 block stays in L2).
int64_t chunk_cols16(int64_t N) {
  const int64_t nt = std::max(1, at::get_num_threads());
  return std::clamp<int64_t>((N / (2 * nt) + 15) / 16 * 16, 64, 256);
}

// Phase 2 of the two-phase path: C[row[p], :] += B[e] @ hc[p] for every pair (parallel over N
// ranges: a row's slots are summed by one thread), then y = round(C + bias), row by row.
void expand_round16(const Plan<float>& pl, const Kern16& kn, const void* Bp, int64_t esz,
                    int64_t sBe, int64_t sBn, const float* hc, int64_t R, float* C, int64_t M,
                    int64_t N, const void* bias, void* y) {
  const int64_t work_per_n = M + expand_work_per_col(pl);  // rounding + expand
  const int64_t grain = std::max<int64_t>(64, kMinWorkPerThread / std::max<int64_t>(1, work_per_n));
  const char* Bc = static_cast<const char*>(Bp);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const int64_t nn = n1 - n0;
    std::vector<const float*> hs;
    std::vector<float*> ys;
    expand_pairs16(pl, kn.expand, Bc, esz, sBe, sBn, n0, nn, hc, R,
                   [&](int64_t m) { return C + m * N + n0; }, hs, ys);
    for (int64_t m = 0; m < M; ++m)
      kn.round(C + m * N + n0, bias ? static_cast<const char*>(bias) + n0 * esz : nullptr,
               static_cast<char*>(y) + (m * N + n0) * esz, nn);
  });
}

// Rows up to which bf16 runs the fused small-M kernel (kbf16::small_panel) instead of MKL + the
// delta kernels. AVX512-BF16 without tiles: 64 (measured on a 2-core Xeon with AVX512-BF16, d =
// 2048: the fused kernel 0.5-0.8x of torch's bf16 F.linear up to M = 16, level with it at 32-64,
// while MKL's fp32-output GEMM costs 1.2-1.35x there; they meet near M = 96). AMX: 5 (measured on
// a 2-core Xeon with AMX-BF16, SmolLM2's 576 x 576 ... 1536 x 576 and 2048 x 2048 ... 4096 x 4096,
// bench/bench_gemm16_paths.py: the fused kernel is 0.65-0.8x of MKL's tile GEMM at M = 3-5, level
// or slower at M = 6, and 1.3-2.2x at M = 8-16, where MKL runs level with torch's bf16 F.linear;
// the earlier guess of 16 made a 16-row decode step's base GEMM 1.6-2.4x torch's).
// LORAMIX_CPP_SMALL_M overrides (per call).
int64_t small_m_rows(CpuIsa isa) {
  const char* s = std::getenv("LORAMIX_CPP_SMALL_M");
  if (s && *s) return std::atoll(s);
  return isa == CpuIsa::kAmx ? 5 : 64;
}

// The shrink of every small-path block: hc[p, :rank] = c[p] * A[e, :rank] @ x[row[p]] (parallel over
// blocks, min_work multiply-adds per thread at least, on one thread below serial_below; large
// groups are shrunk by the caller).
void shrink_blocks16(const Plan<float>& pl, const Kern16& kn, const char* xp, int64_t sx,
                     const char* Ap, int64_t sAe, int64_t sAr, int64_t K, int64_t esz, float* hc,
                     int64_t R, int64_t min_work = kMinWorkPerThread, int64_t serial_below = 0) {
  const auto& bl = pl.blocks;
  if (bl.empty()) return;
  int64_t work = 0;
  for (const auto& blk : bl) work += blk.nb * pl.grank[blk.g] * K;
  const int64_t nblk = static_cast<int64_t>(bl.size());
  const int64_t grain = work < serial_below
                            ? nblk
                            : std::max<int64_t>(1, min_work * nblk / std::max<int64_t>(1, work));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto& blk = bl[b];
      const int64_t e = pl.gexp[blk.g], rank = pl.grank[blk.g];
      for (int64_t j0 = 0; j0 < blk.nb; j0 += 4) {
        const void* xs[4];
        float* hs[4];
        const int nbj = static_cast<int>(std::min<int64_t>(4, blk.nb - j0));
        for (int j = 0; j < nbj; ++j) {
          xs[j] = xp + pl.row[blk.p0 + j0 + j] * sx * esz;
          hs[j] = hc + (blk.p0 + j0 + j) * R;
        }
        kn.shrink(xs, nbj, Ap + e * sAe * esz, sAr, rank, K, pl.coef.data() + blk.p0 + j0, hs);
      }
    }
  });
}

// The small paths' pairs by row: pbeg [M + 1] (zeroed, M + 1 long) becomes the row offsets, and
// put(q, p, g) is called for every pair p (of group g) with its place q in row order (a row's
// pairs in group order).
template <typename F>
void pairs_by_row(const Plan<float>& pl, std::vector<int64_t>& pbeg, F&& put) {
  const int64_t M = static_cast<int64_t>(pbeg.size()) - 1;
  for (int64_t p = 0; p < pl.P; ++p) ++pbeg[pl.row[p] + 1];
  for (int64_t m = 0; m < M; ++m) pbeg[m + 1] += pbeg[m];
  std::vector<int64_t> pos(pbeg.begin(), pbeg.end() - 1);
  for (size_t g = 0; g + 1 < pl.gbeg.size(); ++g)
    for (int64_t p = pl.gbeg[g]; p < pl.gbeg[g + 1]; ++p) put(pos[pl.row[p]]++, p, g);
}

#ifdef LMF_X86
// bf16, M <= small_m_rows(), W with unit last stride: shrink of every pair (parallel over blocks),
// then one pass over W in panels of 16 output columns (parallel over panels), each panel's base
// products, bias and adapter expand rounded once.
at::Tensor small16(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A,
                   const at::Tensor& B, const Meta& mt, const std::optional<at::Tensor>& bias_,
                   const Kern16& kn) {
  using T = c10::BFloat16;
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), E = A.size(0), R = A.size(1);
  const int64_t R16 = (std::max<int64_t>(R, 1) + 15) / 16 * 16;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor bias_t = contiguous_bias(bias_);
  const Plan<float> pl = plan_per_row(mt, E, R, kBlock16);
  const T* xp = x.data_ptr<T>();
  const T* Ap = A.data_ptr<T>();
  const int64_t sx = x.stride(0), sAe = A.stride(0), sAr = A.stride(1);
  std::vector<uint16_t> hl(static_cast<size_t>(pl.P) * 2 * R16);
  std::vector<int64_t> pbeg(M + 1, 0);
  std::vector<kbf16::SmallPair> pairs(pl.P);
  if (pl.P > 0) {
    // a decode step's shrink (16 rows x 16 ranks x 2048: 0.5 M multiply-adds, ~15 us) stays on one
    // core: the panels are this op's only parallel region (a region boundary costs a scheduler
    // slice when the machine is oversubscribed)
    at::Tensor hc_t = at::empty({pl.P, R}, x.options().dtype(at::kFloat));
    float* hc = hc_t.data_ptr<float>();
    shrink_blocks16(pl, kn, reinterpret_cast<const char*>(xp), sx,
                    reinterpret_cast<const char*>(Ap), sAe, sAr, K, sizeof(T), hc, R,
                    kMinWorkPerThread, 8 * kMinWorkPerThread);
    for (size_t g = 0; g + 1 < pl.gbeg.size(); ++g)
      for (int64_t p = pl.gbeg[g]; p < pl.gbeg[g + 1]; ++p)
        kbf16::split_row(hc + p * R, pl.grank[g], R16, hl.data() + p * 2 * R16);
    const uint16_t* Bp = reinterpret_cast<const uint16_t*>(B.data_ptr<T>());
    pairs_by_row(pl, pbeg, [&](int64_t q, int64_t p, size_t g) {
      pairs[q] = {Bp + pl.gexp[g] * B.stride(0), pl.grank[g],
                 hl.data() + p * 2 * R16};
    });
  }
  const int64_t npanel = (N + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * 16 * K));
  const uint16_t* Wp = reinterpret_cast<const uint16_t*>(W.data_ptr<T>());
  const uint16_t* bp = bias_t.defined() ? reinterpret_cast<const uint16_t*>(bias_t.data_ptr<T>()) : nullptr;
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<T>());
  at::parallel_for(0, npanel, grain, [&](int64_t q0, int64_t q1) {
    std::vector<float> P(M * 16);
    for (int64_t q = q0; q < q1; ++q)
      kbf16::small_panel(reinterpret_cast<const uint16_t*>(xp), sx, M, Wp, W.stride(0), q * 16,
                         std::min<int64_t>(16, N - q * 16), K, bp, pairs.data(), pbeg.data(),
                         B.stride(1), R16, P.data(), yp, N);
  });
  return y;
}

// Rows up to which fp32 runs the fused small-M kernel (small32) instead of torch's GEMM + the delta:
// 24. Measured on a 2-core Xeon with AVX-512 (bench/bench_gemm32_paths.py, weights streamed from
// memory, SmolLM2's 576 x 576 ... 49152 x 576 and 2048 x 2048 / 5632 x 2048): with one row in 7
// carrying an adapter the kernel takes 0.4-0.9x of torch's GEMM + the delta at M = 1-16 and
// 0.6-0.94x at M = 24; at M = 32 it loses on 2048 x 2048 (1.07x), from M = 48 on most shapes.
// LORAMIX_CPP_SMALL_M32 overrides (per call).
int64_t small_m_rows32() {
  const char* s = std::getenv("LORAMIX_CPP_SMALL_M32");
  if (s && *s) return std::atoll(s);
  return 24;
}

// Whether some (row, slot) of idx names an adapter of rank > 0.
bool has_pair(const Meta& mt, int64_t E, int64_t R) {
  if (E == 0 || R == 0) return false;
  const int64_t n = mt.idx.numel();
  const int64_t* id = mt.idx.data_ptr<int64_t>();
  const int64_t* rk = mt.rank.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (id[i] >= 0 && rk[id[i]] > 0) return true;
  return false;
}

bool small32_base() {
  const char* s = std::getenv("LORAMIX_CPP_SMALL32_BASE");
  return s && *s && std::atoll(s) != 0;
}

// fp32, M <= small_m_rows32(), AVX-512, W with unit last stride: the shrink of every pair
// (shrink_small, both cores), then ONE parallel region over panels of 16
// output columns, each panel's base products, bias and every pair's expand summed in registers and
// stored once (k512::small_panel32). Torch's fp32 GEMM at M = 16 streams a decode step's weights at
// 3-6 GB/s on a 2-core Xeon; this reads them at 8-16 GB/s (bench/bench_gemm32_paths.py), and no pass
// over y is added for the delta. Rows without an adapter equal F.linear to fp32 rounding, not bit
// for bit (another summation order).
at::Tensor small32(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A,
                   const at::Tensor& B, const Meta& mt, const std::optional<at::Tensor>& bias_) {
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), E = A.size(0), R = A.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor bias_t = contiguous_bias(bias_);
  const Plan<float> pl = plan_per_row(mt, E, R, kBlock);
  const float* xp = x.data_ptr<float>();
  const int64_t sx = x.stride(0);
  at::Tensor hc_t = at::empty({pl.P, std::max<int64_t>(R, 1)}, x.options());
  float* hc = hc_t.data_ptr<float>();
  std::vector<int64_t> pbeg(M + 1, 0);
  std::vector<k512::SmallPair32> pairs(pl.P);
  if (pl.P > 0) {
    // memory-bound (a decode step's pairs read their A rows once each): both cores from 16 K
    // multiply-adds on
    shrink_small<float, float>(pl, xp, sx, A.data_ptr<float>(), A.stride(0), A.stride(1), K, hc, R,
                               kMinMemWorkPerThread);
    const float* Bp = B.data_ptr<float>();
    pairs_by_row(pl, pbeg, [&](int64_t q, int64_t p, size_t g) {
      pairs[q] = {Bp + pl.gexp[g] * B.stride(0), pl.grank[g], hc + p * R};
    });
  }
  const int64_t npanel = (N + 15) / 16;
  // a thread per kMinWorkPerThread multiply-adds or kMinMemWorkPerThread weights, whichever comes
  // first: a one-row step is memory-bound, both cores' bandwidth is worth the fork
  const int64_t grain = std::max<int64_t>(
      1, std::min(kMinWorkPerThread / std::max<int64_t>(1, M * 16 * K),
                  kMinMemWorkPerThread / std::max<int64_t>(1, 16 * K)));
  const float* Wp = W.data_ptr<float>();
  const float* bp = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, npanel, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      k512::small_panel32(xp, sx, M, Wp, W.stride(0), q * 16, std::min<int64_t>(16, N - q * 16), N,
                          K, bp, pairs.data(), pbeg.data(), B.stride(1), yp, N);
  });
  return y;
}
#endif

// M > small_m_rows with MKL: the shrink of every pair into hc (parallel over blocks; large
// groups as MKL GEMMs), then ONE parallel region over chunks of output columns, each chunk: MKL's
// GEMM on its columns (single-threaded inside the region, into a thread-local [M, cw] fp32 block
// that stays in L2), every pair's expand into it, and the rounding into y. Measured on 2 cores:
// MKL's own threading runs the d = 2048, M = 256 GEMM 1.2-1.3x slower than torch's bf16
// F.linear, one thread per column chunk does not.
template <typename T>
at::Tensor gemm_chunked16(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A,
                          const at::Tensor& B, const Meta& mt,
                          const std::optional<at::Tensor>& bias_, const Kern16& kn, CpuIsa isa,
                          Gemm16 g) {
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), E = A.size(0), R = A.size(1);
  const int64_t S = mt.idx.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const at::Tensor bias_t = contiguous_bias(bias_);
  const char* bias = bias_t.defined() ? static_cast<const char*>(bias_t.data_ptr()) : nullptr;
  const int64_t big = large_group_rows(isa == CpuIsa::kAmx ? int64_t{256}
                                                           : std::numeric_limits<int64_t>::max());
  Plan<float> pl;
  if (E > 0 && R > 0 && S > 0) pl = make_plan<float>(mt.idx, mt.w, mt.scale, mt.rank, E, kBlock16, big);
  const T* xp = x.data_ptr<T>();
  const T* Ap = A.data_ptr<T>();
  const int64_t sx = x.stride(0), sAe = A.stride(0), sAr = A.stride(1);
  at::Tensor hc_t = at::empty({pl.P, std::max<int64_t>(R, 1)}, x.options().dtype(at::kFloat));
  float* hc = hc_t.data_ptr<float>();
  shrink_blocks16(pl, kn, reinterpret_cast<const char*>(xp), sx, reinterpret_cast<const char*>(Ap),
                  sAe, sAr, K, sizeof(T), hc, R);
  if (!pl.large.empty()) shrink_large16<T>(pl, x, A, g, hc, R);
  const int64_t cw = chunk_cols16(N);
  const int64_t nchunk = (N + cw - 1) / cw;
  const Operand a = operand(x), b = operand(W.t());  // b: logical [K, N]
  const char* Bc = reinterpret_cast<const char*>(B.data_ptr<T>());
  const int64_t sBe = B.stride(0), sBn = B.stride(1), esz = sizeof(T);
  char* yp = reinterpret_cast<char*>(y.data_ptr<T>());
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, M * cw * K));
  at::parallel_for(0, nchunk, grain, [&](int64_t c0, int64_t c1) {
    std::vector<float> Cb(M * cw);  // this chunk's fp32 block [M, cw]
    std::vector<const float*> hs;
    std::vector<float*> ys;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * cw, nn = std::min(cw, N - n0);
      const uint16_t* bp = b.p + (b.trans == kCblasNoTrans ? n0 : n0 * b.ld);
      if (K == 0) std::fill(Cb.begin(), Cb.end(), 0.f);
      else
        g(kCblasRowMajor, a.trans, b.trans, static_cast<int>(M), static_cast<int>(nn),
          static_cast<int>(K), 1.f, a.p, static_cast<int>(a.ld), bp, static_cast<int>(b.ld), 0.f,
          Cb.data(), static_cast<int>(cw));
      expand_pairs16(pl, kn.expand, Bc, esz, sBe, sBn, n0, nn, hc, R,
                     [&](int64_t m) { return Cb.data() + m * cw; }, hs, ys);
      for (int64_t m = 0; m < M; ++m)
        kn.round(Cb.data() + m * cw, bias ? bias + n0 * esz : nullptr, yp + (m * N + n0) * esz, nn);
    }
  });
  return y;
}

// torch's 16-bit GEMM for the base (oneDNN: the AMX tiles where the CPU has them), y = round(x @ W.T
// + bias) as F.linear gives it, then the delta of the rows that have an adapter added in place:
// y[m] = round(float(y[m]) + delta[m]) (two roundings; rows without an adapter are torch's output,
// bit for bit). The shrink as everywhere (blocks; large groups as MKL GEMMs where MKL has the bf16
// GEMM), then ONE parallel region over chunks of output columns: each widens its columns of the
// adapted rows into a thread-local fp32 block [rows, cw] (it stays in L2), adds every pair's expand
// and rounds back. Nothing of size M x N besides y; W is read once, by torch.
template <typename T>
at::Tensor aten16(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A, const at::Tensor& B,
                  const Meta& mt, const std::optional<at::Tensor>& bias_, const Kern16& kn,
                  CpuIsa isa) {
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), E = A.size(0), R = A.size(1);
  const int64_t S = mt.idx.size(1);
  at::Tensor y = bias_.has_value() && bias_->defined() ? at::addmm(*bias_, x, W.t())
                                                       : at::mm(x, W.t());
  if (!y.is_contiguous()) y = y.contiguous();
  if (M == 0 || N == 0 || E == 0 || R == 0 || S == 0 || K == 0) return y;
  const Gemm16 g = std::is_same_v<T, c10::BFloat16> && fits_int({M, K, A.stride(1)}) ? kMklBf16
                                                                                      : nullptr;
  // large groups need MKL's GEMM for their shrink: without it every group takes the block path
  const int64_t big = g == nullptr ? std::numeric_limits<int64_t>::max()
                                   : large_group_rows(isa == CpuIsa::kAmx
                                                          ? int64_t{256}
                                                          : std::numeric_limits<int64_t>::max());
  const Plan<float> pl = make_plan<float>(mt.idx, mt.w, mt.scale, mt.rank, E, kBlock16, big);
  if (pl.P == 0) return y;
  at::Tensor hc_t = at::empty({pl.P, R}, x.options().dtype(at::kFloat));
  float* hc = hc_t.data_ptr<float>();
  const int64_t esz = sizeof(T);
  shrink_blocks16(pl, kn, static_cast<const char*>(x.data_ptr()), x.stride(0),
                  static_cast<const char*>(A.data_ptr()), A.stride(0), A.stride(1), K, esz, hc, R,
                  kMinMemWorkPerThread);
  if (!pl.large.empty()) shrink_large16<T>(pl, x, A, g, hc, R);
  // the adapted rows, compacted: slot[m] = row m's place in the fp32 blocks
  std::vector<int64_t> rows, slot(M, -1);
  for (int64_t p = 0; p < pl.P; ++p)
    if (slot[pl.row[p]] < 0) {
      slot[pl.row[p]] = static_cast<int64_t>(rows.size());
      rows.push_back(pl.row[p]);
    }
  const int64_t Mr = static_cast<int64_t>(rows.size());
  const int64_t cw = chunk_cols16(N);
  const int64_t nchunk = (N + cw - 1) / cw;
  const int64_t work_per_col = 2 * Mr + expand_work_per_col(pl);  // widen + round + expand
  const int64_t grain =
      std::max<int64_t>(1, kMinMemWorkPerThread / std::max<int64_t>(1, work_per_col * cw));
  const char* Bc = static_cast<const char*>(B.data_ptr());
  const int64_t sBe = B.stride(0), sBn = B.stride(1);
  T* yp = y.data_ptr<T>();
  const ExpandFn ex = kn.expand_hi != nullptr ? kn.expand_hi : kn.expand;
  at::parallel_for(0, nchunk, grain, [&](int64_t c0, int64_t c1) {
    std::vector<float> Cb(Mr * cw);
    std::vector<const float*> hs;
    std::vector<float*> ys;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * cw, nn = std::min(cw, N - n0);
      for (int64_t i = 0; i < Mr; ++i) {
        const T* src = yp + rows[i] * N + n0;
        float* dst = Cb.data() + i * cw;
        for (int64_t n = 0; n < nn; ++n) dst[n] = static_cast<float>(src[n]);
      }
      expand_pairs16(pl, ex, Bc, esz, sBe, sBn, n0, nn, hc, R,
                     [&](int64_t m) { return Cb.data() + slot[m] * cw; }, hs, ys);
      for (int64_t i = 0; i < Mr; ++i)
        kn.round(Cb.data() + i * cw, nullptr, yp + rows[i] * N + n0, nn);
    }
  });
  return y;
}

// y [M, N] in T = x @ W.T + bias + delta (see the section header): the fused small-M kernel (bf16,
// M <= small_m_rows), MKL's fp32-output GEMM + the delta (one rounding), or torch's 16-bit GEMM +
// the delta in place (aten16: two roundings), as gemm16<T>(isa) picks.
template <typename T>
at::Tensor linear16(const at::Tensor& x, const at::Tensor& W, const at::Tensor& A,
                    const at::Tensor& B, const Meta& mt, const std::optional<at::Tensor>& bias_) {
  const CpuIsa isa = cpu_isa();
  const Kern16 kn = kernels16<T>(isa);
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0);
#ifdef LMF_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (isa >= CpuIsa::kAvx512Bf16 && M <= small_m_rows(isa) && (K <= 1 || W.stride(1) == 1))
      return small16(x, W, A, B, mt, bias_, kn);
  }
#endif
  const Gemm16 g = gemm16<T>(isa, M, N);
  if (g != nullptr && fits_int({M, N, K}) && fits_int({x.stride(0), x.stride(1), W.stride(0),
                                                        W.stride(1)}))
    return gemm_chunked16<T>(x, W, A, B, mt, bias_, kn, isa, g);
  return aten16<T>(x, W, A, B, mt, bias_, kn, isa);
}

// multi_lora_expand on 16-bit y and B: out = round(float(y) + delta), one rounding.
template <typename T>
at::Tensor expand16(const at::Tensor& y, const at::Tensor& h, const at::Tensor& B, const Meta& mt) {
  const Kern16 kn = kernels16<T>(cpu_isa());
  const int64_t M = y.size(0), N = y.size(1), E = B.size(0), R = B.size(2);
  at::Tensor C = y.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, y.options().memory_format(at::MemoryFormat::Contiguous));
  const Plan<float> pl = M > 0 && N > 0 ? plan_per_row(mt, E, R, kBlock16) : Plan<float>();
  at::Tensor hc_t = at::empty({pl.P, std::max<int64_t>(R, 1)}, C.options());
  float* hcp = hc_t.data_ptr<float>();
  if (pl.P > 0) {
    const at::Tensor ho = h.to(at::kFloat);
    const auto ha = ho.accessor<float, 3>();
    for (size_t g = 0; g + 1 < pl.gbeg.size(); ++g) {
      const int64_t e = pl.gexp[g], rk = pl.grank[g];
      for (int64_t p = pl.gbeg[g]; p < pl.gbeg[g + 1]; ++p)
        for (int64_t r = 0; r < rk; ++r) hcp[p * R + r] = pl.coef[p] * ha[pl.row[p]][e][r];
    }
  }
  if (M == 0 || N == 0) return out;
  expand_round16(pl, kn, B.data_ptr(), sizeof(T), B.stride(0), B.stride(1), hcp,
                 std::max<int64_t>(R, 1), C.data_ptr<float>(), M, N, nullptr, out.data_ptr());
  return out;
}


template <typename T>
void linear_delta(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const Meta& mt,
                  at::Tensor& y) {
  using O = acc_t<T>;
  const int64_t E = A.size(0), R = A.size(1), K = A.size(2);
  const Plan<O> pl = make_plan<O>(mt.idx, mt.w, mt.scale, mt.rank, E);
  if (pl.P == 0) return;
  const at::ScalarType ot = acc_scalar_type<T>();
  at::Tensor out = y.scalar_type() == ot ? y : y.to(ot);  // fp16/bf16: fp32 copy, rounded once
  if (pl.chunks.empty() && mt.idx.size(1) == 1) {
    fused_small<T, O>(pl, x.data_ptr<T>(), x.stride(0), A.data_ptr<T>(), A.stride(0), A.stride(1),
                      K, B.data_ptr<T>(), B.stride(0), B.stride(1), out.data_ptr<O>(),
                      out.stride(0), out.size(1), R);
    if (!out.is_same(y)) y.copy_(out);
    return;
  }
  at::Tensor hc = at::empty({pl.P, R}, y.options().dtype(ot));  // [P, R] c * A x
  shrink_small<T, O>(pl, x.data_ptr<T>(), x.stride(0), A.data_ptr<T>(), A.stride(0), A.stride(1),
                     K, hc.data_ptr<O>(), R);
  shrink_large<T, O>(pl, x, A, hc.data_ptr<O>(), R);
  expand_all<T, O>(pl, B, hc, out);
  if (!out.is_same(y)) y.copy_(out);
}

at::Tensor multi_lora_linear_cpu(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& A_,
                                 const at::Tensor& B_, const at::Tensor& scale,
                                 const at::Tensor& rank, const at::Tensor& idx,
                                 const std::optional<at::Tensor>& w,
                                 const std::optional<at::Tensor>& bias) {
  const char* op = "loramix_cpp.multi_lora_linear";
  check_shape(op, "x", x_, {-1, -1}, "[M, K]");
  const at::ScalarType dt = x_.scalar_type();
  TORCH_CHECK(is_float_type(dt), op, ": x must be float32, float16, bfloat16 or float64, got ", dt);
  const int64_t M = x_.size(0), K = x_.size(1);
  check_shape(op, "weight", weight, {-1, K}, "[N, K]");
  const int64_t N = weight.size(0);
  const std::pair<int64_t, int64_t> er = check_factors(op, A_, B_, K, N, dt, "x");
  const int64_t E = er.first, R = er.second;
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight must have x's dtype ", dt, ", got ", weight.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_shape(op, "bias", *bias, {N}, "[N]");
    TORCH_CHECK(bias->scalar_type() == dt, op, ": bias must have x's dtype ", dt, ", got ",
                bias->scalar_type());
  }
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R,
                          dt == at::kDouble ? at::kDouble : at::kFloat);
  if (dt == at::kBFloat16 || dt == at::kHalf) {  // 16-bit: fp32 base GEMM, one rounding
    const at::Tensor x = unit_last(x_), A = unit_last(A_), B = unit_last(B_);
    return dt == at::kBFloat16 ? linear16<c10::BFloat16>(x, weight, A, B, mt, bias)
                               : linear16<c10::Half>(x, weight, A, B, mt, bias);
  }

#ifdef LMF_X86
  // a call with no (row, adapter) pair keeps torch's GEMM (F.linear bit for bit, as a module with
  // no adapter is): removing or evicting the last adapter of a module leaves every other row's
  // output unchanged. LORAMIX_CPP_SMALL32_BASE=1 runs the kernel there too (benchmarks: the base
  // GEMM alone on the same kernel).
  if (dt == at::kFloat && M <= small_m_rows32() && cpu_isa() >= CpuIsa::kAvx512 &&
      (K <= 1 || weight.stride(1) == 1) && (has_pair(mt, E, R) || small32_base()))
    return small32(unit_last(x_), weight, unit_last(A_), unit_last(B_), mt, bias);
#endif
  at::Tensor y = has_bias ? at::addmm(*bias, x_, weight.t()) : at::mm(x_, weight.t());  // [M, N]
  if (!y.is_contiguous()) y = y.contiguous();
  if (M == 0 || N == 0 || E == 0 || R == 0 || idx.size(1) == 0) return y;
  const at::Tensor x = unit_last(x_), A = unit_last(A_), B = unit_last(B_);
  switch (dt) {
    case at::kFloat: linear_delta<float>(x, A, B, mt, y); break;
    case at::kDouble: linear_delta<double>(x, A, B, mt, y); break;
    case at::kBFloat16: linear_delta<c10::BFloat16>(x, A, B, mt, y); break;
    case at::kHalf: linear_delta<c10::Half>(x, A, B, mt, y); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dt);
  }
  return y;
}

at::Tensor multi_lora_expand_cpu(const at::Tensor& y, const at::Tensor& h, const at::Tensor& B_,
                                 const at::Tensor& scale, const at::Tensor& rank,
                                 const at::Tensor& idx, const std::optional<at::Tensor>& w) {
  const char* op = "loramix_cpp.multi_lora_expand";
  check_shape(op, "y", y, {-1, -1}, "[M, N]");
  TORCH_CHECK(is_float_type(y.scalar_type()), op, ": y must be a float tensor, got ", y.scalar_type());
  const int64_t M = y.size(0), N = y.size(1);
  check_shape(op, "B", B_, {-1, N, -1}, "[E, N, R]");
  TORCH_CHECK(is_float_type(B_.scalar_type()), op, ": B must be a float tensor, got ", B_.scalar_type());
  const int64_t E = B_.size(0), R = B_.size(2);
  check_shape(op, "h", h, {M, E, R}, "[M, E, R]");
  TORCH_CHECK(is_float_type(h.scalar_type()), op, ": h must be a float tensor, got ", h.scalar_type());
  const at::ScalarType ot = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R, ot);
  const at::ScalarType yt = y.scalar_type();
  if ((yt == at::kBFloat16 || yt == at::kHalf) && B_.scalar_type() == yt) {  // one rounding
    const at::Tensor B = unit_last(B_);
    return yt == at::kBFloat16 ? expand16<c10::BFloat16>(y, h, B, mt) : expand16<c10::Half>(y, h, B, mt);
  }
  at::Tensor out = y.to(ot, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  if (M == 0 || N == 0 || E == 0 || R == 0 || idx.size(1) == 0) return out.to(y.scalar_type());
  const at::Tensor B = unit_last(B_);
  auto run = [&](auto o_tag) {
    using O = decltype(o_tag);
    const Plan<O> pl = make_plan<O>(mt.idx, mt.w, mt.scale, mt.rank, E);
    if (pl.P == 0) return;
    const at::Tensor ho = h.to(ot);
    const auto ha = ho.accessor<O, 3>();
    at::Tensor hc = at::empty({pl.P, R}, out.options());
    O* hcp = hc.data_ptr<O>();
    for (size_t g = 0; g + 1 < pl.gbeg.size(); ++g) {
      const int64_t e = pl.gexp[g], rk = pl.grank[g];
      for (int64_t p = pl.gbeg[g]; p < pl.gbeg[g + 1]; ++p)
        for (int64_t r = 0; r < rk; ++r) hcp[p * R + r] = pl.coef[p] * ha[pl.row[p]][e][r];
    }
    switch (B.scalar_type()) {
      case at::kFloat: expand_all<float, O>(pl, B, hc, out); break;
      case at::kDouble: expand_all<double, O>(pl, B, hc, out); break;
      case at::kBFloat16: expand_all<c10::BFloat16, O>(pl, B, hc, out); break;
      case at::kHalf: expand_all<c10::Half, O>(pl, B, hc, out); break;
      default: TORCH_CHECK(false, op, ": unsupported B dtype ", B.scalar_type());
    }
  };
  if (ot == at::kDouble) run(double{}); else run(float{});
  return out.scalar_type() == y.scalar_type() ? out : out.to(y.scalar_type());
}

// multi_lora_add_ (in place): y[m] += sum_s w[m,s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]]
// @ x[m]), e = idx[m, s] (-1: nothing): the delta half of multi_lora_linear, added to a y the caller
// computed (a serving engine's base GEMM output, or a column slice of it). The same plan and
// kernels as linear_delta (per-row shrink of each row's own adapter only: no shrink over every
// adapter, no h [M, E, R]); fp32/fp64 y with unit column stride is updated where it lies (any row
// stride: a column slice of a wider output works), other layouts through a contiguous scratch
// copied back; bf16/fp16 y through an fp32 copy, the delta rounded once into y.
void multi_lora_add_cpu(at::Tensor& y, const at::Tensor& x_, const at::Tensor& A_,
                        const at::Tensor& B_, const at::Tensor& scale, const at::Tensor& rank,
                        const at::Tensor& idx, const std::optional<at::Tensor>& w) {
  const char* op = "loramix_cpp.multi_lora_add_";
  check_shape(op, "y", y, {-1, -1}, "[M, N]");
  const at::ScalarType dt = y.scalar_type();
  TORCH_CHECK(is_float_type(dt), op, ": y must be float32, float16, bfloat16 or float64, got ", dt);
  const int64_t M = y.size(0), N = y.size(1);
  check_shape(op, "x", x_, {M, -1}, "[M, K]");
  const int64_t K = x_.size(1);
  TORCH_CHECK(x_.scalar_type() == dt, op, ": x must have y's dtype ", dt, ", got ", x_.scalar_type());
  const std::pair<int64_t, int64_t> er = check_factors(op, A_, B_, K, N, dt, "y");
  const int64_t E = er.first, R = er.second;
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R,
                          dt == at::kDouble ? at::kDouble : at::kFloat);
  if (M == 0 || N == 0 || E == 0 || R == 0 || K == 0 || idx.size(1) == 0) return;
  const at::Tensor x = unit_last(x_), A = unit_last(A_), B = unit_last(B_);
  const bool direct = (N <= 1 || y.stride(1) == 1) && (M <= 1 || y.stride(0) >= N);
  at::Tensor out = direct ? y : y.contiguous();
  switch (dt) {
    case at::kFloat: linear_delta<float>(x, A, B, mt, out); break;
    case at::kDouble: linear_delta<double>(x, A, B, mt, out); break;
    case at::kBFloat16: linear_delta<c10::BFloat16>(x, A, B, mt, out); break;
    case at::kHalf: linear_delta<c10::Half>(x, A, B, mt, out); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dt);
  }
  if (!out.is_same(y)) y.copy_(out);
}

}  // namespace
}  // namespace loramix

TORCH_LIBRARY_FRAGMENT(loramix_cpp, m) {
  m.def("multi_lora_linear(Tensor x, Tensor weight, Tensor A, Tensor B, Tensor scale, Tensor rank, "
        "Tensor idx, Tensor? w, Tensor? bias) -> Tensor");
  m.def("multi_lora_expand(Tensor y, Tensor h, Tensor B, Tensor scale, Tensor rank, Tensor idx, "
        "Tensor? w) -> Tensor");
  m.def("multi_lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor rank, "
        "Tensor idx, Tensor? w) -> ()");
}

namespace loramix {
namespace {
// [active path, detected path, bf16 base GEMM past the small-M kernel ("mkl" or "aten")], as the
// next call would use.
std::vector<std::string> cpu_isa_info() {
  return {isa_name(cpu_isa()), isa_name(cpu_isa_detected()),
          gemm16<c10::BFloat16>(cpu_isa()) != nullptr ? "mkl" : "aten"};
}
}  // namespace
}  // namespace loramix

TORCH_LIBRARY_FRAGMENT(loramix_cpp, m) { m.def("cpu_isa() -> str[]", &loramix::cpu_isa_info); }

TORCH_LIBRARY_IMPL(loramix_cpp, CPU, m) {
  m.impl("multi_lora_linear", &loramix::multi_lora_linear_cpu);
  m.impl("multi_lora_expand", &loramix::multi_lora_expand_cpu);
  m.impl("multi_lora_add_", &loramix::multi_lora_add_cpu);
}
