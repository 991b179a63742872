"""Curvature core: Hessian-vector products (exact / finite-difference / forward-over-reverse, Adam-
preconditioned, per block) and the Krylov algorithms on top of them (Lanczos, power iteration,
Hutchinson trace, stochastic Lanczos quadrature), correct under tensor, pipeline and data parallelism.

    from lrscale_megatron.curvature import HessianOperator, lanczos, power_iteration, hutchinson_trace
    op = HessianOperator(model, loss_fn, batch, mode="exact")
    res = lanczos(op, k=1, max_iter=20, tol=1e-3, seed=0)

The names below are imported on first use (PEP 562), so the algorithms (``lanczos_solver``, ``power``,
``trace``, ``krylov``, ``results``, ``vectors``) import without torch: :mod:`lrscale_megatron.jax` runs
them over JAX arrays.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrscale_megatron.curvature.backend import ParamSpec, Vector, VectorBackend
    from lrscale_megatron.curvature.blocks import BlockOperator, transformer_blocks
    from lrscale_megatron.curvature.density import slq_density
    from lrscale_megatron.curvature.lanczos_solver import lanczos
    from lrscale_megatron.curvature.operators import HessianOperator, PreconditionedOperator
    from lrscale_megatron.curvature.power import deflated_power_iteration, power_iteration
    from lrscale_megatron.curvature.results import EigenResult, LinearOperator, SpectralDensity, TraceResult
    from lrscale_megatron.curvature.trace import hutchinson_trace
    from lrscale_megatron.curvature.vectors import VectorSpace

_WHERE = {
    "BlockOperator": "blocks",
    "EigenResult": "results",
    "HessianOperator": "operators",
    "LinearOperator": "results",
    "ParamSpec": "backend",
    "PreconditionedOperator": "operators",
    "SpectralDensity": "results",
    "TraceResult": "results",
    "Vector": "backend",
    "VectorBackend": "backend",
    "VectorSpace": "vectors",
    "deflated_power_iteration": "power",
    "hutchinson_trace": "trace",
    "lanczos": "lanczos_solver",
    "power_iteration": "power",
    "slq_density": "density",
    "transformer_blocks": "blocks",
}

__all__ = [
    "BlockOperator",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "ParamSpec",
    "PreconditionedOperator",
    "SpectralDensity",
    "TraceResult",
    "Vector",
    "VectorBackend",
    "VectorSpace",
    "deflated_power_iteration",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "slq_density",
    "transformer_blocks",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
