"""A Lanczos basis kept off the accelerator, in host memory (``lanczos(..., basis="host")``).

With ``k=1`` and no reorthogonalisation, the Ritz vector ``y = sum_j s_j q_j`` needs every Lanczos
vector ``q_j`` once, at the end. Keeping them on the device costs ``max_iter`` model-sized vectors (100
GiB per GPU for a 13B model at 20 iterations); regenerating them costs a second pass of ``m - 1``
products. :class:`HostBasis` keeps them in host memory instead (the vector dtype: float32, or float64 for
float64 models; page-locked when the device is CUDA, so the copies are asynchronous on the current
stream), and streams them back to the device one parameter chunk at a time when they are used:

* ``axpy_(a, j, w)``: ``w += a q_j`` (the recurrence's ``- beta q_{j-1}`` term, so ``q_prev`` is not
  kept on the device either);
* ``combine(s)``: the Ritz vector, with one chunk-sized device temporary;
* ``dots([y, r])``: ``q_j . y`` and ``q_j . r`` for every row (the symmetry probe of
  :func:`~lrscale_megatron.curvature.krylov.check_ritz_pairs`), one all-reduce.

The device then holds ``q``, the product and the chunk temporaries whatever ``max_iter``; the host holds
``m`` vectors. :func:`host_budget` sizes what the host can give (available RAM, the cgroup limit, divided
by the ranks on this node, times :data:`HOST_BUDGET_FRACTION`); ``lanczos(basis="auto")`` uses the host
basis when it fits there and every rank agrees, else the second pass (and says why in the log).

Memory accounting: rows are allocated with :data:`HOST_ALLOCATION` set, which
:class:`~lrscale_megatron.curvature.memtrack.HostDeviceBytes` reads to count them apart from the device's
storages (on a CPU-only machine both live in the same RAM).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lrscale_megatron.curvature.backend import VectorBackend

Vector = list[torch.Tensor]

#: share of this rank's part of the available host memory that a host basis may take
HOST_BUDGET_FRACTION = 0.5
#: elements per host-to-device chunk (16 MiB of float32): the largest device temporary of a host basis
HOST_CHUNK = 1 << 22
#: set while a host basis allocates its rows (read by ``memtrack.HostDeviceBytes``)
HOST_ALLOCATION: contextvars.ContextVar[bool] = contextvars.ContextVar("host_allocation", default=False)


@contextlib.contextmanager
def host_allocation(on: bool = True) -> Iterator[None]:
    """Tensors made inside are counted as host memory (``on``) or as device memory (``on=False``: the
    device evaluation of a host-vector product, :mod:`.hostvectors`) by ``memtrack.HostDeviceBytes``."""
    token = HOST_ALLOCATION.set(on)
    try:
        yield
    finally:
        HOST_ALLOCATION.reset(token)


_host_allocation = host_allocation


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), or None when unlimited / unknown."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def local_ranks() -> int:
    """Processes sharing this node's host memory: ``LOCAL_WORLD_SIZE`` (torchrun, DeepSpeed launcher),
    else the world size when ``torch.distributed`` is initialised (all on one node: conservative), else 1."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return max(int(dist.get_world_size()), 1)
    return 1


def host_budget() -> tuple[int, str]:
    """Bytes of host memory this rank may give a host basis, and how that figure was made."""
    avail = _meminfo_available()
    cg = _cgroup_available()
    if avail is None and cg is None:
        return 0, "available host memory unknown"
    room = min(x for x in (avail, cg) if x is not None)
    n = local_ranks()
    budget = int(HOST_BUDGET_FRACTION * room / n)
    src = "MemAvailable" if cg is None or (avail is not None and avail <= cg) else "cgroup memory.max"
    return budget, (
        f"{HOST_BUDGET_FRACTION:g} x {room / 2**30:.2f} GiB ({src}) / {n} local rank(s) = {budget / 2**30:.2f} GiB"
    )


def row_bytes(numel: int, itemsize: int, pinned: bool) -> int:
    """Host bytes of one stored vector (the pinned allocator rounds a block up to a power of two)."""
    n = numel * itemsize
    return 1 << max(n - 1, 0).bit_length() if pinned and n > 0 else n


class HostBasis:
    """Lanczos vectors in host memory for a :class:`VectorBackend` (module docstring)."""

    def __init__(self, backend: VectorBackend, capacity: int) -> None:
        self.be = backend
        self.capacity = int(capacity)
        self.pinned = backend.device.type == "cuda"
        self.sizes = [math.prod(s.shape) for s in backend.specs]
        self.numel = sum(self.sizes)
        self.rows: list[torch.Tensor] = []  # one flat host tensor per stored vector

    @property
    def nbytes(self) -> int:
        return sum(r.untyped_storage().nbytes() for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _views(self, row: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        off = 0
        for i, (n, spec) in enumerate(zip(self.sizes, self.be.specs)):
            yield i, row[off : off + n].view(spec.shape)
            off += n

    def _chunks(
        self, j: int, likes: Sequence[Vector], only: Sequence[int] | None = None
    ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """``([the part of like[i] for like in likes], the same part of q_j on the device)`` for every
        chunk of row ``j`` (parameters ``only``, default all): flat slices of at most :data:`HOST_CHUNK`
        elements, whole tensors where a ``like[i]`` is not contiguous."""
        dev = self.be.device
        wanted = set(range(len(self.sizes)) if only is None else only)
        for i, h in self._views(self.rows[j]):
            if i not in wanted:
                continue
            ts = [like[i] for like in likes]
            if h.numel() <= HOST_CHUNK or not all(t.is_contiguous() for t in ts):
                yield ts, h.to(dev, non_blocking=True)
                continue
            flat, tfs = h.reshape(-1), [t.view(-1) for t in ts]
            for a in range(0, flat.numel(), HOST_CHUNK):
                sl = slice(a, min(a + HOST_CHUNK, flat.numel()))
                yield [tf[sl] for tf in tfs], flat[sl].to(dev, non_blocking=True)

    def append(self, q: Vector) -> None:
        """Copy ``q`` to a new host row (asynchronous on CUDA)."""
        if len(self.rows) >= self.capacity:
            raise RuntimeError(f"host basis full ({self.capacity} vectors)")
        with _host_allocation():
            row = torch.empty(self.numel, dtype=self.be.dtype, pin_memory=self.pinned)
        for (_, h), t in zip(self._views(row), q):
            h.copy_(t, non_blocking=self.pinned)
        self.rows.append(row)

    def axpy_(self, a: float, j: int, w: Vector) -> Vector:
        """In place ``w += a q_j``; returns ``w``."""
        for (part,), c in self._chunks(j, [w]):
            part.add_(c, alpha=a)
        return w

    def combine(self, coeffs: Sequence[float]) -> Vector:
        """``sum_j coeffs[j] q_j`` on the device."""
        out = self.be.zeros()
        for j, cj in enumerate(coeffs):
            for (part,), c in self._chunks(j, [out]):
                part.add_(c, alpha=float(cj))
        return out

    def dots(self, xs: Sequence[Vector], rows: int | None = None) -> list[list[float]]:
        """``[[q_j . x for x in xs] for j < rows]`` (global inner products, one all-reduce).

        One pass: for every slice of :data:`~lrscale_megatron.curvature.backend.DOT_CHUNK` elements of a
        parameter, the rows' parts cross to the device once, and rows and ``xs`` are converted to
        float64 once each, ``acc += Q_slice X_slice^T`` (float64 products of float32 entries are exact):
        ``m + len(xs)`` conversions per slice instead of ``2 m len(xs)``, and ~70 slices instead of
        ``m`` x 52 per-tensor calls on the 834k GPT (float64 temporaries: ``m + len(xs)`` slices)."""
        m = len(self.rows) if rows is None else rows
        with self.be.allocation():  # host vectors: the float64 slices are host temporaries too
            return self._dots(xs, m)

    def _dots(self, xs: Sequence[Vector], m: int) -> list[list[float]]:
        from lrscale_megatron.curvature.backend import DOT_CHUNK

        dev = self.be.device
        acc = torch.zeros((m, len(xs)), dtype=torch.float64, device=dev)
        if m and xs:
            views = [[h.reshape(-1) for _, h in self._views(self.rows[j])] for j in range(m)]
            for i, spec in enumerate(self.be.specs):
                if not spec.owned:
                    continue
                flats = [x[i].reshape(-1) for x in xs]  # (a copy only where x[i] is not contiguous)
                for a in range(0, self.sizes[i], DOT_CHUNK):
                    sl = slice(a, min(a + DOT_CHUNK, self.sizes[i]))
                    qs = torch.stack([v[i][sl] for v in views[:m]]).to(dev, torch.float64, non_blocking=True)
                    acc += qs @ torch.stack([f[sl] for f in flats]).to(torch.float64).T
        if self.be._all_reduce is not None:
            self.be._all_reduce(acc)
        return acc.tolist()

    def release(self) -> None:
        """Free the rows (and the pinned allocator's cached blocks, so no host memory stays locked)."""
        self.rows = []
        if self.pinned:  # torch >= 2.9: torch.accelerator.empty_host_cache; older: torch._C._host_emptyCache
            acc = getattr(torch, "accelerator", None)
            empty = getattr(acc, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                torch.cuda.synchronize(self.be.device)
                empty()
