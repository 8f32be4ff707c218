"""Layer-level benchmark of routed composition (issue: routing), CPU fp32.

    python bench/bench_routing_layer.py [--quick]

One patched linear, d_in = d_out = 2048, T = 32 experts of rank 8, SpectR top-k = 4 (uniform),
M = 16 (decode) and 1024 (prefill) tokens. Providers, side by side (median after warm-up):
    base        F.linear alone (the floor)
    ours        lmf.SpectR on a MultiLoRALinear: base GEMM + one GEMM over [A*_1; ...; A*_T]
                + fused score/top-k op + gathered expand of the k selected experts
    torch-best  best pure torch: one GEMM over [W; A*], norms, topk, masked dense expand
                (one [M, T*r] x [T*r, N] GEMM)
    peft-arrow  peft's Arrow formulation: prototypes |x.v|, top-k softmax, then every expert
                computed densely (einsum over all T, a [M, T, N] intermediate)
Also an Arrow row for ours. ``run(quick) -> list[dict]``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loramix_fast as lmf  # noqa: E402
from bench.common import machine, time_side_by_side  # noqa: E402

D, T, R, K_TOP = 2048, 32, 8, 4


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(D, D, bias=False)
    lin.weight.data = torch.randn(D, D, generator=g) / D ** 0.5
    lib = lmf.AdapterLibrary()
    for t in range(T):
        A = torch.randn(R, D, generator=g) / D ** 0.5
        B = torch.randn(D, R, generator=g) / R ** 0.5
        lib.add(f"e{t}", {"lin": lmf.LoRAFactors(A, B, 2.0)})
    holder = torch.nn.Module()
    holder.lin = lin
    lmf.patch(holder, lib, router=lmf.SpectR(top_k=K_TOP))
    return holder, lib


def run(quick: bool = False, Ms=(16, 1024)) -> list[dict]:
    holder, lib = _layer()
    mod = holder.lin
    W = mod.weight
    st = mod.stack()
    al = lmf.align_stack(st)
    Wcat = torch.cat([W, al.A_flat])  # [N + T*R, K] for the pure-torch formulation
    Bflat = al.B_star.permute(1, 0, 2).reshape(D, T * R)  # [N, T*R]
    As, Bs, sc = st.A, st.B, st.scale
    protos = al.A_star[:, 0] * al.inv_sigma1[:, None]  # [T, K]: top right singular vectors
    spectr, arrow = lmf.SpectR(top_k=K_TOP), lmf.Arrow(top_k=K_TOP)
    rows = []
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for M in Ms:
            xs = [torch.randn(M, D, generator=g) for _ in range(3)]

            def torch_best(x):
                Y = F.linear(x, Wcat)
                y, H = Y[:, :D], Y[:, D:].view(M, T, R)
                s = H.norm(dim=-1)
                top = s.topk(K_TOP, dim=1).indices
                mask = torch.zeros(M, T).scatter_(1, top, 1.0 / K_TOP)
                return y + F.linear((H * mask[..., None]).view(M, T * R), Bflat)

            def peft_arrow(x):
                y = F.linear(x, W)
                sim = (x @ protos.T).abs()
                tv, ti = sim.topk(K_TOP, dim=1)
                coeff = torch.full_like(sim, float("-inf")).scatter_(1, ti, tv).softmax(1)
                z = torch.einsum("tf,erf->ter", x, As)
                yy = torch.einsum("ter,eor->teo", z, Bs) * sc.view(1, -1, 1)
                return y + torch.einsum("te,teo->to", coeff, yy)

            def ours_with(router):
                def f(x):
                    lmf.set_router(holder, router)
                    return mod(x)
                return f

            fns = {
                "base": [lambda x=x: F.linear(x, W) for x in xs],
                "ours-spectr": [lambda x=x: ours_with(spectr)(x) for x in xs],
                "ours-arrow": [lambda x=x: ours_with(arrow)(x) for x in xs],
                "torch-best": [lambda x=x: torch_best(x) for x in xs],
                "peft-arrow": [lambda x=x: peft_arrow(x) for x in xs],
            }
            reps = (10 if quick else 30) if M <= 64 else (3 if quick else 10)
            med = time_side_by_side(fns, reps=reps, warmup=2)
            for prov, s in med.items():
                rows.append(dict(M=M, provider=prov, ms=s * 1e3, ratio=s / med["base"], D=D, T=T,
                                 R=R, k=K_TOP, threads=torch.get_num_threads()))
    return rows


def format_table(rows):
    out = [f"{'M':>5} {'provider':<12}{'ms':>9}{'x base':>8}"]
    for r in rows:
        out.append(f"{r['M']:>5} {r['provider']:<12}{r['ms']:>9.3f}{r['ratio']:>8.3f}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    rows = run(a.quick)
    print(machine())
    print(format_table(rows))


if __name__ == "__main__":
    main()
