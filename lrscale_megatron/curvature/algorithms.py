"""Krylov eigensolvers, trace and spectral-density estimators (re-exported; one module per concept).

- :mod:`.krylov`: shared building blocks and the true-residual / symmetry check;
- :mod:`.lanczos_solver`: :func:`lanczos` (stored or recomputed basis);
- :mod:`.power`: :func:`power_iteration`, :func:`deflated_power_iteration`;
- :mod:`.trace`: :func:`hutchinson_trace`;
- :mod:`.density`: :func:`slq_density`.
"""

from lrscale_megatron.curvature.density import slq_density
from lrscale_megatron.curvature.lanczos_solver import lanczos
from lrscale_megatron.curvature.power import deflated_power_iteration, power_iteration
from lrscale_megatron.curvature.trace import hutchinson_trace

__all__ = ["deflated_power_iteration", "hutchinson_trace", "lanczos", "power_iteration", "slq_density"]
