"""Curvature core: Hessian-vector products (exact / finite-difference / forward-over-reverse, Adam-
preconditioned, per block) and the Krylov algorithms on top of them (Lanczos, power iteration,
Hutchinson trace, stochastic Lanczos quadrature), correct under tensor, pipeline and data parallelism.

    from lrscale_megatron.curvature import HessianOperator, lanczos, power_iteration, hutchinson_trace
    op = HessianOperator(model, loss_fn, batch, mode="exact")
    res = lanczos(op, k=1, max_iter=20, tol=1e-3, seed=0)
"""

from lrscale_megatron.curvature.backend import ParamSpec, Vector, VectorBackend
from lrscale_megatron.curvature.blocks import BlockOperator, transformer_blocks
from lrscale_megatron.curvature.density import slq_density
from lrscale_megatron.curvature.lanczos_solver import lanczos
from lrscale_megatron.curvature.operators import HessianOperator, PreconditionedOperator
from lrscale_megatron.curvature.power import deflated_power_iteration, power_iteration
from lrscale_megatron.curvature.results import EigenResult, LinearOperator, SpectralDensity, TraceResult
from lrscale_megatron.curvature.trace import hutchinson_trace

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
    "deflated_power_iteration",
    "hutchinson_trace",
    "lanczos",
    "power_iteration",
    "slq_density",
    "transformer_blocks",
]
