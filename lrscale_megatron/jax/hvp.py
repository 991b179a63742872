"""Hessian-vector products of a scalar loss over a pytree of parameters, by forward-over-reverse.

``H v = d/dt grad L(theta + t v) |_{t=0}``: ``jax.jvp`` of ``jax.grad`` (Pearlmutter 1994, Neural
Computation 6; the JAX autodiff cookbook's ``hvp``). One product costs about one forward and two
backward passes and is exact up to rounding; the loss must be deterministic (no fresh dropout key per
call) for the Hessian to be a fixed symmetric matrix, which the solvers' symmetry check probes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from lrscale_megatron.curvature.vectors import Vector
from lrscale_megatron.jax.backend import PytreeBackend

Loss = Callable[..., Any]


def hvp(loss_fn: Loss, params: Any, v: Any, *args: Any) -> Any:
    """``H v`` for the Hessian of ``loss_fn(params, *args)`` w.r.t. ``params``; ``v`` a pytree like
    ``params`` (same dtypes). Jit it at the call site if it is called in a loop."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


def _product(loss_fn: Loss, treedef: Any, vec_dtype: Any) -> Callable[..., Any]:
    """``(params, args, v_leaves) -> (H v)_leaves`` at vector-dtype copies of the parameters: bf16/fp16
    parameters are measured at float32 copies (as in the PyTorch operator), so the product is not
    swamped by half-precision round-off; float32/float64 parameters are used as they are."""

    def product(p: Any, a: tuple[Any, ...], v: list[jax.Array]) -> list[jax.Array]:
        leaves = jax.tree_util.tree_leaves(p)
        wide = jax.tree_util.tree_unflatten(treedef, [x.astype(vec_dtype) for x in leaves])
        tangent = jax.tree_util.tree_unflatten(treedef, [x.astype(vec_dtype) for x in v])
        return [x.astype(vec_dtype) for x in jax.tree_util.tree_leaves(hvp(loss_fn, wide, tangent, *a))]

    return product


@functools.lru_cache(maxsize=64)
def _jitted_product(loss_fn: Loss, treedef: Any, vec_dtype: Any) -> Callable[..., Any]:
    """The jitted product, cached per (loss, tree structure, vector dtype): a measurement repeated during
    training with the same ``loss_fn`` object reuses the compiled product (new parameter values and
    batches of the same shapes do not recompile)."""
    return jax.jit(_product(loss_fn, treedef, vec_dtype))


class HessianOperator:
    """The Hessian of ``loss_fn(params, *args)`` as a
    :class:`~lrscale_megatron.curvature.results.LinearOperator` on :class:`PytreeBackend` vectors.

    ``matvec`` takes and returns one array per parameter leaf (vector dtype); the product is taken at
    vector-dtype copies of the parameters (float32 copies of bf16/fp16 leaves, as in the PyTorch
    operator; float32/float64 leaves as they are). The product is jitted
    once per ``(loss_fn, tree structure, vector dtype)`` and cached, so pass the same ``loss_fn`` object to
    repeated measurements (``jit=False`` for a loss that cannot be traced). Parameters sharded with
    ``jax.sharding`` stay sharded; the product is the global one.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar``; deterministic.
        params: the parameter pytree at which the Hessian is taken.
        *args: the batch (and anything else the loss needs), held fixed.
        dtype: vector dtype (see :class:`PytreeBackend`).
        jit: jit the product.
    """

    returns_new_tensors = True  # every product is a new list of new arrays

    def __init__(self, loss_fn: Loss, params: Any, *args: Any, dtype: Any = None, jit: bool = True) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(params, *args) -> scalar")
        self.backend = PytreeBackend(params, dtype=dtype)
        self.params = params
        self.args = args
        self.n_matvec = 0
        key = (loss_fn, self.backend.treedef, self.backend.dtype)
        self._product = _jitted_product(*key) if jit else _product(*key)

    def matvec(self, v: Vector) -> Vector:
        self.n_matvec += 1
        return list(self._product(self.params, self.args, list(v)))

    __call__ = matvec

    def apply(self, v: Any) -> Any:
        """``H v`` for a pytree ``v`` shaped like ``params`` (returns a pytree, vector dtype)."""
        return self.backend.to_pytree(self.matvec(self.backend.from_pytree(v, "v")))
