"""Layer-level checks of the routed-request hooks in loramix_fast's vLLM Punica wrapper (a helper
of tests/test_vllm_routed.py, run with the vLLM venv's python; prints JSON {check: max abs
error}). Slot 1 holds a routed adapter (3 experts x block rank 4 in a rank-16 slot; expert 2
does not target slice 1), slots 0 and 2 named adapters; tokens mix the three and -1. The
reference is written out per token in float64: each expert's h_t = A_t x, SpectR top-2 by
||h_t|| over the experts that target the slice, uniform weights, sum_t w_t B_t h_t; model scope:
a stored decision's experts and weights on every slice."""
from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    from vllm.lora.layers import LoRAMapping

    from loramix_fast.integrations.vllm import layers, routed
    from loramix_fast.integrations.vllm.punica import PunicaWrapperLoramixCPU

    torch.manual_seed(0)
    E, R, K, T, V = 3, 16, 24, 9, 40
    n, rb = 3, 4
    slices = (20, 12)
    ids = [11, 21, 13]  # slot 1: the routed adapter (lora id 21)
    w = PunicaWrapperLoramixCPU(64, 8, "cpu", lora_config=None)
    tok = [21, 11, 0, 21, 13, 21, 0, 11, 21]
    w.update_metadata(LoRAMapping(tuple(tok), tuple(tok), is_prefill=True), ids, E + 1, V)
    slot_of = {11: 0, 21: 1, 13: 2, 0: -1}
    e_of = [slot_of[i] for i in tok]
    A = tuple(torch.randn(E, 1, R, K) for _ in slices)
    B = tuple(torch.randn(E, 1, m, R) for m in slices)
    for i in range(len(slices)):  # the routed slot: blocks of rb ranks, zero past n * rb
        A[i][1, 0, n * rb:] = 0
        B[i][1, 0, :, n * rb:] = 0
    A[1][1, 0, 2 * rb:3 * rb] = 0  # expert 2 does not target slice 1
    B[1][1, 0, :, 2 * rb:3 * rb] = 0
    A[0][1, 0, rb + 3] = 0  # expert 1 has rank 3 on slice 0
    B[0][1, 0, :, rb + 3] = 0
    x = torch.randn(T, K)
    y0 = torch.randn(T, sum(slices))
    spec = routed.RoutedSpec(experts=("e0", "e1", "e2"), block_rank=rb, kind="spectr",
                             scope="token", top_k=2, weighting="uniform", temperature=1.0)
    pos = [t for t in range(T) if e_of[t] == 1]

    def state(spec, scoring=False):
        st = routed.StepState(w, {1: (21, spec)}, {1: torch.tensor(pos)}, R, T, "cpu")
        st.model_rows[1] = (torch.ones(len(pos), dtype=torch.int64), [("req-x", 1)])
        st.scoring = scoring
        return st

    def reference(decision=None):
        y = y0.clone().double()
        for t in range(T):
            e = e_of[t]
            off = 0
            for a, b, m in zip(A, B, slices):
                a, b, xt = a[e, 0].double(), b[e, 0].double(), x[t].double()
                if e == 1:
                    h = (a @ xt)[:n * rb].view(n, rb)
                    live = [j for j in range(n) if a[j * rb:(j + 1) * rb].abs().sum() > 0]
                    if decision is None:
                        sel = sorted(live, key=lambda j: -h[j].norm().item())[:2]
                        wt = {j: 1 / 2 for j in sel}
                    else:
                        wt = dict(zip(*decision))
                    for j, wj in wt.items():
                        y[t, off:off + m] += wj * b[:, j * rb:(j + 1) * rb] @ h[j]
                elif e >= 0:
                    y[t, off:off + m] += b @ (a @ xt)
                off += m
        return y

    out = {}
    ref = reference()
    w._lmf_routed = state(spec)
    y = y0.clone()
    w.add_lora_linear(y, x, A, B, 1.0, slices)
    out["per_slice_token_routed"] = (y.double() - ref).abs().max().item()

    layer = type("L", (), {})()
    layer.base_layer = type("BL", (), {"prefix": "t"})()
    layer.tp_size = 1
    layer.lora_config = type("C", (), {"fully_sharded_loras": False})()
    layer.lora_a_stacked = tuple(torch.zeros_like(a) for a in A)
    layer.lora_b_stacked = tuple(torch.zeros_like(b) for b in B)
    layer.output_slices = slices
    assert layers._pack(layer) is None
    for i in range(len(slices)):
        layer.lora_a_stacked[i].copy_(A[i])
        layer.lora_b_stacked[i].copy_(B[i])
    _, Ap, Bp, sc, rk = layer._lmf_packed
    w._lmf_routed = state(spec)
    y = y0.clone()
    y = w.add_lora_packed(y, x, Ap, Bp, sc, rk)
    out["packed_token_routed"] = (y.double() - ref).abs().max().item()

    # model scope: a stored decision (experts 2 and 0, weights 0.7 / 0.3) on every slice
    mspec = routed.RoutedSpec(experts=("e0", "e1", "e2"), block_rank=rb, kind="arrow",
                              scope="model", top_k=2, weighting="softmax", temperature=1.0)
    routed._DECISIONS["req-x"] = (21, torch.tensor([2, 0], dtype=torch.int32),
                                  torch.tensor([0.7, 0.3]))
    refm = reference(([2, 0], [0.7, 0.3]))
    w._lmf_routed = state(mspec)
    y = y0.clone()
    w.add_lora_linear(y, x, A, B, 1.0, slices)
    out["per_slice_model_decision"] = (y.double() - refm).abs().max().item()
    w._lmf_routed = state(mspec)
    y = w.add_lora_packed(y0.clone(), x, Ap, Bp, sc, rk)
    out["packed_model_decision"] = (y.double() - refm).abs().max().item()

    # the scoring pass: no delta anywhere (y untouched, exactly), scores accumulated
    st = state(mspec, scoring=True)
    st.score_state[1] = routed._Scoring(mspec, torch.full((len(pos),), 1.0 / len(pos)), 1, "cpu")
    w._lmf_routed = st
    y = y0.clone()
    w.add_lora_linear(y, x, A, B, 1.0, slices)
    w.add_lora_packed(y, x, Ap, Bp, sc, rk)
    out["scoring_pass_untouched"] = (y - y0).abs().max().item()
    out["scoring_modules"] = int(st.score_state[1].modules)  # 2 slices x (per-slice + packed)
    out["scoring_total_positive"] = bool((st.score_state[1].total[1] > 0).all())
    w._lmf_routed = None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    sys.exit(0)
