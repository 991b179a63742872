"""One-call Hessian spectra of a JAX loss: top eigenvalue(s) and trace.

These build a :class:`~lrscale_megatron.jax.hvp.HessianOperator` and run the *same* solvers as the
PyTorch path (:func:`~lrscale_megatron.curvature.lanczos_solver.lanczos`,
:func:`~lrscale_megatron.curvature.power.power_iteration`,
:func:`~lrscale_megatron.curvature.trace.hutchinson_trace`); results are the same types
(:class:`EigenResult`, :class:`TraceResult`) with ``converged`` / ``reason``: a value not certified by
the true-residual and symmetry checks says so. Eigenvectors, when asked for, are pytrees shaped like
``params``.

    res = lambda_max(loss, params, x, y, tol=1e-4)
    if not res.converged:
        raise RuntimeError(res.reason)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from lrscale_megatron.curvature.lanczos_solver import lanczos
from lrscale_megatron.curvature.power import power_iteration
from lrscale_megatron.curvature.results import EigenResult, TraceResult
from lrscale_megatron.curvature.trace import hutchinson_trace
from lrscale_megatron.jax.hvp import HessianOperator, Loss

logger = logging.getLogger(__name__)

_METHODS = ("lanczos", "power")


def _as_pytrees(op: HessianOperator, res: EigenResult) -> EigenResult:
    if res.eigenvectors is None:
        return res
    return dataclasses.replace(res, eigenvectors=[op.backend.to_pytree(v) for v in res.eigenvectors])


def lambda_max(
    loss_fn: Loss,
    params: Any,
    *args: Any,
    method: Literal["lanczos", "power"] = "lanczos",
    max_iter: int | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    return_vectors: bool = False,
    dtype: Any = None,
) -> EigenResult:
    """Largest Hessian eigenvalue of ``loss_fn(params, *args)`` (algebraically largest for Lanczos,
    largest magnitude for power iteration).

    Args:
        method: ``"lanczos"`` (default; ``max_iter`` default 20) or ``"power"`` (default 100).
        tol: relative residual tolerance ``||H y - theta y|| <= tol |theta|`` (checked with fresh products).
        seed: seed of the random start vector (the same vector for any sharding of ``params``).
        return_vectors: put the eigenvector (a pytree like ``params``) in ``eigenvectors``.
        dtype: vector dtype (default float64 for float64 params, else float32).
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {_METHODS}")
    op = HessianOperator(loss_fn, params, *args, dtype=dtype)
    if method == "power":
        res = power_iteration(op, max_iter=100 if max_iter is None else max_iter, tol=tol, seed=seed)
        if not return_vectors:
            res = dataclasses.replace(res, eigenvectors=None)
    else:
        res = lanczos(
            op,
            k=1,
            max_iter=20 if max_iter is None else max_iter,
            tol=tol,
            seed=seed,
            return_vectors=return_vectors,
        )
    logger.debug("jax lambda_max (%s): %s", method, res)
    return _as_pytrees(op, res)


def top_eigenvalues(
    loss_fn: Loss,
    params: Any,
    *args: Any,
    k: int = 5,
    which: Literal["LA", "SA", "LM"] = "LA",
    max_iter: int = 50,
    tol: float = 1e-3,
    seed: int = 0,
    return_vectors: bool = False,
    dtype: Any = None,
) -> EigenResult:
    """``k`` extreme Hessian eigenvalues by Lanczos with full reorthogonalisation (``which``: ``"LA"``
    largest, ``"SA"`` smallest, ``"LM"`` largest magnitude)."""
    op = HessianOperator(loss_fn, params, *args, dtype=dtype)
    res = lanczos(op, k=k, which=which, max_iter=max_iter, tol=tol, seed=seed, return_vectors=return_vectors)
    return _as_pytrees(op, res)


def hessian_trace(
    loss_fn: Loss,
    params: Any,
    *args: Any,
    n_samples: int = 100,
    seed: int = 0,
    tol: float | None = None,
    dtype: Any = None,
) -> TraceResult:
    """Hutchinson estimate of ``tr(H)`` with Rademacher probes (``estimate +- stderr``); with ``tol``,
    stops once ``stderr <= tol |estimate|`` (``converged=False, reason="max_samples"`` if never)."""
    op = HessianOperator(loss_fn, params, *args, dtype=dtype)
    return hutchinson_trace(op, n_samples=n_samples, seed=seed, tol=tol)
