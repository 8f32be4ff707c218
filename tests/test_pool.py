"""The adapter pool (issue 13): stable ids, slots reused after a remove, one copy (views into the
pool), outputs equal to a freshly built library (and to peft) after any add / remove sequence,
residency with LRU eviction and reload, and forwards that never see a torn library while other
threads add and remove adapters."""
import copy
import random
import threading

import pytest
import torch

import loramix_fast as lmf
from loramix_fast import pool as lmf_pool
from loramix_fast.adapters import AdapterError
from loramix_fast.testing import AdapterSpec, peft_multi, tiny_model, write_peft_adapters

Q0 = "model.layers.0.self_attn.q_proj"
N_ADAPTERS = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.py)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def dirs(base, tmp_path_factory):
    targets = [["q_proj", "v_proj"], ["q_proj", "o_proj", "up_proj"], ["v_proj", "down_proj"]]
    specs = [AdapterSpec(f"p{i}", r=(2, 4, 8, 3)[i % 4], targets=targets[i % 3], seed=10 + i)
             for i in range(N_ADAPTERS)]
    return write_peft_adapters(base, specs, str(tmp_path_factory.mktemp("pool")))


def _fresh(dirs, names, **kw):
    lib = lmf.AdapterLibrary(**kw)
    for n in names:
        lib.add_peft(n, dirs[n])
    return lib


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ids(batch=4, seqlen=6, seed=0):
    return torch.randint(3, 128, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _factors(seed, r=4, mods=(Q0,), K=64, N=64):
    g = torch.Generator().manual_seed(seed)
    return {m: lmf.LoRAFactors(torch.randn(r, K, generator=g) * 0.2,
                               torch.randn(N, r, generator=g) * 0.2, 1.5) for m in mods}


# ---- ids ----------------------------------------------------------------------------------
def test_ids_are_stable_and_free_ids_are_reused(dirs):
    lib = _fresh(dirs, ["p0", "p1", "p2", "p3"])
    assert lib.names == ("p0", "p1", "p2", "p3") and lib.ids_of(["p2", "__base__"]) == [2, -1]
    lib.remove("p1")
    assert lib.names == ("p0", None, "p2", "p3") and len(lib) == 3
    assert [lib.id_of(n) for n in ("p0", "p2", "p3")] == [0, 2, 3]
    with pytest.raises(KeyError, match="unknown adapter 'p1'"):
        lib.id_of("p1")
    lib.remove("p0")
    lib.add_peft("p4", dirs["p4"])  # the lowest free id
    assert lib.id_of("p4") == 0 and lib.names == ("p4", None, "p2", "p3")
    lib.add_peft("p5", dirs["p5"])
    assert lib.id_of("p5") == 1
    lib.add_peft("p6", dirs["p6"])  # none free: a new id
    assert lib.id_of("p6") == 4
    lib.remove("p6")  # a free id at the end leaves the id space
    assert lib.names == ("p4", "p5", "p2", "p3")
    st = lib.stack(Q0, torch.float32, "cpu")
    assert st.A.shape[0] == 4 and st.names == lib.names


# ---- one copy -----------------------------------------------------------------------------
def test_factors_are_views_into_the_pool(dirs):
    lib = _fresh(dirs, ["p0", "p1", "p2", "p3", "p4"])
    for mod in lib.modules():
        st = lib.stack(mod, torch.float32, "cpu")
        if st is None:
            continue
        lo = st.A.untyped_storage().data_ptr()
        hi = lo + st.A.untyped_storage().nbytes()
        for n in lib.names:
            f = lib.factors(n).get(mod)
            if f is None:
                continue
            i = lib.id_of(n)
            assert lo <= f.A.data_ptr() < hi and f.A.data_ptr() == st.A[i].data_ptr()
            assert f.B.untyped_storage().data_ptr() == st.B.untyped_storage().data_ptr()
            assert torch.equal(st.A[i, :f.rank], f.A) and torch.equal(st.B[i, :, :f.rank], f.B)
    # the library holds its slots and nothing else (no per-adapter copies, no stacks beside)
    stacks = [lib.stack(m, torch.float32, "cpu") for m in lib.modules()]
    held = lmf_pool.storages_nbytes([t for st in stacks if st is not None for t in (st.A, st.B)])
    assert lib.nbytes() == held


def test_pool_grows_geometrically_with_one_copy():
    lib = lmf.AdapterLibrary()
    per = (4 * 64 + 64 * 4) * 4
    caps = set()
    for i in range(100):
        lib.add(f"a{i}", _factors(i))
        st = lib.stack(Q0, torch.float32, "cpu")
        caps.add(st.pool.cap)
        assert lib.nbytes() <= (1.25 * (i + 1) + 8) * per  # spare capacity: 1.25x (+ 8 slots)
    assert len(caps) <= 13  # 8, 16, 24, 32, 40, 56, 72, 96, 120: geometric, not one per add
    assert lib.factors("a0")[Q0].A.data_ptr() == lib.stack(Q0, torch.float32, "cpu").A[0].data_ptr()


# ---- outputs ------------------------------------------------------------------------------
@torch.no_grad()
def test_any_add_remove_sequence_equals_a_fresh_library_and_peft(base, dirs):
    rng = random.Random(0)
    lib = lmf.AdapterLibrary()
    model = lmf.patch(copy.deepcopy(base), lib)
    names = list(dirs)
    ids = _ids(4, 6)
    for step in range(14):
        present = [n for n in lib.names if n is not None]
        absent = [n for n in names if n not in lib]
        if absent and (len(present) < 2 or rng.random() < 0.6):
            n = rng.choice(absent)
            lib.add_peft(n, dirs[n])
        else:
            victim = rng.choice(present)
            keep = [n for n in present if n != victim]
            sel = [rng.choice(keep) for _ in range(4)] if keep else ["__base__"] * 4
            before = model(ids, adapter_names=sel).logits
            lib.remove(victim)
            # every other adapter's outputs are bit-identical
            assert torch.equal(model(ids, adapter_names=sel).logits, before)
        present = [n for n in lib.names if n is not None]
        sel = [rng.choice(present + ["__base__"]) for _ in range(4)]
        got = model(ids, adapter_names=sel).logits
        fresh = lmf.patch(copy.deepcopy(base), _fresh(dirs, present))
        assert _rel(got, fresh(ids, adapter_names=sel).logits) <= 1e-6, (step, sel)
        if step % 4 == 3:  # against peft, a mixed batch
            pm = peft_multi(base, {n: dirs[n] for n in present})
            want = pm(ids, adapter_names=sel).logits
            assert _rel(got, want) <= 1e-5, (step, sel)


@torch.no_grad()
@pytest.mark.parametrize("max_resident", [None, 8], ids=["pool", "max_resident"])
def test_remove_leaves_every_other_adapter_bit_identical(base, max_resident):
    """One sequence per adapter (ranks 1-8, various targets); adapters are removed one by one in
    random order (and new ones added into the freed ids): after each change every remaining
    adapter's sequence gives bit-identical logits, the removed ones' sequences the base model's."""
    mods = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith("model.")]
    rng = random.Random(5)
    lib = lmf.AdapterLibrary(max_resident=max_resident)
    names = [f"r{i}" for i in range(8)]
    for i, n in enumerate(names):
        targets = rng.sample(mods, 4)
        shapes = {m: (base.get_submodule(m).in_features, base.get_submodule(m).out_features)
                  for m in targets}
        g = torch.Generator().manual_seed(50 + i)
        r = 1 + i
        lib.add(n, {m: lmf.LoRAFactors(torch.randn(r, K, generator=g) * 0.3,
                                       torch.randn(N, r, generator=g) * 0.3, 2.0 / r)
                    for m, (K, N) in shapes.items()})
    model = lmf.patch(copy.deepcopy(base), lib)
    plain = copy.deepcopy(base)
    ids = _ids(len(names), 5, seed=3)
    sel = list(names)
    want = model(ids, adapter_names=sel).logits
    base_out = plain(ids).logits
    order = names[:]
    rng.shuffle(order)
    for k, victim in enumerate(order[:-1]):
        lib.remove(victim)
        sel[names.index(victim)] = "__base__"
        if k == 2:  # a new adapter takes a freed id; nobody selects it
            lib.add("new", _factors(77, r=8))
            assert lib.id_of("new") < len(names)
        got = model(ids, adapter_names=sel).logits
        for j, n in enumerate(sel):
            if n == "__base__":
                assert torch.allclose(got[j], base_out[j], rtol=1e-5, atol=1e-5), (victim, j)
            else:
                assert torch.equal(got[j], want[j]), (victim, n)


@torch.no_grad()
@pytest.mark.parametrize("router", [lmf.SpectR(top_k=2), lmf.Arrow(top_k=2), lmf.Uniform(),
                                    lmf.PromptCached(lmf.SpectR(top_k=2))], ids=repr)
def test_routers_follow_adds_and_removes(base, dirs, router):
    lib = _fresh(dirs, ["p0", "p1", "p2", "p3"])
    model = lmf.patch(copy.deepcopy(base), lib, router=router)
    ids = _ids(2, 5)
    model(ids)  # aligns every slot
    calls = []
    real = lmf.routing._align_slot

    def counting(stack, t, *a):
        calls.append(t)
        return real(stack, t, *a)

    lmf.routing._align_slot = counting
    try:
        lib.remove("p1")
        lib.add_peft("p4", dirs["p4"])  # takes id 1
        lib.add_peft("p5", dirs["p5"])  # id 4
        got = model(ids).logits
    finally:
        lmf.routing._align_slot = real
    if not isinstance(router, lmf.Uniform):
        assert set(calls) == {1, 4}  # only the slots that changed are aligned again
    order = ["p0", "p4", "p2", "p3", "p5"]  # same ids as the pool: same top-k tie-breaking
    fresh = lmf.patch(copy.deepcopy(base), _fresh(dirs, order), router=router)
    assert _rel(got, fresh(ids).logits) <= 1e-6
    lib.remove("p2")  # a hole in the middle: routers skip it
    fresh = lmf.patch(copy.deepcopy(base), _fresh(dirs, ["p0", "p4", "p3", "p5"]), router=router)
    if isinstance(router, (lmf.Uniform, lmf.Arrow)) or getattr(router, "router", None) is None:
        assert _rel(model(ids).logits, fresh(ids).logits) <= 1e-6


# ---- residency ----------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("offload", ["host", "folder"])
def test_residency_evicts_lru_and_reloads(base, dirs, offload):
    names = ["p0", "p1", "p2", "p3", "p4"]
    full = lmf.patch(copy.deepcopy(base), _fresh(dirs, names))
    lib = _fresh(dirs, names, max_resident=2, offload=offload)
    model = lmf.patch(copy.deepcopy(base), lib)
    ids = _ids(3, 5)
    res = None
    for sel in (["p0", "p1", "p0"], ["p2", "__base__", "p2"], ["p3", "p1", "p3"],
                ["p0", "p4", "__base__"], ["p1", "p0", "p1"], ["p2", "p3", "p2"]):
        got = model(ids, adapter_names=sel).logits
        assert torch.equal(got, full(ids, adapter_names=sel).logits), sel
        res = lib._res[(torch.float32, torch.device("cpu"))]
        assert len(res.slot_of) <= 2 and all(lib.id_of(n) in res.slot_of
                                              for n in sel if n != "__base__")
    # LRU: after ["p1", "p0"] then ["p2", "p3"], p2 and p3 are resident, in the two slots
    assert set(res.slot_of) == {lib.id_of("p2"), lib.id_of("p3")}
    assert lib.stack(Q0, torch.float32, "cpu").A.shape[0] == 2  # slots, not ids
    # the counters: 6 forwards above select 11 adapters (2 already resident: p1, p0), 2 loads
    # fill never-used slots
    r0 = lib.residency()["float32@cpu"]
    assert sorted(r0["resident"]) == ["p2", "p3"] and r0["limit"] == 2
    assert (r0["hits"], r0["loads"], r0["evictions"]) == (2, 9, 7)
    model(ids, adapter_names=["p3", "p2", "p3"])  # both resident: two hits
    model(ids, adapter_names=["p2", "p0", "p2"])  # p0 is loaded in place of p3 (the LRU one)
    r1 = lib.residency()["float32@cpu"]
    assert (r1["hits"] - r0["hits"], r1["loads"] - r0["loads"],
            r1["evictions"] - r0["evictions"]) == (3, 1, 1)
    assert sorted(r1["resident"]) == ["p0", "p2"]
    assert _fresh(dirs, ["p0"]).residency() == {}
    if offload == "folder":
        assert all(lib._host[n] is None for n in names)
    with pytest.raises(AdapterError, match="selects 3 adapters at once.*max_resident=2"):
        model(ids, adapter_names=["p0", "p1", "p2"])
    assert torch.equal(model(ids, adapter_names=["p4", "p4", "p1"]).logits,
                       full(ids, adapter_names=["p4", "p4", "p1"]).logits)
    lmf.set_router(model, lmf.SpectR(top_k=2))
    with pytest.raises(AdapterError, match="routing over every adapter needs 5 adapters"):
        model(ids)
    # a router over a library that fits
    small = _fresh(dirs, ["p0", "p2"], max_resident=2, offload=offload)
    ms = lmf.patch(copy.deepcopy(base), small, router=lmf.SpectR(top_k=1))
    mf = lmf.patch(copy.deepcopy(base), _fresh(dirs, ["p0", "p2"]), router=lmf.SpectR(top_k=1))
    assert _rel(ms(ids).logits, mf(ids).logits) <= 1e-6


@torch.no_grad()
def test_residency_with_generate_and_remove(base, dirs):
    lib = _fresh(dirs, ["p0", "p1", "p2"], max_resident=1)
    model = lmf.patch(copy.deepcopy(base), lib)
    full = lmf.patch(copy.deepcopy(base), _fresh(dirs, ["p0", "p1", "p2"]))
    ids = _ids(2, 4)
    for n in ("p2", "p0"):
        got = model.generate(ids, adapter_names=[n, n], max_new_tokens=4, do_sample=False)
        want = full.generate(ids, adapter_names=[n, n], max_new_tokens=4, do_sample=False)
        assert torch.equal(got, want)
    lib.remove("p0")
    lib.add_peft("p3", dirs["p3"])
    full = lmf.patch(copy.deepcopy(base), _fresh(dirs, ["p3", "p1", "p2"]))
    assert torch.equal(model(ids, adapter_names=["p3", "p3"]).logits,
                       full(ids, adapter_names=["p3", "p3"]).logits)


# ---- concurrency --------------------------------------------------------------------------
@torch.no_grad()
def test_changes_during_a_forward_are_invisible_to_it(base, dirs):
    """A hook inside the forward (after layer 0) adds and removes adapters from another thread:
    the rest of that forward still sees the library as of its start."""
    lib = _fresh(dirs, ["p0", "p1", "p2"])
    model = lmf.patch(copy.deepcopy(base), lib, router=lmf.Uniform())
    ids = _ids(2, 5)
    sel = ["p1", "p2"]
    want_sel = model(ids, adapter_names=sel).logits
    want_uni = model(ids).logits
    old_id = lib.id_of("p1")
    seen = {}

    def change():
        lib.remove("p1")
        lib.add_peft("p3", dirs["p3"])  # must not take p1's slot while the forward runs
        seen["p3"] = lib.id_of("p3")
        for i in range(30):  # grow every pool past its capacity
            lib.add(f"x{i}", _factors(100 + i, mods=(Q0, "model.layers.1.self_attn.q_proj")))

    def hook(mod, args, out):
        if not seen:
            t = threading.Thread(target=change)
            t.start()
            t.join()

    h = model.model.layers[0].register_forward_hook(hook)
    try:
        got_sel = model(ids, adapter_names=sel).logits
    finally:
        h.remove()
    assert torch.equal(got_sel, want_sel)  # p1 still served, nothing new mixed in
    assert seen["p3"] != old_id
    assert "p1" not in lib and lib.names[old_id] is None
    seen.clear()
    lib2 = _fresh(dirs, ["p0", "p1", "p2"])
    m2 = lmf.patch(copy.deepcopy(base), lib2, router=lmf.Uniform())

    def hook2(mod, args, out):
        if not seen:
            seen["x"] = 1
            lib2.add_peft("p3", dirs["p3"])
            lib2.remove("p0")

    h = m2.model.layers[0].register_forward_hook(hook2)
    try:
        got_uni = m2(ids).logits  # Uniform mixes every adapter: the same three all through
    finally:
        h.remove()
    assert torch.equal(got_uni, want_uni)
    lib.add_peft("p4", dirs["p4"])  # no forward running any more: the free id is reused
    assert lib.id_of("p4") == old_id


@torch.no_grad()
def test_threads_serving_while_others_add_and_remove(base, dirs):
    lib = _fresh(dirs, ["p0", "p1"])
    model = lmf.patch(copy.deepcopy(base), lib)
    ids = _ids(2, 5)
    sel = ["p1", "p0"]
    want = model(ids, adapter_names=sel).logits
    errors, stop, start = [], threading.Event(), threading.Barrier(3)

    def serve():
        try:
            # this thread's own reference: a thread's intra-op thread count (OpenMP) is its own,
            # and with it the summation order of the GEMMs
            ref = model(ids, adapter_names=sel).logits
            if _rel(ref, want) > 1e-6:
                errors.append("wrong")
            start.wait()
            while not stop.is_set():
                if not torch.equal(model(ids, adapter_names=sel).logits, ref):
                    errors.append("torn")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def churn():
        try:
            start.wait()
            for i in range(60):
                # ranks <= 4, q_proj's padding: no re-pad (a larger rank re-pads the module's
                # slots, which may move the other adapters' outputs in the last bits)
                lib.add(f"c{i}", _factors(200 + i, r=2 + i % 3))
                if i % 3 and f"c{i - 1}" in lib:
                    lib.remove(f"c{i - 1}")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            stop.set()

    ts = [threading.Thread(target=serve) for _ in range(2)] + [threading.Thread(target=churn)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert torch.equal(model(ids, adapter_names=sel).logits, want)


# ---- the library knows no model -------------------------------------------------------------
def test_library_does_not_import_patching():
    import inspect

    import loramix_fast.adapters as adapters

    src = inspect.getsource(adapters)
    assert ".patching" not in src and "_extend_patch" not in src
    # nor does it reach into a model: it only calls its listeners
    assert "_loramix_state" not in src and "setattr(" not in src and "get_submodule" not in src


class _Listener:
    def __init__(self, refuse=None, fail=False):
        self.refuse, self.fail, self.seen, self.undone = refuse, fail, [], []

    def check_adapter(self, lib, name, factors):
        if name == self.refuse:
            raise AdapterError(f"listener refuses {name!r}")

    def adapter_added(self, lib, name):
        if self.fail:
            raise AdapterError("listener failed")
        self.seen.append((name, lib.id_of(name), name in lib))
        return lambda: self.undone.append(name)


def test_listeners_hear_adds_refuse_and_roll_back(base, dirs):
    lib = lmf.AdapterLibrary()
    a, b = _Listener(refuse="no"), _Listener()
    lib.subscribe(a)
    lib.subscribe(b)
    lib.add("x", _factors(1))
    assert a.seen == [("x", 0, True)] and b.seen == [("x", 0, True)]
    with pytest.raises(AdapterError, match="listener refuses 'no'"):  # before the commit
        lib.add("no", _factors(2))
    assert "no" not in lib and lib.names == ("x",) and len(a.seen) == 1
    c = _Listener(fail=True)
    lib.subscribe(c)
    v = lib.version
    with pytest.raises(AdapterError, match="listener failed"):
        lib.add("y", _factors(3))
    # rolled back: the library as it was, the listeners that had seen the add undid it
    assert "y" not in lib and lib.names == ("x",) and lib.version > v
    for ls in (a, b):  # (listeners are called in no set order: c may come first)
        assert ls.undone == [n for n, _, _ in ls.seen if n == "y"]
    lib.unsubscribe(c)
    lib.add("y", _factors(3))
    assert lib.id_of("y") == 1
    with pytest.raises(TypeError, match="check_adapter"):
        lib.subscribe(object())
    # a patched model is a listener like any other: added (weakly held), dropped by unpatch
    model = lmf.patch(copy.deepcopy(base), lib)
    assert len(lib._listeners) == 3
    lmf.unpatch(model, guard=False)
    assert len(lib._listeners) == 2
    del a
    import gc

    gc.collect()
    assert len(lib._listeners) == 1  # held weakly


def test_pool_helpers():
    assert lmf_pool.grow_cap(0, 1) == 8 and lmf_pool.grow_cap(8, 9) == 16
    c, caps = 0, []
    for n in range(1, 300):
        c = lmf_pool.grow_cap(c, n)
        caps.append(c)
        assert n <= c <= 1.25 * n + 8
    assert len(set(caps)) < 20


@torch.no_grad()
def test_a_larger_rank_repads_without_changing_outputs(base, dirs):
    lib = _fresh(dirs, ["p0", "p1"])
    model = lmf.patch(copy.deepcopy(base), lib)
    ids = _ids(2, 5)
    want = model(ids, adapter_names=["p1", "p0"]).logits
    R = lib.stack(Q0, torch.float32, "cpu").max_rank
    lib.add("big", _factors(7, r=3 * R))
    assert lib.stack(Q0, torch.float32, "cpu").max_rank == 3 * R
    assert _rel(model(ids, adapter_names=["p1", "p0"]).logits, want) <= 1e-6
    assert lib.factors("p1")[Q0].A.data_ptr() == lib.stack(Q0, torch.float32, "cpu").A[1].data_ptr()


def test_trainable_slots_assemble_in_id_order():
    """Every slot of a module trainable: the stack assembled with grad holds each adapter at its
    id (the trainable set is unordered; the stack is not)."""
    lib = lmf.AdapterLibrary()
    names = ["zeta", "alpha", "mu", "beta", "omega", "kappa"]
    for i, n in enumerate(names):
        lib.add(n, _factors(300 + i, r=2 + i % 3))
    lib.remove("mu")
    lib.add("nu", _factors(400))  # takes the free id 2
    params = lib.parameters()
    assert all(p.is_leaf and p.requires_grad for p in params)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            st = lib.stack(Q0, torch.float32, "cpu")
        for n in lib.names:
            f = lib.factors(n)[Q0]
            assert torch.equal(st.A[lib.id_of(n), :f.rank], f.A.detach()), (grad, n)
            assert torch.equal(st.B[lib.id_of(n), :, :f.rank], f.B.detach()), (grad, n)
