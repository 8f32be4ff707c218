"""A trainable library (issue 9, item 2): lmf.LoRASpec + AdapterLibrary.create (peft's init),
lib.parameters (leaf tensors, mixed-batch training), lib.save_peft (peft loads it, same outputs),
HF gradient checkpointing. The bar: two adapters trained at once in one mixed batch give the
adapters peft gives when it trains each alone on its rows (10 SGD steps, sum loss, fp32)."""
import copy
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import loramix_fast as lmf
from loramix_fast.adapters import AdapterError, LoRAFactors
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

V = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.py)


@pytest.fixture(scope="module")
def base():
    m = tiny_model("llama", vocab=V)
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def dirs(base, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train_lib"))
    return write_peft_adapters(base, [
        AdapterSpec("a", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        AdapterSpec("b", r=8, alpha=12, rslora=True,
                    targets=["v_proj", "o_proj", "gate_proj", "down_proj"],
                    rank_pattern={"down_proj": 3}, seed=2),
    ], d)


def _ids(batch, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, seqlen), generator=g)


def _sum_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1), reduction="sum")


def _patched(base, lib):
    m = lmf.patch(copy.deepcopy(base), lib)
    m.requires_grad_(False)
    return m


def _peft(base, folder, trainable=False):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=trainable)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- the bar --------------------------------------------------------------------------------
def test_mixed_batch_training_matches_peft_alone(base, dirs, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    steps, lr = 10, 0.02
    ids = _ids(4, 12)
    names = ["a", "b", "b", "a"]
    lib = lmf.AdapterLibrary.from_peft(dirs)
    model = _patched(base, lib).train()
    opt = torch.optim.SGD(lib.parameters(["a", "b"]), lr=lr)
    for _ in range(steps):  # both adapters, one mixed batch, one backward per step
        opt.zero_grad()
        _sum_loss(model(ids, adapter_names=names).logits, ids).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ours_logits = model(ids, adapter_names=names).logits
    for n in ("a", "b"):
        out = str(tmp_path / f"ours_{n}")
        lib.save_peft(n, out)
        rows = [i for i, x in enumerate(names) if x == n]
        pm = _peft(base, dirs[n], trainable=True).train()
        init = {k: v.clone() for k, v in get_peft_model_state_dict(pm).items()}
        popt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=lr)
        for _ in range(steps):  # peft trains this adapter alone on its rows
            popt.zero_grad()
            _sum_loss(pm(ids[rows]).logits, ids[rows]).backward()
            popt.step()
        want = get_peft_model_state_dict(pm)
        got = load_file(os.path.join(out, "adapter_model.safetensors"))
        assert set(got) == set(want)
        for k in want:
            assert _rel(got[k], want[k]) <= 1e-4, k
            assert _rel(want[k], init[k]) > 1e-3, k  # training moved it (the check is not vacuous)
        # the config is the original one (alpha, rslora, rank pattern, targets)
        cfg_in = json.load(open(os.path.join(dirs[n], "adapter_config.json")))
        cfg_out = json.load(open(os.path.join(out, "adapter_config.json")))
        for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                    "target_modules"):
            assert cfg_out.get(key) == cfg_in.get(key), key
        # peft loads our folder: the outputs of peft's own trained adapter, and of ours
        loaded = _peft(base, out).eval()
        pm.eval()
        with torch.no_grad():
            ref = pm(ids[rows]).logits
            assert _rel(loaded(ids[rows]).logits, ref) <= 1e-5
            assert _rel(ours_logits[rows], ref) <= 1e-5


# ---- create(): peft's initialisation --------------------------------------------------------
def _peft_layers(base, **cfg):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    out = {}
    for name, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            out[name] = (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                         m.scaling["default"])
    return out


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.mlp\.(up|down)_proj",
                                     "all-linear", None], ids=["list", "regex", "all", "default"])
def test_create_targets_shapes_scales_like_peft(base, targets):
    spec = lmf.LoRASpec(r=8, alpha=16, target_modules=targets, rank_pattern={"v_proj": 4},
                        alpha_pattern={"up_proj": 4})
    lib = lmf.AdapterLibrary.create(base, {"m": spec}, seed=0)
    want = _peft_layers(base, r=8, lora_alpha=16, target_modules=targets,
                        rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 4})
    got = lib.factors("m")
    assert set(got) == set(want)
    for mod, (A, B, s) in want.items():
        f = got[mod]
        assert f.A.shape == A.shape and f.B.shape == B.shape, mod
        assert f.scale == pytest.approx(s), mod
        assert f.A.dtype == torch.float32 and not f.A.requires_grad


def test_create_init_statistics_and_seeds(base):
    K = 64
    specs = {"kaiming": lmf.LoRASpec(r=16, alpha=16, target_modules="all-linear"),
             "gauss": lmf.LoRASpec(r=16, target_modules="all-linear", init_lora_weights="gaussian"),
             "rand": lmf.LoRASpec(r=16, target_modules="all-linear", init_lora_weights=False),
             "rs": lmf.LoRASpec(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"])}
    lib = lmf.AdapterLibrary.create(base, specs, seed=0)
    peft_k = _peft_layers(base, r=16, lora_alpha=16, target_modules="all-linear")

    def cat(name, which):
        return torch.cat([getattr(f, which).flatten() for m, f in lib.factors(name).items()
                          if f.A.shape[1] == K])

    bound = 1 / math.sqrt(K)  # kaiming_uniform(a=sqrt(5)) on [r, K]: U(-1/sqrt(K), 1/sqrt(K))
    a = cat("kaiming", "A")
    pa = torch.cat([A.flatten() for A, _, _ in peft_k.values() if A.shape[1] == K])
    assert a.abs().max() <= bound and pa.abs().max() <= bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert a.std().item() == pytest.approx(pa.std().item(), rel=0.05)
    assert all(torch.count_nonzero(f.B) == 0 for n in ("kaiming", "gauss")
               for f in lib.factors(n).values())
    assert cat("gauss", "A").std().item() == pytest.approx(1 / 16, rel=0.05)
    b = cat("rand", "B")  # nn.Linear(r, N)'s init: U(-1/sqrt(r), 1/sqrt(r))
    assert b.abs().max() <= 1 / 4 and b.std().item() == pytest.approx(0.25 / math.sqrt(3), rel=0.05)
    assert lib.factors("rs")["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 4)
    # numbers depend on (seed, name) only: same seed, other adapters around -> same factors
    again = lmf.AdapterLibrary.create(base, {"x": specs["rs"], "kaiming": specs["kaiming"]}, seed=0)
    other = lmf.AdapterLibrary.create(base, {"kaiming": specs["kaiming"]}, seed=1)
    for mod, f in lib.factors("kaiming").items():
        assert torch.equal(again.factors("kaiming")[mod].A, f.A)
        assert not torch.equal(other.factors("kaiming")[mod].A, f.A)


def test_create_zero_B_leaves_the_model_unchanged(base):
    lib = lmf.AdapterLibrary.create(base, {"m": lmf.LoRASpec(r=8, target_modules="all-linear")})
    model = _patched(base, lib)
    ids = _ids(2, 9)
    with torch.no_grad():
        ref = base(ids).logits
        assert torch.allclose(model(ids, adapter_names=["m", "m"]).logits, ref, atol=1e-6)
    model.train()  # the trainable path too
    lib.parameters()
    assert torch.allclose(model(ids, adapter_names=["m", "__base__"]).logits, ref, atol=1e-6)


def test_save_peft_of_created_and_added_adapters(base, tmp_path):
    specs = {"c": lmf.LoRASpec(r=6, alpha=10, use_rslora=True, target_modules=["k_proj", "up_proj"],
                               rank_pattern={"up_proj": 2}, alpha_pattern={"k_proj": 3},
                               init_lora_weights=False)}
    lib = lmf.AdapterLibrary.create(base, specs, seed=3)
    g = torch.Generator().manual_seed(5)
    mod = "model.layers.1.mlp.gate_proj"
    lib.add("plain", {mod: LoRAFactors(torch.randn(3, 64, generator=g),
                                       torch.randn(98, 3, generator=g) * 0.1, 0.7)})
    model = _patched(base, lib)
    ids = _ids(2, 8)
    for n in ("c", "plain"):
        lib.save_peft(n, tmp_path / n)
        with torch.no_grad():
            want = _peft(base, str(tmp_path / n))(ids).logits
            got = model(ids, adapter_names=[n, n]).logits
            assert _rel(got, want) <= 1e-5
            assert _rel(want, base(ids).logits) > 1e-3
    cfg = json.load(open(tmp_path / "c" / "adapter_config.json"))
    assert cfg["target_modules"] == ["k_proj", "up_proj"] and cfg["use_rslora"]


# ---- training semantics -----------------------------------------------------------------------
def test_base_rows_give_no_gradient(base, dirs):
    lib = lmf.AdapterLibrary.from_peft({"a": dirs["a"]})
    model = _patched(base, lib).train()
    params = lib.parameters(["a"])
    assert all(p.is_leaf and p.requires_grad for p in params)
    ids = _ids(2, 10)
    logits = model(ids, adapter_names=["a", "__base__"]).logits
    _sum_loss(logits[1:], ids[1:]).backward()  # the base row's loss only
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in params)
    for p in params:
        p.grad = None
    mixed = model(ids, adapter_names=["a", "__base__"], labels=ids).loss * 18  # HF mean: 2 x 9
    mixed.backward()
    g_mixed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    _sum_loss(model(ids[:1], adapter_names=["a"]).logits, ids[:1]).backward()
    for gm, p in zip(g_mixed, params):
        assert _rel(gm, p.grad) <= 1e-5


def test_frozen_adapter_bit_identical_and_no_stale_stack(base, dirs, tmp_path):
    lib = lmf.AdapterLibrary.from_peft(dirs)
    model = _patched(base, lib)
    ids = _ids(2, 10)
    names = ["a", "b"]
    with torch.no_grad():  # builds the cached stacks an optimizer step must invalidate
        before = model(ids, adapter_names=names).logits
    frozen = {m: (f.A.clone(), f.B.clone()) for m, f in lib.factors("b").items()}
    opt = torch.optim.AdamW(lib.parameters(["a"]), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        _sum_loss(model(ids, adapter_names=names).logits, ids).backward()
        opt.step()
    for m, f in lib.factors("b").items():
        assert torch.equal(f.A, frozen[m][0]) and torch.equal(f.B, frozen[m][1])
        assert not f.A.requires_grad and not f.B.requires_grad
    lib.save_peft("a", tmp_path / "a")
    fresh = _patched(base, lmf.AdapterLibrary.from_peft({"a": str(tmp_path / "a"), "b": dirs["b"]}))
    model.eval()
    with torch.no_grad():
        after = model(ids, adapter_names=names).logits
        want = fresh(ids, adapter_names=names).logits
    assert _rel(after, want) <= 1e-6
    assert _rel(after[0], before[0]) > 1e-4  # "a" changed ...
    assert _rel(after[1], before[1]) <= 1e-6  # ... "b" did not
    assert _rel(model(ids, adapter_names=names).logits.detach(), want) <= 1e-6  # grad-enabled


def test_padded_rows_of_unequal_ranks_stay_zero(base):
    specs = {"lo": lmf.LoRASpec(r=2, target_modules=["q_proj"], init_lora_weights=False),
             "hi": lmf.LoRASpec(r=6, target_modules=["q_proj"], init_lora_weights=False)}
    lib = lmf.AdapterLibrary.create(base, specs, seed=0)
    model = _patched(base, lib).train()
    opt = torch.optim.AdamW(lib.parameters(), lr=1e-2, weight_decay=0.1)
    ids = _ids(2, 8)
    for _ in range(3):
        opt.zero_grad()
        _sum_loss(model(ids, adapter_names=["lo", "hi"]).logits, ids).backward()
        opt.step()
    mod = "model.layers.0.self_attn.q_proj"
    assert lib.factors("lo")[mod].A.shape == (2, 64) and lib.factors("lo")[mod].B.shape == (64, 2)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            st = lib.stack(mod, torch.float32, torch.device("cpu"))
        assert st.A.requires_grad == grad and st.rank.tolist() == [2, 6]
        assert torch.count_nonzero(st.A[0, 2:]) == 0 and torch.count_nonzero(st.B[0, :, 2:]) == 0
        assert torch.equal(st.A[0, :2], lib.factors("lo")[mod].A.detach())
        assert torch.equal(st.B[1], lib.factors("hi")[mod].B.detach())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_gradients(base, dirs, reentrant):
    lib = lmf.AdapterLibrary.from_peft(dirs)
    model = _patched(base, lib).train()
    params = lib.parameters()
    ids = _ids(3, 10)
    names = ["b", "__base__", "a"]

    def grads():
        for p in params:
            p.grad = None
        model(ids, adapter_names=names, labels=ids).loss.backward()
        return [p.grad.clone() for p in params]

    ref = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = grads()
    for g, r in zip(got, ref):
        assert _rel(g, r) <= 1e-5


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(dropout=0.1), "dropout=0.1 is not supported"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
    (dict(target_modules="(["), "not a valid regular expression"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_specs(kw, match):
    with pytest.raises(ValueError, match=match):
        lmf.LoRASpec(**kw)


@pytest.mark.parametrize("targets, match", [
    (["nothing_here"], "match no module"),
    (["lm_head"], "LM head"),
    (["embed_tokens"], "an embedding"),
    (["mlp"], "LlamaMLP"),
])
def test_create_bad_targets(base, targets, match):
    with pytest.raises(AdapterError, match=match):
        lmf.AdapterLibrary.create(base, {"x": lmf.LoRASpec(target_modules=targets)})


def test_unknown_names_and_bad_calls(base, dirs, tmp_path):
    lib = lmf.AdapterLibrary.from_peft({"a": dirs["a"]})
    with pytest.raises(KeyError, match="unknown adapter 'nope'.*'a'"):
        lib.parameters(["a", "nope"])
    with pytest.raises(KeyError, match="base model, not an adapter"):
        lib.parameters(["__base__"])
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        lib.save_peft("nope", tmp_path / "x")
    with pytest.raises(TypeError, match="LoRASpec"):
        lmf.AdapterLibrary.create(base, {"x": {"r": 8}})
    with pytest.raises(TypeError, match="non-empty dict"):
        lmf.AdapterLibrary.create(base, {})
    with pytest.raises(ValueError, match="other than '__base__'"):
        lmf.AdapterLibrary.create(base, {"__base__": lmf.LoRASpec(target_modules=["q_proj"])})
    with pytest.raises(ValueError, match="already in the library"):
        lib.add_new("a", base, lmf.LoRASpec(target_modules=["q_proj"]))
    assert lib.parameters("a")  # a single name is a list of one
    with pytest.raises(RuntimeError, match="before handing out"):
        lib.to(torch.float64)


def test_training_after_serving_under_inference_mode(base, dirs):
    """A library added to and served under torch.inference_mode first (a server that later
    fine-tunes, ensemble_generate before fitting) still trains: its stacks hold normal tensors,
    and the gradients equal those of a library that never saw inference mode."""
    ids = _ids(2, 9, seed=3)

    def grads(lib, model):
        params = lib.parameters(["a"])
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, adapter_names=["a", "b"]).logits
        _sum_loss(logits, ids).backward()
        return [p.grad.clone() for p in params] + [emb.grad.clone()]

    with torch.inference_mode():
        lib = lmf.AdapterLibrary.from_peft({"a": dirs["a"]})
    model = _patched(base, lib)  # the model's own weights stay normal tensors
    with torch.inference_mode():
        lib.add_peft("b", dirs["b"])
        model(ids, adapter_names=["a", "b"])  # stacks first built here
    got = grads(lib, model)
    lib2 = lmf.AdapterLibrary.from_peft({"a": dirs["a"], "b": dirs["b"]})
    want = grads(lib2, _patched(base, lib2))
    for g, w in zip(got, want):
        assert _rel(g, w) <= 1e-6
