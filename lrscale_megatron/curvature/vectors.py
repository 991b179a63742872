"""The vector-space protocol the curvature algorithms are written against (no torch, no jax here).

Lanczos (:mod:`.lanczos_solver`), power iteration (:mod:`.power`), Hutchinson (:mod:`.trace`), SLQ
(:mod:`.density`) and the checks in :mod:`.krylov` touch vectors only through a :class:`VectorSpace`:
inner products, norms, ``y + a x``, random probes, finiteness. Two implementations exist:

- :class:`lrscale_megatron.curvature.backend.VectorBackend`: lists of per-parameter torch tensors,
  aware of tensor/pipeline sharding (one all-reduce per inner product);
- :class:`lrscale_megatron.jax.backend.PytreeBackend`: the leaves of a JAX pytree, sharded or not
  (``jax.sharding`` makes every reduction global).

A *vector* is a Python ``list`` with one array per parameter, in the operator's parameter order. The
in-place methods (``axpy_``, ``scale_``) update the list they are given and also return it; the
algorithms rely on the update, not on the return value. A backend of immutable arrays (JAX) keeps that
contract by replacing the list's items, so the algorithm code is the same for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

#: One array per parameter (torch tensors, jax arrays), in the operator's parameter order.
Vector = list[Any]


@runtime_checkable
class VectorSpace(Protocol):
    """What the algorithms need of a vector backend. Every reduction is *global* (over all shards)."""

    @property
    def dim(self) -> int:
        """Dimension of the whole (unsharded) parameter vector."""
        ...

    @property
    def eps(self) -> float:
        """Machine epsilon of the vector dtype (scale of the breakdown test)."""
        ...

    def as_vector(self, v: Sequence[Any], what: str) -> Vector:
        """``v`` checked (one array per parameter, this rank's shapes) and cast to the vector dtype."""
        ...

    def dot(self, x: Vector, y: Vector) -> float: ...

    def dots(self, xs: Sequence[Vector], y: Vector) -> list[float]:
        """``[<x_i, y>]`` with one reduction (reorthogonalisation)."""
        ...

    def norm(self, x: Vector) -> float: ...

    def axpy(self, a: float, x: Vector, y: Vector) -> Vector:
        """A new vector ``y + a x``."""
        ...

    def axpy_(self, a: float, x: Vector, y: Vector) -> Vector:
        """``y += a x`` in place (the list ``y`` is updated); returns ``y``."""
        ...

    def scale(self, a: float, x: Vector) -> Vector: ...

    def scale_(self, a: float, x: Vector) -> Vector:
        """``x *= a`` in place (the list ``x`` is updated); returns ``x``."""
        ...

    def clone(self, x: Vector) -> Vector: ...

    def zeros(self) -> Vector: ...

    def combine(self, coeffs: Sequence[float], basis: Sequence[Vector]) -> Vector:
        """``sum_i coeffs[i] basis[i]``."""
        ...

    def is_finite(self, x: Vector) -> bool:
        """True when every entry of every shard is finite."""
        ...

    def randn(self, seed: int) -> Vector:
        """Standard normal vector, the same for every sharding of the parameters."""
        ...

    def rademacher(self, seed: int) -> Vector:
        """``+-1`` vector (Hutchinson probes), seeded like :meth:`randn`."""
        ...


@runtime_checkable
class OffDeviceBasis(Protocol):
    """Lanczos vectors kept off the accelerator (host memory), streamed back when used.

    A backend may offer one through ``host_basis(n_vectors) -> (basis or None, why)``; ``lanczos``
    (``basis="host"``, or ``"auto"`` with ``k=1``) then keeps no basis and no ``q_prev`` on the device.
    :class:`lrscale_megatron.curvature.hostbasis.HostBasis` is the torch implementation; a backend without
    ``host_basis`` (JAX) falls back to the two-pass Lanczos.
    """

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        ...

    def append(self, q: Vector) -> None:
        """Store a copy of ``q`` as the next row."""
        ...

    def axpy_(self, a: float, j: int, w: Vector) -> Vector:
        """``w += a q_j`` in place; returns ``w``."""
        ...

    def combine(self, coeffs: Sequence[float]) -> Vector:
        """``sum_j coeffs[j] q_j`` on the device."""
        ...

    def dots(self, xs: Sequence[Vector], rows: int | None = None) -> list[list[float]]:
        """``[[<q_j, x> for x in xs] for j < rows]``, global, one reduction."""
        ...

    def release(self) -> None:
        """Free the stored rows."""
        ...
