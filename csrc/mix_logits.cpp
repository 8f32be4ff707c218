// mix_logits: weighted mixture of E experts' next-token scores (DESIGN.md operation 3), CPU kernel.
//
//   mode "logits": out[b, v] = sum_{e: w[b,e] != 0} w[b,e] * z[b,e,v]                 (ELREA eq. 10)
//   mode "probs":  out[b, v] = log sum_{e: w[b,e] > 0} w[b,e] * softmax(z[b,e])[v]      (PELMo eq. 4)
//                            = M + log sum_e exp(a[e,v] - M),   a[e,v] = z[b,e,v] + log w[b,e] - lse[b,e],
//                              M = max_e a[e,v]   (log domain: no underflow to -inf for unlikely tokens)
//
// Memory bound: E*V logits read, V scores written (or one token per row: greedy / sampled).
// Plan: one OpenMP team; every row b is split across the threads by vocabulary slices (so B = 1
// decoding uses every core too).
//   phase 1 ("probs" only): each thread reads its slice of every active expert once, in blocks of
//     kBlk tokens (block max from L1, then one exp per logit), keeping an online (max, sum) per
//     expert; a barrier; every thread combines the partials into lse[e].
//   phase 2: the slice again, in reverse block order, so the tail of phase 1 (about 1 MiB per
//     thread at E = 4, V = 128256, fp32) is still in L2: E exps and one log per token.
//     Scores: stored. Greedy: a running (value, index) per lane, ties to the lowest index.
//     Sample: scores go to a per-row scratch; a barrier; p = exp((s - max) / T) in place, with
//     per-block sums; a barrier; thread 0 picks the first token whose cumulative mass exceeds u * sum.
// Experts with weight 0 (negative too in "probs") are never read.
// Non-finite logits (the semantics of reference.mix_logits): "logits" is plain IEEE arithmetic.
// "probs": -inf has probability 0; +inf is read as FLT_MAX, and an expert whose max is FLT_MAX (a
// "top" expert) puts its mass on those tokens only (every other token of it is -inf, not the huge
// negative x - FLT_MAX); a NaN in a used expert makes the whole row NaN (flagged in phase 1).
// Greedy and sampling pick the first NaN token of a row holding NaN scores (torch.argmax); a row
// with +inf scores ("logits" mode) samples uniformly among its +inf tokens.
// exp and log are vectorized
// polynomials (Cephes expf / logf, about 1 ulp) on GCC vector extensions: AVX-512 with -march=native,
// AVX2 or SSE elsewhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int kW = 16;       // lanes per vector
constexpr int64_t kBlk = 1024;  // tokens per block (a multiple of kW); slices are whole blocks
constexpr int64_t kPf = 1024;     // software prefetch distance (tokens) of streaming reads
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef _Float16 vhf __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) vf splat(float x) { return vf{} + x; }
static inline __attribute__((always_inline)) vi splati(int32_t x) { return vi{} + x; }
static inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline __attribute__((always_inline)) float hmax(vf a) {
  float m = a[0];
  for (int i = 1; i < kW; ++i) m = a[i] > m ? a[i] : m;
  return m;
}
static inline __attribute__((always_inline)) float hsum(vf a) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += a[i];
  return s;
}

// exp(x) for x <= 88; tiny results flush to 0 (denormal with AVX-512), -inf gives 0.
static inline __attribute__((always_inline)) vf vexp(vf x) {
#if defined(__AVX512F__)
  // AVX-512: round with vrndscaleps, scale by 2^n with vscalefps (0 below the range, -inf -> 0)
  const __m512 xm = _mm512_max_ps((__m512)x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xm, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf r = (vf)xm - (vf)n * 0.693359375f + (vf)n * 2.12194440e-4f;
  const vf z = r * r;
  vf y = splat(1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  return (vf)_mm512_scalef_ps((__m512)y, n);
#else
  const vf lo = splat(-87.33654f);
  vi under = x < lo;
  x = vmax(x, lo);
  vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf z = r * r;
  vf y = splat(1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf res = y * (vf)bits;
  return under ? splat(0.f) : res;
#endif
}

// log(x) for positive normal x.
static inline __attribute__((always_inline)) vf vlog(vf x) {
  vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;               // x = m * 2^e, m in [0.5, 1)
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);
  vi small = m < splat(0.707106781186547524f);
  e = small ? e - 1 : e;
  m = (small ? m + m : m) - 1.0f;                    // now log(x) = log1p(m) + e log 2
  vf ef = __builtin_convertvector(e, vf);
  vf z = m * m;
  vf y = splat(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f - z * 0.5f;
  return m + y + ef * 0.693359375f;
}

// Loads of kW elements as fp32 (full vectors and a tail of n < kW with a fill value).
template <typename T> struct Ld;
template <> struct Ld<float> {
  static inline __attribute__((always_inline)) vf full(const float* p) { vf x; std::memcpy(&x, p, sizeof(x)); return x; }
  static float one(const float* p) { return *p; }
};
template <> struct Ld<at::BFloat16> {
  static inline __attribute__((always_inline)) vf full(const at::BFloat16* p) {
    vh h; std::memcpy(&h, p, sizeof(h));
    return (vf)(__builtin_convertvector(h, vu) << 16);
  }
  static float one(const at::BFloat16* p) { return static_cast<float>(*p); }
};
template <> struct Ld<at::Half> {
  static inline __attribute__((always_inline)) vf full(const at::Half* p) {
    vhf h; std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, vf);
  }
  static float one(const at::Half* p) { return static_cast<float>(*p); }
};
template <typename T>
static inline __attribute__((always_inline)) vf load(const T* p, int64_t n, float fill) {  // n >= kW: full vector
  if (n >= kW) return Ld<T>::full(p);
  vf x = splat(fill);
  for (int64_t i = 0; i < n; ++i) x[i] = Ld<T>::one(p + i);
  return x;
}
static inline __attribute__((always_inline)) void store(float* p, vf x, int64_t n) {
  if (n >= kW) std::memcpy(p, &x, sizeof(x));
  else for (int64_t i = 0; i < n; ++i) p[i] = x[i];
}

enum Task { kScores = 0, kGreedy = 1, kSample = 2 };

struct Args {
  int64_t B, E, V, sb, se;  // logits strides in elements (token stride 1)
  const float* w;           // [B, E] contiguous fp32
  bool probs;
  Task task;
  float* out;               // [B, V] (kScores)
  int64_t* tok;             // [B] (kGreedy, kSample)
  const float* u;           // [B] uniforms in [0, 1) (kSample)
  float inv_t;              // 1 / temperature (kSample)
};

// "probs" loads: +inf is read as FLT_MAX (see the header); NaN and -inf stay.
template <typename T>
static inline __attribute__((always_inline)) vf loadp(const T* p, int64_t n) {
  const vf x = load(p, n, -kInf);
  return x == splat(kInf) ? splat(FLT_MAX) : x;
}

// a = (z - mz) + k of one expert ("probs"): mz its max, k = log w - log sum exp(z - mz). A top
// expert (mz = FLT_MAX: it holds +inf) gives -inf to every token below its max.
template <typename T>
static inline __attribute__((always_inline)) vf term(const T* p, int64_t n, float mz, float k) {
  const vf x = loadp(p, n);
  const vf a = (x - mz) + k;
  if (__builtin_expect(mz == FLT_MAX, 0)) return x == splat(FLT_MAX) ? a : splat(-kInf);
  return a;
}

// One vector of mixed scores at tokens [v, v + n) of row b. k: per-expert offsets (probs) or weights
// (logits) for the experts in act. TOP: some expert of the row holds +inf (the exact, slower terms).
template <bool TOP, typename T>
static inline __attribute__((always_inline)) vf mixed(const T* zb, int64_t se, const int* act, const float* k,
                                                      const float* mz, int nact, bool probs, int64_t v, int64_t n) {
  // probs: a[i] = (z - mz[i]) + k[i] with mz the expert's max (z - mz is exact near the max)
  if (probs) {
    auto a_i = [&](int i) __attribute__((always_inline)) -> vf {
      if constexpr (TOP) return term(zb + act[i] * se + v, n, mz[i], k[i]);
      return (load(zb + act[i] * se + v, n, -kInf) - mz[i]) + k[i];
    };
    if (nact == 0) return splat(-kInf);
    if (nact == 1) return a_i(0);
    vf M = splat(-kInf);
    for (int i = 0; i < nact; ++i) M = vmax(M, a_i(i));
    vi dead = M == splat(-kInf);
    vf Mc = vmax(M, splat(-FLT_MAX));
    vf S = vf{};
    for (int i = 0; i < nact; ++i) S += vexp(a_i(i) - Mc);
    return dead ? splat(-kInf) : Mc + vlog(S);  // S in [1, nact] where M is finite
  }
  vf acc = vf{};
  for (int i = 0; i < nact; ++i) {
    __builtin_prefetch(zb + act[i] * se + v + kPf, 0, 0);
    acc += load(zb + act[i] * se + v, n, 0.f) * k[i];
  }
  return acc;
}

static inline __attribute__((always_inline)) bool any_lt(vf a, vf b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LT_OQ) != 0;
#else
  vi c = a < b;
  int r = 0;
  for (int l = 0; l < kW; ++l) r |= c[l];
  return r != 0;
#endif
}

template <typename T>
void run(const T* z, const Args& a) {
  const int64_t B = a.B, E = a.E, V = a.V;
  const int nt_req = std::max(1, at::get_num_threads());
  const int64_t nblk = (V + kBlk - 1) / kBlk;
  const int64_t Vpad = nblk * kBlk;
  std::vector<double> part(std::max(2, nt_req) * (size_t)nt_req * E * 2);  // [parity or t][t][e][max, sum]
  std::vector<float> gval((size_t)B * nt_req, -kInf);          // greedy partials [b][t]
  std::vector<int32_t> gidx((size_t)B * nt_req, INT_MAX);
  std::vector<int32_t> gnan((size_t)B * nt_req, INT_MAX);  // first NaN token (greedy partials)
  std::vector<float> scratch, smax;
  std::vector<int32_t> snan;
  std::vector<double> bsum;
  if (a.task == kSample) {  // [thread (whole rows) or parity (split rows)][...]
    scratch.resize(std::max(2, nt_req) * (size_t)Vpad);
    smax.resize(std::max(2, nt_req) * (size_t)nt_req);
    snan.resize(std::max(2, nt_req) * (size_t)nt_req);
    bsum.resize(std::max(2, nt_req) * (size_t)nblk);
  }

#pragma omp parallel num_threads(nt_req)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    // B >= 2 * threads: every thread takes whole rows (no barriers). Fewer rows (decoding one sequence):
    // the team splits each row into vocabulary slices and meets at a barrier per phase.
    const bool split = B < 2 * nt;
    const int gsz = split ? nt : 1, gt = split ? t : 0;  // group size, rank in the group
    const int64_t b0 = nblk * gt / gsz, b1 = nblk * (gt + 1) / gsz;  // this thread's blocks
    const int64_t nb = b1 - b0, base = b0 * kBlk;
    std::vector<int> act(E);
    std::vector<float> k(E), cf(E), mz(E, 0.f), lbuf(kBlk);
    std::vector<double> m(E), s(E);
    // exp cache of phase 1: p[i][v] = exp(z[e_i, v] - bmax[i][block]) over this slice; with it phase
    // 2 is E FMAs and one log per token instead of E exps. ~1 MiB per thread at E = 4, V = 128256.
    std::vector<float> cache, bmax;
    if (a.probs && E > 1) {
      cache.resize((size_t)E * nb * kBlk);
      bmax.resize((size_t)E * nb);
    }
    const vi lane = vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

    for (int64_t b = split ? 0 : t; b < B; b += split ? 1 : nt) {
      const T* zb = z + b * a.sb;
      const float* wb = a.w + b * E;
      // buffers shared within a group: by row parity when split, by thread otherwise
      const int par = split ? (int)(b & 1) : t;
      const int g0 = split ? 0 : t;  // the group's first thread
      int nact = 0;
      float wsum = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        const float we = wb[e];
        if (a.probs ? we > 0.f : we != 0.f) { act[nact] = (int)e; k[nact] = we; wsum += we; ++nact; }
      }
      const bool cached = a.probs && nact > 1;
      bool row_nan = false, row_top = false;

      if (a.probs && nact > 0) {
        // ---- phase 1: per expert, a sequential stream of blocks; one pass per block: exps
        // relative to the running max `off` (exp(x - off) <= e^64 cannot overflow; a block that
        // jumps higher is redone), the block max alongside; the next block is prefetched
        // EXACT = false: plain loads, only noting whether a lane saw NaN or +inf (one compare per
        // vector); such an expert (rare) is redone with EXACT = true: +inf read as FLT_MAX, NaN flagged.
        auto expert_slice = [&](int i, auto exact_tag) -> bool {
          constexpr bool EXACT = decltype(exact_tag)::value;
          const T* p = zb + act[i] * a.se;
          double mi = -INFINITY, si = 0.0;
          float off = -kInf;
          vi nanv = vi{};         // EXACT: lanes that saw a NaN logit
          vi fine = splati(-1);   // fast: lanes that saw only x < +inf
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t v0 = blk * kBlk, v1 = std::min(V, v0 + kBlk);
            if (!(off > -kInf)) {  // no finite logit yet: this block's max is the offset
              vf mx = splat(-kInf);
              for (int64_t v = v0; v < v1; v += kW) {
                const vf x = EXACT ? loadp(p + v, v1 - v) : load(p + v, v1 - v, -kInf);
                if constexpr (EXACT) nanv |= x != x; else fine &= x < splat(kInf);
                mx = vmax(mx, x);
              }
              off = hmax(mx);
              if (!(off > -kInf)) {
                if (cached) bmax[(size_t)i * nb + (blk - b0)] = -kInf;
                continue;
              }
            }
            float* c = cached ? cache.data() + ((size_t)i * nb + (blk - b0)) * kBlk - v0 : nullptr;
            float bm;
            vf acc;
            for (int pass = 0; pass < 2; ++pass) {
              const vf offv = splat(off);
              vf mx = splat(-kInf);
              acc = vf{};
              for (int64_t v = v0; v < v1; v += kW) {
                __builtin_prefetch(p + v + kBlk, 0, 0);
                const vf x = EXACT ? loadp(p + v, v1 - v) : load(p + v, v1 - v, -kInf);
                if constexpr (EXACT) nanv |= x != x; else fine &= x < splat(kInf);
                mx = vmax(mx, x);
                const vf e = vexp(x - offv);
                acc += e;
                if (cached) std::memcpy(c + v, &e, sizeof(e));
              }
              bm = hmax(mx);
              if (!(bm > off + 64.f)) break;
              off = bm;  // rare: the block jumps far above the running max; redo it
            }
            if (cached) bmax[(size_t)i * nb + (blk - b0)] = off;
            const double bs = hsum(acc);
            if (off > mi) { si *= std::exp(mi - (double)off); mi = off; }
            si += bs * std::exp((double)off - mi);
            if (bm > off) off = bm;
          }
          if constexpr (!EXACT) {
            int all = -1;
            for (int l = 0; l < kW; ++l) all &= fine[l];
            if (!all) return false;
          }
          int anynan = 0;
          for (int l = 0; l < kW; ++l) anynan |= nanv[l];
          m[i] = mi;
          s[i] = anynan ? (double)NAN : si;  // a NaN sum flags the expert (checked below)
          return true;
        };
        for (int i = 0; i < nact; ++i)
          if (!expert_slice(i, std::false_type{})) expert_slice(i, std::true_type{});
        double* pp = part.data() + ((size_t)par * nt_req + t) * E * 2;
        for (int i = 0; i < nact; ++i) { pp[2 * i] = m[i]; pp[2 * i + 1] = s[i]; }
        if (split) {
#pragma omp barrier
        }
        // a NaN in any slice of a used expert: the whole row is NaN
        for (int i = 0; i < nact && !row_nan; ++i)
          for (int tt = g0; tt < g0 + gsz; ++tt)
            if (std::isnan(part[((size_t)par * nt_req + tt) * E * 2 + 2 * i + 1])) row_nan = true;
        // combine the slices: lse of each expert; experts that are -inf everywhere drop out
        int keep = 0;
        for (int i = 0; i < nact && !row_nan; ++i) {
          double M = -INFINITY;
          for (int tt = g0; tt < g0 + gsz; ++tt)
            M = std::max(M, part[((size_t)par * nt_req + tt) * E * 2 + 2 * i]);
          if (!(M > -INFINITY)) continue;
          double S = 0.0;
          for (int tt = g0; tt < g0 + gsz; ++tt) {
            const double* q = part.data() + ((size_t)par * nt_req + tt) * E * 2 + 2 * i;
            if (q[0] > -INFINITY) S += q[1] * std::exp(q[0] - M);
          }
          if (cached) {  // cf := w / S * exp(bmax - M) per block, computed in place below
            m[keep] = M;
            s[keep] = (double)k[i] / S;
            if (keep != i) {
              std::memmove(bmax.data() + (size_t)keep * nb, bmax.data() + (size_t)i * nb, nb * sizeof(float));
              std::memmove(cache.data() + (size_t)keep * nb * kBlk, cache.data() + (size_t)i * nb * kBlk,
                           nb * kBlk * sizeof(float));
            }
          }
          act[keep] = act[i];
          mz[keep] = (float)M;  // M is a logit, exact in fp32
          k[keep] = (float)(std::log((double)k[i]) - std::log(S));
          ++keep;
        }
        nact = row_nan ? 0 : keep;
        for (int i = 0; i < nact; ++i) row_top |= mz[i] == FLT_MAX;
      }
      const bool use_cache = cached && nact > 1;
      // "logits": the block's weighted sum, expert by expert (sequential streams, L1 accumulator)
      const bool lsum = !a.probs && nact > 0;
      const vf thr = splat(1e-20f * wsum);

      auto mix = [&](int64_t v, int64_t n) __attribute__((always_inline)) -> vf {
        if (__builtin_expect(row_top, 0))
          return mixed<true>(zb, a.se, act.data(), k.data(), mz.data(), nact, a.probs, v, n);
        return mixed<false>(zb, a.se, act.data(), k.data(), mz.data(), nact, a.probs, v, n);
      };
      // mixed scores at tokens [v, v + n) of this slice's block blk
      auto scores = [&](int64_t blk, int64_t v, int64_t n) __attribute__((always_inline)) -> vf {
        if (__builtin_expect(row_nan, 0)) return splat(NAN);
        if (lsum) { vf x; std::memcpy(&x, lbuf.data() + (v - blk * kBlk), sizeof(x)); return x; }
        if (!use_cache) return mix(v, n);
        vf S = vf{};
        const float* c = cache.data() + (size_t)(blk - b0) * kBlk + (v - blk * kBlk);
        for (int i = 0; i < nact; ++i) {
          vf x; std::memcpy(&x, c + (size_t)i * nb * kBlk, sizeof(x));
          S += x * cf[i];
        }
        // tokens unlikely under every expert (the cache underflows): the log-domain formula
        if (__builtin_expect(any_lt(S, thr), 0)) {
          vf y = mix(v, n);
          return S < thr ? y : vlog(S);
        }
        return vlog(S);
      };
      auto block_coefs = [&](int64_t blk) {
        if (lsum) {
          const int64_t v0 = blk * kBlk, v1 = std::min(V, v0 + kBlk);
          float* acc = lbuf.data();
          for (int i = 0; i < nact; ++i) {
            const T* p = zb + act[i] * a.se;
            const vf wi = splat(k[i]);
            for (int64_t v = v0; v < v1; v += kW) {
              __builtin_prefetch(p + v + kPf, 0, 0);
              vf x = load(p + v, v1 - v, 0.f) * wi;
              if (i > 0) { vf y; std::memcpy(&y, acc + (v - v0), sizeof(y)); x += y; }
              std::memcpy(acc + (v - v0), &x, sizeof(x));
            }
          }
          return;
        }
        if (!use_cache) return;
        for (int i = 0; i < nact; ++i) {
          const float bm = bmax[(size_t)i * nb + (blk - b0)];
          cf[i] = bm > -kInf ? (float)(s[i] * std::exp((double)bm - m[i])) : 0.f;
        }
      };

      // ---- phase 2: mixed scores over this slice; after phase 1, blocks in reverse order (the
      // newest in cache); otherwise forward (what the hardware prefetcher follows)
      const bool rev = a.probs && nact > 0;
      if (a.task == kScores) {
        float* ob = a.out + b * V;
        // a large output goes around the caches (no read-for-ownership): 64-byte aligned rows only
        const bool nt_store = B * V >= (int64_t{1} << 19) && (reinterpret_cast<uintptr_t>(ob) & 63) == 0;
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t blk = rev ? b1 - 1 - j : b0 + j;
          block_coefs(blk);
          const int64_t v0 = blk * kBlk, v1 = std::min(V, v0 + kBlk);
          for (int64_t v = v0; v < v1; v += kW) {
            const vf x = scores(blk, v, v1 - v);
#if defined(__AVX512F__)
            if (nt_store && v1 - v >= kW) { _mm512_stream_ps(ob + v, (__m512)x); continue; }
#endif
            store(ob + v, x, v1 - v);
          }
        }
      } else if (a.task == kGreedy) {
        vf bv = splat(-kInf);
        vi bi = splati(INT_MAX);
        vi ni = splati(INT_MAX);  // first NaN token per lane (NaN wins, as in torch.argmax)
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t blk = rev ? b1 - 1 - j : b0 + j;
          block_coefs(blk);
          const int64_t v0 = blk * kBlk, v1 = std::min(V, v0 + kBlk);
          for (int64_t v = v0; v < v1; v += kW) {
            vf x = scores(blk, v, v1 - v);
            vi iv = lane + (int32_t)v;
            x = iv < splati((int32_t)v1) ? x : splat(-kInf);
            vi upd = (x > bv) | ((x == bv) & (iv < bi));
            bv = upd ? x : bv;
            bi = upd ? iv : bi;
            ni = (x != x) & (iv < ni) ? iv : ni;
          }
        }
        float best = -kInf;
        int32_t bidx = INT_MAX, nidx = INT_MAX;
        for (int l = 0; l < kW; ++l) {
          if (bv[l] > best || (bv[l] == best && bi[l] < bidx)) { best = bv[l]; bidx = bi[l]; }
          nidx = std::min(nidx, ni[l]);
        }
        gval[(size_t)b * nt_req + gt] = best;
        gidx[(size_t)b * nt_req + gt] = bidx;
        gnan[(size_t)b * nt_req + gt] = nidx;
      } else {  // kSample
        float* sc = scratch.data() + (size_t)par * Vpad;
        vf mx = splat(-kInf);
        vi ni = splati(INT_MAX);  // first NaN score per lane: a row holding NaN gives that token
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t blk = rev ? b1 - 1 - j : b0 + j;
          block_coefs(blk);
          const int64_t v0 = blk * kBlk, v1 = std::min(V, v0 + kBlk);
          for (int64_t v = v0; v < v0 + kBlk; v += kW) {
            vf x = v < v1 ? scores(blk, v, v1 - v) : splat(-kInf);
            const vi iv = lane + (int32_t)v;
            x = iv < splati((int32_t)v1) ? x : splat(-kInf);
            ni = (x != x) & (iv < ni) ? iv : ni;
            mx = vmax(mx, x);
            std::memcpy(sc + v, &x, sizeof(x));
          }
        }
        int32_t nidx = INT_MAX;
        for (int l = 0; l < kW; ++l) nidx = std::min(nidx, ni[l]);
        smax[(size_t)par * nt_req + t] = hmax(mx);
        snan[(size_t)par * nt_req + t] = nidx;
        if (split) {
#pragma omp barrier
        }
        float G = -kInf;
        int32_t first_nan = INT_MAX;
        for (int tt = g0; tt < g0 + gsz; ++tt) {
          G = std::max(G, smax[(size_t)par * nt_req + tt]);
          first_nan = std::min(first_nan, snan[(size_t)par * nt_req + tt]);
        }
        double* bs = bsum.data() + (size_t)par * nblk;
        if (G > -kInf && first_nan == INT_MAX) {
          const vf Gv = splat(G), it = splat(a.inv_t);
          const bool top = G == kInf;  // +inf scores: uniform over the +inf tokens
          for (int64_t blk = b1 - 1; blk >= b0; --blk) {
            vf acc = vf{};
            for (int64_t v = blk * kBlk; v < (blk + 1) * kBlk; v += kW) {
              vf x; std::memcpy(&x, sc + v, sizeof(x));
              vf p;
              if (top) {
                p = x == splat(kInf) ? splat(1.f) : vf{};
              } else {
                p = vexp((x - Gv) * it);
                p = x == splat(-kInf) ? vf{} : p;
              }
              acc += p;
              std::memcpy(sc + v, &p, sizeof(p));
            }
            bs[blk] = hsum(acc);
          }
        }
        if (split) {
#pragma omp barrier
        }
        if (gt == 0) {
          int64_t pick = 0;
          if (first_nan != INT_MAX) {
            pick = first_nan;
          } else if (G > -kInf) {
            double total = 0.0;
            for (int64_t blk = 0; blk < nblk; ++blk) total += bs[blk];
            const double target = (double)a.u[b] * total;
            double cum = 0.0;
            int64_t last = -1;
            bool found = false;
            for (int64_t blk = 0; blk < nblk && !found; ++blk) {
              if (bs[blk] > 0.0) {
                if (cum + bs[blk] <= target && blk + 1 < nblk) { cum += bs[blk]; continue; }
                const int64_t v1 = std::min(V, (blk + 1) * kBlk);
                for (int64_t v = blk * kBlk; v < v1; ++v) {
                  if (sc[v] > 0.f) {
                    last = v;
                    cum += sc[v];
                    if (cum > target) { pick = v; found = true; break; }
                  }
                }
              }
            }
            if (!found && last >= 0) pick = last;
          }
          a.tok[b] = pick;
        }
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // this thread's streaming stores are visible before the region ends
#endif
  }

  if (a.task == kGreedy) {
    for (int64_t b = 0; b < B; ++b) {
      float best = -kInf;
      int32_t bidx = INT_MAX, nidx = INT_MAX;
      for (int tt = 0; tt < nt_req; ++tt) {
        const float x = gval[(size_t)b * nt_req + tt];
        const int32_t i = gidx[(size_t)b * nt_req + tt];
        if (x > best || (x == best && i < bidx)) { best = x; bidx = i; }
        nidx = std::min(nidx, gnan[(size_t)b * nt_req + tt]);
      }
      if (nidx != INT_MAX) bidx = nidx;
      a.tok[b] = bidx == INT_MAX ? 0 : bidx;
    }
  }
}

void launch(const at::Tensor& logits_in, const at::Tensor& weights_in, const std::string& mode,
            Args& a) {
  TORCH_CHECK(logits_in.dim() == 3, "mix_logits: logits must be [B, E, V], got ", logits_in.sizes());
  TORCH_CHECK(weights_in.dim() == 2 && weights_in.size(0) == logits_in.size(0) &&
                  weights_in.size(1) == logits_in.size(1),
              "mix_logits: weights must be [B, E] = [", logits_in.size(0), ", ", logits_in.size(1),
              "], got ", weights_in.sizes());
  TORCH_CHECK(mode == "logits" || mode == "probs", "mix_logits: mode must be 'logits' or 'probs', got '",
              mode, "'");
  TORCH_CHECK(logits_in.size(2) < INT_MAX - kBlk, "mix_logits: V too large");
  at::Tensor logits = logits_in.stride(2) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor weights = weights_in.to(at::kFloat).contiguous();
  a.B = logits.size(0); a.E = logits.size(1); a.V = logits.size(2);
  a.sb = logits.stride(0); a.se = logits.stride(1);
  a.w = weights.data_ptr<float>();
  a.probs = mode == "probs";
  if (a.B == 0) return;
  if (a.V == 0) {
    TORCH_CHECK(a.task == kScores, "mix_logits: cannot pick a token from an empty vocabulary");
    return;
  }
  switch (logits.scalar_type()) {
    case at::kFloat: run<float>(logits.data_ptr<float>(), a); break;
    case at::kBFloat16: run<at::BFloat16>(logits.data_ptr<at::BFloat16>(), a); break;
    case at::kHalf: run<at::Half>(logits.data_ptr<at::Half>(), a); break;
    default: TORCH_CHECK(false, "mix_logits: logits dtype must be float32, bfloat16 or float16, got ",
                         logits.scalar_type());
  }
}

at::Tensor mix_logits_cpu(const at::Tensor& logits, const at::Tensor& weights, c10::string_view mode) {
  at::Tensor out = at::empty({logits.size(0), logits.dim() == 3 ? logits.size(2) : 0},
                             logits.options().dtype(at::kFloat));
  Args a{};
  a.task = kScores;
  a.out = out.data_ptr<float>();
  launch(logits, weights, std::string(mode), a);
  return out;
}

at::Tensor mix_logits_greedy_cpu(const at::Tensor& logits, const at::Tensor& weights,
                                 c10::string_view mode) {
  at::Tensor tok = at::zeros({logits.size(0)}, logits.options().dtype(at::kLong));
  Args a{};
  a.task = kGreedy;
  a.tok = tok.data_ptr<int64_t>();
  launch(logits, weights, std::string(mode), a);
  return tok;
}

at::Tensor mix_logits_sample_cpu(const at::Tensor& logits, const at::Tensor& weights,
                                 c10::string_view mode, const at::Tensor& uniforms, double temperature) {
  TORCH_CHECK(temperature > 0.0, "mix_logits_sample: temperature must be > 0, got ", temperature);
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.size(0) == logits.size(0),
              "mix_logits_sample: uniforms must be [B] = [", logits.size(0), "], got ", uniforms.sizes());
  at::Tensor u = uniforms.to(at::kFloat).contiguous();
  at::Tensor tok = at::zeros({logits.size(0)}, logits.options().dtype(at::kLong));
  Args a{};
  a.task = kSample;
  a.tok = tok.data_ptr<int64_t>();
  a.u = u.data_ptr<float>();
  a.inv_t = (float)(1.0 / temperature);
  launch(logits, weights, std::string(mode), a);
  return tok;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loramix_cpp, m) {
  m.def("mix_logits(Tensor logits, Tensor weights, str mode) -> Tensor");
  m.def("mix_logits_greedy(Tensor logits, Tensor weights, str mode) -> Tensor");
  m.def("mix_logits_sample(Tensor logits, Tensor weights, str mode, Tensor uniforms, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(loramix_cpp, CPU, m) {
  m.impl("mix_logits", &mix_logits_cpu);
  m.impl("mix_logits_greedy", &mix_logits_greedy_cpu);
  m.impl("mix_logits_sample", &mix_logits_sample_cpu);
}
