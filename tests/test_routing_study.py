"""Reduced synthetic routing study (bench/routing_study.py): SpectR vs Arrow as the rank grows.

Setup: d = 512, T = 16 experts in distinct random rank-r input subspaces, stored as random
non-orthogonal LoRA factorisations; singular values S_i = 1/i (sigma_1 = 1 for every expert);
tokens x = V_t c + n with c ~ N(0, I_r) and ||n|| = ||V_t c|| (half the token's energy is isotropic
noise). Fixed seeds; the margins hold across seeds (over 20 seeds of 4096 tokens: SpectR top-1
>= 99.6% at r = 8 and >= 95.4% at r = 16, Arrow's <= 76% / <= 64%), so the thresholds are not tight.
Runs with one torch thread (the work is tiny; extra threads only contend on a shared machine).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "routing_study.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.py)


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("_routing_study", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def points(study):
    out = {}
    for r in (1, 8, 16):
        out[r] = [study.study_point(d=512, T=16, r=r, spec="inv", noise=1.0, seed=seed, M=4096)
                  for seed in (11, 12, 13)]
    return out


def test_rank1_spectr_equals_arrow(points):
    # rank one, sigma_1 = 1: ||dW_t x|| = |v_t . x|, so both choose identically (all k slots)
    for p in points[1]:
        assert p["same"]
        assert p["spectr_top1"] == p["arrow_top1"]


def test_spectr_beats_arrow_as_rank_grows(points):
    for p in points[8]:
        assert p["spectr_top1"] >= 0.95
        assert p["spectr_top1"] > p["arrow_top1"]
        assert p["spectr_topk"] >= p["arrow_topk"]
    for p in points[16]:
        assert p["spectr_top1"] > p["arrow_top1"]
    # Arrow's rank-1 prototype loses accuracy as the rank grows
    a = {r: sum(p["arrow_top1"] for p in ps) / len(ps) for r, ps in points.items()}
    assert a[1] > a[8] > a[16]


def test_run_and_table(study):
    rows = study.run(True, ranks=(1, 4), seeds=(0,), M=512)
    assert [r["rank"] for r in rows] == [1, 4]
    assert rows[0]["same_r1"] is True
    for row in rows:
        for m in study.METHODS:
            assert 0.0 <= row[m + "_top1"] <= row[m + "_topk"] <= 1.0
    table = study.format_table(rows)
    assert "spectr top1" in table and "identical choices" in table
