// Training kernels of the fused multi-LoRA ops on CPU (DESIGN.md "Training"), registered as
// torch.ops.loramix_cpp.* and used by loramix_fast/ops/backward.py (torch.library.register_autograd).
//
//   multi_lora_linear_fwd(x, W, A, B, scale, rank, idx, w, bias) -> (y, h)
//       y as multi_lora_linear; h [M, S, R] (fp32, fp64 for fp64 x) holds A_e[:rank] x[m] for each
//       slot with an adapter (0 elsewhere): the shrink output, saved for the backward.
//   multi_lora_linear_bwd(dy, x, h?, W, A, B, scale, rank, idx, w, need_x, need_A, need_B, need_w)
//       -> (dx [M, K] in x's dtype, dA [E, R, K], dB [E, N, R], dw [M, S] in fp32 / fp64)
//       with c = w * scale_e, g = B_e[:, :rank]^T dy[m]:
//         dx[m]   = dy[m] W + sum_s c A_e^T g            dA_e = sum c g x^T
//         dB_e    = sum c dy[m] h^T                      dw[m, s] = scale_e g . h
//       h undefined: recomputed from x (the plain op's backward). Outputs not needed are [0] tensors.
//   multi_lora_expand_bwd(dout, h, B, scale, rank, idx, w, need_h, need_B, need_w)
//       -> (dh [M, E, R], dB [E, N, R], dw [M, S]) in fp32 / fp64 (d y = dout is the caller's).
//
// Plan: the (row, slot) pairs with an adapter of rank > 0 are counting-sorted by adapter once
// (host, O(M*S + E)) and cut into chunks of 64..1024 pairs of one adapter (a row's pairs never
// straddle two chunks). ONE parallel region runs the chunks: each takes its rows of x / dy as a
// block - a view when the rows are one consecutive run and already in the accumulation type (a
// batch whose sequences each train one adapter: fp32 needs no copy at all), else gathered and
// converted - and runs the chunk's GEMMs (at::mm / addmm_, single-threaded inside the region)
// against A_e / B_e read in place, sliced to the rank: never a per-row copy of A or B, nothing of
// size M x N x R. Per-adapter sums (dA, dB) of an adapter cut into several chunks go to per-chunk
// partials, added afterwards. Row outputs (y's delta, dx's delta): S = 1 -> each row has one
// pair, added straight into y / dx from its chunk (addmm_ on the run's rows; bf16 / fp16 rows
// rounded once); S > 1 -> into a [P, N] (or [P, K]) buffer, scatter-added in a second region over
// column ranges. Few regions matter: on a loaded machine every fork/join can cost a scheduler
// time slice (hence serial memsets instead of at::zeros, whose fill forks past 32 K elements).
// Rounding follows peft's order where it is free (scale_e multiplies the expand's output in the
// forward; in the backward it multiplies the rank-r products B_e^T dy and dy^T h instead of dy,
// one rounding of difference), so training matches peft as closely as fp32 allows.
#include "common.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace loramix {
namespace {


template <typename O>
struct Groups {
  int64_t P = 0;
  std::vector<int64_t> row;    // [P] row of pair p (pairs sorted by adapter, then row, slot)
  std::vector<int64_t> flat;   // [P] m * S + s
  std::vector<O> coef;         // [P] w * scale
  std::vector<O> wt;           // [P] w (empty when w is None)
  std::vector<int64_t> beg;    // groups: pairs [beg[g], beg[g + 1])
  std::vector<int64_t> adapter, rank;
};

template <typename O>
Groups<O> group_pairs(const at::Tensor& idx, const at::Tensor& w, const at::Tensor& scale,
                      const at::Tensor& rank, int64_t E) {
  Groups<O> G;
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
  G.P = cnt[E];
  if (G.P == 0) return G;
  G.row.resize(G.P);
  G.flat.resize(G.P);
  G.coef.resize(G.P);
  if (wp) G.wt.resize(G.P);
  std::vector<int64_t> pos(cnt.begin(), cnt.end() - 1);
  for (int64_t i = 0; i < M * S; ++i) {
    const int64_t e = id[i];
    if (e < 0 || rk[e] == 0) continue;
    const int64_t p = pos[e]++;
    G.row[p] = i / S;
    G.flat[p] = i;
    G.coef[p] = wp ? static_cast<O>(wp[i] * sc[e]) : sc[e];
    if (wp) G.wt[p] = wp[i];
  }
  for (int64_t e = 0; e < E; ++e) {
    if (cnt[e + 1] == cnt[e]) continue;
    G.beg.push_back(cnt[e]);
    G.adapter.push_back(e);
    G.rank.push_back(rk[e]);
  }
  G.beg.push_back(G.P);
  return G;
}

// ---------------------------------------------------------------- argument handling -------------

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }


// ---------------------------------------------------------------- chunks -------------------------
constexpr int64_t kMinChunk = 64, kMaxChunk = 1024;
// Least multiply-adds worth a second thread (as csrc/multi_lora.cpp).
constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;

struct Chunk {
  int64_t g, p0, n;
  bool solo;  // the group's only chunk: per-adapter sums go straight to dA / dB
};

template <typename O>
std::vector<Chunk> make_chunks(const Groups<O>& G) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = std::clamp<int64_t>((G.P + 4 * nt - 1) / (4 * nt), kMinChunk, kMaxChunk);
  std::vector<Chunk> out;
  for (size_t g = 0; g + 1 < G.beg.size(); ++g) {
    const int64_t b = G.beg[g], e = G.beg[g + 1];
    const size_t first = out.size();
    int64_t p = b;
    while (p < e) {
      int64_t q = std::min(e, p + target);
      while (q < e && G.row[q] == G.row[q - 1]) ++q;  // a row's pairs stay in one chunk
      out.push_back({static_cast<int64_t>(g), p, q - p, false});
      p = q;
    }
    if (out.size() == first + 1) out.back().solo = true;
  }
  return out;
}

// grain for at::parallel_for over chunks: all in one task when the work is small
int64_t chunk_grain(int64_t nchunks, int64_t work) {
  return work < 2 * kMinWorkPerThread ? std::max<int64_t>(1, nchunks) : 1;
}

// dst[i, :K] = (O) src[rows[i] * ld + k] * mul, i < n (serial; src with unit last stride)
template <typename T, typename O>
void gather_rows(const T* src, int64_t ld, const int64_t* rows, int64_t n, int64_t K, O* dst,
                 O mul) {
  for (int64_t i = 0; i < n; ++i) {
    const T* s = src + rows[i] * ld;
    O* d = dst + i * K;
    if (mul == O(1)) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) d[k] = static_cast<O>(s[k]);
    } else {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) d[k] = static_cast<O>(s[k]) * mul;
    }
  }
}

template <typename O>
void gather_into(const at::Tensor& t, const int64_t* rows, int64_t n, O* dst, O mul) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lmf_gather", [&] {
    gather_rows<scalar_t, O>(t.data_ptr<scalar_t>(), t.stride(0), rows, n, t.size(1), dst, mul);
  });
}

template <typename O>
at::Tensor gather(const at::Tensor& t, const int64_t* rows, int64_t n, at::ScalarType ot,
                  O mul = O(1)) {
  at::Tensor out = at::empty({n, t.size(1)}, t.options().dtype(ot));
  if (n > 0 && t.size(1) > 0) gather_into<O>(t, rows, n, out.data_ptr<O>(), mul);
  return out;
}

// dst[rows[i], :] += c[i] * src[i, :] (c null: 1), serial
template <typename O>
void add_rows(O* dst, int64_t ldd, const int64_t* rows, const at::Tensor& src, const O* c) {
  const int64_t n = src.size(0), K = src.size(1);
  const O* s = src.data_ptr<O>();
  for (int64_t i = 0; i < n; ++i) {
    O* d = dst + rows[i] * ldd;
    const O* si = s + i * K;
    const O ci = c ? c[i] : O(1);
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) d[k] += ci * si[k];
  }
}

// dst[row[p], :] += c[p] * buf[p, :] for every pair, parallel over column ranges (rows repeat)
template <typename O>
void scatter_pairs(O* dst, int64_t ldd, const std::vector<int64_t>& row, const at::Tensor& buf,
                   const O* c) {
  const int64_t P = buf.size(0), K = buf.size(1);
  if (P == 0 || K == 0) return;
  const O* s = buf.data_ptr<O>();
  const int64_t grain = std::max<int64_t>(64, kMinWorkPerThread / std::max<int64_t>(1, P));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t p = 0; p < P; ++p) {
      O* d = dst + row[p] * ldd;
      const O* sp = s + p * K;
      const O cp = c ? c[p] : O(1);
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) d[k] += cp * sp[k];
    }
  });
}

// dst[rows[i], :] += c[i] * src[i, :] into a tensor of another dtype T (bf16 / fp16 y or dx):
// one rounding per element, as a round trip through an O copy would give (serial)
template <typename T, typename O>
void add_rows_typed(T* dst, int64_t ldd, const int64_t* rows, const at::Tensor& src, const O* c) {
  const int64_t n = src.size(0), K = src.size(1);
  const O* s = src.data_ptr<O>();
  for (int64_t i = 0; i < n; ++i) {
    T* d = dst + rows[i] * ldd;
    const O* si = s + i * K;
    const O ci = c ? c[i] : O(1);
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) d[k] = static_cast<T>(static_cast<O>(d[k]) + ci * si[k]);
  }
}

// dst (rows of y / dx, any float dtype) += c * src, serial
template <typename O>
void add_rows_any(at::Tensor& dst, const int64_t* rows, const at::Tensor& src, const O* c) {
  if (dst.scalar_type() == acc_scalar_type<O>()) {
    add_rows<O>(dst.data_ptr<O>(), dst.stride(0), rows, src, c);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "lmf_add_rows", [&] {
    add_rows_typed<scalar_t, O>(dst.data_ptr<scalar_t>(), dst.stride(0), rows, src, c);
  });
}

// A zero tensor filled by one serial memset: at::zeros forks a parallel fill for more than
// 32 K elements, and on a loaded machine every fork/join can cost a scheduler time slice.
at::Tensor zeros_serial(at::IntArrayRef sizes, const at::TensorOptions& o) {
  at::Tensor t = at::empty(sizes, o);
  if (t.numel()) std::memset(t.data_ptr(), 0, t.numel() * t.element_size());
  return t;
}

// The chunk's rows are one run m0, m0 + 1, ... (a group's rows never descend, so a span of n - 1
// means n distinct consecutive rows): its blocks of x / dy / y / dx are views, not gathers.
inline bool consecutive(const int64_t* rows, int64_t n) {
  return n > 0 && rows[n - 1] - rows[0] == n - 1;
}

// rows' block of t [M, C] in type ot: a view when the rows are one run and t has type ot, else a
// gathered (converted) copy
template <typename O>
at::Tensor rows_block(const at::Tensor& t, const int64_t* rows, int64_t n, bool run,
                      at::ScalarType ot) {
  if (run && t.scalar_type() == ot) return t.narrow(0, rows[0], n);
  return gather<O>(t, rows, n, ot);
}

// t[i, :] * c[i] as a new tensor (t itself when c is null)
template <typename O>
at::Tensor scale_rows(const at::Tensor& t, const O* c) {
  if (!c) return t;
  at::Tensor out = at::empty_like(t);
  const int64_t n = t.size(0), r = t.size(1);
  const O* p = t.data_ptr<O>();
  O* q = out.data_ptr<O>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r; ++j) q[i * r + j] = p[i * r + j] * c[i];
  return out;
}

// sum_j a[i, j] * b[i, j] per row
template <typename O>
void row_dots(const at::Tensor& a, const at::Tensor& b, const int64_t* flat, O* out) {
  const int64_t n = a.size(0), r = a.size(1);
  const O* ap = a.data_ptr<O>();
  const O* bp = b.data_ptr<O>();
  for (int64_t i = 0; i < n; ++i) {
    O acc = 0;
    for (int64_t j = 0; j < r; ++j) acc += ap[i * r + j] * bp[i * r + j];
    out[flat[i]] = acc;
  }
}

// Per group: A_e[:rank] [rank, K] and B_e[:, :rank] [N, rank] in O (views when already O)
struct Factors {
  std::vector<at::Tensor> a, b;
};
template <typename O>
Factors factors_of(const Groups<O>& G, const at::Tensor* A, const at::Tensor& B, at::ScalarType ot) {
  Factors f;
  for (size_t g = 0; g + 1 < G.beg.size(); ++g) {
    const int64_t e = G.adapter[g], r = G.rank[g];
    if (A) {
      at::Tensor a = A->select(0, e).narrow(0, 0, r);
      f.a.push_back(a.scalar_type() == ot ? a : a.to(ot));
    }
    at::Tensor b = B.select(0, e).narrow(1, 0, r);
    f.b.push_back(b.scalar_type() == ot ? b : b.to(ot));
  }
  return f;
}

// ---------------------------------------------------------------- multi_lora_linear_fwd ----------
std::tuple<at::Tensor, at::Tensor> multi_lora_linear_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& A_, const at::Tensor& B_,
    const at::Tensor& scale, const at::Tensor& rank, const at::Tensor& idx,
    const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& bias) {
  const char* op = "loramix_cpp.multi_lora_linear_fwd";
  check_shape(op, "x", x_, {-1, -1}, "[M, K]");
  const at::ScalarType dt = x_.scalar_type();
  TORCH_CHECK(is_float_type(dt), op, ": x must be float32, float16, bfloat16 or float64, got ", dt);
  const int64_t M = x_.size(0), K = x_.size(1);
  check_shape(op, "weight", weight, {-1, K}, "[N, K]");
  const int64_t N = weight.size(0);
  const std::pair<int64_t, int64_t> er = check_factors(op, A_, B_, K, N, dt, "x");
  const int64_t E = er.first, R = er.second;
  TORCH_CHECK(weight.scalar_type() == dt, op, ": weight must have x's dtype ", dt, ", got ",
              weight.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_shape(op, "bias", *bias, {N}, "[N]");
    TORCH_CHECK(bias->scalar_type() == dt, op, ": bias must have x's dtype ", dt);
  }
  const at::ScalarType ot = acc_of(dt);
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R, ot);
  const int64_t S = idx.size(1);

  at::Tensor y = has_bias ? at::addmm(*bias, x_, weight.t()) : at::mm(x_, weight.t());
  if (!y.is_contiguous()) y = y.contiguous();
  at::Tensor h = zeros_serial({M, S, R}, x_.options().dtype(ot));
  if (M == 0 || N == 0 || E == 0 || R == 0 || S == 0) return {y, h};
  const at::Tensor x = unit_last(x_), A = unit_last(A_), B = unit_last(B_);
  // S = 1: each row has one pair, its delta goes straight into y (one rounding for bf16 / fp16).
  // S > 1: deltas meet in a [P, N] buffer and are scatter-added into an O copy of y.
  at::Tensor out = (S == 1 || y.scalar_type() == ot) ? y : y.to(ot);
  auto run = [&](auto o_tag) {
    using O = decltype(o_tag);
    const Groups<O> G = group_pairs<O>(mt.idx, mt.w, mt.scale, mt.rank, E);
    if (G.P == 0) return;
    const std::vector<Chunk> ch = make_chunks(G);
    const Factors f = factors_of(G, &A, B, ot);
    at::Tensor dbuf = S == 1 ? at::Tensor() : at::empty({G.P, N}, out.options().dtype(ot));
    O* hp = h.data_ptr<O>();
    const int64_t nch = static_cast<int64_t>(ch.size());
    at::parallel_for(0, nch, chunk_grain(nch, G.P * R * (K + N)), [&](int64_t c0, int64_t c1) {
      c10::InferenceMode guard;
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& k = ch[c];
        const int64_t r = G.rank[k.g], n = k.n;
        const int64_t* rows = G.row.data() + k.p0;
        const bool run1 = consecutive(rows, n);
        const O* wt = G.wt.empty() ? nullptr : G.wt.data() + k.p0;
        const at::Tensor xg = rows_block<O>(x, rows, n, run1, ot);  // [n, K]
        at::Tensor hg;                                                // [n, r] = x A_e^T
        if (S == 1 && run1 && r == R) {  // h's rows of the run, contiguous
          hg = h.view({M, R}).narrow(0, rows[0], n);
          at::mm_out(hg, xg, f.a[k.g].t());
        } else {
          hg = at::mm(xg, f.a[k.g].t());
          const O* hgp = hg.data_ptr<O>();
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < r; ++j) hp[G.flat[k.p0 + i] * R + j] = hgp[i * r + j];
        }
        // the delta as peft rounds it: (h B_e^T) * c, the coefficient after the expand
        if (S == 1) {
          if (run1 && out.scalar_type() == ot && !wt) {
            at::Tensor yv = out.narrow(0, rows[0], n);
            yv.addmm_(hg, f.b[k.g].t(), 1, G.coef[k.p0]);  // y += scale_e (h B_e^T)
          } else {
            add_rows_any<O>(out, rows, at::mm(hg, f.b[k.g].t()), G.coef.data() + k.p0);
          }
        } else {
          at::Tensor d = dbuf.narrow(0, k.p0, n);
          at::mm_out(d, hg, f.b[k.g].t());
        }
      }
    });
    if (S > 1) scatter_pairs<O>(out.data_ptr<O>(), N, G.row, dbuf, G.coef.data());
  };
  if (ot == at::kDouble) run(double{}); else run(float{});
  if (!out.is_same(y)) y.copy_(out);
  return {y, h};
}

// ---------------------------------------------------------------- multi_lora_linear_bwd ----------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_linear_bwd_cpu(
    const at::Tensor& dy_, const at::Tensor& x_, const std::optional<at::Tensor>& h_,
    const at::Tensor& weight, const at::Tensor& A_, const at::Tensor& B_, const at::Tensor& scale,
    const at::Tensor& rank, const at::Tensor& idx, const std::optional<at::Tensor>& w,
    bool need_x, bool need_A, bool need_B, bool need_w) {
  const char* op = "loramix_cpp.multi_lora_linear_bwd";
  check_shape(op, "x", x_, {-1, -1}, "[M, K]");
  const at::ScalarType dt = x_.scalar_type();
  const int64_t M = x_.size(0), K = x_.size(1);
  check_shape(op, "weight", weight, {-1, K}, "[N, K]");
  const int64_t N = weight.size(0);
  check_shape(op, "dy", dy_, {M, N}, "[M, N]");
  check_shape(op, "A", A_, {-1, -1, K}, "[E, R, K]");
  const int64_t E = A_.size(0), R = A_.size(1);
  check_shape(op, "B", B_, {E, N, R}, "[E, N, R]");
  const int64_t S = idx.size(1);
  const bool has_h = h_.has_value() && h_->defined();
  if (has_h) check_shape(op, "h", *h_, {M, S, R}, "[M, S, R]");
  const at::ScalarType ot = acc_of(dt);
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R, ot);
  need_w = need_w && mt.w.defined();
  const at::TensorOptions oo = x_.options().dtype(ot);
  const at::Tensor dy = unit_last(dy_.scalar_type() == dt ? dy_ : dy_.to(dt));
  at::Tensor dx = need_x ? at::mm(dy, weight) : at::empty({0}, x_.options());
  if (need_x && !dx.is_contiguous()) dx = dx.contiguous();
  at::Tensor dA = need_A ? zeros_serial({E, R, K}, oo) : at::empty({0}, oo);
  at::Tensor dB = need_B ? zeros_serial({E, N, R}, oo) : at::empty({0}, oo);
  at::Tensor dw = need_w ? zeros_serial({M, S}, oo) : at::empty({0}, oo);
  if (M == 0 || E == 0 || R == 0 || S == 0 || !(need_x || need_A || need_B || need_w))
    return {dx, dA, dB, dw};
  // x is read only for dA or to recompute h (else it may be a stride-0 placeholder)
  const bool use_x = need_A || (!has_h && (need_B || need_w));
  const at::Tensor x = use_x ? unit_last(x_) : x_;
  const at::Tensor A = unit_last(A_), B = unit_last(B_);
  // S = 1: dx's deltas go straight into dx (one rounding for bf16 / fp16); S > 1: a [P, K]
  // buffer, scatter-added into an O copy of dx
  at::Tensor dxo = (need_x && S > 1 && dx.scalar_type() != ot) ? dx.to(ot) : dx;
  const at::Tensor h = has_h ? h_->to(ot).contiguous() : at::Tensor();
  auto run = [&](auto o_tag) {
    using O = decltype(o_tag);
    const Groups<O> G = group_pairs<O>(mt.idx, mt.w, mt.scale, mt.rank, E);
    if (G.P == 0) return;
    const std::vector<Chunk> ch = make_chunks(G);
    const Factors f = factors_of(G, &A, B, ot);
    const int64_t nch = static_cast<int64_t>(ch.size());
    std::vector<at::Tensor> partA(nch), partB(nch);  // chunks of adapters cut in several
    at::Tensor xbuf = (need_x && S > 1) ? at::empty({G.P, K}, oo) : at::Tensor();
    const O* sc = mt.scale.data_ptr<O>();
    at::parallel_for(0, nch, chunk_grain(nch, 3 * G.P * R * (K + N)), [&](int64_t c0, int64_t c1) {
      c10::InferenceMode guard;
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& k = ch[c];
        const int64_t e = G.adapter[k.g], r = G.rank[k.g], n = k.n;
        const int64_t* rows = G.row.data() + k.p0;
        const int64_t* flat = G.flat.data() + k.p0;
        const bool run1 = consecutive(rows, n);
        const O* wt = G.wt.empty() ? nullptr : G.wt.data() + k.p0;
        const O se = sc[e];
        // peft's rounding order: scale_e multiplies dy (here: the rank-r products, exact up to
        // one rounding), the slot weights the rank-r factors
        const at::Tensor dyg = rows_block<O>(dy, rows, n, run1, ot);  // [n, N] dy
        const at::Tensor xg = use_x ? rows_block<O>(x, rows, n, run1, ot) : at::Tensor();
        at::Tensor hg;  // [n, r]: A_e x of the pairs
        if (need_B || need_w) {
          if (has_h && S == 1 && run1 && r == R) {
            hg = h.view({M, R}).narrow(0, rows[0], n);
          } else if (has_h) {
            hg = at::empty({n, r}, oo);
            const O* hp = h.data_ptr<O>();
            O* d = hg.data_ptr<O>();
            for (int64_t i = 0; i < n; ++i)
              for (int64_t j = 0; j < r; ++j) d[i * r + j] = hp[flat[i] * R + j];
          } else {
            hg = at::mm(xg, f.a[k.g].t());
          }
        }
        if (need_x || need_A || need_w) {
          at::Tensor gs = at::mm(dyg, f.b[k.g]);  // [n, r]: scale_e (B_e^T dy)^T
          gs.mul_(se);
          if (need_w) row_dots<O>(gs, hg, flat, dw.data_ptr<O>());
          const at::Tensor gc = scale_rows<O>(gs, wt);  // c (B_e^T dy)
          if (need_x) {
            if (S == 1 && run1 && dxo.scalar_type() == ot) {
              dxo.narrow(0, rows[0], n).addmm_(gc, f.a[k.g]);
            } else if (S == 1) {
              add_rows_any<O>(dxo, rows, at::mm(gc, f.a[k.g]), nullptr);
            } else {
              at::Tensor d = xbuf.narrow(0, k.p0, n);
              at::mm_out(d, gc, f.a[k.g]);
            }
          }
          if (need_A) {
            if (k.solo) {
              at::Tensor dAe = dA.select(0, e).narrow(0, 0, r);  // contiguous [r, K]
              at::mm_out(dAe, gc.t(), xg);
            } else {
              partA[c] = at::mm(gc.t(), xg);
            }
          }
        }
        if (need_B) {  // scale_e dy^T (w h)
          const at::Tensor hw = scale_rows<O>(hg, wt);
          if (k.solo) {
            at::Tensor dBe = dB.select(0, e).narrow(1, 0, r);
            dBe.addmm_(dyg.t(), hw, 1, se);
          } else {
            partB[c] = at::mm(dyg.t(), hw);
            partB[c].mul_(se);
          }
        }
      }
    });
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t e = G.adapter[ch[c].g], r = G.rank[ch[c].g];
      if (partA[c].defined()) dA.select(0, e).narrow(0, 0, r).add_(partA[c]);
      if (partB[c].defined()) dB.select(0, e).narrow(1, 0, r).add_(partB[c]);
    }
    if (need_x && S > 1) scatter_pairs<O>(dxo.data_ptr<O>(), K, G.row, xbuf, nullptr);
  };
  if (ot == at::kDouble) run(double{}); else run(float{});
  if (need_x && !dxo.is_same(dx)) dx.copy_(dxo);
  return {dx, dA, dB, dw};
}

// ---------------------------------------------------------------- multi_lora_expand_bwd ----------
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_expand_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& h, const at::Tensor& B_, const at::Tensor& scale,
    const at::Tensor& rank, const at::Tensor& idx, const std::optional<at::Tensor>& w,
    bool need_h, bool need_B, bool need_w) {
  const char* op = "loramix_cpp.multi_lora_expand_bwd";
  check_shape(op, "dout", dout_, {-1, -1}, "[M, N]");
  const int64_t M = dout_.size(0), N = dout_.size(1);
  check_shape(op, "B", B_, {-1, N, -1}, "[E, N, R]");
  const int64_t E = B_.size(0), R = B_.size(2);
  check_shape(op, "h", h, {M, E, R}, "[M, E, R]");
  const int64_t S = idx.size(1);
  const at::ScalarType ot = acc_of(dout_.scalar_type());
  const Meta mt = prepare(op, scale, rank, idx, w, M, E, R, ot);
  need_w = need_w && mt.w.defined();
  const at::TensorOptions oo = dout_.options().dtype(ot);
  at::Tensor dh = need_h ? zeros_serial({M, E, R}, oo) : at::empty({0}, oo);
  at::Tensor dB = need_B ? zeros_serial({E, N, R}, oo) : at::empty({0}, oo);
  at::Tensor dw = need_w ? zeros_serial({M, S}, oo) : at::empty({0}, oo);
  if (M == 0 || E == 0 || R == 0 || S == 0 || !(need_h || need_B || need_w)) return {dh, dB, dw};
  const at::Tensor dout = unit_last(dout_), B = unit_last(B_);
  auto run = [&](auto o_tag) {
    using O = decltype(o_tag);
    const Groups<O> G = group_pairs<O>(mt.idx, mt.w, mt.scale, mt.rank, E);
    if (G.P == 0) return;
    const std::vector<Chunk> ch = make_chunks(G);
    const Factors f = factors_of(G, nullptr, B, ot);
    const int64_t nch = static_cast<int64_t>(ch.size());
    std::vector<at::Tensor> partB(nch);
    const O* sc = mt.scale.data_ptr<O>();
    const at::Tensor ho = h.to(ot);
    const auto ha = ho.accessor<O, 3>();
    at::parallel_for(0, nch, chunk_grain(nch, 2 * G.P * R * N), [&](int64_t c0, int64_t c1) {
      c10::InferenceMode guard;
      for (int64_t c = c0; c < c1; ++c) {
        const Chunk& k = ch[c];
        const int64_t e = G.adapter[k.g], r = G.rank[k.g], n = k.n;
        const int64_t* rows = G.row.data() + k.p0;
        const O* wt = G.wt.empty() ? nullptr : G.wt.data() + k.p0;
        const at::Tensor dg = gather<O>(dout, rows, n, ot, sc[e]);  // [n, N] scale_e dout
        at::Tensor hg;
        if (need_B || need_w) {
          hg = at::empty({n, r}, oo);
          O* d = hg.data_ptr<O>();
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < r; ++j) d[i * r + j] = ha[rows[i]][e][j];
        }
        if (need_h || need_w) {
          const at::Tensor gs = at::mm(dg, f.b[k.g]);  // [n, r]: scale_e (B_e^T dout)^T
          if (need_w) row_dots<O>(gs, hg, G.flat.data() + k.p0, dw.data_ptr<O>());
          if (need_h) {  // (row, e) is in this chunk only: a row's pairs never straddle chunks
            const O* gp = gs.data_ptr<O>();
            O* dhp = dh.data_ptr<O>();
            for (int64_t i = 0; i < n; ++i) {
              O* d = dhp + (rows[i] * E + e) * R;
              const O wi = wt ? wt[i] : O(1);
              for (int64_t j = 0; j < r; ++j) d[j] += wi * gp[i * r + j];
            }
          }
        }
        if (need_B) {
          const at::Tensor hw = scale_rows<O>(hg, wt);
          if (k.solo) dB.select(0, e).narrow(1, 0, r).addmm_(dg.t(), hw);
          else partB[c] = at::mm(dg.t(), hw);
        }
      }
    });
    for (int64_t c = 0; c < nch; ++c)
      if (partB[c].defined())
        dB.select(0, G.adapter[ch[c].g]).narrow(1, 0, G.rank[ch[c].g]).add_(partB[c]);
  };
  if (ot == at::kDouble) run(double{}); else run(float{});
  return {dh, dB, dw};
}

}  // namespace
}  // namespace loramix

TORCH_LIBRARY_FRAGMENT(loramix_cpp, m) {
  m.def("multi_lora_linear_fwd(Tensor x, Tensor weight, Tensor A, Tensor B, Tensor scale, "
        "Tensor rank, Tensor idx, Tensor? w, Tensor? bias) -> (Tensor, Tensor)");
  m.def("multi_lora_linear_bwd(Tensor dy, Tensor x, Tensor? h, Tensor weight, Tensor A, Tensor B, "
        "Tensor scale, Tensor rank, Tensor idx, Tensor? w, bool need_x, bool need_A, bool need_B, "
        "bool need_w) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("multi_lora_expand_bwd(Tensor dout, Tensor h, Tensor B, Tensor scale, Tensor rank, "
        "Tensor idx, Tensor? w, bool need_h, bool need_B, bool need_w) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loramix_cpp, CPU, m) {
  m.impl("multi_lora_linear_fwd", &loramix::multi_lora_linear_fwd_cpu);
  m.impl("multi_lora_linear_bwd", &loramix::multi_lora_linear_bwd_cpu);
  m.impl("multi_lora_expand_bwd", &loramix::multi_lora_expand_bwd_cpu);
}
