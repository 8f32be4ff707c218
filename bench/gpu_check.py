"""One command for the first session that has a GPU (issue 15): is every Triton kernel right, and
is it ever slower than cuBLAS + shrink + expand?

    python bench/gpu_check.py            # a CUDA GPU: <= 10 min on an H100/H200, cold Triton cache
    python bench/gpu_check.py --dry-run  # no GPU: the same checks through the Triton interpreter
                                         # on CPU tensors at small shapes (the script itself works)

Checks, each printed PASS / FAIL (the exit status is 1 if any fails):
  parity       every candidate of multi_lora_linear (fused configs, cuBLAS + shrink + expand,
               dense) and multi_lora_expand, spectr_topk and mix_logits against the fp64 reference,
               in fp16, bf16, fp32 (ieee) and fp32 (tf32), over M in 1, 15-17, 64-65, 127-129, 4096;
               S in 1, 2, 4, 16; E in 1, 16, 64; odd K / N, transposed W (HF Conv1D), strided x.
               Tolerance (the tests' rule): at most twice plain torch's error plus 4 ulps of scale.
  offsets      tensors past 2^31 elements: a Conv1D weight with K*N >= 2^31, an output with M*N >=
               2^31 (int64 offsets), checked on row / column subsets against the reference
  nan          a NaN / inf adapter stays in the rows that selected it, for every candidate
  determinism  two runs of every candidate are bitwise equal (split-K decode included)
  cuda_graph   a patched model's decode step (one token per sequence) captured after
               ``lmf.warmup`` and replayed on new tokens equals the eager step; the tuner never
               tuned during capture
  timings      d = 4096, r = 16, M in 1, 16, 64, 4096 with 1, 16, 64 distinct adapters (E = 64
               adapters in the stack): fused / cuBLAS + shrink + expand / dense / the tuner's pick,
               each as a ratio to cuBLAS ``F.linear`` alone (CUDA events, rotated W copies)
Results go into bench/RESULTS.md (section "GPU check", device name and versions in it; --out to
write elsewhere; a dry run writes nowhere unless --out is given).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TITLE = "GPU check (bench/gpu_check.py)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    skipped: bool = False


@dataclass
class Profile:
    """Shapes per mode: "gpu" (the real run), "dry" (interpreter, CPU), "test" (pytest -m gpu)."""
    name: str
    device: str
    Ms: tuple
    SE: tuple              # (S, E) pairs
    dtypes: tuple
    KN: tuple              # (K, N) pairs, the first even, the second odd
    R: int
    big: bool              # offsets past 2^31 for real (needs ~10 GB)
    d: int                 # timing width
    time_Ms: tuple
    distinct: tuple
    reps: int
    budget_s: float
    extra: bool = True     # the extra fused configs in parity
    model_hidden: int = 256
    timing_E: int = 64
    small: bool = False    # one case per op and mode in the spectr / mix_logits sweeps


GPU = Profile("gpu", "cuda", Ms=(1, 15, 16, 17, 64, 65, 127, 128, 129, 4096),
              SE=((1, 1), (1, 16), (1, 64), (2, 16), (4, 16), (16, 16), (4, 64)),
              dtypes=("fp16", "bf16", "fp32", "tf32"), KN=((512, 768), (515, 771)), R=16,
              big=True, d=4096, time_Ms=(1, 16, 64, 4096), distinct=(1, 16, 64), reps=30,
              budget_s=540)
TEST = Profile("test", "cuda", Ms=(1, 17, 65, 129), SE=((1, 16), (4, 16)),
               dtypes=("fp16", "bf16", "fp32"), KN=((256, 384), (259, 383)), R=16, big=False,
               d=1024, time_Ms=(1, 64), distinct=(1, 16), reps=5, budget_s=300, extra=False,
               model_hidden=128, timing_E=16)
DRY = Profile("dry", "cpu", Ms=(1, 17, 130), SE=((1, 1), (1, 4), (2, 4), (4, 4)),
              dtypes=("fp16", "bf16", "fp32"), KN=((32, 48), (33, 47)), R=8, big=False, d=64,
              time_Ms=(1, 16), distinct=(1, 4), reps=2, budget_s=7200, extra=False,
              model_hidden=32, timing_E=4)
SMOKE = Profile("smoke", "cpu", Ms=(1, 17), SE=((1, 3), (2, 3)), dtypes=("fp32", "fp16"),
                KN=((32, 48), (33, 47)), R=8, big=False, d=32, time_Ms=(1,), distinct=(1,),
                reps=1, budget_s=7200, extra=False, model_hidden=32, timing_E=4, small=True)

_DT = {}


def _dtype(tag):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            "tf32": torch.float32}[tag]


class _Env:
    """Environment variables set for a block and restored."""

    def __init__(self, **kv):
        self.kv = kv

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.kv}
        os.environ.update(self.kv)

    def __exit__(self, *a):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _TF32:
    """torch's TF32 switch for matmuls, set for one dtype tag (tf32) and restored."""

    def __init__(self, tag):
        self.on = tag == "tf32"

    def __enter__(self):
        import torch
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *a):
        import torch
        torch.backends.cuda.matmul.allow_tf32 = self.old


def _eps(dtype):
    import torch
    return {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]


def _close(got, want64, plain, dtype, tf32=False) -> str | None:
    """None when |got - want| <= 2 |plain - want| + 4 ulps of scale (elementwise max), else why."""
    import torch
    if got.shape != want64.shape:
        return f"shape {tuple(got.shape)} != {tuple(want64.shape)}"
    g = got.double()
    if not torch.equal(torch.isfinite(g), torch.isfinite(want64)):
        return "non-finite mismatch"
    fin = torch.isfinite(want64)
    err = (g - want64).abs()[fin].max().item() if fin.any() else 0.0
    perr = (plain.double() - want64).abs()[fin].max().item() if fin.any() else 0.0
    scale = want64.abs()[fin].max().item() if fin.any() else 1.0
    eps = 2.0 ** -10 if tf32 else _eps(dtype)
    tol = 2 * perr + 4 * eps * max(1.0, scale)
    return None if err <= tol else f"err {err:.3g} > tol {tol:.3g} (torch {perr:.3g})"


# --- inputs -------------------------------------------------------------------------------------

def linear_inputs(M, K, N, E, R, S, dtype, device, *, layout="plain", seed=0, distinct=None,
                  ranks="mixed", weight=True):
    """(x, weight, A, B, scale, rank, idx, w, bias). layout: plain | conv1d (weight = [K, N].T) |
    strided (x a column-strided view). distinct: how many adapters the rows use (None: uniform).
    weight=False: None in its place (the caller builds a huge one on the device)."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    if layout == "strided":
        x = rn(M, 2 * K)[:, ::2]
    else:
        x = rn(M, K)
    if not weight:
        weight = None
    elif layout == "conv1d":
        weight = rn(K, N, s=K ** -0.5).T
    else:
        weight = rn(N, K, s=K ** -0.5)
    A = rn(E, R, K, s=K ** -0.5)
    B = rn(E, N, R)
    scale = (torch.rand(E, generator=g) + 0.5).to(device)
    if ranks == "mixed" and E > 1:
        r = [R if e % 3 else max(1, R - 3 - e % 5) for e in range(E)]
        r[1] = 0  # an adapter that does not target this module
    else:
        r = [R] * E
    rank = torch.tensor(r, dtype=torch.int32, device=device)
    pool = distinct if distinct is not None else E
    idx = torch.randint(0, max(1, min(pool, E)), (M, S), generator=g)
    if distinct is None and M * S > 4:
        idx[torch.rand(M, S, generator=g) < 0.15] = -1  # rows / slots with no adapter
    idx = idx.to(device=device, dtype=torch.int32)
    w = (torch.rand(M, S, generator=g) + 0.25).to(device) if S > 1 else None
    bias = rn(N)
    return x, weight, A, B, scale, rank, idx, w, bias


# --- checks -------------------------------------------------------------------------------------

class Runner:
    def __init__(self, prof: Profile, log=print):
        import torch
        self.prof = prof
        self.dev = torch.device(prof.device)
        self.results: list[Check] = []
        self.tables: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.log = log

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.prof.budget_s

    def add(self, name, ok, detail="", skipped=False):
        c = Check(name, bool(ok), detail, skipped)
        self.results.append(c)
        tag = "SKIP" if skipped else ("PASS" if ok else "FAIL")
        self.log(f"[{tag}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return c

    def guarded(self, name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a crashing check is a failing check
            self.add(name, False, f"raised {type(e).__name__}: {e}\n"
                     + "".join(traceback.format_exc(limit=-3)))

    def sync(self):
        import torch
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    # ---- parity ---------------------------------------------------------------------------
    def parity_linear(self, extra: bool):
        from loramix_fast import ops, reference
        from loramix_fast.kernels import multi_lora as K
        p = self.prof
        fails, n = [], 0
        layouts = ("plain", "conv1d", "strided")
        i = 0
        for tag in p.dtypes:
            dt = _dtype(tag)
            with _TF32(tag):
                for M in p.Ms:
                    for S, E in p.SE:
                        if self.over_budget():
                            self.add(f"parity multi_lora_linear {tag}", False,
                                     f"time budget hit after {n} runs", skipped=True)
                            return
                        layout = layouts[i % 3]
                        Kd, N = p.KN[(i // 3) % 2]
                        i += 1
                        args = linear_inputs(M, Kd, N, E, p.R, S, dt, self.dev, layout=layout,
                                             seed=i)
                        want = reference.multi_lora_linear(*args, upcast=True)
                        plain = reference.multi_lora_linear(*args)
                        cands = K.linear_candidates(*args)
                        if not extra:
                            cands = {k: v for k, v in cands.items()
                                     if k in ("fused", "unfused", "dense")}
                        cands["ops"] = ops.multi_lora_linear
                        for name, fn in cands.items():
                            n += 1
                            why = _close(fn(*args), want, plain, dt, tag == "tf32")
                            if why:
                                fails.append(f"{name} {tag} M={M} S={S} E={E} K={Kd} N={N} "
                                             f"{layout}: {why}")
        self.add(f"parity multi_lora_linear ({n} runs)", not fails, "; ".join(fails[:8]))

    def parity_expand(self):
        import torch
        from loramix_fast import ops, reference
        from loramix_fast.kernels import multi_lora as K
        p = self.prof
        fails, n = [], 0
        for tag in p.dtypes:
            dt = _dtype(tag)
            with _TF32(tag):
                for M in p.Ms[::2] + (p.Ms[-1],):
                    for S, E in p.SE:
                        _, N = p.KN[n % 2]
                        x, W, A, B, scale, rank, idx, w, _ = linear_inputs(
                            M, 8, N, E, p.R, S, dt, self.dev, seed=100 + n)
                        g = torch.Generator().manual_seed(n)
                        y = torch.randn(M, N, generator=g).to(self.dev, dt)
                        h = torch.randn(M, E, p.R, generator=g).to(self.dev)  # fp32 like SpectR
                        args = (y, h, B, scale, rank, idx, w)
                        want = reference.multi_lora_expand(*args, upcast=True)
                        plain = reference.multi_lora_expand(*args)
                        cands = dict(K.expand_candidates(*args), ops=ops.multi_lora_expand)
                        for name, fn in cands.items():
                            n += 1
                            why = _close(fn(*args), want, plain, dt, tag == "tf32")
                            if why:
                                fails.append(f"{name} {tag} M={M} S={S} E={E}: {why}")
        self.add(f"parity multi_lora_expand ({n} runs)", not fails, "; ".join(fails[:8]))

    def parity_spectr(self):
        import torch
        from loramix_fast import reference
        from loramix_fast.kernels.spectr import spectr_topk_triton
        fails, n = [], 0
        small = self.prof.small
        for M in (1, 17, 4096 if self.prof.name == "gpu" else 33)[: 1 if small else 3]:
            for T, R in ((4, 8), (16, 16), (64, 8))[: 1 if small else 3]:
                for k in (1, 4)[1 if small else 0:]:
                    for score in ("norm", "first"):
                        for weighting in ("uniform", "softmax"):
                            for dt in (torch.float32, torch.bfloat16)[: 1 if small else 2]:
                                n += 1
                                g = torch.Generator().manual_seed(n)
                                h = torch.randn(M, T, R, generator=g).to(self.dev, dt)
                                rank = torch.randint(0, R + 1, (T,), generator=g,
                                                     dtype=torch.int32).to(self.dev)
                                sc = (torch.rand(T, generator=g) + 0.5).to(self.dev)
                                kw = dict(rank=rank, score=score, score_scale=sc,
                                          weighting=weighting, temperature=0.7)
                                idx, w, s = spectr_topk_triton(h, k, **kw)
                                ridx, rw, rs = reference.spectr_topk(h, k, upcast=True, **kw)
                                why = _topk_close(idx, w, s, ridx, rw, rs, rank, k)
                                if why:
                                    fails.append(f"M={M} T={T} R={R} k={k} {score} {weighting} "
                                                 f"{dt}: {why}")
        self.add(f"parity spectr_topk ({n} runs)", not fails, "; ".join(fails[:8]))

    def parity_mix(self):
        import torch
        from loramix_fast import reference
        from loramix_fast.kernels.mix_logits import mix_logits_greedy_triton, mix_logits_triton
        fails, n = [], 0
        Vs = (1000, 128256) if self.prof.name == "gpu" else (300,)
        small = self.prof.small
        for B in (1, 16)[1 if small else 0:]:
            for E in (1, 4)[1 if small else 0:]:
                for V in Vs:
                    for mode in ("logits", "probs"):
                        for dt in (torch.float32, torch.bfloat16, torch.float16)[: 1 if small
                                                                                 else 3]:
                            n += 1
                            g = torch.Generator().manual_seed(n)
                            z = (torch.randn(B, E, V, generator=g) * 3).to(self.dev, dt)
                            w = torch.rand(B, E, generator=g).to(self.dev)
                            w[0, 0] = 0.0  # an unused expert
                            got = mix_logits_triton(z, w, mode)
                            want = reference.mix_logits(z, w, mode, upcast=True)
                            fin = torch.isfinite(want)
                            if not torch.equal(fin, torch.isfinite(got)):
                                fails.append(f"B={B} E={E} V={V} {mode} {dt}: non-finite")
                            elif fin.any():
                                err = (got.double() - want).abs()[fin].max().item()
                                if not err <= 1e-4 * (1 + want.abs()[fin].max().item()):
                                    fails.append(f"B={B} E={E} V={V} {mode} {dt}: err {err:.3g}")
                            tok = mix_logits_greedy_triton(z, w, mode)
                            top2 = want.topk(min(2, V), dim=1).values
                            clear = (top2[:, 0] - top2[:, -1]) > 1e-4
                            if not torch.equal(tok[clear], want.argmax(1)[clear]):
                                fails.append(f"greedy B={B} E={E} V={V} {mode} {dt}")
        self.add(f"parity mix_logits ({n} runs)", not fails, "; ".join(fails[:8]))

    # ---- offsets past 2^31 ------------------------------------------------------------------
    def offsets(self):
        import torch
        from loramix_fast import reference
        from loramix_fast.kernels import multi_lora as K
        dt = torch.float16
        big = self.prof.big
        fails = []
        E, R = 4, 16
        # 1. HF Conv1D weight [K, N] with K*N >= 2^31: offsets k * stride_wk pass int32
        Kd, N = ((1 << 16) + 64, (1 << 15) + 16) if big else (96, 80)
        Wt = torch.empty(Kd, N, dtype=dt, device=self.dev).normal_(0, Kd ** -0.5)
        cols = torch.cat([torch.arange(0, 64), torch.arange(N - 64, N)]).to(self.dev)
        for M in (3, 256 if big else 130):  # decode (per-row shrink) and grouped prefill
            x, _, A, B, scale, rank, idx, w, bias = linear_inputs(M, Kd, N, E, R, 1, dt,
                                                                  self.dev, seed=7, weight=False)
            sub = (x, Wt.T.index_select(0, cols), A, B.index_select(1, cols), scale, rank, idx,
                   w, bias[cols])
            want, plain = (reference.multi_lora_linear(*sub, upcast=True),
                           reference.multi_lora_linear(*sub))
            for name, fn in (("fused", K.multi_lora_linear_triton),
                             ("unfused", K.multi_lora_linear_unfused)):
                y = fn(x, Wt.T, A, B, scale, rank, idx, w, bias)
                why = _close(y.index_select(1, cols), want, plain, dt)
                if why:
                    fails.append(f"conv1d K*N={Kd * N} M={M} {name}: {why}")
                del y
        del Wt
        # 2. an output with M*N >= 2^31 (row offsets m * stride_om), K small
        M, Kd, N = ((1 << 16) + 32, 64, 1 << 15) if big else (260, 16, 24)
        x, W, A, B, scale, rank, idx, w, bias = linear_inputs(M, Kd, N, E, R, 1, dt, self.dev,
                                                              seed=8)
        rows = torch.cat([torch.arange(0, 32), torch.arange(M - 32, M)]).to(self.dev)
        sub = (x[rows], W, A, B, scale, rank, idx[rows], w, bias)
        want, plain = reference.multi_lora_linear(*sub, upcast=True), reference.multi_lora_linear(*sub)
        for name, fn in (("fused", K.multi_lora_linear_triton),
                         ("unfused", K.multi_lora_linear_unfused)):
            y = fn(x, W, A, B, scale, rank, idx, w, bias)
            why = _close(y[rows], want, plain, dt)
            if why:
                fails.append(f"M*N={M * N} {name}: {why}")
            del y
        note = "" if big else "dry run: small shapes (no tensor reaches 2^31 elements)"
        self.add("offsets past 2^31", not fails, "; ".join(fails) or note)

    # ---- NaN isolation ----------------------------------------------------------------------
    def nan_isolation(self):
        import torch
        from loramix_fast import reference
        from loramix_fast.kernels import multi_lora as K
        fails, n = [], 0
        for tag in ("fp16", "bf16", "fp32")[2 if self.prof.small else 0:]:
            dt = _dtype(tag)
            for M, S in ((5, 1), (21, 2), (200, 2))[1 if self.prof.small else 0:]:
                x, W, A, B, scale, rank, idx, w, bias = linear_inputs(M, 64, 48, 4, 8, S, dt,
                                                                      self.dev, seed=M + S,
                                                                      ranks="full")
                A, B = A.clone(), B.clone()
                A[0], B[0] = float("nan"), float("inf")
                rank[2] = 3
                A[2, 3:], B[2, :, 3:] = float("nan"), float("nan")  # garbage past a rank
                idx = idx.clamp(min=1)
                idx[: M // 4] = -1
                idx[M // 2, 0] = 0  # the one row that selects the bad adapter
                clean = (idx != 0).all(1)
                Ac, Bc = A.double().clone(), B.double().clone()
                Ac[0], Bc[0] = 0.0, 0.0
                Ac[2, 3:], Bc[2, :, 3:] = 0.0, 0.0
                want = reference.multi_lora_linear(x.double(), W.double(), Ac, Bc, scale.double(),
                                                   rank, idx, None if w is None else w.double(),
                                                   bias.double())
                for name, fn in K.linear_candidates(x, W, A, B, scale, rank, idx, w, bias).items():
                    n += 1
                    y = fn(x, W, A, B, scale, rank, idx, w, bias)
                    tol = 1e-4 if dt == torch.float32 else 5e-2
                    if not (torch.isfinite(y[clean]).all() and torch.isnan(y[~clean]).any(1).all()):
                        fails.append(f"{name} {tag} M={M} S={S}: NaN outside its row or missing")
                    elif not torch.allclose(y[clean].double(), want[clean], rtol=tol, atol=tol):
                        fails.append(f"{name} {tag} M={M} S={S}: clean rows differ")
        self.add(f"NaN isolation ({n} runs)", not fails, "; ".join(fails[:8]))

    # ---- determinism ------------------------------------------------------------------------
    def determinism(self):
        import torch
        from loramix_fast.kernels import multi_lora as K
        fails, n = [], 0
        Kd = 4096 if self.prof.name == "gpu" else 64
        for M in (1, 16, 64, 4096 if self.prof.name == "gpu" else 130)[::3 if self.prof.small
                                                                       else 1]:
            for S, E in ((1, 16), (4, 16)):
                args = linear_inputs(M, Kd, 1024 if self.prof.name == "gpu" else 48, E,
                                     self.prof.R, S, torch.float16, self.dev, seed=M)
                for name, fn in K.linear_candidates(*args).items():
                    n += 1
                    a = fn(*args)
                    b = fn(*args)
                    if not torch.equal(a, b):
                        fails.append(f"{name} M={M} S={S}")
        self.add(f"bitwise determinism ({n} pairs)", not fails, "; ".join(fails[:8]))

    # ---- CUDA graphs ------------------------------------------------------------------------
    def cuda_graph_op(self):
        """ops.multi_lora_linear captured at decode shapes (after its key was tuned) and
        replayed on new inputs copied into the static ones."""
        import torch
        from loramix_fast import autotune, ops
        fails = []
        for S, E in ((1, 4), (4, 4)):
            args = list(linear_inputs(4, 256, 192, E, 16, S, torch.float16 if self.dev.type
                                      == "cuda" else torch.float32, self.dev, seed=S))
            new = linear_inputs(4, 256, 192, E, 16, S, args[0].dtype, self.dev, seed=S + 10)
            ops.multi_lora_linear(*args)  # tunes (on a GPU) and compiles
            before = sum(e[1] == "tuned" for e in autotune.TUNER.events)
            if self.dev.type == "cuda":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    ops.multi_lora_linear(*args)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = ops.multi_lora_linear(*args)
                for i in (0, 6, 7):  # x, idx, w
                    if args[i] is not None:
                        args[i].copy_(new[i])
                graph.replay()
                torch.cuda.synchronize()
            else:
                for i in (0, 6, 7):
                    if args[i] is not None:
                        args[i].copy_(new[i])
                out = ops.multi_lora_linear(*args)
            want = ops.multi_lora_linear(*args)
            if not torch.equal(out, want):
                fails.append(f"S={S}: replay differs by {(out - want).abs().max().item():.3g}")
            if sum(e[1] == "tuned" for e in autotune.TUNER.events) != before:
                fails.append(f"S={S}: tuned during capture")
        self.add("CUDA graph: multi_lora_linear at decode", not fails, "; ".join(fails)
                 or ("" if self.dev.type == "cuda" else "dry run: eager"))

    # ---- CUDA graph of a patched model's decode step ----------------------------------------
    def cuda_graph(self):
        import torch
        import loramix_fast as lmf
        from loramix_fast import autotune
        from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters
        hid = self.prof.model_hidden
        dt = torch.float16 if self.dev.type == "cuda" else torch.float32
        model = tiny_model("llama", hidden=hid, vocab=512, intermediate=hid * 2, layers=2,
                           heads=4, kv_heads=2)
        with tempfile.TemporaryDirectory() as tmp:
            dirs = write_peft_adapters(model, [AdapterSpec(f"a{i}", r=8 + 4 * i, seed=i)
                                               for i in range(3)], tmp)
            lib = lmf.AdapterLibrary.from_peft(dirs)
        m = lmf.patch(model.to(self.dev, dt), lib)
        b = 4
        names = ["a0", "a1", "__base__", "a2"]
        lmf.warmup(m, batch_sizes=[b], prompt_lens=[8], adapter_names=[n for n in names
                                                                       if n != "__base__"])
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 512, (b, 1), generator=g).to(self.dev)
        new = torch.randint(0, 512, (b, 1), generator=g).to(self.dev)
        tuned_before = sum(e[1] == "tuned" for e in autotune.TUNER.events)
        with torch.no_grad(), lmf.use_adapters(m, names):
            m(input_ids=ids, use_cache=False)  # token maps built before capture
            if self.dev.type == "cuda":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        m(input_ids=ids, use_cache=False)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = m(input_ids=ids, use_cache=False).logits
                ids.copy_(new)
                graph.replay()
                torch.cuda.synchronize()
                got = out.clone()
                note = "captured and replayed on new tokens"
            else:
                ids.copy_(new)
                got = m(input_ids=ids, use_cache=False).logits
                note = "dry run: no CUDA graphs on CPU, the eager step twice"
            want = m(input_ids=new, use_cache=False).logits
        tuned_during = sum(e[1] == "tuned" for e in autotune.TUNER.events) - tuned_before
        err = (got.float() - want.float()).abs().max().item()
        ok = err <= 1e-3 * (1 + want.float().abs().max().item()) and tuned_during == 0
        self.add("CUDA graph: patched model decode step", ok,
                 f"{note}; max |replay - eager| {err:.3g}; tunings during capture "
                 f"{tuned_during}")

    # ---- timings ----------------------------------------------------------------------------
    def timings(self):
        import torch
        import torch.nn.functional as F
        from loramix_fast import autotune, ops
        from loramix_fast.kernels import multi_lora as K
        from loramix_fast.ops._tuned import linear_plan
        p = self.prof
        d, R, E = p.d, 16, p.timing_E
        dt = torch.float16 if self.dev.type == "cuda" else torch.float32
        rows = []
        shapes = [(M, dd) for M in p.time_Ms for dd in p.distinct if dd <= M or dd == p.distinct[0]]
        for M, distinct in shapes:
            if self.over_budget():
                self.add("timings", False, "time budget hit", skipped=True)
                break
            args = linear_inputs(M, d, d, E, R, 1, dt, self.dev, distinct=distinct,
                                 ranks="full", seed=M + distinct)
            x, W, A, B, scale, rank, idx, w, bias = args
            # rows use `distinct` adapters spread over the stack
            idx = (torch.arange(M, device=self.dev) % distinct * (E // max(distinct, 1)))
            idx = idx.to(torch.int32)[:, None]
            args = (x, W, A, B, scale, rank, idx, None, bias)
            Ws = [W] + [W.clone() for _ in range(3)]
            cands = K.linear_candidates(*args)
            pick = autotune.TUNER.pick_name(linear_plan(), args)  # tunes this key first
            fns = {"cublas": lambda i: F.linear(x, Ws[i % 4], bias)}
            for name in ("fused", "unfused", "dense"):
                if name in cands:
                    fns[name] = (lambda i, f=cands[name]: f(x, Ws[i % 4], A, B, scale, rank,
                                                             idx, None, bias))
            fns["tuned"] = lambda i: ops.multi_lora_linear(x, Ws[i % 4], A, B, scale, rank,
                                                           idx, None, bias)
            t = _time(fns, p.reps, self.dev)
            base = t["cublas"]
            rows.append((M, distinct, base, {k: v / base for k, v in t.items()}, pick))
        lines = [f"d = {d}, r = {R}, E = {E} adapters, {str(dt).replace('torch.', '')}; ms for "
                 "cuBLAS F.linear alone, the others as a ratio to it (lower is better)",
                 "", "| M | distinct | cuBLAS ms | fused | cuBLAS+shrink+expand | dense | tuned "
                 "| tuner's pick |", "|---|---|---|---|---|---|---|---|"]
        worst = 0.0
        for M, dist, base, r, pick in rows:
            best_other = min(r.get("unfused", math.inf), r.get("dense", math.inf))
            worst = max(worst, r["tuned"] / best_other if best_other < math.inf else 1.0)
            lines.append(f"| {M} | {dist} | {base * 1e3:.4f} | {r.get('fused', math.nan):.2f} | "
                         f"{r.get('unfused', math.nan):.2f} | {r.get('dense', math.nan):.2f} | "
                         f"{r['tuned']:.2f} | {pick} |")
        self.tables["timings"] = "\n".join(lines)
        ok = worst <= 1.15 or self.dev.type != "cuda"
        self.add("timings: the tuner's pick is never slower than cuBLAS + shrink + expand",
                 ok, f"worst tuned / best unfused ratio {worst:.2f} (15% noise allowed)"
                 + ("" if self.dev.type == "cuda" else "; dry run: CPU interpreter times, "
                    "meaningless"))


def _time(fns: dict, reps: int, dev) -> dict:
    """Median seconds per call, providers interleaved, CUDA events on a GPU."""
    import torch
    for f in fns.values():
        f(0)
    times = {k: [] for k in fns}
    for it in range(reps):
        for k, f in fns.items():
            if dev.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                f(it + 1)
                e.record()
                e.synchronize()
                times[k].append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                f(it + 1)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _topk_close(idx, w, s, ridx, rw, rs, rank, k) -> str | None:
    import torch
    s, rs = s.double(), rs.double()
    scale = 1.0 + rs.abs().max().item() if rs.numel() else 1.0
    if s.numel() and (s - rs).abs().max().item() > 2e-5 * scale:
        return f"scores differ by {(s - rs).abs().max().item():.3g}"
    if not torch.equal(idx < 0, ridx < 0):
        return "empty slots differ"
    M, T = rs.shape
    valid = rank > 0
    sm = torch.where(valid[None, :], rs, torch.full_like(rs, -math.inf))
    v = torch.sort(sm, dim=1, descending=True).values
    kk = min(k, T)
    vp = torch.cat([torch.full((M, 1), math.inf, dtype=v.dtype, device=v.device), v,
                    torch.full((M, 1), -math.inf, dtype=v.dtype, device=v.device)], 1)
    eps = 1e-5 * scale
    decided = ((vp[:, 1:kk + 1] - vp[:, 0:kk]).abs() > eps) & \
        ((vp[:, 1:kk + 1] - vp[:, 2:kk + 2]).abs() > eps) & (ridx[:, :kk] >= 0)
    if not torch.equal(idx[:, :kk].long()[decided], ridx[:, :kk].long()[decided]):
        return "indices differ at decided slots"
    wd = (w.double() - rw.double()).abs()
    if wd[decided.all(1)].numel() and wd[decided.all(1)].max().item() > 1e-5:
        return f"weights differ by {wd.max().item():.3g}"
    return None


# --- main ---------------------------------------------------------------------------------------

def run_checks(prof: Profile, only: set | None = None, log=print) -> Runner:
    import torch
    torch.set_grad_enabled(False)
    r = Runner(prof, log)
    untuned = _Env(LORAMIX_AUTOTUNE="0")  # parity: "ops" runs the default (tuned: timings)

    def parity(fn):
        def run():
            with untuned:
                fn()
        return run

    # cheap, decisive checks and the timings first; the parity sweep (the longest, with a time
    # budget: cases past it are reported as skipped) after them
    steps = [("nan", r.nan_isolation), ("determinism", r.determinism),
             ("cuda_graph", r.cuda_graph_op), ("cuda_graph", r.cuda_graph),
             ("offsets", r.offsets), ("timings", r.timings),
             ("parity", parity(lambda: r.parity_linear(extra=False))),
             ("parity", parity(r.parity_expand)), ("parity", parity(r.parity_spectr)),
             ("parity", parity(r.parity_mix))]
    if prof.extra:
        steps.append(("parity", parity(lambda: r.parity_linear(extra=True))))
    for key, fn in steps:
        if only and key not in only:
            continue
        r.guarded(key, fn)
    return r


def report(r: Runner) -> str:
    import torch
    import importlib.metadata as md
    dev = (torch.cuda.get_device_name() if r.dev.type == "cuda"
           else "CPU (dry run: Triton interpreter, small shapes)")
    try:
        tv = md.version("triton")
    except md.PackageNotFoundError:
        tv = "none"
    fails = [c for c in r.results if not c.ok and not c.skipped]
    lines = [f"## {TITLE}", "", f"Device: {dev}; torch {torch.__version__}, triton {tv}; "
             f"{datetime.date.today()}; {r.elapsed():.0f} s; profile {r.prof.name}. "
             f"**{'PASS' if not fails else 'FAIL'}** ({len(r.results) - len(fails)}/"
             f"{len(r.results)} checks).", ""]
    for c in r.results:
        tag = "SKIP" if c.skipped else ("PASS" if c.ok else "FAIL")
        detail = c.detail.replace("\n", " ")[:600]
        lines.append(f"- {tag} {c.name}" + (f": {detail}" if detail else ""))
    for name, table in r.tables.items():
        lines += ["", table]
    return "\n".join(lines) + "\n"


def splice(path: Path, section: str) -> None:
    """Replace the "GPU check" section of a RESULTS.md (or append it)."""
    from bench.common import splice_section

    heading, _, body = section.partition("\n")
    assert heading == f"## {TITLE}", heading
    splice_section(TITLE, body, path, match=TITLE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: run on CPU tensors through the Triton interpreter, small shapes")
    ap.add_argument("--profile", choices=("gpu", "test", "dry", "smoke"), default=None,
                    help="shapes (default gpu; dry with --dry-run; smoke: the tests' dry run)")
    ap.add_argument("--only", default="", help="comma-separated: parity,nan,determinism,"
                    "cuda_graph,offsets,timings")
    ap.add_argument("--out", default=None, help="RESULTS.md to splice the section into "
                    "(default bench/RESULTS.md on a GPU, nothing for a dry run)")
    a = ap.parse_args(argv)
    if a.dry_run:  # before triton is imported anywhere
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["LORAMIX_BACKEND"] = "triton"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, str(ROOT))
    import torch
    prof = {"gpu": GPU, "test": TEST, "dry": DRY, "smoke": SMOKE}[
        a.profile or ("dry" if a.dry_run else "gpu")]
    if prof.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry-run (Triton interpreter on CPU)", file=sys.stderr)
        return 2
    if prof.device == "cuda":  # the timings table needs the tuner on
        os.environ.setdefault("LORAMIX_AUTOTUNE", "1")
    r = run_checks(prof, {k for k in a.only.split(",") if k} or None)
    text = report(r)
    print("\n" + text)
    out = a.out or (None if a.dry_run else str(ROOT / "bench" / "RESULTS.md"))
    if out:
        splice(Path(out), text)
        print(f"wrote {out}")
    return 0 if all(c.ok or c.skipped for c in r.results) else 1


if __name__ == "__main__":
    sys.exit(main())
