"""Triton multi-LoRA kernels (kernels/multi_lora.py) under the Triton interpreter, on CPU tensors.

TRITON_INTERPRET=1 must be set before triton is imported, and other test files import triton
compiled-mode in the same pytest process. So this file works in two modes:
- normal run (no TRITON_INTERPRET): one test re-runs this file in a child ``python -m pytest`` with
  TRITON_INTERPRET=1 and LORAMIX_BACKEND=triton, and fails with the child's output if it fails;
- child run (TRITON_INTERPRET=1 in the environment from the start): the parametrized cases below.
Run the cases directly with ``TRITON_INTERPRET=1 pytest tests/test_triton_multi_lora.py``.

Oracle: ``reference.multi_lora_linear(..., upcast=True)`` (fp64). Tolerance (flash-attention style):
at most twice the error of the plain-torch reference at the same dtype, plus a floor of a few ulps
of the output's scale.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRET:
    def test_kernels_import_nothing_above_them():
        """kernels/ is the bottom layer: no import of loramix_fast (ops, reference, ...)."""
        import ast

        root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
        for name in sorted(os.listdir(root)):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(root, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    assert node.level <= 1 and not (node.module or "").startswith("loramix_fast"), \
                        f"kernels/{name} imports {node.module!r} (level {node.level})"
                elif isinstance(node, ast.Import):
                    assert not any(a.name.startswith("loramix_fast") for a in node.names), \
                        f"kernels/{name} imports loramix_fast"

    def test_interpreter_suite_in_subprocess():
        pytest.importorskip("triton")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from interpret import run_file_under_interpreter

        print(run_file_under_interpreter(__file__))

else:
    triton = pytest.importorskip("triton")
    from loramix_fast import reference
    from loramix_fast.kernels import multi_lora as K
    from loramix_fast.kernels.multi_lora import (GROUPED_MIN_M, multi_lora_expand_dense,
                                                 multi_lora_expand_triton,
                                                 multi_lora_linear_dense,
                                                 multi_lora_linear_triton,
                                                 multi_lora_linear_unfused)

    EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: 2.0 ** -10,
           torch.bfloat16: 2.0 ** -7}

    @dataclass
    class Case:
        name: str
        M: int = 9
        K: int = 41
        N: int = 37
        E: int = 3
        R: int = 8
        S: int = 1
        ranks: list | None = None        # None: every adapter at full rank R
        popularity: str = "uniform"      # distinct | uniform | identical | zipf
        none_frac: float = 0.0           # fraction of slots set to -1
        oob: bool = False                # put ids >= E and < -1 in some slots (must act as none)
        has_w: bool = False
        has_bias: bool = False
        transposed_weight: bool = False  # weight as a [K, N] tensor's .T view (HF Conv1D)
        strided_x: bool = False          # x a column-strided view
        dtype: torch.dtype = torch.float32
        grouped: bool | None = None      # force the adapter-grouped large-M path (None: by M)
        config: dict = field(default_factory=dict)
        idx64: bool = False

        def __str__(self):
            return self.name

    SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}  # many tiles, tiny shapes

    CASES = [
        Case("decode_m1_distinct_fp16", M=1, K=64, N=48, E=4, R=16, popularity="distinct",
             dtype=torch.float16),
        Case("odd_9x41x37_uneven_ranks_s3_w_bias_fp32", S=3, E=3, R=5, ranks=[5, 0, 3],
             none_frac=0.3, oob=True, has_w=True, has_bias=True),
        Case("odd_9x41x37_uneven_ranks_s3_w_bias_fp16", S=3, E=3, R=5, ranks=[5, 0, 3],
             none_frac=0.3, oob=True, has_w=True, has_bias=True, dtype=torch.float16),
        Case("identical_grouped_fp16", M=20, K=32, N=40, E=4, R=8, popularity="identical",
             grouped=True, has_bias=True, dtype=torch.float16, config=SMALL),
        Case("uniform_grouped_s3_w_transposed_fp32", M=40, K=24, N=33, E=5, R=8,
             ranks=[8, 3, 0, 7, 1], S=3, has_w=True, has_bias=True, transposed_weight=True,
             none_frac=0.2, oob=True, grouped=True, config=SMALL),
        Case("uniform_gathered_mixed_tiles_fp16", M=40, K=24, N=33, E=5, R=8,
             ranks=[8, 3, 0, 7, 1], S=1, none_frac=0.2, grouped=False, dtype=torch.float16,
             config=SMALL),
        Case("zipf_grouped_rank20_fp32", M=33, K=40, N=20, E=6, R=20, ranks=[20, 17, 1, 9, 0, 20],
             popularity="zipf", grouped=True, has_w=True, config=SMALL),
        Case("split_k_shrink_transposed_fp16", M=3, K=100, N=24, E=3, R=6, S=2, has_w=True,
             transposed_weight=True, dtype=torch.float16, config={"SPLIT": 4}),
        Case("all_rows_none_fp32", M=5, K=16, N=16, E=2, R=4, none_frac=1.0, has_bias=True),
        Case("m0", M=0, K=16, N=16, E=2, R=4, has_bias=True),
        Case("m1_s3_oob_fp32", M=1, K=17, N=19, E=2, R=3, S=3, oob=True, has_w=True),
        Case("strided_x_int64_idx_fp32", M=6, K=20, N=18, E=3, R=4, strided_x=True, idx64=True,
             none_frac=0.3),
        Case("m130_default_path_is_grouped_zipf", M=130, K=16, N=16, E=5, R=4, ranks=[4, 3, 2, 1, 0],
             popularity="zipf", none_frac=0.1, has_bias=True, config=SMALL),
        Case("bf16_grouped", M=24, K=32, N=24, E=3, R=8, ranks=[8, 5, 2], S=2, has_w=True,
             has_bias=True, grouped=True, dtype=torch.bfloat16, config=SMALL),
        Case("bf16_decode", M=2, K=32, N=24, E=3, R=8, popularity="distinct", has_bias=True,
             dtype=torch.bfloat16),
        # decode split-K: fp32 partials of x @ W.T summed in a fixed order by the epilogue pass
        Case("split_k3_s2_bias_transposed_fp16", M=3, K=48, N=40, E=3, R=6, S=2, has_w=True,
             has_bias=True, transposed_weight=True, dtype=torch.float16,
             config={"SPLIT_K": 3, "BLOCK_K": 16}),
        Case("split_k_auto_k512_fp32", M=2, K=512, N=40, E=3, R=8, has_bias=True, none_frac=0.3),
        Case("dot_epilogue_ungrouped_mixed_fp32", M=20, K=24, N=33, E=5, R=8, S=2, has_w=True,
             ranks=[8, 3, 0, 7, 1], none_frac=0.2, grouped=False,
             config=dict(SMALL, EPILOGUE="dot")),
        Case("s8_routing_like_fp16", M=6, K=32, N=24, E=8, R=4, S=8, has_w=True,
             popularity="distinct", dtype=torch.float16),
    ]
    LAUNCHERS = {"fused": multi_lora_linear_triton, "unfused": multi_lora_linear_unfused,
                 "dense": multi_lora_linear_dense}

    def _ids(case: Case, g: torch.Generator) -> torch.Tensor:
        M, S, E = case.M, case.S, case.E
        if case.popularity == "distinct":
            idx = (torch.arange(M * S).reshape(M, S) % E)
        elif case.popularity == "identical":
            idx = torch.full((M, S), E - 1)
        elif case.popularity == "zipf":
            p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
            idx = torch.multinomial(p / p.sum(), M * S, replacement=True, generator=g).reshape(M, S)
        else:
            idx = torch.randint(0, E, (M, S), generator=g)
        if case.none_frac:
            idx = torch.where(torch.rand((M, S), generator=g) < case.none_frac, -1, idx)
        if case.oob and M:
            flat = idx.reshape(-1)
            bad = torch.tensor([E, -7, E + 100, -2])
            n = min(flat.numel(), bad.numel())
            pos = torch.randperm(flat.numel(), generator=g)[:n]
            flat[pos] = bad[:n]
            idx = flat.reshape(M, S)
        return idx.to(torch.int64 if case.idx64 else torch.int32)

    def make_inputs(case: Case, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dt = case.dtype
        M, K, N, E, R, S = case.M, case.K, case.N, case.E, case.R, case.S
        x = torch.randn((M, 2 * K) if case.strided_x else (M, K), generator=g)
        x = (x[:, ::2] if case.strided_x else x).to(dt)
        if case.transposed_weight:
            weight = (torch.randn(K, N, generator=g) / K ** 0.5).to(dt).T
        else:
            weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(dt)
        A = (torch.randn(E, R, K, generator=g) / K ** 0.5).to(dt)
        B = torch.randn(E, N, R, generator=g).to(dt)
        scale = torch.rand(E, generator=g) + 0.5
        ranks = case.ranks if case.ranks is not None else [R] * E
        rank = torch.tensor(ranks, dtype=torch.int32)
        idx = _ids(case, g)
        w = torch.rand(M, S, generator=g) if case.has_w else None
        bias = torch.randn(N, generator=g).to(dt) if case.has_bias else None
        return x, weight, A, B, scale, rank, idx, w, bias

    def assert_close_to_oracle(got, oracle, plain, dtype):
        """|got - oracle| <= 2 |plain - oracle| + floor, elementwise max."""
        assert got.dtype == dtype and got.shape == oracle.shape
        if got.numel() == 0:
            return
        assert torch.isfinite(got).all(), "non-finite output"
        err = (got.double() - oracle).abs().max().item()
        plain_err = (plain.double() - oracle).abs().max().item()
        floor = 4 * EPS[dtype] * max(1.0, oracle.abs().max().item())
        assert err <= 2 * plain_err + floor, (
            f"max err {err:.3g} > 2 * torch err {plain_err:.3g} + floor {floor:.3g}")

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_multi_lora_linear_triton(case):
        args = make_inputs(case)
        x = args[0]
        out = torch.full((case.M, case.N), float("nan"), dtype=case.dtype)  # poisoned
        got = multi_lora_linear_triton(*args, out=out, grouped=case.grouped, config=case.config)
        assert got.data_ptr() == out.data_ptr()
        oracle = reference.multi_lora_linear(*args, upcast=True)
        plain = reference.multi_lora_linear(*args)
        assert_close_to_oracle(got, oracle, plain, x.dtype)

    @pytest.mark.parametrize("launcher", ["unfused", "dense"])
    @pytest.mark.parametrize("case", [c for c in CASES if c.name != "m0"], ids=str)
    def test_autotune_candidates(case, launcher):
        """The unfused baseline (F.linear + shrink + in-place expand) and the dense GEMMs agree
        with the oracle on the same cases as the fused kernel."""
        args = make_inputs(case)
        if launcher == "unfused":
            got = multi_lora_linear_unfused(*args, grouped=case.grouped, config=case.config)
        else:
            got = multi_lora_linear_dense(*args)
        assert_close_to_oracle(got, reference.multi_lora_linear(*args, upcast=True),
                               reference.multi_lora_linear(*args), case.dtype)

    def test_candidates_cover_the_issue_list():
        args = make_inputs(Case("c", M=4, K=16, N=16, E=3, R=4, S=2))
        names = set(K.linear_candidates(*args))
        assert {"fused", "unfused", "dense"} <= names and len(names) >= 4
        assert K.linear_default(*args) == "fused"  # CPU tensors: the fused kernel (interpreter)
        big = make_inputs(Case("c", M=4, K=16, N=16, E=64, R=32, S=1))
        assert "dense" not in K.linear_candidates(*big)  # E*R > DENSE_MAX_ER

    def test_decode_split_k_grid():
        """Decode grids hold at least 2x the SM count: split-K over W's K when N is narrow."""
        cfg = K.gemm_config(1, torch.float16)
        n_split, k_per = K.split_k(1, 1024, 4096, cfg, 132)
        tiles = triton.cdiv(1024, cfg["BLOCK_N"])
        assert tiles * n_split >= 2 * 132 and k_per % cfg["BLOCK_K"] == 0
        assert (n_split - 1) * k_per < 4096 <= n_split * k_per
        assert K.split_k(4096, 4096, 4096, K.gemm_config(4096, torch.float16), 132) == (1, 4096)
        assert K.shrink_split(1, 1, 4096, 256, 132) > 1

    def _fake_timer(times):
        def timer(name, run):
            run(0)
            return times[name]
        return timer

    def test_tuner_over_the_real_candidates(tmp_path):
        """Every real candidate passes the tuner's correctness gate, and the fastest (by the fake
        timer) is picked and run: for the linear op and for the expand."""
        from loramix_fast.autotune import Tuner
        from loramix_fast.ops._tuned import expand_plan, linear_plan

        case = Case("tune", M=10, K=32, N=24, E=4, R=8, S=2, has_w=True, has_bias=True,
                    none_frac=0.2)
        args = make_inputs(case)
        names = list(K.linear_candidates(*args))
        for fastest in ("dense", "fused_n64"):
            t = Tuner(_fake_timer({n: 0.5 if n == fastest else 1.0 for n in names}),
                      path=str(tmp_path / f"{fastest}.json"), allow_cpu=True)
            out = t.run(linear_plan(), args)
            assert [e for e in t.events if e[1] == "rejected"] == []
            assert [e[2] for e in t.events if e[1] == "tuned"] == [fastest]
            assert_close_to_oracle(out, reference.multi_lora_linear(*args, upcast=True),
                                   reference.multi_lora_linear(*args), torch.float32)
        g = torch.Generator().manual_seed(2)
        y, h = torch.randn(10, 24, generator=g), torch.randn(10, 4, 8, generator=g)
        _, _, _, B, scale, rank, idx, w, _ = args
        eargs = (y, h, B, scale, rank, idx, w)
        names = list(K.expand_candidates(*eargs))
        t = Tuner(_fake_timer({n: 0.5 if n == "dense" else 1.0 for n in names}),
                  path=str(tmp_path / "e.json"), allow_cpu=True)
        out = t.run(expand_plan(), eargs)
        assert [e for e in t.events if e[1] == "rejected"] == []
        assert_close_to_oracle(out, reference.multi_lora_expand(*eargs, upcast=True),
                               reference.multi_lora_expand(*eargs), torch.float32)

    def test_row_sort_once_per_idx():
        """The grouped path sorts a token map once (all layers of a forward share it) and again
        only after the map is modified in place."""
        idx = torch.randint(0, 4, (200, 1), dtype=torch.int32)
        p1 = K._sort_rows(idx, 4)
        assert K._sort_rows(idx, 4) is p1
        idx[0, 0] = 3 - idx[0, 0]
        p2 = K._sort_rows(idx, 4)
        assert p2 is not p1
        key = torch.where(idx[:, 0] < 4, idx[:, 0], 4)
        assert torch.equal(key[p2], torch.sort(key).values)

    def test_default_case_crosses_grouped_threshold():
        case = next(c for c in CASES if c.name.startswith("m130_default_path"))
        assert case.grouped is None and case.M >= GROUPED_MIN_M

    @pytest.mark.parametrize("grouped", [False, True], ids=["gathered", "grouped"])
    def test_paths_agree(grouped):
        """Both large-M designs give the same answer on the same data as the oracle."""
        case = Case("agree", M=48, K=32, N=32, E=7, R=8, ranks=[8, 1, 4, 0, 8, 5, 3], S=2,
                    has_w=True, none_frac=0.25, oob=True, config=SMALL)
        args = make_inputs(case, seed=3)
        got = multi_lora_linear_triton(*args, grouped=grouped, config=case.config)
        assert_close_to_oracle(got, reference.multi_lora_linear(*args, upcast=True),
                               reference.multi_lora_linear(*args), torch.float32)

    def test_nothing_past_rank_is_read():
        """Garbage (NaN) beyond rank[e] in A and B must not reach the output."""
        case = Case("rank_mask", M=12, K=24, N=20, E=3, R=8, ranks=[3, 8, 0], S=2, has_w=True)
        x, weight, A, B, scale, rank, idx, w, bias = make_inputs(case, seed=5)
        A, B = A.clone(), B.clone()
        for e, r in enumerate(case.ranks):
            A[e, r:] = float("nan")
            B[e, :, r:] = float("nan")
        Ac, Bc = torch.nan_to_num(A), torch.nan_to_num(B)
        for grouped in (False, True):
            got = multi_lora_linear_triton(x, weight, A, B, scale, rank, idx, w, bias,
                                           grouped=grouped, config=SMALL)
            assert_close_to_oracle(
                got, reference.multi_lora_linear(x, weight, Ac, Bc, scale, rank, idx, w, bias,
                                                 upcast=True),
                reference.multi_lora_linear(x, weight, Ac, Bc, scale, rank, idx, w, bias),
                torch.float32)

    def test_no_adapters_e0_s0():
        x, weight, *_ = make_inputs(Case("e0", M=4, K=16, N=16))
        bias = torch.randn(16)
        A, B = torch.zeros(0, 4, 16), torch.zeros(0, 16, 4)
        scale, rank = torch.zeros(0), torch.zeros(0, dtype=torch.int32)
        for idx in (torch.full((4, 1), -1, dtype=torch.int32), torch.zeros((4, 0), dtype=torch.int32)):
            got = multi_lora_linear_triton(x, weight, A, B, scale, rank, idx, None, bias)
            torch.testing.assert_close(got, x @ weight.T + bias, atol=1e-5, rtol=1e-5)

    def test_rejects_float64():
        x = torch.randn(2, 16, dtype=torch.float64)
        with pytest.raises(TypeError, match="x has dtype torch.float64"):
            multi_lora_linear_triton(x, torch.randn(8, 16, dtype=torch.float64),
                                     torch.zeros(1, 4, 16, dtype=torch.float64),
                                     torch.zeros(1, 8, 4, dtype=torch.float64), torch.ones(1),
                                     torch.full((1,), 4, dtype=torch.int32),
                                     torch.zeros(2, 1, dtype=torch.int32))

    def test_through_ops_dispatch():
        """LORAMIX_BACKEND=triton routes loramix_fast.ops.multi_lora_linear to this launcher."""
        if os.environ.get("LORAMIX_BACKEND") != "triton":
            pytest.skip("LORAMIX_BACKEND=triton not set")
        from loramix_fast import ops

        case = Case("ops", M=7, K=24, N=20, E=3, R=4, S=2, has_w=True, has_bias=True,
                    none_frac=0.3)
        args = make_inputs(case, seed=7)
        got = ops.multi_lora_linear(*args)
        assert_close_to_oracle(got, reference.multi_lora_linear(*args, upcast=True),
                               reference.multi_lora_linear(*args), torch.float32)

    EXPAND_CASES = [
        Case("expand_s1_fp32", M=9, N=37, E=3, R=5, ranks=[5, 0, 3], none_frac=0.3, oob=True),
        Case("expand_s3_w_fp16", M=20, N=24, E=4, R=8, ranks=[8, 2, 5, 1], S=3, has_w=True,
             none_frac=0.2, dtype=torch.float16, config=SMALL),
        Case("expand_m1_bf16", M=1, N=24, E=2, R=16, S=2, has_w=True, dtype=torch.bfloat16),
        Case("expand_m0", M=0, N=16, E=2, R=4),
    ]

    @pytest.mark.parametrize("case", EXPAND_CASES, ids=str)
    def test_multi_lora_expand_triton(case):
        g = torch.Generator().manual_seed(11)
        M, N, E, R, S, dt = case.M, case.N, case.E, case.R, case.S, case.dtype
        y = torch.randn(M, N, generator=g).to(dt)
        h = torch.randn(M, E, R, generator=g)  # fp32 shrink outputs, as SpectR produces them
        B = torch.randn(E, N, R, generator=g).to(dt)
        scale = torch.rand(E, generator=g) + 0.5
        rank = torch.tensor(case.ranks if case.ranks is not None else [R] * E, dtype=torch.int32)
        idx = _ids(case, g)
        w = torch.rand(M, S, generator=g) if case.has_w else None
        out = torch.full((M, N), float("nan"), dtype=dt)
        got = multi_lora_expand_triton(y, h, B, scale, rank, idx, w, out=out, config=case.config)
        oracle = reference.multi_lora_expand(y, h, B, scale, rank, idx, w, upcast=True)
        plain = reference.multi_lora_expand(y, h, B, scale, rank, idx, w)
        assert_close_to_oracle(got, oracle, plain, dt)
        other = "dot" if K.gemm_config(M, dt)["EPILOGUE"] == "gather" else "gather"
        got = multi_lora_expand_triton(y, h, B, scale, rank, idx, w,
                                       config=dict(case.config, EPILOGUE=other))
        assert_close_to_oracle(got, oracle, plain, dt)
        assert_close_to_oracle(multi_lora_expand_dense(y, h, B, scale, rank, idx, w), oracle,
                               plain, dt)
