"""JAX API: Hessian spectra of a pytree of parameters and an optax schedule from a law prediction.

Install with ``pip install 'lrscale-megatron[jax]'``. The eigensolvers are the *same* functions as the
PyTorch path (:mod:`lrscale_megatron.curvature`): Lanczos, power iteration and Hutchinson run over a
:class:`~lrscale_megatron.curvature.vectors.VectorSpace`, here :class:`PytreeBackend` (the leaves of a
pytree, sharded with ``jax.sharding`` or not). Nothing here imports torch.

    import jax.numpy as jnp
    from lrscale_megatron.jax import lambda_max, optax_schedule

    def loss(params, x, y):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    res = lambda_max(loss, params, x, y, tol=1e-4)           # EigenResult: .lambda_max, .converged, .reason
    sched = optax_schedule(3e-4, total_steps=10_000, warmup_steps=500, decay_style="cosine")

Modules: :mod:`.backend` (vector arithmetic on pytree leaves), :mod:`.hvp` (forward-over-reverse
Hessian-vector products), :mod:`.spectrum` (entry points), :mod:`.optax_schedule` (schedules).
"""

from lrscale_megatron.jax._require import require_jax

require_jax()

from lrscale_megatron.curvature.density import slq_density  # noqa: E402
from lrscale_megatron.curvature.lanczos_solver import lanczos  # noqa: E402
from lrscale_megatron.curvature.power import power_iteration  # noqa: E402
from lrscale_megatron.curvature.results import EigenResult, SpectralDensity, TraceResult  # noqa: E402
from lrscale_megatron.curvature.trace import hutchinson_trace  # noqa: E402
from lrscale_megatron.jax.backend import PytreeBackend  # noqa: E402
from lrscale_megatron.jax.hvp import HessianOperator, hvp  # noqa: E402
from lrscale_megatron.jax.optax_schedule import TableSchedule, optax_schedule  # noqa: E402
from lrscale_megatron.jax.spectrum import hessian_trace, lambda_max, top_eigenvalues  # noqa: E402

__all__ = [
    "EigenResult",
    "HessianOperator",
    "PytreeBackend",
    "SpectralDensity",
    "TableSchedule",
    "TraceResult",
    "hessian_trace",
    "hutchinson_trace",
    "hvp",
    "lambda_max",
    "lanczos",
    "optax_schedule",
    "power_iteration",
    "slq_density",
    "top_eigenvalues",
]
