"""Vector arithmetic on lists of per-parameter tensors, aware of model-parallel sharding.

A *vector* is a ``list[torch.Tensor]`` with one tensor per parameter of the operator, in the operator's
parameter order, each of the *vector dtype* (float32, or float64 for float64 models). Vectors are never
flattened into one tensor: under tensor/pipeline parallelism each rank holds only its shards.

Inner products follow Megatron's ``clip_grads.get_grad_norm_fp32``: a local sum over the *unique*
shards this rank owns (TP-sharded parameters on every TP rank, TP-replicated parameters on tp_rank 0
only, never the pipeline-stage copy of a tied embedding), then **one** all-reduce over the
model-parallel group. This is the only place in the curvature package that communicates for dot
products; the algorithms (``algorithms.py``) call :meth:`VectorBackend.dot` and never touch
``torch.distributed``.

Random vectors are drawn per parameter from a generator seeded by ``(seed, global parameter name)``
at the parameter's *full* (unsharded) shape and then sliced to this rank's shard. Every rank holding
the same shard (DP replicas, TP-replicated copies) therefore draws the same numbers, and a sharded run
draws exactly the shards of the vector the unsharded run draws, so Krylov iterates agree between
layouts up to rounding.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lrscale_megatron.curvature.hostbasis import HostBasis

Vector = list[torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """What the backend needs to know about one parameter's place in the global parameter vector.

    Attributes:
        name: global, layout-independent name (pipeline stages renumber their local layers to the
            global layer index), used to seed random vectors.
        shape: local (this rank's shard) shape.
        owned: whether this rank counts the tensor in inner products (see module docstring).
        partition_dim: dimension along which the tensor is sharded over tensor-parallel ranks, or
            ``None`` if it is replicated over them.
        tp_size: number of tensor-parallel shards along ``partition_dim`` (1 if replicated).
        tp_rank: index of this rank's shard.
    """

    name: str
    shape: tuple[int, ...]
    owned: bool = True
    partition_dim: int | None = None
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def full_shape(self) -> tuple[int, ...]:
        if self.partition_dim is None:
            return self.shape
        s = list(self.shape)
        s[self.partition_dim] *= self.tp_size
        return tuple(s)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a tensor of :attr:`full_shape`."""
        if self.partition_dim is None:
            return full
        return full.chunk(self.tp_size, dim=self.partition_dim)[self.tp_rank].contiguous()


class VectorBackend:
    """dot / norm / axpy / random vectors over a fixed list of :class:`ParamSpec`.

    Args:
        specs: one spec per parameter, in operator order.
        dtype: the vector dtype (float32 or float64).
        device: where vectors live.
        all_reduce: ``fn(tensor) -> None`` summing a float64 scalar tensor in place over the
            model-parallel group, or ``None`` for a single (unsharded) process. Supplied by
            :class:`lrscale_megatron.parallel.ParallelContext`.
    """

    #: ``fn(tensor) -> None`` summing a float64 tensor in place over *every* rank that takes part in a
    #: measurement (model- and data-parallel), so that all of them choose the same Lanczos basis mode
    #: (:meth:`host_basis`); set by :meth:`lrscale_megatron.parallel.ParallelContext.backend`.
    agree: Callable[[torch.Tensor], None] | None = None
    #: the vectors are kept in host memory apart from the model's device (:meth:`keep_on_host`):
    #: allocations are then marked as host for the memory accounting (:meth:`allocation`)
    host: bool = False
    #: host vectors are page-locked (the model is on CUDA: asynchronous copies)
    pin: bool = False

    def __init__(
        self,
        specs: Sequence[ParamSpec],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        all_reduce=None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"vector dtype={dtype} is not supported; use torch.float32 or torch.float64")
        self.specs = list(specs)
        self.dtype = dtype
        self.device = torch.device(device)
        self._all_reduce = all_reduce

    def keep_on_host(self, pin: bool = False) -> VectorBackend:
        """Keep the vectors in host memory (``HessianOperator(vectors="host")``): :attr:`device` becomes the
        CPU, and ``pin`` (the model is on CUDA) allocates new vectors page-locked. Inner products are still
        reduced on the parallel context's device (:class:`~lrscale_megatron.parallel.ParallelContext`
        copies the float64 scalars there). Returns ``self``."""
        self.device, self.host, self.pin = torch.device("cpu"), True, bool(pin)
        return self

    @contextlib.contextmanager
    def allocation(self) -> Iterator[None]:
        """Tensors made inside are host memory when :attr:`host` (counted apart by
        :class:`~lrscale_megatron.curvature.memtrack.HostDeviceBytes`); a no-op for device vectors."""
        if not self.host:
            yield
            return
        from lrscale_megatron.curvature.hostbasis import host_allocation

        with host_allocation():
            yield

    @property
    def eps(self) -> float:
        """Machine epsilon of the vector dtype."""
        return float(torch.finfo(self.dtype).eps)

    def as_vector(self, v: Sequence[torch.Tensor], what: str) -> Vector:
        """``v`` checked (one tensor per parameter, this rank's shard shapes) and cast to the vector
        dtype and device (a copy only where the cast needs one)."""
        if len(v) != len(self.specs):
            raise ValueError(
                f"{what} has {len(v)} tensors but the operator has {len(self.specs)} parameters; "
                "pass one tensor per parameter, in operator order"
            )
        for i, (t, spec) in enumerate(zip(v, self.specs)):
            if tuple(t.shape) != tuple(spec.shape):
                raise ValueError(
                    f"{what}[{i}] ({spec.name}) has shape {tuple(t.shape)}, expected this rank's shard "
                    f"shape {tuple(spec.shape)}"
                )
        with self.allocation():
            return [t.to(dtype=self.dtype, device=self.device) for t in v]

    # ------------------------------------------------------------------ reductions
    def local_dot(self, x: Vector, y: Vector) -> torch.Tensor:
        """Sum of x·y over the shards this rank owns, as a float64 0-d tensor (no communication).

        Products are formed in float64 in chunks of at most :data:`DOT_CHUNK` elements, so the only
        float64 temporaries are chunk-sized, never parameter-sized (a 13B model's embedding would
        otherwise need two multi-GiB float64 copies per inner product).
        """
        with self.allocation():  # host vectors: the float64 chunks are host memory (accounting)
            s = torch.zeros((), dtype=torch.float64, device=x[0].device if len(x) else self.device)
            for spec, a, b in zip(self.specs, x, y):
                if spec.owned:
                    s += _chunked_dot(a, b)
        return s

    def dot(self, x: Vector, y: Vector) -> float:
        """Global inner product <x, y> over the whole (unsharded) parameter vector."""
        s = self.local_dot(x, y)
        if self._all_reduce is not None:
            self._all_reduce(s)
        return float(s.item())

    def dots(self, xs: Sequence[Vector], y: Vector) -> list[float]:
        """<x_i, y> for several x_i with a single all-reduce (used by reorthogonalisation)."""
        if not xs:
            return []
        s = torch.stack([self.local_dot(x, y) for x in xs])
        if self._all_reduce is not None:
            self._all_reduce(s)
        return [float(v) for v in s.tolist()]

    def norm(self, x: Vector) -> float:
        return math.sqrt(max(self.dot(x, x), 0.0))

    def norm_estimate(self, x: Vector) -> float:
        """``||x||`` to the vector dtype's accuracy, cheaper than :meth:`norm` (one fused norm per list,
        no float64 conversion; one all-reduce): for step sizes, not for the Krylov recurrence.
        Falls back to :meth:`norm` when a per-tensor norm overflows."""
        owned = [xi for spec, xi in zip(self.specs, x) if spec.owned and xi.numel() > 0]
        s = torch.zeros((), dtype=torch.float64, device=self.device)
        if owned:
            s += torch.stack(torch._foreach_norm(owned)).to(torch.float64).square().sum()
        if self._all_reduce is not None:
            self._all_reduce(s)
        out = math.sqrt(max(float(s.item()), 0.0))
        return out if math.isfinite(out) else self.norm(x)

    # ------------------------------------------------------------------ arithmetic (no communication)
    def axpy(self, a: float, x: Vector, y: Vector) -> Vector:
        """Returns ``y + a * x`` (new tensors)."""
        with self.allocation():
            return [yi + a * xi for xi, yi in zip(x, y)]

    def axpy_(self, a: float, x: Vector, y: Vector) -> Vector:
        """In place: ``y += a * x``; returns ``y``."""
        for xi, yi in zip(x, y):
            yi.add_(xi, alpha=a)
        return y

    def scale(self, a: float, x: Vector) -> Vector:
        with self.allocation():
            return [a * xi for xi in x]

    def scale_(self, a: float, x: Vector) -> Vector:
        """In place: ``x *= a``; returns ``x``."""
        for xi in x:
            xi.mul_(a)
        return x

    def clone(self, x: Vector) -> Vector:
        with self.allocation():
            return [xi.clone() for xi in x]

    def zeros(self) -> Vector:
        with self.allocation():
            return [
                torch.zeros(s.shape, dtype=self.dtype, device=self.device, pin_memory=self.pin)
                for s in self.specs
            ]

    def combine(self, coeffs: Sequence[float], basis: Sequence[Vector]) -> Vector:
        """Σ_i coeffs[i] · basis[i] (e.g. a Ritz vector from Lanczos vectors)."""
        out = self.zeros()
        for c, q in zip(coeffs, basis):
            self.axpy_(float(c), q, out)
        return out

    def is_finite(self, x: Vector) -> bool:
        """True when every entry of every shard on every model-parallel rank is finite."""
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        xs = [xi for xi in x if xi.numel() > 0]
        if xs:  # per-tensor norms (NaN and Inf propagate): no full-size temporary, one sync
            # The 2-norm first (~14x cheaper than the infinity norm on CPU: 0.2 vs 3 ms on 834k floats): a
            # finite 2-norm proves every entry finite (a square is never negative, so an Inf cannot cancel);
            # only a tensor whose 2-norm is not finite (a NaN/Inf, or finite entries whose squares overflow)
            # is looked at again with the infinity norm, which decides.
            nrm = torch.stack(torch._foreach_norm(xs))
            suspect = (~torch.isfinite(nrm)).nonzero().flatten().tolist()
            if suspect:
                amax = torch.stack(torch._foreach_norm([xs[i] for i in suspect], float("inf")))
                bad += (~torch.isfinite(amax)).sum().to(torch.float64)
        if self._all_reduce is not None:
            self._all_reduce(bad)
        return float(bad.item()) == 0.0

    # ------------------------------------------------------------------ random vectors
    def _generator(self, seed: int, name: str) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
        return g

    def randn(self, seed: int) -> Vector:
        """Gaussian vector, identical on every rank holding the same shard (see module docstring).

        Drawn in the vector dtype (float32 normals for float32 vectors: ~4x cheaper than drawing float64
        and rounding, 6 vs 23 ms on 834k parameters), so a float32 and a float64 backend draw different
        numbers for the same seed; every layout of one dtype draws the same vector."""
        out = []
        with self.allocation():
            for s in self.specs:
                full = torch.randn(s.full_shape, generator=self._generator(seed, s.name), dtype=self.dtype)
                out.append(s.shard(full).to(device=self.device))
        return out

    def rademacher(self, seed: int) -> Vector:
        """±1 vector (Hutchinson probes), seeded like :meth:`randn`."""
        out = []
        with self.allocation():
            for s in self.specs:
                g = self._generator(seed, s.name)
                full = torch.randint(0, 2, s.full_shape, generator=g, dtype=torch.int8).to(torch.float64)
                out.append(s.shard(full * 2.0 - 1.0).to(dtype=self.dtype, device=self.device))
        return out

    # ------------------------------------------------------------------ basis kept in host memory
    def host_basis(self, n_vectors: int) -> tuple[HostBasis | None, str]:
        """A :class:`~lrscale_megatron.curvature.hostbasis.HostBasis` for ``n_vectors`` vectors when
        they fit this rank's host budget on *every* rank, else ``(None, why)``; the string says which
        and why (logged by ``lanczos``)."""
        from lrscale_megatron.curvature import hostbasis as hb

        numel = sum(math.prod(s.shape) for s in self.specs)
        pinned = self.device.type == "cuda"
        need = n_vectors * hb.row_bytes(numel, torch.finfo(self.dtype).bits // 8, pinned)
        budget, how = hb.host_budget()
        fits = need <= budget
        why = f"{n_vectors} vectors need {need / 2**30:.3f} GiB of host memory, budget {how}"
        import torch.distributed as dist

        if self.agree is not None:
            bad = torch.tensor([0.0 if fits else 1.0], dtype=torch.float64, device=self.device)
            self.agree(bad)
            n_bad = int(bad.item())
            if n_bad:
                return None, f"{why}; {n_bad} rank(s) lack the room" if fits else why
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return None, (
                "a multi-process job whose vector backend has no agreement reduction (`agree`, set by "
                "ParallelContext.backend): ranks could choose different basis modes"
            )
        if not fits:
            return None, why
        return hb.HostBasis(self, n_vectors), why

    def global_sum(self, local: float) -> float:
        """``local`` summed over the model-parallel ranks (this rank's value when there are none)."""
        n = torch.tensor(float(local), dtype=torch.float64, device=self.device)
        if self._all_reduce is not None:
            self._all_reduce(n)
        return float(n.item())

    @property
    def dim(self) -> int:
        """Dimension of the global parameter vector (owned entries summed over model-parallel ranks)."""
        return int(round(self.global_sum(sum(math.prod(s.shape) for s in self.specs if s.owned))))


#: elements per float64 chunk in :meth:`VectorBackend.local_dot` (512 KiB of float64 temporaries)
DOT_CHUNK = 1 << 16


def _chunked_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` accumulated in float64 with chunk-sized float64 temporaries only."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    n = fa.numel()
    if n <= DOT_CHUNK:
        return torch.dot(fa.to(torch.float64), fb.to(torch.float64))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, n, DOT_CHUNK):
        total += torch.dot(fa[i : i + DOT_CHUNK].to(torch.float64), fb[i : i + DOT_CHUNK].to(torch.float64))
    return total


def single_process_backend(
    params: Sequence[torch.nn.Parameter], names: Sequence[str] | None = None, dtype: torch.dtype | None = None
) -> VectorBackend:
    """A backend for unsharded parameters (every tensor owned, no communication)."""
    names = list(names) if names is not None else [f"p{i}" for i in range(len(params))]
    specs = [ParamSpec(name=n, shape=tuple(p.shape)) for n, p in zip(names, params)]
    if dtype is None:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = params[0].device if len(params) else torch.device("cpu")
    return VectorBackend(specs, dtype=dtype, device=device)
