"""The routing math of the vLLM plugin's routed requests (loramix_fast/integrations/vllm/routed.py)
against the reference routers, without vLLM: a routed adapter folder written by
``write_routed_adapter`` is laid out in vLLM's slot stacks (rank padded to max_lora_rank, beside
named adapters and tokens without any), and the wrapper's steps (``StepState.add``: the routed
tokens' ``h = x A_slot^T``, their gates, ``(g * h) B_slot^T``; then the wrapper's own op over
every slot with the routed tokens at -1) must give, at every module of a tiny Llama, the delta
that ``lmf.patch(model, lib, router=...)`` adds there (float64), and the model-scope scoring pass
(``StepState.score`` at every module, ``decide``) must give ``PromptCached(..., scope="model")
.decide``'s pooled scores, experts and weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import loramix_fast as lmf
from loramix_fast import ops
from loramix_fast.integrations.vllm import routed
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("routed_math")
    model = tiny_model("llama", hidden=48, layers=2, vocab=64, heads=4, kv_heads=2,
                       intermediate=80, init_range=0.1)
    specs = [AdapterSpec("a", r=8, seed=1), AdapterSpec("b", r=4, seed=2),
             AdapterSpec("c", r=8, seed=3, targets=["q_proj", "v_proj", "down_proj"])]
    dirs = write_peft_adapters(model, specs, str(d / "adapters"))
    return {"model": model, "dirs": dirs, "dir": d}


def _folder_factors(folder):
    from safetensors.torch import load_file

    sd = load_file(str(folder / routed.WEIGHTS_NAME))
    out = {}
    for k, t in sd.items():
        mod, which = k[len("base_model.model."):].rsplit(".lora_", 1)
        out.setdefault(mod, {})[which[0]] = t.double()
    return out


def _capture(model, ids, **kw):
    """{module path: (input [T, K], output [T, N])} of every patched module in one forward."""
    got, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, lmf.modules.MultiLoRALinear):
            def hook(mod, args, out, name=name):
                got[name] = (args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1]))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids, **kw)
    finally:
        for h in hooks:
            h.remove()
    return got


@dataclass
class Case:
    name: str
    router: object
    R: int = 32  # vLLM's max_lora_rank (the routed adapter has rank 3 * 8 = 24)


CASES = [Case("spectr_top2_uniform", lmf.SpectR(top_k=2)),
         Case("spectr_top2_softmax", lmf.SpectR(top_k=2, weighting="softmax", temperature=0.5)),
         Case("spectr_paper_top1", lmf.SpectR(top_k=1, variant="paper")),
         Case("arrow_top2", lmf.Arrow(top_k=2, temperature=0.7)),
         Case("arrow_top3_rank64", lmf.Arrow(top_k=3), R=64)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_token_routing_in_slot_stacks_matches_reference_router(experts, tmp_path, case):
    info = routed.write_routed_adapter(tmp_path / "routed", experts["dirs"], case.router)
    assert info["rank"] == 24 and info["block_rank"] == 8 and info["max_lora_rank"] == 32
    spec = routed.read_routed_config(tmp_path / "routed")
    fac = _folder_factors(tmp_path / "routed")
    model = tiny_model("llama", hidden=48, layers=2, vocab=64, heads=4, kv_heads=2,
                       intermediate=80, init_range=0.1, dtype=torch.float64)
    lib = lmf.AdapterLibrary.from_peft(experts["dirs"])
    lmf.patch(model, lib, router=case.router)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (2, 9), generator=g)
    got = _capture(model, ids)
    base = dict(model.named_modules())
    assert len(got) == 14
    E, R = 3, case.R
    checked = 0
    for mod, (x, y) in got.items():
        W = base[mod].base_layer.weight
        ref_delta = y - x @ W.t()
        T, K = x.shape
        N = W.shape[0]
        # vLLM-style slots: 0 and 2 hold random named adapters (rank 8), 1 the routed adapter
        A = torch.zeros(E, R, K, dtype=torch.float64)
        B = torch.zeros(E, N, R, dtype=torch.float64)
        for s in (0, 2):
            A[s, :8] = torch.randn(8, K, generator=g, dtype=torch.float64)
            B[s, :, :8] = torch.randn(N, 8, generator=g, dtype=torch.float64)
        if mod in fac:
            A[1, :24], B[1, :, :24] = fac[mod]["A"], fac[mod]["B"]
        slot = torch.tensor([1, -1, 0, 1, 2, 1] * 3, dtype=torch.int32)[:T]
        # the wrapper's steps: StepState.add for the routed tokens (slot 1, lora id 21), then
        # the wrapper's own op over every slot with the routed tokens at -1 (named_idx)
        pw = SimpleNamespace(_token_lora_indices=slot)
        st = routed.StepState(pw, {1: (21, spec)}, {1: torch.nonzero(slot == 1)[:, 0]}, R, T,
                              "cpu")
        y0 = torch.randn(T, N, generator=g, dtype=torch.float64)
        y = y0.clone()
        st.add(y, x, A, B, 1, 1.0)
        h3 = (x @ A.reshape(E * R, K).t()).view(T, E, R)
        ones = torch.ones(E)
        rank = torch.full((E,), R, dtype=torch.int64)
        named = st.named_idx(T)
        assert named[:, 0].tolist() == torch.where(slot == 1, -1, slot).tolist()
        out = ops.multi_lora_expand(y, h3, B, ones, rank, named)
        delta = out - y0
        for t in range(T):
            s = int(slot[t])
            if s == 1:
                want = ref_delta[t]
            elif s < 0:
                want = torch.zeros(N, dtype=torch.float64)
            else:
                want = B[s] @ (A[s] @ x[t])
            # the folder holds float32 factors (vLLM's dtype here): fp32 rounding of them
            err = (delta[t] - want).abs().max().item()
            assert err < 1e-5 * (1 + want.abs().max().item()), (mod, t, s, err)
            checked += s == 1
        # the routed rows moved: not a zero delta everywhere
        if mod in fac:
            assert ref_delta[slot == 1].abs().max() > 1e-3
    assert checked >= 14 * 6


def test_block_ranks_name_each_experts_rank_per_module(experts, tmp_path):
    routed.write_routed_adapter(tmp_path / "r", experts["dirs"], lmf.Arrow(top_k=1))
    spec = routed.read_routed_config(tmp_path / "r")
    fac = _folder_factors(tmp_path / "r")
    for mod, want in (("model.layers.0.self_attn.q_proj", [8, 4, 8]),
                      ("model.layers.1.self_attn.k_proj", [8, 4, 0]),
                      ("model.layers.1.mlp.down_proj", [8, 4, 8])):
        A = torch.zeros(2, 32, fac[mod]["A"].shape[1], dtype=torch.float64)
        A[1, :24] = fac[mod]["A"]  # slice 1 of a packed 2-slice stack; slice 0 empty
        assert routed.block_ranks(A.view(64, -1), 2, spec).tolist() == [[0, 0, 0], want]


PROMPT_ROUTERS = [lmf.PromptCached(lmf.Arrow(top_k=1), scope="model"),
                  lmf.PromptCached(lmf.SpectR(top_k=2), scope="model"),
                  lmf.PromptCached(lmf.SpectR(top_k=2, weighting="softmax"), scope="model",
                                   normalize="max")]


@pytest.mark.parametrize("router", PROMPT_ROUTERS, ids=["arrow1", "spectr2", "spectr2_softmax_max"])
def test_prompt_decision_matches_prompt_cached(experts, tmp_path, router):
    routed.write_routed_adapter(tmp_path / "p", experts["dirs"], router)
    spec = routed.read_routed_config(tmp_path / "p")
    assert spec.scope == "model"
    fac = _folder_factors(tmp_path / "p")
    model = tiny_model("llama", hidden=48, layers=2, vocab=64, heads=4, kv_heads=2,
                       intermediate=80, init_range=0.1, dtype=torch.float64)
    lib = lmf.AdapterLibrary.from_peft(experts["dirs"])
    lmf.patch(model, lib, router=router)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 64, (1, L), generator=g) for L in (5, 11, 8)]
    R = 32
    for ids in prompts:
        dec = router.decide(model, input_ids=ids)
        # the scoring pass's module inputs: the base model (adapters off)
        got = _capture(model, ids, adapter_names=["__base__"])
        # the wrapper's scoring pass (StepState.score at every module, slot 1 routed, slot 0
        # a named adapter), then StepState.decide
        L = ids.shape[1]
        pw = SimpleNamespace(_token_lora_indices=torch.ones(L, dtype=torch.int32))
        st = routed.StepState(pw, {1: (21, spec)}, {1: torch.arange(L)}, R, L, "cpu")
        st.model_rows[1] = (torch.ones(L, dtype=torch.int64), [("req", 1)])
        st.score_state[1] = routed._Scoring(spec, torch.full((L,), 1.0 / L), 1, "cpu")
        st.pending[1] = [("req", 1)]
        st.scoring = True
        stacks = []  # kept alive, as vLLM keeps its stacks (the rank cache is keyed by storage)
        for mod, (x, _) in got.items():
            A = torch.zeros(2, R, x.shape[1], dtype=torch.float64)
            A[0, :8] = torch.randn(8, x.shape[1], generator=g, dtype=torch.float64)
            A[1, :24] = fac[mod]["A"]
            stacks.append(A)
            st.score(x, A, 1)
        sc = st.score_state[1]
        assert int(sc.modules) == 14
        p = sc.total[1:2] / sc.modules
        assert (p.double() - dec.scores.double()).abs().max() < 1e-5, (p, dec.scores)
        st.decide()
        lora_id, idx, w = routed._DECISIONS.pop("req")
        idx, w = idx[None], w[None]
        assert lora_id == 21
        assert idx.tolist() == dec.idx.tolist()
        assert (w - dec.weights).abs().max() < 1e-6
        gate = routed.gate_of_decision(idx.expand(3, -1), w.expand(3, -1), 2, R, spec)
        want = torch.zeros(spec.n)
        want[idx[0].long()] = w[0]
        assert gate.view(3, 2, R)[:, :, :24].reshape(3, 2, 3, 8).amax(-1).sub(want).abs().max() \
            == 0


def test_write_routed_adapter_rejects_what_it_cannot_serve(experts, tmp_path):
    with pytest.raises(ValueError, match="merge='factor'"):
        routed.write_routed_adapter(tmp_path / "x", experts["dirs"], lmf.SpectR(merge="factor"))
    with pytest.raises(ValueError, match="scope='module'"):
        routed.write_routed_adapter(tmp_path / "x", experts["dirs"],
                                    lmf.PromptCached(lmf.Arrow(top_k=1)))
    with pytest.raises(TypeError, match="router must be"):
        routed.write_routed_adapter(tmp_path / "x", experts["dirs"], lmf.Uniform())
    with pytest.raises(ValueError, match="adapters must be"):
        routed.write_routed_adapter(tmp_path / "x", {}, lmf.Arrow())
    assert routed.read_routed_config(experts["dirs"]["a"]) is None  # a plain peft folder


@pytest.mark.parametrize("ranks", [[[8, 8, 4, 8], [8, 8, 4, 0], [8, 8, 4, 8]],  # 2 groups
                                   [[8, 8, 8, 8]] * 3,  # one call, no copy
                                   [[0, 0, 0, 0], [8, 4, 8, 8], [0, 0, 0, 0]]],  # empty slices
                         ids=["mixed", "all_equal", "untargeted_slices"])
@pytest.mark.parametrize("kind,weighting", [("spectr", "softmax"), ("arrow", "softmax"),
                                            ("spectr", "uniform")])
def test_token_gates_grouped_slices_equal_per_slice_calls(ranks, kind, weighting):
    """Slices scored together (host ranks given) gate exactly as one spectr_topk per slice."""
    spec = routed.RoutedSpec(experts=tuple("abcd"), block_rank=8, kind=kind, scope="token",
                             top_k=2, weighting=weighting, temperature=0.7)
    g = torch.Generator().manual_seed(3)
    rk = torch.tensor(ranks)
    h = torch.randn(13, 3, 32, generator=g)
    for i in range(3):  # zero past each expert's rank, as an aligned A gives
        for t in range(4):
            h[:, i, t * 8 + ranks[i][t]:(t + 1) * 8] = 0
    h = h.view(13, 96)
    per = routed.token_gates(h, rk, spec)
    grouped = routed.token_gates(h, rk, spec, tuple(tuple(r) for r in ranks))
    assert torch.equal(per, grouped)
    live = torch.tensor([any(r) for r in ranks])
    assert (per.view(13, 3, 32)[:, ~live] == 0).all()
    assert (per.view(13, 3, 32)[:, live].sum(-1) > 0).all()  # every token routed somewhere
