"""bench/run_all.py rewrites only the sections it reruns: other benchmarks' sections and
hand-written ones survive an ``--only`` run and a full run (a full run renews only the header)."""
from __future__ import annotations

import sys
import types

import pytest

from bench import run_all


@pytest.fixture
def fake_sections(monkeypatch):
    mod = types.ModuleType("lmf_fake_bench")
    mod.run = lambda quick, **kw: [f"rows {kw.get('tag', 'a')}"]
    mod.format_table = lambda rows: "\n".join(rows)
    monkeypatch.setitem(sys.modules, "lmf_fake_bench", mod)
    monkeypatch.setattr(run_all, "SECTIONS", {"one": ("lmf_fake_bench", "One"),
                                              "two": ("lmf_fake_bench", "Two", {"tag": "b"})})


def test_only_run_keeps_every_other_section(tmp_path, fake_sections):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nMachine: old\n\n## One\n\nold one\n\n"
                   "## EM-LoRA decode cost\n\n```\nkept table\n```\n\n## Hand written\n\nnotes\n")
    assert run_all.main(["--only", "two", "--out", str(out)]) == 0
    text = out.read_text()
    for kept in ("Machine: old", "## One\n\nold one", "kept table", "## Hand written\n\nnotes"):
        assert kept in text
    assert "## Two\n\n```\nrows b\n```" in text
    assert text.index("## One") < text.index("## Two")  # SECTIONS order: Two after One


def test_full_run_renews_header_and_keeps_other_sections(tmp_path, fake_sections):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nMachine: old\n\n## vLLM serving\n\nkept\n")
    assert run_all.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "Machine: old" not in text and "Machine: " in text
    assert "## vLLM serving\n\nkept" in text
    assert "## One\n\n```\nrows a\n```" in text and "## Two\n\n```\nrows b\n```" in text


def test_gemm16_paths_bench_runs_every_path():
    """bench/bench_gemm16_paths.py times torch and each forced 16-bit path (tiny shapes here) and
    leaves the environment knobs as it found them."""
    import os

    from bench import bench_gemm16_paths as G

    before = {k: os.environ.get(k) for k in G.KNOBS}
    rows = G.run(Ms=(1, 9), shapes=[(48, 32)], reps=1, E=3, R=4, stream_bytes=1e4)
    assert [(r["N"], r["K"], r["M"]) for r in rows] == [(48, 32, 1), (48, 32, 9)]
    for r in rows:
        assert all(r[k] > 0 for k in ("torch", "small", "mkl", "aten", "default"))
    assert {k: os.environ.get(k) for k in G.KNOBS} == before
    assert "x torch" in G.format_table(rows)


def test_gemm32_paths_bench_runs_every_path():
    """bench/bench_gemm32_paths.py times torch and both fp32 paths with and without adapters (tiny
    shapes here) and leaves its two environment knobs as it found them."""
    import os

    from bench import bench_gemm32_paths as G

    before = {k: os.environ.get(k) for k in (G.KNOB, G.BASE_KNOB)}
    rows = G.run(Ms=(1, 9), shapes=[(48, 32)], reps=1, E=3, R=4, stream_bytes=1e4)
    assert [(r["N"], r["K"], r["M"]) for r in rows] == [(48, 32, 1), (48, 32, 9)]
    for r in rows:
        assert all(r[k] > 0 for k in ("torch", "aten -1", "small -1", "aten 1/7", "small 1/7"))
    assert {k: os.environ.get(k) for k in (G.KNOB, G.BASE_KNOB)} == before
    assert "small/torch -1" in G.format_table(rows)
