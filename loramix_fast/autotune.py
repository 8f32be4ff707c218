"""First-use autotuner with a correctness gate (DESIGN.md, "GPUs: never slower than the unfused
baseline").

Each GPU call site of an op has candidates (for ``multi_lora_linear``: the fused kernel in 2-3
configs, cuBLAS ``F.linear`` + shrink + expand into y, and dense ``x @ A_flat^T`` + ``addmm`` where
E*R is small). The first time a shape bucket is seen on a device, the tuner

1. runs every candidate once on the caller's own inputs and compares it with the op's fp64
   reference (on a subset of at most 512 rows x 1024 columns: the reference is separable), with
   the tests' tolerance: at most twice the error of plain torch at the same dtype plus 4 ulps of
   the output's scale. A candidate that raises or disagrees is disqualified and logged (logger
   ``loramix_fast.autotune``);
2. times the survivors with CUDA events after warm-up, rotating fresh copies of the large operand
   (the weight) so each timed call streams it from memory, not from L2;
3. keeps the fastest, in memory and in a JSON file on disk (``LORAMIX_AUTOTUNE_CACHE``, default
   ``~/.cache/loramix_fast/autotune.json``), keyed by device (name, compute capability, torch and
   triton versions) and the op's key: dtype, N, K, R, S, M bucket, distinct-adapter bucket, ...

``LORAMIX_AUTOTUNE``: ``1`` (default) tune on first use, reuse the disk cache; ``0`` never tune:
every call site runs its default (the unfused baseline on GPUs, or the dense GEMMs for routing
over a small library); ``force`` retune every key once in this process, ignoring the disk cache.
Never tunes while a CUDA graph is being captured or torch.compile is tracing (the cached choice,
else the default, runs): call :func:`warmup` before capturing.

Nothing here imports triton: the candidates come from the ops layer (``loramix_fast.ops._tuned``).
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Plan", "Tuner", "TUNER", "mode", "warmup", "cache_path", "cuda_event_timer"]

log = logging.getLogger("loramix_fast.autotune")

MODES = ("0", "1", "force")
GATE_ROWS = 512
GATE_COLS = 1024
_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
        torch.float64: 2.0 ** -52}


def mode() -> str:
    """``LORAMIX_AUTOTUNE``: "0", "1" (default) or "force"."""
    m = os.environ.get("LORAMIX_AUTOTUNE", "1").strip().lower() or "1"
    if m not in MODES:
        raise ValueError(f"LORAMIX_AUTOTUNE must be one of {MODES}, got {m!r}")
    return m


def cache_path() -> str:
    p = os.environ.get("LORAMIX_AUTOTUNE_CACHE")
    if p:
        return p
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "loramix_fast", "autotune.json")


@dataclass(frozen=True)
class Plan:
    """The candidates of one op call site.

    key(*args) -> tuple (hashable, JSON-able); default(*args) -> name (the choice without timings);
    candidates(*args) -> {name: fn(*args) -> out}; reference(*args, upcast=bool) -> out (the spec);
    subset(args, rows, cols) -> args restricted to output rows / columns (for the gate);
    rows_cols(args) -> (M, N) of the output; rotate: positions of the args copied for timing."""
    op: str
    key: Callable
    default: Callable
    candidates: Callable
    reference: Callable
    subset: Callable
    rows_cols: Callable
    rotate: tuple = ()


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    p = torch.cuda.get_device_properties(device)
    return (f"{p.name}|sm{p.major}{p.minor}|torch {torch.__version__}|triton {_version('triton')}"
            f"|loramix_fast {_version('loramix_fast')}")


def cuda_event_timer(name: str, run: Callable[[int], object], *, warmup: int = 3,
                     reps: int = 15) -> float:
    """Median milliseconds of ``run(i)`` (i picks the rotated input copy) with CUDA events,
    after ``warmup`` calls."""
    for i in range(warmup):
        run(i)
    torch.cuda.synchronize()
    events = []
    for i in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run(warmup + i)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _capturing(dev) -> bool:
    """A CUDA graph is being captured on the current stream (never tune then)."""
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _spread(n: int, cap: int, device) -> torch.Tensor | None:
    """Up to ``cap`` indices spread over range(n), first and last included (None: all)."""
    if n <= cap:
        return None
    return torch.unique(torch.linspace(0, n - 1, cap, device=device).round().long())


def _maxabs(t: torch.Tensor) -> float:
    t = t.abs()
    t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
    return float(t.max()) if t.numel() else 0.0


@dataclass
class Result:
    choice: str | None
    times: dict = field(default_factory=dict)     # name -> ms
    rejected: dict = field(default_factory=dict)  # name -> reason


class Tuner:
    """See the module docstring. ``timer(name, run) -> ms`` (default :func:`cuda_event_timer`);
    ``allow_cpu`` lets CPU tensors be tuned (tests, with a fake timer); ``path`` the disk cache
    (default :func:`cache_path`, read at call time)."""

    def __init__(self, timer: Callable | None = None, *, path: str | None = None,
                 allow_cpu: bool = False, max_copies: int = 4):
        self.timer = timer or cuda_event_timer
        self.path = path
        self.allow_cpu = allow_cpu
        self.max_copies = max_copies
        self.events: list[tuple] = []       # (key, "tuned" | "rejected" | "cache" | ..., detail)
        self._fn: dict = {}                 # (mode, device, key) -> (name, fn) (the hot path)
        self._disk: dict | None = None      # path -> entries, loaded once
        self._disk_path: str | None = None
        self._retuned: set = set()          # keys retuned under LORAMIX_AUTOTUNE=force
        self._lock = threading.RLock()

    # ---- the hot path ---------------------------------------------------------------------
    def run(self, plan: Plan, args: tuple):
        """Run the chosen candidate of ``plan`` on ``args`` (tuning first if this key is new)."""
        return self._pick(plan, args)[1](*args)

    def pick(self, plan: Plan, args: tuple) -> Callable:
        """The candidate function to run for ``args`` (tuning first if the key is new)."""
        return self._pick(plan, args)[1]

    def pick_name(self, plan: Plan, args: tuple) -> str:
        """The name of the candidate :meth:`pick` gives."""
        return self._pick(plan, args)[0]

    def _pick(self, plan: Plan, args: tuple) -> tuple[str, Callable]:
        dev = args[0].device
        m = mode()
        full = (m, dev.type, dev.index, plan.key(*args))
        hit = self._fn.get(full)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._fn.get(full)
            if hit is not None:
                return hit
            cands = plan.candidates(*args)
            name, final = self._decide(plan, args, cands, m, dev)
            hit = (name, cands[name])
            if final:
                self._fn[full] = hit
            return hit

    def _decide(self, plan, args, cands, m, dev) -> tuple[str, bool]:
        default = plan.default(*args)
        if m == "0":
            return default, True
        key = plan.key(*args)
        dkey = self._disk_key(dev, key)
        if not (m == "force" and dkey not in self._retuned):
            entry = self._load().get(dkey)
            if entry is not None and entry.get("choice") in cands:
                self.events.append((key, "cache", entry["choice"]))
                return entry["choice"], True
        if not self._can_tune(dev):
            return default, False  # capture / compile / CPU: the default now, tune later
        res = self.tune(plan, args, cands)
        self._retuned.add(dkey)
        if res.choice is None:
            log.error("autotune %s %s: every candidate disagreed with the reference (%s); "
                      "running %s", plan.op, key, res.rejected, default)
            return default, True
        self._store(dkey, res)
        return res.choice, True

    def _can_tune(self, dev) -> bool:
        if torch.compiler.is_compiling() or _capturing(dev):
            return False
        return dev.type == "cuda" or self.allow_cpu

    # ---- tuning -----------------------------------------------------------------------------
    def tune(self, plan: Plan, args: tuple, cands: dict | None = None) -> Result:
        """Gate every candidate against the reference, time the survivors, return the fastest."""
        cands = cands if cands is not None else plan.candidates(*args)
        key = plan.key(*args)
        res = Result(None)
        gate = self._gate_fn(plan, args)
        ok = {}
        for name, fn in cands.items():
            try:
                reason = gate(fn(*args))
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is disqualified
                reason = f"raised {type(e).__name__}: {e}"
            if reason is None:
                ok[name] = fn
            else:
                res.rejected[name] = reason
                self.events.append((key, "rejected", name, reason))
                log.warning("autotune %s %s: candidate %s disqualified: %s", plan.op, key, name,
                            reason)
        sets = self._rotations(plan, args)
        for name, fn in ok.items():
            res.times[name] = float(self.timer(name, lambda i, fn=fn: fn(*sets[i % len(sets)])))
        if res.times:
            res.choice = min(res.times, key=lambda n: (res.times[n], n))
        self.events.append((key, "tuned", res.choice, dict(res.times)))
        log.info("autotune %s %s: %s (%s)", plan.op, key, res.choice,
                 ", ".join(f"{n} {t:.4g} ms" for n, t in sorted(res.times.items())))
        return res

    def _gate_fn(self, plan: Plan, args: tuple):
        M, N = plan.rows_cols(args)
        dev = args[0].device
        rows, cols = _spread(M, GATE_ROWS, dev), _spread(N, GATE_COLS, dev)
        sub = plan.subset(args, rows, cols)
        want = plan.reference(*sub, upcast=True)
        plain = plan.reference(*sub)
        eps = _EPS.get(plain.dtype, 2.0 ** -23)
        tol = 2 * _maxabs(plain.double() - want) + 4 * eps * max(1.0, _maxabs(want))

        def gate(out) -> str | None:
            if rows is not None:
                out = out.index_select(0, rows)
            if cols is not None:
                out = out.index_select(1, cols)
            if out.shape != want.shape:
                return f"shape {tuple(out.shape)}, expected {tuple(want.shape)}"
            o = out.double()
            if not torch.equal(torch.isfinite(o), torch.isfinite(want)):
                return "non-finite values where the reference has none (or the reverse)"
            err = _maxabs(o - want)
            if not err <= tol:
                return f"max error {err:.3g} > tolerance {tol:.3g}"
            return None

        return gate

    def _rotations(self, plan: Plan, args: tuple) -> list[tuple]:
        """Argument sets whose ``plan.rotate`` tensors are distinct copies, enough that they do
        not all fit in L2 (at most ``max_copies``; the caller's own tensors are the first)."""
        if not plan.rotate:
            return [args]
        nbytes = sum(args[i].numel() * args[i].element_size() for i in plan.rotate)
        l2 = 50 << 20
        dev = args[0].device
        if dev.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", l2) or l2
        n = max(1, min(self.max_copies, math.ceil(2 * l2 / max(nbytes, 1))))
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
            n = max(1, min(n, int(0.25 * free // max(nbytes, 1)) + 1))
        sets = [args]
        for _ in range(n - 1):
            a = list(args)
            for i in plan.rotate:
                a[i] = args[i].clone()
            sets.append(tuple(a))
        return sets

    # ---- the disk cache ---------------------------------------------------------------------
    def _path(self) -> str:
        return self.path or cache_path()

    @staticmethod
    def _disk_key(dev, key) -> str:
        return device_tag(dev) + " || " + json.dumps(list(key))

    def _load(self) -> dict:
        p = self._path()
        if self._disk is None or self._disk_path != p:
            self._disk_path, self._disk = p, {}
            try:
                with open(p) as f:
                    data = json.load(f)
                if data.get("version") == 1:
                    self._disk = dict(data.get("entries", {}))
            except (OSError, ValueError):
                pass
        return self._disk

    def _store(self, dkey: str, res: Result) -> None:
        entries = self._load()
        entries[dkey] = {"choice": res.choice, "times_ms": res.times, "rejected": res.rejected}
        p = self._path()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
            try:  # merge what other processes wrote meanwhile
                with open(p) as f:
                    other = json.load(f).get("entries", {})
                entries = {**other, **entries}
                self._disk = entries
            except (OSError, ValueError):
                pass
            tmp = f"{p}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, p)
        except OSError as e:
            log.warning("autotune: cannot write the cache %s: %s", p, e)

    def clear(self) -> None:
        """Forget the in-process choices (the disk cache stays)."""
        with self._lock:
            self._fn.clear()
            self._disk = None
            self._retuned.clear()


TUNER = Tuner()


def warmup(model, batch_sizes, prompt_lens, *, decode: bool = True, adapter_names=None) -> dict:
    """Run a patched model once per (batch size, prompt length) - and per batch size with one
    token per sequence (a decode step) when ``decode`` - so every patched layer's shapes are tuned
    (and their Triton kernels compiled) before CUDA-graph capture, which never tunes.

    Multi-tenant models (no router) run with ``adapter_names`` (default: the library's adapters
    in turn, one per sequence); a model with a router runs it. Returns {(batch, length): choices
    made during that forward} for inspection."""
    from .patching import _state, use_adapters

    st = _state(model)
    names = list(adapter_names) if adapter_names is not None else list(st.lib.names)
    params = list(model.parameters())
    dev = params[0].device if params else torch.device("cpu")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    lens = sorted(set(int(n) for n in prompt_lens) | ({1} if decode else set()))
    made = {}
    with torch.no_grad():
        for b in batch_sizes:
            for L in lens:
                ids = torch.randint(0, vocab, (int(b), L), device=dev)
                before = len(TUNER.events)
                if st.router is None and names:
                    with use_adapters(model, [names[i % len(names)] for i in range(int(b))]):
                        _forward(model, ids)
                else:
                    _forward(model, ids)
                made[(int(b), L)] = [e for e in TUNER.events[before:] if e[1] in ("tuned", "cache")]
    return made


def _forward(model, ids):
    try:
        return model(input_ids=ids, use_cache=False)
    except TypeError:
        return model(ids)
