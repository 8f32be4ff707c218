"""The first-use autotuner's logic (loramix_fast/autotune.py) with a fake timer, on CPU tensors:
it picks the fastest candidate that agrees with the reference, disqualifies (and logs) a wrong
or failing one, never tunes while a CUDA graph is captured, and reuses its memory and disk cache;
LORAMIX_AUTOTUNE=0 runs the default, force retunes. The real candidates (Triton kernels) go
through the same tuner in test_triton_multi_lora.py under the interpreter."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from loramix_fast import autotune, reference
from loramix_fast.autotune import Plan, Tuner


def _args(M=6, K=16, N=12, E=3, R=4, S=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    A = torch.randn(E, R, K, generator=g) / K ** 0.5
    B = torch.randn(E, N, R, generator=g)
    scale = torch.rand(E, generator=g) + 0.5
    rank = torch.tensor([R, 2, 3][:E], dtype=torch.int32)
    idx = torch.randint(-1, E, (M, S), generator=g, dtype=torch.int32)
    w = torch.rand(M, S, generator=g)
    return (x, W, A, B, scale, rank, idx, w, None)


class Counter:
    """Candidate functions that count their calls."""

    def __init__(self):
        self.calls = {}

    def make(self, name, fn):
        def run(*a):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a)
        return run


def _plan(counter, wrong_offset=1.0, default="slow"):
    ref = reference.multi_lora_linear

    def candidates(*a):
        return {"slow": counter.make("slow", ref),
                "fast": counter.make("fast", ref),
                "wrong": counter.make("wrong", lambda *b: ref(*b) + wrong_offset),
                "broken": counter.make("broken", lambda *b: 1 / 0)}

    return Plan("toy", key=lambda x, *a: ("toy", x.shape[0]), default=lambda *a: default,
                candidates=candidates, reference=ref,
                subset=lambda a, r, c: a, rows_cols=lambda a: (a[0].shape[0], a[1].shape[0]),
                rotate=(1,))


class FakeTimer:
    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, name, run):
        run(0)
        run(1)  # a rotated copy of the weight
        self.calls.append(name)
        return self.times[name]


TIMES = {"slow": 2.0, "fast": 1.0, "wrong": 0.1, "broken": 0.05}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAMIX_AUTOTUNE", raising=False)
    return str(tmp_path / "autotune.json")


def test_picks_fastest_correct_and_disqualifies_wrong(cache, caplog):
    c, timer = Counter(), FakeTimer(TIMES)
    t = Tuner(timer, path=cache, allow_cpu=True)
    args = _args()
    with caplog.at_level(logging.WARNING, logger="loramix_fast.autotune"):
        out = t.run(_plan(c), args)
    torch.testing.assert_close(out, reference.multi_lora_linear(*args))
    assert sorted(timer.calls) == ["fast", "slow"]  # the wrong and the failing one are not timed
    rejected = {e[2]: e[3] for e in t.events if e[1] == "rejected"}
    assert set(rejected) == {"wrong", "broken"}
    assert "max error" in rejected["wrong"] and "ZeroDivisionError" in rejected["broken"]
    assert "wrong" in caplog.text and "disqualified" in caplog.text
    tuned = [e for e in t.events if e[1] == "tuned"]
    assert tuned[0][2] == "fast" and tuned[0][3] == {"fast": 1.0, "slow": 2.0}


def test_reuses_memory_and_disk_cache(cache):
    c, timer = Counter(), FakeTimer(TIMES)
    t = Tuner(timer, path=cache, allow_cpu=True)
    args = _args()
    t.run(_plan(c), args)
    n_timed = len(timer.calls)
    t.run(_plan(c), args)  # the in-process memo: no candidate but the winner runs
    assert len(timer.calls) == n_timed and c.calls["fast"] >= 1
    entries = json.load(open(cache))["entries"]
    (k, v), = entries.items()
    assert k.startswith("cpu || ") and v["choice"] == "fast" and set(v["rejected"]) == {
        "wrong", "broken"}
    # a new process (a fresh tuner) reads the disk cache: nothing is timed or gated again
    c2, timer2 = Counter(), FakeTimer(TIMES)
    t2 = Tuner(timer2, path=cache, allow_cpu=True)
    t2.run(_plan(c2), args)
    assert timer2.calls == [] and c2.calls == {"fast": 1}
    # another key (M bucket) is tuned on its own
    t2.run(_plan(c2), _args(M=9))
    assert sorted(timer2.calls) == ["fast", "slow"]


def test_never_tunes_during_capture(cache, monkeypatch):
    c, timer = Counter(), FakeTimer(TIMES)
    t = Tuner(timer, path=cache, allow_cpu=True)
    args = _args()
    monkeypatch.setattr(autotune, "_capturing", lambda dev: True)
    t.run(_plan(c, default="slow"), args)
    assert timer.calls == [] and c.calls == {"slow": 1}  # the default, nothing timed or cached
    assert not json.load(open(cache))["entries"] if __import__("os").path.exists(cache) else True
    monkeypatch.setattr(autotune, "_capturing", lambda dev: False)
    t.run(_plan(c), args)  # after capture, the first eager call tunes
    assert sorted(timer.calls) == ["fast", "slow"]
    monkeypatch.setattr(autotune, "_capturing", lambda dev: True)
    c.calls.clear()
    t.run(_plan(c), args)  # inside a later capture the cached choice runs
    assert c.calls == {"fast": 1}


def test_cached_choice_is_used_during_capture_by_a_new_process(cache, monkeypatch):
    args = _args()
    Tuner(FakeTimer(TIMES), path=cache, allow_cpu=True).run(_plan(Counter()), args)
    monkeypatch.setattr(autotune, "_capturing", lambda dev: True)
    c, timer = Counter(), FakeTimer(TIMES)
    Tuner(timer, path=cache, allow_cpu=True).run(_plan(c), args)
    assert c.calls == {"fast": 1} and timer.calls == []


def test_mode_0_and_force(cache, monkeypatch):
    args = _args()
    Tuner(FakeTimer(TIMES), path=cache, allow_cpu=True).run(_plan(Counter()), args)
    monkeypatch.setenv("LORAMIX_AUTOTUNE", "0")
    c, timer = Counter(), FakeTimer(TIMES)
    t = Tuner(timer, path=cache, allow_cpu=True)
    t.run(_plan(c, default="slow"), args)
    assert c.calls == {"slow": 1} and timer.calls == []  # off: the default, the cache unread
    monkeypatch.setenv("LORAMIX_AUTOTUNE", "force")
    times = dict(TIMES, slow=0.5)  # the machine changed: slow is now faster
    timer = FakeTimer(times)
    t = Tuner(timer, path=cache, allow_cpu=True)
    c = Counter()
    t.run(_plan(c), args)
    assert sorted(timer.calls) == ["fast", "slow"]
    t.run(_plan(c), args)  # retuned once per process, not on every call
    assert sorted(timer.calls) == ["fast", "slow"]
    (v,) = json.load(open(cache))["entries"].values()
    assert v["choice"] == "slow"
    monkeypatch.setenv("LORAMIX_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="LORAMIX_AUTOTUNE"):
        autotune.mode()


def test_cpu_tensors_are_not_tuned_by_default(cache):
    c, timer = Counter(), FakeTimer(TIMES)
    Tuner(timer, path=cache).run(_plan(c, default="slow"), _args())
    assert c.calls == {"slow": 1} and timer.calls == []


def test_gate_checks_a_row_and_column_subset(cache, monkeypatch):
    """Large outputs are gated on spread rows / columns (first and last included)."""
    monkeypatch.setattr(autotune, "GATE_ROWS", 4)
    monkeypatch.setattr(autotune, "GATE_COLS", 5)
    seen = []
    ref = reference.multi_lora_linear

    def subset(a, rows, cols):
        seen.append((rows.tolist(), cols.tolist()))
        x, W, A, B, sc, rk, idx, w, b = a
        return (x[rows], W[cols], A, B[:, cols], sc, rk, idx[rows], w[rows], b)

    def off_last(*a):
        y = ref(*a)
        y[-1, -1] += 1.0  # wrong in the last row and column only
        return y

    plan = Plan("toy", key=lambda x, *a: ("toy2",), default=lambda *a: "good",
                candidates=lambda *a: {"good": ref, "off_last": off_last}, reference=ref,
                subset=subset, rows_cols=lambda a: (a[0].shape[0], a[1].shape[0]))
    t = Tuner(FakeTimer({"good": 1.0, "off_last": 0.5}), path=cache, allow_cpu=True)
    t.run(plan, _args(M=10, N=9))
    assert seen == [([0, 3, 6, 9], [0, 2, 4, 6, 8])]
    assert [e[2] for e in t.events if e[1] == "rejected"] == ["off_last"]
