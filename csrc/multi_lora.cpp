// Fused multi-LoRA linear on CPU (DESIGN.md operation 1), registered as torch.ops.loramix_cpp.*
//
//   y[m] = x[m] @ W.T + bias + sum_s w[m,s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]] @ x[m]),
//   e = idx[m, s]; e = -1: nothing.
//   Legend: M rows, K in, N out, E adapters, R max rank, S slots, P (row, slot) pairs with work.
//
// Plan (no gathered copies of adapter weights; every adapter row/column past rank[e] is never read):
//   0. base: one BLAS call, at::addmm(bias, x, W.t()) (any W strides: HF Conv1D passes a view).
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
//   fp32/fp64 add into y in place; fp16/bf16 add into an fp32 copy of y and round once at the end.
// multi_lora_expand (SpectR's second half) is step 3 alone, with hc from the given h [M, E, R].
#include "common.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

namespace loramix {
namespace {

constexpr int64_t kBlock = 4;        // rows of one adapter sharing one pass over A / B (small path)
constexpr int64_t kGemmRows = 64;    // rows per GEMM call (large path)
// Least multiply-adds worth a thread: below it one core does the delta (decode with a few rows
// moves < 1 MB of adapters; a fork/join costs microseconds when idle and a scheduler slice when the
// machine is oversubscribed).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;

// Groups with at least this many rows take the GEMM path. On a 2-core AVX-512 EPYC (d = 2048,
// r = 16) the per-row kernels tied or beat one MKL call per 64 rows even for a 1024-row group (the
// small GEMMs have N = r and pay a call each), so only very popular adapters take it.
// LORAMIX_CPP_LARGE_GROUP overrides it (read per call, for benchmarks and tests).
int64_t large_group_rows() {
  const char* s = std::getenv("LORAMIX_CPP_LARGE_GROUP");
  return s && *s ? std::max<int64_t>(1, std::atoll(s)) : int64_t{256};
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
// rank [E] int64 (checked).
template <typename O>
Plan<O> make_plan(const at::Tensor& idx, const at::Tensor& w, const at::Tensor& scale,
                  const at::Tensor& rank, int64_t E) {
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
  const int64_t big = large_group_rows();
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
      for (int64_t i = 0; i < n; i += kBlock)
        pl.blocks.push_back({cnt[e] + i, std::min(kBlock, n - i), g});
    }
  }
  pl.gbeg.push_back(pl.P);
  return pl;
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
                  int64_t K, O* hc, int64_t R) {
  const auto& bl = pl.blocks;
  if (bl.empty()) return;
  std::vector<int64_t> start(bl.size() + 1, 0);  // work items: (block, r)
  for (size_t b = 0; b < bl.size(); ++b) start[b + 1] = start[b] + pl.grank[bl[b].g];
  const int64_t total = start.back();
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, K));
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
struct Meta {
  at::Tensor idx, w, scale, rank;  // host copies: int64 / O / O / int64, contiguous
};

Meta prepare(const char* op, const at::Tensor& scale, const at::Tensor& rank, const at::Tensor& idx,
             const std::optional<at::Tensor>& w, int64_t M, int64_t E, int64_t R, at::ScalarType ot) {
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
  // Values are checked in int64 (int32 ids widen losslessly; nothing is ever narrowed), and
  // raise ValueError like the Python-side checks of the other backends.
  mt.rank = rank.to(at::kLong).contiguous();
  const int64_t* rk = mt.rank.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(rk[e] >= 0 && rk[e] <= R, op, ": rank[", e, "] = ", rk[e],
                      " is outside [0, R] with R = ", R, " (the stack's max rank)");
  mt.idx = idx.to(at::kLong).contiguous();
  const int64_t* id = mt.idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < mt.idx.numel(); ++i)
    TORCH_CHECK_VALUE(id[i] >= -1 && id[i] < E, op, ": idx holds adapter id ", id[i], " at [",
                i / std::max<int64_t>(1, idx.size(1)), ", ", i % std::max<int64_t>(1, idx.size(1)),
                "], outside [-1, ", E - 1, "] (E = ", E, " adapters; -1 = no adapter)");
  if (w.has_value() && w->defined()) {
    check_shape(op, "w", *w, {M, idx.size(1)}, "[M, S] (same as idx)");
    TORCH_CHECK(is_float_type(w->scalar_type()), op, ": w must be a float tensor, got ",
                w->scalar_type());
    mt.w = w->to(ot).contiguous();
  }
  mt.scale = scale.to(ot).contiguous();
  return mt;
}

// x [M, K] with unit last stride (copied only if needed); A / B with unit last stride.
at::Tensor unit_last(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
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
  check_shape(op, "A", A_, {-1, -1, K}, "[E, R, K]");
  const int64_t E = A_.size(0), R = A_.size(1);
  check_shape(op, "B", B_, {E, N, R}, "[E, N, R]");
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight must have x's dtype ", dt, ", got ", weight.scalar_type());
  TORCH_CHECK(A_.scalar_type() == dt, op, ": A must have x's dtype ", dt, ", got ", A_.scalar_type());
  TORCH_CHECK(B_.scalar_type() == dt, op, ": B must have x's dtype ", dt, ", got ", B_.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_shape(op, "bias", *bias, {N}, "[N]");
    TORCH_CHECK(bias->scalar_type() == dt, op, ": bias must have x's dtype ", dt, ", got ",
                bias->scalar_type());
  }
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R,
                          dt == at::kDouble ? at::kDouble : at::kFloat);

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

}  // namespace
}  // namespace loramix

TORCH_LIBRARY_FRAGMENT(loramix_cpp, m) {
  m.def("multi_lora_linear(Tensor x, Tensor weight, Tensor A, Tensor B, Tensor scale, Tensor rank, "
        "Tensor idx, Tensor? w, Tensor? bias) -> Tensor");
  m.def("multi_lora_expand(Tensor y, Tensor h, Tensor B, Tensor scale, Tensor rank, Tensor idx, "
        "Tensor? w) -> Tensor");
}

TORCH_LIBRARY_IMPL(loramix_cpp, CPU, m) {
  m.impl("multi_lora_linear", &loramix::multi_lora_linear_cpu);
  m.impl("multi_lora_expand", &loramix::multi_lora_expand_cpu);
}
