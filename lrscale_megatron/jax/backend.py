"""Vector arithmetic on the leaves of a JAX pytree: the JAX implementation of
:class:`~lrscale_megatron.curvature.vectors.VectorSpace`.

A vector is a Python ``list`` with one ``jax.Array`` per leaf of the parameter pytree, in
``jax.tree_util`` flattening order. JAX arrays are immutable, so the in-place methods (``axpy_``,
``scale_``) replace the list's items; the algorithms see the same semantics as with torch tensors.

Sharding: a leaf placed with ``jax.sharding`` (e.g. a ``NamedSharding`` over a ``Mesh``) is one
*global* array; every reduction here (``dot``, ``norm``, ``is_finite``) is a jitted ``jnp.sum`` over
global arrays, so XLA inserts the cross-device reductions and the result is the unsharded answer.
Random vectors are drawn per leaf from ``fold_in(key(seed), crc32(leaf path))`` at the leaf's global
shape (threefry is partitionable, so the values do not depend on the sharding) and laid out with the
leaf's sharding; a sharded run therefore draws the same vector as an unsharded one.

Precision: inner products are accumulated per leaf in the vector dtype (float32, or float64 when
``jax_enable_x64`` is on and the parameters are float64) by XLA's tree reduction, and summed over leaves
in Python float64. The torch backend accumulates in float64 chunks; for float32 vectors the JAX sums
carry about ``log2(n) * eps32`` relative error, far below the solvers' tolerances.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrscale_megatron.curvature.vectors import Vector


@jax.jit
def _leaf_dots(x: list[jax.Array], y: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.sum(a * b) for a, b in zip(x, y)])


@jax.jit
def _axpy(a: jax.Array, x: list[jax.Array], y: list[jax.Array]) -> list[jax.Array]:
    return [yi + (a * xi).astype(yi.dtype) for xi, yi in zip(x, y)]


@jax.jit
def _scale(a: jax.Array, x: list[jax.Array]) -> list[jax.Array]:
    return [(a * xi).astype(xi.dtype) for xi in x]


@jax.jit
def _all_finite(x: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(xi)) for xi in x]))


@functools.lru_cache(maxsize=1024)
def _maker(kind: str, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Callable[..., jax.Array]:
    """A jitted ``key -> array`` of ``shape`` laid out with ``sharding`` (cached across backends, so a
    measurement repeated during training compiles nothing new)."""
    if kind == "zeros":

        def make(key: jax.Array) -> jax.Array:
            return jnp.zeros(shape, dtype)
    elif kind == "randn":

        def make(key: jax.Array) -> jax.Array:
            return jax.random.normal(key, shape, dtype)
    else:

        def make(key: jax.Array) -> jax.Array:
            return jax.random.rademacher(key, shape, dtype)

    return jax.jit(make) if sharding is None else jax.jit(make, out_shardings=sharding)


def leaf_names(tree: Any) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf path (e.g. ``"['layer0']['w']"``), flattening order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class PytreeBackend:
    """dot / norm / axpy / random vectors over the leaves of a parameter pytree.

    Args:
        params: the parameter pytree (only shapes, dtypes, shardings and leaf paths are used).
        dtype: vector dtype; default float64 if any leaf is float64, else float32 (bf16/fp16
            parameters get float32 vectors, as in the torch backend).
    """

    def __init__(self, params: Any, dtype: Any = None) -> None:
        leaves, self.treedef = jax.tree_util.tree_flatten(params)
        if not leaves:
            raise ValueError("params has no leaves; pass the pytree of arrays the loss differentiates")
        self.names = leaf_names(params)
        for name, leaf in zip(self.names, leaves):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise ValueError(
                    f"params leaf {name} has dtype {jnp.result_type(leaf)}; the Hessian needs floating-point "
                    "leaves; fix: keep integer state out of the params pytree (pass it as a loss argument)"
                )
        self.shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        self.param_dtypes = [jnp.result_type(leaf) for leaf in leaves]
        self.shardings = [getattr(leaf, "sharding", None) for leaf in leaves]
        if dtype is None:
            dtype = jnp.float64 if any(d == jnp.float64 for d in self.param_dtypes) else jnp.float32
        self.dtype = jnp.dtype(dtype)
        if self.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
            raise ValueError(f"vector dtype={self.dtype} is not supported; use float32 or float64")
        if self.dtype == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
            raise ValueError(
                "vector dtype float64 needs 64-bit JAX; fix: jax.config.update('jax_enable_x64', True) "
                "(or the `with jax.enable_x64(True):` context) before building the parameters"
            )

    # ------------------------------------------------------------------ pytrees <-> vectors
    def to_pytree(self, v: Vector) -> Any:
        """The vector as a pytree shaped like ``params`` (leaves in the vector dtype)."""
        return jax.tree_util.tree_unflatten(self.treedef, list(v))

    def from_pytree(self, tree: Any, what: str = "vector") -> Vector:
        """A pytree shaped like ``params`` as a vector (checked, cast to the vector dtype)."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:  # type: ignore[operator]
            raise ValueError(f"{what} has tree structure {treedef}, expected the params' {self.treedef}")
        return self.as_vector(leaves, what)

    def as_vector(self, v: Sequence[Any], what: str) -> Vector:
        """``v`` (a list of leaf arrays, or a pytree shaped like ``params``) checked and cast to the vector
        dtype, each leaf laid out with its parameter's sharding."""
        if not (isinstance(v, list) and all(hasattr(t, "shape") for t in v)):
            return self.from_pytree(v, what)  # a pytree shaped like params (a tuple params tree included)
        if len(v) != len(self.shapes):
            raise ValueError(
                f"{what} has {len(v)} arrays but params has {len(self.shapes)} leaves; pass one array per "
                "leaf in jax.tree_util flattening order, or a pytree shaped like params"
            )
        out = []
        for name, shape, sharding, t in zip(self.names, self.shapes, self.shardings, v):
            if tuple(np.shape(t)) != shape:
                raise ValueError(f"{what} leaf {name} has shape {tuple(np.shape(t))}, expected {shape}")
            a = jnp.asarray(t, dtype=self.dtype)
            out.append(jax.device_put(a, sharding) if sharding is not None else a)
        return out

    # ------------------------------------------------------------------ reductions (global)
    @property
    def eps(self) -> float:
        return float(jnp.finfo(self.dtype).eps)

    @property
    def dim(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def dot(self, x: Vector, y: Vector) -> float:
        return float(np.asarray(_leaf_dots(list(x), list(y)), dtype=np.float64).sum())

    def dots(self, xs: Sequence[Vector], y: Vector) -> list[float]:
        if not xs:
            return []
        parts = jax.device_get([_leaf_dots(list(x), list(y)) for x in xs])  # one transfer, no new compile
        return [float(np.asarray(r, dtype=np.float64).sum()) for r in parts]

    def norm(self, x: Vector) -> float:
        return float(np.sqrt(max(self.dot(x, x), 0.0)))

    def is_finite(self, x: Vector) -> bool:
        return bool(_all_finite(list(x)))

    # ------------------------------------------------------------------ arithmetic
    def _scalar(self, a: float) -> jax.Array:
        return jnp.asarray(a, dtype=self.dtype)

    def axpy(self, a: float, x: Vector, y: Vector) -> Vector:
        return _axpy(self._scalar(a), list(x), list(y))

    def axpy_(self, a: float, x: Vector, y: Vector) -> Vector:
        y[:] = _axpy(self._scalar(a), list(x), list(y))
        return y

    def scale(self, a: float, x: Vector) -> Vector:
        return _scale(self._scalar(a), list(x))

    def scale_(self, a: float, x: Vector) -> Vector:
        x[:] = _scale(self._scalar(a), list(x))
        return x

    def clone(self, x: Vector) -> Vector:
        return list(x)  # arrays are immutable: a new list is a copy

    def combine(self, coeffs: Sequence[float], basis: Sequence[Vector]) -> Vector:
        out = self.zeros()
        for c, q in zip(coeffs, basis):
            self.axpy_(float(c), q, out)
        return out

    # ------------------------------------------------------------------ new vectors
    def _maker(self, kind: str, i: int) -> Callable[..., jax.Array]:
        return _maker(kind, self.shapes[i], self.dtype, self.shardings[i])

    def _draw(self, kind: str, seed: int) -> Vector:
        base = jax.random.key(int(seed))
        return [
            self._maker(kind, i)(jax.random.fold_in(base, zlib.crc32(name.encode())))
            for i, name in enumerate(self.names)
        ]

    def zeros(self) -> Vector:
        return self._draw("zeros", 0)

    def randn(self, seed: int) -> Vector:
        return self._draw("randn", seed)

    def rademacher(self, seed: int) -> Vector:
        return self._draw("rademacher", seed)
