"""Layer-level checks of loramix_fast's vLLM Punica wrapper against a dense per-token reference
(a helper of tests/test_vllm_integration.py, run with the vLLM venv's python; prints JSON
{check: max abs error}). Like vLLM's own tests/lora/test_layers.py: random slots, per-token slot
ids (-1 = no adapter), ``y + x @ A.T @ B.T`` per slice."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch


def main() -> None:
    from vllm.lora.layers import LoRAMapping

    from loramix_fast.integrations.vllm import layers
    from loramix_fast.integrations.vllm.punica import PunicaWrapperLoramixCPU

    torch.manual_seed(0)
    E, R, K, T, V = 3, 8, 24, 11, 40
    slices = (32, 16, 16)
    ids = [11, None, 13]  # slot 1 empty: slot 2 is the last one in use
    slot = {11: 0, 13: 2}
    w = PunicaWrapperLoramixCPU(64, 8, "cpu", lora_config=None)
    tok = [0, 11, 13, 0, 13, 11, 11, 0, 13, 0, 11]  # 0: no adapter
    w.update_metadata(LoRAMapping(tuple(tok), tuple(tok), is_prefill=True), ids, E + 1, V)
    e_of = torch.tensor([slot.get(i, -1) for i in tok])
    A = tuple(torch.randn(E, 1, R, K) for _ in slices)
    B = tuple(torch.randn(E, 1, n, R) for n in slices)
    x = torch.randn(T, K)
    y0 = torch.randn(T, sum(slices))

    def reference(A, B, start=y0):
        y = start.clone().double()
        for t in range(T):
            e = int(e_of[t])
            if e < 0:
                continue
            off = 0
            for a, b, n in zip(A, B, slices):
                y[t, off:off + n] += b[e, 0].double() @ (a[e, 0].double() @ x[t].double())
                off += n
        return y

    ref = reference(A, B)
    out = {}
    y = y0.clone()
    w.add_lora_linear(y, x, A, B, 1.0, slices)
    out["per_slice"] = (y.double() - ref).abs().max().item()

    # packed stacks: vLLM's tuples become views, set_lora-style writes land in the packed buffers
    layer = SimpleNamespace(base_layer=SimpleNamespace(prefix="t"), tp_size=1,
                            lora_config=SimpleNamespace(fully_sharded_loras=False),
                            lora_a_stacked=tuple(torch.zeros_like(a) for a in A),
                            lora_b_stacked=tuple(torch.zeros_like(b) for b in B),
                            output_slices=slices, punica_wrapper=w)
    assert layers._pack(layer) is None
    for i in range(len(slices)):
        for e in range(E):
            layer.lora_a_stacked[i][e, 0, :R, :K].copy_(A[i][e, 0])
            layer.lora_b_stacked[i][e, 0].copy_(B[i][e, 0])
    y = y0.clone()
    _, Ap, Bp, sc, rk = layer._lmf_packed
    w.add_lora_packed(y, x, Ap, Bp, sc, rk)
    out["packed"] = (y.double() - ref).abs().max().item()
    y = y0.clone()
    w.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    out["per_slice_on_packed_views"] = (y.double() - ref).abs().max().item()
    y = y0.clone()
    yn = w.add_lora_packed(y, x, Ap, Bp, sc, rk, inplace=False)
    out["packed_not_inplace"] = (yn.double() - ref).abs().max().item()
    out["packed_not_inplace_input_kept"] = (y - y0).abs().max().item()

    # live slots (kept at set_lora / reset_lora): a layer whose used slots hold no adapter is
    # skipped; one live used slot and it runs
    layers.mark_live(layer)
    assert [sorted(t._lmf_live) for t in layers._b_stacks(layer)] == [[0, 1, 2]] * 4
    for t in layers._b_stacks(layer):
        t._lmf_live = {1}  # slot 1: not used by the batch
    y = y0.clone()
    w.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    w.add_lora_packed(y, x, Ap, Bp, sc, rk)
    out["dead_slots_skipped"] = (y - y0).abs().max().item()
    for t in layers._b_stacks(layer):
        t._lmf_live = {1, 2}
    y = y0.clone()
    w.add_lora_packed(y, x, Ap, Bp, sc, rk)
    out["live_slot_runs"] = (y.double() - ref).abs().max().item()
    b0 = Bp[0].clone()  # reset_lora-style zeroing of slot 0, then set_lora-style writing back
    Bp[0].zero_()
    layers.mark_live(layer, 0)
    assert sorted(Bp._lmf_live) == [1, 2], Bp._lmf_live
    Bp[0].copy_(b0)
    layers.mark_live(layer, 0)
    assert sorted(Bp._lmf_live) == [0, 1, 2], Bp._lmf_live
    for t in layers._b_stacks(layer):
        del t._lmf_live

    # fused: base GEMM + deltas in one multi_lora_linear (y0 is then x @ W.T + bias)
    W = torch.randn(sum(slices), K)
    bias = torch.randn(sum(slices))
    layer._lmf_packed = (W,) + layer._lmf_packed[1:]
    yf = layers.fused_apply(layer, x, bias)
    base = x.double() @ W.double().t() + bias.double()
    out["fused"] = (yf.double() - reference(A, B, base)).abs().max().item()

    # logits rows by request (sampler_indices), embedding rows by token
    Al, Bl = torch.randn(E, 1, R, K), torch.randn(E, 1, V, R)
    lg0 = torch.randn(T, V)
    lg = lg0.clone()
    w.add_lora_logits(lg, x, Al, Bl, 1.0)
    refl = lg0.double().clone()
    for t in range(T):
        e = int(e_of[t])
        if e >= 0:
            refl[t] += Bl[e, 0].double() @ (Al[e, 0].double() @ x[t].double())
    out["logits"] = (lg.double() - refl).abs().max().item()
    emb_a = torch.randn(T, R)  # vLLM gathers each token's A row (slot 0's for -1 tokens)
    ye0 = torch.randn(T, K)
    ye = ye0.clone()
    Be = torch.randn(E, 1, K, R)
    w.add_lora_embedding(ye, emb_a, Be)
    refe = ye0.double().clone()
    for t in range(T):
        e = int(e_of[t])
        if e >= 0:
            refe[t] += Be[e, 0].double() @ emb_a[t].double()
    out["embedding"] = (ye.double() - refe).abs().max().item()

    # a batch without adapters leaves y untouched (host shortcut); padding rows read -1
    w.update_metadata(LoRAMapping((0,) * T, (0,) * T, is_prefill=False), ids, E + 1, V)
    y = y0.clone()
    w.add_lora_linear(y, x, A, B, 1.0, slices)
    w.add_lora_packed(y, x, Ap, Bp, sc, rk)
    out["no_adapter_batch"] = (y - y0).abs().max().item()
    out["padding_ids"] = int(w._token_lora_indices[T:].max())  # -1 expected
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    sys.exit(0)
