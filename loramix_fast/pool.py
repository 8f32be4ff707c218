"""The adapter pool: the storage behind :class:`loramix_fast.AdapterLibrary` (DESIGN.md, "The
adapter pool"). Internal; the library is the API.

Ids
    Every adapter gets a library-wide id when it is added: the lowest free id, else the next new
    one. An id never changes while its adapter is in the library; ``remove`` frees it, and a later
    add may reuse it once no forward that began before the remove is still running (a forward
    pins the library state it started with, see below). ``lib.names[i]`` is the adapter with id
    ``i`` (None: a free id); ``-1`` is "no adapter".

Slots
    Per module and per placement (dtype, device), one :class:`Slots` holds ``A [cap, R, K]`` and
    ``B [cap, N, R]``; adapter ``i`` lives in slot ``i``. The kernels read the prefix
    ``A[:E]``, ``B[:E]`` (E = 1 + the highest id in use: a view, never a copy) with ``scale [E]``
    and ``rank [E]`` (0 for a free id or an adapter that does not target the module; the kernels
    read nothing of a rank-0 slot). An add writes its factors into slot ``i`` of every module it
    targets (O(the adapter's size)); a remove only sets rank and scale to 0 in the published
    metadata, so no other slot is touched and every other adapter's outputs stay bit-identical.
    Capacity grows geometrically (x1.25, multiples of 8) when an id passes it: one copy of that
    module's slots, O(pool) but amortised O(1) per add, and at most 1.25x the adapters' bytes
    held as spare capacity. The rank padding R of a module is the largest rank ever added there;
    a larger rank re-pads that module's slots (one copy; documented cost: a library mixing ranks
    4 and 64 holds every slot at 64).

One copy
    The slots of the library's home placement (the first adapter's dtype and device, or
    ``AdapterLibrary(dtype=, device=)`` / ``lib.to()``) are the only storage of frozen adapters:
    ``lib.factors(name)`` returns views into them. A model whose weights live elsewhere (another
    dtype or device) reads a mirror: the same slots in its placement, built once from the home
    slots and written by every later add (so it costs a second copy; ``lib.to(device, dtype)``
    before patching avoids it). Trainable adapters (``lib.parameters``) keep their own leaf
    tensors for the optimizer; their slots are rewritten from the leaves when a version counter
    moved (after an optimizer step).

Snapshots
    Every change publishes a new immutable :class:`State` (ids, names, per-module ranks and
    scales). A patched model's forward (and ``generate``, ``use_adapters``) pins the state
    current at its start in a contextvar; every layer of that forward reads the stacks of that
    state, so add / remove / evict from other threads never tear it. Slots are written only when
    they are free in every pinned state; a pool that grows leaves the old tensors to the
    forwards that still hold them.

Residency
    With ``AdapterLibrary(max_resident=n)`` the adapters live on the host (CPU tensors, or only
    their peft folder with ``offload="folder"``) and each placement's pool holds at most n of
    them, in slots that are not their ids: a forward makes the adapters it needs resident when
    its first layer asks for a stack (loading from the host or re-reading the folder; the LRU
    adapter no running forward needs is evicted), and its token maps are translated from ids to
    slots (``ModuleStack.slots_of``). A forward that needs more than n adapters, or whose
    adapters cannot be loaded because running forwards pin every slot, gets an
    :class:`~loramix_fast.adapters.AdapterError` saying so.
"""
from __future__ import annotations

import contextvars
import math
import threading
import time
from collections import OrderedDict

import torch

GROWTH = 1.25
MIN_CAP = 8
WAIT_S = 30.0  # how long a forward waits for slots pinned by other forwards before it fails

# the library states pinned by the forwards running in this context: tuple of _Snapshot
_PINNED: contextvars.ContextVar[tuple] = contextvars.ContextVar("loramix_pinned", default=())

_serial = iter(range(1, 1 << 62))  # content keys of slot writes (next() is atomic under the GIL)


def next_key() -> int:
    return next(_serial)


def grow_cap(cap: int, need: int, limit: int | None = None) -> int:
    """The capacity after growing ``cap`` geometrically until it holds ``need`` slots."""
    c = max(cap, 0)
    while c < need:
        c = max(c + MIN_CAP, int(math.ceil(c * GROWTH / MIN_CAP)) * MIN_CAP)
    return c if limit is None else min(c, max(limit, need))


def norm_device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 stacks keep the scale in fp64 (4*sqrt(2) in fp32 is off by 1e-8: an fp64 model would
    # only be fp32-accurate)
    return torch.float64 if dtype == torch.float64 else torch.float32


class Slots:
    """One module's slot tensors in one placement: ``A [cap, R, K]``, ``B [cap, N, R]``.

    ``keys[s]``: a serial number naming what was last written to slot ``s`` (alignment caches
    compare it); ``cache``: data derived per slot and shared by every state (SpectR alignment),
    dropped with the tensors when they are reallocated (``epoch`` counts reallocations)."""

    __slots__ = ("A", "B", "K", "N", "R", "cap", "dtype", "device", "keys", "cache", "epoch",
                 "synced", "__weakref__")

    def __init__(self, K: int, N: int, R: int, cap: int, dtype, device):
        self.K, self.N, self.R, self.cap = K, N, R, cap
        self.dtype, self.device = dtype, device
        with torch.inference_mode(False):  # normal tensors even when added under inference_mode:
            self.A = torch.zeros(cap, R, K, dtype=dtype, device=device)  # a later training step
            self.B = torch.zeros(cap, N, R, dtype=dtype, device=device)  # saves views of them
        self.keys = [None] * cap
        self.cache: dict = {}
        self.epoch = 0
        self.synced: dict = {}  # slot -> (A._version, B._version) of the trainable leaves there

    def ensure(self, cap: int, R: int) -> None:
        """Grow to at least ``cap`` slots of rank ``R`` (a copy of the slots; rare)."""
        if cap <= self.cap and R <= self.R:
            return
        ncap, nR = max(cap, self.cap), max(R, self.R)
        with torch.inference_mode(False), torch.no_grad():
            A = torch.zeros(ncap, nR, self.K, dtype=self.dtype, device=self.device)
            B = torch.zeros(ncap, self.N, nR, dtype=self.dtype, device=self.device)
            A[:self.cap, :self.R] = self.A
            B[:self.cap, :, :self.R] = self.B
        self.A, self.B = A, B
        self.keys = self.keys + [None] * (ncap - self.cap)
        self.cap, self.R = ncap, nR
        self.cache = {}
        self.epoch += 1
        if self.device.type == "cpu":
            global _DIRTY
            _DIRTY = True

    def write(self, slot: int, A: torch.Tensor, B: torch.Tensor, key) -> None:
        r = A.shape[0]
        with torch.no_grad():
            self.A[slot, :r].copy_(A)
            self.B[slot, :, :r].copy_(B)
            if r < self.R:  # the padding of a slot that held a larger rank
                self.A[slot, r:].zero_()
                self.B[slot, :, r:].zero_()
        self.keys[slot] = key
        self.synced.pop(slot, None)

    def clear(self, slot: int) -> None:
        """Forget what slot ``slot`` held (its data stays until it is written again)."""
        self.keys[slot] = None
        self.synced.pop(slot, None)

    def to(self, dtype, device) -> "Slots":
        new = Slots.__new__(Slots)
        new.K, new.N, new.R, new.cap = self.K, self.N, self.R, self.cap
        new.dtype, new.device = dtype, device
        new.A = self.A.to(dtype=dtype, device=device, copy=True)
        new.B = self.B.to(dtype=dtype, device=device, copy=True)
        new.keys = list(self.keys)
        new.cache, new.epoch, new.synced = {}, 0, {}
        return new

    def nbytes(self) -> int:
        return self.A.untyped_storage().nbytes() + self.B.untyped_storage().nbytes()


class ModMeta:
    """Immutable per-module metadata of one library state: in / out features, the rank padding
    R, and per id the rank (``rank``, int32) and scale (``scale``, float64), CPU tensors at least
    as long as the ids that target the module (copied on write: a state's tensors never change,
    so a stack can hand out views of them)."""

    __slots__ = ("K", "N", "R", "rank", "scale", "n_active")

    def __init__(self, K, N, R, rank=None, scale=None, n_active=0):
        self.K, self.N, self.R = K, N, R
        self.rank = rank if rank is not None else torch.zeros(0, dtype=torch.int32)
        self.scale = scale if scale is not None else torch.zeros(0, dtype=torch.float64)
        self.n_active = n_active

    def with_id(self, i: int, rank: int, scale: float) -> "ModMeta":
        cap = self.rank.numel()
        if i >= cap:
            n = grow_cap(cap, i + 1)
            r_t = torch.zeros(n, dtype=torch.int32)
            s_t = torch.zeros(n, dtype=torch.float64)
            r_t[:cap] = self.rank
            s_t[:cap] = self.scale
            old = 0
        else:
            r_t, s_t = self.rank.clone(), self.scale.clone()
            old = int(r_t[i])
        r_t[i] = rank
        s_t[i] = scale
        return ModMeta(self.K, self.N, max(self.R, rank), r_t, s_t,
                       self.n_active - (old > 0) + (rank > 0))

    def padded(self, E: int):
        """``(rank [E], scale [E])``: views when the tensors are long enough, else zero-padded."""
        cap = self.rank.numel()
        if cap >= E:
            return self.rank[:E], self.scale[:E]
        return (torch.cat([self.rank, torch.zeros(E - cap, dtype=torch.int32)]),
                torch.cat([self.scale, torch.zeros(E - cap, dtype=torch.float64)]))

    @property
    def active(self) -> bool:
        return self.n_active > 0


class State:
    """One published version of a library: ``ids`` {name: id} (add order), ``names`` (per id, None
    for a free id), ``mods`` {module: ModMeta}, ``stacks`` the ModuleStacks built for it so far."""

    __slots__ = ("version", "ids", "names", "mods", "stacks", "live")

    def __init__(self, version, ids, names, mods, live):
        self.version, self.ids, self.names, self.mods = version, ids, names, mods
        self.live = live  # {module: ((id, name), ...)} of trainable adapters
        self.stacks: dict = {}


class Snapshot:
    """A state pinned by a running forward; ``needed``: the ids it may select (None: all, for a
    router); ``res``: per placement, its residency view (max_resident libraries)."""

    __slots__ = ("lib", "state", "needed", "res", "__weakref__")

    def __init__(self, lib, state, needed):
        self.lib, self.state, self.needed = lib, state, needed
        self.res: dict = {}


def active_snapshot(lib):
    for s in _PINNED.get():
        if s.lib is lib:
            return s
    return None


class Resident:
    """The resident pool of one placement in a ``max_resident`` library: slots hold adapters by
    LRU, ``slot_of`` {id: slot}, ``pins[slot]`` the snapshots using a slot (weak: a slot is
    evictable once no running forward holds it)."""

    def __init__(self, limit: int, dtype, device):
        self.limit, self.dtype, self.device = limit, dtype, device
        self.slots: dict = {}  # module -> Slots
        self.occupant: list = []  # slot -> (id, name) or None
        self.meta: list = []  # slot -> {module: (rank, scale)} of its occupant
        self.slot_of: dict = {}
        self.lru: OrderedDict = OrderedDict()  # id -> None, least recently used first
        self.pins: list = []  # slot -> WeakSet of snapshots
        self.epoch = 0
        self.views: dict = {}  # (epoch, version or None) -> ResView
        # counters (``AdapterLibrary.residency``): a forward's adapter found resident / loaded;
        # loads that replaced another adapter
        self.hits = self.loads = self.evictions = 0

    def free_slot(self, keep: set):
        """A slot to load into: a never-used one, else the least recently used adapter that no
        running forward pins and ``keep`` does not hold; None if there is none."""
        for s, occ in enumerate(self.occupant):
            if occ is None and not self.pins[s]:
                return s
        if len(self.occupant) < self.limit:
            return len(self.occupant)
        for i in self.lru:
            s = self.slot_of[i]
            if i not in keep and not self.pins[s]:
                return s
        return None

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.slots.values())


class ResView:
    """What the forwards of one residency epoch see: per module the slot stacks, and the id ->
    slot lookup ``lut [ids + 1]`` (entry 0: id -1 -> -1) per device."""

    __slots__ = ("names", "lut", "stacks", "meta", "E")

    def __init__(self, names, lut, meta, E):
        self.names, self.lut, self.meta, self.E = names, lut, meta, E
        self.stacks: dict = {}


def wait_for(cond: threading.Condition, pred, timeout: float = WAIT_S):
    """``cond.wait_for`` that also wakes up every 10 ms (slots are released by the garbage
    collector, which notifies nobody)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v is not None or time.monotonic() >= end:
            return v
        cond.wait(0.01)


_DIRTY = False  # a CPU pool was reallocated since the last trim
_TRIM = None


def trim() -> None:
    """Give the heap pages of freed pools back to the OS (glibc ``malloc_trim``; elsewhere a
    no-op). Without it glibc keeps the blocks of a reallocated pool in its heap (its mmap
    threshold rises with every large block freed), and the process grows by ~2x the pool."""
    global _DIRTY, _TRIM
    if not _DIRTY:
        return
    _DIRTY = False
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def storages_nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


__all__ = ["Slots", "ModMeta", "State", "Snapshot", "Resident", "ResView", "grow_cap",
           "active_snapshot", "norm_device", "next_key"]
